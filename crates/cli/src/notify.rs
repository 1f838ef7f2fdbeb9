//! `breakglass notify test SINK` and `breakglass notify status`: the
//! notification sinks as the server sees them (admins only).

use breakglass_server::notify::{SinkStatusList, TestResult};

use crate::cmd::{Ctx, print_json, print_text};
use crate::exit::{Exit, Failure};

/// `notify test SINK`: one test message, sent now; exit 0 only when the
/// sink took it.
pub fn test(ctx: &Ctx, sink: &str) -> anyhow::Result<Exit> {
    if sink.is_empty()
        || !sink
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Failure::usage(
            "bad_sink",
            format!(
                "{sink:?} is not a sink name (letters, digits and - _ . as in [[notify]] name)"
            ),
        )
        .into());
    }
    let out: TestResult = ctx
        .client()?
        .post::<(), _>(&format!("/v1/notify/{sink}/test"), None)?;
    if ctx.json() {
        print_json(&out)?;
    } else {
        let answer = match (out.status, &out.error) {
            (Some(s), None) => format!("HTTP {s}"),
            (_, Some(e)) => e.clone(),
            (None, None) => "accepted".into(),
        };
        let verdict = if out.delivered {
            "delivered"
        } else {
            "NOT delivered"
        };
        print_text(&format!(
            "{}: {verdict} ({answer}, {} ms)\n",
            out.sink, out.elapsed_ms
        ))?;
    }
    Ok(if out.delivered {
        Exit::Success
    } else {
        Exit::Error
    })
}

/// `notify status`: each sink's cursor, lag and last error.
pub fn status(ctx: &Ctx) -> anyhow::Result<Exit> {
    let list: SinkStatusList = ctx.client()?.get("/v1/notify/status", &[])?;
    if ctx.json() {
        print_json(&list)?;
        return Ok(Exit::Success);
    }
    print_text(&render_status(&list))?;
    Ok(Exit::Success)
}

fn render_status(list: &SinkStatusList) -> String {
    if list.sinks.is_empty() {
        return "no notification sinks are configured ([[notify]])\n".into();
    }
    let mut out = format!(
        "{:<20} {:<10} {:>10} {:>8} {:>7}  {:<5}  last error\n",
        "SINK", "KIND", "CURSOR", "LAG", "FAILED", "HERE"
    );
    for s in &list.sinks {
        let err = match (&s.last_error, s.retrying) {
            (Some(e), true) => format!("{e} (retrying)"),
            (Some(e), false) => e.clone(),
            (None, _) => "-".into(),
        };
        let here = if s.delivering { "yes" } else { "no" };
        out.push_str(&format!(
            "{:<20} {:<10} {:>10} {:>8} {:>7}  {here:<5}  {err}\n",
            s.name, s.kind, s.cursor, s.lag, s.failed
        ));
    }
    out.push_str(&format!(
        "audit log head: {}\nHERE: this node delivers the sink (one node at a time does)\n",
        list.head
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakglass_server::notify::SinkStatus;

    #[test]
    fn status_table() {
        let list = SinkStatusList {
            head: 42,
            sinks: vec![
                SinkStatus {
                    name: "hook".into(),
                    kind: "webhook".into(),
                    cursor: 42,
                    lag: 0,
                    last_error: None,
                    last_delivered_at: None,
                    failed: 0,
                    retrying: false,
                    delivering: true,
                },
                SinkStatus {
                    name: "pager".into(),
                    kind: "pagerduty".into(),
                    cursor: 30,
                    lag: 12,
                    last_error: Some("HTTP 503".into()),
                    last_delivered_at: None,
                    failed: 2,
                    retrying: true,
                    delivering: false,
                },
            ],
        };
        expect_test::expect![[r#"
            SINK                 KIND           CURSOR      LAG  FAILED  HERE   last error
            hook                 webhook            42        0       0  yes    -
            pager                pagerduty          30       12       2  no     HTTP 503 (retrying)
            audit log head: 42
            HERE: this node delivers the sink (one node at a time does)
        "#]]
        .assert_eq(&render_status(&list));
    }
}
