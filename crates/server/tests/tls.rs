//! The API over TLS (`server.tls_cert`, `server.tls_key`): real https
//! requests against a certificate from a test CA made with openssl, and
//! the refusals around it.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, token};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

fn client_config(ca: Option<&Path>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for c in CertificateDer::pem_file_iter(ca).expect("read the CA") {
            roots.add(c.expect("CA certificate")).expect("add the CA");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One https request; the status and JSON body, or the TLS error.
fn https(
    addr: SocketAddr,
    ca: Option<&Path>,
    name: &str,
    method: &str,
    path: &str,
    who: &str,
    body: &str,
) -> Result<(u16, Value), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {name}\r\nAuthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        token(who),
        body.len()
    );
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(client_config(ca));
        let server = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(server, tcp))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw)).await;
        if raw.is_empty() {
            return Err(format!("no answer: {read:?}"));
        }
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not HTTP: {text}"))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        Ok((
            status,
            serde_json::from_str(body).unwrap_or(Value::String(body.into())),
        ))
    })
}

#[test]
fn the_api_serves_https_with_its_certificate_and_nothing_in_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    breakglass_testkit::make_test_ca(dir.path(), "DNS:localhost,IP:127.0.0.1");
    let ca = dir.path().join("ca.pem");
    let s = TestServer::start_with(dir, "tls_cert = \"srv.pem\"\ntls_key = \"srv.key\"");
    let addr: SocketAddr = s
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("address");

    for name in ["localhost", "127.0.0.1"] {
        let (st, me) = https(addr, Some(&ca), name, "GET", "/v1/whoami", "alice", "")
            .unwrap_or_else(|e| panic!("https to {name}: {e}"));
        assert_eq!((st, me["name"].as_str()), (200, Some("alice")), "{me}");
    }
    let (st, r) = https(
        addr,
        Some(&ca),
        "localhost",
        "POST",
        "/v1/requests",
        "alice",
        r#"{"target":"prod-db","role":"read","duration":"15m","reason":"tls check"}"#,
    )
    .expect("https POST");
    assert_eq!((st, r["state"].as_str()), (201, Some("pending")), "{r}");

    // A client that does not trust the CA refuses the server.
    let e = https(addr, None, "localhost", "GET", "/v1/whoami", "alice", "")
        .expect_err("untrusted certificate");
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // Plain http gets no answer in clear, and no token crosses in clear.
    let mut plain = std::net::TcpStream::connect(addr).expect("connect");
    use std::io::{Read, Write};
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("ok"),
        "plain http was answered: {answer:?}"
    );
    s.stop();
}

#[test]
fn a_bad_certificate_stops_the_start_naming_the_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("srv.pem"), "not a certificate\n").expect("write");
    std::fs::write(dir.path().join("srv.key"), "not a key\n").expect("write");
    let listen = "127.0.0.1:0".parse().expect("addr");
    let path = common::write_setup(
        dir.path(),
        listen,
        "tls_cert = \"srv.pem\"\ntls_key = \"srv.key\"",
    );
    let config = breakglass_server::config::Config::load(&path).expect("config parses");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let e = rt
        .block_on(async {
            let l = tokio::net::TcpListener::bind(listen).await.expect("bind");
            breakglass_server::start(config, l).await.map(|_| ())
        })
        .expect_err("a bad certificate is refused");
    let e = format!("{e:#}");
    assert!(e.contains("server.tls_cert"), "{e}");
    assert!(e.contains("srv.pem"), "{e}");
}
