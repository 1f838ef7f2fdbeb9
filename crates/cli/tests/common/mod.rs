//! The harness of the end-to-end tests: a config and policy in a temporary
//! directory, the real `breakglass` binary started as a child process on a
//! free loopback port, its CLI run as a child process, and a small blocking
//! HTTP client for the API.
//!
//! Every server child is killed by pid when its [`Server`] is dropped, so a
//! failing test leaks no process.

#![allow(dead_code)]

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)] // not every test binary polls
pub use breakglass_testkit::poll;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_breakglass");

/// How long a server may take to answer `/readyz` after it was spawned.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a CLI command may run before the test gives up on it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The default test policy: a 1-approval policy on production, a
/// 0-approval self-service policy on drill targets, an emergency policy and a
/// global cap.
pub const POLICY: &str = r#"// Policy of the end-to-end tests.

@id("oncall-db-read")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "read" };

@id("drill-self-service")
@approvals("0")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"drills");

@id("ic-emergency")
@approvals("0")
@approvers("sre-leads")
@countersign_within("5m")
@max_duration("10m")
permit (principal in Group::"incident-commanders", action == Action::"emergency",
        resource in TargetGroup::"production");

@id("one-hour-cap")
forbid (principal, action, resource) when { context.duration_s > 3600 };
"#;

/// (name, groups) of the configured principals. `security` is the admin
/// group.
pub const PRINCIPALS: [(&str, &[&str]); 7] = [
    ("alice", &["oncall"]),
    ("bob", &["sre-leads"]),
    ("carol", &["sre-leads", "security"]),
    ("dave", &["security"]),
    ("erin", &["incident-commanders", "oncall"]),
    ("mallory", &[]),
    ("lead", &["oncall", "sre-leads"]),
];

/// A service principal (`kind = "service"`): it verifies credentials.
pub const SERVICE: &str = "gatekeeper";

/// The API token of a configured principal. Only its SHA-256 is in the
/// config.
pub fn token(name: &str) -> String {
    format!("bgt_e2e_{name}_0123456789abcdef")
}

pub use breakglass_core::token::sha256_hex;

pub use breakglass_testkit::free_port;

/// A config and policy in a temporary directory; the store lives in
/// `data/` beside them.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Extra TOML lines inside `[server]`.
    pub server_extra: String,
    /// The body of the `[audit]` table.
    pub audit: String,
}

impl Setup {
    /// The default policy, a 30m pending timeout and 1s checkpoints.
    pub fn new() -> Setup {
        Setup::with_policy(POLICY)
    }

    pub fn with_policy(policy: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("policy.cedar"), policy).expect("write policy");
        let setup = Setup {
            dir,
            port: free_port(),
            server_extra: "pending_timeout = \"30m\"\n".to_string(),
            audit: "checkpoint_interval = \"1s\"\n".to_string(),
        };
        setup.write_config();
        setup
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir().join("breakglass.db")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The config text for the current port and settings.
    pub fn config_text(&self) -> String {
        let mut s = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"data\"\nadmin_groups = [\"security\"]\n{}\n\
             [policy]\nfile = \"policy.cedar\"\n\n[audit]\n{}\n",
            self.port, self.server_extra, self.audit
        );
        for (name, groups) in PRINCIPALS {
            let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
            s.push_str(&format!(
                "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
                g.join(", "),
                sha256_hex(token(name).as_bytes())
            ));
        }
        s.push_str(&format!(
            "[[principals]]\nname = \"{SERVICE}\"\nkind = \"service\"\ntoken_sha256 = \"{}\"\n\n",
            sha256_hex(token(SERVICE).as_bytes())
        ));
        s.push_str(
            "[[targets]]\nname = \"prod-db\"\nkind = \"postgres\"\ngroups = [\"production\"]\n\
             upstream = \"postgres://127.0.0.1:1/app\"\n\
             [targets.roles.read]\nuser = \"bg_read\"\n\
             [targets.roles.admin]\nuser = \"bg_admin\"\n\n\
             [[targets]]\nname = \"drill-db\"\nkind = \"generic\"\ngroups = [\"drills\"]\n\
             [targets.roles.read]\n\n",
        );
        s
    }

    pub fn write_config(&self) {
        std::fs::write(self.config_path(), self.config_text()).expect("write config");
    }

    /// Moves the server to a new free port (rewrites the config).
    pub fn new_port(&mut self) {
        self.port = free_port();
        self.write_config();
    }

    /// A copy of this setup (config, policy and the whole data directory)
    /// in a new temporary directory, on a new port. The server must not be
    /// running.
    pub fn copy(&self) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(self.path(), dir.path());
        let copy = Setup {
            dir,
            port: free_port(),
            server_extra: self.server_extra.clone(),
            audit: self.audit.clone(),
        };
        copy.write_config();
        copy
    }

    /// Runs the CLI against this setup's server as `who` (`None`: no token).
    pub fn cli(&self, who: Option<&str>, args: &[&str]) -> CliOutput {
        run_cli(&self.url(), who.map(token).as_deref(), args)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// What a CLI run printed and how it ended.
#[derive(Debug)]
pub struct CliOutput {
    /// The exit code; -1 when killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics (showing the output) unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &CliOutput {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }

    /// stdout as one JSON document.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }
}

/// The CLI command for `args` with a clean environment: `--url` given, the
/// token (if any) in `BREAKGLASS_TOKEN`, never on the command line.
pub fn cli_command(url: &str, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--url").arg(url).args(args);
    cmd.env_remove("BREAKGLASS_URL")
        .env_remove("BREAKGLASS_LOG")
        .env_remove("BREAKGLASS_OTP")
        // No stored login from the machine running the tests.
        .env("XDG_CONFIG_HOME", "/nonexistent/breakglass-test-config")
        .env("NO_COLOR", "1");
    match token {
        Some(t) => cmd.env("BREAKGLASS_TOKEN", t),
        None => cmd.env_remove("BREAKGLASS_TOKEN"),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

pub fn run_cli(url: &str, token: Option<&str>, args: &[&str]) -> CliOutput {
    let child = cli_command(url, token, args)
        .spawn()
        .expect("spawn the breakglass CLI");
    wait_cli(child, CLI_TIMEOUT)
}

/// Waits for a CLI child with a bound; kills it and panics past `limit`.
pub fn wait_cli(mut child: Child, limit: Duration) -> CliOutput {
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("CLI did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    CliOutput {
        code: status.code().unwrap_or(-1),
        stdout: out_t.join().expect("stdout reader"),
        stderr: err_t.join().expect("stderr reader"),
    }
}

/// A `breakglass serve` child process. Killed (SIGKILL, by pid) on drop if
/// it is still running.
pub struct Server {
    child: Option<Child>,
    pub pid: u32,
    pub url: String,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Spawns `breakglass serve --config` for `setup` without waiting.
    pub fn spawn(setup: &Setup) -> Server {
        Server::spawn_args(
            &[
                "serve",
                "--config",
                &setup.config_path().display().to_string(),
            ],
            setup.path(),
            &setup.url(),
        )
    }

    /// Spawns `breakglass ARGS` as a server, logs into `log_dir`.
    pub fn spawn_args(args: &[&str], log_dir: &Path, url: &str) -> Server {
        Server::spawn_args_env(args, log_dir, url, &[])
    }

    /// `spawn_args` with extra environment variables (upstream secrets).
    pub fn spawn_args_env(
        args: &[&str],
        log_dir: &Path,
        url: &str,
        env: &[(String, String)],
    ) -> Server {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let stdout_path = log_dir.join(format!("server-{n}.stdout"));
        let stderr_path = log_dir.join(format!("server-{n}.stderr"));
        let child = Command::new(BIN)
            .args(args)
            .env_remove("BREAKGLASS_URL")
            .env_remove("BREAKGLASS_TOKEN")
            .env("BREAKGLASS_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("server stdout file"))
            .stderr(File::create(&stderr_path).expect("server stderr file"))
            .spawn()
            .expect("spawn breakglass serve");
        Server {
            pid: child.id(),
            child: Some(child),
            url: url.to_string(),
            stdout_path,
            stderr_path,
        }
    }

    /// Spawns and waits until `/readyz` answers 200.
    #[track_caller]
    pub fn start(setup: &Setup) -> Server {
        let mut s = Server::spawn(setup);
        let (status, body) = s.wait_answer();
        assert_eq!(
            status,
            200,
            "/readyz answered {status} {body}; server stderr:\n{}",
            s.stderr()
        );
        s
    }

    /// Polls `/readyz` until the server answers anything over HTTP; panics
    /// with the server's stderr if it exits or does not answer in time.
    #[track_caller]
    pub fn wait_answer(&mut self) -> (u16, Value) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let agent = agent(Duration::from_secs(2));
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the server exited ({status}) before it was ready; stderr:\n{}",
                    self.stderr()
                );
            }
            if let Ok(answer) = call(&agent, &self.url, None, "GET", "/readyz", None) {
                return answer;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the server did not answer /readyz within {READY_TIMEOUT:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix, sent to this pid only.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; `None` if it did
    /// not exit in time (the process is then killed on drop).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let st = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM {} failed", self.pid);
        self.wait_exit(limit)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking HTTP agent that returns error statuses as responses.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .proxy(None)
        .build()
        .into()
}

/// One API call as `token` (a raw bearer token). `Err` on a transport
/// failure (refused, reset, timeout), `Ok((status, body))` for any answer;
/// a body that is not JSON comes back as a JSON string.
pub fn call(
    agent: &ureq::Agent,
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let uri = format!("{base}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match method {
        "GET" => {
            let mut r = agent.get(&uri);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        "POST" => {
            let mut r = agent.post(&uri).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            match body {
                Some(b) => r.send(b.to_string()),
                None => r.send_empty(),
            }
        }
        other => panic!("unsupported method {other}"),
    };
    let mut resp = resp.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, json))
}

/// A client of one server acting as one principal; panics on transport
/// errors (for tests where the server must be up).
pub struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            agent: agent(Duration::from_secs(30)),
            base: base.to_string(),
        }
    }

    #[track_caller]
    pub fn get(&self, who: &str, path: &str) -> (u16, Value) {
        call(
            &self.agent,
            &self.base,
            Some(&token(who)),
            "GET",
            path,
            None,
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    #[track_caller]
    pub fn post(&self, who: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(
            &self.agent,
            &self.base,
            Some(&token(who)),
            "POST",
            path,
            body.as_ref(),
        )
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Every request the admin `who` can see, all pages.
    #[track_caller]
    pub fn all_requests(&self, who: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/requests?limit=500&after={a}"),
                None => "/v1/requests?limit=500".to_string(),
            };
            let (st, page) = self.get(who, &path);
            assert_eq!(st, 200, "list requests: {page}");
            let reqs = page["requests"].as_array().expect("requests array").clone();
            let n = reqs.len();
            out.extend(reqs);
            match page["next"].as_str() {
                Some(next) if n > 0 => after = Some(next.to_string()),
                _ => break,
            }
        }
        out
    }

    /// Every audit event (as JSON) via `GET /v1/audit`, all pages.
    #[track_caller]
    pub fn all_audit(&self, who: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let (st, page) = self.get(who, &format!("/v1/audit?after={after}&limit=1000"));
            assert_eq!(st, 200, "audit page: {page}");
            let events = page["events"].as_array().expect("events array").clone();
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
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    breakglass_core::Timestamp::now().millis()
}

/// An RFC 3339 time of the API, in milliseconds since the Unix epoch.
#[track_caller]
pub fn ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    breakglass_core::Timestamp::parse_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad timestamp {s}: {e}"))
        .millis()
}
