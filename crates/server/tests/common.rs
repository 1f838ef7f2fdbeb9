//! A real breakglass service on a loopback port, in this process, with a
//! fixed set of principals and a policy; and a blocking HTTP client for it.
//! [`Nodes`] runs several such services on one shared PostgreSQL database
//! and spreads calls over them; test bodies take `&dyn Api` to run on
//! either.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use breakglass_core::Timestamp;
use breakglass_core::token::sha256_hex;
use breakglass_server::config::Config;
use breakglass_server::identity::totp::Totp;
use serde_json::{Value, json};

pub const POLICY: &str = r#"
@id("read")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"production")
when { context.role == "read" };

@id("admin")
@approvals("2")
@approvers("sre-leads,security")
@max_duration("15m")
@require_ticket("^INC-[0-9]+$")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"production")
when { context.role == "admin" };

@id("emergency")
@approvals("0")
@approvers("sre-leads")
@countersign_within("2s")
@max_duration("10m")
permit (principal in Group::"incident-commanders", action == Action::"emergency", resource in TargetGroup::"production");

@id("drill")
@approvals("0")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"drills");

@id("cap")
forbid (principal, action, resource) when { context.duration_s > 3600 };
"#;

/// (name, groups): every principal's token is `token-NAME`.
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

pub fn token(name: &str) -> String {
    format!("token-{name}")
}

pub fn config_text(listen: SocketAddr, extra_server: &str) -> String {
    config_text_with(listen, extra_server, "")
}

/// Like [`config_text`], with `extra_audit` lines added to `[audit]`.
pub fn config_text_with(listen: SocketAddr, extra_server: &str, extra_audit: &str) -> String {
    // `extra_server` may set its own pending timeout.
    let pending = if extra_server.contains("pending_timeout") {
        ""
    } else {
        "pending_timeout = \"3s\"\n"
    };
    let mut s = format!(
        "[server]\nlisten = \"{listen}\"\ndata_dir = \"data\"\n{pending}admin_groups = [\"security\"]\n{extra_server}\n[policy]\nfile = \"policy.cedar\"\n[audit]\ncheckpoint_interval = \"1s\"\n{extra_audit}\n"
    );
    for (name, groups) in PRINCIPALS {
        let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
        s.push_str(&format!(
            "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
            g.join(","),
            sha256_hex(token(name).as_bytes())
        ));
    }
    s.push_str(&format!(
        "[[principals]]\nname = \"{SERVICE}\"\nkind = \"service\"\ntoken_sha256 = \"{}\"\n\n",
        sha256_hex(token(SERVICE).as_bytes())
    ));
    s.push_str("[[targets]]\nname = \"prod-db\"\nkind = \"postgres\"\ngroups = [\"production\"]\nupstream = \"postgres://127.0.0.1:1/app\"\n[targets.roles.read]\nuser = \"r\"\n[targets.roles.admin]\nuser = \"a\"\n\n");
    s.push_str("[[targets]]\nname = \"drill-db\"\nkind = \"generic\"\ngroups = [\"drills\"]\n[targets.roles.read]\n\n");
    s
}

/// A directory with config.toml and policy.cedar for a server on `listen`.
pub fn write_setup(dir: &std::path::Path, listen: SocketAddr, extra_server: &str) -> PathBuf {
    std::fs::write(dir.join("policy.cedar"), POLICY).expect("write policy");
    let path = dir.join("config.toml");
    std::fs::write(&path, config_text(listen, extra_server)).expect("write config");
    path
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub config_path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir)
    }

    pub fn start_in(dir: tempfile::TempDir) -> TestServer {
        Self::start_with(dir, "")
    }

    /// `extra_server`: TOML lines added to `[server]`.
    pub fn start_with(dir: tempfile::TempDir, extra_server: &str) -> TestServer {
        Self::start_full(dir, extra_server, "", POLICY)
    }

    /// `extra_server`, `extra_audit`: TOML lines added to `[server]` and
    /// `[audit]`.
    pub fn start_configured(
        dir: tempfile::TempDir,
        extra_server: &str,
        extra_audit: &str,
    ) -> TestServer {
        Self::start_full(dir, extra_server, extra_audit, POLICY)
    }

    /// Like `start_with`, with another policy. `extra_server` may also
    /// open tables of its own (`[identity.oidc]`).
    pub fn start_with_policy(
        dir: tempfile::TempDir,
        extra_server: &str,
        policy: &str,
    ) -> TestServer {
        Self::start_full(dir, extra_server, "", policy)
    }

    fn start_full(
        dir: tempfile::TempDir,
        extra_server: &str,
        extra_audit: &str,
        policy: &str,
    ) -> TestServer {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        std::fs::write(dir.path().join("policy.cedar"), policy).expect("write policy");
        let config_path = dir.path().join("config.toml");
        std::fs::write(
            &config_path,
            config_text_with(addr, extra_server, extra_audit),
        )
        .expect("write config");
        let config = Config::load(&config_path).expect("config");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                probe.set_nonblocking(true).expect("nonblocking");
                let listener = tokio::net::TcpListener::from_std(probe).expect("listener");
                let running = breakglass_server::start(config, listener)
                    .await
                    .expect("start");
                ready_tx.send(()).expect("ready");
                let _ = stop_rx.await;
                running.shutdown().await.expect("shutdown");
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server ready");
        TestServer {
            dir,
            url: format!("http://{addr}"),
            config_path,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn call(&self, who: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call_raw(
            &self.url,
            Some(&token(who)),
            method,
            path,
            body.map(|b| b.to_string()),
        )
    }

    /// Stops the server and returns its data directory.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.shutdown();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // A failed shutdown fails the test (unless it is failing already).
        if let Some(t) = self.thread.take()
            && let Err(panic) = t.join()
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

pub fn call_raw(
    url: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> (u16, Value) {
    let agent = agent();
    let uri = format!("{url}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match method {
        "GET" => {
            let mut r = agent.get(&uri);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        _ => {
            let mut r = agent.post(&uri).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or_default())
        }
    };
    let mut resp = resp.expect("http call");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

/// What a test body calls: one node, or several spread over.
pub trait Api: Sync {
    fn call(&self, who: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value);
    /// The URL of the node the next call goes to.
    fn url(&self) -> String;
    /// Every node's URL.
    fn urls(&self) -> Vec<String>;
}

impl Api for TestServer {
    fn call(&self, who: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        TestServer::call(self, who, method, path, body)
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn urls(&self) -> Vec<String> {
        vec![self.url.clone()]
    }
}

/// Several nodes sharing one fresh PostgreSQL database; each call goes to
/// the next node in turn, so consecutive steps of a scenario run on
/// different nodes.
pub struct Nodes {
    pub nodes: Vec<TestServer>,
    pub database_url: String,
    next: std::sync::atomic::AtomicUsize,
    // Dropped after the nodes.
    pub pg: std::sync::Arc<breakglass_testkit::PgCluster>,
}

impl Nodes {
    /// Starts `n` nodes on a fresh database of the shared cluster. Each node
    /// has its own data dir (key, recordings, witness beside it); every
    /// node's config trusts every node's key.
    pub fn start(n: usize) -> Nodes {
        Self::start_with(n, "")
    }

    /// `extra_server`: TOML lines added to every node's `[server]`.
    pub fn start_with(n: usize, extra_server: &str) -> Nodes {
        let pg = breakglass_testkit::shared_cluster().expect("a PostgreSQL cluster");
        let database_url = breakglass_testkit::fresh_database(&pg).expect("a fresh database");
        let dirs: Vec<tempfile::TempDir> = (0..n)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let keys: Vec<String> = dirs
            .iter()
            .map(|d| {
                let key = breakglass_server::keys::load_or_create(&d.path().join("data"))
                    .expect("node key");
                format!("\"{}\"", hex_key(&key.verifying_key()))
            })
            .collect();
        let audit = format!("verify_keys = [{}]\n", keys.join(", "));
        let nodes = dirs
            .into_iter()
            .map(|dir| {
                std::fs::write(dir.path().join("database.url"), &database_url)
                    .expect("write database url");
                TestServer::start_configured(
                    dir,
                    &format!("database_url_file = \"database.url\"\n{extra_server}"),
                    &audit,
                )
            })
            .collect();
        Nodes {
            nodes,
            database_url,
            next: std::sync::atomic::AtomicUsize::new(0),
            pg,
        }
    }

    fn pick(&self) -> &TestServer {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.nodes[i % self.nodes.len()]
    }
}

pub fn hex_key(key: &ed25519_dalek::VerifyingKey) -> String {
    breakglass_core::audit::key_id(key)
}

impl Api for Nodes {
    fn call(&self, who: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.pick().call(who, method, path, body)
    }

    fn url(&self) -> String {
        self.pick().url.clone()
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }
}

// ---------------------------------------------------------------------------
// Identity: calls with any bearer and a one-time code, a TOTP principal
// ---------------------------------------------------------------------------

/// A call with any bearer token (an ID token, a workload token, a local
/// token) and, when given, an `X-Breakglass-OTP` code.
pub fn call(
    server: &TestServer,
    bearer: &str,
    otp: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let agent = agent();
    let uri = format!("{}{path}", server.url);
    let auth = format!("Bearer {bearer}");
    let resp = if method == "GET" {
        let mut r = agent.get(&uri).header("Authorization", &auth);
        if let Some(c) = otp {
            r = r.header("X-Breakglass-OTP", c);
        }
        r.call()
    } else {
        let mut r = agent
            .post(&uri)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json");
        if let Some(c) = otp {
            r = r.header("X-Breakglass-OTP", c);
        }
        r.send(body.unwrap_or(json!({})).to_string())
    };
    let mut resp = resp.expect("http call");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn detail(v: &Value) -> String {
    v["detail"].as_str().unwrap_or_default().to_string()
}

/// Polls `/readyz` (at most 10 s) until it reports `identity`.
pub fn wait_until_identity_is(server: &TestServer, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ready) = call_raw(&server.url, None, "GET", "/readyz", None);
        if ready["identity"] == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "identity never became {want}: {ready}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub const TOTP_SECRET_B32: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

/// A local principal with a TOTP secret in a file next to the config.
pub fn totp_principal(dir: &std::path::Path) -> String {
    std::fs::write(dir.join("tina.totp"), TOTP_SECRET_B32).expect("write secret");
    format!(
        "\n[[principals]]\nname = \"tina\"\ngroups = [\"sre-leads\"]\ntoken_sha256 = \"{}\"\ntotp_secret_file = \"tina.totp\"\n",
        sha256_hex(b"token-tina")
    )
}

pub fn totp_now() -> String {
    let t = Totp::new(b"12345678901234567890");
    format!("{:06}", t.code_at_step(Totp::step_of(Timestamp::now())))
}
