//! The real `breakglass` binary as a child process: its config and policy
//! in a temp dir, a free loopback port, readiness, memory and CPU readings,
//! and a blocking keep-alive HTTP client for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use breakglass_core::token::sha256_hex;
use serde_json::Value;

/// Requesters, each in `oncall`; one per concurrent client.
pub const REQUESTERS: usize = 64;
/// Approvers in `sre-leads`.
pub const LEADS: usize = 16;
/// A member of the admin group `security`: reads the audit log.
pub const AUDITOR: &str = "auditor";

/// `read` on production needs one approval from `sre-leads`; `drill` on
/// `drills` needs none (the 0-approval policy).
pub const POLICY: &str = r#"
@id("read")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"production")
when { context.role == "read" };

@id("drill")
@approvals("0")
@approvers("sre-leads")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"drills");

@id("cap")
forbid (principal, action, resource) when { context.duration_s > 3600 };
"#;

pub fn requester(i: usize) -> String {
    format!("req-{:02}", i % REQUESTERS)
}

pub fn lead(i: usize) -> String {
    format!("lead-{:02}", i % LEADS)
}

pub fn token(name: &str) -> String {
    format!("bench-token-{name}")
}

/// Every principal: (name, groups).
pub fn principals() -> Vec<(String, Vec<&'static str>)> {
    let mut out: Vec<(String, Vec<&'static str>)> = Vec::new();
    for i in 0..REQUESTERS {
        out.push((requester(i), vec!["oncall"]));
    }
    for i in 0..LEADS {
        out.push((lead(i), vec!["sre-leads"]));
    }
    out.push((AUDITOR.to_string(), vec!["security"]));
    out
}

/// A directory with `config.toml`, `policy.cedar` and `data/`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addr: SocketAddr,
}

impl Setup {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A free loopback port (see [`breakglass_testkit::free_port`]).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        breakglass_testkit::free_port(),
    )))
}

/// Writes a config and policy into a new temp dir.
pub fn setup() -> anyhow::Result<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("breakglass-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let addr = free_port()?;
    std::fs::write(dir.path().join("policy.cedar"), POLICY)?;
    let mut s = format!(
        "[server]\nlisten = \"{addr}\"\ndata_dir = \"data\"\npending_timeout = \"30m\"\nadmin_groups = [\"security\"]\n\n[policy]\nfile = \"policy.cedar\"\n\n"
    );
    for (name, groups) in principals() {
        let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
        s.push_str(&format!(
            "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
            g.join(", "),
            sha256_hex(token(&name).as_bytes())
        ));
    }
    s.push_str("[[targets]]\nname = \"prod-db\"\nkind = \"generic\"\ngroups = [\"production\"]\n[targets.roles.read]\n\n");
    s.push_str("[[targets]]\nname = \"drill-db\"\nkind = \"generic\"\ngroups = [\"drills\"]\n[targets.roles.read]\n");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, s)?;
    Ok(Setup { dir, config, addr })
}

/// Memory of a process, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy)]
pub struct Rss {
    /// VmRSS
    pub rss: u64,
    /// VmHWM: the peak RSS.
    pub peak: u64,
    /// Heap, stacks and other private memory.
    pub anon: u64,
    /// Mapped files, mostly the binary's own code.
    pub file: u64,
    pub threads: u64,
}

impl Rss {
    pub fn describe(&self) -> String {
        format!(
            "peak {}; anonymous {}, file-backed {}; {} threads",
            crate::stats::fmt_mb(self.peak),
            crate::stats::fmt_mb(self.anon),
            crate::stats::fmt_mb(self.file),
            self.threads
        )
    }
}

/// A running `breakglass serve`. Dropping it stops the process (by its pid).
pub struct Server {
    child: Child,
    pub url: String,
    /// From spawn to the first 200 on `/readyz`.
    pub startup: Duration,
    log: PathBuf,
}

impl Server {
    /// Spawns `breakglass serve --config FILE` and waits (at most 60 s) for
    /// `/readyz` to answer 200.
    pub fn start(bin: &Path, setup: &Setup) -> anyhow::Result<Server> {
        let log = setup.dir.path().join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        let stderr = std::fs::File::create(&log)?;
        let t0 = Instant::now();
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&setup.config)
            .env("BREAKGLASS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut server = Server {
            child,
            url: setup.url(),
            startup: Duration::ZERO,
            log,
        };
        let deadline = t0 + Duration::from_secs(60);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "breakglass serve exited with {status} before it was ready:\n{}",
                    server.log_tail()
                );
            }
            if readyz(setup.addr) == Some(200) {
                server.startup = t0.elapsed();
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "breakglass serve was not ready within 60 s:\n{}",
                    server.log_tail()
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the server wrote to stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Resident memory of the server, in bytes.
    pub fn rss(&self) -> anyhow::Result<Rss> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let number = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let kib = |name: &str| number(name) * 1024;
        Ok(Rss {
            rss: kib("VmRSS:"),
            peak: kib("VmHWM:"),
            anon: kib("RssAnon:"),
            file: kib("RssFile:"),
            threads: number("Threads:"),
        })
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs_of(&format!("/proc/{}/stat", self.pid()))
    }

    /// SIGTERM (graceful: a last checkpoint is signed), then SIGKILL after
    /// 10 s. Only this child's pid is signalled.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("warning: cannot stop breakglass (pid {}): {e}", self.pid());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User + system CPU seconds from a `/proc/PID/stat` file (0 if unreadable).
pub fn cpu_secs_of(path: &str) -> f64 {
    let f = cpu_fields_of(path);
    f.iter().take(2).sum()
}

/// utime, stime, cutime, cstime of a `/proc/PID/stat` file, in seconds
/// (empty if unreadable).
pub fn cpu_fields_of(path: &str) -> Vec<f64> {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    // Fields after the parenthesised command name; utime is the 14th field
    // overall, the 12th after the name.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Vec::new();
    };
    rest.split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse::<f64>().unwrap_or(0.0) / clock_ticks())
        .collect()
}

/// Clock ticks per second of `/proc` CPU times.
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// One `GET /readyz` on a fresh connection: the status, or `None` if the
/// server does not answer (yet).
pub fn readyz(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => return None,
            Ok(k) => n += k,
        }
    }
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// A blocking client with its own keep-alive connection pool.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

/// An HTTP answer: status and JSON (or the text as a JSON string).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// The body, if the status is `want`; otherwise an error naming both.
    pub fn expect(self, want: u16, what: &str) -> anyhow::Result<Value> {
        if self.status == want {
            Ok(self.body)
        } else {
            bail!(
                "{what}: expected HTTP {want}, got {}: {}",
                self.status,
                self.body
            )
        }
    }
}

impl Client {
    pub fn new(base: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .max_idle_connections(4)
            .max_idle_connections_per_host(4)
            .build();
        Client {
            agent: breakglass_notify::agent::agent(config),
            base: base.to_string(),
        }
    }

    pub fn get(&self, who: &str, path: &str) -> anyhow::Result<Answer> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", token(who)))
            .call()
            .with_context(|| format!("GET {path}"))?;
        answer(resp)
    }

    pub fn post(&self, who: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Answer> {
        let req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", token(who)))
            .header("Content-Type", "application/json");
        let resp = match body {
            Some(b) => req.send(b.to_string()),
            None => req.send(""),
        }
        .with_context(|| format!("POST {path}"))?;
        answer(resp)
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let mut resp = self
            .agent
            .get(format!("{}/metrics", self.base))
            .call()
            .context("GET /metrics")?;
        Ok(resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()?)
    }
}

fn answer(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<Answer> {
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer { status, body })
}

/// The value of an unlabelled or exactly-labelled metric line.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
