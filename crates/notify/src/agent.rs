//! The HTTP agent every outbound call of breakglass uses (deliveries, the
//! drills' API calls, the CLI, key fetches).
//!
//! ureq's default resolver spawns a thread for every call that has a
//! timeout, even when the host is an IP address: a thread created and
//! joined per request. At the drill load generator's 2,000 calls per
//! second that was a few thousand thread starts per second. [`agent`]
//! answers IP-literal hosts itself and leaves names to ureq's resolver.

use std::net::{IpAddr, SocketAddr};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// An agent with `config` whose resolver answers IP-literal hosts without
/// a lookup (and without a thread).
pub fn agent(config: Config) -> ureq::Agent {
    ureq::Agent::with_parts(config, DefaultConnector::default(), LiteralFirst::default())
}

/// IP-literal hosts (`127.0.0.1`, `[::1]`) answered at once; names go to
/// ureq's [`DefaultResolver`].
#[derive(Debug, Default)]
struct LiteralFirst {
    names: DefaultResolver,
}

impl Resolver for LiteralFirst {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        match literal(uri) {
            Some(addr) => {
                let mut out = self.empty();
                out.push(addr);
                Ok(out)
            }
            None => self.names.resolve(uri, config, timeout),
        }
    }
}

/// The socket address of a URI whose host is an IP address, with the
/// scheme's default port when it names none.
fn literal(uri: &Uri) -> Option<SocketAddr> {
    let authority = uri.authority()?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = host.parse().ok()?;
    let port = match authority.port_u16() {
        Some(p) => p,
        None => match uri.scheme_str()? {
            "http" => 80,
            "https" => 443,
            _ => return None,
        },
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Option<SocketAddr> {
        literal(&s.parse::<Uri>().expect("uri"))
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("socket address"))
    }

    #[test]
    fn ip_literals_are_answered_and_names_are_not() {
        assert_eq!(
            lit("http://127.0.0.1:8080/v1/requests"),
            addr("127.0.0.1:8080")
        );
        assert_eq!(lit("https://[::1]/x"), addr("[::1]:443"));
        assert_eq!(lit("http://10.1.2.3/"), addr("10.1.2.3:80"));
        assert_eq!(lit("http://localhost:8080/"), None);
        assert_eq!(lit("https://hooks.example.com/x"), None);
        // Not an address, whatever it looks like.
        assert_eq!(lit("http://127.1:80/"), None);
        assert_eq!(lit("http://[::1%25lo]:80/"), None);
    }

    #[test]
    fn an_agent_reaches_a_loopback_listener_by_address_and_by_name() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            for _ in 0..2 {
                let (mut s, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).expect("read");
                    assert!(n > 0, "the client closed before its request ended");
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .expect("write");
            }
        });
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build();
        let a = agent(config);
        for host in ["127.0.0.1", "localhost"] {
            let mut resp = a
                .get(&format!("http://{host}:{port}/"))
                .call()
                .unwrap_or_else(|e| panic!("GET via {host}: {e}"));
            assert_eq!(resp.body_mut().read_to_string().expect("body"), "ok");
        }
        server.join().expect("server");
    }
}
