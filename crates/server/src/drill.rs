//! Drills (DESIGN §15): the real break-glass path, run on a schedule (or on
//! demand) against a canary target, with the time of every step measured.
//!
//! A run is a client of the node's own public HTTP API over a real socket,
//! with the tokens of the principals it acts as: it requests, the approvers
//! approve (or countersign), it fetches credentials, opens a real session
//! through the node's PostgreSQL gateway and runs `select 1` (or through its
//! SSH gateway and runs `true`), revokes and
//! waits for the session to be cut, reads the session's recording back and
//! verifies the audit chain. Nothing is simulated or skipped; the only
//! in-process call is the chain verification (the same function as
//! `GET /v1/audit/verify`, without needing an admin token).
//!
//! Every run writes `drill.started` and `drill.completed` to the audit log;
//! the completed event carries the figures, so reports, metrics and
//! notifications all read one record. Scheduled runs are claimed per slot
//! with a compare-and-set on the store (`Store::claim_drill_run`), so with
//! several nodes on one database each slot runs on one node.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use breakglass_core::audit::AuditEvent;
use breakglass_core::{EventDraft, Principal, Request, State, Timestamp};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::app::{App, AppError, now};
use crate::config::Config;
use crate::drill_config::{DrillConfig, DrillMode};
use crate::dto::{Credentials, RecordingPage, SessionList};

/// The steps of a run, in order; `failed_step` names one of them.
pub const STEPS: [&str; 7] = [
    "request",
    "approval",
    "credentials",
    "session",
    "revoke",
    "recording",
    "chain",
];
/// The figures of a run, in milliseconds.
pub const FIGURES: [&str; 4] = [
    "time_to_access",
    "time_to_credentials",
    "time_to_first_statement",
    "cut_latency",
];
/// The probe a run sends through the gateway.
pub const PROBE_SQL: &str = "select 1";
/// What a drill runs through the SSH gateway.
pub const PROBE_COMMAND: &str = "true";
/// Longest error text kept in a run's result (and its audit event).
pub const DRILL_ERROR_LEN_MAX: usize = 512;
/// Largest API answer a run reads.
const ANSWER_LEN_MAX: u64 = 4 << 20;
/// `drill.completed` events one report reads at most.
pub const REPORT_RUNS_MAX: u32 = 10_000;
/// Failures one report lists per drill (the newest).
pub const REPORT_FAILURES_MAX: usize = 20;
/// Load: lifecycles per second at most.
pub const LOAD_RATE_MAX: u32 = 2_000;
/// Load: the longest run (an API call carries it, under the CLI's call
/// timeout).
pub const LOAD_DURATION_MAX_S: u64 = 20;
/// Load: concurrent workers at most.
pub const LOAD_WORKERS_MAX: usize = 64;
/// Load: errors kept (the first ones) in the result.
pub const LOAD_ERRORS_MAX: usize = 5;
/// How long a run polls for the session's end event after the cut.
const SESSION_END_POLL_MS: u64 = 10;
/// Drill metric series kept at most (drill names come from the feed too).
pub const DRILL_SERIES_MAX: usize = 4_096;

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Manual,
    /// A manual run while the load generator runs.
    Load,
}

/// One step of a run and how long it took.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepResult {
    pub step: String,
    pub ms: f64,
    pub ok: bool,
}

/// The result of one run (also the details of `drill.completed`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrillRun {
    pub drill: String,
    pub trigger: Trigger,
    /// The drill's request, once created.
    pub request_id: Option<String>,
    pub session_id: Option<String>,
    /// `pass` or `fail`.
    pub result: String,
    pub failed_step: Option<String>,
    pub error: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub started_at: Timestamp,
    /// Every step attempted, in order; a failed run ends with the failed one.
    pub steps: Vec<StepResult>,
    /// From the request to an active grant.
    pub time_to_access_ms: Option<f64>,
    /// From the request to the credentials.
    pub time_to_credentials_ms: Option<f64>,
    /// From the request to the probe's answer through the gateway.
    pub time_to_first_statement_ms: Option<f64>,
    /// From the revoke call to the gateway session's end.
    pub cut_latency_ms: Option<f64>,
}

impl DrillRun {
    pub fn passed(&self) -> bool {
        self.result == "pass"
    }

    fn figure(&self, name: &str) -> Option<f64> {
        match name {
            "time_to_access" => self.time_to_access_ms,
            "time_to_credentials" => self.time_to_credentials_ms,
            "time_to_first_statement" => self.time_to_first_statement_ms,
            "cut_latency" => self.cut_latency_ms,
            _ => None,
        }
    }

    /// The `drill.completed` details: the run plus each step's time as
    /// `<step>_ms`, so a reader needs no knowledge of the steps list.
    fn event_details(&self, node: &str) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        if let Some(map) = v.as_object_mut() {
            for s in &self.steps {
                map.insert(format!("{}_ms", s.step), json!(s.ms));
            }
            map.insert("node".into(), json!(node));
        }
        v
    }
}

/// `POST /v1/drills/{name}/run` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// Run the built-in load generator meanwhile.
    #[serde(default)]
    pub load: Option<LoadSpec>,
}

/// Synthetic drill-labelled lifecycles (create, approve, credentials,
/// revoke) at `rate` per second for `for`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// Lifecycles per second, 1 to LOAD_RATE_MAX.
    #[schema(minimum = 1, maximum = 2000)]
    pub rate: u32,
    /// Like `10s`; at most LOAD_DURATION_MAX_S (20s). The server also reads
    /// other spellings of the same durations (`1m` is too long either way).
    #[schema(pattern = "^([1-9]|1[0-9]|20)s$", min_length = 2, max_length = 3)]
    #[serde(rename = "for")]
    pub for_: String,
}

/// `POST /v1/drills/{name}/run` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunAnswer {
    /// The run (under load, when load was asked for).
    pub run: DrillRun,
    /// With load: the same drill run alone just before, for comparison.
    pub baseline: Option<DrillRun>,
    pub load: Option<LoadResult>,
}

/// What the load generator did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoadResult {
    pub rate: u32,
    pub for_s: u64,
    /// Lifecycles planned (`rate × for`).
    pub planned: u64,
    pub completed: u64,
    pub failed: u64,
    /// Completed lifecycles per second of wall time.
    pub achieved_per_s: f64,
    pub elapsed_s: f64,
    /// Time to access of the synthetic lifecycles.
    pub time_to_access: Stats,
    /// Whole lifecycles (create to revoke).
    pub lifecycle: Stats,
    /// The first errors, if any.
    pub errors: Vec<String>,
}

/// Percentiles of a set of times.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    pub name: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn of(name: &str, mut v: Vec<f64>) -> Stats {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least p of the values
        // at or below it.
        let rank = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Stats {
            name: name.to_string(),
            count: v.len() as u64,
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// `GET /v1/drills/report`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrillReport {
    #[schema(value_type = String, format = DateTime)]
    pub since: Timestamp,
    pub drills: Vec<DrillSummary>,
    /// True when more runs than the report reads were found.
    pub truncated: bool,
}

/// One drill's runs in a report.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrillSummary {
    pub drill: String,
    pub runs: u64,
    pub passed: u64,
    pub pass_rate: f64,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_success: Option<Timestamp>,
    /// Per step, over the runs that completed it.
    pub steps: Vec<Stats>,
    /// Per figure (time to access, to credentials, to first statement, cut
    /// latency).
    pub figures: Vec<Stats>,
    /// The newest failures first.
    pub failures: Vec<DrillFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrillFailure {
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    pub request_id: Option<String>,
    pub failed_step: Option<String>,
    pub error: Option<String>,
}

/// Aggregates `drill.completed` events into a report (pure).
pub fn report(events: &[AuditEvent], since: Timestamp, truncated: bool) -> DrillReport {
    let mut by: BTreeMap<String, Vec<(Timestamp, DrillRun)>> = BTreeMap::new();
    for e in events {
        if e.action != "drill.completed" {
            continue;
        }
        let Ok(run) = serde_json::from_str::<DrillRun>(&e.details) else {
            continue;
        };
        by.entry(run.drill.clone()).or_default().push((e.time, run));
    }
    let drills = by
        .into_iter()
        .map(|(drill, runs)| {
            let passed = runs.iter().filter(|(_, r)| r.passed()).count() as u64;
            let steps = STEPS
                .iter()
                .map(|s| {
                    Stats::of(
                        s,
                        runs.iter()
                            .flat_map(|(_, r)| r.steps.iter())
                            .filter(|x| x.step == *s && x.ok)
                            .map(|x| x.ms)
                            .collect(),
                    )
                })
                .collect();
            let figures = FIGURES
                .iter()
                .map(|f| Stats::of(f, runs.iter().filter_map(|(_, r)| r.figure(f)).collect()))
                .collect();
            let failures = runs
                .iter()
                .rev()
                .filter(|(_, r)| !r.passed())
                .take(REPORT_FAILURES_MAX)
                .map(|(at, r)| DrillFailure {
                    at: *at,
                    request_id: r.request_id.clone(),
                    failed_step: r.failed_step.clone(),
                    error: r.error.clone(),
                })
                .collect();
            let last_success = runs
                .iter()
                .filter(|(_, r)| r.passed())
                .map(|(at, _)| *at)
                .max();
            DrillSummary {
                runs: runs.len() as u64,
                passed,
                pass_rate: if runs.is_empty() {
                    0.0
                } else {
                    passed as f64 / runs.len() as f64
                },
                last_success,
                steps,
                figures,
                failures,
                drill,
            }
        })
        .collect();
    DrillReport {
        since,
        drills,
        truncated,
    }
}

/// Refuses a drill label unless `who` is the requester of the configured
/// drill `name` and the request is for that drill's target: a label on
/// anything else could hide real use.
pub fn check_label(
    config: &Config,
    who: &Principal,
    name: &str,
    target: &str,
) -> Result<(), AppError> {
    let refuse = |why: String| AppError::Forbidden("drill_label_refused", why);
    let Some(d) = config.drill(name) else {
        return Err(refuse(format!(
            "drill: no drill {name:?} is configured; only a configured drill's requester may label a request as a drill"
        )));
    };
    if who.name != d.requester.principal {
        return Err(refuse(format!(
            "drill: only {} (the requester of drill {name}) may label requests as drill {name}; a drill label on other requests would hide real use",
            d.requester.principal
        )));
    }
    if target != d.target {
        return Err(refuse(format!(
            "drill: drill {name} runs against target {}, not {target}",
            d.target
        )));
    }
    Ok(())
}

/// The addresses a drill reaches the node by, set once the listeners are
/// bound, and the drills running now.
#[derive(Default)]
pub struct DrillState {
    api: OnceLock<(String, Option<Vec<u8>>)>,
    gateway: OnceLock<SocketAddr>,
    ssh_gateway: OnceLock<SocketAddr>,
    running: Mutex<HashSet<String>>,
}

fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

impl DrillState {
    /// Where the API and the PostgreSQL and SSH gateways listen;
    /// `tls_cert` is the API's certificate (PEM) when it serves HTTPS only.
    pub fn set_addrs(
        &self,
        api: SocketAddr,
        tls_cert: Option<Vec<u8>>,
        gateway: Option<SocketAddr>,
        ssh_gateway: Option<SocketAddr>,
    ) {
        let api = loopback_if_unspecified(api);
        let scheme = if tls_cert.is_some() { "https" } else { "http" };
        let _ = self.api.set((format!("{scheme}://{api}"), tls_cert));
        if let Some(g) = gateway {
            let _ = self.gateway.set(loopback_if_unspecified(g));
        }
        if let Some(g) = ssh_gateway {
            let _ = self.ssh_gateway.set(loopback_if_unspecified(g));
        }
    }
}

/// Marks a drill as running until dropped.
struct RunningGuard<'a> {
    state: &'a DrillState,
    name: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.state.running.lock().unwrap_or_else(|p| p.into_inner());
        r.remove(&self.name);
    }
}

fn start_running<'a>(state: &'a DrillState, name: &str) -> Result<RunningGuard<'a>, AppError> {
    let mut r = state.running.lock().unwrap_or_else(|p| p.into_inner());
    if !r.insert(name.to_string()) {
        return Err(AppError::Conflict(
            "drill_running",
            format!("drill {name} is running now; wait for it to finish"),
        ));
    }
    Ok(RunningGuard {
        state,
        name: name.to_string(),
    })
}

/// Runs drill `name` now (the API's `POST /v1/drills/{name}/run`), with the
/// load generator meanwhile when `body.load` asks for it.
/// The configured drill called `name`, or a refusal naming those there are.
pub fn configured<'a>(app: &'a App, name: &str) -> Result<&'a DrillConfig, AppError> {
    app.config.drill(name).ok_or_else(|| {
        AppError::UnknownName(
            "unknown_drill",
            format!(
                "no drill {name:?} is configured (drills: {})",
                app.config
                    .drills
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

pub async fn run_now(app: &Arc<App>, name: &str, body: RunBody) -> Result<RunAnswer, AppError> {
    let d = configured(app, name)?.clone();
    let load = body.load.map(|l| check_load(&d, &l)).transpose()?;
    let _guard = start_running(&app.drills, name)?;
    let Some(load) = load else {
        let run = run_recorded(app, &d, Trigger::Manual).await?;
        return Ok(RunAnswer {
            run,
            baseline: None,
            load: None,
        });
    };
    let baseline = run_recorded(app, &d, Trigger::Manual).await?;
    let ctx = RunCtx::of(app)?;
    let (rate, for_s) = load;
    let load_ctx = ctx.clone();
    let load_drill = d.clone();
    let generator = tokio::task::spawn_blocking(move || {
        run_load(&load_ctx, &load_drill, rate, Duration::from_secs(for_s))
    });
    // Let the load reach its rate before the drill runs inside it.
    tokio::time::sleep(Duration::from_millis((for_s * 1000 / 4).min(1000))).await;
    let run = run_recorded(app, &d, Trigger::Load).await;
    let load = generator
        .await
        .map_err(|e| AppError::BadInput(format!("the load generator stopped: {e}")))?;
    Ok(RunAnswer {
        run: run?,
        baseline: Some(baseline),
        load: Some(load),
    })
}

/// Checks a load spec: `(rate, seconds)`.
fn check_load(d: &DrillConfig, l: &LoadSpec) -> Result<(u32, u64), AppError> {
    if d.mode == DrillMode::Emergency {
        return Err(AppError::BadInput(format!(
            "load: drill {} is an emergency drill; the load generator drives normal requests (emergency requests of one principal are limited by [emergency])",
            d.name
        )));
    }
    if !(1..=LOAD_RATE_MAX).contains(&l.rate) {
        return Err(AppError::BadInput(format!(
            "load.rate: must be between 1 and {LOAD_RATE_MAX} lifecycles per second"
        )));
    }
    let s = breakglass_core::time::parse_duration(&l.for_)
        .map_err(|e| AppError::BadInput(format!("load.for: {e}")))?;
    if !(1..=LOAD_DURATION_MAX_S).contains(&s) {
        return Err(AppError::BadInput(format!(
            "load.for: must be between 1s and {LOAD_DURATION_MAX_S}s"
        )));
    }
    Ok((l.rate, s))
}

/// Runs a drill with its `drill.started` and `drill.completed` events.
async fn run_recorded(
    app: &Arc<App>,
    d: &DrillConfig,
    trigger: Trigger,
) -> Result<DrillRun, AppError> {
    if let Some(why) = app.writes_blocked() {
        return Err(AppError::WritesBlocked(why));
    }
    let node = app.node_id();
    let committed = app
        .store
        .append(
            vec![EventDraft {
                actor: "system".into(),
                action: "drill.started".into(),
                request_id: None,
                details: json!({
                    "drill": d.name,
                    "target": d.target,
                    "role": d.role,
                    "mode": match d.mode { DrillMode::Normal => "normal", DrillMode::Emergency => "emergency" },
                    "trigger": trigger,
                    "node": node,
                }),
            }],
            now(),
        )
        .await?;
    for e in &committed {
        app.metrics.observe_event(e);
    }
    let run = match RunCtx::of(app) {
        Ok(ctx) => {
            let d2 = d.clone();
            let app2 = app.clone();
            tokio::task::spawn_blocking(move || run_steps(&ctx, &app2, &d2, trigger))
                .await
                .map_err(|e| AppError::BadInput(format!("the drill stopped: {e}")))?
        }
        Err(e) => failed_before_start(d, trigger, &e.to_string()),
    };
    let mut details = run.event_details(&node);
    if run.passed() {
        // A pass has nothing to say in these.
        if let Some(m) = details.as_object_mut() {
            m.remove("error");
            m.remove("failed_step");
        }
    }
    let committed = app
        .store
        .append(
            vec![EventDraft {
                actor: "system".into(),
                action: "drill.completed".into(),
                request_id: run.request_id.clone(),
                details,
            }],
            now(),
        )
        .await?;
    for e in &committed {
        app.metrics.observe_event(e);
    }
    if run.passed() {
        tracing::info!(drill = %d.name, time_to_access_ms = ?run.time_to_access_ms, "drill passed");
    } else {
        tracing::error!(
            drill = %d.name,
            step = ?run.failed_step,
            error = ?run.error,
            "DRILL FAILED"
        );
    }
    Ok(run)
}

fn failed_before_start(d: &DrillConfig, trigger: Trigger, why: &str) -> DrillRun {
    DrillRun {
        drill: d.name.clone(),
        trigger,
        request_id: None,
        session_id: None,
        result: "fail".into(),
        failed_step: Some(STEPS[0].into()),
        error: Some(clip(why)),
        started_at: now(),
        steps: vec![StepResult {
            step: STEPS[0].into(),
            ms: 0.0,
            ok: false,
        }],
        time_to_access_ms: None,
        time_to_credentials_ms: None,
        time_to_first_statement_ms: None,
        cut_latency_ms: None,
    }
}

fn clip(s: &str) -> String {
    if s.len() <= DRILL_ERROR_LEN_MAX {
        return s.to_string();
    }
    let mut end = DRILL_ERROR_LEN_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What a run needs to reach the node: its API and gateway addresses.
#[derive(Clone)]
struct RunCtx {
    base: String,
    roots: Option<Vec<u8>>,
    gateway: Option<SocketAddr>,
    ssh_gateway: Option<SocketAddr>,
    rt: tokio::runtime::Handle,
}

impl RunCtx {
    fn of(app: &App) -> Result<RunCtx, AppError> {
        let Some((base, roots)) = app.drills.api.get().cloned() else {
            return Err(AppError::Conflict(
                "not_ready",
                "the API is not listening yet".into(),
            ));
        };
        Ok(RunCtx {
            base,
            roots,
            gateway: app.drills.gateway.get().copied(),
            ssh_gateway: app.drills.ssh_gateway.get().copied(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    fn client(&self, timeout: Duration) -> Api {
        let mut b = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .proxy(None)
            .max_idle_connections_per_host(4)
            .user_agent(concat!("breakglass-drill/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &self.roots {
            let roots: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            b = b.tls_config(
                ureq::tls::TlsConfig::builder()
                    .provider(ureq::tls::TlsProvider::Rustls)
                    .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
                    .unversioned_rustls_crypto_provider(Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .build(),
            );
        }
        Api {
            agent: breakglass_notify::agent::agent(b.build()),
            base: self.base.clone(),
        }
    }
}

/// A blocking client of the node's API.
struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    fn call(
        &self,
        method: &str,
        token: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {token}");
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.to_string()),
            (_, None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        let mut resp = resp.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(ANSWER_LEN_MAX)
            .read_to_string()
            .map_err(|e| format!("{method} {path}: reading the answer: {e}"))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            let code = v["code"].as_str().unwrap_or("");
            let detail = v["detail"].as_str().unwrap_or("");
            Err(format!("{method} {path}: HTTP {status} {code}: {detail}"))
        }
    }

    fn post(&self, token: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        self.call("POST", token, path, body)
    }

    fn get(&self, token: &str, path: &str) -> Result<Value, String> {
        self.call("GET", token, path, None)
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("{what}: unexpected answer: {e}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The steps of a run, recorded as they finish.
struct Recorder {
    run: DrillRun,
    t0: Instant,
}

impl Recorder {
    fn step<T>(&mut self, step: &str, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Option<T> {
        let start = Instant::now();
        let out = f(self);
        let ok = out.is_ok();
        self.run.steps.push(StepResult {
            step: step.into(),
            ms: ms(start.elapsed()),
            ok,
        });
        match out {
            Ok(v) => Some(v),
            Err(e) => {
                self.run.result = "fail".into();
                self.run.failed_step = Some(step.into());
                self.run.error = Some(clip(&e));
                None
            }
        }
    }

    fn since_start(&self) -> f64 {
        ms(self.t0.elapsed())
    }
}

fn granted(r: &Request) -> bool {
    r.state == State::Active && (r.countersign_by.is_none() || r.countersignature.is_some())
}

/// One run, on a blocking thread: every step over the real API and the
/// real gateway. Whatever fails, the drill's request does not outlive the
/// run (cancelled or revoked at the end).
fn run_steps(ctx: &RunCtx, app: &App, d: &DrillConfig, trigger: Trigger) -> DrillRun {
    let timeout = d.step_timeout();
    let api = ctx.client(timeout);
    let mut rec = Recorder {
        run: DrillRun {
            drill: d.name.clone(),
            trigger,
            request_id: None,
            session_id: None,
            result: "pass".into(),
            failed_step: None,
            error: None,
            started_at: now(),
            steps: Vec::new(),
            time_to_access_ms: None,
            time_to_credentials_ms: None,
            time_to_first_statement_ms: None,
            cut_latency_ms: None,
        },
        t0: Instant::now(),
    };
    let requester = d.requester.token();
    let mut req: Option<Request> = None;
    let mut ended = false;
    let outcome = (|| -> Option<()> {
        // 1. request
        let created: Request = rec.step("request", |rec| {
            let token = requester.clone()?;
            let v = api.post(
                &token,
                "/v1/requests",
                Some(&json!({
                    "target": d.target,
                    "role": d.role,
                    "duration": d.duration,
                    "reason": format!("drill {}: exercising the break-glass path", d.name),
                    "emergency": d.mode == DrillMode::Emergency,
                    "drill": d.name,
                })),
            )?;
            let r: Request = parse(v, "request")?;
            rec.run.request_id = Some(r.id.clone());
            if r.state == State::Active {
                rec.run.time_to_access_ms = Some(rec.since_start());
            }
            Ok(r)
        })?;
        req = Some(created.clone());
        // 2. approvals (or the countersignature of an emergency grant)
        let active: Request = rec.step("approval", |rec| {
            let mut r = created;
            for a in &d.approvers {
                if granted(&r) {
                    break;
                }
                let token = a.token().map_err(|e| format!("approver {}: {e}", a.principal))?;
                let v = api
                    .post(
                        &token,
                        &format!("/v1/requests/{}/approve", r.id),
                        Some(&json!({"comment": format!("drill {}", d.name)})),
                    )
                    .map_err(|e| format!("approval by {}: {e}", a.principal))?;
                r = parse(v, "approve")?;
                req = Some(r.clone());
                if r.state == State::Active && rec.run.time_to_access_ms.is_none() {
                    rec.run.time_to_access_ms = Some(rec.since_start());
                }
            }
            if !granted(&r) {
                return Err(format!(
                    "the request is {} after the approvals of the drill's {} approver(s) ({} approval(s) required{})",
                    r.state,
                    d.approvers.len(),
                    r.approvals_required,
                    if r.countersign_by.is_some() { ", and a countersignature" } else { "" }
                ));
            }
            Ok(r)
        })?;
        // 3. credentials
        let creds: Credentials = rec.step("credentials", |rec| {
            let token = requester.clone()?;
            let v = api.post(
                &token,
                &format!("/v1/requests/{}/credentials", active.id),
                None,
            )?;
            let c: Credentials = parse(v, "credentials")?;
            rec.run.time_to_credentials_ms = Some(rec.since_start());
            Ok(c)
        })?;
        // 4. a real session through the gateway, and the probe
        let mut probe = rec.step("session", |rec| {
            let conn = creds
                .connection
                .as_ref()
                .ok_or("the credentials name no gateway connection")?;
            let probe = if conn.kind == "ssh" {
                ssh_probe(ctx, conn, &creds.token, timeout)?
            } else {
                pg_probe(ctx, conn, &creds.token, &d.target, timeout)?
            };
            rec.run.time_to_first_statement_ms = Some(rec.since_start());
            Ok(probe)
        })?;
        // 5. revoke, and the session is cut
        rec.step("revoke", |rec| {
            let token = requester.clone()?;
            let start = Instant::now();
            let v = api.post(
                &token,
                &format!("/v1/requests/{}/revoke", active.id),
                Some(&json!({"reason": format!("drill {} done", d.name)})),
            )?;
            let r: Request = parse(v, "revoke")?;
            req = Some(r.clone());
            ended = r.state.is_final();
            if !ctx.rt.block_on(probe.closed_within(timeout)) {
                return Err(format!(
                    "the gateway session was still open {}s after the grant was revoked",
                    timeout.as_secs()
                ));
            }
            rec.run.cut_latency_ms = Some(ms(start.elapsed()));
            Ok(())
        })?;
        // 6. the recording holds the probe, and the chain verifies
        rec.step("recording", |rec| {
            let token = requester.clone()?;
            let deadline = Instant::now() + timeout;
            let session = loop {
                let v = api.get(&token, &format!("/v1/requests/{}/sessions", active.id))?;
                let list: SessionList = parse(v, "sessions")?;
                match list.sessions.into_iter().next() {
                    Some(s) if s.ended_at.is_some() => break s,
                    other if Instant::now() >= deadline => {
                        return Err(match other {
                            None => "the grant has no gateway session".to_string(),
                            Some(s) => format!("session {} has no end event", s.session_id),
                        });
                    }
                    _ => std::thread::sleep(Duration::from_millis(SESSION_END_POLL_MS)),
                }
            };
            rec.run.session_id = Some(session.session_id.clone());
            let v = api.get(
                &token,
                &format!("/v1/sessions/{}/recording", session.session_id),
            )?;
            let page: RecordingPage = parse(v, "recording")?;
            if !page.entries.iter().any(|e| probe.is_in(e)) {
                return Err(format!(
                    "the recording of session {} does not hold the probe {:?}",
                    session.session_id,
                    probe.text()
                ));
            }
            Ok(())
        })?;
        rec.step("chain", |_| {
            let report = ctx
                .rt
                .block_on(crate::verify::verify_store(
                    app.store.as_ref(),
                    &app.trusted_keys(),
                    &app.config.recordings_dir(),
                    &app.witnesses,
                    &app.node_id(),
                    Some(&|| app.live_sessions()),
                ))
                .map_err(|e| format!("cannot read the audit log: {e}"))?;
            if !report.ok {
                return Err(format!(
                    "the audit chain does not verify (first bad seq {:?}): {}",
                    report.first_bad_seq,
                    report.reason.unwrap_or_default()
                ));
            }
            Ok(())
        })?;
        Some(())
    })();
    // Nothing a failed run requested stays open.
    if outcome.is_none()
        && !ended
        && let (Some(r), Ok(token)) = (&req, &requester)
        && let Err(e) = end_request(&api, token, &r.id, &d.name)
    {
        tracing::error!(drill = %d.name, request = %r.id, error = %e, "cannot end the request of a failed drill");
        let error = rec.run.error.take().unwrap_or_default();
        rec.run.error = Some(clip(&format!(
            "{error}; and its request {} could not be ended: {e}",
            r.id
        )));
    }
    rec.run
}

/// Attempts to end a failed run's request (it expires anyway, but a
/// drill must not leave one open for its duration).
const END_ATTEMPTS: u32 = 3;

/// Ends request `id` of a failed run as its requester: cancelled if
/// pending, revoked if active, left alone if it has ended. The state is
/// read again before each attempt, so an attempt that timed out after the
/// node acted is not mistaken for a failure.
fn end_request(api: &Api, token: &str, id: &str, drill: &str) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..END_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
        }
        let state = match api
            .get(token, &format!("/v1/requests/{id}"))
            .and_then(|v| parse::<Request>(v, "request"))
        {
            Ok(r) => r.state,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let done = match state {
            s if s.is_final() => return Ok(()),
            State::Pending => api.post(token, &format!("/v1/requests/{id}/cancel"), None),
            _ => api.post(
                token,
                &format!("/v1/requests/{id}/revoke"),
                Some(&json!({"reason": format!("drill {drill} failed")})),
            ),
        };
        match done {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A probe's session through a gateway, kept open until the grant ends.
enum Probe {
    Postgres {
        client: tokio_postgres::Client,
        task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    },
    Ssh(breakglass_gateway_ssh::probe::Probe),
}

impl Probe {
    /// What the probe ran.
    fn text(&self) -> &'static str {
        match self {
            Probe::Postgres { .. } => PROBE_SQL,
            Probe::Ssh(_) => PROBE_COMMAND,
        }
    }

    /// Whether a recording entry is the probe: the statement, or the
    /// `exec` of the command.
    fn is_in(&self, entry: &Value) -> bool {
        match self {
            Probe::Postgres { .. } => entry.to_string().to_lowercase().contains(PROBE_SQL),
            Probe::Ssh(_) => {
                entry["kind"] == "exec" && entry["command"].as_str() == Some(PROBE_COMMAND)
            }
        }
    }

    /// Whether the gateway cut the session within `timeout`.
    async fn closed_within(&mut self, timeout: Duration) -> bool {
        match self {
            Probe::Postgres { client, task } => {
                tokio::time::timeout(timeout, task).await.is_ok() && client.is_closed()
            }
            Probe::Ssh(p) => p.closed_within(timeout).await,
        }
    }
}

/// `select 1` through the node's PostgreSQL gateway.
fn pg_probe(
    ctx: &RunCtx,
    conn: &crate::dto::Connection,
    token: &str,
    target: &str,
    timeout: Duration,
) -> Result<Probe, String> {
    let gw = ctx
        .gateway
        .ok_or("the PostgreSQL gateway is not running on this node")?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(gw.ip().to_string())
        .port(gw.port())
        .user(&conn.user)
        .password(token)
        .dbname(conn.database.as_deref().unwrap_or(target))
        .application_name("breakglass-drill")
        // The gateway is on loopback, where plaintext logins are
        // accepted; the token never leaves the machine.
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(timeout);
    ctx.rt.block_on(async {
        let (client, connection) =
            tokio::time::timeout(timeout, cfg.connect(tokio_postgres::NoTls))
                .await
                .map_err(|_| {
                    format!(
                        "no session through the gateway at {gw} within {}s",
                        timeout.as_secs()
                    )
                })?
                .map_err(|e| {
                    format!(
                        "cannot open a session through the gateway at {gw}: {}",
                        pg_error(&e)
                    )
                })?;
        let task = tokio::spawn(connection);
        let rows = tokio::time::timeout(timeout, client.simple_query(PROBE_SQL))
            .await
            .map_err(|_| format!("{PROBE_SQL:?} got no answer within {}s", timeout.as_secs()))?
            .map_err(|e| format!("{PROBE_SQL:?} failed: {}", pg_error(&e)))?;
        let one = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        if one.as_deref() != Some("1") {
            return Err(format!("{PROBE_SQL:?} answered {one:?}, not 1"));
        }
        Ok(Probe::Postgres { client, task })
    })
}

/// `true` through the node's SSH gateway, whose host key the credentials
/// name (and the client pins).
fn ssh_probe(
    ctx: &RunCtx,
    conn: &crate::dto::Connection,
    token: &str,
    timeout: Duration,
) -> Result<Probe, String> {
    let gw = ctx
        .ssh_gateway
        .ok_or("the SSH gateway is not running on this node")?;
    let host_key = conn
        .host_key
        .as_deref()
        .ok_or("the credentials name no SSH host key")?;
    let p = ctx.rt.block_on(breakglass_gateway_ssh::probe::exec(
        gw,
        host_key,
        &conn.user,
        token,
        PROBE_COMMAND,
        timeout,
    ))?;
    Ok(Probe::Ssh(p))
}

/// A PostgreSQL error as the server said it (the driver's `Display` of a
/// server error says only "db error").
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// Drives drill-labelled lifecycles at `rate` per second for `dur`, bounded
/// in count (`rate × dur`) and in time (`dur` plus one step timeout).
fn run_load(ctx: &RunCtx, d: &DrillConfig, rate: u32, dur: Duration) -> LoadResult {
    let planned = u64::from(rate) * dur.as_secs();
    let workers = ((rate as usize).div_ceil(25)).clamp(2, LOAD_WORKERS_MAX);
    let timeout = d.step_timeout();
    let hard_stop = dur + timeout;
    let next = AtomicU64::new(0);
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let failed = AtomicU64::new(0);
    let tta: Mutex<Vec<f64>> = Mutex::new(Vec::new());
    let whole: Mutex<Vec<f64>> = Mutex::new(Vec::new());
    let tokens: Result<(String, Vec<String>), String> = (|| {
        let r = d.requester.token()?;
        let a = d
            .approvers
            .iter()
            .map(|a| a.token())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((r, a))
    })();
    let (requester, approvers) = match tokens {
        Ok(t) => t,
        Err(e) => {
            return LoadResult {
                rate,
                for_s: dur.as_secs(),
                planned,
                completed: 0,
                failed: planned,
                achieved_per_s: 0.0,
                elapsed_s: 0.0,
                time_to_access: Stats::of("time_to_access", Vec::new()),
                lifecycle: Stats::of("lifecycle", Vec::new()),
                errors: vec![clip(&e)],
            };
        }
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let api = ctx.client(timeout);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= planned || start.elapsed() >= hard_stop {
                        return;
                    }
                    // Open loop: lifecycle i starts at i / rate, or at once
                    // when behind.
                    let at = Duration::from_secs_f64(i as f64 / f64::from(rate));
                    if let Some(wait) = at.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    match lifecycle(&api, d, &requester, &approvers) {
                        Ok((a, w)) => {
                            tta.lock().unwrap_or_else(|p| p.into_inner()).push(a);
                            whole.lock().unwrap_or_else(|p| p.into_inner()).push(w);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut errs = errors.lock().unwrap_or_else(|p| p.into_inner());
                            if errs.len() < LOAD_ERRORS_MAX {
                                errs.push(clip(&e));
                            }
                        }
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let tta = tta.into_inner().unwrap_or_else(|p| p.into_inner());
    let whole = whole.into_inner().unwrap_or_else(|p| p.into_inner());
    let completed = tta.len() as u64;
    LoadResult {
        rate,
        for_s: dur.as_secs(),
        planned,
        completed,
        failed: failed.into_inner(),
        achieved_per_s: if elapsed > 0.0 {
            completed as f64 / elapsed
        } else {
            0.0
        },
        elapsed_s: elapsed,
        time_to_access: Stats::of("time_to_access", tta),
        lifecycle: Stats::of("lifecycle", whole),
        errors: errors.into_inner().unwrap_or_else(|p| p.into_inner()),
    }
}

/// One synthetic lifecycle: (time to access, whole lifecycle) in ms.
fn lifecycle(
    api: &Api,
    d: &DrillConfig,
    requester: &str,
    approvers: &[String],
) -> Result<(f64, f64), String> {
    let t0 = Instant::now();
    let v = api.post(
        requester,
        "/v1/requests",
        Some(&json!({
            "target": d.target,
            "role": d.role,
            "duration": d.duration,
            "reason": format!("drill {}: load generator", d.name),
            "drill": d.name,
        })),
    )?;
    let mut r: Request = parse(v, "request")?;
    for a in approvers {
        if r.state == State::Active {
            break;
        }
        let v = api.post(
            a,
            &format!("/v1/requests/{}/approve", r.id),
            Some(&json!({})),
        )?;
        r = parse(v, "approve")?;
    }
    if r.state != State::Active {
        let _ = api.post(requester, &format!("/v1/requests/{}/cancel", r.id), None);
        return Err(format!(
            "request {} is {} after the approvals",
            r.id, r.state
        ));
    }
    let access = ms(t0.elapsed());
    api.post(
        requester,
        &format!("/v1/requests/{}/credentials", r.id),
        None,
    )?;
    api.post(
        requester,
        &format!("/v1/requests/{}/revoke", r.id),
        Some(&json!({"reason": "load generator"})),
    )?;
    Ok((access, ms(t0.elapsed())))
}

/// Starts one scheduling task per configured drill. Each run starts at a
/// random moment in the first tenth of its period (so nodes and drills do
/// not stampede); the node that claims the period's slot in the store runs
/// it, the others skip it.
pub fn spawn_schedulers(app: &Arc<App>) -> Vec<tokio::task::JoinHandle<()>> {
    for d in &app.config.drills {
        for a in &d.approvers {
            if !app.config.principals.iter().any(|p| p.name == a.principal) {
                tracing::warn!(
                    drill = %d.name,
                    approver = %a.principal,
                    "a drill approver is not a configured principal: the drill will fail at its approval step"
                );
            }
        }
    }
    app.config
        .drills
        .iter()
        .map(|d| tokio::spawn(schedule(Arc::downgrade(app), d.clone())))
        .collect()
}

async fn schedule(app: Weak<App>, d: DrillConfig) {
    let every_ms = d.every_s().saturating_mul(1000).max(1);
    loop {
        let now_ms = u64::try_from(now().millis()).unwrap_or(0);
        let slot = now_ms / every_ms + 1;
        let jitter = rand::thread_rng().gen_range(0..=every_ms / 10);
        let at = slot.saturating_mul(every_ms).saturating_add(jitter);
        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms))).await;
        let Some(app) = app.upgrade() else { return };
        if app.writes_blocked().is_some() {
            continue;
        }
        match app.store.claim_drill_run(&d.name, slot).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(drill = %d.name, slot, "another node runs this drill slot");
                continue;
            }
            Err(e) => {
                tracing::warn!(drill = %d.name, error = %e, "cannot claim a drill slot");
                continue;
            }
        }
        let Ok(_guard) = start_running(&app.drills, &d.name) else {
            continue;
        };
        if let Err(e) = run_recorded(&app, &d, Trigger::Schedule).await {
            tracing::error!(drill = %d.name, error = %e, "DRILL FAILED: cannot record the run");
        }
    }
}

/// Follows the event feed and keeps the drill metrics: every node shows
/// the runs of every node (the figures are in `drill.completed`). The last
/// success of each drill is first read from the log.
pub fn spawn_metrics_follower(app: &Arc<App>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(app);
    let mut feed = app.store.subscribe();
    tokio::spawn(async move {
        if let Some(app) = weak.upgrade() {
            let since = now().millis() - (breakglass_core::time::REPORT_WINDOW_MAX_S as i64) * 1000;
            if let Ok(events) = app
                .store
                .drill_results(Timestamp::from_millis(since), REPORT_RUNS_MAX)
                .await
            {
                for e in events {
                    if let Ok(run) = serde_json::from_str::<DrillRun>(&e.details)
                        && run.passed()
                    {
                        app.metrics.drills.success_at(&run.drill, e.time);
                    }
                }
            }
        }
        loop {
            match feed.recv().await {
                Ok(e) => {
                    if e.action != "drill.completed" {
                        continue;
                    }
                    let Some(app) = weak.upgrade() else { return };
                    if let Ok(run) = serde_json::from_str::<DrillRun>(&e.details) {
                        app.metrics.drills.observe(&run, e.time);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "drill metrics lagged behind the feed");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

/// Reads the report of the runs since `since`.
pub async fn read_report(app: &App, since: Timestamp) -> Result<DrillReport, AppError> {
    let events = app.store.drill_results(since, REPORT_RUNS_MAX).await?;
    let truncated = events.len() >= REPORT_RUNS_MAX as usize;
    Ok(report(&events, since, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_schema_states_the_limits_the_server_enforces() {
        let schema = serde_json::to_value(<LoadSpec as utoipa::PartialSchema>::schema())
            .expect("a schema is JSON");
        let props = &schema["properties"];
        assert_eq!(props["rate"]["maximum"], serde_json::json!(LOAD_RATE_MAX));
        assert_eq!(props["rate"]["minimum"], serde_json::json!(1));
        let pattern = props["for"]["pattern"]
            .as_str()
            .expect("a pattern for `for`");
        assert_eq!(
            pattern,
            format!("^([1-9]|1[0-9]|{LOAD_DURATION_MAX_S})s$"),
            "the pattern's top value is LOAD_DURATION_MAX_S"
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of("x", (1..=100).map(f64::from).collect());
        assert_eq!(
            (s.count, s.p50_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        let s = Stats::of("x", vec![3.0]);
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (3.0, 3.0, 3.0));
        let s = Stats::of("x", Vec::new());
        assert_eq!((s.count, s.max_ms), (0, 0.0));
    }

    /// A run of `drill` at `t` ms: passing, or failing at `fail`; every
    /// step before the failing one took `ms`.
    fn event(seq: u64, t: i64, drill: &str, fail: Option<&str>, ms: f64) -> AuditEvent {
        let mut steps = Vec::new();
        for s in STEPS {
            let failed = fail == Some(s);
            steps.push(StepResult {
                step: s.into(),
                ms,
                ok: !failed,
            });
            if failed {
                break;
            }
        }
        let run = DrillRun {
            drill: drill.into(),
            trigger: Trigger::Schedule,
            request_id: Some(format!("r{seq}")),
            session_id: None,
            result: if fail.is_some() { "fail" } else { "pass" }.into(),
            failed_step: fail.map(str::to_string),
            error: fail.map(|s| format!("{s} broke")),
            started_at: Timestamp::from_millis(t),
            steps,
            time_to_access_ms: Some(ms * 2.0),
            time_to_credentials_ms: Some(ms * 3.0),
            time_to_first_statement_ms: fail.is_none().then_some(ms * 4.0),
            cut_latency_ms: fail.is_none().then_some(ms),
        };
        AuditEvent {
            seq,
            time: Timestamp::from_millis(t),
            actor: "system".into(),
            action: "drill.completed".into(),
            request_id: run.request_id.clone(),
            details: run.event_details("n").to_string(),
            hash: [0; 32],
        }
    }

    #[test]
    fn the_report_aggregates_per_drill_and_step() {
        let mut events: Vec<AuditEvent> = (1..=98)
            .map(|i| event(i, 1000 + i as i64, "a", None, i as f64))
            .collect();
        events.push(event(99, 5000, "a", Some("session"), 1000.0));
        events.push(event(100, 6000, "a", Some("approval"), 2000.0));
        events.push(event(101, 7000, "b", None, 1.0));
        // Not a completed run: ignored.
        let mut other = event(102, 8000, "b", None, 1.0);
        other.action = "drill.started".into();
        events.push(other);
        let r = report(&events, Timestamp::from_millis(0), false);
        assert_eq!(r.drills.len(), 2);
        let a = &r.drills[0];
        assert_eq!((a.drill.as_str(), a.runs, a.passed), ("a", 100, 98));
        assert!((a.pass_rate - 0.98).abs() < 1e-9);
        assert_eq!(a.last_success, Some(Timestamp::from_millis(1098)));
        let step = |name: &str| a.steps.iter().find(|s| s.name == name).cloned();
        // 98 passes at 1..=98 ms, plus the session failure's earlier steps.
        let credentials = step("credentials").expect("credentials");
        assert_eq!((credentials.count, credentials.max_ms), (99, 1000.0));
        assert_eq!(credentials.p50_ms, 50.0);
        // Failed steps are not counted among the step's times.
        let session = step("session").expect("session");
        assert_eq!(
            (
                session.count,
                session.p50_ms,
                session.p99_ms,
                session.max_ms
            ),
            (98, 49.0, 98.0, 98.0)
        );
        let request = step("request").expect("request");
        assert_eq!((request.count, request.max_ms), (100, 2000.0));
        let cut = a
            .figures
            .iter()
            .find(|f| f.name == "cut_latency")
            .expect("cut");
        assert_eq!((cut.count, cut.max_ms), (98, 98.0));
        // Newest failure first, with its step and reason.
        let f: Vec<_> = a
            .failures
            .iter()
            .map(|f| f.failed_step.as_deref())
            .collect();
        assert_eq!(f, [Some("approval"), Some("session")]);
        assert_eq!(a.failures[1].error.as_deref(), Some("session broke"));
        assert_eq!(r.drills[1].runs, 1);
    }
}
