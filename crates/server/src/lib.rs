//! The breakglass service: configuration, the application layer over the
//! store, the deadline scheduler, audit checkpoints and the HTTP API.

pub mod app;
pub mod checkpoint;
pub mod config;
pub mod console;
mod datadir;
pub mod dev;
pub mod drill;
pub mod drill_api;
pub mod drill_config;
pub mod dto;
pub mod evidence;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod keys;
mod listener;
pub mod metrics;
pub mod notify;
pub mod offline;
pub mod openapi;
pub mod review;
pub mod scheduler;
pub mod slack;
pub mod ssh;
pub mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use breakglass_core::policy::PolicyEngine;
use breakglass_core::token::sha256_hex;
use breakglass_store::{PgStore, SqliteOptions, SqliteStore, Store};
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::{App, now};
use crate::config::Config;
use crate::listener::{ApiConn, Deadlines, LimitedListener};
use crate::metrics::Metrics;

/// How `breakglass serve` writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Options of `breakglass serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The TOML config file; ignored with `dev`.
    pub config: Option<PathBuf>,
    /// Quick start: embedded store in a temp dir, demo principals and policy,
    /// loopback only.
    pub dev: bool,
    /// With `dev`: where to keep the data (default: a new temp dir).
    pub data_dir: Option<PathBuf>,
    /// With `dev`: the API's address (default `127.0.0.1:8080`; loopback
    /// only).
    pub listen: Option<SocketAddr>,
    /// With `dev`: keep the temp dir and the demo database's files on exit.
    pub keep: bool,
    pub log_format: LogFormat,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BREAKGLASS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: never in a file, a pipe
    // or a log collector, and never with NO_COLOR set.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Loads and validates the policy file named by the config.
pub fn load_policy(config: &Config) -> anyhow::Result<PolicyEngine> {
    load_policy_with_digest(config).map(|(engine, _)| engine)
}

/// Like [`load_policy`], with the SHA-256 of exactly the text that was
/// loaded (for the `service.started` event).
pub fn load_policy_with_digest(config: &Config) -> anyhow::Result<(PolicyEngine, String)> {
    let path = &config.policy.file;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    if meta.len() > breakglass_core::policy::POLICY_FILE_LEN_MAX as u64 {
        anyhow::bail!(
            "{}: policy file is too large ({} bytes)",
            path.display(),
            meta.len()
        );
    }
    let src = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    let engine = PolicyEngine::load(&src, &path.display().to_string())?;
    Ok((engine, sha256_hex(src.as_bytes())))
}

/// A running service.
pub struct Running {
    pub app: Arc<App>,
    pub addr: SocketAddr,
    /// Where the PostgreSQL gateway listens, when configured.
    pub pg_addr: Option<SocketAddr>,
    /// Where the SSH gateway listens, when configured.
    pub ssh_addr: Option<SocketAddr>,
    pub overdue_ended: usize,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    background: Vec<tokio::task::JoinHandle<()>>,
    /// The data dir's lock, released when this is dropped.
    _lock: std::fs::File,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, signs a last
    /// checkpoint.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        // Live gateway sessions end with a FATAL and a `session.ended` event
        // rather than being dropped mid-statement.
        let live = &self.app.sessions;
        if live.cut_all("service_shutdown") > 0 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while live.live_sessions() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), self.server).await {
            Ok(res) => res
                .context("server task failed")?
                .context("server failed")?,
            Err(_) => tracing::warn!("in-flight requests did not finish within 10s"),
        }
        // Aborted and awaited: a background task (the review's triage, a
        // drill, a notifier's audit event) must not commit after the final
        // checkpoint below, or the stop would not sign the head.
        for h in &self.background {
            h.abort();
        }
        for h in self.background {
            let _ = h.await;
        }
        let app = &self.app;
        if app.writes_blocked().is_some() {
            return Ok(());
        }
        let last = app
            .store
            .checkpoints()
            .await
            .ok()
            .and_then(|c| c.last().map(|c| c.seq))
            .unwrap_or(0);
        checkpoint::checkpoint_once(app.store.as_ref(), app.signing_key(), &app.witnesses, last)
            .await?;
        Ok(())
    }

    /// Resolves when the server task ends on its own (it should not).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

/// The keys that verify this node's checkpoints: `audit.verify_keys` when
/// set (it must list this node's key: a key planted in `data_dir` is
/// refused), else the node's own.
fn trusted_keys(
    config: &Config,
    own: &ed25519_dalek::VerifyingKey,
) -> anyhow::Result<Vec<ed25519_dalek::VerifyingKey>> {
    let keys = config.verify_keys();
    if keys.is_empty() && config.shared_store() {
        anyhow::bail!(
            "audit.verify_keys is empty but several nodes may share this store: list the public key of every node (this node's is {}, in {}/audit-signing.pub), so each node trusts the others' checkpoints and no other key",
            hex::encode(own.to_bytes()),
            config.server.data_dir.display()
        );
    }
    if keys.is_empty() {
        return Ok(vec![*own]);
    }
    if !keys.contains(own) {
        anyhow::bail!(
            "audit.verify_keys does not list this node's key {} (in {}): its checkpoints would not verify. If the key was replaced behind the service's back, investigate; if this node is new, add its key to audit.verify_keys",
            hex::encode(own.to_bytes()),
            config.server.data_dir.display()
        );
    }
    Ok(keys)
}

/// What `check_witness_at_start` found: why the chain is broken, and
/// whether this start created the witness (written into `service.started`,
/// so that a witness deleted with its directory and created anew is seen by
/// `audit verify`).
struct WitnessAtStart {
    broken: Option<String>,
    started: Option<serde_json::Value>,
}

/// Creates the witness directory on first use; a new witness for a store
/// that already has checkpoints starts from the newest one (said loudly);
/// a witness that has gone missing breaks the chain.
async fn check_witness_at_start(
    config: &Config,
    store: &dyn Store,
    node: &str,
) -> anyhow::Result<WitnessAtStart> {
    let Some(file) = config.witness_file() else {
        return Ok(WitnessAtStart {
            broken: None,
            started: None,
        });
    };
    let created = checkpoint::prepare_witness_dir(&file).with_context(|| {
        format!(
            "audit.checkpoint_file: cannot create the directory of {}",
            file.display()
        )
    })?;
    // This node's witness keeps this node's checkpoints.
    let cps: Vec<_> = store
        .checkpoints()
        .await?
        .into_iter()
        .filter(|c| c.signed_by(node))
        .collect();
    let started = created.then(|| {
        json!({
            "file": file.display().to_string(),
            "from_seq": cps.last().map_or(0, |c| c.seq),
        })
    });
    if created && let Some(last) = cps.last() {
        tracing::warn!(
            witness = %file.display(),
            seq = last.seq,
            "new checkpoint witness for an existing store: it starts at the newest checkpoint; a truncation before that seq cannot be detected by it"
        );
        let w = checkpoint::FileWitness { path: file };
        checkpoint::Witness::record(&w, last)
            .map_err(|e| anyhow::anyhow!("audit.checkpoint_file: {e}"))?;
        return Ok(WitnessAtStart {
            broken: None,
            started,
        });
    }
    let witnesses = checkpoint::witnesses(config);
    let broken = checkpoint::check_witnesses(&witnesses, &cps, node)
        .err()
        .map(|(seq, why)| format!("seq {seq}: {why}"));
    Ok(WitnessAtStart { broken, started })
}

/// Why truncating or re-signing the audit log could go unnoticed with this
/// config.
fn integrity_warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    match config.witness_file() {
        None => out.push(
            "audit.checkpoint_witness = false: deleting the last events together with their checkpoints cannot be detected".to_string(),
        ),
        Some(f) if f.starts_with(&config.server.data_dir) => out.push(format!(
            "audit.checkpoint_file {} is inside data_dir: whoever can truncate the store can truncate the witness too",
            f.display()
        )),
        Some(_) => {}
    }
    if config.audit.verify_keys.is_empty() {
        out.push(format!(
            "audit.verify_keys is empty: verification trusts the key in {}, so a chain re-signed with a key planted there passes (give `audit verify --key` or set audit.verify_keys)",
            config.server.data_dir.display()
        ));
    }
    out
}

/// Opens the store the config names: the shared PostgreSQL store when
/// `server.database_url_env` or `database_url_file` is set (`url`), else the
/// embedded one in `data_dir`.
pub async fn open_store(config: &Config, url: Option<&str>) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match url {
        Some(url) => Arc::new(PgStore::open(url).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot open the PostgreSQL store named by {}: {e}",
                if config.server.database_url_env.is_some() {
                    "server.database_url_env"
                } else {
                    "server.database_url_file"
                }
            )
        })?),
        None => {
            let db = config.db_path();
            Arc::new(
                SqliteStore::open(&db, SqliteOptions::default())
                    .with_context(|| format!("cannot open the store {}", db.display()))?,
            )
        }
    })
}

/// Starts the service on `listener`: opens the store, checks the audit
/// chain's tail, ends overdue grants, then serves.
pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<Running> {
    config.check_upstream_secrets()?;
    identity::check_totp_secrets(&config)?;
    // The certificate is read before anything else starts: a bad one stops
    // the service at once.
    let api_tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(
            breakglass_gateway_postgres::tls_acceptor(cert, key)
                .context("server.tls_cert, server.tls_key: cannot load the API's certificate")?,
        ),
        _ => None,
    };
    let (policy, policy_sha) = load_policy_with_digest(&config)?;
    for w in config.policy_warnings(&policy) {
        tracing::warn!(policy_file = %config.policy.file.display(), "{w}");
    }
    let database_url = config.database_url()?;
    let db = config.db_path();
    datadir::prepare(
        &config.server.data_dir,
        database_url.is_none().then_some(db.as_path()),
    )?;
    // INVARIANT: one serving process per data dir (the in-memory chain
    // head and the store's request cache assume a single writer).
    let lock = datadir::lock(&config.server.data_dir, "serve")?;
    let key = keys::load_or_create(&config.server.data_dir)?;
    let store = open_store(&config, database_url.as_deref()).await?;
    let trusted = trusted_keys(&config, &key.verifying_key())?;
    let mut broken = checkpoint::check_tail(store.as_ref(), &trusted).await?;
    let mut witness_started = None;
    if broken.is_none() {
        let node = breakglass_core::audit::key_id(&key.verifying_key());
        let w = check_witness_at_start(&config, store.as_ref(), &node).await?;
        broken = w.broken;
        witness_started = w.started;
    }
    let integrity_warnings = integrity_warnings(&config);
    for w in &integrity_warnings {
        tracing::warn!("AUDIT TRUNCATION NOT DETECTABLE: {w}");
    }
    if let Some(why) = &broken {
        tracing::error!(reason = %why, "AUDIT CHAIN BROKEN: refusing all writes until it is investigated (run `breakglass audit verify`)");
    }
    let notifier = Arc::new(notify::Notifier::open(&config)?);
    let slack = slack::Slack::open(&config)?;
    let metrics = Arc::new(Metrics::default());
    let interval = Duration::from_secs(config.checkpoint_interval_s());
    let app = App::new(
        config,
        store.clone(),
        policy,
        metrics,
        key.clone(),
        broken.clone(),
    );
    // Subscribed before `recover` reads the open requests: a request another
    // node creates meanwhile is in one or the other.
    let shared_feed = store.is_shared().then(|| store.subscribe());
    // INVARIANT: overdue grants, and the grants of principals no longer
    // configured, end before the API serves anything.
    let recovered = app.scheduler.recover().await?;
    let overdue_ended = recovered.overdue_ended;
    if broken.is_none() {
        store
            .append(
                vec![breakglass_core::EventDraft {
                    actor: "system".into(),
                    action: "service.started".into(),
                    request_id: None,
                    details: json!({
                        "version": env!("CARGO_PKG_VERSION"),
                        "policy_sha256": policy_sha,
                        "policies": app.policy.policy_names(),
                        "overdue_ended": overdue_ended,
                        "integrity_warnings": integrity_warnings,
                        "witness_started": witness_started,
                        "principal_removed_ended": recovered.offboarded,
                        "node": app.node_id(),
                    }),
                }],
                now(),
            )
            .await?;
    }
    let _ = app.slack.set(slack);
    let mut background = vec![app.scheduler.spawn()];
    // Notifications follow the log from each sink's cursor; not while the
    // chain is broken (nothing in it can be vouched for).
    if broken.is_none() {
        let _ = app.notifier.set(notifier.clone());
        background.extend(notifier.spawn(&app).await?);
    }
    if let Some(feed) = shared_feed {
        background.push(app.scheduler.spawn_follower(feed));
    }
    background.extend(app.identity.spawn_refresh());
    background.push(checkpoint::spawn(Arc::downgrade(&app), interval));
    let mut pg_addr = None;
    if broken.is_none() {
        let closed = gateway::recover_sessions(&app).await?;
        if closed > 0 {
            tracing::warn!(
                sessions = closed,
                "closed session recordings interrupted by the last stop"
            );
        }
    }
    // After recovery: until then, interrupted sessions have no end.
    background.push(checkpoint::spawn_full_verify(Arc::downgrade(&app)));
    // One follower cuts the sessions of every gateway when a grant ends.
    background.push(gateway::spawn_cutter(&app));
    // After recovery too: a grant is summarised once its sessions ended.
    background.push(review::spawn(Arc::downgrade(&app)));
    if let Some(pg) = app.config.gateway.postgres.clone() {
        if broken.is_some() {
            tracing::error!("the PostgreSQL gateway stays off while the audit chain is broken");
        } else {
            let authority = Arc::new(gateway::GatewayAuthority {
                app: Arc::downgrade(&app),
            });
            let gw = breakglass_gateway_postgres::Gateway::new(
                pg.clone(),
                authority,
                app.config.recordings_dir(),
                app.sessions.clone(),
            )
            .context("gateway.postgres: cannot start (TLS certificate or key, or the recordings directory)")?;
            let pg_listener = TcpListener::bind(pg.listen).await.with_context(|| {
                format!("gateway.postgres.listen: cannot listen on {}", pg.listen)
            })?;
            pg_addr = Some(pg_listener.local_addr()?);
            background.push(tokio::spawn(gw.serve(pg_listener)));
        }
    }
    let mut ssh_addr = None;
    if app.config.gateway.ssh.is_some() {
        if broken.is_some() {
            tracing::error!("the SSH gateway stays off while the audit chain is broken");
        } else {
            ssh_addr = ssh::start(&app, &mut background).await?;
        }
    }
    let addr = listener.local_addr()?;
    let api_cert = match &app.config.server.tls_cert {
        Some(f) => Some(
            std::fs::read(f)
                .with_context(|| format!("server.tls_cert: cannot read {}", f.display()))?,
        ),
        None => None,
    };
    app.drills.set_addrs(addr, api_cert, pg_addr, ssh_addr);
    background.push(drill::spawn_metrics_follower(&app));
    if broken.is_none() {
        background.extend(drill::spawn_schedulers(&app));
    }
    let (shutdown, mut rx) = tokio::sync::watch::channel(false);
    let router = http::router(app.clone()).into_make_service_with_connect_info::<ApiConn>();
    let listener = LimitedListener::new(
        listener,
        breakglass_core::slots::Slots::new(app.config.api_slot_limits()),
        Deadlines {
            idle: app.config.api_idle_timeout(),
            unauthenticated: app.config.api_unauthenticated_timeout(),
        },
        api_tls,
        app.metrics.clone(),
    );
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
    });
    Ok(Running {
        app,
        addr,
        pg_addr,
        ssh_addr,
        overdue_ended,
        server,
        shutdown,
        background,
        _lock: lock,
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the service until SIGTERM or SIGINT. Returns an error (with a message
/// naming the file, key or line) when the config or policy is wrong.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    init_tracing(opts.log_format);
    // The dev setup (with its demo database) is dropped last, after the
    // runtime and everything in it has stopped: that stops the cluster and
    // removes the temp dir on every exit path.
    let dev = if opts.dev {
        let listen = opts
            .listen
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
        if !listen.ip().is_loopback() {
            anyhow::bail!(
                "--listen {listen}: --dev binds loopback only (try --listen 127.0.0.1:{})",
                listen.port()
            );
        }
        Some(dev::prepare(&dev::DevOptions {
            data_dir: opts.data_dir.clone(),
            listen,
            keep: opts.keep,
        })?)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async {
        let (config, banner) = match &dev {
            Some(setup) => {
                let url = format!("http://{}", setup.config.server.listen);
                (setup.config.clone(), Some(dev::banner(setup, &url)))
            }
            None => {
                let path = opts
                    .config
                    .as_deref()
                    .context("serve needs --config FILE (or --dev for a demo)")?;
                (Config::load(path)?, None)
            }
        };
        // A second server on a data dir in use is told so before its
        // listen address is found taken (`start` holds the lock itself).
        if config.server.data_dir.is_dir() {
            drop(datadir::lock(&config.server.data_dir, "serve")?);
        }
        let listen = config.server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let running = start(config, listener).await?;
        tracing::info!(
            addr = %running.addr,
            postgres_gateway = ?running.pg_addr,
            ssh_gateway = ?running.ssh_addr,
            startup_ms = started.elapsed().as_millis() as u64,
            overdue_ended = running.overdue_ended,
            "ready"
        );
        if let Some(b) = banner {
            eprintln!("{b}");
        }
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown().await
    });
    drop(rt);
    if let Some(setup) = dev {
        if setup.files.keep {
            eprintln!(
                "breakglass: dev files kept in {} (remove it when done)",
                setup.files.dir.display()
            );
        }
        drop(setup);
    }
    result
}
