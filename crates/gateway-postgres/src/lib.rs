//! The PostgreSQL gateway: operators connect with `psql` or any driver as
//! their principal, to a database named like the target, with a grant
//! credential as password. The gateway checks the grant, logs in to the real
//! database as the role's configured user, relays the protocol while
//! recording every statement, and cuts the session the moment the grant ends.
//!
//! `codec` is sans-IO framing; `session` is the per-connection driver;
//! `frontend` is the table of what each client message does to the
//! recording, `transcript` the entries and the model of prepared statements
//! behind it, `settings` the start-up settings a client may bring;
//! `upstream` is the leg to the database; `recording` the per-session log.
//! What the gateway needs from the rest of breakglass is the [`Authority`]
//! trait, so this crate knows nothing of stores or HTTP.

pub mod codec;
pub mod frontend;
mod session;
pub mod settings;
mod transcript;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use breakglass_core::Timestamp;
use breakglass_core::slots::{SlotLimits, Slots};
use breakglass_core::time::parse_duration;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use breakglass_gateway_common::recording;
use breakglass_gateway_common::recording::Recorder;
pub use breakglass_gateway_common::{
    ANCHOR_INTERVAL_MS, AbortOnDrop, Cut, Registry, SessionAuthority, SessionEnd, SessionInfo,
    SessionProgress,
};

pub use crate::upstream::{UpstreamTarget, UpstreamTls};

/// A byte stream to a client or the upstream, plain or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// `[gateway.postgres]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgGatewayConfig {
    pub listen: SocketAddr,
    /// Host name clients should use (shown by `breakglass credentials` and
    /// used by `connect`); defaults to the listen address.
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// PEM certificate chain and private key: with both set, clients may
    /// (and off loopback must) use TLS. Production needs TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Accept plaintext password logins from clients that are not on
    /// loopback. Off by default: grant credentials must not cross a network
    /// in clear.
    #[serde(default)]
    pub allow_plaintext_off_loopback: bool,
    /// fsync every recorded statement before forwarding it (slower; the
    /// default makes entries durable within a few milliseconds and never
    /// loses one to a crash of breakglass).
    #[serde(default)]
    pub strict_recording: bool,
    /// Connections at once, signed in or not. When none is free, the
    /// connection that has waited longest without signing in is closed to
    /// make room; only when all are signed in is a new one refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections at once from one client address (IPv6: per /64).
    /// Loopback is not exempt.
    #[serde(default = "default_max_per_source")]
    pub max_connections_per_source: usize,
    /// Of `max_connections`, how many only signed-in sessions may use
    /// (default: one sixteenth). Connections still in start-up never hold
    /// more than the rest.
    #[serde(default)]
    pub reserved_connections: Option<usize>,
    #[serde(default = "default_max_per_grant")]
    pub max_connections_per_grant: usize,
    /// A session with no traffic either way for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// The client must finish everything before it is signed in (the TLS
    /// handshake, the start-up packet, the password) within this.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: String,
    /// Largest client message (a query, a COPY chunk) in bytes.
    #[serde(default = "default_message_len_max")]
    pub message_len_max: usize,
}

fn default_max_connections() -> usize {
    1000
}
fn default_max_per_source() -> usize {
    128
}
fn default_max_per_grant() -> usize {
    16
}
fn default_idle_timeout() -> String {
    "30m".into()
}
fn default_startup_timeout() -> String {
    "10s".into()
}
fn default_message_len_max() -> usize {
    16 * 1024 * 1024
}

impl PgGatewayConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        parse_duration(&self.idle_timeout)
            .map_err(|e| format!("gateway.postgres.idle_timeout: {e}"))?;
        parse_duration(&self.startup_timeout)
            .map_err(|e| format!("gateway.postgres.startup_timeout: {e}"))?;
        if self.max_connections == 0 || self.max_connections > 100_000 {
            return Err("gateway.postgres.max_connections must be between 1 and 100000".into());
        }
        if self.max_connections_per_source == 0 {
            return Err("gateway.postgres.max_connections_per_source must be at least 1".into());
        }
        if let Some(r) = self.reserved_connections
            && r >= self.max_connections
        {
            return Err(format!(
                "gateway.postgres.reserved_connections must be less than max_connections ({})",
                self.max_connections
            ));
        }
        if self.max_connections_per_grant == 0 {
            return Err("gateway.postgres.max_connections_per_grant must be at least 1".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("gateway.postgres: set both tls_cert and tls_key, or neither".into());
        }
        if !(1024..=1 << 30).contains(&self.message_len_max) {
            return Err("gateway.postgres.message_len_max must be between 1 KiB and 1 GiB".into());
        }
        Ok(())
    }

    fn idle(&self) -> Duration {
        Duration::from_secs(parse_duration(&self.idle_timeout).unwrap_or(1800))
    }

    /// The slot limits of the listener.
    pub fn slot_limits(&self) -> SlotLimits {
        SlotLimits::new(
            self.max_connections,
            self.reserved_connections,
            self.max_connections_per_source,
        )
    }

    fn startup(&self) -> Duration {
        Duration::from_secs(parse_duration(&self.startup_timeout).unwrap_or(10))
    }
}

/// A grant the authority accepted for a connection.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub request_id: String,
    pub principal: String,
    pub target: String,
    pub role: String,
    pub expires_at: Timestamp,
    pub upstream: UpstreamTarget,
    pub redact_parameters: bool,
}

/// Why a connection is refused, each with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 3D000: no such target, or not a PostgreSQL target.
    UnknownDatabase(String),
    /// 28P01: the password is not a valid grant credential.
    BadCredential(String),
    /// 28000: a valid credential that does not allow this (ended grant,
    /// another principal's, another target's).
    NotAuthorized(String),
    /// 58000: breakglass cannot check or record right now.
    Unavailable(String),
}

impl Refusal {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Refusal::UnknownDatabase(_) => "3D000",
            Refusal::BadCredential(_) => "28P01",
            Refusal::NotAuthorized(_) => "28000",
            Refusal::Unavailable(_) => "58000",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::UnknownDatabase(m)
            | Refusal::BadCredential(m)
            | Refusal::NotAuthorized(m)
            | Refusal::Unavailable(m) => m,
        }
    }
}

/// What the PostgreSQL gateway needs from breakglass: how a client signs
/// in, beside what every gateway asks ([`SessionAuthority`]).
#[async_trait]
pub trait Authority: SessionAuthority {
    /// Checks a connection's user, database and password (grant credential).
    async fn authorize(
        &self,
        user: &str,
        database: &str,
        password: &str,
    ) -> Result<Authorized, Refusal>;
}

/// Where a client's cancel key really points.
#[derive(Clone)]
struct CancelTarget {
    host: String,
    port: u16,
    pid: i32,
    secret: i32,
    /// The session the key belongs to; removed when it ends.
    session: String,
}

pub(crate) struct Shared {
    config: PgGatewayConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    authority: Arc<dyn Authority>,
    recorder: Arc<Recorder>,
    sessions: Registry,
    cancel_keys: Mutex<HashMap<(i32, i32), CancelTarget>>,
    slots: Arc<Slots>,
}

/// The gateway. Cloning shares it.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// `recordings` is the directory of session recordings; `sessions` the
    /// registry of live sessions a cut reaches (shared with the other
    /// gateways of the node).
    pub fn new(
        config: PgGatewayConfig,
        authority: Arc<dyn Authority>,
        recordings: PathBuf,
        sessions: Registry,
    ) -> std::io::Result<Gateway> {
        let recorder = Arc::new(Recorder::new(&recordings, config.strict_recording)?);
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        Ok(Gateway {
            shared: Arc::new(Shared {
                tls,
                slots: Slots::new(config.slot_limits()),
                config,
                authority,
                recorder,
                sessions,
                cancel_keys: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Accepts connections until the listener fails; anchors the live
    /// recordings meanwhile.
    pub async fn serve(self, listener: TcpListener) {
        let anchors = tokio::spawn(breakglass_gateway_common::anchor_loop(
            Arc::downgrade(&self.shared.recorder),
            self.shared.authority.clone(),
        ));
        let _stop_anchors = AbortOnDrop(anchors);
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // The slot is taken here, in arrival order, so the
                    // oldest unauthenticated connection is the one evicted.
                    let slot = self.shared.slots.open(peer.ip());
                    let shared = self.shared.clone();
                    tokio::spawn(async move { session::handle(shared, stream, peer, slot).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The registry of live sessions this gateway registers into.
    pub fn sessions(&self) -> &Registry {
        &self.shared.sessions
    }

    /// Anchors every live recording that moved, now (the loop in `serve`
    /// does it every [`ANCHOR_INTERVAL_MS`]).
    pub async fn anchor_now(&self) {
        breakglass_gateway_common::anchor_once(
            &self.shared.recorder,
            self.shared.authority.as_ref(),
        )
        .await;
    }

    pub fn recordings_dir(&self) -> PathBuf {
        self.shared.recorder.dir().to_path_buf()
    }
}

/// Loads a PEM certificate chain and key into a TLS acceptor (TLS 1.2+).
/// The HTTP API loads its certificate the same way.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: {e}", what.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if certs.is_empty() {
        return Err(bad(cert, &"no certificate found"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad(key, &e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Shared {
    fn register(&self, request_id: &str, session_id: &str) -> Option<watch::Receiver<Option<Cut>>> {
        self.sessions.register(
            request_id,
            session_id,
            self.config.max_connections_per_grant,
        )
    }

    fn grant_sessions(&self, request_id: &str) -> usize {
        self.sessions.grant_sessions(request_id)
    }

    fn unregister(&self, request_id: &str, session_id: &str) {
        self.sessions.unregister(request_id, session_id);
    }
}
