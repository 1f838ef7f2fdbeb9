//! The leg to the target: TCP, the pinned host key (checked before any
//! credential is sent), and the login as the role's user with a session
//! certificate or the role's key file.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use crate::keys::{CertRequest, fingerprint, read_private_key, sign_user_certificate};
use crate::{Authorized, UPSTREAM_TIMEOUT_MS, UpstreamLogin};

/// The client handler: accepts exactly the pinned host key.
pub(crate) struct Pinned {
    pinned: russh::keys::PublicKey,
    mismatch: Arc<AtomicBool>,
    offered: Arc<std::sync::Mutex<Option<String>>>,
    /// Where connections the target forwards (`ssh -R`) go; without it
    /// they are refused.
    forwarded: Option<tokio::sync::mpsc::Sender<Forwarded>>,
}

/// A connection the target forwarded to the gateway for a remote forward
/// (`ssh -R`): to be relayed to the client, or refused (dropping `reply`
/// refuses it).
pub(crate) struct Forwarded {
    pub channel: russh::Channel<client::Msg>,
    pub connected_address: String,
    pub connected_port: u32,
    pub originator_address: String,
    pub originator_port: u32,
    pub reply: client::ChannelOpenHandle,
}

/// Forwarded connections waiting to be relayed, at most.
pub(crate) const FORWARDED_QUEUE_LEN: usize = 64;

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let ok = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if let Ok(mut o) = self.offered.lock() {
                    *o = Some(fingerprint(key));
                }
                key.key_data() == self.pinned.key_data()
            }
            // A host certificate is not a pinned key.
            PublicKeyOrCertificate::Certificate(_) => false,
        };
        if !ok {
            self.mismatch.store(true, Ordering::SeqCst);
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // A full queue or no session to relay to: `reply` is dropped, which
        // refuses the connection.
        if let Some(tx) = &self.forwarded {
            let _ = tx.try_send(Forwarded {
                channel,
                connected_address: connected_address.into(),
                connected_port,
                originator_address: originator_address.into(),
                originator_port,
                reply,
            });
        }
        Ok(())
    }
}

impl Pinned {
    /// A handler that accepts only `pinned`.
    pub(crate) fn new(pinned: russh::keys::PublicKey) -> Pinned {
        Pinned {
            pinned,
            mismatch: Arc::new(AtomicBool::new(false)),
            offered: Arc::new(std::sync::Mutex::new(None)),
            forwarded: None,
        }
    }
}

pub(crate) type Upstream = client::Handle<Pinned>;

/// The ciphers the gateway offers upstream, best first. AES-GCM comes
/// before ChaCha20-Poly1305 (russh's own first choice): with AES-NI, on
/// both sides, it costs a fraction of the CPU per byte, and every byte a
/// session moves is also hashed into its recording on the same cores.
const UPSTREAM_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// Connects and signs in; the error is the one line the client is told.
pub(crate) async fn connect(
    auth: &Authorized,
    session_id: &str,
    user_ca: &russh::keys::PrivateKey,
    packet_len_max: u32,
    forwarded: tokio::sync::mpsc::Sender<Forwarded>,
) -> Result<Upstream, String> {
    let up = &auth.upstream;
    let mismatch = Arc::new(AtomicBool::new(false));
    let offered = Arc::new(std::sync::Mutex::new(None));
    let handler = Pinned {
        pinned: up.host_key.clone(),
        mismatch: mismatch.clone(),
        offered: offered.clone(),
        forwarded: auth.port_forwarding.then_some(forwarded),
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        maximum_packet_size: packet_len_max,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(UPSTREAM_CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    });
    let timeout = Duration::from_millis(UPSTREAM_TIMEOUT_MS);
    let target = &auth.target;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((up.host.as_str(), up.port))
            .await
            .map_err(|e| format!("cannot reach the upstream of {target}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut handle = client::connect_stream(config, tcp, handler)
            .await
            .map_err(|e| {
                if mismatch.load(Ordering::SeqCst) {
                    let got = offered
                        .lock()
                        .ok()
                        .and_then(|o| o.clone())
                        .unwrap_or_else(|| "a host certificate".into());
                    format!(
                        "the upstream host key of {target} is {got}, not the pinned {}; refused before any credential was sent",
                        fingerprint(&up.host_key)
                    )
                } else {
                    format!("cannot set up SSH with the upstream of {target}: {e}")
                }
            })?;
        let result = match &up.login {
            UpstreamLogin::Certificate => {
                let key = crate::keys::random_ed25519();
                let cert = sign_user_certificate(
                    user_ca,
                    key.public_key(),
                    &CertRequest {
                        user: &up.user,
                        key_id: format!(
                            "breakglass:{}:{}:{}",
                            auth.principal, auth.request_id, session_id
                        ),
                        valid_after: breakglass_core::Timestamp::now(),
                        valid_before: auth.expires_at,
                        pty: true,
                        port_forwarding: auth.port_forwarding,
                        credential: None,
                    },
                )
                .map_err(|e| e.to_string())?;
                handle
                    .authenticate_openssh_cert(up.user.clone(), Arc::new(key), cert)
                    .await
            }
            UpstreamLogin::KeyFile(path) => {
                let key = read_private_key(path).map_err(|e| {
                    tracing::error!(error = %e, "cannot read an upstream key file");
                    "the upstream credentials are not available; see the server log".to_string()
                })?;
                handle
                    .authenticate_publickey(
                        up.user.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(key), None),
                    )
                    .await
            }
        };
        match result {
            Ok(r) if r.success() => Ok(handle),
            Ok(_) => Err(format!(
                "the upstream of {target} refused the login as {:?} (is the breakglass user CA in its TrustedUserCAKeys?)",
                up.user
            )),
            Err(e) => Err(format!("the upstream of {target} failed during login: {e}")),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the upstream of {target} did not answer within {} s",
            timeout.as_secs()
        )),
    }
}
