//! The automated review end to end (DESIGN §16): real `psql` sessions
//! through the real PostgreSQL gateway of a real `breakglass serve`, whose
//! recordings are summarised when the grant ends; a grant with nothing
//! flagged is closed as `auto_ok` by the service, one with findings is
//! queued for a person, goes overdue once, and shows in `breakglass
//! reviews`, `show` and `report`.

mod gateway_support;

use std::time::Duration;

use breakglass_testkit::poll;
use gateway_support::{Bg, Grant, GwOptions, psql, upstream};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `sql` through the gateway as the grant's principal.
fn run_sql(bg: &Bg, g: &Grant, sql: &[&str]) {
    let mut args = Vec::new();
    for s in sql {
        args.push("-c");
        args.push(*s);
    }
    // psql stops at the first failing -c unless told otherwise; the
    // statements here run one by one and some fail on purpose.
    let _ = psql(bg.gw_port, &g.principal, &g.token, "pg", &args);
}

fn release(bg: &Bg, g: &Grant) {
    let (st, r) = bg.post(
        &g.principal,
        &format!("/v1/requests/{}/revoke", g.id),
        json!({"reason": "done"}),
    );
    assert_eq!(st, 200, "release: {r}");
}

/// The summary once the automated review recorded it.
fn recorded_summary(bg: &Bg, g: &Grant) -> Value {
    let mut last = Value::Null;
    poll(WAIT, || {
        let (st, v) = bg.get("carol", &format!("/v1/requests/{}/summary", g.id));
        assert_eq!(st, 200, "summary: {v}");
        last = v.clone();
        (v["source"] == "recorded").then_some(())
    })
    .unwrap_or_else(|| panic!("the automated review did not record a summary: {last:#}"));
    last
}

fn rules(summary: &Value) -> Vec<String> {
    summary["summary"]["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["rule"].as_str().expect("rule").to_string())
        .collect()
}

#[test]
fn sessions_are_summarised_and_only_clean_grants_close_as_auto_ok() {
    let up = upstream();
    let mut bg = Bg::start_in(
        tempfile::tempdir().expect("tempdir"),
        &up,
        GwOptions::default(),
        "",
        "\n[review]\ndue_within = \"3s\"\n",
    );

    // A clean grant: reads only.
    let clean = bg.grant("alice", "pg", "scram", "10m");
    run_sql(
        &bg,
        &clean,
        &[
            "select 1",
            "select relname from pg_class order by relname limit 5",
            "begin",
            "show search_path",
            "commit",
        ],
    );
    release(&bg, &clean);
    let s = recorded_summary(&bg, &clean);
    assert_eq!(s["flagged"], json!([]), "{s:#}");
    assert_eq!(rules(&s), Vec::<String>::new(), "{s:#}");
    let sum = &s["summary"];
    assert_eq!(sum["sessions"], 1);
    assert_eq!(sum["statements"]["read"], 3, "{sum:#}");
    assert_eq!(sum["statements"]["transaction"], 2, "{sum:#}");
    assert_eq!(sum["rows_returned"], 6, "1 + 5 rows: {sum:#}");
    assert!(
        sum["bytes_to_client"].as_u64().unwrap_or(0) > 100,
        "{sum:#}"
    );
    let (_, r) = bg.get("carol", &format!("/v1/requests/{}", clean.id));
    assert_eq!(r["review"]["outcome"], "auto_ok", "{r:#}");
    assert_eq!(r["review"]["by"], "system", "{r:#}");

    // A grant that changes things and sends what the parser cannot read.
    let risky = bg.grant("alice", "pg", "rw", "10m");
    run_sql(
        &bg,
        &risky,
        &[
            "create temp table review_t (id int)",
            "insert into review_t select generate_series(1, 7)",
            "delete from review_t",
            "copy (select 1) to stdout",
            "selct 1",
        ],
    );
    release(&bg, &risky);
    let s = recorded_summary(&bg, &risky);
    let found = rules(&s);
    for want in ["ddl", "delete_without_where", "unparsable", "copy_to"] {
        assert!(
            found.iter().any(|f| f == want),
            "{want} in {found:?}: {s:#}"
        );
    }
    let sum = &s["summary"];
    assert_eq!(sum["statements"]["ddl"], 1, "{sum:#}");
    assert_eq!(sum["statements"]["write"], 2, "{sum:#}");
    assert_eq!(sum["statements"]["unparsable"], 1, "{sum:#}");
    assert_eq!(sum["rows_affected"], 14, "7 inserted, 7 deleted: {sum:#}");
    assert!(
        sum["errors"].as_u64().unwrap_or(0) >= 1,
        "the syntax error: {sum:#}"
    );
    assert!(
        s["flagged"]
            .as_array()
            .expect("flagged")
            .iter()
            .any(|f| f == "finding delete_without_where (high)"),
        "{s:#}"
    );
    let (_, r) = bg.get("carol", &format!("/v1/requests/{}", risky.id));
    assert!(r["review"].is_null(), "queued, not closed: {r:#}");
    assert!(r["review_due_at"].is_string(), "{r:#}");

    // The queue: the risky grant only, and overdue once due_within passed.
    let out = bg.cli(Some("carol"), &["reviews", "--output", "json"]);
    let q: Value = serde_json::from_str(&out.ok().stdout).expect("json");
    let ids: Vec<&str> = q["reviews"]
        .as_array()
        .expect("reviews")
        .iter()
        .map(|r| r["request"]["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [risky.id.as_str()], "{q:#}");
    poll(WAIT, || {
        bg.audit()
            .iter()
            .any(|e| e["action"] == "review.overdue" && e["request_id"] == risky.id.as_str())
            .then_some(())
    })
    .expect("review.overdue recorded");
    let overdue: Vec<Value> = bg
        .audit()
        .into_iter()
        .filter(|e| e["action"] == "review.overdue")
        .collect();
    assert_eq!(overdue.len(), 1, "once: {overdue:#?}");
    assert_eq!(overdue[0]["details"]["request_id"], risky.id.as_str());
    assert!(overdue[0]["details"]["due_at"].is_string());
    let out = bg.cli(Some("carol"), &["reviews", "--overdue"]);
    let text = out.ok().stdout.clone();
    assert!(
        text.contains(&risky.id) && text.contains("OVERDUE"),
        "{text}"
    );

    // `show` puts the summary and findings first, the recording one step away.
    let out = bg.cli(Some("carol"), &["show", &risky.id]);
    let text = out.ok().stdout.clone();
    assert!(text.contains("needs a person: yes"), "{text}");
    assert!(text.contains("delete_without_where"), "{text}");
    assert!(text.contains("breakglass recording SESSION_ID"), "{text}");

    // The audit log holds the evidence: who closed what, with the summary.
    let audit = bg.audit();
    let auto = audit
        .iter()
        .find(|e| e["action"] == "request.reviewed" && e["request_id"] == clean.id.as_str())
        .expect("request.reviewed of the clean grant");
    assert_eq!(auto["actor"], "system");
    assert_eq!(auto["details"]["outcome"], "auto_ok");
    assert_eq!(auto["details"]["summary"]["statements"]["read"], 3);
    assert!(
        audit
            .iter()
            .all(|e| !(e["actor"] == "system" && e["details"]["outcome"] == "misuse")),
        "the service never records misuse"
    );

    // The report over both.
    let out = bg.cli(
        Some("carol"),
        &["report", "--since", "1h", "--output", "json"],
    );
    let rep: Value = serde_json::from_str(&out.ok().stdout).expect("json");
    let total = &rep["total"];
    assert_eq!(total["grants"], 2, "{rep:#}");
    assert_eq!(total["emergency_grants"], 0);
    assert_eq!(total["outcomes"]["auto_ok"], 1, "{rep:#}");
    assert_eq!(total["reviews_pending"], 1, "{rep:#}");
    assert_eq!(total["reviews_overdue"], 1, "{rep:#}");
    assert!(total["time_to_access_p50_ms"].is_u64(), "{rep:#}");
    assert!(
        total["top_findings"]
            .as_array()
            .expect("top findings")
            .iter()
            .any(|f| f["rule"] == "delete_without_where" && f["count"] == 1),
        "{rep:#}"
    );
    assert_eq!(rep["teams"][0]["name"], "oncall", "{rep:#}");
    assert_eq!(rep["targets"][0]["name"], "pg", "{rep:#}");
    assert_eq!(rep["policies"][0]["name"], "self-service", "{rep:#}");
    let out = bg.cli(
        Some("carol"),
        &["report", "--since", "1h", "--output", "csv"],
    );
    let csv = out.ok().stdout.clone();
    assert!(csv.starts_with("dimension,name,grants,"), "{csv}");
    assert!(csv.contains("\ntotal,all,2,0,"), "{csv}");
    // Reports cover everyone: admins only.
    let out = bg.cli(Some("alice"), &["report"]);
    assert_eq!(out.code, 3, "refused: {}", out.stderr);

    // After a restart nothing is triaged or marked twice.
    bg.kill9();
    bg.restart_after_kill9(1);
    std::thread::sleep(Duration::from_secs(2));
    let audit = bg.audit();
    let count = |action: &str| audit.iter().filter(|e| e["action"] == action).count();
    assert_eq!(count("review.queued"), 1);
    assert_eq!(count("review.overdue"), 1);
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["action"] == "request.reviewed")
            .count(),
        1
    );
}
