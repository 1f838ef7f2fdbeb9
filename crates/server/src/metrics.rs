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
        out
    }
}
