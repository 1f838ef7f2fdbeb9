//! The PostgreSQL gateway benchmarks: `pgbench -S` throughput against the
//! cluster directly, through the breakglass gateway and through pgbouncer
//! (interleaved in the same run); the latency the gateway adds to each
//! statement; and how long live sessions take to be cut when their grants
//! are revoked or expire.
//!
//! Everything is real: a throwaway PostgreSQL cluster and pgbouncer from
//! `breakglass-testkit`, the release `breakglass serve` with
//! `[gateway.postgres]`, the system's `pgbench`, and for the cut a minimal
//! protocol client built on the gateway's own codec.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use breakglass_core::Timestamp;
use breakglass_core::token::sha256_hex;
use breakglass_gateway_postgres::codec;
use breakglass_testkit::{AuthMethod, PgBouncer, PgCluster, client_command};
use serde_json::{Value, json};

use crate::cpu;
use crate::scenarios::Ctx;
use crate::server::{self, AUDITOR, Client, Server, Setup, requester};
use crate::stats::{Goal, Row, Samples, fmt_secs};

/// The benchmark database in the cluster.
const DB: &str = "bench";
/// The PostgreSQL role the gateway logs in as; pgbench direct and pgbouncer
/// use it too, so all three paths authenticate the same way (SCRAM).
const PG_USER: &str = "bg_bench";
const PG_PASSWORD: &str = "bench-pw-7c1e94";
/// The breakglass target in front of [`DB`].
const TARGET: &str = "bench-db";
/// `pgbench -i -s`: 1,000,000 rows in `pgbench_accounts`.
const SCALE: u32 = 10;
/// `pgbench -c` and `-j` of the throughput runs.
const CLIENTS: usize = 8;
const THREADS: usize = 2;
/// The DESIGN §8 targets.
const GATEWAY_VS_DIRECT_MIN: f64 = 0.80;
const CUT_MAX_S: f64 = 0.100;
/// A pgbench run may take this much longer than its `-T` before it is
/// killed.
const PGBENCH_GRACE: Duration = Duration::from_secs(60);
/// How long a cut may take before the benchmark gives up on it.
const CUT_WAIT: Duration = Duration::from_secs(10);
/// The query the cut sessions are running when their grant ends.
const SLEEP_SQL: &str = "select pg_sleep(60)";
/// Frames the raw client accepts (the gateway's answers are small).
const FRAME_LEN_MAX: usize = 1 << 20;

/// Only `oncall` may request the benchmark target, without approval.
const POLICY: &str = r#"
@id("gateway-bench")
@approvals("0")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"gateway");
"#;

/// Where pgbench connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    Gateway,
    Bouncer,
    /// [`BareRelay`]: bytes copied both ways, nothing else.
    Relay,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Gateway => "gateway",
            Via::Bouncer => "pgbouncer",
            Via::Relay => "bare relay",
        }
    }
}

/// Name prefix of the bare relay's threads (their CPU is read from
/// `/proc/self/task`).
const RELAY_THREAD: &str = "bare-relay";

/// The floor for a relay built like the gateway (tokio, two worker
/// threads, one task per connection): it copies bytes between the client
/// and PostgreSQL with `copy_bidirectional` and does nothing else, no
/// parsing, no recording, no authentication of its own (pgbench logs in to
/// PostgreSQL through it). Measured beside the gateway so the gateway's own
/// cost shows apart from what any such relay costs on this machine.
struct BareRelay {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareRelay {
    fn start(upstream_port: u16) -> anyhow::Result<BareRelay> {
        let listener = std::net::TcpListener::bind(server::free_port()?)
            .context("bare relay: cannot listen")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(RELAY_THREAD)
            .enable_all()
            .build()
            .context("bare relay: cannot start a runtime")?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(RELAY_THREAD.into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let accept = async {
                        while let Ok((mut client, _)) = listener.accept().await {
                            tokio::spawn(async move {
                                let _ = client.set_nodelay(true);
                                let Ok(mut up) =
                                    tokio::net::TcpStream::connect(("127.0.0.1", upstream_port))
                                        .await
                                else {
                                    return;
                                };
                                let _ = up.set_nodelay(true);
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime ends the copy tasks and their sockets.
            })?;
        Ok(BareRelay {
            port,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for BareRelay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A libpq endpoint: port, user, password, database.
#[derive(Debug, Clone)]
struct Endpoint {
    port: u16,
    user: String,
    password: String,
    db: String,
}

/// What one pgbench run reported, and where the CPU went meanwhile.
#[derive(Debug, Clone)]
struct Run {
    tps: f64,
    transactions: u64,
    /// Bytes the gateway's session recordings grew by.
    recorded: u64,
    cpu: Split,
}

/// CPU seconds per component over one run, and the share of the machine
/// other processes used.
#[derive(Debug, Clone, Copy, Default)]
struct Split {
    secs: f64,
    pgbench: f64,
    postgres: f64,
    breakglass: f64,
    /// Of `breakglass`: user and system time, and its `recording-flush`
    /// thread (the fdatasync of every recording, every 5 ms).
    bg_user: f64,
    bg_sys: f64,
    bg_flush: f64,
    pgbouncer: f64,
    /// The bare relay's threads (in this process).
    relay: f64,
    /// Interrupts and softirqs (`/proc/stat`): mostly loopback TCP, which
    /// the kernel does not charge to any process.
    irq: f64,
    /// The ext4 journal threads (`jbd2/*`): the kernel's part of fsyncs.
    journal: f64,
    /// Share of all CPUs used by everything else.
    others: f64,
}

impl Split {
    /// "pgbench 41, postgres 120, breakglass 60 (sum 221) µs CPU per
    /// transaction".
    fn per_txn(&self, txns: u64) -> String {
        let per = |s: f64| s * 1e6 / txns.max(1) as f64;
        let mut parts = vec![
            format!("pgbench {:.0}", per(self.pgbench)),
            format!("postgres {:.0}", per(self.postgres)),
        ];
        if self.breakglass > 0.01 * self.secs {
            parts.push(format!(
                "breakglass {:.0} (user {:.0}, system {:.0}; recording-flush thread {:.0})",
                per(self.breakglass),
                per(self.bg_user),
                per(self.bg_sys),
                per(self.bg_flush)
            ));
        }
        if self.pgbouncer > 0.01 * self.secs {
            parts.push(format!("pgbouncer {:.0}", per(self.pgbouncer)));
        }
        if self.relay > 0.01 * self.secs {
            parts.push(format!("bare relay {:.0}", per(self.relay)));
        }
        parts.push(format!("irq/softirq {:.0}", per(self.irq)));
        if self.journal > 0.001 * self.secs {
            parts.push(format!("ext4 journal {:.0}", per(self.journal)));
        }
        let total = self.pgbench
            + self.postgres
            + self.breakglass
            + self.pgbouncer
            + self.relay
            + self.irq
            + self.journal;
        format!(
            "{} (sum {:.0}) µs CPU per transaction",
            parts.join(", "),
            per(total)
        )
    }

    /// Share of the cores each component used.
    fn shares(&self, cores: f64) -> String {
        let s = |x: f64| 100.0 * x / self.secs.max(1e-9) / cores;
        let mut parts = vec![
            format!("pgbench {:.0}%", s(self.pgbench)),
            format!("postgres {:.0}%", s(self.postgres)),
        ];
        if self.breakglass > 0.01 * self.secs {
            parts.push(format!("breakglass {:.0}%", s(self.breakglass)));
        }
        if self.pgbouncer > 0.01 * self.secs {
            parts.push(format!("pgbouncer {:.0}%", s(self.pgbouncer)));
        }
        if self.relay > 0.01 * self.secs {
            parts.push(format!("bare relay {:.0}%", s(self.relay)));
        }
        parts.push(format!("irq/softirq {:.0}%", s(self.irq)));
        if self.journal > 0.001 * self.secs {
            parts.push(format!("ext4 journal {:.0}%", s(self.journal)));
        }
        parts.push(format!("others {:.0}%", 100.0 * self.others));
        format!("{} of {cores} cores", parts.join(", "))
    }
}

/// CPU counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    sys: cpu::Snap,
    /// irq + softirq of all CPUs, seconds.
    irq: f64,
    /// This process's reaped children: the pgbench runs.
    children: f64,
    postgres: f64,
    /// breakglass: user, system, and its recording-flush thread.
    bg_user: f64,
    bg_sys: f64,
    bg_flush: f64,
    pgbouncer: f64,
    relay: f64,
    journal: f64,
}

/// The processes whose CPU time is tracked.
struct Procs {
    postmaster: Option<u32>,
    breakglass: Option<u32>,
    pgbouncer: Option<u32>,
}

impl Procs {
    fn mark(&self) -> Mark {
        let own = crate::server::cpu_fields_of("/proc/self/stat");
        let children = own.iter().skip(2).sum::<f64>();
        let bg = self.breakglass.and_then(stat_of);
        let bg_flush = self
            .breakglass
            .map_or(0.0, |p| thread_cpu(p, "recording-flu"));
        Mark {
            at: Instant::now(),
            sys: cpu::snap(),
            irq: irq_secs(),
            children,
            postgres: self.postmaster.map_or(0.0, postgres_cpu),
            bg_user: bg.as_ref().map_or(0.0, |s| s.user),
            bg_sys: bg.as_ref().map_or(0.0, |s| s.sys),
            bg_flush,
            pgbouncer: self
                .pgbouncer
                .and_then(stat_of)
                .map_or(0.0, |s| s.user + s.sys),
            relay: thread_cpu(std::process::id(), RELAY_THREAD),
            journal: journal_cpu(),
        }
    }
}

fn split(a: &Mark, b: &Mark) -> Split {
    let d = |x: f64, y: f64| (y - x).max(0.0);
    let postgres = d(a.postgres, b.postgres);
    let bg_user = d(a.bg_user, b.bg_user);
    let bg_sys = d(a.bg_sys, b.bg_sys);
    let breakglass = bg_user + bg_sys;
    let pgbouncer = d(a.pgbouncer, b.pgbouncer);
    let relay = d(a.relay, b.relay);
    let irq = d(a.irq, b.irq);
    let journal = d(a.journal, b.journal);
    // PostgreSQL is not a child of this process: count it as ours, like the
    // live breakglass and pgbouncer children; interrupts and the journal
    // are shown on their own.
    let u = cpu::between(
        a.sys,
        b.sys,
        // (the bare relay runs in this process: already in `own`)
        postgres + breakglass + pgbouncer + irq + journal,
    );
    Split {
        secs: (b.at - a.at).as_secs_f64(),
        pgbench: d(a.children, b.children),
        postgres,
        breakglass,
        bg_user,
        bg_sys,
        bg_flush: d(a.bg_flush, b.bg_flush),
        pgbouncer,
        relay,
        irq,
        journal,
        others: u.others,
    }
}

/// irq + softirq seconds of all CPUs, from `/proc/stat`.
fn irq_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|x| x.parse::<f64>().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq
    (v.get(5).copied().unwrap_or(0.0) + v.get(6).copied().unwrap_or(0.0)) / server::clock_ticks()
}

/// CPU seconds of the threads of `pid` whose name starts with `name`
/// (thread names are cut at 15 bytes).
fn thread_cpu(pid: u32, name: &str) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(name))
        })
        .filter_map(|t| stat_at(&t.path().join("stat")))
        .map(|s| s.user + s.sys)
        .sum()
}

/// Fields of `/proc/PID/stat` this module needs, in seconds.
struct Stat {
    ppid: u32,
    user: f64,
    sys: f64,
    /// user + system of reaped children.
    children: f64,
}

fn stat_of(pid: u32) -> Option<Stat> {
    stat_at(Path::new(&format!("/proc/{pid}/stat")))
}

fn stat_at(path: &Path) -> Option<Stat> {
    let text = std::fs::read_to_string(path).ok()?;
    // After the parenthesised command name: state (0), ppid (1), ...,
    // utime (11), stime (12), cutime (13), cstime (14).
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let secs = |i: usize| {
        f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / server::clock_ticks()
    };
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        user: secs(11),
        sys: secs(12),
        children: secs(13) + secs(14),
    })
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The postmaster of the cluster whose data directory is `data`.
fn find_postmaster(data: &Path) -> Option<u32> {
    let data = data.to_string_lossy();
    pids()
        .into_iter()
        .find(|p| comm(*p) == "postgres" && cmdline(*p).iter().any(|a| *a == data))
}

/// The pgbouncer listening on `port` (read from its ini file).
fn find_pgbouncer(port: u16) -> Option<u32> {
    let want = format!("listen_port = {port}\n");
    pids().into_iter().find(|p| {
        comm(*p) == "pgbouncer"
            && cmdline(*p).iter().any(|a| {
                a.ends_with("pgbouncer.ini")
                    && std::fs::read_to_string(a).is_ok_and(|ini| ini.contains(&want))
            })
    })
}

/// CPU seconds of a postmaster, its reaped children (ended backends) and its
/// live children (backends, background workers).
fn postgres_cpu(postmaster: u32) -> f64 {
    let own = stat_of(postmaster).map_or(0.0, |s| s.user + s.sys + s.children);
    let live: f64 = pids()
        .into_iter()
        .filter_map(stat_of)
        .filter(|s| s.ppid == postmaster)
        .map(|s| s.user + s.sys)
        .sum();
    own + live
}

/// CPU seconds of the ext4 journal threads (`jbd2/DEV`): they commit what
/// fsyncs ask for, and count as other processes.
fn journal_cpu() -> f64 {
    pids()
        .into_iter()
        .filter(|p| comm(*p).starts_with("jbd2/"))
        .filter_map(stat_of)
        .map(|s| s.user + s.sys)
        .sum()
}

/// Bytes of the files in `dir` (0 if it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Microseconds since the Unix epoch.
fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn str_of<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("no string {key:?} in {v}"))
}

/// An active grant on the benchmark target and its credential.
struct Grant {
    id: String,
    principal: String,
    token: String,
    /// `expires_at` of the request, ms since the epoch.
    expires_at_ms: i64,
}

fn grant(c: &Client, who: &str, duration: &str) -> anyhow::Result<Grant> {
    let body = json!({
        "target": TARGET,
        "role": "read",
        "duration": duration,
        "reason": "INC-48213: benchmark of the PostgreSQL gateway",
    });
    let v = c
        .post(who, "/v1/requests", Some(&body))?
        .expect(201, "create request")?;
    if str_of(&v, "state")? != "active" {
        bail!("create request: expected an active grant, got {v}");
    }
    let id = str_of(&v, "id")?.to_string();
    let expires_at_ms = Timestamp::parse_rfc3339(str_of(&v, "expires_at")?)
        .map_err(|e| anyhow::anyhow!("expires_at: {e}"))?
        .millis();
    let cred = c
        .post(who, &format!("/v1/requests/{id}/credentials"), None)?
        .expect(200, "credentials")?;
    Ok(Grant {
        id,
        principal: who.to_string(),
        token: str_of(&cred, "token")?.to_string(),
        expires_at_ms,
    })
}

/// A config with `[gateway.postgres]` and one postgres target in front of
/// the cluster, in a new temp dir.
fn gateway_setup(pg_port: u16) -> anyhow::Result<(Setup, u16)> {
    let dir = tempfile::Builder::new()
        .prefix("breakglass-bench-gw-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let addr = server::free_port()?;
    let gw_port = server::free_port()?.port();
    std::fs::write(dir.path().join("policy.cedar"), POLICY)?;
    std::fs::write(dir.path().join("bg_bench.pw"), format!("{PG_PASSWORD}\n"))?;
    let mut s = format!(
        "[server]\nlisten = \"{addr}\"\ndata_dir = \"data\"\nadmin_groups = [\"security\"]\n\n\
         [policy]\nfile = \"policy.cedar\"\n\n\
         [gateway.postgres]\nlisten = \"127.0.0.1:{gw_port}\"\n\n"
    );
    for (name, groups) in server::principals() {
        let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
        s.push_str(&format!(
            "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
            g.join(", "),
            sha256_hex(server::token(&name).as_bytes())
        ));
    }
    s.push_str(&format!(
        "[[targets]]\nname = \"{TARGET}\"\nkind = \"postgres\"\ngroups = [\"gateway\"]\n\
         upstream = \"postgres://127.0.0.1:{pg_port}/{DB}\"\n\
         [targets.roles.read]\nuser = \"{PG_USER}\"\npassword_file = \"bg_bench.pw\"\n"
    ));
    let config = dir.path().join("config.toml");
    std::fs::write(&config, s)?;
    Ok((Setup { dir, config, addr }, gw_port))
}

/// Runs pgbench against `ep` with `args` (the database is appended) in
/// `dir`, bounded by `secs` + [`PGBENCH_GRACE`]; returns its stdout.
fn pgbench(
    bin: &Path,
    ep: &Endpoint,
    args: &[String],
    dir: &Path,
    secs: u64,
) -> anyhow::Result<String> {
    let out_path = dir.join("pgbench.out");
    let err_path = dir.join("pgbench.err");
    let mut cmd = client_command(bin, ep.port, &ep.user, Some(&ep.password));
    cmd.args(args)
        .arg(&ep.db)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(secs) + PGBENCH_GRACE;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            // This child only, by its pid.
            let _ = child.kill();
            let _ = child.wait();
            bail!("pgbench {} did not finish in time", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "pgbench {} as {} on port {} failed ({status}):\n{out}{err}",
            args.join(" "),
            ep.user,
            ep.port
        );
    }
    Ok(out)
}

/// `tps = 1234.5 (without initial connection time)` and `number of
/// transactions actually processed: N`.
fn parse_pgbench(out: &str) -> anyhow::Result<(f64, u64)> {
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("no tps in the pgbench output:\n{out}"))?;
    let txns = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(['/', ' ']).next()?.parse::<u64>().ok())
        .with_context(|| format!("no transaction count in the pgbench output:\n{out}"))?;
    if let Some(failed) = out
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        && failed > 0
    {
        bail!("pgbench reported {failed} failed transactions:\n{out}");
    }
    Ok((tps, txns))
}

/// Per-transaction latencies (seconds) from `pgbench -l` logs whose names
/// start with `prefix` in `dir`: the third column, in microseconds.
fn read_latency_logs(dir: &Path, prefix: &str) -> anyhow::Result<Samples> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let text = std::fs::read_to_string(e.path())?;
        for line in text.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|x| x.parse::<f64>().ok())
            {
                v.push(us * 1e-6);
            }
        }
    }
    if v.is_empty() {
        bail!("no pgbench log {prefix}.* in {}", dir.display());
    }
    Ok(Samples::from_secs(v))
}

/// A protocol session through the gateway, blocked in a long query.
struct Session {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// How a session ended: when (µs since the epoch) and how.
#[derive(Debug, Clone)]
struct Ended {
    at_us: i64,
    how: String,
}

impl Session {
    /// Start-up as `user` to `db`, the cleartext password the gateway asks
    /// for, ReadyForQuery, then [`SLEEP_SQL`] sent.
    fn open(addr: SocketAddr, user: &str, db: &str, password: &str) -> anyhow::Result<Session> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to the gateway at {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut s = Session {
            stream,
            buf: Vec::new(),
        };
        s.stream.write_all(&codec::startup_message(&[
            ("user", user),
            ("database", db),
            ("application_name", "breakglass-bench-cut"),
        ]))?;
        loop {
            let (tag, payload) = s.frame()?.context("the gateway closed during start-up")?;
            match tag {
                b'R' => {
                    let code = payload
                        .get(..4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .context("short authentication message")?;
                    match code {
                        0 => {}
                        3 => {
                            let mut p = Vec::new();
                            codec::put_cstr(&mut p, password);
                            let mut out = Vec::new();
                            codec::put_frame(&mut out, b'p', &p);
                            s.stream.write_all(&out)?;
                        }
                        other => bail!("unexpected authentication request {other}"),
                    }
                }
                b'E' => bail!(
                    "the gateway refused the session: {:?}",
                    codec::parse_error_fields(&payload)
                ),
                b'Z' => break,
                _ => {}
            }
        }
        let mut q = Vec::new();
        codec::put_cstr(&mut q, SLEEP_SQL);
        let mut out = Vec::new();
        codec::put_frame(&mut out, b'Q', &q);
        s.stream.write_all(&out)?;
        // Long enough for the query (60 s), bounded.
        s.stream.set_read_timeout(Some(Duration::from_secs(90)))?;
        Ok(s)
    }

    /// The next frame, or `None` at EOF.
    fn frame(&mut self) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if let Some(f) = codec::decode_frame(&self.buf, FRAME_LEN_MAX)? {
                let payload = f.payload(&self.buf).to_vec();
                self.buf.drain(..f.len);
                return Ok(Some((f.tag, payload)));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Blocks until the gateway ends the session: an ErrorResponse or EOF.
    /// The time is taken as soon as the read that brings it returns.
    fn wait_end(mut self) -> anyhow::Result<Ended> {
        let mut at_us = wall_us();
        loop {
            while let Some(f) = codec::decode_frame(&self.buf, FRAME_LEN_MAX)? {
                if f.tag == b'E' {
                    let how = codec::parse_error_fields(f.payload(&self.buf))
                        .into_iter()
                        .find(|(c, _)| *c == b'C')
                        .map_or_else(|| "?".into(), |(_, v)| v);
                    return Ok(Ended { at_us, how });
                }
                self.buf.drain(..f.len);
            }
            let mut chunk = [0u8; 4096];
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e).context("waiting for the cut"),
            };
            at_us = wall_us();
            if n == 0 {
                return Ok(Ended {
                    at_us,
                    how: "EOF".into(),
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Waits for one ended session, bounded.
fn next_end(
    rx: &mpsc::Receiver<(usize, anyhow::Result<Ended>)>,
    wait: Duration,
) -> anyhow::Result<(usize, Ended)> {
    let (i, r) = rx
        .recv_timeout(wait)
        .context("a session was not cut in time")?;
    Ok((i, r.with_context(|| format!("session {i}"))?))
}

fn ms_of(s: &Samples) -> String {
    format!(
        "max {} (p50 {}, p99 {})",
        fmt_secs(s.max()),
        fmt_secs(s.p50()),
        fmt_secs(s.p99())
    )
}

impl Ctx {
    /// pgbench through the gateway versus direct and pgbouncer, the
    /// per-statement latency it adds, and the cut of live sessions.
    pub fn gateway(&mut self) -> anyhow::Result<()> {
        let quick = self.quick;
        let secs: u64 = if quick { 3 } else { 10 };
        // BREAKGLASS_BENCH_GATEWAY_ROUNDS=N overrides the number of
        // throughput rounds (to compare builds with less noise).
        let rounds = std::env::var("BREAKGLASS_BENCH_GATEWAY_ROUNDS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(if quick { 1 } else { 3 });
        let warm: u64 = if quick { 1 } else { 2 };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;

        eprintln!("   starting PostgreSQL, pgbench -i -s {SCALE}");
        let t0 = Instant::now();
        let pg = PgCluster::start()?;
        pg.create_role(PG_USER, PG_PASSWORD, AuthMethod::Scram)?;
        pg.create_db(DB, "postgres")?;
        pg.pgbench_init(DB, SCALE)?;
        pg.psql(
            DB,
            &format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {PG_USER}"),
        )?;
        let pgbench_bin = pg.bin_dir().join("pgbench");
        let bouncer = PgBouncer::start(&pg, DB, PG_USER, PG_PASSWORD)?;
        let relay = BareRelay::start(pg.port)?;
        let (setup, gw_port) = gateway_setup(pg.port)?;
        let srv = Server::start(&self.bin, &setup)?;
        let api = Client::new(&srv.url);
        let recordings = setup.data_dir().join("recordings");
        eprintln!(
            "   PostgreSQL on {}, pgbouncer on {}, gateway on {gw_port}, ready in {}",
            pg.port,
            bouncer.port,
            fmt_secs(t0.elapsed().as_secs_f64())
        );
        let procs = Procs {
            postmaster: find_postmaster(&pg.socket_dir().join("data")),
            breakglass: Some(srv.pid()),
            pgbouncer: find_pgbouncer(bouncer.port),
        };
        if procs.postmaster.is_none() || procs.pgbouncer.is_none() {
            self.notes.push(
                "gateway: the postmaster or pgbouncer process was not found; their CPU is missing from the splits".into(),
            );
        }

        // One grant for all pgbench runs: 8 sessions, within the default
        // 16 per grant.
        let who = requester(0);
        let g = grant(&api, &who, "1h")?;
        let direct = Endpoint {
            port: pg.port,
            user: PG_USER.into(),
            password: PG_PASSWORD.into(),
            db: DB.into(),
        };
        let through = Endpoint {
            port: gw_port,
            user: g.principal.clone(),
            password: g.token.clone(),
            db: TARGET.into(),
        };
        let pooled = Endpoint {
            port: bouncer.port,
            user: PG_USER.into(),
            password: PG_PASSWORD.into(),
            db: DB.into(),
        };
        let relayed = Endpoint {
            port: relay.port,
            ..direct.clone()
        };
        let endpoint = |via: Via| match via {
            Via::Direct => &direct,
            Via::Gateway => &through,
            Via::Bouncer => &pooled,
            Via::Relay => &relayed,
        };
        let work = tempfile::Builder::new()
            .prefix("breakglass-bench-pgbench-")
            .tempdir()?;
        let args = |mode: &str, clients: usize, threads: usize, t: u64| -> Vec<String> {
            [
                "-n",
                "-S",
                "-M",
                mode,
                "-c",
                &clients.to_string(),
                "-j",
                &threads.to_string(),
                "-T",
                &t.to_string(),
            ]
            .map(String::from)
            .to_vec()
        };
        // BREAKGLASS_BENCH_PERF_DIR=DIR: a system-wide `perf record -g` of
        // each path's first throughput run goes to DIR/<path>.data.
        let perf_dir = std::env::var_os("BREAKGLASS_BENCH_PERF_DIR").map(PathBuf::from);
        let perfed = std::cell::RefCell::new(std::collections::HashSet::new());
        let run = |via: Via, mode: &str| -> anyhow::Result<Run> {
            let perf = match &perf_dir {
                Some(d) if perfed.borrow_mut().insert(via.label()) => {
                    std::fs::create_dir_all(d)?;
                    let out = d.join(format!("{}.data", via.label()));
                    Some(
                        Command::new("perf")
                            .args(["record", "-a", "-g", "-F", "1999", "-q", "-o"])
                            .arg(&out)
                            .args(["--", "sleep", &secs.to_string()])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .context("cannot run perf (BREAKGLASS_BENCH_PERF_DIR is set)")?,
                    )
                }
                _ => None,
            };
            let rec0 = dir_bytes(&recordings);
            let a = procs.mark();
            let out = pgbench(
                &pgbench_bin,
                endpoint(via),
                &args(mode, CLIENTS, THREADS, secs),
                work.path(),
                secs,
            )?;
            if let Some(mut p) = perf {
                p.wait()?;
            }
            // Let the backends exit and be reaped before the second mark.
            std::thread::sleep(Duration::from_millis(200));
            let b = procs.mark();
            let (tps, transactions) = parse_pgbench(&out)?;
            Ok(Run {
                tps,
                transactions,
                recorded: dir_bytes(&recordings).saturating_sub(rec0),
                cpu: split(&a, &b),
            })
        };

        // Warm-up: the shared buffers, each path's first connections.
        for via in [Via::Direct, Via::Gateway, Via::Bouncer, Via::Relay] {
            pgbench(
                &pgbench_bin,
                endpoint(via),
                &args("simple", CLIENTS, THREADS, warm),
                work.path(),
                warm,
            )?;
        }

        // Throughput: the three paths interleaved, round after round.
        let order = [Via::Direct, Via::Gateway, Via::Bouncer, Via::Relay];
        let mut runs: Vec<(Via, Run)> = Vec::new();
        for round in 1..=rounds {
            if !quick {
                cpu::wait_quiet(0.10, Duration::from_secs(60));
            }
            for via in order {
                let r = run(via, "simple")?;
                eprintln!(
                    "   round {round}: {:<9} {:>6.0} tps; {}; others {:.0}%",
                    via.label(),
                    r.tps,
                    r.cpu.per_txn(r.transactions),
                    100.0 * r.cpu.others
                );
                runs.push((via, r));
            }
        }
        // Prepared statements, once each, direct and through the gateway.
        if !quick {
            cpu::wait_quiet(0.10, Duration::from_secs(60));
        }
        let prep_direct = run(Via::Direct, "prepared")?;
        let prep_gateway = run(Via::Gateway, "prepared")?;
        eprintln!(
            "   -M prepared: direct {:.0} tps, gateway {:.0} tps",
            prep_direct.tps, prep_gateway.tps
        );

        // Latency per statement: one client, every transaction logged.
        if !quick {
            cpu::wait_quiet(0.10, Duration::from_secs(60));
        }
        let mut lat = Vec::new();
        for via in [Via::Direct, Via::Gateway] {
            let prefix = format!("lat-{}", via.label());
            let mut a = args("simple", 1, 1, secs);
            a.push("-l".into());
            a.push(format!("--log-prefix={prefix}"));
            let m0 = procs.mark();
            pgbench(&pgbench_bin, endpoint(via), &a, work.path(), secs)?;
            std::thread::sleep(Duration::from_millis(200));
            let m1 = procs.mark();
            lat.push((
                via,
                read_latency_logs(work.path(), &prefix)?,
                split(&m0, &m1),
            ));
        }
        drop(bouncer);
        drop(relay);

        // The figures.
        let median_of = |via: Via| -> (f64, Vec<&Run>) {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|(v, _)| *v == via)
                .map(|(_, r)| r)
                .collect();
            let s = Samples::from_secs(rs.iter().map(|r| r.tps).collect());
            (s.p50(), rs)
        };
        let (d_tps, d_runs) = median_of(Via::Direct);
        let (g_tps, g_runs) = median_of(Via::Gateway);
        let (b_tps, b_runs) = median_of(Via::Bouncer);
        let (r_tps, r_runs) = median_of(Via::Relay);
        let others_max = |rs: &[&Run]| rs.iter().map(|r| r.cpu.others).fold(0.0, f64::max);
        let tps_list = |rs: &[&Run]| {
            rs.iter()
                .map(|r| format!("{:.0}", r.tps))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let median_run = |rs: &[&Run], tps: f64| -> Option<Run> {
            rs.iter()
                .find(|r| (r.tps - tps).abs() < 1e-9)
                .map(|r| (*r).clone())
        };
        let what = format!("pgbench -S -c {CLIENTS} -j {THREADS}, {secs} s");
        let rounds_note = if rounds > 1 {
            format!("median of {rounds}")
        } else {
            "1 run".to_string()
        };
        let mut row = Row::info(
            format!("gateway: {what}, direct to PostgreSQL ({rounds_note})"),
            format!("{d_tps:.0} tps"),
            format!("runs: {}", tps_list(&d_runs)),
        );
        row.others = Some(others_max(&d_runs));
        self.rows.push(row);
        let mut row = Row::target(
            format!("gateway: {what}, through the gateway / direct"),
            format!("{g_tps:.0} tps = {:.2} of direct", g_tps / d_tps),
            g_tps / d_tps,
            ">= 0.80",
            Goal::AtLeast(GATEWAY_VS_DIRECT_MIN),
            format!("runs: {}", tps_list(&g_runs)),
        );
        row.others = Some(others_max(&g_runs));
        self.rows.push(row);
        let mut row = Row::info(
            format!("gateway: {what}, through pgbouncer (session pooling)"),
            format!("{b_tps:.0} tps = {:.2} of direct", b_tps / d_tps),
            format!("runs: {}", tps_list(&b_runs)),
        );
        row.others = Some(others_max(&b_runs));
        self.rows.push(row);
        let mut row = Row::target(
            format!("gateway: {what}, through the gateway / through pgbouncer"),
            format!("{:.2}", g_tps / b_tps),
            g_tps / b_tps,
            ">= 1.00",
            Goal::AtLeast(1.0),
            String::new(),
        );
        row.others = Some(others_max(&g_runs).max(others_max(&b_runs)));
        self.rows.push(row);
        let mut row = Row::info(
            format!("gateway: {what}, through a bare relay (tokio copy, no recording)"),
            format!(
                "{r_tps:.0} tps = {:.2} of direct, {:.2} of pgbouncer",
                r_tps / d_tps,
                r_tps / b_tps
            ),
            format!(
                "runs: {}; the gateway = {:.2} of it",
                tps_list(&r_runs),
                g_tps / r_tps
            ),
        );
        row.others = Some(others_max(&r_runs));
        self.rows.push(row);
        let mut row = Row::info(
            format!("gateway: {what}, -M prepared, gateway / direct (1 run each)"),
            format!(
                "{:.0} / {:.0} tps = {:.2}",
                prep_gateway.tps,
                prep_direct.tps,
                prep_gateway.tps / prep_direct.tps
            ),
            String::new(),
        );
        row.others = Some(prep_direct.cpu.others.max(prep_gateway.cpu.others));
        self.rows.push(row);

        let rtt = self.base.rtt.p50();
        let mut by = std::collections::HashMap::new();
        for (via, s, cpu) in &lat {
            let mut row = Row::info(
                format!(
                    "gateway: latency per statement, pgbench -S -c 1, {}",
                    via.label()
                ),
                format!("p50 {}, p99 {}", fmt_secs(s.p50()), fmt_secs(s.p99())),
                format!("{} transactions", s.len()),
            );
            row.others = Some(cpu.others);
            self.rows.push(row);
            by.insert(via.label(), s.clone());
        }
        if let (Some(d), Some(g)) = (by.get("direct"), by.get("gateway")) {
            let (p50, p99) = (g.p50() - d.p50(), g.p99() - d.p99());
            let mut row = Row::info(
                "gateway: latency added per statement (gateway - direct)",
                format!("p50 +{}, p99 +{}", fmt_secs(p50), fmt_secs(p99)),
                if rtt > 0.0 {
                    format!(
                        "p50 = {:.1} loopback RTTs (RTT p50 {})",
                        p50 / rtt,
                        fmt_secs(rtt)
                    )
                } else {
                    String::new()
                },
            );
            row.others = Some(lat.iter().map(|(_, _, c)| c.others).fold(0.0, f64::max));
            self.rows.push(row);
        }

        let cpu_note = |label: &str, r: &Option<Run>| match r {
            Some(r) => format!(
                "{label}: {}; {}{}",
                r.cpu.per_txn(r.transactions),
                r.cpu.shares(cores),
                if r.recorded > 0 {
                    format!(
                        "; recordings grew by {:.0} bytes per transaction",
                        r.recorded as f64 / r.transactions.max(1) as f64
                    )
                } else {
                    String::new()
                }
            ),
            None => String::new(),
        };
        self.notes.push(format!(
            "gateway throughput ({what}, -n, simple protocol, scale {SCALE}, all authenticate with SCRAM or, through the gateway, a grant credential; {rounds} round(s) of direct, gateway, pgbouncer, bare relay): tps per round (others' CPU) direct {}; gateway {}; pgbouncer {}; bare relay {}",
            d_runs
                .iter()
                .map(|r| format!("{:.0} ({:.0}%)", r.tps, 100.0 * r.cpu.others))
                .collect::<Vec<_>>()
                .join(", "),
            g_runs
                .iter()
                .map(|r| format!("{:.0} ({:.0}%)", r.tps, 100.0 * r.cpu.others))
                .collect::<Vec<_>>()
                .join(", "),
            b_runs
                .iter()
                .map(|r| format!("{:.0} ({:.0}%)", r.tps, 100.0 * r.cpu.others))
                .collect::<Vec<_>>()
                .join(", "),
            r_runs
                .iter()
                .map(|r| format!("{:.0} ({:.0}%)", r.tps, 100.0 * r.cpu.others))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        self.notes.push(format!(
            "gateway CPU split of the median runs: {}. {}. {}. {}",
            cpu_note("direct", &median_run(&d_runs, d_tps)),
            cpu_note("gateway", &median_run(&g_runs, g_tps)),
            cpu_note("pgbouncer", &median_run(&b_runs, b_tps)),
            cpu_note("bare relay", &median_run(&r_runs, r_tps)),
        ));
        self.notes.push(format!(
            "gateway -M prepared: direct {:.0} tps ({}), gateway {:.0} tps ({})",
            prep_direct.tps,
            prep_direct.cpu.per_txn(prep_direct.transactions),
            prep_gateway.tps,
            prep_gateway.cpu.per_txn(prep_gateway.transactions)
        ));
        self.notes.push(format!(
            "gateway latency per statement (pgbench -S -c 1 -T {secs} -l, third log column): {}",
            lat.iter()
                .map(|(via, s, c)| format!(
                    "{} p50 {}, p99 {}, max {}, mean {}, {} transactions ({})",
                    via.label(),
                    fmt_secs(s.p50()),
                    fmt_secs(s.p99()),
                    fmt_secs(s.max()),
                    fmt_secs(s.mean()),
                    s.len(),
                    c.per_txn(s.len() as u64)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));

        // Cut latency, with the same server.
        if !quick {
            cpu::wait_quiet(0.10, Duration::from_secs(60));
        }
        let cut_res = self.cut(&api, gw_port, &procs);
        srv.stop()?;
        drop(pg);
        cut_res
    }

    /// Sessions blocked in `pg_sleep` through the gateway, one grant each;
    /// half of the grants are revoked one by one, the other half expire.
    fn cut(&mut self, api: &Client, gw_port: u16, procs: &Procs) -> anyhow::Result<()> {
        let sessions = if self.quick { 10 } else { 50 };
        let half = sessions / 2;
        let addr = SocketAddr::from(([127, 0, 0, 1], gw_port));
        let (tx, rx) = mpsc::channel::<(usize, anyhow::Result<Ended>)>();
        let open = |i: usize, g: &Grant| -> anyhow::Result<std::thread::JoinHandle<()>> {
            let s = Session::open(addr, &g.principal, TARGET, &g.token)?;
            let tx = tx.clone();
            Ok(std::thread::spawn(move || {
                let _ = tx.send((i, s.wait_end()));
            }))
        };

        // Revoke: one grant at a time, timed from just before the call is
        // sent to the moment the client sees the error (or EOF).
        let m0 = procs.mark();
        let mut grants = Vec::new();
        let mut handles = Vec::new();
        for i in 0..half {
            let g = grant(api, &requester(i + 1), "1h")?;
            handles.push(open(i, &g)?);
            grants.push(g);
        }
        // Let every query reach PostgreSQL.
        std::thread::sleep(Duration::from_millis(300));
        let mut revoke_lat = Vec::new();
        let mut revoke_call = Vec::new();
        let mut hows = std::collections::BTreeMap::<String, usize>::new();
        for (i, g) in grants.iter().enumerate() {
            let sent = wall_us();
            let t = Instant::now();
            api.post(
                AUDITOR,
                &format!("/v1/requests/{}/revoke", g.id),
                Some(&json!({"reason": "benchmark: cut latency"})),
            )?
            .expect(200, "revoke")?;
            revoke_call.push(t.elapsed());
            let (j, e) = next_end(&rx, CUT_WAIT)?;
            if j != i {
                bail!("session {j} ended while grant {i} was revoked");
            }
            revoke_lat.push((e.at_us - sent) as f64 * 1e-6);
            *hows.entry(e.how).or_default() += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        let m1 = procs.mark();
        for h in handles {
            let _ = h.join();
        }

        // Expiry: short grants; timed from each request's `expires_at`.
        let duration_s = if self.quick { 3 } else { 5 };
        let mut grants = Vec::new();
        let mut handles = Vec::new();
        for i in 0..sessions - half {
            let g = grant(api, &requester(half + i + 1), &format!("{duration_s}s"))?;
            handles.push(open(i, &g)?);
            grants.push(g);
        }
        let first = grants.iter().map(|g| g.expires_at_ms).min().unwrap_or(0);
        let last = grants.iter().map(|g| g.expires_at_ms).max().unwrap_or(0);
        if wall_us() / 1000 > first - 200 {
            bail!("the expiry sessions took too long to open: a grant ends before all are running");
        }
        let m2 = procs.mark();
        let mut expiry_lat = Vec::new();
        let wait = Duration::from_millis((last - wall_us() / 1000).max(0) as u64) + CUT_WAIT;
        let deadline = Instant::now() + wait;
        for _ in 0..grants.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (j, e) = next_end(&rx, left)?;
            let g = &grants[j];
            expiry_lat.push((e.at_us - g.expires_at_ms * 1000) as f64 * 1e-6);
            *hows.entry(e.how).or_default() += 1;
        }
        let m3 = procs.mark();
        for h in handles {
            let _ = h.join();
        }
        drop(tx);

        let rv = Samples::from_secs(revoke_lat);
        let ex = Samples::from_secs(expiry_lat);
        let calls = Samples::from_durations(&revoke_call);
        let mut row = Row::target(
            format!("live session cut after revoke ({half} sessions, one at a time)"),
            ms_of(&rv),
            rv.max(),
            "<= 100 ms",
            Goal::AtMost(CUT_MAX_S),
            format!(
                "{}; the revoke call took p50 {}",
                self.base.describe(rv.p50()),
                fmt_secs(calls.p50())
            ),
        );
        row.others = Some(split(&m0, &m1).others);
        self.rows.push(row);
        let mut row = Row::target(
            format!(
                "live session cut after expiry ({} sessions, from expires_at)",
                sessions - half
            ),
            ms_of(&ex),
            ex.max(),
            "<= 100 ms",
            Goal::AtMost(CUT_MAX_S),
            format!(
                "expiries spread over {} ms; min {}",
                last - first,
                fmt_secs(ex.pct(0.0))
            ),
        );
        row.others = Some(split(&m2, &m3).others);
        self.rows.push(row);
        self.notes.push(format!(
            "cut: each session is a raw protocol client (start-up, cleartext password = grant credential, `{SLEEP_SQL}`), one grant per session; the time is when the client reads the ErrorResponse (or EOF). Revoke: POST /v1/requests/ID/revoke as an admin, timed from just before the call is sent, one grant at a time (revoke call p50 {}, p99 {}). Expiry: {duration_s} s grants, timed from the request's expires_at (ms resolution; the server's clock and this process's are the same clock). How the sessions ended: {}",
            fmt_secs(calls.p50()),
            fmt_secs(calls.p99()),
            hows.iter()
                .map(|(k, v)| format!("{k} x{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if hows.keys().any(|k| k != "57P01") {
            self.notes
                .push("cut: some sessions did not end with SQLSTATE 57P01 (see above)".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_output_is_parsed() {
        let out = "transaction type: <builtin: select only>\n\
                   number of transactions actually processed: 123456\n\
                   number of failed transactions: 0 (0.000%)\n\
                   latency average = 0.648 ms\n\
                   initial connection time = 12.345 ms\n\
                   tps = 12345.678901 (without initial connection time)\n";
        let (tps, n) = parse_pgbench(out).expect("parsed");
        assert!((tps - 12345.678901).abs() < 1e-6);
        assert_eq!(n, 123_456);
        let bad = out.replace("failed transactions: 0", "failed transactions: 3");
        assert!(parse_pgbench(&bad).is_err());
    }

    #[test]
    fn pgbench_logs_are_read_in_microseconds() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("lat-direct.123"),
            "0 1 250 0 1700000000 1\n0 2 750 0 1700000000 2\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("other.1"), "0 1 99999 0 1 1\n").expect("write");
        let s = read_latency_logs(dir.path(), "lat-direct").expect("read");
        assert_eq!(s.len(), 2);
        assert!((s.max() - 750e-6).abs() < 1e-12);
    }
}
