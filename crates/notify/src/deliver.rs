//! One delivery attempt over the network (blocking: callers run it off the
//! async workers), and the retry schedule between attempts.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// The most bytes of a receiver's answer we read (and then ignore).
pub const RESPONSE_LEN_MAX: u64 = 64 * 1024;
/// The largest body we send.
pub const PAYLOAD_LEN_MAX: usize = 256 * 1024;
/// Connecting takes at most this long, within the sink's `timeout`.
pub const CONNECT_TIMEOUT_MAX_S: u64 = 5;
/// The first retry waits about this long; each one doubles it.
pub const BACKOFF_BASE_MS: u64 = 500;
/// No wait between two attempts is longer than this (also caps a
/// receiver's `Retry-After`).
pub const BACKOFF_CAP_MS: u64 = 60_000;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        status: u16,
    },
    /// A timeout, a refused connection, 429 or 5xx: try again, after
    /// `after` if the receiver said when.
    Retry {
        why: String,
        after: Option<Duration>,
    },
    /// Another answer (4xx): retrying the same request will not help.
    Fail {
        why: String,
    },
}

/// The wait before retry number `attempt` (0 for the first retry):
/// exponential with "equal jitter" (half fixed, half random, from
/// `unit` in 0..1), capped at [`BACKOFF_CAP_MS`]. A receiver's
/// `Retry-After` wins when it is longer, up to the cap.
pub fn backoff(attempt: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE_MS.saturating_mul(1u64 << attempt.min(20));
    let capped = exp.min(BACKOFF_CAP_MS);
    let jittered = capped / 2 + ((capped / 2) as f64 * unit.clamp(0.0, 1.0)) as u64;
    let wait = Duration::from_millis(jittered);
    match retry_after {
        Some(ra) => wait.max(ra.min(Duration::from_millis(BACKOFF_CAP_MS))),
        None => wait,
    }
}

/// An HTTP client for one sink: its timeout, no redirects, no proxy from
/// the environment, the system's CA certificates.
#[derive(Clone)]
pub struct HttpSender {
    agent: ureq::Agent,
}

/// The system's CA certificates, once per process.
fn roots() -> Arc<Vec<ureq::tls::Certificate<'static>>> {
    static ROOTS: std::sync::OnceLock<Arc<Vec<ureq::tls::Certificate<'static>>>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            Arc::new(
                rustls_native_certs::load_native_certs()
                    .certs
                    .iter()
                    .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                    .collect(),
            )
        })
        .clone()
}

impl HttpSender {
    pub fn new(timeout: Duration) -> HttpSender {
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::Specific(roots()))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(
                timeout.min(Duration::from_secs(CONNECT_TIMEOUT_MAX_S)),
            ))
            .max_redirects(0)
            .proxy(None)
            .user_agent(concat!("breakglass/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpSender {
            agent: crate::agent::agent(config),
        }
    }

    /// POSTs `body` as JSON with `headers`. Never includes the URL in what
    /// it returns: a Slack webhook URL is a secret.
    pub fn post(&self, url: &str, headers: &[(&str, String)], body: &[u8]) -> Attempt {
        if body.len() > PAYLOAD_LEN_MAX {
            return Attempt::Fail {
                why: format!("payload of {} bytes is over the limit", body.len()),
            };
        }
        let mut req = self
            .agent
            .post(url)
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        match req.send(body) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // Read (a bounded part of) the answer so the connection is
                // left clean; its content does not matter.
                let _ = resp
                    .body_mut()
                    .with_config()
                    .limit(RESPONSE_LEN_MAX)
                    .read_to_vec();
                match status {
                    200..=299 => Attempt::Delivered { status },
                    429 | 500..=599 => Attempt::Retry {
                        why: format!("HTTP {status}"),
                        after: retry_after,
                    },
                    _ => Attempt::Fail {
                        why: format!("HTTP {status}"),
                    },
                }
            }
            Err(e) => Attempt::Retry {
                why: transport_error(&e),
                after: None,
            },
        }
    }
}

/// A transport error in words, without the URL.
fn transport_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "timed out".into(),
        ureq::Error::Io(io) => format!("connection failed: {}", io.kind()),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => "TLS failed".into(),
        ureq::Error::StatusCode(s) => format!("HTTP {s}"),
        _ => "request failed".into(),
    }
}

/// A syslog sink's connection, kept from one event to the next (a SIEM
/// collector takes a stream; a connection per event costs both sides a
/// handshake and, on many collectors, a thread).
pub enum SyslogConn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl SyslogConn {
    fn tcp(&self) -> &TcpStream {
        match self {
            SyslogConn::Plain(s) => s,
            SyslogConn::Tls(s) => &s.sock,
        }
    }

    fn write_frames(&mut self, frames: &[u8]) -> std::io::Result<()> {
        match self {
            SyslogConn::Plain(s) => s.write_all(frames).and_then(|_| s.flush()),
            SyslogConn::Tls(s) => s.write_all(frames).and_then(|_| s.flush()),
        }
    }

    /// Whether the collector has closed its end (a write would seem to
    /// succeed and the frames be lost): a peek that finds the end of the
    /// stream, or an error.
    fn closed_by_peer(&self) -> bool {
        let tcp = self.tcp();
        if tcp.set_nonblocking(true).is_err() {
            return true;
        }
        let mut one = [0u8; 1];
        let closed = match tcp.peek(&mut one) {
            Ok(0) => true,
            // A collector does not speak; TLS may (session tickets).
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        tcp.set_nonblocking(false).is_err() || closed
    }
}

/// Opens a syslog connection (TLS when `tls` is set) within `timeout`.
fn syslog_connect(
    address: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<SyslogConn, Attempt> {
    let retry = |why: String| Attempt::Retry { why, after: None };
    let addr = match address.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => return Err(retry(format!("cannot resolve {address}"))),
    };
    let stream = TcpStream::connect_timeout(
        &addr,
        timeout.min(Duration::from_secs(CONNECT_TIMEOUT_MAX_S)),
    )
    .map_err(|e| retry(format!("connection failed: {}", e.kind())))?;
    let _ = stream.set_write_timeout(Some(timeout));
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_nodelay(true);
    let Some(config) = tls else {
        return Ok(SyslogConn::Plain(stream));
    };
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = rustls::pki_types::ServerName::try_from(host).map_err(|_| Attempt::Fail {
        why: format!("{address}: not a valid TLS server name"),
    })?;
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| Attempt::Fail {
        why: format!("TLS set-up failed: {e}"),
    })?;
    Ok(SyslogConn::Tls(Box::new(rustls::StreamOwned::new(
        conn, stream,
    ))))
}

/// Syslog over TCP, or TLS when `tls` is set: writes the frames on the
/// sink's connection `kept`, opening one when there is none or the
/// collector closed it, within `timeout`. A failed write drops the
/// connection (the retry opens a new one).
pub fn send_syslog(
    address: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    frames: &[u8],
    timeout: Duration,
    kept: &std::sync::Mutex<Option<SyslogConn>>,
) -> Attempt {
    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
    if kept.as_ref().is_some_and(SyslogConn::closed_by_peer) {
        *kept = None;
    }
    let conn = match kept.take() {
        Some(c) => c,
        None => match syslog_connect(address, tls, timeout) {
            Ok(c) => c,
            Err(attempt) => return attempt,
        },
    };
    let mut conn = conn;
    match conn.write_frames(frames) {
        Ok(()) => {
            *kept = Some(conn);
            Attempt::Delivered { status: 0 }
        }
        Err(e) => Attempt::Retry {
            why: format!("write failed: {}", e.kind()),
            after: None,
        },
    }
}

/// The TLS client config for a syslog sink: the PEM CA file's certificates,
/// or the system's.
pub fn syslog_tls(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for item in ureq::tls::parse_pem(&pem) {
                if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
                    store
                        .add(rustls::pki_types::CertificateDer::from(c.der().to_vec()))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            if store.is_empty() {
                return Err(format!("{}: no PEM certificate in it", path.display()));
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(store)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syslog_connection_is_kept_and_reopened_when_the_collector_closes_it() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let kept = std::sync::Mutex::new(None);
        let send = |frame: &[u8]| send_syslog(&address, None, frame, Duration::from_secs(5), &kept);
        assert_eq!(send(b"one"), Attempt::Delivered { status: 0 });
        assert_eq!(send(b"two"), Attempt::Delivered { status: 0 });
        let (mut first, _) = listener.accept().expect("the first connection");
        let mut got = [0u8; 6];
        first.read_exact(&mut got).expect("both frames on it");
        assert_eq!(&got, b"onetwo");
        // The collector closes its end (a restart, an idle timeout): the
        // next frame goes on a new connection, not into the closed one.
        drop(first);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(send(b"three"), Attempt::Delivered { status: 0 });
        listener.set_nonblocking(false).expect("blocking accept");
        let (mut second, _) = listener.accept().expect("a second connection");
        let mut got = [0u8; 5];
        second.read_exact(&mut got).expect("the frame on it");
        assert_eq!(&got, b"three");
        // Nothing listens any more: the attempt is retried later.
        drop(second);
        drop(listener);
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(send(b"four"), Attempt::Retry { .. }));
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        assert_eq!(backoff(0, 0.0, None), Duration::from_millis(250));
        assert_eq!(backoff(0, 1.0, None), Duration::from_millis(500));
        assert_eq!(backoff(3, 0.0, None), Duration::from_millis(2000));
        assert_eq!(
            backoff(30, 1.0, None),
            Duration::from_millis(BACKOFF_CAP_MS)
        );
        assert_eq!(
            backoff(0, 0.5, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(0, 0.5, Some(Duration::from_secs(3600))),
            Duration::from_millis(BACKOFF_CAP_MS)
        );
    }
}
