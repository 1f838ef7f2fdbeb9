//! Automated review of ended grants (DESIGN §16): the summary of a grant's
//! sessions, the system's triage (close as `auto_ok`, or queue for a
//! person), `review.overdue`, the review queue and the usage report.
//!
//! The classification, rules and summaries are `breakglass-review`'s (pure);
//! this module finds the recordings, asks the core to step, and serves the
//! results. Every system action here is a lifecycle step applied as
//! compare-and-set on the request's version, so with several nodes on one
//! store each happens once, whichever node gets there first.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use breakglass_core::lifecycle::{self, Command, LifecycleError};
use breakglass_core::time::{parse_duration, parse_report_window};
use breakglass_core::{Actor, Principal, Request, Timestamp};
use breakglass_gateway_postgres::recording::Recorder;
use breakglass_review::rules::{Rule, RuleSet, Severity};
use breakglass_review::summary::{Summary, summarise_recording};
use breakglass_store::{PAGE_LEN_MAX, SINCE_PAGE_LEN_MAX, StoreError};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::{App, AppError, now};
use crate::http::{ApiError, ApiQuery, Auth};

/// The longest `review.due_within` accepted: 30 days.
pub const DUE_WITHIN_MAX_S: u64 = 30 * 24 * 3600;
/// How often the reviewer looks for ended grants and overdue reviews when
/// the feed says nothing.
const SCAN_INTERVAL_MS: u64 = 5_000;
/// Grants triaged per scan at most (the next scan takes the rest).
const TRIAGE_BATCH_MAX: usize = 256;
/// A grant whose sessions ran on another node is left to that node (which
/// holds the recordings) for this long after its end; then any node
/// triages it, naming the recordings it cannot read (a person looks).
const HANDOFF_S: u64 = 60;
/// Findings listed per report group at most.
const TOP_FINDINGS_MAX: usize = 5;
/// Groups (teams, targets, policies) listed per report dimension at most.
pub const REPORT_GROUPS_MAX: usize = 1_000;
/// Requests a report reads at most; a larger window is refused with a
/// message (ask for a shorter `since`).
pub const REPORT_REQUESTS_MAX: usize = 2_000_000;

/// `[review]`: the automated review of ended grants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewConfig {
    /// A grant queued for a person must be reviewed within this long of its
    /// end; then `review.overdue` is recorded (and notified).
    #[serde(default = "default_due_within")]
    pub due_within: String,
    /// Findings at or above this severity send a grant to a person.
    #[serde(default = "default_flag_severity")]
    pub flag_severity: Severity,
    /// Use the built-in rules (DESIGN §16) besides `[[review.rules]]`.
    #[serde(default = "default_true")]
    pub default_rules: bool,
    /// Rules added to the built-in ones.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

fn default_due_within() -> String {
    "24h".into()
}

fn default_flag_severity() -> Severity {
    Severity::Medium
}

fn default_true() -> bool {
    true
}

impl Default for ReviewConfig {
    fn default() -> Self {
        ReviewConfig {
            due_within: default_due_within(),
            flag_severity: default_flag_severity(),
            default_rules: true,
            rules: Vec::new(),
        }
    }
}

impl ReviewConfig {
    /// Checks the durations and rules; the server does not start otherwise.
    pub fn validate(&self) -> anyhow::Result<()> {
        let due = parse_duration(&self.due_within)
            .map_err(|e| anyhow::anyhow!("review.due_within: {e}"))?;
        if due == 0 || due > DUE_WITHIN_MAX_S {
            anyhow::bail!("review.due_within: must be between 1s and 30d");
        }
        self.rule_set()?;
        Ok(())
    }

    pub fn due_within_s(&self) -> u64 {
        parse_duration(&self.due_within).unwrap_or(24 * 3600)
    }

    pub fn rule_set(&self) -> anyhow::Result<RuleSet> {
        RuleSet::new(self.default_rules, &self.rules).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// Whether a request is a drill's (DESIGN §15): reviews and reports keep
/// drills apart from real use. The one place that decides it.
pub fn is_drill(req: &Request) -> bool {
    req.drill.is_some()
}

/// A gateway session of a request, from its audit events.
#[derive(Debug, Clone)]
struct SessionRef {
    id: String,
    node: Option<String>,
    ended: bool,
}

async fn session_refs(app: &App, id: &str) -> Result<Vec<SessionRef>, AppError> {
    let events = app.store.request_events(id, PAGE_LEN_MAX).await?;
    let mut out: Vec<SessionRef> = Vec::new();
    for e in events {
        if !matches!(e.action.as_str(), "session.started" | "session.ended") {
            continue;
        }
        let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details) else {
            continue;
        };
        let sid = d["session_id"].as_str().unwrap_or("").to_string();
        if e.action == "session.started" {
            out.push(SessionRef {
                id: sid,
                node: d["node"].as_str().map(str::to_string),
                ended: false,
            });
        } else if let Some(s) = out.iter_mut().find(|s| s.id == sid) {
            s.ended = true;
        }
    }
    Ok(out)
}

/// The summary the triage recorded (in `request.reviewed` or
/// `review.queued`), if the grant was triaged.
async fn recorded_summary(app: &App, id: &str) -> Result<Option<Summary>, AppError> {
    let events = app.store.request_events(id, PAGE_LEN_MAX).await?;
    for e in events.iter().rev() {
        if e.actor == lifecycle::SYSTEM
            && matches!(e.action.as_str(), "request.reviewed" | "review.queued")
            && let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details)
            && let Ok(s) = serde_json::from_value::<Summary>(d["summary"].clone())
        {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Summarises the sessions of `req` from the recordings this node holds;
/// the others are named in `unreadable`.
async fn compute_summary(
    app: &App,
    req: &Request,
    sessions: &[SessionRef],
) -> Result<Summary, AppError> {
    let rules = app
        .config
        .review
        .rule_set()
        .map_err(|e| AppError::BadInput(e.to_string()))?;
    let dir = app.config.recordings_dir();
    let node = app.node_id();
    let sessions = sessions.to_vec();
    let id = req.id.clone();
    let summary = tokio::task::spawn_blocking(move || {
        let mut total = Summary::default();
        for s in &sessions {
            let path = Recorder::path_of(&dir, &s.id);
            if Path::new(&path).exists() {
                total.add(summarise_recording(&rules, &s.id, &path));
            } else {
                let whose = match &s.node {
                    Some(n) if *n != node => format!("node {n}"),
                    _ => "no node".to_string(),
                };
                total.sessions += 1;
                total.unreadable.push(format!(
                    "session {}: recording not on this node (held by {whose})",
                    s.id
                ));
            }
        }
        total
    })
    .await
    .map_err(|e| AppError::BadInput(format!("summary of {id} failed: {e}")))?;
    Ok(summary)
}

/// Why a summary needs a person, given the severity threshold.
pub fn flagged_reasons(summary: &Summary, threshold: Severity) -> Vec<String> {
    let mut reasons: Vec<String> = Vec::new();
    for f in &summary.findings {
        if f.severity >= threshold {
            let r = format!("finding {} ({})", f.rule, f.severity);
            if !reasons.contains(&r) {
                reasons.push(r);
            }
        }
    }
    if reasons.is_empty() && summary.max_severity.is_some_and(|s| s >= threshold) {
        reasons.push(format!("findings at or above {threshold}"));
    }
    for u in &summary.unreadable {
        reasons.push(format!("recording not summarised: {u}"));
    }
    reasons
}

/// Runs the automated review of request `id` if it is an ended grant whose
/// sessions are all closed. Returns the request as it ends up, or `None`
/// when it is not (yet) this node's to triage.
pub async fn triage(app: &App, id: &str) -> Result<Option<Request>, AppError> {
    for _ in 0..5 {
        let Some(req) = app.store.get(id).await? else {
            return Ok(None);
        };
        if !lifecycle::awaits_triage(&req) {
            return Ok(Some(req));
        }
        let sessions = session_refs(app, id).await?;
        if sessions.iter().any(|s| !s.ended) {
            // The gateway is still closing a session: its recording is not
            // complete yet. A later scan comes back.
            return Ok(None);
        }
        let now = now();
        let ended_at = req.ended_at.unwrap_or(now);
        let node = app.node_id();
        let elsewhere = sessions
            .first()
            .and_then(|s| s.node.as_ref())
            .is_some_and(|n| *n != node);
        if elsewhere && now < ended_at.plus_secs(HANDOFF_S) {
            return Ok(None);
        }
        let summary = compute_summary(app, &req, &sessions).await?;
        let cmd = Command::Triage {
            flagged: flagged_reasons(&summary, app.config.review.flag_severity),
            findings: summary.findings_by_rule.clone(),
            evidence: serde_json::to_value(&summary).unwrap_or_default(),
            due_at: ended_at.plus_secs(app.config.review.due_within_s()),
        };
        match lifecycle::step(&req, &Actor::System, &cmd, now) {
            Ok(t) => match app.commit_step(t, now).await {
                Err(AppError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
                Ok(r) => return Ok(Some(r)),
            },
            Err(LifecycleError::AlreadyReviewed | LifecycleError::WrongState { .. }) => {
                return Ok(Some(req));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Records `review.overdue` for request `id` if its queued review is past
/// due (once: a second node's attempt loses the compare-and-set or finds
/// it recorded).
pub async fn mark_overdue(app: &App, id: &str) -> Result<(), AppError> {
    for _ in 0..5 {
        let Some(req) = app.store.get(id).await? else {
            return Ok(());
        };
        let now = now();
        match lifecycle::step(&req, &Actor::System, &Command::ReviewOverdue, now) {
            Ok(t) => match app.commit_step(t, now).await {
                Err(AppError::Store(StoreError::Conflict { .. })) => continue,
                other => return other.map(|_| ()),
            },
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// One pass over the ended grants without a review: triage what awaits it,
/// mark what is overdue.
pub async fn scan(app: &App) -> Result<(), AppError> {
    let mut after: Option<String> = None;
    let mut triaged = 0;
    loop {
        let page = app
            .store
            .unreviewed_grants(after.clone(), PAGE_LEN_MAX)
            .await?;
        let n = page.len();
        let now = now();
        for req in &page {
            if lifecycle::awaits_triage(req) {
                if triaged < TRIAGE_BATCH_MAX {
                    triaged += 1;
                    if let Err(e) = triage(app, &req.id).await {
                        tracing::warn!(request = %req.id, error = %e, "automated review failed");
                    }
                }
            } else if req.review_due_at.is_some_and(|d| now >= d) && !req.review_overdue {
                mark_overdue(app, &req.id).await?;
            }
        }
        if n < PAGE_LEN_MAX as usize {
            return Ok(());
        }
        after = page.last().map(|r| r.id.clone());
    }
}

/// The reviewer: a scan every `SCAN_INTERVAL_MS`, and at once when the feed
/// shows a grant or a session ending.
pub fn spawn(app: Weak<App>) -> tokio::task::JoinHandle<()> {
    let mut feed = match app.upgrade() {
        Some(a) => a.store.subscribe(),
        None => return tokio::spawn(async {}),
    };
    tokio::spawn(async move {
        loop {
            {
                let Some(app) = app.upgrade() else { return };
                if app.writes_blocked().is_none()
                    && let Err(e) = scan(&app).await
                {
                    tracing::warn!(error = %e, "review scan failed");
                }
            }
            let wait = tokio::time::sleep(Duration::from_millis(SCAN_INTERVAL_MS));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    ev = feed.recv() => match ev {
                        Ok(e) if matches!(e.action.as_str(),
                            "request.expired" | "request.revoked" | "session.ended") => {
                            // Let the gateway close the grant's other
                            // sessions first.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    })
}

// ---------------------------------------------------------------- HTTP

/// `GET /v1/requests/{id}/summary`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SummaryResponse {
    pub request_id: String,
    /// `recorded`: the summary the automated review recorded in the audit
    /// log; `live`: computed now from the recordings this node holds (the
    /// grant is live, its sessions are closing, or it was not triaged yet).
    pub source: String,
    /// Why a person must review it (empty when nothing is flagged).
    pub flagged: Vec<String>,
    pub summary: Summary,
}

/// The summary of a request's sessions and why it needs a person, if it does.
pub async fn summary_of(app: &App, who: &Principal, id: &str) -> Result<SummaryResponse, AppError> {
    let req = app.get_visible(who, id).await?;
    let (source, summary) = match recorded_summary(app, &req.id).await? {
        Some(s) => ("recorded", s),
        None => {
            let sessions = session_refs(app, &req.id).await?;
            ("live", compute_summary(app, &req, &sessions).await?)
        }
    };
    let mut flagged = lifecycle::review_reasons(&req);
    flagged.extend(flagged_reasons(&summary, app.config.review.flag_severity));
    Ok(SummaryResponse {
        request_id: req.id,
        source: source.into(),
        flagged,
        summary,
    })
}

#[utoipa::path(get, path = "/v1/requests/{id}/summary", params(("id" = String, Path)),
    responses((status = 200, body = SummaryResponse), (status = 404, body = crate::dto::Problem)),
    security(("bearer" = [])))]
pub async fn summary(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<SummaryResponse>, ApiError> {
    Ok(Json(summary_of(&app, &who, &id).await?))
}

/// One grant waiting for a person's review.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueuedReview {
    pub request: Request,
    /// When the review is due (`null`: the automated review has not looked
    /// at it yet).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub due_at: Option<Timestamp>,
    pub overdue: bool,
    pub drill: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReviewQueue {
    /// Oldest end first.
    pub reviews: Vec<QueuedReview>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct QueueParams {
    /// Only reviews past their due time.
    pub overdue: Option<bool>,
}

/// The grants waiting for a person that `who` may see, oldest end first.
pub async fn queue_for(
    app: &App,
    who: &Principal,
    overdue_only: bool,
) -> Result<ReviewQueue, AppError> {
    let now = now();
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = app
            .store
            .unreviewed_grants(after.clone(), PAGE_LEN_MAX)
            .await?;
        let n = page.len();
        after = page.last().map(|r| r.id.clone());
        for req in page {
            // Queued by the automated review, or an emergency grant it has
            // not looked at yet (those always need a person).
            let queued = req.review_due_at.is_some() || req.review_required;
            if !queued || !app.can_see(who, &req) {
                continue;
            }
            let overdue = req.review_due_at.is_some_and(|d| now >= d);
            if overdue_only && !overdue {
                continue;
            }
            out.push(QueuedReview {
                due_at: req.review_due_at,
                overdue,
                drill: is_drill(&req),
                request: req,
            });
        }
        if n < PAGE_LEN_MAX as usize {
            break;
        }
    }
    out.sort_by(|a, b| {
        (a.request.ended_at, &a.request.id).cmp(&(b.request.ended_at, &b.request.id))
    });
    Ok(ReviewQueue { reviews: out })
}

#[utoipa::path(get, path = "/v1/reviews", params(QueueParams),
    responses((status = 200, body = ReviewQueue), (status = 401, body = crate::dto::Problem)),
    security(("bearer" = [])))]
pub async fn queue(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
    ApiQuery(p): ApiQuery<QueueParams>,
) -> Result<Json<ReviewQueue>, ApiError> {
    Ok(Json(
        queue_for(&app, &who, p.overdue.unwrap_or(false)).await?,
    ))
}

// ---------------------------------------------------------------- reports

/// Figures of one group of grants (a team, a target, a policy, or all).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ReportGroup {
    pub name: String,
    /// Requests that became grants (were active).
    pub grants: u64,
    pub emergency_grants: u64,
    /// From request to active, in milliseconds.
    pub time_to_access_p50_ms: Option<u64>,
    pub time_to_access_p99_ms: Option<u64>,
    /// Approvals per grant (countersignatures included).
    pub approvals_per_grant: f64,
    pub reviews_pending: u64,
    pub reviews_overdue: u64,
    /// Review outcomes: `ok`, `misuse`, `auto_ok`.
    pub outcomes: BTreeMap<String, u64>,
    /// The most frequent findings, most frequent first.
    pub top_findings: Vec<FindingCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FindingCount {
    pub rule: String,
    pub count: u64,
}

/// `GET /v1/reports`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Report {
    #[schema(value_type = String, format = DateTime)]
    pub since: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub until: Timestamp,
    pub total: ReportGroup,
    /// By the requester's groups (a principal in several counts in each;
    /// `(none)` for requesters this server has no groups for).
    pub teams: Vec<ReportGroup>,
    pub targets: Vec<ReportGroup>,
    pub policies: Vec<ReportGroup>,
    /// Drill grants in the window, kept out of every figure above.
    pub drill_grants: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReportParams {
    /// How far back, as a duration (`30d`, `12h`); default `30d`.
    pub since: Option<String>,
}

#[derive(Default)]
struct Acc {
    grants: u64,
    emergency: u64,
    tta_ms: Vec<u64>,
    approvals: u64,
    pending: u64,
    overdue: u64,
    outcomes: BTreeMap<String, u64>,
    findings: HashMap<String, u64>,
}

impl Acc {
    fn add(&mut self, r: &Request, now: Timestamp) {
        self.grants += 1;
        self.emergency += u64::from(r.emergency);
        if let Some(a) = r.activated_at {
            self.tta_ms
                .push(u64::try_from(a.millis() - r.created_at.millis()).unwrap_or(0));
        }
        self.approvals += r.approvals.len() as u64 + u64::from(r.countersignature.is_some());
        match &r.review {
            Some(rv) => {
                *self
                    .outcomes
                    .entry(rv.outcome.as_str().to_string())
                    .or_default() += 1
            }
            None if r.review_due_at.is_some() || (r.review_required && r.state.is_final()) => {
                self.pending += 1;
                if r.review_due_at.is_some_and(|d| now >= d) {
                    self.overdue += 1;
                }
            }
            None => {}
        }
        for (rule, n) in &r.review_findings {
            *self.findings.entry(rule.clone()).or_default() += n;
        }
    }

    fn finish(mut self, name: String) -> ReportGroup {
        self.tta_ms.sort_unstable();
        let pct = |p: f64| -> Option<u64> {
            if self.tta_ms.is_empty() {
                return None;
            }
            let i = ((self.tta_ms.len() as f64 - 1.0) * p).round() as usize;
            self.tta_ms.get(i).copied()
        };
        let mut top: Vec<FindingCount> = self
            .findings
            .into_iter()
            .map(|(rule, count)| FindingCount { rule, count })
            .collect();
        top.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.rule.cmp(&b.rule)));
        top.truncate(TOP_FINDINGS_MAX);
        ReportGroup {
            name,
            grants: self.grants,
            emergency_grants: self.emergency,
            time_to_access_p50_ms: pct(0.50),
            time_to_access_p99_ms: pct(0.99),
            approvals_per_grant: if self.grants == 0 {
                0.0
            } else {
                self.approvals as f64 / self.grants as f64
            },
            reviews_pending: self.pending,
            reviews_overdue: self.overdue,
            outcomes: self.outcomes,
            top_findings: top,
        }
    }
}

fn groups(map: HashMap<String, Acc>) -> Vec<ReportGroup> {
    let mut v: Vec<ReportGroup> = map.into_iter().map(|(k, a)| a.finish(k)).collect();
    v.sort_by(|a, b| b.grants.cmp(&a.grants).then_with(|| a.name.cmp(&b.name)));
    v.truncate(REPORT_GROUPS_MAX);
    v
}

/// The report over the grants requested in the last `since_s` seconds
/// (from [`parse_report_window`]).
pub async fn report_for(app: &App, since_s: u64) -> Result<Report, AppError> {
    let until = now();
    let since = Timestamp(until.millis() - i64::try_from(since_s * 1000).unwrap_or(i64::MAX));
    let team_of: HashMap<&str, &[String]> = app
        .config
        .principals
        .iter()
        .map(|p| (p.name.as_str(), p.groups.as_slice()))
        .collect();
    let none = ["(none)".to_string()];
    let mut total = Acc::default();
    let (mut teams, mut targets, mut policies): (
        HashMap<String, Acc>,
        HashMap<String, Acc>,
        HashMap<String, Acc>,
    ) = Default::default();
    let mut drills = 0;
    let mut after: Option<(Timestamp, String)> = None;
    let mut read = 0usize;
    loop {
        let page = app
            .store
            .requests_since(since, after.clone(), SINCE_PAGE_LEN_MAX)
            .await?;
        let n = page.len();
        read += n;
        if read > REPORT_REQUESTS_MAX {
            return Err(AppError::BadInput(format!(
                "more than {REPORT_REQUESTS_MAX} requests in this window; ask for a shorter since"
            )));
        }
        after = page.last().map(|r| (r.created_at, r.id.clone()));
        for r in &page {
            if r.activated_at.is_none() {
                continue;
            }
            if is_drill(r) {
                drills += 1;
                continue;
            }
            total.add(r, until);
            let ts = team_of
                .get(r.requester.as_str())
                .filter(|g| !g.is_empty())
                .copied()
                .unwrap_or(&none);
            for t in ts {
                teams.entry(t.clone()).or_default().add(r, until);
            }
            targets.entry(r.target.clone()).or_default().add(r, until);
            for p in r.policy.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                policies.entry(p.to_string()).or_default().add(r, until);
            }
        }
        if n < SINCE_PAGE_LEN_MAX as usize {
            break;
        }
    }
    Ok(Report {
        since,
        until,
        total: total.finish("all".into()),
        teams: groups(teams),
        targets: groups(targets),
        policies: groups(policies),
        drill_grants: drills,
    })
}

#[utoipa::path(get, path = "/v1/reports", params(ReportParams),
    responses((status = 200, body = Report), (status = 400, body = crate::dto::Problem),
              (status = 403, body = crate::dto::Problem)),
    security(("bearer" = [])))]
pub async fn report(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
    ApiQuery(p): ApiQuery<ReportParams>,
) -> Result<Json<Report>, ApiError> {
    if !who.admin {
        return Err(AppError::Forbidden(
            "admin_only",
            "reports cover every grant and are readable by members of the admin groups only".into(),
        )
        .into());
    }
    let since_s = parse_report_window(p.since.as_deref())
        .map_err(|e| AppError::BadInput(format!("since: {e}")))?;
    Ok(Json(report_for(&app, since_s).await?))
}
