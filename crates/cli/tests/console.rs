//! The web console end to end: the real `breakglass serve` with the
//! console and the PostgreSQL gateway in front of a real cluster, driven
//! by Debian's Chromium through playwright-core
//! (`crates/testkit/browser/console.mjs`), plus HTTP checks of what a
//! browser would not send (forged forms, bad cookies).
//!
//! Screenshots of the inbox, a request's page and a replay are kept in
//! `$CARGO_TARGET_TMPDIR/console-screenshots/`.

mod gateway_support;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_support::{BIN, DB, upstream};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The browser script's time limit.
const BROWSER_LIMIT: Duration = Duration::from_secs(180);
/// How long the server may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

const POLICY: &str = r#"// Console tests: on-call asks, an SRE lead approves.
@id("oncall-pg")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"production");
"#;

/// (name, groups): carol is an admin (`security`).
const PRINCIPALS: [(&str, &[&str]); 3] = [
    ("alice", &["oncall"]),
    ("bob", &["sre-leads"]),
    ("carol", &["security"]),
];

fn token(name: &str) -> String {
    format!("bgt_console_{name}_0123456789abcdef")
}

/// A `breakglass serve` child, killed by pid on drop.
struct Server {
    child: Option<Child>,
    base: String,
    _dir: tempfile::TempDir,
    stderr: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    fn start(pg_port: u16, extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let http = gateway_support::free_port();
        let gw = gateway_support::free_port();
        std::fs::write(dir.path().join("policy.cedar"), POLICY).expect("policy");
        let mut cfg = format!(
            "[server]\nlisten = \"127.0.0.1:{http}\"\ndata_dir = \"data\"\nadmin_groups = [\"security\"]\n{extra}\n\
             [policy]\nfile = \"policy.cedar\"\n\n[audit]\ncheckpoint_interval = \"1s\"\n\n\
             [console]\nenabled = true\n\n\
             [gateway.postgres]\nlisten = \"127.0.0.1:{gw}\"\n\n"
        );
        for (name, groups) in PRINCIPALS {
            let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
            cfg.push_str(&format!(
                "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
                g.join(", "),
                hex::encode(Sha256::digest(token(name).as_bytes()))
            ));
        }
        cfg.push_str(&format!(
            "[[targets]]\nname = \"pg\"\nkind = \"postgres\"\ngroups = [\"production\"]\n\
             upstream = \"postgres://127.0.0.1:{pg_port}/{DB}\"\n\
             [targets.roles.trust]\nuser = \"bg_trust\"\n\n\
             [[targets]]\nname = \"staging\"\nkind = \"postgres\"\ngroups = [\"staging\"]\n\
             upstream = \"postgres://127.0.0.1:{pg_port}/{DB}\"\n\
             [targets.roles.trust]\nuser = \"bg_trust\"\n"
        ));
        std::fs::write(dir.path().join("config.toml"), cfg).expect("config");
        let stderr = dir.path().join("server.stderr");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(dir.path().join("config.toml"))
            .env("BREAKGLASS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn breakglass serve");
        let mut s = Server {
            child: Some(child),
            base: format!("http://127.0.0.1:{http}"),
            _dir: dir,
            stderr,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("serve exited ({st}):\n{}", s.log());
            }
            if let Ok(r) = agent().get(format!("{}/readyz", s.base)).call()
                && r.status() == 200
            {
                return s;
            }
            assert!(Instant::now() < deadline, "not ready:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .proxy(None)
        .build()
        .into()
}

/// A response's status, `Set-Cookie` values and body.
fn call(req: ureq::RequestBuilder<ureq::typestate::WithoutBody>) -> (u16, Vec<String>, String) {
    let mut r = req.call().expect("call");
    resp_parts(&mut r)
}

fn resp_parts(r: &mut ureq::http::Response<ureq::Body>) -> (u16, Vec<String>, String) {
    let cookies = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    (r.status().as_u16(), cookies, body)
}

fn post_form(url: &str, cookie: &str, form: &[(&str, &str)]) -> (u16, Vec<String>, String) {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut r = agent()
        .post(url)
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(body)
        .expect("post");
    resp_parts(&mut r)
}

/// `name=value` of a `Set-Cookie` named `name`.
fn cookie_pair(set: &[String], name: &str) -> String {
    set.iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no cookie {name} in {set:?}"))
        .to_string()
}

/// The value of the first hidden `csrf` field of a page.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..at + 64].to_string()
}

/// Signs in over plain HTTP; returns the session cookie pair and the
/// Set-Cookie line.
fn sign_in(base: &str, who: &str) -> (String, String) {
    let (status, set, page) = call(agent().get(format!("{base}/signin")));
    assert_eq!(status, 200);
    let pre = cookie_pair(&set, "bg_signin");
    let csrf = csrf_of(&page);
    let (status, set, _) = post_form(
        &format!("{base}/signin"),
        &pre,
        &[("csrf", &csrf), ("token", &token(who)), ("next", "/")],
    );
    assert_eq!(status, 303, "signed in");
    let line = set
        .iter()
        .find(|c| c.starts_with("bg_session="))
        .expect("session cookie")
        .clone();
    (cookie_pair(&set, "bg_session"), line)
}

#[test]
fn console_in_chromium() {
    let up = upstream();
    let server = Server::start(up.pg.port, "");
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let input = json!({
        "base": server.base,
        "tokens": {"requester": token("alice"), "approver": token("bob"), "admin": token("carol")},
        "admin_name": "carol",
        "target": "pg",
        "role": "trust",
        "artefacts": shots,
    });
    let seen = breakglass_testkit::browser::run_script(
        "console.mjs",
        include_str!("../../testkit/browser/console.mjs"),
        &input,
        BROWSER_LIMIT,
    )
    .unwrap_or_else(|e| panic!("{e:#}\nserver log:\n{}", server.log()));
    assert_eq!(seen["ok"], true);
    // Only what the policy offers: production's pg, not staging.
    assert_eq!(seen["choices"], json!(["pg trust"]));
    for shot in ["inbox.png", "request.png", "replay.png"] {
        let len = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 1000, "{shot} saved ({len} bytes)");
    }
    eprintln!("screenshots in {}", shots.display());
}

#[test]
fn forms_need_the_sessions_csrf_token_and_cookies_the_right_flags() {
    let up = upstream();
    let server = Server::start(up.pg.port, "");
    let base = &server.base;
    // Sign-in itself needs the form's token from its cookie.
    let (_, set, page) = call(agent().get(format!("{base}/signin")));
    let pre = cookie_pair(&set, "bg_signin");
    let (status, _, body) = post_form(
        &format!("{base}/signin"),
        &pre,
        &[("csrf", &"0".repeat(64)), ("token", &token("alice"))],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("sign-in form expired"), "{body}");
    // A wrong token: the API's own message.
    let (status, _, body) = post_form(
        &format!("{base}/signin"),
        &pre,
        &[("csrf", &csrf_of(&page)), ("token", "bgt_wrong")],
    );
    assert_eq!(status, 401, "{body}");

    // After signing in, only a path on this site: never another host.
    let (_, set, page) = call(agent().get(format!("{base}/signin?next=//evil.example/x")));
    let form: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("csrf", csrf_of(&page)),
            ("token", token("alice")),
            ("next", "//evil.example/x".to_string()),
        ])
        .finish();
    let r = agent()
        .post(format!("{base}/signin"))
        .header("cookie", &cookie_pair(&set, "bg_signin"))
        .header("content-type", "application/x-www-form-urlencoded")
        .send(form)
        .expect("sign in");
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/"),
        "the redirect stays on this site"
    );

    let (alice, line) = sign_in(base, "alice");
    assert!(
        line.contains("HttpOnly") && line.contains("SameSite=Lax"),
        "{line}"
    );
    assert!(
        !line.contains("Secure"),
        "plain HTTP: no Secure flag: {line}"
    );
    let (bob, _) = sign_in(base, "bob");
    let (_, _, alice_page) = call(
        agent()
            .get(format!("{base}/requests/new"))
            .header("cookie", &alice),
    );
    let alice_csrf = csrf_of(&alice_page);
    let (status, _, created) = post_form(
        &format!("{base}/requests"),
        &alice,
        &[
            ("csrf", &alice_csrf),
            ("choice", "pg trust"),
            ("duration", "5m"),
            ("reason", "csrf test"),
        ],
    );
    assert_eq!(status, 303, "{created}");
    // An emergency request first asks for a second, explicit confirmation,
    // and creates nothing until then.
    let (status, _, page) = post_form(
        &format!("{base}/requests"),
        &alice,
        &[
            ("csrf", &alice_csrf),
            ("choice", "pg trust"),
            ("duration", "5m"),
            ("reason", "emergency test"),
            ("emergency", "yes"),
        ],
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Confirm the emergency request"), "{page}");
    assert!(page.contains("name=\"confirm\" value=\"yes\""), "{page}");
    let mut r = agent()
        .get(format!("{base}/v1/requests?state=pending"))
        .header("authorization", &format!("Bearer {}", token("bob")))
        .call()
        .expect("list");
    let v: serde_json::Value = serde_json::from_str(&resp_parts(&mut r).2).expect("json");
    assert_eq!(
        v["requests"].as_array().map(Vec::len),
        Some(1),
        "only the confirmed request: {v}"
    );
    let id = v["requests"][0]["id"].as_str().expect("id").to_string();
    let decide = format!("{base}/requests/{id}/decide");
    // Missing, another session's, and a made-up token: all refused.
    for csrf in [None, Some(alice_csrf.as_str()), Some(&*"f".repeat(64))] {
        let mut form = vec![("decision", "approve")];
        if let Some(c) = csrf {
            form.push(("csrf", c));
        }
        let (status, _, body) = post_form(&decide, &bob, &form);
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("CSRF token does not belong to your session"),
            "{body}"
        );
    }
    // A made-up session cookie is no session.
    let (status, _, _) = post_form(&decide, &format!("bg_session={}", "a".repeat(64)), &[]);
    assert_eq!(status, 303, "sent to sign in");
    // Bob's own token approves.
    let (_, _, page) = call(agent().get(format!("{base}/")).header("cookie", &bob));
    let (status, _, body) = post_form(
        &decide,
        &bob,
        &[
            ("csrf", &csrf_of(&page)),
            ("decision", "approve"),
            ("comment", "ok"),
        ],
    );
    assert_eq!(status, 303, "{body}");
    // Sign-out: the old cookie no longer works.
    let (status, set, _) = post_form(
        &format!("{base}/signout"),
        &bob,
        &[("csrf", &csrf_of(&page))],
    );
    assert_eq!(status, 303);
    assert!(set.iter().any(|c| c.starts_with("bg_session=;")), "{set:?}");
    let (status, _, _) = call(agent().get(format!("{base}/")).header("cookie", &bob));
    assert_eq!(status, 303, "signed out");
}
