//! Harness of the PostgreSQL gateway tests: one real PostgreSQL cluster
//! shared by the tests that run at the same time, a `breakglass serve` child
//! per test with the gateway on a free loopback port, and the clients the
//! tests drive it with (`psql`, `tokio-postgres`, a raw socket).
//!
//! Every process started here is killed by pid when its owner is dropped:
//! the cluster when the last test holding it finishes, a server when its
//! [`Bg`] is dropped, a client child when its [`Spawned`] is dropped.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

#[allow(unused_imports)] // not every test binary polls
pub use breakglass_testkit::poll;
use breakglass_testkit::{AuthMethod, PgCluster, client_command};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_breakglass");
/// The client the tests run (Debian's wrapper picks the newest version).
pub const PSQL: &str = "/usr/bin/psql";
/// No child process may run longer than this.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The database of the upstream cluster every postgres target points at.
pub const DB: &str = "app";

/// One upstream login the config offers as a role of target `pg`.
pub struct UpRole {
    /// The role name in the breakglass config.
    pub role: &'static str,
    /// The PostgreSQL user the gateway logs in as.
    pub user: &'static str,
    pub password: &'static str,
    pub method: AuthMethod,
}

/// The upstream users. Tests that count backends have a user to
/// themselves, so concurrent tests cannot disturb the count.
pub const UP_ROLES: [UpRole; 6] = [
    UpRole {
        role: "scram",
        user: "bg_scram",
        password: "scram pw 'quoted'",
        method: AuthMethod::Scram,
    },
    UpRole {
        role: "md5",
        user: "bg_md5",
        password: "md5-secret",
        method: AuthMethod::Md5,
    },
    UpRole {
        role: "trust",
        user: "bg_trust",
        password: "unused",
        method: AuthMethod::Trust,
    },
    UpRole {
        role: "rw",
        user: "bg_rw",
        password: "rw-secret",
        method: AuthMethod::Scram,
    },
    UpRole {
        role: "exp",
        user: "bg_exp",
        password: "exp-secret",
        method: AuthMethod::Scram,
    },
    UpRole {
        role: "rev",
        user: "bg_rev",
        password: "rev-secret",
        method: AuthMethod::Scram,
    },
];

pub fn up_role(role: &str) -> &'static UpRole {
    UP_ROLES
        .iter()
        .find(|r| r.role == role)
        .unwrap_or_else(|| panic!("no upstream role {role}"))
}

/// The shared upstream cluster.
pub struct Upstream {
    pub pg: PgCluster,
}

static UPSTREAM: Mutex<Weak<Upstream>> = Mutex::new(Weak::new());

/// The cluster, started (with its roles and database) by the first test that
/// asks while no other test holds it. It stops when the last holder drops
/// it: hold the returned `Arc` for the whole test, declared before anything
/// that uses the cluster.
pub fn upstream() -> Arc<Upstream> {
    let mut slot = UPSTREAM.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(up) = slot.upgrade() {
        return up;
    }
    let started = Instant::now();
    let pg = PgCluster::start().expect("start PostgreSQL");
    for r in &UP_ROLES {
        pg.create_role(r.user, r.password, r.method)
            .unwrap_or_else(|e| panic!("create role {}: {e:#}", r.user));
    }
    pg.create_db(DB, "postgres").expect("create database");
    pg.psql(DB, "GRANT ALL ON SCHEMA public TO PUBLIC")
        .expect("open the public schema");
    eprintln!(
        "upstream PostgreSQL on port {} ready in {:?}",
        pg.port,
        started.elapsed()
    );
    let up = Arc::new(Upstream { pg });
    *slot = Arc::downgrade(&up);
    up
}

/// The API token of a configured principal.
pub fn token(name: &str) -> String {
    format!("bgt_gw_{name}_0123456789abcdef")
}

/// The `[[principals]]` tables of the test principals, and the policy
/// file they are governed by (written to `dir`).
pub fn principals_config(dir: &std::path::Path) -> String {
    std::fs::write(dir.join("policy.cedar"), POLICY).expect("write policy");
    let mut cfg = String::new();
    for (name, groups) in PRINCIPALS {
        let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
        cfg.push_str(&format!(
            "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
            g.join(", "),
            hex::encode(Sha256::digest(token(name).as_bytes()))
        ));
    }
    cfg
}

/// (name, groups): alice and bob may self-serve; carol is an admin.
const PRINCIPALS: [(&str, &[&str]); 3] = [
    ("alice", &["oncall"]),
    ("bob", &["oncall"]),
    ("carol", &["security"]),
];

const POLICY: &str = r#"// Gateway tests: self-service, no approval.
@id("self-service")
@approvals("0")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request", resource);
"#;

/// `[gateway.postgres]` settings a test may change.
#[derive(Debug, Clone)]
pub struct GwOptions {
    pub startup_timeout: &'static str,
    pub idle_timeout: &'static str,
    pub max_connections: usize,
    pub message_len_max: usize,
    pub max_connections_per_grant: usize,
    pub strict_recording: bool,
    /// Serve TLS with a fresh self-signed certificate (made with openssl).
    pub tls: bool,
    /// Host of the upstream URL (default 127.0.0.1).
    pub upstream_host: &'static str,
    /// Query of the upstream URL, e.g. `?sslmode=require`.
    pub upstream_query: String,
}

impl Default for GwOptions {
    fn default() -> Self {
        GwOptions {
            startup_timeout: "10s",
            idle_timeout: "30m",
            max_connections: 1000,
            message_len_max: 16 * 1024 * 1024,
            max_connections_per_grant: 16,
            strict_recording: false,
            tls: false,
            upstream_host: "127.0.0.1",
            upstream_query: String::new(),
        }
    }
}

pub fn free_port() -> u16 {
    breakglass_testkit::free_port()
}

/// What a child process printed and how it ended.
#[derive(Debug)]
pub struct Out {
    /// The exit code; -1 when killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    #[track_caller]
    pub fn ok(&self) -> &Out {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }
}

/// A running child, killed (by pid, SIGKILL) when dropped.
pub struct Spawned {
    child: Option<Child>,
    started: Instant,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

fn drain(
    r: Option<impl std::io::Read + Send + 'static>,
) -> Option<std::thread::JoinHandle<String>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            String::from_utf8_lossy(&b).into_owned()
        })
    })
}

impl Spawned {
    /// Spawns `cmd` with stdout and stderr captured (stdin: null unless the
    /// caller set it).
    pub fn spawn(cmd: &mut Command) -> Spawned {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Spawned {
            child: Some(child),
            started: Instant::now(),
            out,
            err,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The child's stdin, when the caller made it a pipe.
    #[allow(dead_code)] // not every test binary writes to a child
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.as_mut().and_then(|c| c.stdin.take())
    }

    /// Waits at most `limit`; kills the child and panics past it.
    #[track_caller]
    pub fn wait(mut self, limit: Duration) -> Out {
        let mut child = self.child.take().expect("child");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let err = self.err.take().map(|h| h.join().unwrap_or_default());
                panic!("child did not finish within {limit:?}; stderr: {err:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Out {
            code: status.code().unwrap_or(-1),
            stdout: self
                .out
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
            stderr: self
                .err
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGKILL to this pid only.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` to completion within [`CHILD_TIMEOUT`].
#[track_caller]
pub fn run(cmd: &mut Command) -> Out {
    cmd.stdin(Stdio::null());
    Spawned::spawn(cmd).wait(CHILD_TIMEOUT)
}

/// `psql` against the gateway on `port` as `user` with `password` in
/// `PGPASSWORD`, no `.psqlrc`, unaligned tuples only, stopping at the first
/// error; `args` follow (`-c SQL`, `-f FILE`...).
pub fn psql_cmd(port: u16, user: &str, password: &str, db: &str, args: &[&str]) -> Command {
    let mut cmd = client_command(Path::new(PSQL), port, user, Some(password));
    cmd.args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d", db])
        .args(args);
    cmd
}

#[track_caller]
pub fn psql(port: u16, user: &str, password: &str, db: &str, args: &[&str]) -> Out {
    run(&mut psql_cmd(port, user, password, db, args))
}

/// A `tokio-postgres` config for the gateway on `port`.
pub fn pg_config(port: u16, user: &str, db: &str, password: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname(db)
        .password(password)
        .application_name("gateway-test")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(10));
    c
}

/// Connects and drives the connection on a task; notices and notifications
/// arrive on the receiver.
pub async fn pg_connect(
    cfg: &tokio_postgres::Config,
) -> Result<(Client, mpsc::UnboundedReceiver<AsyncMessage>), tokio_postgres::Error> {
    let (client, mut conn) = tokio::time::timeout(Duration::from_secs(15), cfg.connect(NoTls))
        .await
        .expect("tokio-postgres connect did not finish in 15s")?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            let _ = tx.send(m);
        }
    });
    Ok((client, rx))
}

/// The error of a connection attempt that must be refused.
#[track_caller]
pub fn pg_refused(
    rt: &tokio::runtime::Runtime,
    cfg: &tokio_postgres::Config,
) -> tokio_postgres::Error {
    match rt.block_on(pg_connect(cfg)) {
        Ok(_) => panic!("tokio-postgres connected, but should have been refused"),
        Err(e) => e,
    }
}

/// The SQLSTATE of a `tokio-postgres` error, when the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// A runtime for the async parts of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    breakglass_core::Timestamp::now().millis()
}

#[track_caller]
pub fn ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    breakglass_core::Timestamp::parse_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad timestamp {s}: {e}"))
        .millis()
}

/// An active grant and its credential.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub principal: String,
    pub token: String,
    pub expires_at_ms: i64,
    pub connection: Value,
}

/// A `breakglass serve` child with the PostgreSQL gateway, its config and
/// data in a temporary directory. Killed (SIGKILL, by pid) on drop.
pub struct Bg {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub gw_port: u16,
    child: Option<Child>,
    pub pid: u32,
    stderr_path: PathBuf,
    agent: ureq::Agent,
}

impl Bg {
    /// Writes the config and starts the server; returns once `/readyz`
    /// answers 200.
    #[track_caller]
    pub fn start(up: &Upstream, opts: GwOptions) -> Bg {
        Bg::start_in(tempfile::tempdir().expect("tempdir"), up, opts, "", "")
    }

    /// Like [`Bg::start`] in `dir`, with `extra_server` and `extra_audit`
    /// lines added to `[server]` and `[audit]` (a node of several: its
    /// shared store and the keys it trusts).
    #[track_caller]
    pub fn start_in(
        dir: tempfile::TempDir,
        up: &Upstream,
        opts: GwOptions,
        extra_server: &str,
        extra_audit: &str,
    ) -> Bg {
        std::fs::write(dir.path().join("policy.cedar"), POLICY).expect("write policy");
        let http_port = free_port();
        let gw_port = free_port();
        let upstream = format!(
            "postgres://{}:{}/{DB}{}",
            opts.upstream_host, up.pg.port, opts.upstream_query
        );
        let mut cfg = format!(
            "[server]\nlisten = \"127.0.0.1:{http_port}\"\ndata_dir = \"data\"\n\
             admin_groups = [\"security\"]\n{extra_server}\n\
             [policy]\nfile = \"policy.cedar\"\n\n\
             [audit]\ncheckpoint_interval = \"1s\"\n{extra_audit}\n\
             [gateway.postgres]\nlisten = \"127.0.0.1:{gw_port}\"\n\
             startup_timeout = \"{}\"\nidle_timeout = \"{}\"\nmax_connections = {}\n\
             message_len_max = {}\n\
             max_connections_per_grant = {}\nstrict_recording = {}\n\n",
            opts.startup_timeout,
            opts.idle_timeout,
            opts.max_connections,
            opts.message_len_max,
            opts.max_connections_per_grant,
            opts.strict_recording,
        );
        if opts.tls {
            let status = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                ])
                .arg(dir.path().join("gw.key"))
                .arg("-out")
                .arg(dir.path().join("gw.crt"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl (Debian package openssl) makes the test certificate");
            assert!(status.success(), "openssl failed");
            // The table [gateway.postgres] is still open at this point.
            let at = cfg.rfind("\n\n").expect("gateway table");
            cfg.insert_str(at, "\ntls_cert = \"gw.crt\"\ntls_key = \"gw.key\"");
        }
        for (name, groups) in PRINCIPALS {
            let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
            cfg.push_str(&format!(
                "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
                g.join(", "),
                hex::encode(Sha256::digest(token(name).as_bytes()))
            ));
        }
        cfg.push_str(&format!(
            "[[targets]]\nname = \"pg\"\nkind = \"postgres\"\nupstream = \"{upstream}\"\n"
        ));
        for r in &UP_ROLES {
            cfg.push_str(&format!(
                "[targets.roles.{}]\nuser = \"{}\"\n",
                r.role, r.user
            ));
            if r.method != AuthMethod::Trust {
                cfg.push_str(&format!(
                    "password_env = \"BG_TEST_PW_{}\"\n",
                    r.role.to_uppercase()
                ));
            }
        }
        // The SCRAM user with a wrong password: the upstream refuses it.
        cfg.push_str(
            "[targets.roles.badpw]\nuser = \"bg_scram\"\npassword_env = \"BG_TEST_PW_BAD\"\n\n",
        );
        // Same database, bound parameters kept out of recordings; the
        // password comes from a file.
        std::fs::write(
            dir.path().join("rw.pw"),
            format!("{}\n", up_role("rw").password),
        )
        .expect("write password file");
        cfg.push_str(&format!(
            "[[targets]]\nname = \"pg-redact\"\nkind = \"postgres\"\nupstream = \"{upstream}\"\n\
             redact_parameters = true\n\
             [targets.roles.rw]\nuser = \"bg_rw\"\npassword_file = \"rw.pw\"\n\n\
             [[targets]]\nname = \"notes\"\nkind = \"generic\"\n[targets.roles.read]\n"
        ));
        Bg::from_config(dir, http_port, gw_port, &cfg)
    }

    /// Starts a server on `cfg` (a whole config file, written to `dir`)
    /// whose API listens on `http_port`; returns once `/readyz` answers.
    #[track_caller]
    pub fn from_config(dir: tempfile::TempDir, http_port: u16, gw_port: u16, cfg: &str) -> Bg {
        std::fs::write(dir.path().join("config.toml"), cfg).expect("write config");
        let mut bg = Bg {
            stderr_path: dir.path().join("server-0.stderr"),
            dir,
            http_port,
            gw_port,
            child: None,
            pid: 0,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .proxy(None)
                .build()
                .into(),
        };
        bg.spawn_and_wait(0);
        bg
    }

    fn spawn_and_wait(&mut self, generation: u32) {
        self.stderr_path = self.dir.path().join(format!("server-{generation}.stderr"));
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(self.config_path())
            .env_remove("BREAKGLASS_URL")
            .env_remove("BREAKGLASS_TOKEN")
            .env("BREAKGLASS_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(server_env());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&self.stderr_path).expect("server stderr file"))
            .spawn()
            .expect("spawn breakglass serve");
        self.pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "breakglass exited ({st}) before it was ready:\n{}",
                    self.stderr()
                );
            }
            if let Ok((200, _)) = self.call("GET", None, "/readyz", None) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "breakglass not ready within {READY_TIMEOUT:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, then a new process on the same config, ports and data.
    pub fn restart_after_kill9(&mut self, generation: u32) {
        self.kill9();
        self.spawn_and_wait(generation);
    }

    /// `kill -9` of the server: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn recordings_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("recordings")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn call(
        &self,
        method: &str,
        who: Option<&str>,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let uri = format!("{}{path}", self.url());
        let auth = who.map(|w| format!("Bearer {}", token(w)));
        let resp = match method {
            "GET" => {
                let mut r = self.agent.get(&uri);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self
                    .agent
                    .post(&uri)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some(b) => r.send(b.to_string()),
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    #[track_caller]
    pub fn get(&self, who: &str, path: &str) -> (u16, Value) {
        self.call("GET", Some(who), path, None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    #[track_caller]
    pub fn post(&self, who: &str, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", Some(who), path, Some(&body))
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// A 0-approval grant of `role` on `target`, active at once, and its
    /// credential.
    #[track_caller]
    pub fn grant(&self, who: &str, target: &str, role: &str, duration: &str) -> Grant {
        let (st, r) = self.post(
            who,
            "/v1/requests",
            json!({"target": target, "role": role, "duration": duration,
                   "reason": "gateway test"}),
        );
        assert_eq!(st, 201, "create request: {r}");
        assert_eq!(r["state"], "active", "{r}");
        let id = r["id"].as_str().expect("id").to_string();
        let (st, c) = self.post(who, &format!("/v1/requests/{id}/credentials"), json!({}));
        assert_eq!(st, 200, "credentials: {c}");
        Grant {
            id,
            principal: who.to_string(),
            token: c["token"].as_str().expect("token").to_string(),
            expires_at_ms: ms(&c["expires_at"]),
            connection: c["connection"].clone(),
        }
    }

    /// The CLI as `who` (`None`: no token), token in the environment.
    pub fn cli_cmd(&self, who: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--url").arg(self.url()).args(args);
        cmd.env_remove("BREAKGLASS_URL")
            .env_remove("BREAKGLASS_LOG")
            .env_remove("PGPASSWORD")
            .env("NO_COLOR", "1")
            .env("PGPASSFILE", "/dev/null")
            .env("PGCONNECT_TIMEOUT", "10");
        match who {
            Some(w) => cmd.env("BREAKGLASS_TOKEN", token(w)),
            None => cmd.env_remove("BREAKGLASS_TOKEN"),
        };
        cmd
    }

    #[track_caller]
    pub fn cli(&self, who: Option<&str>, args: &[&str]) -> Out {
        run(&mut self.cli_cmd(who, args))
    }

    /// `GET /v1/requests/{id}/sessions` as `who`.
    #[track_caller]
    pub fn sessions(&self, who: &str, id: &str) -> Vec<Value> {
        let (st, v) = self.get(who, &format!("/v1/requests/{id}/sessions"));
        assert_eq!(st, 200, "sessions: {v}");
        v["sessions"].as_array().expect("sessions array").clone()
    }

    /// Waits until `n` sessions of the grant have ended; returns them all.
    #[track_caller]
    pub fn ended_sessions(&self, g: &Grant, n: usize, limit: Duration) -> Vec<Value> {
        let mut last = Vec::new();
        poll(limit, || {
            last = self.sessions(&g.principal, &g.id);
            (last.iter().filter(|s| !s["ended_at"].is_null()).count() >= n).then_some(())
        })
        .unwrap_or_else(|| panic!("{n} ended sessions expected: {last:#?}"));
        last
    }

    /// The entries of a session recording, read from its file.
    #[track_caller]
    pub fn recording(&self, session_id: &str) -> Vec<Value> {
        let path = self.recordings_dir().join(format!("{session_id}.jsonl"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
            .collect()
    }

    /// Every audit event, as the admin carol sees them.
    #[track_caller]
    pub fn audit(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let (st, page) = self.get("carol", &format!("/v1/audit?after={after}&limit=1000"));
            assert_eq!(st, 200, "audit page: {page}");
            let events = page["events"].as_array().expect("events").clone();
            let n = events.len();
            if let Some(last) = events.last() {
                after = last["seq"].as_u64().expect("seq");
            }
            out.extend(events);
            if n == 0 || page["next"].is_null() {
                break;
            }
        }
        out
    }

    /// `.open` markers left in the recordings directory (live sessions, or
    /// sessions nobody closed).
    pub fn open_markers(&self) -> Vec<String> {
        std::fs::read_dir(self.recordings_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.ends_with(".open"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking raw-socket client of the gateway, for what no driver sends.
pub struct Raw {
    pub s: TcpStream,
}

/// A typed backend message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// (SQLSTATE, message) of an ErrorResponse.
    pub fn error(&self) -> Option<(String, String)> {
        if self.tag != b'E' {
            return None;
        }
        let mut code = String::new();
        let mut msg = String::new();
        let mut rest = &self.body[..];
        while let Some((&f, after)) = rest.split_first() {
            if f == 0 {
                break;
            }
            let end = after.iter().position(|&b| b == 0)?;
            let v = String::from_utf8_lossy(&after[..end]).into_owned();
            match f {
                b'C' => code = v,
                b'M' => msg = v,
                _ => {}
            }
            rest = &after[end + 1..];
        }
        Some((code, msg))
    }
}

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub fn cstring(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the gateway");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        Raw { s }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to the gateway");
    }

    /// Sends, tolerating a gateway that already closed.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).is_ok()
    }

    pub fn half_close(&mut self) {
        let _ = self.s.shutdown(Shutdown::Write);
    }

    /// Reads until the gateway closes the connection, at most `limit`.
    /// Returns the bytes and whether the close was seen in time.
    pub fn read_to_close(&mut self, limit: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + limit;
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (all, false);
            }
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("read timeout");
            match self.s.read(&mut buf) {
                Ok(0) => return (all, true),
                Ok(n) => all.extend_from_slice(&buf[..n]),
                // A reset is a close too.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return (all, true);
                }
                Err(_) => return (all, false),
            }
        }
    }

    /// Reads one typed message (blocking, bounded by the read timeout).
    pub fn read_msg(&mut self) -> Option<Msg> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head).ok()?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.s.read_exact(&mut body).ok()?;
        Some(Msg { tag: head[0], body })
    }

    /// Start-up and password (the gateway asks for it in clear); returns
    /// the messages up to ReadyForQuery, or the error that ended it.
    pub fn login(&mut self, user: &str, db: &str, password: &str) -> Result<Vec<Msg>, Msg> {
        self.send(&startup_packet(&[("user", user), ("database", db)]));
        let mut seen = Vec::new();
        loop {
            let m = self.read_msg().expect("a message during login");
            match m.tag {
                b'R' if m.body[..4] == 3i32.to_be_bytes() => {
                    self.send(&frame(b'p', &cstring(password)));
                }
                b'E' => return Err(m),
                b'Z' => {
                    seen.push(m);
                    return Ok(seen);
                }
                _ => seen.push(m),
            }
        }
    }
}

/// Splits bytes into typed messages (a torn tail is dropped).
pub fn messages(mut b: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() < len + 1 {
            break;
        }
        out.push(Msg {
            tag: b[0],
            body: b[5..len + 1].to_vec(),
        });
        b = &b[len + 1..];
    }
    out
}

/// The first ErrorResponse in `bytes`.
pub fn first_error(bytes: &[u8]) -> Option<(String, String)> {
    messages(bytes).iter().find_map(Msg::error)
}

/// The upstream secrets a server of `Bg`'s config needs in its environment
/// (`badpw` holds a wrong password on purpose).
pub fn server_env() -> Vec<(String, String)> {
    let mut env = vec![("BG_TEST_PW_BAD".to_string(), "not the password".to_string())];
    for r in &UP_ROLES {
        env.push((
            format!("BG_TEST_PW_{}", r.role.to_uppercase()),
            r.password.to_string(),
        ));
    }
    env
}
