//! Smaller protections over the real API: the metrics token, what service
//! principals may and may not do, credentials checked for their target,
//! text fields without hidden characters, and a data dir nobody else can
//! write to.

mod common;

use breakglass_core::token::sha256_hex;
use common::{SERVICE, TestServer, call_raw};
use serde_json::{Value, json};

#[test]
fn metrics_need_the_metrics_token_when_one_is_configured() {
    let line = format!(
        "metrics_token_sha256 = \"{}\"",
        sha256_hex(b"scrape-secret")
    );
    let s = TestServer::start_with(tempfile::tempdir().expect("tempdir"), &line);
    for token in [None, Some("wrong"), Some("token-alice")] {
        let (st, p) = call_raw(&s.url, token, "GET", "/metrics", None);
        assert_eq!(st, 401, "{token:?}: {p}");
        assert_eq!(p["code"], "unauthenticated", "{p}");
        assert!(
            p["detail"]
                .as_str()
                .is_some_and(|d| d.contains("metrics_token_sha256")),
            "{p}"
        );
    }
    let (st, m) = call_raw(&s.url, Some("scrape-secret"), "GET", "/metrics", None);
    assert_eq!(st, 200);
    assert!(
        m.as_str()
            .is_some_and(|m| m.contains("breakglass_requests")),
        "{m}"
    );
    s.stop();
}

fn active_grant(s: &TestServer) -> (String, String) {
    let (st, r) = s.call(
        "alice",
        "POST",
        "/v1/requests",
        Some(json!({"target": "drill-db", "role": "read", "duration": "15m", "reason": "drill"})),
    );
    assert_eq!(st, 201, "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    let (st, c) = s.call(
        "alice",
        "POST",
        &format!("/v1/requests/{id}/credentials"),
        None,
    );
    assert_eq!(st, 200, "{c}");
    (id, c["token"].as_str().expect("token").to_string())
}

#[test]
fn only_service_principals_verify_and_they_must_name_the_target() {
    let s = TestServer::start();
    let (_, tok) = active_grant(&s);
    let verify = |who: &str, body: Value| s.call(who, "POST", "/v1/credentials/verify", Some(body));
    // People may not look up credentials, not even an admin.
    for who in ["alice", "dave"] {
        let (st, p) = verify(who, json!({"token": tok, "target": "drill-db"}));
        assert_eq!(
            (st, p["code"].as_str()),
            (403, Some("not_service_principal")),
            "{who}: {p}"
        );
    }
    // The target is required...
    let (st, p) = verify(SERVICE, json!({"token": tok}));
    assert_eq!(st, 400, "{p}");
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("target")),
        "{p}"
    );
    let (st, p) = verify(SERVICE, json!({"token": tok, "target": " "}));
    assert_eq!(st, 400, "{p}");
    // ...and a credential for another target is not active.
    let (st, v) = verify(SERVICE, json!({"token": tok, "target": "prod-db"}));
    assert_eq!((st, v["active"].as_bool()), (200, Some(false)), "{v}");
    let (st, v) = verify(SERVICE, json!({"token": tok, "target": "drill-db"}));
    assert_eq!((st, v["active"].as_bool()), (200, Some(true)), "{v}");

    // A service principal neither requests nor approves.
    let (st, p) = s.call(
        SERVICE,
        "POST",
        "/v1/requests",
        Some(json!({"target": "drill-db", "role": "read", "duration": "15m", "reason": "x"})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (403, Some("service_principal")),
        "{p}"
    );
    let (st, r) = s.call(
        "alice",
        "POST",
        "/v1/requests",
        Some(json!({"target": "prod-db", "role": "read", "duration": "15m", "reason": "disk"})),
    );
    assert_eq!(st, 201, "{r}");
    let id = r["id"].as_str().expect("id");
    for verb in ["approve", "deny"] {
        let (st, p) = s.call(
            SERVICE,
            "POST",
            &format!("/v1/requests/{id}/{verb}"),
            Some(json!({"reason": "x"})),
        );
        assert_eq!(
            (st, p["code"].as_str()),
            (403, Some("service_principal")),
            "{verb}: {p}"
        );
    }
    s.stop();
}

#[test]
fn text_fields_refuse_hidden_and_control_characters_naming_the_field() {
    let s = TestServer::start();
    for (field, body) in [
        (
            "reason",
            json!({"target": "drill-db", "role": "read", "duration": "15m", "reason": "fix \u{202E}txt.exe"}),
        ),
        (
            "reason",
            json!({"target": "drill-db", "role": "read", "duration": "15m", "reason": "a\u{2067}b"}),
        ),
        (
            "reason",
            json!({"target": "drill-db", "role": "read", "duration": "15m", "reason": "bell\u{7}"}),
        ),
        (
            "ticket",
            json!({"target": "drill-db", "role": "read", "duration": "15m", "reason": "ok", "ticket": "INC-1\u{200F}"}),
        ),
    ] {
        let (st, p) = s.call("alice", "POST", "/v1/requests", Some(body.clone()));
        assert_eq!(st, 400, "{body}: {p}");
        assert!(
            p["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("{field} contains"))),
            "{body}: {p}"
        );
    }
    s.stop();
}

#[cfg(unix)]
#[test]
fn a_data_dir_others_can_write_to_is_refused_and_a_new_one_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = TestServer::start();
    let data = s.dir.path().join("data");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for f in ["breakglass.db", "audit-signing.key", "audit-signing.pub"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    let dir = s.stop();
    let data = dir.path().join("data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let config =
        breakglass_server::config::Config::load(&dir.path().join("config.toml")).expect("config");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let e = rt
        .block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            breakglass_server::start(config, l).await.map(|_| ())
        })
        .expect_err("refused");
    let e = format!("{e:#}");
    assert!(e.contains(&data.display().to_string()), "{e}");
    assert!(e.contains("chmod go-w"), "{e}");
}
