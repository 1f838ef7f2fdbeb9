//! The gateway's leg to the real database: connect, send the start-up
//! message as the role's configured user, and authenticate with trust,
//! cleartext, md5 or SCRAM-SHA-256. The operator never sees the password.

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::codec::{self, cstr, decode_frame, parse_error_fields, put_cstr, put_frame};

/// Frames during upstream authentication are small.
const AUTH_FRAME_LEN_MAX: usize = 64 * 1024;

/// Where and as whom the gateway connects for a role.
#[derive(Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
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
}

/// Parses `postgres://host[:port]/database[?sslmode=disable]`.
pub fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("upstream {url:?} must start with postgres://"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    if let Some(q) = query {
        for kv in q.split('&') {
            match kv {
                "sslmode=disable" | "sslmode=prefer" | "" => {}
                other => {
                    return Err(format!(
                        "upstream {url:?}: {other} is not supported; the gateway connects to the upstream without TLS (keep the upstream on a trusted network)"
                    ));
                }
            }
        }
    }
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
    Ok((host, port, db.to_string()))
}

async fn read_frame(
    stream: &mut TcpStream,
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
) -> Result<(TcpStream, BytesMut), UpstreamError> {
    let mut stream = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(UpstreamError::Connect)?;
    stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
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
    let mut s = TcpStream::connect((host, port)).await?;
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
        assert_eq!(
            parse_url("postgres://127.0.0.1:5433/app"),
            Ok(("127.0.0.1".into(), 5433, "app".into()))
        );
        assert_eq!(
            parse_url("postgresql://db/app"),
            Ok(("db".into(), 5432, "app".into()))
        );
        assert!(parse_url("postgres://u:p@db/app").is_err());
        assert!(parse_url("postgres://db").is_err());
        assert!(parse_url("mysql://db/app").is_err());
        assert!(parse_url("postgres://db:x/app").is_err());
        assert!(parse_url("postgres://db/app?sslmode=verify-full").is_err());
    }
}
