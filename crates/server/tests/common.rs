//! A real breakglass service on a loopback port, in this process, with a
//! fixed set of principals and a policy; and a blocking HTTP client for it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use breakglass_core::token::sha256_hex;
use breakglass_server::config::Config;
use serde_json::Value;

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
    // `extra_server` may set its own pending timeout.
    let pending = if extra_server.contains("pending_timeout") {
        ""
    } else {
        "pending_timeout = \"3s\"\n"
    };
    let mut s = format!(
        "[server]\nlisten = \"{listen}\"\ndata_dir = \"data\"\n{pending}admin_groups = [\"security\"]\n{extra_server}\n[policy]\nfile = \"policy.cedar\"\n[audit]\ncheckpoint_interval = \"1s\"\n\n"
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
        Self::start_with_policy(dir, extra_server, POLICY)
    }

    /// Like `start_with`, with another policy. `extra_server` may also
    /// open tables of its own (`[identity.oidc]`).
    pub fn start_with_policy(
        dir: tempfile::TempDir,
        extra_server: &str,
        policy: &str,
    ) -> TestServer {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        let config_path = write_setup(dir.path(), addr, extra_server);
        std::fs::write(dir.path().join("policy.cedar"), policy).expect("write policy");
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
