//! Notifications with the real binary: a `kill -9` in the middle of
//! deliveries loses nothing (the events after the saved cursor are sent
//! again after the restart, with the same `webhook-id`), and the
//! `notify status` / `notify test` verbs.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use breakglass_notify::sign::{verify_webhook, webhook_key};
use breakglass_testkit::receiver::{Delivery, Mode, Receiver};
use common::{Api, Server, Setup, poll};
use serde_json::json;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn receiver() -> Receiver {
    let key = webhook_key(SECRET).expect("key");
    Receiver::start(move |d: &Delivery| {
        match (
            d.header("webhook-id"),
            d.header("webhook-timestamp").and_then(|t| t.parse().ok()),
            d.header("webhook-signature"),
        ) {
            (Some(id), Some(ts), Some(sig)) => verify_webhook(&key, id, ts, &d.body, sig),
            _ => false,
        }
    })
}

fn setup(r: &Receiver) -> Setup {
    let mut s = Setup::new();
    std::fs::write(s.path().join("hook.secret"), SECRET).expect("secret");
    s.server_extra.push_str(&format!(
        "[[notify]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\nsecret_file = \"hook.secret\"\ntimeout = \"20s\"\n",
        r.url("/hook")
    ));
    s.write_config();
    s
}

fn create(api: &Api) -> String {
    let (status, r) = api.post(
        "alice",
        "/v1/requests",
        Some(
            json!({"target": "prod-db", "role": "read", "duration": "10m", "reason": "disk full"}),
        ),
    );
    assert_eq!(status, 201, "{r}");
    r["id"].as_str().expect("id").to_string()
}

/// The request ids of the `request.created` deliveries so far.
fn created_ids(r: &Receiver) -> BTreeSet<String> {
    r.deliveries()
        .iter()
        .map(|d| d.json())
        .filter(|v| v["type"] == "request.created")
        .filter_map(|v| v["request"]["id"].as_str().map(String::from))
        .collect()
}

#[test]
fn kill_9_mid_delivery_loses_no_notification() {
    let r = receiver();
    let setup = setup(&r);
    let mut server = Server::start(&setup);
    let api = Api::new(&setup.url());

    let mut ids: Vec<String> = (0..5).map(|_| create(&api)).collect();
    poll(Duration::from_secs(20), || {
        (created_ids(&r).len() == 5).then_some(())
    })
    .expect("the first five are delivered");

    // The receiver stops answering: the next deliveries hang in flight
    // when the service is killed.
    r.set_mode(Mode::Stall);
    ids.extend((0..5).map(|_| create(&api)));
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();

    r.set_mode(Mode::Ok);
    let _server = Server::start(&setup);
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    let got = poll(Duration::from_secs(30), || {
        let got = created_ids(&r);
        (got == want).then_some(got)
    });
    assert_eq!(
        got,
        Some(want),
        "every request.created reached the receiver"
    );

    // Redeliveries carry the same id and the same event; every one signed.
    for d in r.deliveries() {
        assert!(d.signature_ok, "signed");
        assert_eq!(
            d.header("webhook-id").map(String::from),
            Some(d.json()["seq"].to_string()),
            "webhook-id is the event's seq"
        );
    }
    let seqs: Vec<u64> = api
        .all_audit("dave")
        .iter()
        .filter(|e| e["action"] == "request.created")
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    let counts = r.counts_by_id();
    for seq in seqs {
        assert!(
            counts.get(&seq.to_string()).is_some_and(|n| *n >= 1),
            "seq {seq} delivered"
        );
    }
}

#[test]
fn notify_status_and_test_verbs() {
    let r = receiver();
    let setup = setup(&r);
    let _server = Server::start(&setup);

    let out = setup.cli(Some("dave"), &["notify", "test", "hook"]);
    out.expect_code(0);
    assert!(out.stdout.contains("hook: delivered (HTTP 200"), "{out:?}");
    poll(Duration::from_secs(10), || {
        r.deliveries()
            .iter()
            .any(|d| d.json()["type"] == "notify.test" && d.signature_ok)
            .then_some(())
    })
    .expect("the test message arrived, signed");

    r.set_mode(Mode::Status(503));
    let out = setup.cli(Some("dave"), &["notify", "test", "hook"]);
    out.expect_code(1);
    assert!(out.stdout.contains("NOT delivered (HTTP 503"), "{out:?}");

    let out = setup.cli(Some("dave"), &["--output", "json", "notify", "status"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["sinks"][0]["name"], "hook");
    assert_eq!(v["sinks"][0]["kind"], "webhook");
    assert!(v["sinks"][0]["cursor"].as_u64().is_some());
    let out = setup.cli(Some("dave"), &["notify", "status"]);
    out.expect_code(0);
    assert!(out.stdout.starts_with("SINK"), "{out:?}");

    setup
        .cli(Some("alice"), &["notify", "status"])
        .expect_code(3);
    setup
        .cli(Some("dave"), &["notify", "test", "nope"])
        .expect_code(1);
    setup
        .cli(Some("dave"), &["notify", "test", "../x"])
        .expect_code(2);
}
