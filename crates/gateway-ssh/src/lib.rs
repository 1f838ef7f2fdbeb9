//! The SSH gateway: operators keep the stock OpenSSH client and sign in to
//! `TARGET@gateway` with a grant credential (password or
//! keyboard-interactive). The gateway checks the grant, connects to the
//! target's pinned upstream as the role's login user (with a per-session
//! certificate from its user CA, or the role's key file), relays shell and
//! exec channels while recording them (asciicast events: output, input,
//! resize; exec commands and exit statuses), and cuts the session the
//! moment the grant ends.
//!
//! `session` is the per-connection driver (a russh server handler),
//! `upstream` the leg to the target, `keys` the gateway's host and CA keys
//! and the session certificates, `cast` turns a recording into an asciicast
//! v2 file. What the gateway needs from the rest of breakglass is the
//! [`Authority`] trait; recordings, the registry of live sessions and
//! anchoring are shared with the PostgreSQL gateway
//! (`breakglass-gateway-common`).

pub mod cast;
pub mod keys;
pub mod probe;
mod session;
pub mod sftp;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use breakglass_core::Timestamp;
use breakglass_core::slots::{SlotLimits, Slots};
use breakglass_core::time::parse_duration;
use breakglass_gateway_common::recording::Recorder;
use breakglass_gateway_common::{AbortOnDrop, Registry, SessionAuthority};
use russh::keys::{PrivateKey, PublicKey};
use serde::Deserialize;
use thiserror::Error;
use tokio::net::TcpListener;

/// Connections at once, at most (the config may set fewer).
pub const CONNECTIONS_MAX: usize = 100_000;
/// Session channels one connection may have open at once, at most.
pub const CHANNELS_PER_CONNECTION_MAX: usize = 64;
/// Largest SSH packet the gateway accepts or sends, at most (RFC 4253
/// requires 32768 to work; OpenSSH uses up to 256 KiB).
pub const PACKET_LEN_MAX: u32 = 256 * 1024;
/// An exec command longer than this is refused.
pub const COMMAND_LEN_MAX: usize = 64 * 1024;
/// A terminal name (`TERM`) longer than this is refused.
pub const TERM_LEN_MAX: usize = 64;
/// Terminal sizes beyond this (columns or rows) are refused.
pub const TERMINAL_SIZE_MAX: u32 = 10_000;
/// Connecting and signing in to the upstream must finish within this.
pub const UPSTREAM_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Error)]
pub enum SshError {
    #[error("{path}: {reason}")]
    Key { path: String, reason: String },
    #[error("cannot sign a session certificate: {0}")]
    Certificate(String),
    #[error("recordings: {0}")]
    Recordings(std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// `[gateway.ssh]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshGatewayConfig {
    pub listen: SocketAddr,
    /// Host name clients should use (shown by `breakglass credentials` and
    /// used by `connect`); defaults to the listen address.
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// The gateway's own host key (OpenSSH format, unencrypted, mode
    /// 0600); created as an ed25519 key on first start. Default
    /// `<data_dir>/ssh/host_ed25519_key`.
    #[serde(default)]
    pub host_key_file: Option<PathBuf>,
    /// The user CA key the gateway signs per-session certificates with;
    /// created when absent. Its public key goes into the targets'
    /// `TrustedUserCAKeys`. Default `<data_dir>/ssh/user_ca_ed25519_key`.
    #[serde(default)]
    pub user_ca_key_file: Option<PathBuf>,
    /// The CA key breakglass signs client certificates with (`connect`'s
    /// certificate login, bound to a grant credential); created when
    /// absent. Default `<data_dir>/ssh/client_ca_ed25519_key`. Nodes
    /// that share a store must share this key.
    #[serde(default)]
    pub client_ca_key_file: Option<PathBuf>,
    /// fsync every recorded entry before forwarding it (slower; the default
    /// makes entries durable within a few milliseconds).
    #[serde(default)]
    pub strict_recording: bool,
    /// Connections at once, signed in or not (the oldest one not signed in
    /// is closed to make room).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections at once from one client address (IPv6: per /64).
    #[serde(default = "default_max_per_source")]
    pub max_connections_per_source: usize,
    /// Of `max_connections`, how many only signed-in sessions may use
    /// (default: one sixteenth).
    #[serde(default)]
    pub reserved_connections: Option<usize>,
    /// Live sessions (connections) of one grant at once.
    #[serde(default = "default_max_per_grant")]
    pub max_connections_per_grant: usize,
    /// Session channels one connection may have open at once.
    #[serde(default = "default_max_channels")]
    pub max_channels_per_connection: usize,
    /// Sign-in attempts per connection.
    #[serde(default = "default_max_auth_attempts")]
    pub max_auth_attempts: usize,
    /// The client must finish the handshake and sign in within this.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: String,
    /// A session with no traffic either way for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// Largest SSH packet, in bytes (between 32768 and 262144).
    #[serde(default = "default_packet_len_max")]
    pub packet_len_max: u32,
    /// The ciphers offered to clients (the client picks its first one the
    /// gateway offers). Default: AES-GCM only; see [`CLIENT_CIPHERS`].
    #[serde(default = "default_ciphers")]
    pub ciphers: Vec<String>,
}

/// The ciphers `gateway.ssh.ciphers` may name: the AEAD and CTR modes
/// russh implements (no CBC, no `none`).
pub const CLIENT_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// AES-GCM only, by default. A stock OpenSSH client prefers
/// ChaCha20-Poly1305, then AES-CTR with a MAC, then AES-GCM, and takes the
/// first the server offers; offering GCM alone gets it GCM, which:
/// - is not open to the Terrapin prefix truncation (CVE-2023-48795) with
///   clients that lack strict key exchange, as ChaCha20-Poly1305 and the
///   `-etm` MACs are;
/// - costs a fraction of ChaCha20-Poly1305's CPU per byte with AES-NI, on
///   a path where every byte is also decrypted from the target, hashed
///   into the recording and encrypted again.
///
/// Every OpenSSH since 6.2, PuTTY since 0.76 and Go's x/crypto/ssh speak
/// it; `ciphers` admits the others for older clients.
fn default_ciphers() -> Vec<String> {
    vec![
        russh::cipher::AES_256_GCM.as_ref().into(),
        russh::cipher::AES_128_GCM.as_ref().into(),
    ]
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
fn default_max_channels() -> usize {
    10
}
fn default_max_auth_attempts() -> usize {
    6
}
fn default_handshake_timeout() -> String {
    "10s".into()
}
fn default_idle_timeout() -> String {
    "30m".into()
}
fn default_packet_len_max() -> u32 {
    32 * 1024
}

impl SshGatewayConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let handshake = parse_duration(&self.handshake_timeout)
            .map_err(|e| format!("gateway.ssh.handshake_timeout: {e}"))?;
        if !(1..=300).contains(&handshake) {
            return Err("gateway.ssh.handshake_timeout must be between 1s and 5m".into());
        }
        parse_duration(&self.idle_timeout).map_err(|e| format!("gateway.ssh.idle_timeout: {e}"))?;
        if self.max_connections == 0 || self.max_connections > CONNECTIONS_MAX {
            return Err(format!(
                "gateway.ssh.max_connections must be between 1 and {CONNECTIONS_MAX}"
            ));
        }
        if self.max_connections_per_source == 0 {
            return Err("gateway.ssh.max_connections_per_source must be at least 1".into());
        }
        if let Some(r) = self.reserved_connections
            && r >= self.max_connections
        {
            return Err(format!(
                "gateway.ssh.reserved_connections must be less than max_connections ({})",
                self.max_connections
            ));
        }
        if self.max_connections_per_grant == 0 {
            return Err("gateway.ssh.max_connections_per_grant must be at least 1".into());
        }
        if !(1..=CHANNELS_PER_CONNECTION_MAX).contains(&self.max_channels_per_connection) {
            return Err(format!(
                "gateway.ssh.max_channels_per_connection must be between 1 and {CHANNELS_PER_CONNECTION_MAX}"
            ));
        }
        if !(1..=20).contains(&self.max_auth_attempts) {
            return Err("gateway.ssh.max_auth_attempts must be between 1 and 20".into());
        }
        if !(32 * 1024..=PACKET_LEN_MAX).contains(&self.packet_len_max) {
            return Err(format!(
                "gateway.ssh.packet_len_max must be between 32768 and {PACKET_LEN_MAX}"
            ));
        }
        self.cipher_names()?;
        Ok(())
    }

    /// `ciphers` as russh names, in the configured order: at least one,
    /// each from [`CLIENT_CIPHERS`], none twice.
    pub fn cipher_names(&self) -> Result<Vec<russh::cipher::Name>, String> {
        if self.ciphers.is_empty() {
            return Err("gateway.ssh.ciphers must name at least one cipher".into());
        }
        let mut out = Vec::with_capacity(self.ciphers.len());
        for c in &self.ciphers {
            let Some(name) = CLIENT_CIPHERS.iter().find(|n| n.as_ref() == c.as_str()) else {
                let known: Vec<&str> = CLIENT_CIPHERS.iter().map(|n| n.as_ref()).collect();
                return Err(format!(
                    "gateway.ssh.ciphers: {c:?} is not one of {}",
                    known.join(", ")
                ));
            };
            if out.contains(name) {
                return Err(format!("gateway.ssh.ciphers: {c:?} is named twice"));
            }
            out.push(*name);
        }
        Ok(out)
    }

    /// The slot limits of the listener.
    pub fn slot_limits(&self) -> SlotLimits {
        SlotLimits::new(
            self.max_connections,
            self.reserved_connections,
            self.max_connections_per_source,
        )
    }

    fn handshake(&self) -> Duration {
        Duration::from_secs(parse_duration(&self.handshake_timeout).unwrap_or(10))
    }

    fn idle(&self) -> Duration {
        Duration::from_secs(parse_duration(&self.idle_timeout).unwrap_or(1800))
    }
}

/// How the gateway signs in to a target.
#[derive(Debug, Clone)]
pub enum UpstreamLogin {
    /// A certificate signed for this session by the gateway's user CA.
    Certificate,
    /// The role's private key file.
    KeyFile(PathBuf),
}

/// Where and as whom a session goes.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    /// The pinned host key; any other key is refused before any credential
    /// is sent.
    pub host_key: PublicKey,
    pub user: String,
    pub login: UpstreamLogin,
}

/// A grant the authority accepted for a connection.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub request_id: String,
    pub principal: String,
    pub target: String,
    pub role: String,
    pub expires_at: Timestamp,
    /// The role allows local port forwarding (`ssh -L`).
    pub port_forwarding: bool,
    /// The role allows SFTP and `scp` (`file_transfer = true`).
    pub file_transfer: bool,
    pub upstream: UpstreamTarget,
}

/// Why a sign-in is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such target, or not an SSH target.
    UnknownTarget(String),
    /// Not a valid grant credential.
    BadCredential(String),
    /// A valid credential that does not allow this (ended grant, another
    /// target's).
    NotAuthorized(String),
    /// breakglass cannot check or record right now.
    Unavailable(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::UnknownTarget(m)
            | Refusal::BadCredential(m)
            | Refusal::NotAuthorized(m)
            | Refusal::Unavailable(m) => m,
        }
    }
}

/// What the SSH gateway needs from breakglass: how a client signs in,
/// beside what every gateway asks ([`SessionAuthority`]).
#[async_trait]
pub trait Authority: SessionAuthority {
    /// Checks a sign-in to `target` with a grant credential.
    async fn authorize(&self, target: &str, credential: &str) -> Result<Authorized, Refusal>;
    /// Checks a sign-in to `target` with a client certificate the service
    /// signed for the grant credential whose SHA-256 is `credential_hash`
    /// (the certificate itself was verified by the gateway).
    async fn authorize_certificate(
        &self,
        target: &str,
        credential_hash: [u8; 32],
    ) -> Result<Authorized, Refusal>;
}

/// The gateway's keys.
pub struct GatewayKeys {
    pub host_key: PrivateKey,
    pub user_ca: PrivateKey,
    /// The public key of the CA that signs client certificates.
    pub client_ca: PublicKey,
}

pub(crate) struct Shared {
    config: SshGatewayConfig,
    server_config: Arc<russh::server::Config>,
    authority: Arc<dyn Authority>,
    recorder: Arc<Recorder>,
    sessions: Registry,
    slots: Arc<Slots>,
    user_ca: PrivateKey,
    /// SHA-256 fingerprint of the client certificate CA.
    client_ca: russh::keys::ssh_key::Fingerprint,
}

/// The SSH gateway. Cloning shares it.
#[derive(Clone)]
pub struct SshGateway {
    shared: Arc<Shared>,
}

impl SshGateway {
    /// `recordings` is the directory of session recordings; `sessions` the
    /// registry of live sessions a cut reaches (shared with the other
    /// gateways of the node).
    pub fn new(
        config: SshGatewayConfig,
        keys: GatewayKeys,
        authority: Arc<dyn Authority>,
        recordings: PathBuf,
        sessions: Registry,
    ) -> Result<SshGateway, SshError> {
        let recorder = Arc::new(
            Recorder::new(&recordings, config.strict_recording).map_err(SshError::Recordings)?,
        );
        let methods = russh::MethodSet::from(
            &[
                russh::MethodKind::PublicKey,
                russh::MethodKind::Password,
                russh::MethodKind::KeyboardInteractive,
            ][..],
        );
        let server_config = russh::server::Config {
            server_id: russh::SshId::Standard("SSH-2.0-breakglass".into()),
            methods,
            // Refusals take as long as acceptances of a valid credential
            // roughly do, so timing tells little.
            auth_rejection_time: Duration::from_millis(300),
            auth_rejection_time_initial: Some(Duration::from_millis(0)),
            keys: vec![keys.host_key],
            max_auth_attempts: config.max_auth_attempts,
            maximum_packet_size: config.packet_len_max,
            inactivity_timeout: Some(config.idle()),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Owned(config.cipher_names().map_err(SshError::Config)?),
                ..russh::Preferred::DEFAULT
            },
            ..Default::default()
        };
        Ok(SshGateway {
            shared: Arc::new(Shared {
                slots: Slots::new(config.slot_limits()),
                server_config: Arc::new(server_config),
                config,
                authority,
                recorder,
                sessions,
                user_ca: keys.user_ca,
                client_ca: keys.client_ca.fingerprint(russh::keys::HashAlg::Sha256),
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
                    let slot = self.shared.slots.open(peer.ip());
                    let shared = self.shared.clone();
                    tokio::spawn(async move { session::handle(shared, stream, peer, slot).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ssh gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Anchors every live recording that moved, now.
    pub async fn anchor_now(&self) {
        breakglass_gateway_common::anchor_once(
            &self.shared.recorder,
            self.shared.authority.as_ref(),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<SshGatewayConfig, String> {
        let text = format!("listen = \"127.0.0.1:2222\"\n{extra}");
        let c: SshGatewayConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn ciphers_default_to_aes_gcm_and_take_only_what_russh_offers_safely() {
        let c = config("").expect("defaults");
        assert_eq!(
            c.cipher_names().expect("names"),
            vec![russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM]
        );
        let c = config("ciphers = [\"chacha20-poly1305@openssh.com\", \"aes128-ctr\"]")
            .expect("older clients admitted");
        assert_eq!(
            c.cipher_names().expect("names"),
            vec![russh::cipher::CHACHA20_POLY1305, russh::cipher::AES_128_CTR]
        );
        for (bad, says) in [
            ("ciphers = []", "at least one"),
            ("ciphers = [\"aes128-cbc\"]", "\"aes128-cbc\" is not one of"),
            ("ciphers = [\"none\"]", "\"none\" is not one of"),
            (
                "ciphers = [\"aes128-ctr\", \"aes128-ctr\"]",
                "\"aes128-ctr\" is named twice",
            ),
        ] {
            let err = config(bad).expect_err(bad);
            assert!(err.contains("gateway.ssh.ciphers"), "{bad}: {err}");
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
