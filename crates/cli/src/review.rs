//! `breakglass reviews`, `breakglass report`, and the summary `show` prints:
//! the automated review (DESIGN §16) as people and scripts read it.

use std::fmt::Write as _;

use breakglass_core::Timestamp;
use breakglass_core::time::format_duration;
use breakglass_server::review::{Report, ReportGroup, ReviewQueue, SummaryResponse};

use crate::Output;
use crate::cmd::{Ctx, print_json, print_text};
use crate::exit::Exit;
use crate::render::clean;

/// `breakglass reviews [--overdue]`: the grants waiting for a person,
/// oldest first.
pub fn reviews(ctx: &Ctx, overdue: bool) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let q = client.reviews(overdue)?;
    if ctx.output == Output::Json {
        print_json(&q)?;
    } else {
        print_text(&queue_text(&q, overdue, Timestamp::now()))?;
    }
    Ok(Exit::Success)
}

fn queue_text(q: &ReviewQueue, overdue: bool, now: Timestamp) -> String {
    if q.reviews.is_empty() {
        return if overdue {
            "No overdue reviews.\n".into()
        } else {
            "No grants wait for review.\n".into()
        };
    }
    let mut out = String::new();
    for r in &q.reviews {
        let req = &r.request;
        let due = match r.due_at {
            Some(d) if r.overdue => format!(
                "OVERDUE since {}",
                format_duration(u64::try_from((now.millis() - d.millis()) / 1000).unwrap_or(0))
            ),
            Some(d) => format!("due {}", d.to_rfc3339()),
            None => "awaiting the automated review".into(),
        };
        let _ = writeln!(
            out,
            "{}  {}  {} as {}  {}ended {}  {}{}",
            clean(&req.id),
            clean(&req.requester),
            clean(&req.target),
            clean(&req.role),
            if req.emergency { "EMERGENCY  " } else { "" },
            req.ended_at.map_or("-".into(), |t| t.to_rfc3339()),
            due,
            if r.drill { "  (drill)" } else { "" },
        );
    }
    let _ = writeln!(
        out,
        "\nSee what happened: breakglass show ID; then breakglass review ID --outcome ok|misuse --notes TEXT"
    );
    out
}

/// The summary block under `show` (text).
pub fn summary_text(s: &SummaryResponse) -> String {
    let sum = &s.summary;
    let mut out = String::new();
    let _ = writeln!(out, "\nSummary ({}):", s.source);
    if s.flagged.is_empty() {
        let _ = writeln!(out, "  needs a person: no");
    } else {
        let _ = writeln!(out, "  needs a person: yes");
        for f in &s.flagged {
            let _ = writeln!(out, "    - {}", clean(f));
        }
    }
    if !sum.findings.is_empty() {
        let _ = writeln!(out, "  findings:");
        for f in &sum.findings {
            let _ = writeln!(
                out,
                "    {:<6} {}  session {} entry {}: {}",
                f.severity.as_str(),
                clean(&f.rule),
                clean(&f.session),
                f.entry,
                clean(&f.text)
            );
        }
        let listed = sum.findings.len() as u64;
        let total: u64 = sum.findings_by_rule.values().sum();
        if total > listed {
            let _ = writeln!(out, "    ... and {} more", total - listed);
        }
    }
    let classes: Vec<String> = sum
        .statements
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        out,
        "  sessions {}  statements: {}",
        sum.sessions,
        if classes.is_empty() {
            "none".into()
        } else {
            classes.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "  errors {}  refused {}  rows affected {}  rows returned {}  bytes to client {}",
        sum.errors, sum.refused, sum.rows_affected, sum.rows_returned, sum.bytes_to_client
    );
    let _ = writeln!(
        out,
        "  duration {}  idle {}",
        ms(sum.duration_ms),
        ms(sum.idle_ms)
    );
    for u in &sum.unreadable {
        let _ = writeln!(out, "  not summarised: {}", clean(u));
    }
    let _ = writeln!(
        out,
        "  raw recordings: breakglass sessions {id}; breakglass recording SESSION_ID",
        id = clean(&s.request_id)
    );
    out
}

fn ms(v: u64) -> String {
    if v < 1000 {
        format!("{v}ms")
    } else {
        format_duration(v / 1000)
    }
}

/// `breakglass report --since 30d`.
pub fn report(ctx: &Ctx, since: &str) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let r = client.report(since)?;
    match ctx.output {
        Output::Json => print_json(&r)?,
        Output::Csv => print_text(&report_csv(&r))?,
        Output::Text => print_text(&report_text(&r))?,
    }
    Ok(Exit::Success)
}

fn p(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn findings(g: &ReportGroup) -> String {
    g.top_findings
        .iter()
        .map(|f| format!("{} {}", f.rule, f.count))
        .collect::<Vec<_>>()
        .join("; ")
}

fn outcome(g: &ReportGroup, o: &str) -> u64 {
    g.outcomes.get(o).copied().unwrap_or(0)
}

pub fn report_text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Grants requested {} to {}{}",
        r.since.to_rfc3339(),
        r.until.to_rfc3339(),
        if r.drill_grants > 0 {
            format!(" ({} drill grants not counted)", r.drill_grants)
        } else {
            String::new()
        }
    );
    let header = format!(
        "{:<24} {:>7} {:>6} {:>9} {:>9} {:>6} {:>7} {:>7} {:>5} {:>6} {:>7}  top findings",
        "",
        "grants",
        "emerg",
        "tta p50",
        "tta p99",
        "appr",
        "pending",
        "overdue",
        "ok",
        "misuse",
        "auto_ok"
    );
    let row = |g: &ReportGroup| {
        format!(
            "{:<24} {:>7} {:>6} {:>9} {:>9} {:>6.2} {:>7} {:>7} {:>5} {:>6} {:>7}  {}",
            clean(&g.name),
            g.grants,
            g.emergency_grants,
            g.time_to_access_p50_ms.map_or("-".into(), ms),
            g.time_to_access_p99_ms.map_or("-".into(), ms),
            g.approvals_per_grant,
            g.reviews_pending,
            g.reviews_overdue,
            outcome(g, "ok"),
            outcome(g, "misuse"),
            outcome(g, "auto_ok"),
            clean(&findings(g)),
        )
    };
    let _ = writeln!(out, "\n{header}");
    let _ = writeln!(out, "{}", row(&r.total));
    for (title, groups) in [
        ("By team", &r.teams),
        ("By target", &r.targets),
        ("By policy", &r.policies),
    ] {
        let _ = writeln!(out, "\n{title}:");
        for g in groups.iter() {
            let _ = writeln!(out, "{}", row(g));
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    // Formula injection: a cell starting with = + - @ is data, not a formula.
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

pub fn report_csv(r: &Report) -> String {
    let mut out = String::from(
        "dimension,name,grants,emergency_grants,time_to_access_p50_ms,time_to_access_p99_ms,approvals_per_grant,reviews_pending,reviews_overdue,ok,misuse,auto_ok,top_findings\n",
    );
    let mut row = |dim: &str, g: &ReportGroup| {
        let _ = writeln!(
            out,
            "{dim},{},{},{},{},{},{:.3},{},{},{},{},{},{}",
            csv_field(&g.name),
            g.grants,
            g.emergency_grants,
            p(g.time_to_access_p50_ms),
            p(g.time_to_access_p99_ms),
            g.approvals_per_grant,
            g.reviews_pending,
            g.reviews_overdue,
            outcome(g, "ok"),
            outcome(g, "misuse"),
            outcome(g, "auto_ok"),
            csv_field(&findings(g)),
        );
    };
    row("total", &r.total);
    for g in &r.teams {
        row("team", g);
    }
    for g in &r.targets {
        row("target", g);
    }
    for g in &r.policies {
        row("policy", g);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
    }
}
