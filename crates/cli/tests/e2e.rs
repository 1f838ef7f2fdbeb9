//! End to end: the real `breakglass` binary runs the service as a child
//! process, and the same binary, run as the CLI, drives it over loopback
//! HTTP. Each test has its own server, store and port.
//!
//! What this pins down (DESIGN §2, §5, §7): a whole incident through the
//! CLI, the exit codes scripts rely on, `--wait`, expiry, `--output json`,
//! audit export and verify, policy check, `serve --dev` and graceful
//! shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{Api, Server, Setup, cli_command, now_ms, run_cli, token, wait_cli};
use serde_json::Value;

/// The request object fields of DESIGN §7 (contract).
const REQUEST_FIELDS: [&str; 19] = [
    "id",
    "requester",
    "target",
    "role",
    "reason",
    "ticket",
    "emergency",
    "state",
    "policy",
    "approvals_required",
    "approvals",
    "duration_s",
    "created_at",
    "activated_at",
    "expires_at",
    "ended_at",
    "end_reason",
    "review_required",
    "review",
];

#[track_caller]
fn assert_request_object(r: &Value) {
    let obj = r
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {r}"));
    for f in REQUEST_FIELDS {
        assert!(obj.contains_key(f), "request object lacks {f:?}: {r}");
    }
}

fn id_of(r: &Value) -> String {
    r["id"].as_str().expect("request id").to_string()
}

#[test]
fn an_incident_through_the_cli() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let cli = |who: &str, args: &[&str]| setup.cli(Some(who), args);

    // alice asks; one approval from sre-leads is needed.
    let out = cli(
        "alice",
        &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "15m",
            "--reason",
            "disk full on primary",
            "--output",
            "json",
        ],
    );
    out.expect_code(0);
    let r = out.json();
    assert_request_object(&r);
    assert_eq!(r["state"], "pending");
    assert_eq!(r["requester"], "alice");
    assert_eq!(r["target"], "prod-db");
    assert_eq!(r["role"], "read");
    assert_eq!(r["reason"], "disk full on primary");
    assert_eq!(r["policy"], "oncall-db-read");
    assert_eq!(r["approvals_required"], 1);
    assert_eq!(r["duration_s"], 900);
    assert!(r["activated_at"].is_null() && r["expires_at"].is_null());
    let id = id_of(&r);

    // Nobody but the requester gets credentials of a pending request, and
    // not even she does before it is active.
    let out = cli("alice", &["credentials", &id]);
    out.expect_code(1);
    assert!(out.stderr.contains("wrong_state"), "{out:#?}");

    // bob approves (text output): it becomes active.
    let out = cli("bob", &["approve", &id, "--comment", "go ahead"]);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains(&format!("Approved {id} (1 of 1 approval(s))")),
        "{out:#?}"
    );
    assert!(out.stdout.contains("is ACTIVE until"), "{out:#?}");

    // Approving twice is refused (409, wrong state: it is no longer pending).
    let out = cli("carol", &["approve", &id]);
    assert_ne!(out.code, 0, "{out:#?}");

    // alice gets her credentials, once per call.
    let out = cli("alice", &["credentials", &id, "--output", "json"]);
    out.expect_code(0);
    let c = out.json();
    let grant = c["token"].as_str().expect("token");
    assert!(grant.starts_with("bgg_"), "{c}");
    assert_eq!(c["request_id"], id.as_str());
    assert_eq!(c["requester"], "alice");
    // bob approved it but it is not his grant.
    let out = cli("bob", &["credentials", &id]);
    out.expect_code(3);
    assert!(out.stderr.contains("not_requester"), "{out:#?}");

    // show (text and JSON).
    let out = cli("alice", &["show", &id]);
    out.expect_code(0);
    assert!(out.stdout.contains("state:          active"), "{out:#?}");
    assert!(out.stdout.contains("bob at "), "{out:#?}");
    let shown = cli("alice", &["show", &id, "--output", "json"]).json();
    assert_request_object(&shown);
    assert_eq!(shown["state"], "active");
    assert_eq!(shown["approvals"][0]["by"], "bob");
    assert_eq!(shown["approvals"][0]["comment"], "go ahead");
    let (act, exp) = (
        common::ms(&shown["activated_at"]),
        common::ms(&shown["expires_at"]),
    );
    assert_eq!(exp - act, 900_000, "expires_at = activated_at + duration");

    // list: alice sees her request; mallory (no groups) sees nothing.
    let out = cli("alice", &["list"]);
    out.expect_code(0);
    assert!(
        out.stdout.contains(&id) && out.stdout.contains("active"),
        "{out:#?}"
    );
    let list = cli("alice", &["list", "--output", "json"]).json();
    assert_eq!(list["requests"].as_array().map(Vec::len), Some(1), "{list}");
    let out = cli("mallory", &["list"]);
    out.expect_code(0);
    assert!(!out.stdout.contains(&id), "{out:#?}");
    // ...nor can she read it by id.
    let out = cli("mallory", &["show", &id]);
    out.expect_code(1);
    assert!(out.stderr.contains("not_found"), "{out:#?}");

    // whoami.
    let out = cli("alice", &["whoami"]);
    out.expect_code(0);
    assert!(out.stdout.contains("name:      alice"), "{out:#?}");
    assert!(out.stdout.contains("admin:     no"), "{out:#?}");
    let w = cli("dave", &["whoami", "--output", "json"]).json();
    assert_eq!(w["name"], "dave");
    assert_eq!(w["admin"], true);

    // Self-approval: lead is on call and an SRE lead, and still cannot
    // approve their own request.
    let own = cli(
        "lead",
        &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "10m",
            "--reason",
            "mine",
            "--output",
            "json",
        ],
    );
    own.expect_code(0);
    let own_id = id_of(&own.json());
    let out = cli("lead", &["approve", &own_id]);
    out.expect_code(3);
    assert!(out.stderr.contains("self_approval"), "{out:#?}");
    // Someone outside the approver groups is refused too.
    let out = cli("dave", &["approve", &own_id]);
    out.expect_code(3);
    assert!(out.stderr.contains("not_eligible"), "{out:#?}");

    // alice's grant is revoked by an admin (dave, security); her
    // credentials stop, the request is final.
    let out = cli(
        "dave",
        &[
            "revoke",
            &id,
            "--reason",
            "incident over",
            "--output",
            "json",
        ],
    );
    out.expect_code(0);
    let r = out.json();
    assert_request_object(&r);
    assert_eq!(r["state"], "revoked");
    assert_eq!(r["end_reason"], "revoked");
    assert!(r["ended_at"].is_string(), "{r}");
    let out = cli("alice", &["credentials", &id]);
    out.expect_code(1);
    assert!(out.stderr.contains("wrong_state"), "{out:#?}");
    // A non-admin non-requester cannot revoke.
    let out = cli("mallory", &["revoke", &own_id, "--reason", "x"]);
    out.expect_code(1); // not visible to mallory: 404
    let out = cli("alice", &["revoke", &own_id, "--reason", "x"]);
    assert_ne!(out.code, 0, "{out:#?}");

    // The audit log tells the story, as JSON lines with contiguous seq.
    let out = cli("carol", &["audit", "export"]);
    out.expect_code(0);
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect();
    assert_eq!(events.len(), 7, "{out:#?}");
    assert_eq!(events[0]["action"], "service.started");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1), "{e}");
        assert!(e["hash"].as_str().is_some_and(|h| h.len() == 64), "{e}");
    }
    let actions: Vec<&str> = events
        .iter()
        .filter(|e| e["request_id"] == id.as_str())
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(
        actions,
        [
            "request.created",
            "request.approved",
            "request.activated",
            "credentials.issued",
            "request.revoked"
        ]
    );
    let out = cli("carol", &["audit", "export", "--after", "3"]);
    out.expect_code(0);
    let seqs: Vec<u64> = out
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json line")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs.first(), Some(&4));
    assert_eq!(seqs.len(), events.len() - 3);
    // Only admins read the audit log.
    let out = cli("alice", &["audit", "export"]);
    out.expect_code(3);
    assert!(out.stderr.contains("admin_only"), "{out:#?}");
}

#[test]
fn usage_auth_and_connection_errors_have_their_exit_codes() {
    let setup = Setup::new();
    let _server = Server::start(&setup);

    // A bare number is not a duration: usage, before any network call.
    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "15",
            "--reason",
            "x",
        ],
    );
    out.expect_code(2);
    assert!(out.stderr.contains("--duration"), "{out:#?}");
    let out = setup.cli(Some("alice"), &["show", "../audit"]);
    out.expect_code(2);

    // An unknown token: refused (3) with a hint that never shows the token.
    let out = run_cli(&setup.url(), Some("bgt_not-a-known-token"), &["whoami"]);
    out.expect_code(3);
    assert!(out.stderr.contains("unauthenticated"), "{out:#?}");
    assert!(
        out.stderr
            .contains("hint: the server did not accept your token"),
        "{out:#?}"
    );
    assert!(!out.stderr.contains("not-a-known-token"), "{out:#?}");
    // No token at all: also 3, with another hint.
    let out = setup.cli(None, &["whoami"]);
    out.expect_code(3);
    assert!(out.stderr.contains("hint: not signed in"), "{out:#?}");
    // --token on the command line works too (this is the only place it is
    // used: the env var is what people should use).
    let out = run_cli(&setup.url(), None, &["--token", &token("bob"), "whoami"]);
    out.expect_code(0);
    assert!(out.stdout.contains("name:      bob"), "{out:#?}");

    // Refused by policy: mallory is in no group a policy names; alice asks
    // for longer than the policy allows.
    let out = setup.cli(
        Some("mallory"),
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
    out.expect_code(3);
    assert!(out.stderr.contains("policy_denied"), "{out:#?}");
    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "45m",
            "--reason",
            "x",
        ],
    );
    out.expect_code(3);
    assert!(out.stderr.contains("duration_exceeds_policy"), "{out:#?}");
    // Bad input from the server's view: an unknown target is an error (1).
    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "nope-db",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "x",
        ],
    );
    out.expect_code(1);
    assert!(out.stderr.contains("unknown_target"), "{out:#?}");

    // Nothing listens: an error (1) that says so, quickly.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let start = Instant::now();
    let out = run_cli(&dead, Some(&token("alice")), &["list"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("cannot reach the breakglass server"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("unreachable"), "{out:#?}");
    assert!(
        out.stderr.contains("hint: is the server running?"),
        "{out:#?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    // A URL the client will not use is a usage error.
    let out = run_cli("ftp://example.com", Some(&token("alice")), &["whoami"]);
    out.expect_code(2);
}

#[test]
fn request_wait_outcomes() {
    let setup = Setup::new();
    let _server = Server::start(&setup);
    let api = Api::new(&setup.url());
    let request_args = |reason: &'static str, wait: &'static str| {
        vec![
            "request",
            "prod-db",
            "--role",
            "read",
            "--duration",
            "10m",
            "--reason",
            reason,
            wait,
            "--output",
            "json",
        ]
    };

    // Nobody decides within 1s: exit 4, and the id is printed so the
    // script can follow up.
    let start = Instant::now();
    let out = setup.cli(Some("alice"), &request_args("nobody answers", "--wait=1s"));
    out.expect_code(4);
    let r = out.json();
    assert_eq!(r["state"], "pending");
    let id = id_of(&r);
    assert!(out.stderr.contains(&id), "{out:#?}");
    assert!(out.stderr.contains("wait_timeout"), "{out:#?}");
    assert!(start.elapsed() >= Duration::from_secs(1));
    // The request itself is still there, pending.
    let (st, r) = api.get("alice", &format!("/v1/requests/{id}"));
    assert_eq!((st, r["state"].as_str()), (200, Some("pending")));

    // Approved by someone else while waiting: exit 0, the active request.
    let wait_then = |reason: &'static str, decide: &dyn Fn(&str)| {
        let mut child = cli_command(
            &setup.url(),
            Some(&token("alice")),
            &request_args(reason, "--wait=30s"),
        )
        .spawn()
        .expect("spawn request --wait");
        let found = common::poll(Duration::from_secs(15), || {
            api.all_requests("carol")
                .into_iter()
                .find(|r| r["reason"] == reason)
                .map(|r| id_of(&r))
        });
        let Some(id) = found else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the waiting request {reason:?} never showed up");
        };
        decide(&id);
        (id, wait_cli(child, Duration::from_secs(30)))
    };
    let (id, out) = wait_then("approve me", &|id| {
        setup.cli(Some("bob"), &["approve", id]).expect_code(0);
    });
    out.expect_code(0);
    let r = out.json();
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["state"], "active");

    // Denied while waiting: refused (3).
    let (id, out) = wait_then("deny me", &|id| {
        setup
            .cli(Some("bob"), &["deny", id, "--reason", "use the replica"])
            .expect_code(0);
    });
    out.expect_code(3);
    assert_eq!(out.json()["state"], "denied");
    assert!(
        out.stderr.contains(&format!("request {id} was denied")),
        "{out:#?}"
    );

    // Cancelled while waiting: an error (1), not a refusal.
    let (_, out) = wait_then("cancel me", &|id| {
        setup.cli(Some("alice"), &["cancel", id]).expect_code(0);
    });
    out.expect_code(1);
    assert_eq!(out.json()["state"], "cancelled");

    // A 0-approval policy is active at once; --wait returns immediately.
    let start = Instant::now();
    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "drill-db",
            "--role",
            "read",
            "--duration",
            "5m",
            "--reason",
            "drill",
            "--wait",
            "--output",
            "json",
        ],
    );
    out.expect_code(0);
    assert_eq!(out.json()["state"], "active");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_short_grant_expires_on_time() {
    let setup = Setup::new();
    let _server = Server::start(&setup);

    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "drill-db",
            "--role",
            "read",
            "--duration",
            "2s",
            "--reason",
            "drill",
            "--output",
            "json",
        ],
    );
    out.expect_code(0);
    let r = out.json();
    assert_request_object(&r);
    assert_eq!(r["state"], "active");
    assert_eq!(r["policy"], "drill-self-service");
    assert_eq!(r["approvals_required"], 0);
    let id = id_of(&r);
    let expires = common::ms(&r["expires_at"]);
    assert_eq!(expires - common::ms(&r["activated_at"]), 2000);

    // Credentials work while it lasts...
    let out = setup.cli(Some("alice"), &["credentials", &id, "--output", "json"]);
    out.expect_code(0);
    assert!(
        out.json()["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("bgg_"))
    );

    // ...and once it has expired, the request says so and they are refused.
    let wait_ms = expires - now_ms() + 200;
    if wait_ms > 0 {
        std::thread::sleep(Duration::from_millis(wait_ms as u64));
    }
    let out = setup.cli(Some("alice"), &["show", &id, "--output", "json"]);
    out.expect_code(0);
    let r = out.json();
    assert_eq!(r["state"], "expired", "{r}");
    assert_eq!(r["end_reason"], "expired", "{r}");
    let ended = common::ms(&r["ended_at"]);
    assert!(ended >= expires, "ended {ended} before expiry {expires}");
    let out = setup.cli(Some("alice"), &["credentials", &id]);
    out.expect_code(1);
    assert!(out.stderr.contains("wrong_state"), "{out:#?}");
    let out = setup.cli(Some("alice"), &["show", &id]);
    out.expect_code(0);
    assert!(out.stdout.contains("state:          expired"), "{out:#?}");
}

#[test]
fn audit_verify_policy_check_and_graceful_shutdown() {
    let setup = Setup::new();
    let mut server = Server::start(&setup);
    let config = setup.config_path().display().to_string();

    for i in 0..3 {
        let out = setup.cli(
            Some("alice"),
            &[
                "request",
                "drill-db",
                "--role",
                "read",
                "--duration",
                "10m",
                "--reason",
                &format!("drill {i}"),
                "--output",
                "json",
            ],
        );
        out.expect_code(0);
        let id = id_of(&out.json());
        setup
            .cli(Some("alice"), &["credentials", &id])
            .expect_code(0);
    }

    // Offline verify works while the server runs (WAL readers do not block).
    let out = setup.cli(None, &["audit", "verify", "--config", &config]);
    out.expect_code(0);
    assert!(out.stdout.starts_with("Audit chain OK: "), "{out:#?}");
    let out = setup.cli(
        None,
        &["audit", "verify", "--config", &config, "--output", "json"],
    );
    out.expect_code(0);
    let report = out.json();
    assert_eq!(report["ok"], true);
    assert!(
        report["events"].as_u64().is_some_and(|n| n >= 7),
        "{report}"
    );
    assert!(report["first_bad_seq"].is_null());

    // SIGTERM: a graceful exit 0, quickly, with a last checkpoint.
    let start = Instant::now();
    let status = server
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "serve did not exit on SIGTERM; stderr:\n{}",
                server.stderr()
            )
        });
    assert!(status.success(), "{status}; stderr:\n{}", server.stderr());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        server.stderr().contains("shutting down"),
        "{}",
        server.stderr()
    );

    // Offline verify after the stop: every event covered by a signed checkpoint.
    let out = setup.cli(
        None,
        &["audit", "verify", "--config", &config, "--output", "json"],
    );
    out.expect_code(0);
    let after = out.json();
    assert_eq!(after["ok"], true, "{after}");
    assert!(
        after["checkpoints"].as_u64().is_some_and(|n| n >= 1),
        "{after}"
    );
    assert_eq!(after["events"], after["head_seq"], "{after}");
    let conn = rusqlite::Connection::open(setup.db_path()).expect("open store");
    let last_cp: i64 = conn
        .query_row("SELECT max(seq) FROM checkpoints", [], |r| r.get(0))
        .expect("checkpoint");
    assert_eq!(
        last_cp as u64,
        after["head_seq"].as_u64().expect("head"),
        "graceful shutdown signs the head"
    );

    // policy check without a sample: validates and lists the policies.
    let out = setup.cli(None, &["policy", "check", "--config", &config]);
    out.expect_code(0);
    assert!(
        out.stdout.starts_with(
            "Policies OK (4): oncall-db-read, drill-self-service, ic-emergency, one-hour-cap"
        ),
        "{out:#?}"
    );
    // A sample that is allowed: which policy governs, and its obligations.
    let sample = |extra: &[&str]| {
        let mut args = vec!["policy", "check", "--config", &config];
        args.extend_from_slice(extra);
        setup.cli(None, &args)
    };
    let out = sample(&[
        "--principal",
        "alice",
        "--target",
        "prod-db",
        "--role",
        "read",
        "--duration",
        "15m",
    ]);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains("Sample: ALLOWED, governed by oncall-db-read"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("approvals required: 1 from sre-leads"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("max duration: 30m"), "{out:#?}");
    let out = sample(&[
        "--principal",
        "alice",
        "--target",
        "drill-db",
        "--role",
        "read",
        "--duration",
        "5m",
        "--output",
        "json",
    ]);
    out.expect_code(0);
    let j = out.json();
    assert_eq!(j["sample"]["allowed"], true);
    assert_eq!(
        j["sample"]["governing"],
        serde_json::json!(["drill-self-service"])
    );
    assert_eq!(j["sample"]["approvals_required"], 0);
    // Refused samples exit 3 and say why.
    let out = sample(&[
        "--principal",
        "mallory",
        "--target",
        "prod-db",
        "--role",
        "read",
        "--duration",
        "5m",
    ]);
    out.expect_code(3);
    assert!(out.stdout.contains("Sample: DENIED"), "{out:#?}");
    let out = sample(&[
        "--principal",
        "alice",
        "--target",
        "prod-db",
        "--role",
        "read",
        "--duration",
        "45m",
    ]);
    out.expect_code(3);
    assert!(
        out.stdout.contains("exceeds the maximum duration"),
        "{out:#?}"
    );
    // A sample naming something the config does not have is an error.
    let out = sample(&[
        "--principal",
        "zed",
        "--target",
        "prod-db",
        "--role",
        "read",
        "--duration",
        "5m",
    ]);
    out.expect_code(1);
    assert!(out.stderr.contains("no principal \"zed\""), "{out:#?}");
}

#[test]
fn serve_dev_prints_working_tokens() {
    // `serve --dev` always binds 127.0.0.1:8080. Skip (loudly) if something
    // else holds it, rather than fail on a busy machine.
    match std::net::TcpListener::bind("127.0.0.1:8080") {
        Ok(l) => drop(l),
        Err(e) => {
            eprintln!(
                "NOTE: skipping serve_dev_prints_working_tokens: 127.0.0.1:8080 is busy ({e})"
            );
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dev-data");
    let url = "http://127.0.0.1:8080";
    let mut server = Server::spawn_args(
        &["serve", "--dev", "--data-dir", &data.display().to_string()],
        dir.path(),
        url,
    );
    let (status, body) = server.wait_answer();
    assert_eq!(status, 200, "{body}; stderr:\n{}", server.stderr());
    // The banner comes right after "ready".
    let banner = common::poll(Duration::from_secs(10), || {
        let s = server.stderr();
        s.contains("export BREAKGLASS_URL").then_some(s)
    })
    .unwrap_or_else(|| panic!("no banner; stderr:\n{}", server.stderr()));
    assert!(banner.contains("NOT FOR PRODUCTION"), "{banner}");
    assert!(banner.contains("DEV MODE"), "{banner}");
    // `export ALICE=bgt_... BOB=bgt_... ...`
    let tokens: Vec<(String, String)> = banner
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .flat_map(str::split_whitespace)
        .filter_map(|pair| {
            let (name, tok) = pair.split_once('=')?;
            tok.starts_with("bgt_")
                .then(|| (name.to_lowercase(), tok.to_string()))
        })
        .collect();
    let names: Vec<&str> = tokens.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["alice", "bob", "carol", "dave", "erin"], "{banner}");
    for (name, tok) in &tokens {
        let out = run_cli(url, Some(tok), &["whoami", "--output", "json"]);
        out.expect_code(0);
        assert_eq!(out.json()["name"], name.as_str());
    }
    assert!(data.join("config.toml").exists());

    let status = server
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("dev server ignored SIGTERM; stderr:\n{}", server.stderr()));
    assert!(status.success(), "{status}");
}

#[test]
fn a_removed_principal_loses_its_grant_at_restart() {
    let mut setup = Setup::new();
    let mut server = Server::start(&setup);
    let api = Api::new(&setup.url());
    let out = setup.cli(
        Some("alice"),
        &[
            "request",
            "drill-db",
            "--role",
            "read",
            "--duration",
            "1h",
            "--reason",
            "drill",
            "--output",
            "json",
        ],
    );
    out.expect_code(0);
    let grant = id_of(&out.json());
    let out = setup.cli(Some("alice"), &["credentials", &grant, "--output", "json"]);
    out.expect_code(0);
    let secret = out.json()["token"].as_str().expect("token").to_string();
    let verify = |api: &Api| {
        let (st, v) = api.post(
            common::SERVICE,
            "/v1/credentials/verify",
            Some(serde_json::json!({"token": secret, "target": "drill-db"})),
        );
        assert_eq!(st, 200, "{v}");
        v
    };
    assert_eq!(verify(&api)["active"], true);

    // An emergency self-activation blocked by the first one is a refusal (3)
    // that names the blocking request.
    let emergency = |who: &str| {
        setup.cli(
            Some(who),
            &[
                "request",
                "prod-db",
                "--role",
                "admin",
                "--duration",
                "5m",
                "--reason",
                "primary down",
                "--emergency",
                "--output",
                "json",
            ],
        )
    };
    let out = emergency("erin");
    out.expect_code(0);
    let first = id_of(&out.json());
    let out = emergency("erin");
    out.expect_code(3);
    assert!(
        out.stderr.contains("emergency_blocked") && out.stderr.contains(&first),
        "{out:#?}"
    );

    // alice leaves the config; the service restarts.
    server
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("serve did not stop; stderr:\n{}", server.stderr()));
    setup.new_port();
    let alice = format!(
        "[[principals]]\nname = \"alice\"\ngroups = [\"oncall\"]\ntoken_sha256 = \"{}\"\n\n",
        common::sha256_hex(token("alice").as_bytes())
    );
    let text = setup.config_text();
    assert!(text.contains(&alice), "the config lists alice");
    std::fs::write(setup.config_path(), text.replace(&alice, "")).expect("write config");
    let mut server = Server::start(&setup);
    let api = Api::new(&setup.url());

    let (st, r) = api.get("dave", &format!("/v1/requests/{grant}"));
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        (
            r["state"].as_str(),
            r["end_reason"].as_str(),
            r["ended_by"].as_str()
        ),
        (Some("revoked"), Some("principal_removed"), Some("system")),
        "{r}"
    );
    let v = verify(&api);
    assert_eq!(v["active"], false, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("principal_removed")),
        "{v}"
    );
    // The revocation is in the audit log, before the service said it started.
    let events = api.all_audit("dave");
    let revoked = events
        .iter()
        .position(|e| {
            e["action"] == "request.revoked" && e["request_id"].as_str() == Some(grant.as_str())
        })
        .expect("a request.revoked event");
    let started = events
        .iter()
        .rposition(|e| e["action"] == "service.started")
        .expect("service.started");
    assert!(revoked < started, "revoked before serving");
    assert_eq!(
        events[started]["details"]["principal_removed_ended"], 1,
        "{}",
        events[started]
    );
    server
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("serve did not stop; stderr:\n{}", server.stderr()));
    let out = setup.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &setup.config_path().display().to_string(),
        ],
    );
    out.expect_code(0);
}

#[test]
fn policy_check_warns_about_rules_nobody_can_satisfy() {
    let policy = format!(
        "{}\n@id(\"ghost-approvers\")\n@approvals(\"1\")\n@approvers(\"ghosts\")\n@max_duration(\"30m\")\n\
         permit (principal in Group::\"oncall\", action == Action::\"request\", resource in TargetGroup::\"drills\");\n",
        common::POLICY
    );
    let setup = Setup::with_policy(&policy);
    let config = setup.config_path().display().to_string();
    let out = setup.cli(None, &["policy", "check", "--config", &config]);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains("warning: policy ghost-approvers: approver group ghosts has no known member"),
        "{out:#?}"
    );
    let out = setup.cli(
        None,
        &["policy", "check", "--config", &config, "--output", "json"],
    );
    out.expect_code(0);
    let warnings = out.json()["warnings"].clone();
    assert_eq!(warnings.as_array().map(Vec::len), Some(2), "{warnings}");
    // The default policy of the tests has none.
    let setup = Setup::new();
    let config = setup.config_path().display().to_string();
    let out = setup.cli(None, &["policy", "check", "--config", &config]);
    out.expect_code(0);
    assert!(!out.stdout.contains("warning:"), "{out:#?}");
}
