//! The benchmarks, one method each. Every one starts its own server in its
//! own temp dir, so none inherits state from another, and stops it by pid.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use breakglass_core::Timestamp;
use breakglass_server::app::now;
use serde_json::{Value, json};

use crate::baseline::{self, Baselines};
use crate::cpu;
use crate::seed::{self, RequestSeed};
use crate::server::{self, AUDITOR, Client, Server, Setup, lead, metric, requester};
use crate::stats::{Goal, Row, Samples, fmt_mb, fmt_secs};

mod notify;
mod ssh;

const MS: f64 = 1e-3;
/// A second of a throughput run counts as quiet when other processes used
/// less than this share of the CPUs.
const QUIET_SECOND: f64 = 0.05;

pub struct Ctx {
    pub bin: PathBuf,
    pub quick: bool,
    pub base: Baselines,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// A data dir with many stored requests, shared by `memory` and
    /// `startup`.
    seeded: Option<(Setup, RequestSeed)>,
    /// How the shared store was seeded, for the details.
    pub seed_note: Option<String>,
}

fn create_body(target: &str, duration: &str) -> Value {
    json!({
        "target": target,
        "role": "read",
        "duration": duration,
        "reason": "INC-48213: replication lag on prod-db, need to read pg_stat_replication",
    })
}

fn str_of<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("no string {key:?} in {v}"))
}

fn expect_state(v: &Value, want: &str, what: &str) -> anyhow::Result<()> {
    let state = str_of(v, "state")?;
    if state != want {
        bail!("{what}: expected state {want}, got {state}");
    }
    Ok(())
}

/// The request id of a created request in `want` state.
fn created(c: &Client, who: &str, body: &Value, want: &str) -> anyhow::Result<String> {
    let v = c
        .post(who, "/v1/requests", Some(body))?
        .expect(201, "create request")?;
    expect_state(&v, want, "create request")?;
    Ok(str_of(&v, "id")?.to_string())
}

fn revoke(c: &Client, who: &str, id: &str) -> anyhow::Result<()> {
    c.post(
        who,
        &format!("/v1/requests/{id}/revoke"),
        Some(&json!({"reason": "done"})),
    )?
    .expect(200, "revoke")?;
    Ok(())
}

fn credentials(c: &Client, who: &str, id: &str) -> anyhow::Result<()> {
    let v = c
        .post(who, &format!("/v1/requests/{id}/credentials"), None)?
        .expect(200, "credentials")?;
    str_of(&v, "token")?;
    Ok(())
}

fn approve(c: &Client, who: &str, id: &str) -> anyhow::Result<Value> {
    c.post(who, &format!("/v1/requests/{id}/approve"), None)?
        .expect(200, "approve")
}

fn own_cpu_secs() -> f64 {
    server::cpu_secs_of("/proc/self/stat")
}

fn p50_p99(s: &Samples) -> String {
    format!("p50 {}, p99 {}", fmt_secs(s.p50()), fmt_secs(s.p99()))
}

impl Ctx {
    pub fn new(bin: PathBuf, quick: bool) -> anyhow::Result<Ctx> {
        Ok(Ctx {
            bin,
            quick,
            base: Baselines::default(),
            rows: Vec::new(),
            notes: Vec::new(),
            seeded: None,
            seed_note: None,
        })
    }

    pub(crate) fn n(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    pub(crate) fn start(&self, setup: &Setup) -> anyhow::Result<Server> {
        Server::start(&self.bin, setup)
    }

    /// fsync, loopback round trip, durable store commit.
    pub fn baselines(&mut self) -> anyhow::Result<()> {
        let dir = tempfile::Builder::new()
            .prefix("breakglass-bench-")
            .tempdir()?;
        self.base.fsync = baseline::fsync(dir.path(), self.n(200, 50))?;
        self.base.rtt = baseline::loopback_rtt(self.n(2000, 500))?;
        self.base.commit = baseline::store_commit(dir.path(), self.n(200, 50))?;
        let b = &self.base;
        self.rows.push(Row::info(
            "baseline: write 4 KiB + fdatasync (temp dir)",
            p50_p99(&b.fsync),
            format!("{} samples", b.fsync.len()),
        ));
        self.rows.push(Row::info(
            "baseline: loopback TCP round trip, 64 B",
            p50_p99(&b.rtt),
            format!("{} ping-pongs between two threads", b.rtt.len()),
        ));
        self.rows.push(Row::info(
            "baseline: durable store commit (1 event)",
            p50_p99(&b.commit),
            format!(
                "{} (SqliteStore::append, WAL, synchronous=FULL)",
                b.describe(b.commit.p50())
            ),
        ));
        Ok(())
    }

    /// request -> active -> credentials with a 0-approval policy, sequential.
    pub fn access(&mut self) -> anyhow::Result<()> {
        let setup = server::setup()?;
        let srv = self.start(&setup)?;
        let c = Client::new(&srv.url);
        let who = requester(0);
        let body = create_body("drill-db", "1h");
        let (warm, n) = (20, self.n(500, 50));
        let (mut total, mut create, mut cred) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..warm + n {
            let t0 = Instant::now();
            let id = created(&c, &who, &body, "active")?;
            let t1 = Instant::now();
            credentials(&c, &who, &id)?;
            let t2 = Instant::now();
            if i >= warm {
                total.push(t2 - t0);
                create.push(t1 - t0);
                cred.push(t2 - t1);
            }
            // Untimed: keep the number of live grants small.
            revoke(&c, &who, &id)?;
        }
        srv.stop()?;
        let (total, create, cred) = (
            Samples::from_durations(&total),
            Samples::from_durations(&create),
            Samples::from_durations(&cred),
        );
        self.rows.push(Row::target(
            "time to access, 0 approvals (request + credentials), p99",
            format!("{} (p50 {})", fmt_secs(total.p99()), fmt_secs(total.p50())),
            total.p99(),
            "<= 10 ms",
            Goal::AtMost(10.0 * MS),
            self.base.describe(total.p99()),
        ));
        self.notes.push(format!(
            "time to access: {n} sequential iterations on one keep-alive connection after {warm} warm-up; POST /v1/requests {} ; POST credentials {}",
            p50_p99(&create),
            p50_p99(&cred)
        ));
        Ok(())
    }

    /// Only the approve call that activates a pending 1-approval request.
    pub fn approve(&mut self) -> anyhow::Result<()> {
        let setup = server::setup()?;
        let srv = self.start(&setup)?;
        let c = Client::new(&srv.url);
        let body = create_body("prod-db", "15m");
        let (warm, n) = (20, self.n(500, 50));
        let mut ids = Vec::with_capacity(warm + n);
        for i in 0..warm + n {
            ids.push((i, created(&c, &requester(i), &body, "pending")?));
        }
        let mut lat = Vec::with_capacity(n);
        for (i, id) in &ids {
            let t0 = Instant::now();
            let v = approve(&c, &lead(*i), id)?;
            let dt = t0.elapsed();
            expect_state(&v, "active", "approve")?;
            if *i >= warm {
                lat.push(dt);
            }
        }
        srv.stop()?;
        let s = Samples::from_durations(&lat);
        self.rows.push(Row::target(
            "approval -> active (the activating approve call), p99",
            format!("{} (p50 {})", fmt_secs(s.p99()), fmt_secs(s.p50())),
            s.p99(),
            "<= 5 ms",
            Goal::AtMost(5.0 * MS),
            self.base.describe(s.p99()),
        ));
        Ok(())
    }

    /// Full lifecycles (request, approve, credentials, revoke) from 64
    /// concurrent clients for a fixed time.
    pub fn lifecycles(&mut self) -> anyhow::Result<()> {
        const CLIENTS: usize = 64;
        let warm = Duration::from_millis(if self.quick { 500 } else { 2000 });
        let window = Duration::from_secs(if self.quick { 3 } else { 10 });
        let setup = server::setup()?;
        let srv = self.start(&setup)?;
        let stop = Arc::new(AtomicBool::new(false));
        let barrier = Arc::new(Barrier::new(CLIENTS + 1));
        let mut handles = Vec::new();
        for t in 0..CLIENTS {
            let (stop, barrier, url) = (stop.clone(), barrier.clone(), srv.url.clone());
            handles.push(std::thread::spawn(move || {
                let c = Client::new(&url);
                let (who, approver) = (requester(t), lead(t));
                let body = create_body("prod-db", "15m");
                let mut done: Vec<(Instant, Duration)> = Vec::new();
                let mut errors: Vec<String> = Vec::new();
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let one = || -> anyhow::Result<()> {
                        let id = created(&c, &who, &body, "pending")?;
                        let v = approve(&c, &approver, &id)?;
                        expect_state(&v, "active", "approve")?;
                        credentials(&c, &who, &id)?;
                        revoke(&c, &who, &id)
                    };
                    match one() {
                        Ok(()) => {
                            let end = Instant::now();
                            done.push((end, end - t0));
                        }
                        Err(e) => {
                            errors.push(format!("{e:#}"));
                            if errors.len() > 1000 {
                                break;
                            }
                        }
                    }
                }
                (done, errors)
            }));
        }
        barrier.wait();
        std::thread::sleep(warm);
        // One sample a second: the machine may be shared, and the seconds
        // when other processes were quiet tell what this one can do.
        let sample = || (Instant::now(), srv.cpu_secs(), own_cpu_secs(), cpu::snap());
        let mut marks = vec![sample()];
        for _ in 0..window.as_secs() {
            std::thread::sleep(Duration::from_secs(1));
            marks.push(sample());
        }
        stop.store(true, Ordering::Relaxed);
        let mut ends = Vec::new();
        let mut lat = Vec::new();
        let mut errors = Vec::new();
        let (t0, srv_cpu0, own_cpu0, sys0) = marks[0];
        let (t1, srv_cpu1, own_cpu1, sys1) = marks[marks.len() - 1];
        for h in handles {
            let (done, errs) = h
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
            for (end, d) in done {
                if end >= t0 && end <= t1 {
                    ends.push(end);
                    lat.push(d);
                }
            }
            errors.extend(errs);
        }
        srv.stop()?;
        let count = ends.len();
        let per_second: Vec<(f64, f64)> = marks
            .windows(2)
            .map(|w| {
                let (a, b) = (w[0], w[1]);
                let n = ends.iter().filter(|e| **e >= a.0 && **e < b.0).count();
                let rate = n as f64 / (b.0 - a.0).as_secs_f64();
                (rate, cpu::between(a.3, b.3, b.1 - a.1).others)
            })
            .collect();
        let quiet: Vec<f64> = per_second
            .iter()
            .filter(|(_, others)| *others < QUIET_SECOND)
            .map(|(r, _)| *r)
            .collect();
        let secs = (t1 - t0).as_secs_f64();
        let rate = count as f64 / secs;
        let s = Samples::from_durations(&lat);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let (srv_cpu, own_cpu) = (srv_cpu1 - srv_cpu0, own_cpu1 - own_cpu0);
        let usage = cpu::between(sys0, sys1, srv_cpu);
        let mut row = Row::target(
            "full lifecycles, 64 concurrent clients",
            format!("{rate:.0} /s"),
            rate,
            ">= 1,000 /s",
            Goal::AtLeast(1000.0),
            format!(
                "{:.0} HTTP calls/s; server {:.0}%, clients {:.0}% of {cores} cores",
                rate * 4.0,
                100.0 * srv_cpu / secs / cores,
                100.0 * own_cpu / secs / cores
            ),
        );
        row.others = Some(usage.others);
        self.rows.push(row);
        let srv_ms = 1e3 * srv_cpu / count.max(1) as f64;
        self.notes.push(format!(
            "lifecycles: {count} in {secs:.1} s after {} warm-up; lifecycle latency {}; server CPU {srv_ms:.2} ms and client CPU {:.2} ms per lifecycle (so the server alone could do about {:.0}/s on {cores} cores); per second (rate, others' CPU): {}; {}; {} errors{}",
            fmt_secs(warm.as_secs_f64()),
            p50_p99(&s),
            1e3 * own_cpu / count.max(1) as f64,
            cores * 1e3 / srv_ms.max(1e-9),
            per_second
                .iter()
                .map(|(r, o)| format!("{r:.0} ({:.0}%)", 100.0 * o))
                .collect::<Vec<_>>()
                .join(", "),
            if quiet.is_empty() {
                format!(
                    "no second had other processes under {:.0}% of the CPUs",
                    100.0 * QUIET_SECOND
                )
            } else {
                format!(
                    "mean {:.0}/s over the {} seconds with other processes under {:.0}%",
                    quiet.iter().sum::<f64>() / quiet.len() as f64,
                    quiet.len(),
                    100.0 * QUIET_SECOND
                )
            },
            errors.len(),
            errors
                .first()
                .map_or_else(String::new, |e| format!(" (first: {e})"))
        ));
        if !errors.is_empty() {
            bail!("{} lifecycles failed, first: {}", errors.len(), errors[0]);
        }
        Ok(())
    }

    /// 10,000 grants from a 0-approval policy expiring within the same
    /// minute; lateness read back from the audit log.
    ///
    /// Spread (`burst = false`): durations chosen so that the expiries are
    /// spread evenly over one minute (about 170 a second). Burst: durations
    /// chosen so that every grant expires within the same second.
    pub fn expiry(&mut self, burst: bool) -> anyhow::Result<()> {
        const CLIENTS: usize = 32;
        let n = self.n(10_000, 1_000);
        let lead_ms: i64 = if self.quick { 10_000 } else { 60_000 };
        let spread_s: i64 = if self.quick { 5 } else { 60 };
        let setup = server::setup()?;
        let srv = self.start(&setup)?;
        let created_at = now().millis();
        let end_at = created_at + lead_ms;
        let t_create = Instant::now();
        let mut handles = Vec::new();
        for t in 0..CLIENTS {
            let url = srv.url.clone();
            let count = n / CLIENTS + usize::from(t < n % CLIENTS);
            handles.push(std::thread::spawn(move || -> anyhow::Result<Vec<i64>> {
                let c = Client::new(&url);
                let who = requester(t);
                let mut expires = Vec::with_capacity(count);
                for j in 0..count {
                    let duration_s = if burst {
                        let left = end_at - now().millis();
                        if left < 3000 {
                            bail!("creating the grants took too long for the planned expiry");
                        }
                        (left + 999) / 1000
                    } else {
                        // Evenly over `spread_s` seconds, in whole seconds.
                        let k = (j * CLIENTS + t) as i64;
                        lead_ms / 1000 + k * spread_s / n as i64
                    };
                    let v = c
                        .post(
                            &who,
                            "/v1/requests",
                            Some(&create_body("drill-db", &format!("{duration_s}s"))),
                        )?
                        .expect(201, "create grant")?;
                    expect_state(&v, "active", "create grant")?;
                    let at = Timestamp::parse_rfc3339(str_of(&v, "expires_at")?)
                        .map_err(|e| anyhow::anyhow!("expires_at: {e}"))?;
                    expires.push(at.millis());
                }
                Ok(expires)
            }));
        }
        let mut expires = Vec::with_capacity(n);
        for h in handles {
            expires.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
            );
        }
        let creation = t_create.elapsed();
        let first = expires.iter().copied().min().unwrap_or(end_at);
        let last = expires.iter().copied().max().unwrap_or(end_at);
        eprintln!(
            "   {n} grants created in {}; they expire over {} ms; waiting",
            fmt_secs(creation.as_secs_f64()),
            last - first
        );
        // Wait for the last expiry, then (bounded) for the server to end all.
        let wait = (last - now().millis() + 200).max(0) as u64;
        std::thread::sleep(Duration::from_millis(wait));
        let admin = Client::new(&srv.url);
        let deadline = Instant::now() + Duration::from_secs(60);
        let metrics = loop {
            let m = admin.metrics()?;
            let expired = metric(&m, "breakglass_requests{state=\"expired\"}").unwrap_or(0.0);
            if expired as usize >= n {
                break m;
            }
            if Instant::now() > deadline {
                bail!("only {expired} of {n} grants had expired 60 s after the last expires_at");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // Lateness of every `request.expired` event, from the audit log.
        let mut lateness = Vec::with_capacity(n);
        let mut after = 0u64;
        loop {
            let page = admin
                .get(AUDITOR, &format!("/v1/audit?after={after}&limit=10000"))?
                .expect(200, "audit page")?;
            let events = page
                .get("events")
                .and_then(Value::as_array)
                .context("no events in the audit page")?;
            for e in events {
                if e.get("action").and_then(Value::as_str) == Some("request.expired") {
                    let ms = e
                        .pointer("/details/lateness_ms")
                        .and_then(Value::as_i64)
                        .context("request.expired without details.lateness_ms")?;
                    lateness.push(ms as f64 * MS);
                }
            }
            match page.get("next").and_then(Value::as_u64) {
                Some(next) => after = next,
                None => break,
            }
        }
        srv.stop()?;
        if lateness.len() != n {
            bail!(
                "the audit log has {} request.expired events, expected {n}",
                lateness.len()
            );
        }
        let s = Samples::from_secs(lateness);
        let within_50 = metric(
            &metrics,
            "breakglass_expiry_lateness_seconds_bucket{le=\"0.05\"}",
        )
        .unwrap_or(0.0);
        let what = if burst {
            format!("expiry lateness, {n} grants ending within one second")
        } else {
            format!(
                "expiry lateness, {n} grants ending spread over {:.0} s",
                (last - first) as f64 / 1e3
            )
        };
        self.rows.push(Row::target(
            format!("{what}, p99"),
            format!("{} (p50 {})", fmt_secs(s.p99()), fmt_secs(s.p50())),
            s.p99(),
            "<= 50 ms",
            Goal::AtMost(50.0 * MS),
            self.base.describe(s.p99()),
        ));
        self.rows.push(Row::target(
            format!("{what}, max"),
            fmt_secs(s.max()),
            s.max(),
            "<= 250 ms",
            Goal::AtMost(250.0 * MS),
            String::new(),
        ));
        self.notes.push(format!(
            "{what}: created in {} by {CLIENTS} clients ({:.0} grants/s); expiries spread over {} ms; lateness from {} `request.expired` audit events: p50 {}, p99 {}, max {}, mean {}; /metrics histogram: {:.1}% within 50 ms",
            fmt_secs(creation.as_secs_f64()),
            n as f64 / creation.as_secs_f64(),
            last - first,
            s.len(),
            fmt_secs(s.p50()),
            fmt_secs(s.p99()),
            fmt_secs(s.max()),
            fmt_secs(s.mean()),
            100.0 * within_50 / n as f64
        ));
        Ok(())
    }

    /// `breakglass audit verify --config FILE` over a store with 1,000,000
    /// events built directly through the store.
    pub fn audit_verify(&mut self) -> anyhow::Result<()> {
        let setup = server::setup()?;
        let events = self.n(1_000_000, 100_000) as u64;
        eprintln!("   seeding {events} audit events");
        let seeded = seed::audit_log(&setup.data_dir(), events)?;
        eprintln!(
            "   seeded in {} ({})",
            fmt_secs(seeded.took.as_secs_f64()),
            fmt_mb(seeded.db_bytes)
        );
        let runs = self.n(3, 1);
        let mut times = Vec::new();
        for _ in 0..runs {
            let t0 = Instant::now();
            let out = std::process::Command::new(&self.bin)
                .args(["--output", "json", "audit", "verify", "--config"])
                .arg(&setup.config)
                .output()
                .context("cannot run breakglass audit verify")?;
            let took = t0.elapsed();
            if !out.status.success() {
                bail!(
                    "audit verify failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let report: Value = serde_json::from_slice(&out.stdout)
                .context("audit verify --output json printed no JSON")?;
            if report.get("ok") != Some(&Value::Bool(true))
                || report.get("events").and_then(Value::as_u64) != Some(seeded.events)
            {
                bail!("unexpected audit verify report: {report}");
            }
            times.push(took);
        }
        let s = Samples::from_durations(&times);
        let secs = s.p50();
        let per_million = secs * 1e6 / seeded.events as f64;
        self.rows.push(Row::target(
            if self.quick {
                "`audit verify`, seconds per 1,000,000 events (scaled)"
            } else {
                "`audit verify`, 1,000,000 events"
            },
            fmt_secs(per_million),
            per_million,
            "<= 3 s",
            Goal::AtMost(3.0),
            format!("{:.0} events/s", seeded.events as f64 / secs),
        ));
        self.notes.push(format!(
            "audit verify: {} events and {} signed checkpoints ({} on disk, seeded in {}); the whole `breakglass audit verify` process timed end to end, median of {runs} runs: {}",
            seeded.events,
            seeded.checkpoints,
            fmt_mb(seeded.db_bytes),
            fmt_secs(seeded.took.as_secs_f64()),
            times
                .iter()
                .map(|t| fmt_secs(t.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(())
    }

    /// The shared data dir with many stored requests, seeded on first use.
    fn seeded(&mut self) -> anyhow::Result<&Setup> {
        if self.seeded.is_none() {
            let setup = server::setup()?;
            let n = self.n(100_000, 10_000) as u64;
            eprintln!("   seeding {n} stored requests");
            let s = seed::requests(&setup.data_dir(), n)?;
            eprintln!("   seeded in {}", fmt_secs(s.took.as_secs_f64()));
            self.seed_note = Some(format!(
                "stored requests: {} ({} pending, the rest expired or released) with {} audit events, written through the store in {}",
                s.requests,
                s.pending,
                s.events,
                fmt_secs(s.took.as_secs_f64())
            ));
            self.seeded = Some((setup, s));
        }
        match &self.seeded {
            Some((setup, _)) => Ok(setup),
            None => bail!("no seeded store"),
        }
    }

    /// A server on the shared seeded store, and how many requests it holds.
    pub(crate) fn seeded_server(&mut self) -> anyhow::Result<(Server, u64)> {
        let bin = self.bin.clone();
        let setup = self.seeded()?;
        let srv = Server::start(&bin, setup)?;
        Ok((srv, self.stored_requests()))
    }

    fn stored_requests(&self) -> u64 {
        self.seeded.as_ref().map_or(0, |(_, s)| s.requests)
    }

    /// RSS of the idle server, and with many stored requests after some list
    /// queries.
    pub fn memory(&mut self) -> anyhow::Result<()> {
        let setup = server::setup()?;
        let srv = self.start(&setup)?;
        let c = Client::new(&srv.url);
        for i in 0..10 {
            let who = requester(i);
            let id = created(&c, &who, &create_body("drill-db", "1h"), "active")?;
            credentials(&c, &who, &id)?;
            revoke(&c, &who, &id)?;
            let id = created(&c, &who, &create_body("prod-db", "15m"), "pending")?;
            approve(&c, &lead(i), &id)?;
        }
        c.get(&lead(0), "/v1/requests?limit=100")?
            .expect(200, "list")?;
        c.get(AUDITOR, "/v1/audit?limit=1000")?
            .expect(200, "audit")?;
        c.metrics()?;
        std::thread::sleep(Duration::from_millis(300));
        let idle = srv.rss()?;
        srv.stop()?;
        self.rows.push(Row::target(
            "memory: idle server (RSS)",
            fmt_mb(idle.rss),
            idle.rss as f64 / 1e6,
            "<= 30 MB",
            Goal::AtMost(30.0),
            idle.describe(),
        ));

        let quick = self.quick;
        let bin = self.bin.clone();
        let srv = Server::start(&bin, self.seeded()?)?;
        let c = Client::new(&srv.url);
        let mut queries: Vec<(String, Samples)> = Vec::new();
        let mut time = |label: &str, who: &str, path: &str| -> anyhow::Result<()> {
            let mut v = Vec::new();
            for _ in 0..if quick { 3 } else { 10 } {
                let t0 = Instant::now();
                c.get(who, path)?.expect(200, label)?;
                v.push(t0.elapsed());
            }
            queries.push((label.to_string(), Samples::from_durations(&v)));
            Ok(())
        };
        time("admin, newest 500", AUDITOR, "/v1/requests?limit=500")?;
        time(
            "admin, state=expired, 500",
            AUDITOR,
            "/v1/requests?state=expired&limit=500",
        )?;
        time(
            "approver (visible to sre-leads), 100",
            &lead(0),
            "/v1/requests?limit=100",
        )?;
        time(
            "approver, state=pending, 100",
            &lead(0),
            "/v1/requests?state=pending&limit=100",
        )?;
        time(
            "requester, mine, 100",
            &requester(0),
            "/v1/requests?mine=true&limit=100",
        )?;
        // Page through the newest 10,000 as an admin.
        let mut after: Option<String> = None;
        let t0 = Instant::now();
        for _ in 0..20 {
            let path = match &after {
                Some(a) => format!("/v1/requests?limit=500&after={a}"),
                None => "/v1/requests?limit=500".into(),
            };
            let v = c.get(AUDITOR, &path)?.expect(200, "list page")?;
            after = v.get("next").and_then(Value::as_str).map(String::from);
            if after.is_none() {
                break;
            }
        }
        let paging = t0.elapsed();
        let t0 = Instant::now();
        c.metrics()?;
        let metrics_t = t0.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        let mem = srv.rss()?;
        srv.stop()?;
        let stored = self.stored_requests();
        self.rows.push(Row::target(
            format!("memory: {stored} stored requests, after list queries (RSS)"),
            fmt_mb(mem.rss),
            mem.rss as f64 / 1e6,
            "<= 200 MB",
            Goal::AtMost(200.0),
            mem.describe(),
        ));
        self.notes.push(format!(
            "list queries over {stored} stored requests (median): {}; 20 pages of 500 as admin {}; GET /metrics {}",
            queries
                .iter()
                .map(|(l, s)| format!("{l} {}", fmt_secs(s.p50())))
                .collect::<Vec<_>>()
                .join("; "),
            fmt_secs(paging.as_secs_f64()),
            fmt_secs(metrics_t.as_secs_f64())
        ));
        Ok(())
    }

    /// Spawn to the first 200 on `/readyz`: an empty store and a store with
    /// many requests.
    pub fn startup(&mut self) -> anyhow::Result<()> {
        let runs = self.n(10, 3);
        let measure = |bin: &PathBuf, setup: &Setup| -> anyhow::Result<Samples> {
            let mut v = Vec::new();
            for _ in 0..runs {
                let srv = Server::start(bin, setup)?;
                v.push(srv.startup);
                srv.stop()?;
            }
            Ok(Samples::from_durations(&v))
        };
        let empty = server::setup()?;
        let first = {
            let srv = self.start(&empty)?;
            let t = srv.startup;
            srv.stop()?;
            t
        };
        let s = measure(&self.bin, &empty)?;
        self.rows.push(Row::target(
            "start-up to ready, empty store (median)",
            fmt_secs(s.p50()),
            s.p50(),
            "<= 200 ms",
            Goal::AtMost(200.0 * MS),
            format!(
                "max {}; very first start (creates key and schema) {}",
                fmt_secs(s.max()),
                fmt_secs(first.as_secs_f64())
            ),
        ));
        let bin = self.bin.clone();
        let s = measure(&bin, self.seeded()?)?;
        let stored = self.stored_requests();
        self.rows.push(Row::target(
            format!("start-up to ready, {stored} stored requests (median)"),
            fmt_secs(s.p50()),
            s.p50(),
            "<= 200 ms",
            Goal::AtMost(200.0 * MS),
            format!("max {}", fmt_secs(s.max())),
        ));
        self.notes.push(format!(
            "start-up: time from spawning `breakglass serve` to the first 200 on /readyz (polled every 0.5 ms on fresh connections), {runs} starts each, stopped with SIGTERM in between"
        ));
        Ok(())
    }
}
