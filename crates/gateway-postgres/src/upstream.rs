//! The gateway's leg to the real database: connect, send the start-up
//! message as the role's configured user, and authenticate with trust,
//! cleartext, md5 or SCRAM-SHA-256. The operator never sees the password.

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::Io;

use crate::codec::{self, cstr, decode_frame, parse_error_fields, put_cstr, put_frame};

/// Frames during upstream authentication are small.
const AUTH_FRAME_LEN_MAX: usize = 64 * 1024;

/// TLS to the upstream, as the URL's `sslmode` asks (libpq semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plaintext.
    Disable,
    /// TLS if the server offers it, without verifying the certificate.
    Prefer,
    /// TLS or fail, without verifying the certificate.
    Require,
    /// TLS or fail; the certificate must chain to `sslrootcert` and name
    /// the host.
    VerifyFull { root_cert: PathBuf },
}

/// A parsed upstream URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub tls: UpstreamTls,
}

/// Where and as whom the gateway connects for a role.
#[derive(Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    pub tls: UpstreamTls,
}

impl std::fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream database: {0}")]
    Connect(std::io::Error),
    #[error("the upstream database refused the gateway's login: {0}")]
    Auth(String),
    #[error("the upstream database asked for {0}, which the gateway does not support")]
    Unsupported(String),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("no password is configured for the upstream user")]
    NoPassword,
    #[error("upstream TLS failed: {0}")]
    Tls(String),
}

/// Parses `postgres://host[:port]/database[?sslmode=MODE[&sslrootcert=PATH]]`
/// with MODE one of disable, prefer, require, verify-full.
pub fn parse_url(url: &str) -> Result<UpstreamUrl, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("upstream {url:?} must start with postgres://"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let mut mode = "disable";
    let mut root: Option<PathBuf> = None;
    for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("sslmode", m)) => mode = m,
            Some(("sslrootcert", p)) => root = Some(PathBuf::from(p)),
            _ => {
                return Err(format!(
                    "upstream {url:?}: unsupported parameter {kv:?} (known: sslmode, sslrootcert)"
                ));
            }
        }
    }
    let tls = match (mode, root) {
        ("disable", _) => UpstreamTls::Disable,
        ("prefer", _) => UpstreamTls::Prefer,
        ("require", _) => UpstreamTls::Require,
        ("verify-full", Some(root_cert)) => UpstreamTls::VerifyFull { root_cert },
        ("verify-full", None) => {
            return Err(format!(
                "upstream {url:?}: sslmode=verify-full needs sslrootcert=PATH"
            ));
        }
        (other, _) => {
            return Err(format!(
                "upstream {url:?}: sslmode={other} is not supported (use disable, prefer, require or verify-full)"
            ));
        }
    };
    let (hostport, db) = rest
        .split_once('/')
        .ok_or_else(|| format!("upstream {url:?} must name a database: postgres://host:port/db"))?;
    if hostport.contains('@') {
        return Err(format!(
            "upstream {url:?} must not contain credentials: use the role's user and password_env"
        ));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("upstream {url:?}: invalid port {p:?}"))?,
        ),
        None => (hostport.to_string(), 5432),
    };
    if host.is_empty() || db.is_empty() {
        return Err(format!("upstream {url:?} needs a host and a database"));
    }
    Ok(UpstreamUrl {
        host,
        port,
        database: db.to_string(),
        tls,
    })
}

/// Accepts any certificate: `sslmode=require` encrypts without verifying,
/// exactly like libpq. Signatures are still checked, so the peer must hold
/// the key of the certificate it shows.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(tls: &UpstreamTls) -> Result<Arc<ClientConfig>, UpstreamError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    let config = match tls {
        UpstreamTls::VerifyFull { root_cert } => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(root_cert)
                .map_err(|e| UpstreamError::Tls(format!("{}: {e}", root_cert.display())))?;
            for c in certs {
                let c =
                    c.map_err(|e| UpstreamError::Tls(format!("{}: {e}", root_cert.display())))?;
                roots
                    .add(c)
                    .map_err(|e| UpstreamError::Tls(format!("{}: {e}", root_cert.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Opens the connection, negotiating TLS as the target asks.
async fn open(t: &UpstreamTarget) -> Result<Box<dyn Io>, UpstreamError> {
    let mut tcp = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(UpstreamError::Connect)?;
    tcp.set_nodelay(true).map_err(UpstreamError::Connect)?;
    if t.tls == UpstreamTls::Disable {
        return Ok(Box::new(tcp));
    }
    let mut req = Vec::with_capacity(8);
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&codec::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await.map_err(UpstreamError::Connect)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(UpstreamError::Connect)?;
    match (answer[0], &t.tls) {
        (b'S', _) => {
            let name = ServerName::try_from(t.host.clone())
                .map_err(|e| UpstreamError::Tls(format!("host {:?}: {e}", t.host)))?;
            let stream = TlsConnector::from(tls_config(&t.tls)?)
                .connect(name, tcp)
                .await
                .map_err(|e| UpstreamError::Tls(e.to_string()))?;
            Ok(Box::new(stream))
        }
        (b'N', UpstreamTls::Prefer) => Ok(Box::new(tcp)),
        (b'N', _) => Err(UpstreamError::Tls(
            "the upstream does not accept TLS but the target's sslmode requires it".into(),
        )),
        (other, _) => Err(UpstreamError::Protocol(format!(
            "unexpected answer {other:?} to SSLRequest"
        ))),
    }
}

async fn read_frame(
    stream: &mut Box<dyn Io>,
    buf: &mut BytesMut,
) -> Result<(u8, Vec<u8>), UpstreamError> {
    loop {
        if let Some(f) = decode_frame(buf, AUTH_FRAME_LEN_MAX)
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?
        {
            let payload = f.payload(buf).to_vec();
            let _ = buf.split_to(f.len);
            return Ok((f.tag, payload));
        }
        let n = stream.read_buf(buf).await.map_err(UpstreamError::Connect)?;
        if n == 0 {
            return Err(UpstreamError::Protocol(
                "connection closed during login".into(),
            ));
        }
    }
}

fn password_frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_frame(&mut out, b'p', data);
    out
}

/// Connects and logs in. Returns the stream and whatever the upstream sent
/// after `AuthenticationOk` (parameter statuses, key data, ready) that was
/// already read.
pub async fn connect(
    t: &UpstreamTarget,
    client_params: &[(String, String)],
) -> Result<(Box<dyn Io>, BytesMut), UpstreamError> {
    let mut stream = open(t).await?;
    let mut params: Vec<(&str, &str)> = vec![("user", &t.user), ("database", &t.database)];
    for (k, v) in client_params {
        if !matches!(k.as_str(), "user" | "database" | "replication" | "options") {
            params.push((k, v));
        }
    }
    stream
        .write_all(&codec::startup_message(&params))
        .await
        .map_err(UpstreamError::Connect)?;
    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, payload) = read_frame(&mut stream, &mut buf).await?;
        match tag {
            b'E' => {
                let fields = parse_error_fields(&payload);
                let msg = fields
                    .iter()
                    .find(|(c, _)| *c == b'M')
                    .map_or("unknown error".to_string(), |(_, m)| m.clone());
                return Err(UpstreamError::Auth(msg));
            }
            b'R' if payload.len() >= 4 => {
                let code = i32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let rest = &payload[4..];
                let password = || t.password.as_deref().ok_or(UpstreamError::NoPassword);
                match code {
                    0 => return Ok((stream, buf)),
                    3 => {
                        let mut p = Vec::new();
                        put_cstr(&mut p, password()?);
                        stream
                            .write_all(&password_frame(&p))
                            .await
                            .map_err(UpstreamError::Connect)?;
                    }
                    5 if rest.len() == 4 => {
                        let salt = [rest[0], rest[1], rest[2], rest[3]];
                        let hash = md5_hash(t.user.as_bytes(), password()?.as_bytes(), salt);
                        let mut p = Vec::new();
                        put_cstr(&mut p, &hash);
                        stream
                            .write_all(&password_frame(&p))
                            .await
                            .map_err(UpstreamError::Connect)?;
                    }
                    10 => {
                        let mut mechs = Vec::new();
                        let mut r = rest;
                        while let Some((m, after)) = cstr(r) {
                            if m.is_empty() {
                                break;
                            }
                            mechs.push(m.to_string());
                            r = after;
                        }
                        if !mechs.iter().any(|m| m == SCRAM_SHA_256) {
                            return Err(UpstreamError::Unsupported(format!(
                                "SASL mechanisms {mechs:?}"
                            )));
                        }
                        let s =
                            ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                        let mut p = Vec::new();
                        put_cstr(&mut p, SCRAM_SHA_256);
                        p.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
                        p.extend_from_slice(s.message());
                        stream
                            .write_all(&password_frame(&p))
                            .await
                            .map_err(UpstreamError::Connect)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL continue without start".into())
                        })?;
                        s.update(rest)
                            .map_err(|e| UpstreamError::Auth(e.to_string()))?;
                        let msg = password_frame(s.message());
                        stream
                            .write_all(&msg)
                            .await
                            .map_err(UpstreamError::Connect)?;
                    }
                    12 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL final without start".into())
                        })?;
                        s.finish(rest)
                            .map_err(|e| UpstreamError::Auth(e.to_string()))?;
                    }
                    other => {
                        return Err(UpstreamError::Unsupported(format!(
                            "authentication method {other}"
                        )));
                    }
                }
            }
            b'N' => {}
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during login",
                    other as char
                )));
            }
        }
    }
}

/// Sends a CancelRequest for `(pid, secret)` to the upstream.
pub async fn cancel(host: &str, port: u16, pid: i32, secret: i32) -> std::io::Result<()> {
    let connect = TcpStream::connect((host, port));
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(2), connect)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel: connect timed out")
        })??;
    s.write_all(&codec::cancel_request(pid, secret)).await?;
    // The server closes the connection once it has read the request.
    let mut b = [0u8; 1];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), s.read(&mut b)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("postgres://127.0.0.1:5433/app").expect("valid");
        assert_eq!(
            (u.host.as_str(), u.port, u.database.as_str(), u.tls),
            ("127.0.0.1", 5433, "app", UpstreamTls::Disable)
        );
        let u = parse_url("postgresql://db/app?sslmode=require").expect("valid");
        assert_eq!((u.port, u.tls), (5432, UpstreamTls::Require));
        let u = parse_url("postgres://db/app?sslmode=verify-full&sslrootcert=/etc/ca.pem")
            .expect("valid");
        assert_eq!(
            u.tls,
            UpstreamTls::VerifyFull {
                root_cert: "/etc/ca.pem".into()
            }
        );
        assert!(parse_url("postgres://db/app?sslmode=allow").is_err());
        assert!(parse_url("postgres://db/app?password=x").is_err());
        assert!(parse_url("postgres://u:p@db/app").is_err());
        assert!(parse_url("postgres://db").is_err());
        assert!(parse_url("mysql://db/app").is_err());
        assert!(parse_url("postgres://db:x/app").is_err());
        assert!(parse_url("postgres://db/app?sslmode=verify-full").is_err());
    }
}
