//! The `review` benchmark (DESIGN §16): summarising a 100,000-statement
//! PostgreSQL recording, against reading (and verifying) the same recording
//! without classifying it; and `GET /v1/reports?since=30d` over a store of
//! 100,000 grants (target: under 2 s).

use std::time::Instant;

use breakglass_core::Timestamp;
use breakglass_gateway_postgres::recording::{Field, Recorder, read_recording};
use breakglass_review::RuleSet;
use breakglass_review::summary::summarise_postgres_recording;
use serde_json::json;

use crate::scenarios::Ctx;
use crate::server::{AUDITOR, Client};
use crate::stats::{Goal, Row, Samples, fmt_secs};

/// A day's mix of statements an operator sends, in the order they repeat.
const STATEMENTS: [(&str, &str); 10] = [
    ("select * from orders where id = 42", "SELECT 1"),
    (
        "select count(*) from orders where created_at > now() - interval '1 day'",
        "SELECT 1",
    ),
    ("begin", "BEGIN"),
    (
        "update orders set state = 'shipped' where id = 42",
        "UPDATE 1",
    ),
    (
        "insert into audit_notes (order_id, note) values (42, 'manual fix')",
        "INSERT 0 1",
    ),
    ("commit", "COMMIT"),
    (
        "select o.id, c.name from orders o join customers c on c.id = o.customer_id where o.id in (1, 2, 3)",
        "SELECT 3",
    ),
    ("set statement_timeout = '5s'", "SET"),
    (
        "explain select * from orders where customer_id = 7",
        "EXPLAIN",
    ),
    ("delete from sessions where expires_at < now()", "DELETE 12"),
];

impl Ctx {
    pub fn review(&mut self) -> anyhow::Result<()> {
        self.review_recording()?;
        self.review_report()
    }

    fn review_recording(&mut self) -> anyhow::Result<()> {
        let n = self.n(100_000, 10_000);
        let dir = tempfile::Builder::new()
            .prefix("breakglass-bench-review-")
            .tempdir()?;
        let recorder = Recorder::new(dir.path(), false)?;
        let t0 = Timestamp(breakglass_server::app::now().millis());
        let mut rec = recorder.open("bench-session", json!({"kind": "session"}), t0)?;
        for i in 0..n {
            let (sql, tag) = STATEMENTS[i % STATEMENTS.len()];
            let at = Timestamp(t0.millis() + i as i64);
            let seq = rec.append_deferred("query", &[("text", Field::Str(sql))], at);
            rec.append_deferred(
                "result",
                &[("statement", Field::U64(seq)), ("tag", Field::Str(tag))],
                at,
            );
            if i % 256 == 0 {
                rec.flush()?;
            }
        }
        rec.append(
            "end",
            &[
                ("bytes_to_client", Field::U64(123_456)),
                ("reason", Field::Str("client_terminated")),
            ],
            Timestamp(t0.millis() + n as i64),
        )?;
        rec.close()?;
        drop(rec);
        let path = Recorder::path_of(dir.path(), "bench-session");
        let rules = RuleSet::new(true, &[])?;
        let runs = self.n(3, 1);
        let (mut read, mut summarise) = (Vec::new(), Vec::new());
        let mut summary = None;
        for _ in 0..runs {
            // Interleaved, so both see the same page cache and machine load.
            let t = Instant::now();
            let mut entries = 0u64;
            read_recording(&path, |_| entries += 1)?;
            read.push(t.elapsed());
            let t = Instant::now();
            let s = summarise_postgres_recording(&rules, "bench-session", &path);
            summarise.push(t.elapsed());
            anyhow::ensure!(
                s.unreadable.is_empty(),
                "the recording did not verify: {:?}",
                s.unreadable
            );
            summary = Some(s);
        }
        let (read, summarise) = (
            Samples::from_durations(&read),
            Samples::from_durations(&summarise),
        );
        let s = summary.unwrap_or_default();
        let counted: u64 = s.statements.values().sum();
        anyhow::ensure!(
            counted == n as u64,
            "the summary counted {counted} statements of {n}"
        );
        self.rows.push(Row::info(
            format!("review: summarise a {n}-statement recording (median)"),
            fmt_secs(summarise.p50()),
            format!(
                "{:.0} statements/s; reading and verifying it alone takes {} ({:.1}x); {} findings",
                n as f64 / summarise.p50(),
                fmt_secs(read.p50()),
                summarise.p50() / read.p50(),
                s.findings_by_rule.values().sum::<u64>()
            ),
        ));
        Ok(())
    }

    fn review_report(&mut self) -> anyhow::Result<()> {
        let (srv, grants) = self.seeded_server()?;
        let c = Client::new(&srv.url);
        let runs = self.n(5, 2);
        let mut times = Vec::new();
        let mut report = serde_json::Value::Null;
        for _ in 0..runs {
            let t = Instant::now();
            report = c
                .get(AUDITOR, "/v1/reports?since=30d")?
                .expect(200, "report")?;
            times.push(t.elapsed());
        }
        // The same server's answer to a one-page list, as the floor.
        let t = Instant::now();
        c.get(AUDITOR, "/v1/requests?limit=100")?
            .expect(200, "list")?;
        let page = t.elapsed();
        srv.stop()?;
        let s = Samples::from_durations(&times);
        let counted = report["total"]["grants"].as_u64().unwrap_or(0);
        anyhow::ensure!(counted > 0, "the report counted no grants: {report}");
        self.rows.push(Row::target(
            format!("review: report over {grants} stored requests (median)"),
            fmt_secs(s.p50()),
            s.p50(),
            "<= 2 s",
            Goal::AtMost(2.0),
            format!(
                "max {}; {counted} grants counted; {:.1} us per request; one 100-request list page {}",
                fmt_secs(s.max()),
                1e6 * s.p50() / grants.max(1) as f64,
                fmt_secs(page.as_secs_f64())
            ),
        ));
        Ok(())
    }
}
