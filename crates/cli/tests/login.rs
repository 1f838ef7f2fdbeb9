//! Signing in end to end: the real `breakglass` binary as server and CLI, a
//! real OpenID Provider (`oidc-provider`, from the testkit) whose login
//! pages the test fills in as a person would, and a GitHub-Actions-like
//! issuer. Each person has their own config directory, so their stored
//! logins are as separate as on two machines.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use breakglass_testkit::oidc::{self, GithubActionsIssuer, OidcOptions, OidcProvider};
use common::{BIN, CLI_TIMEOUT, CliOutput, POLICY, Server, Setup, wait_cli};

/// The test policy plus a target whose approvers must have signed in
/// within 3 seconds, and one that workloads may request.
fn policy() -> String {
    format!(
        r#"{POLICY}
@id("fresh-approvals")
@approvals("1")
@approvers("sre-leads")
@approver_fresh_auth("3s")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"fresh");

@id("deploys")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"deployers", action == Action::"request",
        resource in TargetGroup::"production");
"#
    )
}

/// A server configured with the provider (and the GitHub-like issuer).
fn server_setup(op: &OidcProvider, gha: Option<&GithubActionsIssuer>) -> Setup {
    let setup = Setup::with_policy(&policy());
    let mut extra = format!(
        "\n[identity.oidc]\nissuer = \"{}\"\nclient_id = \"{}\"\n",
        op.issuer(),
        op.client_id()
    );
    if let Some(gha) = gha {
        extra.push_str(&format!(
            "\n[[identity.workloads]]\nname = \"gha:{{repository}}:{{environment}}\"\n\
             issuer = \"{}\"\naudience = \"breakglass-test\"\ngroups = [\"deployers\"]\n\
             [identity.workloads.claims]\nrepository = \"acme/payments\"\nenvironment = \"production\"\n",
            gha.issuer()
        ));
    }
    let text = setup.config_text();
    let (before_targets, targets) = text.split_at(text.find("[[targets]]").expect("targets"));
    let config = format!(
        "{before_targets}{targets}\n[[targets]]\nname = \"fresh-db\"\nkind = \"generic\"\n\
         groups = [\"fresh\"]\n[targets.roles.read]\n\n{extra}"
    );
    std::fs::write(setup.config_path(), config).expect("write config");
    setup
}

/// One person at their own machine: a config directory for the CLI.
struct Person {
    name: &'static str,
    home: tempfile::TempDir,
}

impl Person {
    fn new(name: &'static str) -> Person {
        Person {
            name,
            home: tempfile::tempdir().expect("home"),
        }
    }

    fn credentials(&self) -> std::path::PathBuf {
        self.home.path().join("breakglass").join("credentials.json")
    }

    fn command(&self, url: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--url").arg(url).args(args);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn run(&self, url: &str, args: &[&str]) -> CliOutput {
        self.run_env(url, args, &[])
    }

    fn run_env(&self, url: &str, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
        let mut cmd = self.command(url, args);
        cmd.envs(env.iter().copied());
        wait_cli(cmd.spawn().expect("spawn CLI"), CLI_TIMEOUT)
    }

    /// Runs `login` with `args`; when it prints a line starting with
    /// `marker`, hands that line to `act` (the person at the browser).
    fn login(
        &self,
        url: &str,
        args: &[&str],
        marker: &str,
        act: impl FnOnce(&str) -> anyhow::Result<()>,
    ) -> CliOutput {
        let mut full = vec!["login"];
        full.extend_from_slice(args);
        let mut child = self.command(url, &full).spawn().expect("spawn login");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let line = rx
            .iter()
            .find(|l| l.trim_start().starts_with(marker))
            .unwrap_or_default();
        if line.is_empty() {
            let out = wait_cli(child, CLI_TIMEOUT);
            panic!(
                "login printed no line starting with {marker:?}: {out:#?}\n{}",
                reader.join().unwrap_or_default()
            );
        }
        act(&line).expect("the person's part of the login");
        let mut out = wait_cli_without_stderr(child);
        out.stderr = reader.join().expect("stderr reader");
        out
    }

    /// A device login: reads the code the CLI prints and enters it at the
    /// provider with the person's password.
    fn device_login(&self, url: &str, op: &OidcProvider, args: &[&str]) -> CliOutput {
        let user = oidc::user(self.name).expect("test user");
        self.login(url, args, "To sign in, open", |line| {
            let code = line.rsplit(' ').next().unwrap_or_default();
            op.complete_device_login(code, user.name, user.password)
        })
    }
}

/// Waits (bounded) for a child whose stderr is read elsewhere.
fn wait_cli_without_stderr(mut child: std::process::Child) -> CliOutput {
    use std::io::Read as _;
    let mut out = child.stdout.take().expect("stdout pipe");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = breakglass_testkit::poll(CLI_TIMEOUT, || child.try_wait().expect("try_wait"));
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("login did not finish within {CLI_TIMEOUT:?}");
    };
    CliOutput {
        code: status.code().unwrap_or(-1),
        stdout: reader.join().expect("stdout reader"),
        stderr: String::new(),
    }
}

fn id_of(out: &CliOutput) -> String {
    out.json()["id"].as_str().expect("id").to_string()
}

fn request(p: &Person, url: &str, target: &str) -> String {
    let out = p.run(
        url,
        &[
            "request",
            target,
            "--role",
            "read",
            "--duration",
            "15m",
            "--reason",
            "disk full",
            "--output",
            "json",
        ],
    );
    out.expect_code(0);
    assert_eq!(out.json()["state"], "pending", "{out:#?}");
    id_of(&out)
}

fn no_token_in(out: &CliOutput, path: &Path) {
    let text = std::fs::read_to_string(path).expect("credentials file");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    for entry in doc["servers"].as_object().expect("servers").values() {
        let token = entry["id_token"].as_str().expect("id_token");
        assert!(
            !out.stdout.contains(token) && !out.stderr.contains(token),
            "{out:#?}"
        );
        if let Some(r) = entry["refresh_token"].as_str() {
            assert!(
                !out.stdout.contains(r) && !out.stderr.contains(r),
                "{out:#?}"
            );
        }
    }
}

#[test]
fn device_login_then_whoami_request_and_cross_user_approval() {
    let op = OidcProvider::start().expect("provider");
    let setup = server_setup(&op, None);
    let server = Server::start(&setup);
    let url = server.url.clone();
    let (alice, bob) = (Person::new("alice"), Person::new("bob"));

    // Not signed in yet: the hint says how.
    let out = alice.run(&url, &["whoami"]);
    out.expect_code(3);
    assert!(out.stderr.contains("breakglass login"), "{out:#?}");

    let out = alice.device_login(&url, &op, &[]);
    out.expect_code(0);
    assert!(out.stderr.contains("enter the code"), "{out:#?}");
    assert!(
        out.stderr.contains("(or open http://127.0.0.1:"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("Signed in to"), "{out:#?}");
    assert!(out.stdout.contains("as alice (human)"), "{out:#?}");
    no_token_in(&out, &alice.credentials());
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    };
    assert_eq!(mode(&alice.credentials()), 0o600);
    assert_eq!(mode(alice.credentials().parent().expect("dir")), 0o700);

    let out = alice.run(&url, &["whoami", "--output", "json"]);
    out.expect_code(0);
    let w = out.json();
    assert_eq!(w["name"], "alice");
    assert_eq!(w["groups"], serde_json::json!(["oncall"]));
    assert_eq!(w["kind"], "human");
    assert_eq!(w["auth_method"], "oidc");
    assert!(
        w["expires_at"].is_string() && w["auth_time"].is_string(),
        "{w}"
    );
    let out = alice.run(&url, &["whoami"]);
    out.expect_code(0);
    assert!(out.stdout.contains("kind:      human"), "{out:#?}");
    assert!(out.stdout.contains("signed in: oidc"), "{out:#?}");

    // alice asks, bob (signed in on his own machine) approves.
    let id = request(&alice, &url, "prod-db");
    bob.device_login(&url, &op, &[]).expect_code(0);
    let out = bob.run(&url, &["approve", &id, "--output", "json"]);
    out.expect_code(0);
    assert_eq!(out.json()["state"], "active");
    assert_eq!(out.json()["approvals"][0]["by"], "bob");
    // alice cannot approve her own request, signed in or not.
    let id2 = request(&alice, &url, "prod-db");
    let out = alice.run(&url, &["approve", &id2]);
    out.expect_code(3);

    // --token and BREAKGLASS_TOKEN win over the stored login.
    let out = alice.run_env(
        &url,
        &["whoami", "--output", "json"],
        &[("BREAKGLASS_TOKEN", &common::token("dave"))],
    );
    out.expect_code(0);
    assert_eq!(out.json()["name"], "dave");

    // logout removes the entry and says so, and the provider revokes the
    // refresh token; afterwards alice is signed out.
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(alice.credentials()).expect("read"))
            .expect("JSON");
    let refresh = doc["servers"][&url]["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_string();
    let out = alice.run(&url, &["logout"]);
    out.expect_code(0);
    assert!(
        out.stdout.contains("Removed the login of alice"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("revoked its refresh token"), "{out:#?}");
    let refreshed = ureq::post(format!("{}/token", op.issuer()))
        .config()
        .http_status_as_error(false)
        .build()
        .header("content-type", "application/x-www-form-urlencoded")
        .send(oidc::encode_form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("client_id", op.client_id()),
        ]))
        .expect("token endpoint");
    assert_eq!(
        refreshed.status(),
        400,
        "a revoked refresh token is refused"
    );
    let out = alice.run(&url, &["whoami"]);
    out.expect_code(3);
    let out = alice.run(&url, &["logout"]);
    out.expect_code(0);
    assert!(out.stdout.contains("No login stored"), "{out:#?}");
    // bob's login to the same server is untouched.
    bob.run(&url, &["whoami"]).expect_code(0);
}

#[test]
fn an_expired_login_is_refreshed_and_a_failed_refresh_says_to_log_in() {
    let mut op = OidcProvider::start_with(OidcOptions {
        id_token_ttl: Duration::from_secs(62),
        ..Default::default()
    })
    .expect("provider");
    let setup = server_setup(&op, None);
    let server = Server::start(&setup);
    let url = server.url.clone();
    let alice = Person::new("alice");
    let out = alice.device_login(&url, &op, &["--output", "json"]);
    out.expect_code(0);
    let login = out.json();
    assert_eq!(login["name"], "alice");
    assert_eq!(login["server"], url.as_str());
    assert_eq!(login["refreshable"], true);
    assert!(login["expires_at"].is_string(), "{login}");
    no_token_in(&out, &alice.credentials());
    let stored = |p: &Person| -> serde_json::Value {
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.credentials()).expect("read"))
                .expect("JSON");
        doc["servers"][&url].clone()
    };
    let first = stored(&alice);
    // A 62 s token is within the 60 s renewal margin after 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    let out = alice.run(&url, &["whoami", "--output", "json"]);
    out.expect_code(0);
    assert_eq!(out.json()["name"], "alice");
    let second = stored(&alice);
    assert_ne!(first["id_token"], second["id_token"], "renewed");
    assert!(second["expires_at"].as_i64() > first["expires_at"].as_i64());

    // The provider forgets its refresh tokens (a new instance): the
    // renewal fails and the CLI says to log in again.
    op.stop();
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(alice.credentials()).expect("read"))
            .expect("JSON");
    doc["servers"][&url]["refresh_token"] = "not-a-refresh-token".into();
    std::fs::write(alice.credentials(), doc.to_string()).expect("write");
    op.restart().expect("restart");
    std::thread::sleep(Duration::from_millis(2500));
    let out = alice.run(&url, &["whoami"]);
    out.expect_code(3);
    assert!(out.stderr.contains("login_expired"), "{out:#?}");
    assert!(out.stderr.contains("run `breakglass login`"), "{out:#?}");
}

#[test]
fn a_credentials_file_readable_by_others_is_refused() {
    let op = OidcProvider::start().expect("provider");
    let setup = server_setup(&op, None);
    let server = Server::start(&setup);
    let url = server.url.clone();
    let alice = Person::new("alice");
    alice.device_login(&url, &op, &[]).expect_code(0);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(alice.credentials(), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let out = alice.run(&url, &["whoami"]);
    out.expect_code(1);
    assert!(out.stderr.contains("credentials_file"), "{out:#?}");
    assert!(out.stderr.contains("chmod 600"), "{out:#?}");
    // An explicit token does not read the file at all.
    alice
        .run_env(
            &url,
            &["whoami"],
            &[("BREAKGLASS_TOKEN", &common::token("alice"))],
        )
        .expect_code(0);
}

#[test]
fn browser_login_with_pkce_through_the_loopback_redirect() {
    let op = OidcProvider::start().expect("provider");
    let setup = server_setup(&op, None);
    let server = Server::start(&setup);
    let url = server.url.clone();
    let carol = Person::new("carol");
    let user = oidc::user("carol").expect("carol");
    let out = carol.login(&url, &["--browser"], "http://", |line| {
        let authorize = line.trim();
        let params = oidc::query_params(authorize);
        assert_eq!(
            params.get("code_challenge_method").map(String::as_str),
            Some("S256")
        );
        assert!(params.contains_key("code_challenge") && params.contains_key("state"));
        assert!(
            params
                .get("redirect_uri")
                .is_some_and(|r| r.starts_with("http://127.0.0.1:") && r.ends_with("/callback")),
            "{params:?}"
        );
        let page = op.complete_browser_login(authorize, user.name, user.password)?;
        assert!(page.contains("Signed in to breakglass"), "{page}");
        Ok(())
    });
    out.expect_code(0);
    let w = carol.run(&url, &["whoami", "--output", "json"]).json();
    assert_eq!(w["name"], "carol");
    assert_eq!(w["groups"], serde_json::json!(["sre-leads"]));
}

#[test]
fn step_up_refusal_then_fresh_login_then_approval() {
    let op = OidcProvider::start().expect("provider");
    let setup = server_setup(&op, None);
    let server = Server::start(&setup);
    let url = server.url.clone();
    let (alice, bob) = (Person::new("alice"), Person::new("bob"));
    alice.device_login(&url, &op, &[]).expect_code(0);
    bob.device_login(&url, &op, &[]).expect_code(0);
    let id = request(&alice, &url, "fresh-db");
    // bob's sign-in is older than the policy's 3 s.
    std::thread::sleep(Duration::from_secs(4));
    let out = bob.run(&url, &["approve", &id]);
    out.expect_code(3);
    assert!(out.stderr.contains("step_up_required"), "{out:#?}");
    assert!(out.stderr.contains("breakglass login --fresh"), "{out:#?}");
    // A plain login reuses the provider's session: still too old.
    bob.device_login(&url, &op, &[]).expect_code(0);
    bob.run(&url, &["approve", &id]).expect_code(3);
    // --fresh makes the provider ask for the password again.
    let out = bob.device_login(&url, &op, &["--fresh"]);
    out.expect_code(0);
    let out = bob.run(&url, &["approve", &id, "--output", "json"]);
    out.expect_code(0);
    assert_eq!(out.json()["state"], "active");
}

#[test]
fn github_actions_login_then_request() {
    let op = OidcProvider::start().expect("provider");
    let gha = GithubActionsIssuer::start().expect("issuer");
    let setup = server_setup(&op, Some(&gha));
    let server = Server::start(&setup);
    let url = server.url.clone();
    let job = Person::new("alice");
    let env = [
        ("ACTIONS_ID_TOKEN_REQUEST_URL", gha.request_url()),
        (
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
            gha.request_token().to_string(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Outside a job: a clear usage error.
    let out = job.run(&url, &["login", "--github-actions"]);
    out.expect_code(2);
    assert!(out.stderr.contains("id-token: write"), "{out:#?}");

    // The wrong audience is refused by the server, and nothing is stored.
    let out = job.run_env(
        &url,
        &["login", "--github-actions", "--audience", "other"],
        &env,
    );
    out.expect_code(3);
    assert!(out.stderr.contains("nothing was stored"), "{out:#?}");
    assert!(!job.credentials().exists());

    let out = job.run_env(
        &url,
        &["login", "--github-actions", "--audience", "breakglass-test"],
        &env,
    );
    out.expect_code(0);
    assert!(
        out.stdout
            .contains("gha:acme/payments:production (workload)"),
        "{out:#?}"
    );
    let w = job.run(&url, &["whoami", "--output", "json"]).json();
    assert_eq!(w["kind"], "workload");
    assert_eq!(w["auth_method"], "workload");
    let id = request(&job, &url, "prod-db");
    // Workloads never approve; a person does.
    let bob = Person::new("bob");
    bob.device_login(&url, &op, &[]).expect_code(0);
    let out = bob.run(&url, &["approve", &id, "--output", "json"]);
    out.expect_code(0);
    assert_eq!(out.json()["requester"], "gha:acme/payments:production");
}

/// The RFC 6238 code of `secret` for the 30 s step `step`.
fn totp(secret: &[u8], step: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = ring::hmac::sign(&key, &step.to_be_bytes());
    let mac = mac.as_ref();
    let offset = usize::from(mac[19] & 0x0f);
    let bin = u32::from_be_bytes([
        mac[offset],
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]) & 0x7fff_ffff;
    format!("{:06}", bin % 1_000_000)
}

#[test]
fn otp_for_a_local_principal_with_totp() {
    let setup = Setup::new();
    // RFC 6238's test secret, in base32 as an otpauth:// URI carries it.
    let secret: &[u8] = b"12345678901234567890";
    std::fs::write(
        setup.path().join("oscar.totp"),
        "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\n",
    )
    .expect("secret");
    let mut text = setup.config_text();
    text.push_str(&format!(
        "\n[[principals]]\nname = \"oscar\"\ngroups = [\"oncall\"]\ntoken_sha256 = \"{}\"\n\
         totp_secret_file = \"{}\"\n",
        common::sha256_hex(common::token("oscar").as_bytes()),
        setup.path().join("oscar.totp").display()
    ));
    std::fs::write(setup.config_path(), text).expect("config");
    let server = Server::start(&setup);
    let url = server.url.clone();
    let oscar = Person::new("alice");
    let token = common::token("oscar");

    // No code, not on a terminal: refused with the way to give it.
    let out = oscar.run_env(&url, &["whoami"], &[("BREAKGLASS_TOKEN", &token)]);
    out.expect_code(3);
    assert!(out.stderr.contains("otp_required"), "{out:#?}");
    assert!(out.stderr.contains("--otp CODE"), "{out:#?}");

    let step = u64::try_from(common::now_ms() / 1000 / 30).expect("step");
    let code = totp(secret, step);
    let out = oscar.run_env(
        &url,
        &["whoami", "--otp", &code, "--output", "json"],
        &[("BREAKGLASS_TOKEN", &token)],
    );
    out.expect_code(0);
    assert_eq!(out.json()["name"], "oscar");
    assert_eq!(out.json()["auth_method"], "local+totp");

    // The same code again (here from BREAKGLASS_OTP) is a replay.
    let out = oscar.run_env(
        &url,
        &["whoami"],
        &[("BREAKGLASS_TOKEN", &token), ("BREAKGLASS_OTP", &code)],
    );
    out.expect_code(3);
    assert!(out.stderr.contains("already used"), "{out:#?}");
    // On a terminal the CLI asks for the code and retries once (`script`
    // gives it a pseudo-terminal; the code is typed on its stdin).
    if std::path::Path::new("/usr/bin/script").is_file() {
        let next = totp(secret, step + 1);
        let line = format!("{BIN} --url {url} whoami --output json");
        let mut child = Command::new("/usr/bin/script")
            .args(["-qec", &line, "/dev/null"])
            .env("BREAKGLASS_TOKEN", &token)
            .env("XDG_CONFIG_HOME", oscar.home.path())
            .env_remove("BREAKGLASS_OTP")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(format!("{next}\n").as_bytes())
                .expect("type the code");
            // Kept open until the CLI is done: an EOF could end `script`.
            let out = wait_cli(child, CLI_TIMEOUT);
            drop(stdin);
            assert!(out.stdout.contains("One-time code:"), "{out:#?}");
            assert!(
                out.stdout.contains("\"auth_method\": \"local+totp\""),
                "{out:#?}"
            );
        }
    }

    // A wrong code says so.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let out = oscar.run_env(
        &url,
        &["whoami", "--otp", wrong],
        &[("BREAKGLASS_TOKEN", &token)],
    );
    out.expect_code(3);
    assert!(out.stderr.contains("wrong one-time code"), "{out:#?}");
}

/// A GET as a browser would send it (no redirects followed): status, the
/// `Location`, the `Set-Cookie` lines and the body.
fn browser_get(url: &str, cookie: Option<&str>) -> (u16, String, Vec<String>, String) {
    let mut req = common::agent(Duration::from_secs(30)).get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let mut r = req.call().expect("GET");
    let header = |name: &str| -> Vec<String> {
        r.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    };
    let location = header("location").into_iter().next().unwrap_or_default();
    let cookies = header("set-cookie");
    let body = r.body_mut().read_to_string().unwrap_or_default();
    (r.status().as_u16(), location, cookies, body)
}

/// `name=value` of the cookie `name` among `Set-Cookie` lines.
fn cookie_of(set: &[String], name: &str) -> String {
    set.iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn console_sign_in_with_the_identity_provider_code_flow_and_pkce() {
    let op = OidcProvider::start().expect("provider");
    let setup = server_setup(&op, None);
    let url = setup.url();
    let text = std::fs::read_to_string(setup.config_path()).expect("config");
    let text = text.replacen(
        "[server]\n",
        &format!("[server]\npublic_url = \"{url}\"\n"),
        1,
    ) + "\n[console]\nenabled = true\n";
    std::fs::write(setup.config_path(), text).expect("config");
    let _server = Server::start(&setup);

    let (status, _, _, page) = browser_get(&format!("{url}/signin"), None);
    assert_eq!(status, 200);
    assert!(page.contains("id=\"signin-oidc\""), "{page}");

    // The console sends the browser to the provider with PKCE, a state
    // tied to this browser by a cookie, and a nonce.
    let start = |next: &str| {
        let (status, authorize, set, body) =
            browser_get(&format!("{url}/signin/oidc?next={next}"), None);
        assert_eq!(status, 303, "{body}");
        assert!(authorize.starts_with(&op.issuer()), "{authorize}");
        let params = oidc::query_params(&authorize);
        assert_eq!(params["code_challenge_method"], "S256");
        assert_eq!(
            params["redirect_uri"],
            format!("{url}/signin/oidc/callback")
        );
        assert_eq!(params["client_id"], op.client_id());
        assert!(params["nonce"].len() >= 32 && params["code_challenge"].len() >= 43);
        let cookie = cookie_of(&set, "bg_oidc");
        assert_eq!(cookie, format!("bg_oidc={}", params["state"]));
        (authorize, cookie, params["state"].clone())
    };
    let (authorize, cookie, state) = start("/grants");
    let back = op.authorize_redirect(&authorize, "carol").expect("login");
    assert!(
        back.starts_with(&format!("{url}/signin/oidc/callback?")),
        "{back}"
    );
    assert_eq!(oidc::query_params(&back)["state"], state);

    // Another browser (no cookie) cannot finish this sign-in.
    let (status, _, set, body) = browser_get(&back, None);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("did not start in this browser"), "{body}");
    assert!(cookie_of(&set, "bg_session").is_empty());

    // The browser that started it is signed in as the provider's person.
    let (status, location, set, body) = browser_get(&back, Some(&cookie));
    assert_eq!(status, 303, "{body}");
    assert_eq!(location, "/grants");
    let session = cookie_of(&set, "bg_session");
    assert!(!session.is_empty(), "{set:?}");
    let (status, _, _, page) = browser_get(&format!("{url}/grants"), Some(&session));
    assert_eq!(status, 200);
    assert!(page.contains("<span class=\"who\">carol</span>"), "{page}");

    // The same code and state a second time: refused.
    let (status, _, set, body) = browser_get(&back, Some(&cookie));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("expired or was already used"), "{body}");
    assert!(cookie_of(&set, "bg_session").is_empty());

    // The provider's refusal is shown, and signs nobody in.
    let (_, cookie, state) = start("/");
    let (status, _, set, body) = browser_get(
        &format!(
            "{url}/signin/oidc/callback?state={state}&error=access_denied&error_description=nope"
        ),
        Some(&cookie),
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("access_denied nope"), "{body}");
    assert!(cookie_of(&set, "bg_session").is_empty());

    // A made-up code with a valid state: the provider refuses to trade it.
    let (_, cookie, state) = start("/");
    let (status, _, _, body) = browser_get(
        &format!("{url}/signin/oidc/callback?state={state}&code=made-up"),
        Some(&cookie),
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("did not trade the code"), "{body}");
}
