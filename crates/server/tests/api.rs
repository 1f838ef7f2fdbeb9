//! The HTTP API end to end over real sockets: lifecycle, authorization,
//! credentials, audit, limits and error documents.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Api, Nodes, SERVICE, TestServer, call_raw};
use serde_json::{Value, json};

fn create(s: &dyn Api, who: &str, body: Value) -> (u16, Value) {
    s.call(who, "POST", "/v1/requests", Some(body))
}

fn read_req(s: &dyn Api, who: &str) -> String {
    let (st, r) = create(
        s,
        who,
        json!({"target": "prod-db", "role": "read", "duration": "15m", "reason": "disk full"}),
    );
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["state"], "pending");
    r["id"].as_str().expect("id").to_string()
}

#[test]
fn approval_activates_and_credentials_work_until_revoked() {
    approval_activates_and_credentials_work_until_revoked_on(&TestServer::start());
}

#[test]
fn two_nodes_approval_activates_and_credentials_work_until_revoked() {
    approval_activates_and_credentials_work_until_revoked_on(&Nodes::start(2));
}

fn approval_activates_and_credentials_work_until_revoked_on(s: &dyn Api) {
    let id = read_req(s, "alice");
    let (st, r) = s.call(
        "bob",
        "POST",
        &format!("/v1/requests/{id}/approve"),
        Some(json!({"comment": "go"})),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["state"], "active");
    assert_eq!(r["approvals"][0]["by"], "bob");
    assert!(r["expires_at"].is_string());

    // Only the requester gets credentials.
    let (st, p) = s.call(
        "bob",
        "POST",
        &format!("/v1/requests/{id}/credentials"),
        None,
    );
    assert_eq!((st, p["code"].as_str()), (403, Some("not_requester")));
    let (st, c) = s.call(
        "alice",
        "POST",
        &format!("/v1/requests/{id}/credentials"),
        None,
    );
    assert_eq!(st, 200, "{c}");
    let tok = c["token"].as_str().expect("token").to_string();
    assert!(tok.starts_with("bgg_"));

    let introspect = |body: Value| {
        s.call(SERVICE, "POST", "/v1/credentials/verify", Some(body))
            .1
    };
    assert_eq!(
        introspect(json!({"token": tok, "target": "prod-db"}))["active"],
        true
    );
    assert_eq!(
        introspect(json!({"token": tok, "principal": "bob", "target": "prod-db"}))["active"],
        false
    );
    assert_eq!(
        introspect(json!({"token": tok, "target": "drill-db"}))["active"],
        false
    );
    assert_eq!(
        introspect(json!({"token": "bgg_00", "target": "prod-db"}))["active"],
        false
    );

    // An admin revokes; the credential is refused at once.
    let (st, r) = s.call(
        "dave",
        "POST",
        &format!("/v1/requests/{id}/revoke"),
        Some(json!({"reason": "done"})),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        (r["state"].as_str(), r["end_reason"].as_str()),
        (Some("revoked"), Some("revoked"))
    );
    let v = introspect(json!({"token": tok, "target": "prod-db"}));
    assert_eq!(v["active"], false, "{v}");
    assert!(
        v["reason"].as_str().unwrap_or("").contains("revoked"),
        "{v}"
    );
    let (st, p) = s.call(
        "alice",
        "POST",
        &format!("/v1/requests/{id}/credentials"),
        None,
    );
    assert_eq!((st, p["code"].as_str()), (409, Some("wrong_state")));

    // The token itself never appears in the audit log.
    let (st, page) = s.call("carol", "GET", "/v1/audit?after=0&limit=100", None);
    assert_eq!(st, 200);
    assert!(!page.to_string().contains(&tok));
    let actions: Vec<&str> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["request_id"] == json!(id))
        .map(|e| e["action"].as_str().unwrap_or(""))
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
    let (st, v) = s.call("carol", "GET", "/v1/audit/verify", None);
    assert_eq!((st, v["ok"].as_bool()), (200, Some(true)), "{v}");
}

#[test]
fn authorization_refusals_have_stable_codes() {
    authorization_refusals_have_stable_codes_on(&TestServer::start());
}

#[test]
fn two_nodes_authorization_refusals_have_stable_codes() {
    authorization_refusals_have_stable_codes_on(&Nodes::start(2));
}

fn authorization_refusals_have_stable_codes_on(s: &dyn Api) {
    let id = read_req(s, "lead");
    let approve = |who: &str| s.call(who, "POST", &format!("/v1/requests/{id}/approve"), None);
    // The requester is in sre-leads but never counts.
    assert_eq!(approve("lead").1["code"], "self_approval");
    // Admin rights do not make dave an approver of the read policy.
    assert_eq!(approve("dave").1["code"], "not_eligible");
    // Mallory cannot even see it.
    assert_eq!(approve("mallory").0, 404);
    assert_eq!(
        s.call("mallory", "GET", &format!("/v1/requests/{id}"), None)
            .0,
        404
    );
    assert_eq!(approve("bob").0, 200);
    assert_eq!(approve("carol").1["code"], "wrong_state");

    // Unknown or missing token.
    let (st, p) = call_raw(&s.url(), Some("nope"), "GET", "/v1/whoami", None);
    assert_eq!((st, p["code"].as_str()), (401, Some("unauthenticated")));
    let (st, _) = call_raw(&s.url(), None, "GET", "/v1/requests", None);
    assert_eq!(st, 401);

    // Policy refusals: outside policy, beyond max duration, missing ticket.
    let body = |role: &str, dur: &str, ticket: Option<&str>| json!({"target": "prod-db", "role": role, "duration": dur, "reason": "x", "ticket": ticket});
    assert_eq!(
        create(s, "mallory", body("read", "5m", None)).1["code"],
        "policy_denied"
    );
    assert_eq!(
        create(s, "alice", body("read", "45m", None)).1["code"],
        "duration_exceeds_policy"
    );
    assert_eq!(
        create(s, "alice", body("read", "2h", None)).1["code"],
        "policy_denied"
    );
    assert_eq!(
        create(s, "alice", body("admin", "5m", None)).1["code"],
        "ticket_required"
    );
    assert_eq!(
        create(s, "alice", body("admin", "5m", Some("JIRA-1"))).1["code"],
        "ticket_required"
    );
    let (st, r) = create(s, "alice", body("admin", "5m", Some("INC-42")));
    assert_eq!(
        (st, r["approvals_required"].as_u64()),
        (201, Some(2)),
        "{r}"
    );
    let admin_id = r["id"].as_str().expect("id").to_string();
    let approve2 = |who: &str| {
        s.call(
            who,
            "POST",
            &format!("/v1/requests/{admin_id}/approve"),
            None,
        )
    };
    assert_eq!(approve2("bob").1["state"], "pending");
    assert_eq!(approve2("bob").1["code"], "already_approved");
    assert_eq!(approve2("dave").1["state"], "active");

    // Only the requester cancels; only approvers deny.
    let id2 = read_req(s, "alice");
    assert_eq!(
        s.call("bob", "POST", &format!("/v1/requests/{id2}/cancel"), None)
            .1["code"],
        "not_requester"
    );
    assert_eq!(
        s.call(
            "alice",
            "POST",
            &format!("/v1/requests/{id2}/deny"),
            Some(json!({"reason": "x"}))
        )
        .1["code"],
        "self_approval"
    );
    let (st, r) = s.call(
        "bob",
        "POST",
        &format!("/v1/requests/{id2}/deny"),
        Some(json!({"reason": "not now"})),
    );
    assert_eq!((st, r["state"].as_str()), (200, Some("denied")));

    // Visibility in lists.
    let (_, l) = s.call("mallory", "GET", "/v1/requests", None);
    assert_eq!(l["requests"].as_array().map(Vec::len), Some(0));
    let (_, l) = s.call("bob", "GET", "/v1/requests?state=denied", None);
    assert_eq!(l["requests"].as_array().map(Vec::len), Some(1));
    // The audit log is for admins.
    assert_eq!(
        s.call("bob", "GET", "/v1/audit", None).1["code"],
        "admin_only"
    );
}

#[test]
fn bad_input_gets_a_problem_that_names_it() {
    let s = TestServer::start();
    let cases = [
        (
            json!({"target": "prod-db", "role": "read", "duration": "15", "reason": "x"}),
            "duration",
        ),
        (
            json!({"target": "nope", "role": "read", "duration": "5m", "reason": "x"}),
            "unknown target",
        ),
        (
            json!({"target": "prod-db", "role": "root", "duration": "5m", "reason": "x"}),
            "no role",
        ),
        (
            json!({"target": "prod-db", "role": "read", "duration": "5m", "reason": ""}),
            "reason",
        ),
        (
            json!({"target": "prod-db", "role": "read", "duration": "5m", "reason": "x".repeat(2000)}),
            "reason is 2000 bytes",
        ),
        (
            json!({"target": "prod-db", "role": "read", "duration": "5m", "reason": "x", "extra": 1}),
            "extra",
        ),
        (
            json!({"target": "prod-db", "role": "read", "reason": "x"}),
            "duration",
        ),
        (
            json!({"target": "prod db", "role": "read", "duration": "5m", "reason": "x"}),
            "target",
        ),
    ];
    for (body, needle) in cases {
        let (st, p) = create(&s, "alice", body.clone());
        // A name that does not exist is 404 (with its code); every other
        // bad value is 400.
        let expected = if p["code"] == "unknown_target" || p["code"] == "unknown_role" {
            404
        } else {
            400
        };
        assert_eq!(st, expected, "{body} -> {p}");
        let detail = p["detail"].as_str().unwrap_or("");
        assert!(
            detail.contains(needle),
            "{body}: {detail:?} should mention {needle:?}"
        );
        assert!(
            p["code"].is_string() && p["type"].is_string() && p["status"] == expected,
            "{p}"
        );
    }
    let (st, p) = call_raw(
        &s.url,
        Some("token-alice"),
        "POST",
        "/v1/requests",
        Some("{not json".into()),
    );
    assert_eq!((st, p["code"].as_str()), (400, Some("bad_request")));
    let huge = format!("{{\"reason\": \"{}\"}}", "x".repeat(100_000));
    let (st, p) = call_raw(
        &s.url,
        Some("token-alice"),
        "POST",
        "/v1/requests",
        Some(huge),
    );
    assert_eq!((st, p["code"].as_str()), (413, Some("body_too_large")));
    let (st, _) = s.call("alice", "GET", "/v1/requests?limit=abc", None);
    assert_eq!(st, 400);
    let (st, _) = s.call("alice", "GET", "/v1/requests?state=bogus", None);
    assert_eq!(st, 400);
    // Nothing was stored by any of it.
    let (_, l) = s.call("carol", "GET", "/v1/requests", None);
    assert_eq!(l["requests"].as_array().map(Vec::len), Some(0));

    // Approve's body is optional; one that is there must say it is JSON.
    let id = read_req(&s, "alice");
    let addr = s.url().trim_start_matches("http://").to_string();
    let approve = |headers: &str, body: &str| {
        raw_exchange(
            &addr,
            format!(
                "POST /v1/requests/{id}/approve HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-bob\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let refused = approve("Content-Type: text/plain\r\n", "{\"comment\": \"go\"}");
    assert!(refused.starts_with("HTTP/1.1 415"), "{refused}");
    assert!(refused.contains("application/json"), "{refused}");
    let refused = approve("", "{\"comment\": \"go\"}");
    assert!(refused.starts_with("HTTP/1.1 415"), "{refused}");
    let (_, r) = s.call("alice", "GET", &format!("/v1/requests/{id}"), None);
    assert_eq!(r["state"], "pending", "a refused body approves nothing");
    let approved = approve("", "");
    assert!(approved.starts_with("HTTP/1.1 200"), "{approved}");
    assert!(approved.contains("\"state\":\"active\""), "{approved}");
}

#[test]
fn grants_expire_on_time_and_pending_requests_time_out() {
    grants_expire_on_time_and_pending_requests_time_out_on(&TestServer::start());
}

#[test]
fn two_nodes_grants_expire_on_time_and_pending_requests_time_out() {
    grants_expire_on_time_and_pending_requests_time_out_on(&Nodes::start(2));
}

fn grants_expire_on_time_and_pending_requests_time_out_on(s: &dyn Api) {
    let (st, r) = create(
        s,
        "alice",
        json!({"target": "drill-db", "role": "read", "duration": "1s", "reason": "drill"}),
    );
    assert_eq!((st, r["state"].as_str()), (201, Some("active")), "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    let (_, c) = s.call(
        "alice",
        "POST",
        &format!("/v1/requests/{id}/credentials"),
        None,
    );
    let tok = c["token"].as_str().expect("token").to_string();
    let pending = read_req(s, "alice");
    std::thread::sleep(Duration::from_millis(1300));
    let (_, r) = s.call("alice", "GET", &format!("/v1/requests/{id}"), None);
    assert_eq!(
        (r["state"].as_str(), r["end_reason"].as_str()),
        (Some("expired"), Some("expired")),
        "{r}"
    );
    let v = s
        .call(
            SERVICE,
            "POST",
            "/v1/credentials/verify",
            Some(json!({"token": tok, "target": "drill-db"})),
        )
        .1;
    assert_eq!(v["active"], false);
    std::thread::sleep(Duration::from_millis(2000));
    let (_, r) = s.call("alice", "GET", &format!("/v1/requests/{pending}"), None);
    assert_eq!(r["state"], "timed_out", "{r}");
    // The store's counts are the same on every node; the expiry was
    // applied by exactly one node's scheduler (the others lost the race).
    let mut lateness_counts = 0;
    for url in s.urls() {
        let (_, m) = call_raw(&url, None, "GET", "/metrics", None);
        let m = m.as_str().unwrap_or("").to_string();
        assert!(
            m.contains("breakglass_requests{state=\"expired\"} 1"),
            "{m}"
        );
        lateness_counts += m
            .lines()
            .find_map(|l| l.strip_prefix("breakglass_expiry_lateness_seconds_count "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    assert_eq!(lateness_counts, 1, "one node ended the grant");
}

#[test]
fn emergency_grants_must_be_countersigned() {
    emergency_grants_must_be_countersigned_on(&TestServer::start());
}

#[test]
fn two_nodes_emergency_grants_must_be_countersigned() {
    emergency_grants_must_be_countersigned_on(&Nodes::start(2));
}

fn emergency_grants_must_be_countersigned_on(s: &dyn Api) {
    let body = json!({"target": "prod-db", "role": "admin", "duration": "5m", "reason": "site down", "emergency": true});
    let (st, r) = create(s, "erin", body.clone());
    assert_eq!(
        (st, r["state"].as_str(), r["emergency"].as_bool()),
        (201, Some("active"), Some(true)),
        "{r}"
    );
    assert_eq!(r["review_required"], true);
    let signed = r["id"].as_str().expect("id").to_string();
    assert_eq!(
        s.call(
            "erin",
            "POST",
            &format!("/v1/requests/{signed}/approve"),
            None
        )
        .1["code"],
        "self_approval"
    );
    let (st, r) = s.call(
        "bob",
        "POST",
        &format!("/v1/requests/{signed}/approve"),
        Some(json!({"comment": "seen"})),
    );
    assert_eq!(
        (st, r["countersignature"]["by"].as_str()),
        (200, Some("bob")),
        "{r}"
    );
    // One open emergency grant per principal: release it before the next.
    let (st, r) = s.call(
        "erin",
        "POST",
        &format!("/v1/requests/{signed}/revoke"),
        Some(json!({"reason": "fixed"})),
    );
    assert_eq!(
        (st, r["end_reason"].as_str()),
        (200, Some("released")),
        "{r}"
    );
    let (st, r) = create(s, "erin", body);
    assert_eq!(st, 201, "{r}");
    let unsigned = r["id"].as_str().expect("id").to_string();
    std::thread::sleep(Duration::from_millis(2500));
    let (_, r) = s.call("erin", "GET", &format!("/v1/requests/{unsigned}"), None);
    assert_eq!(
        (r["state"].as_str(), r["end_reason"].as_str()),
        (Some("revoked"), Some("not_countersigned")),
        "{r}"
    );
    // Review: not by the requester, once, by an eligible approver.
    let review = |who: &str| {
        s.call(
            who,
            "POST",
            &format!("/v1/requests/{unsigned}/review"),
            Some(json!({"outcome": "ok", "notes": "fine"})),
        )
    };
    assert_eq!(review("erin").1["code"], "self_approval");
    assert_eq!(review("bob").1["review"]["outcome"], "ok");
    assert_eq!(review("carol").1["code"], "already_reviewed");
}

#[test]
fn state_survives_restart_and_overdue_grants_end_before_serving() {
    let s = TestServer::start();
    let (_, r) = create(
        &s,
        "alice",
        json!({"target": "drill-db", "role": "read", "duration": "1s", "reason": "drill"}),
    );
    let id = r["id"].as_str().expect("id").to_string();
    let dir = s.stop();
    std::thread::sleep(Duration::from_millis(1200));
    let s = TestServer::start_in(dir);
    let (_, r) = s.call("alice", "GET", &format!("/v1/requests/{id}"), None);
    assert_eq!(r["state"], "expired", "{r}");
    let (_, v) = s.call("carol", "GET", "/v1/audit/verify", None);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checkpoints"].as_u64().unwrap_or(0) >= 1, "{v}");
}

#[test]
fn service_endpoints_answer() {
    let s = TestServer::start();
    assert_eq!(call_raw(&s.url, None, "GET", "/healthz", None).0, 200);
    assert_eq!(call_raw(&s.url, None, "GET", "/readyz", None).0, 200);
    let (st, doc) = call_raw(&s.url, None, "GET", "/openapi.json", None);
    assert_eq!(st, 200);
    assert!(
        doc["paths"]["/v1/requests/{id}/approve"]["post"].is_object(),
        "{doc}"
    );
    assert!(doc["components"]["schemas"]["Request"].is_object());
    let (st, p) = call_raw(&s.url, None, "GET", "/nope", None);
    assert_eq!((st, p["code"].as_str()), (404, Some("not_found")));
    let (st, w) = s.call("carol", "GET", "/v1/whoami", None);
    assert_eq!((st, w["admin"].as_bool()), (200, Some(true)));
}

/// Sends `request` on a new connection and reads until the server closes
/// it (or 5 s pass); returns what came back.
fn raw_exchange(addr: &str, request: &[u8]) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(request).expect("send");
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn api_connections_are_capped_and_idle_ones_closed() {
    // (Refusals once every slot is signed in, and the per-source cap, are
    // in tests/lockout.rs.)
    let s = TestServer::start_with(
        tempfile::tempdir().expect("tempdir"),
        "max_connections = 3\nidle_timeout = \"1s\"\n",
    );
    let addr = s.url.trim_start_matches("http://").to_string();
    // Wait out any pooled connection of an earlier call, then take both
    // slots: one sends half a header and stalls, one sends nothing.
    std::thread::sleep(Duration::from_millis(1500));
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("half a header");
    let mut silent = std::net::TcpStream::connect(&addr).expect("connect");
    // One more trickles a header a byte every 200 ms: bytes from the
    // client do not keep a connection open.
    let trickler_addr = addr.clone();
    let trickler = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(&trickler_addr).expect("connect");
        let started = std::time::Instant::now();
        for b in b"GET /healthz HTTP/1.1\r\nHost: trickle.example\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if c.write_all(&[*b]).is_err() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = std::time::Instant::now();

    // All three slots are held by connections that showed no token: a
    // fourth takes the slot of the oldest (slow) rather than being locked
    // out.
    let served = raw_exchange(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");

    // Both held connections are closed: slow to make room, silent once
    // idle for 1 s, not before.
    for (name, conn) in [("slow", &mut slow), ("silent", &mut silent)] {
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        let n = conn.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "{name}: {:?}", String::from_utf8_lossy(&buf[..n]));
    }
    let trickled = trickler.join().expect("trickler");
    assert!(
        trickled.is_some_and(|t| t < Duration::from_secs(4)),
        "a trickling client was cut off: {trickled:?}"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );

    // The slots are free again, and nobody was refused.
    let metrics = raw_exchange(
        &addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("breakglass_http_connections_refused_total 0\n"),
        "{metrics}"
    );
    assert_eq!(call_raw(&s.url, None, "GET", "/healthz", None).0, 200);
}

#[test]
fn credentials_per_grant_are_capped() {
    let s = TestServer::start();
    let (st, r) = create(
        &s,
        "alice",
        json!({"target": "drill-db", "role": "read", "duration": "30m", "reason": "drill"}),
    );
    assert_eq!((st, r["state"].as_str()), (201, Some("active")), "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    let path = format!("/v1/requests/{id}/credentials");
    let max = breakglass_server::app::CREDENTIALS_PER_GRANT_MAX;
    let mut first = String::new();
    for i in 0..max {
        let (st, c) = s.call("alice", "POST", &path, None);
        assert_eq!(st, 200, "credential {i}: {c}");
        if i == 0 {
            first = c["token"].as_str().expect("token").to_string();
        }
    }
    let (st, p) = s.call("alice", "POST", &path, None);
    assert_eq!(
        (st, p["code"].as_str()),
        (409, Some("credential_limit")),
        "{p}"
    );
    let detail = p["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("{max} credentials")), "{p}");
    // The refusal wrote nothing, and the credentials already issued work.
    let mut issued = 0u64;
    let mut after = 0;
    loop {
        let (st, log) = s.call(
            "carol",
            "GET",
            &format!("/v1/audit?after={after}&limit=1000"),
            None,
        );
        assert_eq!(st, 200);
        let events = log["events"].as_array().expect("events");
        issued += events
            .iter()
            .filter(|e| e["action"] == "credentials.issued")
            .count() as u64;
        match log["next"].as_u64() {
            Some(n) if !events.is_empty() => after = n,
            _ => break,
        }
    }
    assert_eq!(issued, max);
    let (st, v) = s.call(
        SERVICE,
        "POST",
        "/v1/credentials/verify",
        Some(json!({"token": first, "target": "drill-db"})),
    );
    assert_eq!((st, v["active"].as_bool()), (200, Some(true)), "{v}");
}

fn emergency(s: &dyn Api, who: &str) -> (u16, Value) {
    create(
        s,
        who,
        json!({"target": "prod-db", "role": "admin", "duration": "5m", "reason": "site down", "emergency": true}),
    )
}

fn act(s: &dyn Api, who: &str, id: &str, verb: &str, body: Value) -> (u16, Value) {
    s.call(
        who,
        "POST",
        &format!("/v1/requests/{id}/{verb}"),
        Some(body),
    )
}

#[test]
fn emergency_self_activation_is_refused_while_another_blocks_it() {
    let s = TestServer::start_with(
        tempfile::tempdir().expect("tempdir"),
        "[emergency]\nreview_within = \"2s\"\n",
    );
    let (st, r) = emergency(&s, "erin");
    assert_eq!((st, r["state"].as_str()), (201, Some("active")), "{r}");
    let first = r["id"].as_str().expect("id").to_string();
    // Not countersigned yet: refused, naming the grant and what to do.
    let (st, p) = emergency(&s, "erin");
    assert_eq!(
        (st, p["code"].as_str()),
        (403, Some("emergency_blocked")),
        "{p}"
    );
    let detail = p["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&first) && detail.contains("not countersigned"),
        "{p}"
    );
    // Countersigned: the limit of one open grant still holds.
    assert_eq!(act(&s, "bob", &first, "approve", json!({})).0, 200);
    let (st, p) = emergency(&s, "erin");
    assert_eq!((st, p["code"].as_str()), (403, Some("emergency_blocked")));
    let detail = p["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&first) && detail.contains("open"), "{p}");
    // Released: allowed again while the review is not yet due.
    assert_eq!(
        act(&s, "erin", &first, "revoke", json!({"reason": "fixed"})).0,
        200
    );
    let (st, r) = emergency(&s, "erin");
    assert_eq!(st, 201, "{r}");
    let second = r["id"].as_str().expect("id").to_string();
    assert_eq!(act(&s, "bob", &second, "approve", json!({})).0, 200);
    assert_eq!(
        act(&s, "erin", &second, "revoke", json!({"reason": "fixed"})).0,
        200
    );
    // The first one's review is overdue now.
    std::thread::sleep(Duration::from_millis(2100));
    let (st, p) = emergency(&s, "erin");
    assert_eq!((st, p["code"].as_str()), (403, Some("emergency_blocked")));
    let detail = p["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&first) && detail.contains("overdue"), "{p}");
    for id in [&first, &second] {
        let (st, r) = act(
            &s,
            "carol",
            id,
            "review",
            json!({"outcome": "ok", "notes": "fine"}),
        );
        assert_eq!(st, 200, "{r}");
    }
    let (st, r) = emergency(&s, "erin");
    assert_eq!(st, 201, "{r}");
}

#[test]
fn concurrent_emergency_requests_of_one_principal_admit_one() {
    concurrent_emergency_requests_of_one_principal_admit_one_on(&TestServer::start());
}

#[test]
fn two_nodes_concurrent_emergency_requests_of_one_principal_admit_one() {
    concurrent_emergency_requests_of_one_principal_admit_one_on(&Nodes::start(2));
}

fn concurrent_emergency_requests_of_one_principal_admit_one_on(s: &dyn Api) {
    const RACERS: usize = 8;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(RACERS));
    let outcomes: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..RACERS)
            .map(|_| {
                let barrier = barrier.clone();

                scope.spawn(move || {
                    barrier.wait();
                    emergency(s, "erin").0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("racer"))
            .collect()
    });
    let created = outcomes.iter().filter(|&&st| st == 201).count();
    assert_eq!(created, 1, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|&st| st == 201 || st == 403),
        "{outcomes:?}"
    );
    let (_, list) = s.call("carol", "GET", "/v1/requests?state=active", None);
    let active = list["requests"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|r| r["requester"] == "erin").count());
    assert_eq!(active, 1, "{list}");
}

/// The application over the store of a stopped test server, with `config`,
/// without start-up recovery and without the scheduler: what a credential
/// check sees before anything has caught up.
fn bare_app(
    dir: &std::path::Path,
    config_text: &str,
) -> std::sync::Arc<breakglass_server::app::App> {
    use breakglass_server::config::Config;
    let config = Config::parse(config_text, "config.toml", dir).expect("config");
    let policy = breakglass_server::load_policy(&config).expect("policy");
    let key = breakglass_server::keys::load_or_create(&config.server.data_dir).expect("key");
    let store = breakglass_store::SqliteStore::open(
        &config.db_path(),
        breakglass_store::SqliteOptions::default(),
    )
    .expect("store");
    breakglass_server::app::App::new(
        config,
        std::sync::Arc::new(store),
        policy,
        std::sync::Arc::new(breakglass_server::metrics::Metrics::default()),
        key,
        None,
    )
}

fn grant_token(s: &TestServer, who: &str, id: &str) -> String {
    let (st, c) = s.call(who, "POST", &format!("/v1/requests/{id}/credentials"), None);
    assert_eq!(st, 200, "{c}");
    c["token"].as_str().expect("token").to_string()
}

#[test]
fn a_passed_countersignature_deadline_refuses_credentials_before_the_scheduler_runs() {
    let s = TestServer::start();
    let (st, r) = emergency(&s, "erin");
    assert_eq!(st, 201, "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    let token = grant_token(&s, "erin", &id);
    let config_text = std::fs::read_to_string(&s.config_path).expect("config");
    let dir = s.stop();
    // The countersignature window (2s) passes while nothing runs.
    std::thread::sleep(Duration::from_millis(2200));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let app = bare_app(dir.path(), &config_text);
        let stored = app.store.get(&id).await.expect("get").expect("request");
        assert_eq!(
            stored.state,
            breakglass_core::State::Active,
            "nothing has ended it"
        );
        let refusal = app
            .check_grant(&token, Some("erin"), Some("prod-db"))
            .await
            .expect_err("a grant past its countersignature deadline is dead");
        assert_eq!(
            refusal,
            breakglass_server::app::GrantRefusal::Ended("not_countersigned".into())
        );
        let erin = app
            .authenticate(&common::token("erin"), None)
            .await
            .expect("erin");
        let e = app
            .issue_credentials(&erin, &id, None)
            .await
            .expect_err("no new credentials either");
        assert_eq!(e.status_and_code(), (409, "wrong_state"), "{e}");
    });
}

#[test]
fn credentials_of_a_removed_principal_are_refused_and_ended_at_start() {
    let s = TestServer::start_with(
        tempfile::tempdir().expect("tempdir"),
        "pending_timeout = \"10m\"\n",
    );
    let (st, r) = create(
        &s,
        "alice",
        json!({"target": "drill-db", "role": "read", "duration": "1h", "reason": "drill"}),
    );
    assert_eq!((st, r["state"].as_str()), (201, Some("active")), "{r}");
    let grant = r["id"].as_str().expect("id").to_string();
    let token = grant_token(&s, "alice", &grant);
    let pending = read_req(&s, "alice");
    let other = read_req(&s, "lead");
    let config_text = std::fs::read_to_string(&s.config_path).expect("config");
    let dir = s.stop();
    // alice leaves the config.
    let alice = format!(
        "[[principals]]\nname = \"alice\"\ngroups = [\"oncall\"]\ntoken_sha256 = \"{}\"\n\n",
        breakglass_core::token::sha256_hex(common::token("alice").as_bytes())
    );
    assert!(config_text.contains(&alice));
    let without = config_text.replace(&alice, "");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let app = bare_app(dir.path(), &without);
        // Before anything has ended the grant, the check itself refuses.
        let refusal = app
            .check_grant(&token, None, None)
            .await
            .expect_err("the requester is gone");
        assert_eq!(
            refusal,
            breakglass_server::app::GrantRefusal::RequesterRemoved("alice".into())
        );
        // Start-up recovery ends what alice still had open, and nothing else.
        let recovered = app.scheduler.recover().await.expect("recover");
        assert_eq!(recovered.offboarded, 2);
        let get = |id: String| {
            let app = app.clone();
            async move { app.store.get(&id).await.expect("get").expect("request") }
        };
        let g = get(grant.clone()).await;
        assert_eq!(
            (g.state.as_str(), g.end_reason.map(|r| r.as_str())),
            ("revoked", Some("principal_removed"))
        );
        let p = get(pending.clone()).await;
        assert_eq!(
            (p.state.as_str(), p.end_reason.map(|r| r.as_str())),
            ("cancelled", Some("principal_removed"))
        );
        assert_eq!(get(other).await.state.as_str(), "pending");
        let events = app.store.request_events(&grant, 100).await.expect("events");
        let last = events.last().expect("events");
        assert_eq!(
            (last.actor.as_str(), last.action.as_str()),
            ("system", "request.revoked")
        );
        assert!(
            last.details.contains("principal_removed"),
            "{}",
            last.details
        );
    });
}
