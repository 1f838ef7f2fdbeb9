//! One delivery attempt over the network (HTTP async on the caller's
//! runtime; syslog blocking, run off the async workers), and the retry
//! schedule between attempts.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

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
/// the environment, the system's CA certificates, connections kept
/// between deliveries. Async: a delivery runs on the caller's runtime, with
/// no thread hand-off per POST.
#[derive(Clone)]
pub struct HttpSender {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

/// Idle connections to one receiver kept for the next deliveries (a
/// webhook sink has at most `IN_FLIGHT_MAX` in flight).
const IDLE_PER_HOST_MAX: usize = crate::config::IN_FLIGHT_MAX;
/// An idle kept connection is closed after this long.
const IDLE_TIMEOUT_S: u64 = 30;

/// The system's CA certificates, read once per process.
fn native_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
            Arc::new(store)
        })
        .clone()
}

/// A TLS client config trusting `roots`: ring, TLS 1.2 and 1.3, no client
/// certificate. Every outbound TLS connection of a sink is made with one.
fn client_tls(roots: Arc<rustls::RootCertStore>) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl HttpSender {
    pub fn new(timeout: Duration) -> HttpSender {
        let mut http = HttpConnector::new();
        // Also https: the TLS layer wraps this connector.
        http.enforce_http(false);
        http.set_connect_timeout(Some(
            timeout.min(Duration::from_secs(CONNECT_TIMEOUT_MAX_S)),
        ));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_tls(native_roots()))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(IDLE_TIMEOUT_S))
            .pool_max_idle_per_host(IDLE_PER_HOST_MAX)
            .build(https);
        HttpSender { client, timeout }
    }

    /// POSTs `body` as JSON with `headers`, within the sink's timeout
    /// (connecting, sending, and reading a bounded part of the answer).
    /// Never includes the URL in what it returns: a Slack webhook URL is a
    /// secret.
    pub async fn post(&self, url: &str, headers: &[(&str, String)], body: &[u8]) -> Attempt {
        if body.len() > PAYLOAD_LEN_MAX {
            return Attempt::Fail {
                why: format!("payload of {} bytes is over the limit", body.len()),
            };
        }
        let mut req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header(
                "user-agent",
                concat!("breakglass/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = match req.body(Full::new(Bytes::copy_from_slice(body))) {
            Ok(r) => r,
            Err(_) => {
                return Attempt::Fail {
                    why: "not a valid request (check the url)".into(),
                };
            }
        };
        let call = async {
            let resp = self.client.request(req).await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read (a bounded part of) the answer so the connection can be
            // kept; its content does not matter, and one too long only
            // costs the connection.
            let _ = Limited::new(resp.into_body(), RESPONSE_LEN_MAX as usize)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((status, retry_after))) => match status {
                200..=299 => Attempt::Delivered { status },
                429 | 500..=599 => Attempt::Retry {
                    why: format!("HTTP {status}"),
                    after: retry_after,
                },
                _ => Attempt::Fail {
                    why: format!("HTTP {status}"),
                },
            },
            Ok(Err(e)) => Attempt::Retry {
                why: transport_error(&e),
                after: None,
            },
            Err(_) => Attempt::Retry {
                why: "timed out".into(),
                after: None,
            },
        }
    }
}

/// A transport error in words, without the URL.
fn transport_error(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    // The innermost cause that says what happened to the socket or TLS
    // (an I/O error may wrap the TLS one).
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    let mut io_kind = None;
    while let Some(c) = cause {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return "TLS failed".into();
        }
        match c.downcast_ref::<std::io::Error>() {
            Some(io) => {
                io_kind.get_or_insert(io.kind());
                cause = io
                    .get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static));
            }
            None => cause = c.source(),
        }
    }
    match io_kind {
        Some(std::io::ErrorKind::TimedOut) => return "timed out".into(),
        Some(kind) => return format!("connection failed: {kind}"),
        None => {}
    }
    if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
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
    let Some(path) = ca_file else {
        return Ok(Arc::new(client_tls(native_roots())));
    };
    let mut store = rustls::RootCertStore::empty();
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
    Ok(Arc::new(client_tls(Arc::new(store))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};

    /// Reads one HTTP/1.1 request (headers and a content-length body);
    /// false at the end of the stream.
    fn read_request(r: &mut BufReader<TcpStream>) -> bool {
        let mut len = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).expect("read") == 0 {
                return false;
            }
            if first {
                assert!(line.starts_with("POST /hook HTTP/1.1"), "{line}");
                first = false;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("content-length");
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).expect("body");
        assert_eq!(body, b"{}");
        true
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn answers_map_to_attempts_on_one_kept_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(conn.try_clone().expect("clone"));
            let mut w = conn;
            for answer in [
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                "HTTP/1.1 503 Busy\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n",
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                "HTTP/1.1 204 No Content\r\n\r\n",
            ] {
                assert!(read_request(&mut r), "the client closed its connection");
                w.write_all(answer.as_bytes()).expect("answer");
            }
            // Every request came on the one connection: nothing else waits.
            listener.set_nonblocking(true).expect("nonblocking");
            assert!(listener.accept().is_err(), "a second connection was opened");
        });
        let http = HttpSender::new(Duration::from_secs(5));
        let rt = runtime();
        let post = |h: &HttpSender| rt.block_on(h.post(&url, &[("webhook-id", "1".into())], b"{}"));
        assert_eq!(post(&http), Attempt::Delivered { status: 200 });
        assert_eq!(
            post(&http),
            Attempt::Retry {
                why: "HTTP 503".into(),
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            post(&http),
            Attempt::Fail {
                why: "HTTP 404".into()
            }
        );
        assert_eq!(post(&http), Attempt::Delivered { status: 204 });
        server.join().expect("server");
        // Too large a body is refused before anything is sent.
        let big = vec![b' '; PAYLOAD_LEN_MAX + 1];
        assert!(matches!(
            rt.block_on(http.post(&url, &[], &big)),
            Attempt::Fail { why } if why.contains("over the limit")
        ));
    }

    #[test]
    fn a_stalled_receiver_times_out_and_a_closed_port_is_retried() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        // Accepts, reads, never answers.
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(conn);
            read_request(&mut r);
            std::thread::sleep(Duration::from_secs(2));
        });
        let rt = runtime();
        let http = HttpSender::new(Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let got = rt.block_on(http.post(&url, &[], b"{}"));
        assert_eq!(
            got,
            Attempt::Retry {
                why: "timed out".into(),
                after: None
            }
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        server.join().expect("server");
        // The listener is gone: the port refuses.
        let got = rt.block_on(http.post(&url, &[], b"{}"));
        assert!(
            matches!(&got, Attempt::Retry { why, after: None } if why.starts_with("connection failed")),
            "{got:?}"
        );
        assert!(
            !format!("{got:?}").contains("127.0.0.1"),
            "the URL leaked: {got:?}"
        );
    }

    #[test]
    fn https_to_a_receiver_with_an_untrusted_certificate_fails_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(ok.success(), "openssl req failed");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut server = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.path().join("cert.pem"))
            .arg("-key")
            .arg(dir.path().join("key.pem"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let t0 = std::time::Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "s_server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let http = HttpSender::new(Duration::from_secs(5));
        let got =
            runtime().block_on(http.post(&format!("https://127.0.0.1:{port}/hook"), &[], b"{}"));
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(
            got,
            Attempt::Retry {
                why: "TLS failed".into(),
                after: None
            }
        );
    }

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
