//! What the automated review and the drills found, in the console: a
//! request's summary on its page, the usage report and the drill report
//! for admins. Each reads the same function its API route reads
//! (`review::summary_of`, `review::report_for`, `drill::read_report`), and
//! turns the answer into rows of text here, without IO.

use askama::Template;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use breakglass_core::time::{REPORT_WINDOW_DEFAULT, parse_report_window};
use breakglass_core::{Principal, Timestamp};
use serde::Deserialize;

use super::pages::{Nav, PageResult, html};
use super::view;
use super::{ConsoleState, PageError, Viewer};
use crate::app::{App, AppError, now};
use crate::drill::{DrillReport, Stats};
use crate::review::{Report, ReportGroup, SummaryResponse};

pub fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/admin/reports", get(reports))
        .route("/admin/drills", get(drills))
}

/// Milliseconds as people read them: `850 ms`, `2.4 s`, `3m10s`.
fn millis(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        return "—".into();
    }
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        view::duration((ms / 1000.0) as u64)
    }
}

/// `a 3, b 1` from counts by name, largest first; `—` when empty.
fn counts<'a>(items: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let mut v: Vec<(&str, u64)> = items.into_iter().filter(|(_, n)| *n > 0).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    if v.is_empty() {
        return "—".into();
    }
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------- summary

/// A request's summary, as its page shows it.
pub struct SummaryView {
    /// `recorded` (what the automated review wrote) or `live`.
    pub source: String,
    pub sessions: u64,
    pub statements: String,
    pub errors: u64,
    pub refused: u64,
    pub rows_affected: u64,
    pub rows_returned: u64,
    pub bytes_to_client: u64,
    pub duration: String,
    pub idle: String,
    /// Why a person must review it (empty: nothing flagged).
    pub flagged: Vec<String>,
    pub findings: Vec<FindingRow>,
    /// Findings counted but not listed.
    pub findings_unlisted: u64,
    pub unreadable: Vec<String>,
}

pub struct FindingRow {
    pub severity: &'static str,
    pub rule: String,
    pub class: &'static str,
    pub session: String,
    pub text: String,
}

impl SummaryView {
    pub fn of(r: &SummaryResponse) -> SummaryView {
        let s = &r.summary;
        let counted: u64 = s.findings_by_rule.values().sum();
        SummaryView {
            source: r.source.clone(),
            sessions: s.sessions,
            statements: counts(s.statements.iter().map(|(k, v)| (k.as_str(), *v))),
            errors: s.errors,
            refused: s.refused,
            rows_affected: s.rows_affected,
            rows_returned: s.rows_returned,
            bytes_to_client: s.bytes_to_client,
            duration: millis(s.duration_ms as f64),
            idle: millis(s.idle_ms as f64),
            flagged: r.flagged.clone(),
            findings: s
                .findings
                .iter()
                .map(|f| FindingRow {
                    severity: f.severity.as_str(),
                    rule: f.rule.clone(),
                    class: f.class.as_str(),
                    session: f.session.clone(),
                    text: f.text.clone(),
                })
                .collect(),
            findings_unlisted: counted.saturating_sub(s.findings.len() as u64),
            unreadable: s.unreadable.clone(),
        }
    }
}

// ---------------------------------------------------------------- reports

#[derive(Deserialize)]
struct SinceQuery {
    #[serde(default)]
    since: String,
}

/// The window asked for, or the default; the text is kept for the form.
fn window(q: &SinceQuery) -> Result<(String, Timestamp, u64), PageError> {
    let text = if q.since.trim().is_empty() {
        REPORT_WINDOW_DEFAULT.to_string()
    } else {
        q.since.trim().to_string()
    };
    let s = parse_report_window(Some(&text))
        .map_err(|e| PageError::from(AppError::BadInput(format!("since: {e}"))))?;
    let since = Timestamp::from_millis(now().millis().saturating_sub((s as i64) * 1000));
    Ok((text, since, s))
}

fn require_admin(who: &Principal) -> Result<(), PageError> {
    crate::http::require_admin(who).map_err(PageError::from)
}

pub struct ReportRow {
    pub name: String,
    pub grants: u64,
    pub emergency: u64,
    pub tta_p50: String,
    pub tta_p99: String,
    pub approvals: String,
    pub pending: u64,
    pub overdue: u64,
    pub outcomes: String,
    pub findings: String,
}

impl ReportRow {
    fn of(g: &ReportGroup) -> ReportRow {
        let ms = |v: Option<u64>| v.map_or_else(|| "—".into(), |v| millis(v as f64));
        ReportRow {
            name: g.name.clone(),
            grants: g.grants,
            emergency: g.emergency_grants,
            tta_p50: ms(g.time_to_access_p50_ms),
            tta_p99: ms(g.time_to_access_p99_ms),
            approvals: format!("{:.2}", g.approvals_per_grant),
            pending: g.reviews_pending,
            overdue: g.reviews_overdue,
            outcomes: counts(g.outcomes.iter().map(|(k, v)| (k.as_str(), *v))),
            findings: counts(g.top_findings.iter().map(|f| (f.rule.as_str(), f.count))),
        }
    }
}

pub struct ReportSection {
    pub title: &'static str,
    pub rows: Vec<ReportRow>,
}

#[derive(Template)]
#[template(path = "console/reports.html")]
struct ReportsPage {
    nav: Nav,
    since: String,
    from: String,
    until: String,
    /// The one row of every grant together.
    totals: Vec<ReportRow>,
    sections: Vec<ReportSection>,
    drill_grants: u64,
}

fn report_page(nav: Nav, since: String, r: &Report) -> ReportsPage {
    let rows = |v: &[ReportGroup]| v.iter().map(ReportRow::of).collect::<Vec<_>>();
    ReportsPage {
        nav,
        since,
        from: view::moment(r.since),
        until: view::moment(r.until),
        totals: vec![ReportRow::of(&r.total)],
        sections: vec![
            ReportSection {
                title: "Teams",
                rows: rows(&r.teams),
            },
            ReportSection {
                title: "Targets",
                rows: rows(&r.targets),
            },
            ReportSection {
                title: "Policies",
                rows: rows(&r.policies),
            },
        ],
        drill_grants: r.drill_grants,
    }
}

async fn reports(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Query(q): Query<SinceQuery>,
) -> PageResult {
    require_admin(&s.principal)?;
    let (text, _, seconds) = window(&q)?;
    let report = crate::review::report_for(&c.app, seconds).await?;
    html(report_page(Nav::of(&s, "reports"), text, &report))
}

// ----------------------------------------------------------------- drills

pub struct StatRow {
    pub name: String,
    pub count: u64,
    pub p50: String,
    pub p99: String,
    pub max: String,
}

impl StatRow {
    fn of(s: &Stats) -> StatRow {
        StatRow {
            name: s.name.clone(),
            count: s.count,
            p50: millis(s.p50_ms),
            p99: millis(s.p99_ms),
            max: millis(s.max_ms),
        }
    }
}

pub struct FailureRow {
    pub at: String,
    pub request_id: String,
    pub step: String,
    pub error: String,
}

pub struct DrillView {
    pub name: String,
    pub runs: u64,
    pub passed: u64,
    pub pass_rate: String,
    pub last_success: String,
    pub steps: Vec<StatRow>,
    pub figures: Vec<StatRow>,
    pub failures: Vec<FailureRow>,
}

#[derive(Template)]
#[template(path = "console/drills.html")]
struct DrillsPage {
    nav: Nav,
    since: String,
    from: String,
    drills: Vec<DrillView>,
    /// Names of configured drills that did not run in the window.
    idle: Vec<String>,
    truncated: bool,
}

fn drills_page(nav: Nav, since: String, r: &DrillReport, configured: &[String]) -> DrillsPage {
    let drills: Vec<DrillView> = r
        .drills
        .iter()
        .map(|d| DrillView {
            name: d.drill.clone(),
            runs: d.runs,
            passed: d.passed,
            pass_rate: format!("{:.0}%", d.pass_rate * 100.0),
            last_success: d.last_success.map_or_else(|| "never".into(), view::moment),
            steps: d.steps.iter().map(StatRow::of).collect(),
            figures: d.figures.iter().map(StatRow::of).collect(),
            failures: d
                .failures
                .iter()
                .map(|f| FailureRow {
                    at: view::moment(f.at),
                    request_id: f.request_id.clone().unwrap_or_default(),
                    step: f.failed_step.clone().unwrap_or_default(),
                    error: f.error.clone().unwrap_or_default(),
                })
                .collect(),
        })
        .collect();
    let idle = configured
        .iter()
        .filter(|n| !drills.iter().any(|d| &d.name == *n))
        .cloned()
        .collect();
    DrillsPage {
        nav,
        since,
        from: view::moment(r.since),
        drills,
        idle,
        truncated: r.truncated,
    }
}

async fn drills(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Query(q): Query<SinceQuery>,
) -> PageResult {
    require_admin(&s.principal)?;
    let (text, since, _) = window(&q)?;
    let report = crate::drill::read_report(&c.app, since).await?;
    let configured = configured_drills(&c.app);
    html(drills_page(
        Nav::of(&s, "drills"),
        text,
        &report,
        &configured,
    ))
}

fn configured_drills(app: &App) -> Vec<String> {
    app.config.drills.iter().map(|d| d.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_counts_read_as_people_write_them() {
        assert_eq!(millis(850.0), "850 ms");
        assert_eq!(millis(2_400.0), "2.4 s");
        assert_eq!(millis(190_000.0), "3m10s");
        assert_eq!(millis(f64::NAN), "—");
        assert_eq!(
            counts([("read", 3), ("write", 5), ("ddl", 0)]),
            "write 5, read 3"
        );
        assert_eq!(counts([("read", 0)]), "—");
    }
}
