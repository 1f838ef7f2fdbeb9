//! Notifications end to end (DESIGN §13): a real service in this process,
//! real HTTP receivers and a TCP syslog listener on loopback (from the
//! testkit) that verify signatures, count duplicates and can be told to
//! fail, stall or answer 429; and Slack interactions signed like Slack
//! signs them.

mod common;

use std::time::{Duration, Instant};

use breakglass_notify::sign::{slack_signature, verify_webhook, webhook_key};
use breakglass_notify::syslog::{decode_frame, parse_message};
use breakglass_testkit::poll;
use breakglass_testkit::receiver::{Delivery, Mode, Receiver, TcpSink};
use common::TestServer;
use serde_json::{Value, json};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

/// A receiver that checks the Standard Webhooks signature with [`SECRET`].
fn webhook_receiver() -> Receiver {
    let key = webhook_key(SECRET).expect("key");
    Receiver::start(move |d: &Delivery| {
        let (Some(id), Some(ts), Some(sig)) = (
            d.header("webhook-id"),
            d.header("webhook-timestamp").and_then(|t| t.parse().ok()),
            d.header("webhook-signature"),
        ) else {
            return false;
        };
        verify_webhook(&key, id, ts, &d.body, sig)
    })
}

fn hook(name: &str, r: &Receiver, extra: &str) -> String {
    format!(
        "[[notify]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{}\"\nsecret_file = \"hook.secret\"\n{extra}\n",
        r.url("/hook")
    )
}

fn start(extra: &str) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hook.secret"), SECRET).expect("secret");
    std::fs::write(dir.path().join("slack.secret"), SLACK_SECRET).expect("secret");
    TestServer::start_configured(dir, extra, "")
}

fn create(s: &TestServer, who: &str, body: Value) -> String {
    let (status, r) = s.call(who, "POST", "/v1/requests", Some(body));
    assert_eq!(status, 201, "{r}");
    r["id"].as_str().expect("id").to_string()
}

fn read_request(target: &str) -> Value {
    json!({"target": target, "role": "read", "duration": "10m", "reason": "disk full on primary"})
}

/// Waits until `r` has a delivery for which `f` holds.
fn wait_for(r: &Receiver, what: &str, f: impl Fn(&Delivery) -> bool) -> Delivery {
    poll(Duration::from_secs(20), || {
        r.deliveries().into_iter().find(|d| f(d))
    })
    .unwrap_or_else(|| panic!("no delivery: {what}; got {:#?}", r.deliveries()))
}

fn of_type<'a>(ty: &'a str, id: &'a str) -> impl Fn(&Delivery) -> bool + 'a {
    move |d| {
        let v = d.json();
        v["type"] == ty && v["request"]["id"] == id
    }
}

fn audit(s: &TestServer) -> Vec<Value> {
    let (status, page) = s.call("dave", "GET", "/v1/audit?after=0&limit=10000", None);
    assert_eq!(status, 200, "{page}");
    page["events"].as_array().expect("events").clone()
}

#[test]
fn every_event_kind_reaches_the_right_sinks_signed() {
    let prod = webhook_receiver();
    let drills = webhook_receiver();
    let emergencies = webhook_receiver();
    let siem = TcpSink::start();
    let s = start(&format!(
        "{}{}{}[[notify]]\nname = \"siem\"\nkind = \"syslog\"\naddress = \"{}\"\n",
        hook("prod", &prod, "target_groups = [\"production\"]"),
        hook("drills", &drills, "target_groups = [\"drills\"]"),
        hook("emergencies", &emergencies, "emergency = true"),
        siem.addr
    ));

    // A new request: its eligible approvers, with the count missing.
    let id = create(&s, "alice", read_request("prod-db"));
    let d = wait_for(&prod, "request.created", of_type("request.created", &id));
    let v = d.json();
    assert!(d.signature_ok, "signed with the secret");
    assert_eq!(v["audience"], "approvers");
    assert_eq!(v["request"]["approvals_missing"], 1);
    assert_eq!(v["approvers"], json!(["bob", "carol", "lead"]));
    assert_eq!(v["urgency"], "normal");
    assert!(
        v["summary"]
            .as_str()
            .expect("summary")
            .contains("alice asks for read on prod-db"),
        "{v}"
    );
    assert_eq!(v["command"], format!("breakglass approve {id}"));
    assert_eq!(d.header("webhook-id"), Some(v["seq"].to_string().as_str()));
    assert_eq!(d.header("content-type"), Some("application/json"));

    // A decision: the requester.
    let (status, _) = s.call(
        "bob",
        "POST",
        &format!("/v1/requests/{id}/approve"),
        Some(json!({})),
    );
    assert_eq!(status, 200);
    let v = wait_for(&prod, "activation", of_type("request.activated", &id)).json();
    assert_eq!(v["audience"], "requester");
    assert_eq!(v["request"]["requester"], "alice");
    // A grant credential is issued: its token reaches no sink.
    let (status, cred) = s.call(
        "alice",
        "POST",
        &format!("/v1/requests/{id}/credentials"),
        None,
    );
    assert_eq!(status, 200, "{cred}");
    let grant_token = cred["token"].as_str().expect("token").to_string();

    // A denial reaches the requester too.
    let denied = create(&s, "alice", read_request("prod-db"));
    let (status, _) = s.call(
        "carol",
        "POST",
        &format!("/v1/requests/{denied}/deny"),
        Some(json!({"reason": "use the replica"})),
    );
    assert_eq!(status, 200);
    let v = wait_for(&prod, "denial", of_type("request.denied", &denied)).json();
    assert!(
        v["summary"]
            .as_str()
            .expect("summary")
            .contains("use the replica")
    );

    // An emergency activation: every eligible approver, loudly, and the
    // emergency-only sink; then the countersignature reminder.
    let em = create(
        &s,
        "erin",
        json!({"target": "prod-db", "role": "admin", "duration": "5m", "reason": "outage", "emergency": true}),
    );
    for r in [&prod, &emergencies] {
        let v = wait_for(r, "emergency activation", of_type("request.activated", &em)).json();
        assert_eq!(v["urgency"], "high");
        assert_eq!(v["audience"], "approvers");
        assert!(
            v["summary"]
                .as_str()
                .expect("summary")
                .starts_with("EMERGENCY")
        );
    }
    let v = wait_for(
        &prod,
        "countersign reminder",
        of_type("request.countersign_due", &em),
    )
    .json();
    assert_eq!(v["urgency"], "high");
    assert!(
        emergencies
            .deliveries()
            .iter()
            .all(|d| d.json()["request"]["emergency"] == true),
        "the emergency sink gets emergencies only"
    );

    // A drill target's request goes to the drills sink only.
    let drill = create(&s, "alice", read_request("drill-db"));
    wait_for(
        &drills,
        "drill activation",
        of_type("request.activated", &drill),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        prod.deliveries()
            .iter()
            .all(|d| d.json()["request"]["id"] != drill),
        "target_groups filters"
    );
    assert!(
        drills
            .deliveries()
            .iter()
            .all(|d| d.json()["request"]["target"] == "drill-db"),
        "target_groups filters"
    );

    // Every delivery verified, none twice, no token anywhere.
    for r in [&prod, &drills, &emergencies] {
        assert!(r.deliveries().iter().all(|d| d.signature_ok));
        assert!(
            r.counts_by_id().values().all(|n| *n == 1),
            "{:?}",
            r.counts_by_id()
        );
        for d in r.deliveries() {
            let text = String::from_utf8_lossy(&d.body).to_string();
            assert!(
                !text.contains(&grant_token) && !text.contains("token-"),
                "{text}"
            );
        }
    }
    let events = audit(&s);
    let last = events.last().expect("events")["seq"].as_u64().expect("seq");
    drop(s);

    // Syslog: every audit event from the sink's start, in order, each in
    // a well-formed RFC 5424 message with octet-counting framing.
    let mut seqs = Vec::new();
    let got = poll(Duration::from_secs(10), || {
        let bytes = siem.bytes();
        let mut at = 0;
        seqs.clear();
        while let Some((msg, used)) = decode_frame(&bytes[at..]).expect("frame") {
            at += used;
            let m = parse_message(&msg).expect("RFC 5424");
            assert_eq!(m.app_name, "breakglass");
            let body: Value = serde_json::from_str(&m.msg).expect("json");
            assert_eq!(body["action"], m.msgid);
            seqs.push(body["seq"].as_u64().expect("seq"));
        }
        assert_eq!(at, bytes.len(), "no trailing garbage");
        seqs.contains(&last).then_some(())
    });
    assert!(got.is_some(), "syslog got up to seq {last}: {seqs:?}");
    let all = String::from_utf8_lossy(&siem.bytes()).to_string();
    assert!(all.contains("credentials.issued"), "syslog has every event");
    assert!(!all.contains(&grant_token), "no token in the SIEM feed");
    // One connection per event: the receiver's threads may finish reading
    // them out of order, so check that none is missing or repeated.
    seqs.sort_unstable();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous: {seqs:?}"
    );
}

#[test]
fn retries_with_backoff_then_gives_up_with_notify_failed() {
    let flaky = webhook_receiver();
    let dead = webhook_receiver();
    let gone = webhook_receiver();
    flaky.set_mode(Mode::TooMany);
    dead.set_mode(Mode::Status(503));
    gone.set_mode(Mode::Status(404));
    let s = start(&format!(
        "{}{}{}",
        hook("flaky", &flaky, ""),
        hook("dead", &dead, "give_up_after = \"3s\""),
        hook("gone", &gone, ""),
    ));
    let id = create(&s, "alice", read_request("prod-db"));

    // 429 then recovery: delivered once, late.
    poll(Duration::from_secs(10), || {
        (flaky.refused() >= 2).then_some(())
    })
    .expect("the 429 sink is retried");
    flaky.set_mode(Mode::Ok);
    let d = wait_for(&flaky, "after 429", of_type("request.created", &id));
    assert!(d.signature_ok);

    // 503 until give_up_after: notify.failed, then the next event flows.
    let failed = poll(Duration::from_secs(15), || {
        audit(&s)
            .into_iter()
            .find(|e| e["action"] == "notify.failed" && e["details"]["sink"] == "dead")
    })
    .expect("notify.failed for the dead sink");
    assert!(dead.refused() >= 2, "retried before giving up");
    assert!(failed["details"]["attempts"].as_u64().expect("attempts") >= 2);
    assert_eq!(failed["details"]["action"], "request.created");
    assert_eq!(failed["details"]["error"], "HTTP 503");

    // A 404 is not retried.
    let gone_failed = poll(Duration::from_secs(10), || {
        audit(&s)
            .into_iter()
            .find(|e| e["action"] == "notify.failed" && e["details"]["sink"] == "gone")
    })
    .expect("notify.failed for the 404 sink");
    assert_eq!(gone_failed["details"]["attempts"], 1);
    // Each event the 404 sink gets (the others' notify.failed too) is
    // tried once and given up once.
    poll(Duration::from_secs(10), || {
        let given_up: Vec<Value> = audit(&s)
            .into_iter()
            .filter(|e| e["action"] == "notify.failed" && e["details"]["sink"] == "gone")
            .collect();
        assert!(given_up.iter().all(|e| e["details"]["attempts"] == 1));
        (gone.refused() == given_up.len() as u64).then_some(())
    })
    .expect("one attempt per event for a 404");

    // The healthy sink hears of the others' failures; none of them of its own.
    wait_for(&flaky, "notify.failed of dead", |d| {
        d.json()["type"] == "notify.failed" && d.json()["details"]["sink"] == "dead"
    });
    dead.set_mode(Mode::Ok);
    let (status, _) = s.call("alice", "POST", &format!("/v1/requests/{id}/cancel"), None);
    assert_eq!(status, 200);
    let id2 = create(&s, "alice", read_request("prod-db"));
    wait_for(
        &dead,
        "the next event after giving up",
        of_type("request.created", &id2),
    );
    assert!(
        dead.deliveries()
            .iter()
            .all(|d| d.json()["details"]["sink"] != "dead"),
        "a sink is not told about its own failures"
    );

    // Status shows the failures, to admins only.
    let (status, st) = s.call("dave", "GET", "/v1/notify/status", None);
    assert_eq!(status, 200, "{st}");
    let dead_st = st["sinks"]
        .as_array()
        .expect("sinks")
        .iter()
        .find(|x| x["name"] == "dead")
        .expect("dead sink")
        .clone();
    assert_eq!(dead_st["failed"], 1, "{st}");
    assert_eq!(dead_st["kind"], "webhook");
    let (status, _) = s.call("alice", "GET", "/v1/notify/status", None);
    assert_eq!(status, 403);
}

#[test]
fn a_webhook_sink_with_max_in_flight_delivers_several_at_once_and_passes_none_unfinished() {
    let serial = webhook_receiver();
    serial.set_mode(Mode::Slow(200));
    let wide = webhook_receiver();
    wide.set_mode(Mode::Slow(200));
    let s = start(&format!(
        "{}{}",
        hook("serial", &serial, ""),
        hook("wide", &wide, "max_in_flight = 4"),
    ));
    let ids: Vec<String> = (0..12)
        .map(|_| create(&s, "alice", read_request("prod-db")))
        .collect();
    // Twelve deliveries of 200 ms, at most four at once, take at least
    // 600 ms: the cursor must not have passed them yet.
    let (_, st) = s.call("dave", "GET", "/v1/notify/status", None);
    let wide_lag = st["sinks"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "wide"))
        .and_then(|x| x["lag"].as_u64());
    assert!(
        wide_lag.is_some_and(|n| n >= 1),
        "the cursor passed deliveries still in flight: {st}"
    );
    for id in &ids {
        wait_for(&wide, "creation (wide)", of_type("request.created", id));
        wait_for(&serial, "creation (serial)", of_type("request.created", id));
    }
    let most = wide.most_in_flight();
    assert!(
        (2..=4).contains(&most),
        "wide had {most} deliveries in flight at most"
    );
    assert_eq!(serial.most_in_flight(), 1, "the default delivers in order");
    for r in [&serial, &wide] {
        let twice: Vec<_> = r
            .counts_by_id()
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .collect();
        assert!(twice.is_empty(), "delivered twice: {twice:?}");
        assert!(r.deliveries().iter().all(|d| d.signature_ok));
    }
    // The serial sink got them in the order they happened.
    let order: Vec<String> = serial
        .deliveries()
        .iter()
        .map(|d| d.json())
        .filter(|v| v["type"] == "request.created")
        .map(|v| v["request"]["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(order, ids);
    // Both cursors reach the head once every delivery has finished.
    poll(Duration::from_secs(20), || {
        let (_, st) = s.call("dave", "GET", "/v1/notify/status", None);
        st["sinks"]
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["lag"] == 0))
            .then_some(())
    })
    .expect("both sinks caught up");
}

#[test]
fn a_hanging_sink_delays_neither_transitions_nor_other_sinks() {
    let stuck = webhook_receiver();
    stuck.set_mode(Mode::Stall);
    let ok = webhook_receiver();
    let s = start(&format!(
        "{}{}",
        hook("stuck", &stuck, "timeout = \"30s\""),
        hook("ok", &ok, ""),
    ));
    let mut ids = Vec::new();
    let started = Instant::now();
    for _ in 0..10 {
        let id = create(&s, "alice", read_request("prod-db"));
        let (status, _) = s.call(
            "bob",
            "POST",
            &format!("/v1/requests/{id}/approve"),
            Some(json!({})),
        );
        assert_eq!(status, 200);
        ids.push(id);
    }
    // The stuck sink holds its first delivery for 30 s; had transitions or
    // the other sink waited for it, this would take minutes.
    for id in &ids {
        wait_for(&ok, "activation", of_type("request.activated", id));
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "transitions and the healthy sink did not wait for the stuck one ({:?})",
        started.elapsed()
    );
    assert!(
        stuck.deliveries().is_empty(),
        "the stuck sink never answered"
    );
    let (_, st) = s.call("dave", "GET", "/v1/notify/status", None);
    let lag = |name: &str| {
        st["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .find(|x| x["name"] == name)
            .expect("sink")["lag"]
            .as_u64()
            .expect("lag")
    };
    assert!(lag("stuck") >= 20, "the stuck sink lags: {st}");
}

#[test]
fn notify_test_reports_the_answer_and_is_audited() {
    let r = webhook_receiver();
    let down = webhook_receiver();
    down.set_mode(Mode::Status(500));
    let s = start(&format!(
        "public_url = \"https://bg.example.com/\"\n{}{}",
        hook("hook", &r, ""),
        hook("down", &down, ""),
    ));
    let (status, out) = s.call("dave", "POST", "/v1/notify/hook/test", None);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["delivered"], true);
    assert_eq!(out["status"], 200);
    let d = wait_for(&r, "test", |d| d.json()["type"] == "notify.test");
    assert!(d.signature_ok);
    assert!(d.header("webhook-id").expect("id").starts_with("test-"));

    let (status, out) = s.call("dave", "POST", "/v1/notify/down/test", None);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["delivered"], false);
    assert_eq!(out["status"], 500);
    assert_eq!(out["error"], "HTTP 500");

    let (status, out) = s.call("dave", "POST", "/v1/notify/nope/test", None);
    assert_eq!(status, 404);
    assert!(
        out["detail"]
            .as_str()
            .expect("detail")
            .contains("hook, down")
    );
    let (status, _) = s.call("alice", "POST", "/v1/notify/hook/test", None);
    assert_eq!(status, 403);
    let tested: Vec<_> = audit(&s)
        .into_iter()
        .filter(|e| e["action"] == "notify.tested")
        .collect();
    assert_eq!(tested.len(), 2);
    assert_eq!(tested[0]["actor"], "dave");

    // With server.public_url, messages link to the console.
    let id = create(&s, "alice", read_request("prod-db"));
    let v = wait_for(&r, "created", of_type("request.created", &id)).json();
    assert_eq!(v["link"], format!("https://bg.example.com/requests/{id}"));
}

#[test]
fn pagerduty_triggers_on_emergency_and_resolves_on_countersign() {
    let pd = Receiver::start(|_| true);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("pd.key"),
        "R0UT1NGKEY0123456789abcdefABCDEF",
    )
    .expect("key");
    let s = TestServer::start_configured(
        dir,
        &format!(
            "[[notify]]\nname = \"pager\"\nkind = \"pagerduty\"\nurl = \"{}\"\nrouting_key_file = \"pd.key\"\n",
            pd.url("/v2/enqueue")
        ),
        "",
    );
    // An ordinary request does not page.
    let ordinary = create(&s, "alice", read_request("prod-db"));
    let em = create(
        &s,
        "erin",
        json!({"target": "prod-db", "role": "admin", "duration": "5m", "reason": "outage", "emergency": true}),
    );
    let trigger = wait_for(&pd, "trigger", |d| d.json()["event_action"] == "trigger").json();
    assert_eq!(trigger["dedup_key"], em.as_str());
    assert_eq!(trigger["routing_key"], "R0UT1NGKEY0123456789abcdefABCDEF");
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(trigger["payload"]["source"], "breakglass");
    assert!(
        trigger["payload"]["summary"]
            .as_str()
            .expect("summary")
            .contains("EMERGENCY")
    );
    let (status, r) = s.call(
        "bob",
        "POST",
        &format!("/v1/requests/{em}/approve"),
        Some(json!({})),
    );
    assert_eq!(status, 200, "{r}");
    let resolve = wait_for(&pd, "resolve", |d| d.json()["event_action"] == "resolve").json();
    assert_eq!(resolve["dedup_key"], em.as_str());
    assert!(
        pd.deliveries()
            .iter()
            .all(|d| d.json()["dedup_key"] != ordinary.as_str()),
        "no page for an ordinary request"
    );
}

#[test]
fn a_webhook_witness_receives_every_checkpoint_signed() {
    let w = webhook_receiver();
    let s = start(&hook(
        "witness",
        &w,
        "witness = true\nevents = [\"notify.test\"]",
    ));
    let id = create(&s, "alice", read_request("prod-db"));
    let (status, _) = s.call(
        "bob",
        "POST",
        &format!("/v1/requests/{id}/approve"),
        Some(json!({})),
    );
    assert_eq!(status, 200);
    let head = audit(&s).last().expect("events")["seq"]
        .as_u64()
        .expect("seq");
    let d = wait_for(&w, "a checkpoint at the head", |d| {
        d.json()["type"] == "audit.checkpoint"
            && d.json()["checkpoint"]["seq"]
                .as_u64()
                .is_some_and(|seq| seq >= head)
    });
    assert!(d.signature_ok);
    assert!(
        d.header("webhook-id")
            .expect("id")
            .starts_with("checkpoint-")
    );
    assert!(
        d.json()["checkpoint"]["signature"].is_string(),
        "{}",
        d.json()
    );
    // Verification still passes: a witness that only receives is not read back.
    let (status, report) = s.call("dave", "GET", "/v1/audit/verify", None);
    assert_eq!(status, 200, "{report}");
}

/// Slack: a Block Kit message with buttons, and the actions route with
/// the lifecycle's rules.
mod slack {
    use super::*;

    fn slack_principals() -> String {
        let p = |name: &str, groups: &str, user: &str| {
            format!(
                "[[principals]]\nname = \"{name}\"\ngroups = [{groups}]\ntoken_sha256 = \"{}\"\nslack_user = \"{user}\"\n",
                breakglass_core::token::sha256_hex(format!("token-{name}").as_bytes())
            )
        };
        [
            p("sam", "\"sre-leads\"", "U0SAM"),
            p("rita", "\"oncall\", \"sre-leads\"", "U0RITA"),
            p("otto", "", "U0OTTO"),
        ]
        .concat()
    }

    fn start_slack(chat: &Receiver) -> TestServer {
        std::fs::create_dir_all("/tmp").ok();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("slack.url"), chat.url("/services/T0/B0/x")).expect("url");
        std::fs::write(dir.path().join("slack.secret"), SLACK_SECRET).expect("secret");
        TestServer::start_configured(
            dir,
            &format!(
                "[[notify]]\nname = \"chat\"\nkind = \"slack\"\nurl_file = \"slack.url\"\ninteractive = true\n\
                 [integrations.slack]\nsigning_secret_file = \"slack.secret\"\nresponse_url_prefix = \"{}\"\n{}",
                chat.url("/"),
                slack_principals()
            ),
            "",
        )
    }

    /// POSTs an interaction as Slack would, signed at `ts` (or with `sig`).
    fn interact(s: &TestServer, body: &str, ts: i64, sig: Option<&str>) -> (u16, String) {
        let ts = ts.to_string();
        let good = slack_signature(SLACK_SECRET.as_bytes(), &ts, body.as_bytes());
        let resp = common::agent()
            .post(&format!("{}/v1/integrations/slack/actions", s.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", &ts)
            .header("x-slack-signature", sig.unwrap_or(&good))
            .send(body.to_string());
        let mut resp = resp.expect("call");
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    fn click(user: &str, action: &str, id: &str, response_url: &str) -> String {
        let payload = json!({
            "type": "block_actions",
            "user": {"id": user, "username": user},
            "actions": [{"action_id": action, "value": id, "type": "button"}],
            "response_url": response_url,
        });
        form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &payload.to_string())
            .finish()
    }

    fn now_s() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    }

    fn state(s: &TestServer, id: &str) -> String {
        let (_, r) = s.call("dave", "GET", &format!("/v1/requests/{id}"), None);
        r["state"].as_str().expect("state").to_string()
    }

    #[test]
    fn approve_from_slack_with_the_lifecycle_rules() {
        let chat = Receiver::start(|_| true);
        let s = start_slack(&chat);
        let id = create(&s, "alice", read_request("prod-db"));

        // The message: who, what, why, how long, what is missing, buttons.
        let msg = wait_for(&chat, "Block Kit message", |d| {
            d.path == "/services/T0/B0/x" && d.json()["blocks"].to_string().contains(&id)
        })
        .json();
        let text = msg["blocks"].to_string();
        for want in [
            "alice",
            "read on prod-db",
            "10m",
            "1 approval missing",
            "disk full on primary",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(text.contains("breakglass_approve") && text.contains("breakglass_deny"));
        assert!(
            text.contains(&format!("breakglass approve {id}")),
            "CLI command without public_url"
        );

        // An outsider is refused; the request stays pending.
        let respond = chat.url("/respond/1");
        let (status, _) = interact(
            &s,
            &click("U0OTTO", "breakglass_approve", &id, &respond),
            now_s(),
            None,
        );
        assert_eq!(status, 200);
        let upd = wait_for(&chat, "outsider outcome", |d| d.path == "/respond/1").json();
        assert_eq!(upd["replace_original"], true);
        assert!(upd.to_string().contains("refused"), "{upd}");
        assert_eq!(state(&s, &id), "pending");

        // Self-approval is refused.
        let own = create(&s, "rita", read_request("prod-db"));
        let respond = chat.url("/respond/2");
        let (status, _) = interact(
            &s,
            &click("U0RITA", "breakglass_approve", &own, &respond),
            now_s(),
            None,
        );
        assert_eq!(status, 200);
        let upd = wait_for(&chat, "self outcome", |d| d.path == "/respond/2").json();
        assert!(upd.to_string().contains("cannot approve"), "{upd}");
        assert_eq!(state(&s, &own), "pending");

        // An unknown Slack user is told how to link.
        let respond = chat.url("/respond/3");
        interact(
            &s,
            &click("U0NOBODY", "breakglass_approve", &id, &respond),
            now_s(),
            None,
        );
        let upd = wait_for(&chat, "unknown user", |d| d.path == "/respond/3").json();
        assert!(upd.to_string().contains("slack_user"), "{upd}");

        // An eligible approver approves; the message is replaced.
        let respond = chat.url("/respond/4");
        let body = click("U0SAM", "breakglass_approve", &id, &respond);
        let ts = now_s();
        let (status, _) = interact(&s, &body, ts, None);
        assert_eq!(status, 200);
        let upd = wait_for(&chat, "approval outcome", |d| d.path == "/respond/4").json();
        assert!(upd.to_string().contains("approved by sam"), "{upd}");
        assert!(
            !upd.to_string().contains("breakglass_approve"),
            "no buttons after"
        );
        assert_eq!(state(&s, &id), "active");

        // Replayed, forged, stale and unsigned calls are refused and audited.
        let (status, _) = interact(&s, &body, ts, None);
        assert_eq!(status, 401, "replay");
        let (status, _) = interact(&s, &body, now_s(), Some("v0=00ff"));
        assert_eq!(status, 401, "forged");
        let (status, _) = interact(&s, &body, now_s() - 301, None);
        assert_eq!(status, 401, "stale");
        let resp = common::agent()
            .post(&format!("{}/v1/integrations/slack/actions", s.url))
            .send(body.clone())
            .expect("call");
        assert_eq!(resp.status().as_u16(), 401, "unsigned");
        let reasons: Vec<String> = audit(&s)
            .into_iter()
            .filter(|e| e["action"] == "slack.refused")
            .map(|e| e["details"]["reason"].as_str().expect("reason").to_string())
            .collect();
        assert_eq!(
            reasons,
            ["replayed", "bad signature", "stale timestamp", "unsigned"]
        );
        let approvals: Vec<_> = audit(&s)
            .into_iter()
            .filter(|e| e["action"] == "request.approved" && e["request_id"] == id)
            .collect();
        assert_eq!(approvals.len(), 1, "the replay approved nothing");
        assert_eq!(approvals[0]["actor"], "sam");

        // Deny from Slack.
        let other = create(&s, "alice", read_request("prod-db"));
        let respond = chat.url("/respond/5");
        interact(
            &s,
            &click("U0SAM", "breakglass_deny", &other, &respond),
            now_s(),
            None,
        );
        wait_for(&chat, "deny outcome", |d| d.path == "/respond/5");
        assert_eq!(state(&s, &other), "denied");
    }

    #[test]
    fn fresh_authentication_gets_a_console_link_instead() {
        let chat = Receiver::start(|_| true);
        let policy = common::POLICY.replace(
            "@id(\"read\")\n@approvals(\"1\")",
            "@id(\"read\")\n@approvals(\"1\")\n@approver_fresh_auth(\"5m\")",
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("slack.url"), chat.url("/services/x")).expect("url");
        std::fs::write(dir.path().join("slack.secret"), SLACK_SECRET).expect("secret");
        let s = TestServer::start_with_policy(
            dir,
            &format!(
                "public_url = \"https://bg.example.com\"\n[[notify]]\nname = \"chat\"\nkind = \"slack\"\nurl_file = \"slack.url\"\ninteractive = true\n\
                 [integrations.slack]\nsigning_secret_file = \"slack.secret\"\nresponse_url_prefix = \"{}\"\n{}",
                chat.url("/"),
                slack_principals()
            ),
            &policy,
        );
        let id = create(&s, "alice", read_request("prod-db"));
        let respond = chat.url("/respond/fresh");
        let (status, _) = interact(
            &s,
            &click("U0SAM", "breakglass_approve", &id, &respond),
            now_s(),
            None,
        );
        assert_eq!(status, 200);
        let upd = wait_for(&chat, "fresh auth outcome", |d| d.path == "/respond/fresh").json();
        assert!(
            upd.to_string()
                .contains(&format!("https://bg.example.com/requests/{id}")),
            "{upd}"
        );
        assert_eq!(state(&s, &id), "pending");
    }

    #[test]
    fn an_identity_provider_person_approves_from_slack_by_verified_email() {
        use breakglass_testkit::oidc::{CLIENT_ID, OidcProvider};
        let op = OidcProvider::start().expect("provider");
        let chat = Receiver::start(|_| true);
        // Slack's Web API: users.info answers with the user's e-mail.
        let slack_api = Receiver::start(|_| true);
        slack_api.set_answer(&json!({
            "ok": true,
            "user": {"id": "U0BOB", "profile": {"email": "Bob@Example.com"}}
        }));
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("slack.url"), chat.url("/services/T0/B0/x")).expect("url");
        std::fs::write(dir.path().join("slack.secret"), SLACK_SECRET).expect("secret");
        std::fs::write(dir.path().join("slack.bot"), "xoxb-test-bot-token").expect("bot");
        let s = TestServer::start_configured(
            dir,
            &format!(
                "[identity.oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n\
                 [[notify]]\nname = \"chat\"\nkind = \"slack\"\nurl_file = \"slack.url\"\ninteractive = true\n\
                 [integrations.slack]\nsigning_secret_file = \"slack.secret\"\nresponse_url_prefix = \"{}\"\n\
                 bot_token_file = \"slack.bot\"\napi_url = \"{}\"\n{}",
                op.issuer(),
                chat.url("/"),
                slack_api.url("/api"),
                slack_principals()
            ),
            "",
        );
        let id = create(&s, "alice", read_request("prod-db"));

        // Bob has not shown breakglass an ID token yet: nobody to act as.
        let respond = chat.url("/respond/idp-1");
        let body = click("U0BOB", "breakglass_approve", &id, &respond);
        let (status, _) = interact(&s, &body, now_s(), None);
        assert_eq!(status, 200);
        let upd = wait_for(&chat, "not signed in", |d| d.path == "/respond/idp-1").json();
        assert!(
            upd.to_string()
                .contains("Bob@Example.com has not signed in"),
            "{upd}"
        );
        assert_eq!(state(&s, &id), "pending");
        let asked = slack_api.deliveries();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert_eq!(asked[0].path, "/api/users.info");
        assert_eq!(
            asked[0].header("authorization"),
            Some("Bearer xoxb-test-bot-token")
        );
        assert_eq!(String::from_utf8_lossy(&asked[0].body), "user=U0BOB");

        // Bob signs in with the identity provider (any API call with his ID
        // token); his next click acts as him, with his groups. E-mails
        // match whatever their case.
        let bob = op.id_token("bob").expect("bob logs in");
        let (status, me) = common::call_raw(&s.url, Some(&bob), "GET", "/v1/whoami", None);
        assert_eq!(status, 200, "{me}");
        let respond = chat.url("/respond/idp-2");
        let body = click("U0BOB", "breakglass_approve", &id, &respond);
        let (status, _) = interact(&s, &body, now_s() - 1, None);
        assert_eq!(status, 200);
        let upd = wait_for(&chat, "approved by bob", |d| d.path == "/respond/idp-2").json();
        assert!(upd.to_string().contains("approved by bob"), "{upd}");
        assert_eq!(state(&s, &id), "active");
        let (_, r) = s.call("dave", "GET", &format!("/v1/requests/{id}"), None);
        assert_eq!(r["approvals"][0]["by"], "bob", "{r}");

        // Another Slack user whose e-mail is nobody's: refused, with why.
        slack_api.set_answer(&json!({
            "ok": true,
            "user": {"id": "U0EVE", "profile": {"email": "eve@example.com"}}
        }));
        let other = create(&s, "alice", read_request("prod-db"));
        let respond = chat.url("/respond/idp-3");
        let body = click("U0EVE", "breakglass_approve", &other, &respond);
        interact(&s, &body, now_s(), None);
        let upd = wait_for(&chat, "eve refused", |d| d.path == "/respond/idp-3").json();
        assert!(
            upd.to_string()
                .contains("eve@example.com has not signed in"),
            "{upd}"
        );
        assert_eq!(state(&s, &other), "pending");
    }
}
