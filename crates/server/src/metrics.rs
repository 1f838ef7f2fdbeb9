//! Prometheus metrics in the text exposition format, kept in atomics: no
//! registry, no locks on the hot path except the per-route map.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use breakglass_core::State;
use breakglass_core::audit::AuditEvent;

/// Latency buckets in seconds, from 100 µs to 10 s.
const BUCKETS_S: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];
/// Distinct (method, route, status) label sets kept at most; the routes are
/// the router's templates, so this only guards against surprises.
const HTTP_SERIES_MAX: usize = 512;

pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        for (i, b) in BUCKETS_S.iter().enumerate() {
            if seconds <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS_S.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braced} {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub activations: AtomicU64,
    pub expiry_lateness: Histogram,
    pub events: AtomicU64,
    /// API connections refused over `server.max_connections`.
    pub refused_connections: AtomicU64,
    http: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    /// Drill runs of every node, from the feed.
    pub drills: DrillMetrics,
}

/// Drill figures per drill: step and figure histograms, runs by result,
/// the time of the last success (so an alert can fire on "no successful
/// drill in 12 h").
#[derive(Default)]
pub struct DrillMetrics {
    /// (drill, step) and (drill, figure).
    steps: Mutex<BTreeMap<(String, String), Histogram>>,
    figures: Mutex<BTreeMap<(String, String), Histogram>>,
    /// (drill, result) -> runs.
    runs: Mutex<BTreeMap<(String, String), u64>>,
    /// drill -> Unix time of the last pass, in seconds.
    last_success: Mutex<BTreeMap<String, f64>>,
}

impl DrillMetrics {
    /// Counts one completed run at `at`.
    pub fn observe(&self, run: &crate::drill::DrillRun, at: breakglass_core::Timestamp) {
        let cap = crate::drill::DRILL_SERIES_MAX;
        {
            let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
            for s in run.steps.iter().filter(|s| s.ok) {
                let key = (run.drill.clone(), s.step.clone());
                if steps.contains_key(&key) || steps.len() < cap {
                    steps.entry(key).or_default().observe(s.ms / 1e3);
                }
            }
        }
        {
            let mut figures = self.figures.lock().unwrap_or_else(|p| p.into_inner());
            for (name, v) in [
                ("time_to_access", run.time_to_access_ms),
                ("time_to_credentials", run.time_to_credentials_ms),
                ("time_to_first_statement", run.time_to_first_statement_ms),
                ("cut_latency", run.cut_latency_ms),
            ] {
                let Some(v) = v else { continue };
                let key = (run.drill.clone(), name.to_string());
                if figures.contains_key(&key) || figures.len() < cap {
                    figures.entry(key).or_default().observe(v / 1e3);
                }
            }
        }
        {
            let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            let key = (run.drill.clone(), run.result.clone());
            if runs.contains_key(&key) || runs.len() < cap {
                *runs.entry(key).or_default() += 1;
            }
        }
        if run.passed() {
            self.success_at(&run.drill, at);
        }
    }

    /// Notes a pass of `drill` at `at` (keeps the newest).
    pub fn success_at(&self, drill: &str, at: breakglass_core::Timestamp) {
        let mut last = self.last_success.lock().unwrap_or_else(|p| p.into_inner());
        if !last.contains_key(drill) && last.len() >= crate::drill::DRILL_SERIES_MAX {
            return;
        }
        let t = at.millis() as f64 / 1e3;
        let e = last.entry(drill.to_string()).or_insert(t);
        if *e < t {
            *e = t;
        }
    }

    fn render(&self, out: &mut String) {
        out.push_str("# HELP breakglass_drill_step_duration_seconds Time of each completed step of a drill run.\n# TYPE breakglass_drill_step_duration_seconds histogram\n");
        for ((drill, step), h) in self.steps.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let labels = format!("drill=\"{}\",step=\"{}\"", escape(drill), escape(step));
            h.render(out, "breakglass_drill_step_duration_seconds", &labels);
        }
        out.push_str("# HELP breakglass_drill_figure_seconds Drill figures: time to access, to credentials, to first statement, cut latency.\n# TYPE breakglass_drill_figure_seconds histogram\n");
        for ((drill, figure), h) in self
            .figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let labels = format!("drill=\"{}\",figure=\"{}\"", escape(drill), escape(figure));
            h.render(out, "breakglass_drill_figure_seconds", &labels);
        }
        out.push_str("# HELP breakglass_drill_runs_total Drill runs by result.\n# TYPE breakglass_drill_runs_total counter\n");
        for ((drill, result), n) in self.runs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "breakglass_drill_runs_total{{drill=\"{}\",result=\"{}\"}} {n}",
                escape(drill),
                escape(result)
            );
        }
        out.push_str("# HELP breakglass_drill_last_success_timestamp_seconds Unix time of the drill's last pass.\n# TYPE breakglass_drill_last_success_timestamp_seconds gauge\n");
        for (drill, t) in self
            .last_success
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "breakglass_drill_last_success_timestamp_seconds{{drill=\"{}\"}} {t}",
                escape(drill)
            );
        }
    }
}

/// A label value in the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts what a committed event means.
    pub fn observe_event(&self, e: &AuditEvent) {
        self.events.fetch_add(1, Ordering::Relaxed);
        match e.action.as_str() {
            "request.activated" => {
                self.activations.fetch_add(1, Ordering::Relaxed);
            }
            "request.expired" => {
                // The lateness is recorded in the event itself.
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&e.details)
                    && let Some(ms) = v.get("lateness_ms").and_then(|m| m.as_i64())
                {
                    self.expiry_lateness.observe(ms as f64 / 1000.0);
                }
            }
            _ => {}
        }
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut map = self.http.lock().unwrap_or_else(|p| p.into_inner());
        let key = (method.to_string(), route.to_string(), status);
        if !map.contains_key(&key) && map.len() >= HTTP_SERIES_MAX {
            return;
        }
        map.entry(key).or_default().observe(seconds);
    }

    /// Renders every metric; `states` are the current request counts.
    pub fn render(&self, states: &[(State, u64)], head_seq: u64, tracked: usize) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP breakglass_requests Requests by state.\n# TYPE breakglass_requests gauge\n",
        );
        for s in State::ALL {
            let n = states
                .iter()
                .find(|(st, _)| *st == s)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "breakglass_requests{{state=\"{s}\"}} {n}");
        }
        out.push_str("# HELP breakglass_grant_activations_total Grants activated since start.\n# TYPE breakglass_grant_activations_total counter\n");
        let _ = writeln!(
            out,
            "breakglass_grant_activations_total {}",
            self.activations.load(Ordering::Relaxed)
        );
        out.push_str("# HELP breakglass_expiry_lateness_seconds Time from expires_at to the grant being ended.\n# TYPE breakglass_expiry_lateness_seconds histogram\n");
        self.expiry_lateness
            .render(&mut out, "breakglass_expiry_lateness_seconds", "");
        out.push_str("# HELP breakglass_audit_events_total Audit events committed since start.\n# TYPE breakglass_audit_events_total counter\n");
        let _ = writeln!(
            out,
            "breakglass_audit_events_total {}",
            self.events.load(Ordering::Relaxed)
        );
        out.push_str("# HELP breakglass_audit_head_seq Sequence number of the newest audit event.\n# TYPE breakglass_audit_head_seq gauge\n");
        let _ = writeln!(out, "breakglass_audit_head_seq {head_seq}");
        out.push_str("# HELP breakglass_scheduled_deadlines Requests with a pending deadline.\n# TYPE breakglass_scheduled_deadlines gauge\n");
        let _ = writeln!(out, "breakglass_scheduled_deadlines {tracked}");
        out.push_str("# HELP breakglass_http_connections_refused_total API connections refused over server.max_connections.\n# TYPE breakglass_http_connections_refused_total counter\n");
        let _ = writeln!(
            out,
            "breakglass_http_connections_refused_total {}",
            self.refused_connections.load(Ordering::Relaxed)
        );
        out.push_str("# HELP breakglass_http_request_duration_seconds HTTP request latency.\n# TYPE breakglass_http_request_duration_seconds histogram\n");
        let map = self.http.lock().unwrap_or_else(|p| p.into_inner());
        for ((method, route, status), h) in map.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            h.render(
                &mut out,
                "breakglass_http_request_duration_seconds",
                &labels,
            );
        }
        drop(map);
        self.drills.render(&mut out);
        out
    }
}
