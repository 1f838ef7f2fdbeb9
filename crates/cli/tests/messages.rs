//! What the CLI says when something is wrong, against the real binary and a
//! real server: every message names what was wrong and what to do next.
//!
//! The common mistakes are a table of (who, arguments, environment, exit
//! code, what stderr must and must not say). Beside it: https through a
//! TLS listener with a test CA, the refusal of plain http off loopback
//! (before any connection), id prefixes, `targets`, completions, JSON
//! errors, `show` of an ended grant, and the server's log formats.

mod common;

use std::io::Read as _;
use std::net::{IpAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{BIN, CliOutput, Server, Setup, cli_command, free_port, token, wait_cli};
use serde_json::Value;

/// The default setup with the PostgreSQL gateway listening too (no
/// upstream is ever reached: only its port is used, as a wrong `--url`).
fn setup_with_gateway() -> (Setup, u16) {
    let setup = Setup::new();
    let gw = free_port();
    let mut text = setup.config_text();
    text.push_str(&format!(
        "\n[gateway.postgres]\nlisten = \"127.0.0.1:{gw}\"\n"
    ));
    std::fs::write(setup.config_path(), text).expect("write config");
    (setup, gw)
}

/// Runs the CLI against `url` as `who`, with extra environment.
fn cli_env(url: &str, who: Option<&str>, env: &[(&str, String)], args: &[&str]) -> CliOutput {
    let mut cmd = cli_command(url, who.map(token).as_deref(), args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    wait_cli(cmd.spawn().expect("spawn the CLI"), common::CLI_TIMEOUT)
}

/// Creates a request as `who` and returns its id.
fn create(setup: &Setup, who: &str, target: &str) -> String {
    let out = setup.cli(
        Some(who),
        &[
            "request",
            target,
            "--role",
            "read",
            "--duration",
            "15m",
            "--reason",
            "messages test",
            "--output",
            "json",
        ],
    );
    out.expect_code(0);
    out.json()["id"].as_str().expect("id").to_string()
}

struct Case {
    name: &'static str,
    who: Option<&'static str>,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    code: i32,
    /// Substrings stderr must contain (after placeholders are filled in).
    says: &'static [&'static str],
    /// Substrings stderr must not contain.
    never: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "unknown target: close matches and where to look",
        who: Some("alice"),
        args: &[
            "request",
            "prod-bd",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
        ],
        env: &[],
        code: 1,
        says: &[
            "unknown target \"prod-bd\"",
            "close matches: prod-db",
            "breakglass targets",
        ],
        never: &[],
    },
    Case {
        name: "unknown role: the roles and where to look",
        who: Some("alice"),
        args: &[
            "request",
            "prod-db",
            "--role",
            "wirte",
            "--duration",
            "5m",
            "--reason",
            "x",
        ],
        env: &[],
        code: 1,
        says: &["no role \"wirte\"", "admin, read", "breakglass targets"],
        never: &[],
    },
    Case {
        name: "too long for the policy: where to see the limits",
        who: Some("alice"),
        args: &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "45m",
            "--reason",
            "x",
        ],
        env: &[],
        code: 3,
        says: &["duration_exceeds_policy", "breakglass targets"],
        never: &[],
    },
    Case {
        name: "self-approval of an active grant is self-approval",
        who: Some("alice"),
        args: &["approve", "{active}"],
        env: &[],
        code: 3,
        says: &["self_approval", "approver other than the requester"],
        never: &["wrong_state"],
    },
    Case {
        name: "self-approval by a unique prefix",
        who: Some("alice"),
        args: &["approve", "{active_prefix}"],
        env: &[],
        code: 3,
        says: &["self_approval"],
        never: &[],
    },
    Case {
        name: "ambiguous id prefix lists the candidates",
        who: Some("alice"),
        args: &["show", "{common_prefix}"],
        env: &[],
        code: 2,
        says: &["ambiguous", "{active}", "{pending}", "give more characters"],
        never: &[],
    },
    Case {
        name: "no request with that prefix",
        who: Some("alice"),
        args: &["show", "fff"],
        env: &[],
        code: 1,
        says: &[
            "no request you can see has an id starting with fff",
            "breakglass list",
        ],
        never: &[],
    },
    Case {
        name: "--wait with a space and a duration works",
        who: Some("alice"),
        args: &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
            "--wait",
            "1s",
        ],
        env: &[],
        code: 4,
        says: &["still pending after the wait", "breakglass show"],
        never: &[],
    },
    Case {
        name: "--wait with something that is not a duration",
        who: Some("alice"),
        args: &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
            "--wait",
            "soon",
        ],
        env: &[],
        code: 2,
        says: &["--wait=", "not a duration"],
        never: &[],
    },
    Case {
        name: "a usage error with BREAKGLASS_TOKEN set never suggests --token",
        who: Some("alice"),
        args: &["approve"],
        env: &[],
        code: 2,
        says: &["<ID>"],
        never: &["--token", "bgt_e2e_alice"],
    },
    Case {
        name: "a token pasted as an argument is not echoed",
        who: None,
        args: &["bgt_e2e_alice_0123456789abcdef", "whoami"],
        env: &[],
        code: 2,
        says: &["<redacted>"],
        never: &["bgt_e2e_alice"],
    },
    Case {
        name: "no token: log in or set the variable",
        who: None,
        args: &["whoami"],
        env: &[],
        code: 3,
        says: &["not signed in", "breakglass login", "set BREAKGLASS_TOKEN"],
        never: &["--token"],
    },
    Case {
        name: "a wrong token from the environment: check the variable",
        who: None,
        args: &["whoami"],
        env: &[("BREAKGLASS_TOKEN", "bgt_wrong_token_value")],
        code: 3,
        says: &["check BREAKGLASS_TOKEN"],
        never: &["--token", "bgt_wrong_token_value"],
    },
    Case {
        name: "a trailing /v1 in the URL",
        who: Some("alice"),
        args: &["whoami", "--url", "{url}/v1"],
        env: &[],
        code: 2,
        says: &["ends in /v1", "({url})", "adds /v1 itself"],
        never: &[],
    },
    Case {
        name: "the gateway's port instead of the API's",
        who: Some("alice"),
        args: &["whoami", "--url", "http://127.0.0.1:{gw}"],
        env: &[],
        code: 1,
        says: &["did not answer in HTTP", "gateway", "server.listen"],
        never: &[],
    },
    Case {
        name: "nothing listens at the URL",
        who: Some("alice"),
        args: &["whoami", "--url", "http://127.0.0.1:{dead}"],
        env: &[],
        code: 1,
        says: &["cannot reach", "breakglass serve --dev", "BREAKGLASS_URL"],
        never: &[],
    },
    Case {
        name: "plain http off loopback",
        who: Some("alice"),
        args: &["whoami", "--url", "http://192.0.2.1:8080"],
        env: &[],
        code: 2,
        says: &[
            "not a loopback address",
            "https://",
            "--ca-file",
            "--insecure-http",
        ],
        never: &[],
    },
    Case {
        name: "an unreadable --ca-file",
        who: Some("alice"),
        args: &["whoami", "--ca-file", "/nonexistent/ca.pem"],
        env: &[],
        code: 2,
        says: &["cannot read --ca-file /nonexistent/ca.pem"],
        never: &[],
    },
    Case {
        name: "BREAKGLASS_CA_FILE that is not PEM",
        who: Some("alice"),
        args: &["whoami"],
        env: &[("BREAKGLASS_CA_FILE", "{config}")],
        code: 2,
        says: &["holds no PEM certificate"],
        never: &[],
    },
    Case {
        name: "login to a server without an identity provider",
        who: None,
        args: &["login"],
        env: &[],
        code: 1,
        says: &["no identity provider configured", "BREAKGLASS_TOKEN"],
        never: &[],
    },
    Case {
        name: "login --github-actions outside a job",
        who: None,
        args: &["login", "--github-actions"],
        env: &[],
        code: 2,
        says: &["ACTIONS_ID_TOKEN_REQUEST_URL", "id-token: write"],
        never: &[],
    },
    Case {
        name: "a job token endpoint over plain http off loopback",
        who: None,
        args: &["login", "--github-actions"],
        env: &[
            (
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                "http://192.0.2.1/token?api-version=2.0",
            ),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-token-value"),
        ],
        code: 1,
        says: &["must use https"],
        never: &["request-token-value"],
    },
    Case {
        name: "--audience without --github-actions",
        who: None,
        args: &["login", "--audience", "x"],
        env: &[],
        code: 2,
        says: &["--github-actions"],
        never: &[],
    },
    Case {
        name: "a mistyped command",
        who: Some("alice"),
        args: &["targts"],
        env: &[],
        code: 2,
        says: &["targets"],
        never: &[],
    },
];

#[test]
fn common_mistakes_get_a_message_that_says_what_to_do() {
    let (setup, gw) = setup_with_gateway();
    let _server = Server::start(&setup);
    let pending = create(&setup, "alice", "prod-db");
    let active = create(&setup, "alice", "drill-db");
    let common_prefix: String = pending
        .chars()
        .zip(active.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    assert!(!common_prefix.is_empty(), "{pending} {active}");
    let dead = free_port().to_string();
    let url = setup.url();
    let config = setup.config_path().display().to_string();
    let fill = |s: &str| {
        s.replace("{url}", &url)
            .replace("{gw}", &gw.to_string())
            .replace("{dead}", &dead)
            .replace("{config}", &config)
            .replace("{active_prefix}", &active[..active.len() - 4])
            .replace("{active}", &active)
            .replace("{pending}", &pending)
            .replace("{common_prefix}", &common_prefix)
    };
    let mut failures = Vec::new();
    for case in CASES {
        let args: Vec<String> = case.args.iter().map(|a| fill(a)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, String)> = case.env.iter().map(|(k, v)| (*k, fill(v))).collect();
        let out = cli_env(&url, case.who, &env, &args);
        let mut wrong = Vec::new();
        if out.code != case.code {
            wrong.push(format!("exit {} instead of {}", out.code, case.code));
        }
        for s in case.says {
            let s = fill(s);
            if !out.stderr.contains(&s) {
                wrong.push(format!("stderr lacks {s:?}"));
            }
        }
        for s in case.never {
            if out.stderr.contains(&fill(s)) {
                wrong.push(format!("stderr contains {s:?}"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {}",
                case.name,
                wrong.join("; "),
                out.stderr.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn errors_are_json_with_output_json() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &[
                "request",
                "prod-bd",
                "--role",
                "read",
                "--duration",
                "5m",
                "--reason",
                "x",
            ],
            1,
            "unknown_target",
        ),
        (
            &["whoami", "--url", "http://192.0.2.1:8080"],
            2,
            "insecure_http",
        ),
        (&["approve"], 2, "usage"),
        (&["show", "fff"], 1, "not_found"),
    ];
    for (args, code, want) in cases {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let out = setup.cli(Some("alice"), &args);
        out.expect_code(code);
        let doc: Value = serde_json::from_str(out.stderr.trim())
            .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}): {out:#?}"));
        assert_eq!(doc["code"], want, "{doc}");
        assert_eq!(doc["exit_code"], code, "{doc}");
        assert!(
            doc["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{doc}"
        );
        assert!(doc["type"].is_string() && doc["title"].is_string(), "{doc}");
        assert!(out.stdout.is_empty(), "{out:#?}");
    }
    // The server's problem document comes through with its status.
    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "prod-bd",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
            "--output",
            "json",
        ],
    );
    let doc: Value = serde_json::from_str(out.stderr.trim()).expect("json");
    assert_eq!(doc["status"], 404);
    assert_eq!(
        doc["hint"],
        "see what you may request, with its limits: breakglass targets"
    );
}

/// A local address of this machine that is not loopback, if it has one.
fn local_non_loopback_ip() -> Option<IpAddr> {
    // Connecting a UDP socket only picks a route: no packet is sent.
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn plain_http_off_loopback_is_refused_before_any_connection() {
    // TEST-NET-1: nothing answers there, so a connect would hang until the
    // connect timeout. The refusal comes at once, with no traffic.
    let start = Instant::now();
    let out = cli_env(
        "http://192.0.2.1:8080",
        Some("alice"),
        &[],
        &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
        ],
    );
    let took = start.elapsed();
    out.expect_code(2);
    assert!(
        out.stderr.contains("refusing plain http to 192.0.2.1"),
        "{out:#?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}: did it try to connect?"
    );

    // A non-loopback address of this machine, with a listener on it: the
    // refusal must leave it untouched, and --insecure-http must reach it.
    let Some(ip) = local_non_loopback_ip() else {
        eprintln!("no non-loopback address on this machine: second half skipped");
        return;
    };
    let listener = TcpListener::bind((ip, 0)).expect("bind a local non-loopback address");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let out = cli_env(&url, Some("alice"), &[], &["whoami"]);
    out.expect_code(2);
    assert!(out.stderr.contains("--insecure-http"), "{out:#?}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the refused CLI connected anyway"
    );
    let child = cli_command(&url, Some(&token("alice")), &["whoami", "--insecure-http"])
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("--insecure-http did not connect: {e}"),
        }
    };
    drop(conn);
    let out = wait_cli(child, common::CLI_TIMEOUT);
    out.expect_code(1);
}

/// A TLS listener on loopback that forwards each connection's plaintext
/// to `backend`: the real server behind real TLS.
struct TlsFront {
    port: u16,
    rt: Option<tokio::runtime::Runtime>,
}

impl TlsFront {
    fn start(dir: &Path, backend: u16) -> TlsFront {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("srv.pem"))
                .expect("read srv.pem")
                .collect::<Result<_, _>>()
                .expect("parse srv.pem");
        let key = PrivateKeyDer::from_pem_file(dir.join("srv.key")).expect("read srv.key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the TLS front");
        let port = listener.local_addr().expect("addr").port();
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) =
                        tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront { port, rt: Some(rt) }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

#[test]
fn https_with_a_test_ca_works() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let certs = tempfile::tempdir().expect("tempdir");
    breakglass_testkit::make_test_ca(certs.path(), "IP:127.0.0.1,DNS:localhost");
    let front = TlsFront::start(certs.path(), setup.port);
    let https = format!("https://127.0.0.1:{}", front.port);
    let ca = certs.path().join("ca.pem").display().to_string();

    let out = cli_env(&https, Some("alice"), &[], &["whoami", "--ca-file", &ca]);
    out.expect_code(0);
    assert!(out.stdout.contains("alice"), "{out:#?}");
    let out = cli_env(
        &https,
        Some("alice"),
        &[("BREAKGLASS_CA_FILE", ca.clone())],
        &["targets", "--output", "json"],
    );
    out.expect_code(0);
    assert!(out.json()["targets"].is_array(), "{out:#?}");
    // By name too: the certificate is for localhost as well.
    let out = cli_env(
        &format!("https://localhost:{}", front.port),
        Some("alice"),
        &[("BREAKGLASS_CA_FILE", ca.clone())],
        &["whoami"],
    );
    out.expect_code(0);

    // Without the CA the certificate is not trusted: say how to trust it.
    let out = cli_env(&https, Some("alice"), &[], &["whoami"]);
    out.expect_code(1);
    assert!(out.stderr.contains("--ca-file"), "{out:#?}");
    // https to the plain server, and plain http to the TLS one.
    let out = cli_env(
        &format!("https://127.0.0.1:{}", setup.port),
        Some("alice"),
        &[],
        &["whoami", "--ca-file", &ca],
    );
    out.expect_code(1);
    assert!(out.stderr.contains("http://"), "{out:#?}");
    let out = cli_env(
        &format!("http://127.0.0.1:{}", front.port),
        Some("alice"),
        &[],
        &["whoami"],
    );
    out.expect_code(1);
    assert!(out.stderr.contains("https://"), "{out:#?}");
}

#[test]
fn ids_resolve_by_unique_prefix() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let id = create(&setup, "alice", "prod-db");
    let other = create(&setup, "alice", "prod-db");
    let unique = &id[..id.len() - 3];
    let out = setup.cli(Some("bob"), &["show", unique, "--output", "json"]);
    out.expect_code(0);
    assert_eq!(out.json()["id"], id.as_str());
    // Approving by prefix approves that request, and only it.
    let out = setup.cli(Some("bob"), &["approve", unique]);
    out.expect_code(0);
    assert!(out.stdout.contains(&id), "{out:#?}");
    let out = setup.cli(Some("bob"), &["show", &other, "--output", "json"]);
    assert_eq!(out.json()["state"], "pending");
    // Visibility: mallory sees neither, so the prefix matches nothing.
    let out = setup.cli(Some("mallory"), &["show", unique]);
    out.expect_code(1);
    assert!(out.stderr.contains("no request you can see"), "{out:#?}");
}

#[test]
fn targets_lists_what_the_policy_permits() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let out = setup.cli(Some("alice"), &["targets"]);
    out.expect_code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("TARGET"), "{out:#?}");
    let row = |target: &str, role: &str| {
        lines
            .iter()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.first() == Some(&target) && w.get(1) == Some(&role)
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        row("prod-db", "read").as_deref(),
        Some("prod-db read request 30m 1 from sre-leads -"),
        "{out:#?}"
    );
    assert_eq!(
        row("drill-db", "read").as_deref(),
        Some("drill-db read request 1h none -"),
        "{out:#?}"
    );
    assert_eq!(
        row("prod-db", "admin"),
        None,
        "alice may not ask for admin: {out:#?}"
    );
    assert!(
        out.stdout.contains("breakglass request TARGET --role ROLE"),
        "{out:#?}"
    );

    let out = setup.cli(Some("erin"), &["targets", "--output", "json"]);
    out.expect_code(0);
    let doc = out.json();
    let emergency: Vec<&Value> = doc["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| t["emergency"] == true)
        .collect();
    assert_eq!(emergency.len(), 2, "{doc}");
    for t in emergency {
        assert_eq!(t["target"], "prod-db");
        assert_eq!(t["max_duration_s"], 600);
        assert_eq!(t["countersign_within_s"], 300);
        assert_eq!(t["approver_groups"], serde_json::json!(["sre-leads"]));
        assert_eq!(t["policies"], serde_json::json!(["ic-emergency"]));
    }

    let out = setup.cli(Some("mallory"), &["targets"]);
    out.expect_code(0);
    assert!(out.stdout.contains("permits you no request"), "{out:#?}");
}

#[test]
fn completion_scripts_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = common::run_cli("http://127.0.0.1:1", None, &["completion", shell]);
        out.expect_code(0);
        assert!(out.stdout.len() > 1000, "{shell}: {out:#?}");
        assert!(out.stdout.contains("breakglass"), "{shell}");
        assert!(out.stdout.contains("targets"), "{shell}");
    }
    let out = common::run_cli("http://127.0.0.1:1", None, &["completion", "tcsh"]);
    out.expect_code(2);
}

#[test]
fn help_has_examples_and_offline_commands_hide_server_options() {
    let help = |args: &[&str]| {
        let out = common::run_cli("http://127.0.0.1:1", None, args);
        out.expect_code(0);
        out.stdout
    };
    for args in [
        &["request", "--help"][..],
        &["--help"],
        &["approve", "--help"],
    ] {
        assert!(help(args).contains("Examples:"), "{args:?}");
    }
    for args in [
        &["serve", "--help"][..],
        &["audit", "verify", "--help"],
        &["policy", "check", "--help"],
    ] {
        let text = help(args);
        assert!(
            !text.contains("--url") && !text.contains("--token"),
            "{args:?}: {text}"
        );
        assert!(text.contains("--config <FILE>"), "{args:?}: {text}");
        assert!(text.contains("The TOML config file"), "{args:?}: {text}");
    }
    assert!(help(&["whoami", "--help"]).contains("--ca-file"));
}

#[test]
fn show_of_an_ended_grant_says_when_it_ended() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let id = create(&setup, "alice", "drill-db");
    setup
        .cli(Some("alice"), &["revoke", &id, "--reason", "done"])
        .expect_code(0);
    let out = setup.cli(Some("alice"), &["show", &id]);
    out.expect_code(0);
    let expires = out
        .stdout
        .lines()
        .find(|l| l.starts_with("expires:"))
        .unwrap_or_else(|| panic!("no expires line: {out:#?}"));
    assert!(!expires.contains("(in "), "{expires}");
    assert!(
        expires.contains("not reached: the grant ended at"),
        "{expires}"
    );
    assert!(out.stdout.contains("was REVOKED"), "{out:#?}");
}

#[test]
fn pending_and_emergency_requests_say_who_must_be_told() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
        ],
    );
    out.expect_code(0);
    assert!(
        out.stdout.contains("Nobody is notified automatically"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("from sre-leads"), "{out:#?}");
    assert!(out.stdout.contains("breakglass approve "), "{out:#?}");
    assert!(!out.stdout.contains("are notified"), "{out:#?}");
    let out = setup.cli(
        Some("erin"),
        &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
            "--emergency",
        ],
    );
    out.expect_code(0);
    assert!(
        out.stdout.contains("tell an approver from sre-leads now"),
        "{out:#?}"
    );
    assert!(!out.stdout.contains("are notified"), "{out:#?}");
}

/// Starts `breakglass serve` with stderr to a file and without NO_COLOR;
/// waits for `/readyz`, then stops it (by pid) and returns its stderr.
fn serve_log(setup: &Setup, extra: &[&str]) -> String {
    let log = setup.path().join(format!("serve-{}.log", extra.len()));
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--config",
            &setup.config_path().display().to_string(),
        ])
        .args(extra)
        .env_remove("NO_COLOR")
        .env("BREAKGLASS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn serve");
    let agent = common::agent(Duration::from_secs(2));
    let deadline = Instant::now() + common::READY_TIMEOUT;
    let mut ready = false;
    while Instant::now() < deadline {
        if common::call(&agent, &setup.url(), None, "GET", "/readyz", None).is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // `Child::kill` signals this pid only.
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "serve did not answer /readyz");
    let mut text = String::new();
    std::fs::File::open(&log)
        .expect("open log")
        .read_to_string(&mut text)
        .expect("read log");
    text
}

#[test]
fn logs_have_no_colour_off_a_terminal_and_json_on_request() {
    let setup = Setup::new();
    let text = serve_log(&setup, &[]);
    assert!(!text.is_empty(), "no log at all");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file:\n{text}"
    );
    let text = serve_log(&setup, &["--log-format", "json"]);
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines > 0, "no JSON log lines");
}
