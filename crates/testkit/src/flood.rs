//! Floods of idle loopback connections for the lock-out tests: many
//! sockets from several source addresses of 127.0.0.0/8, held open and
//! silent, as an attacker without credentials would.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// This process's limit on open files (`ulimit -n`), 1,024 if unknown.
pub fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(1024)
}

/// `n` idle connections to `to`, from 127.0.`subnet`.(`first_source`..),
/// each source address holding `per_source` of them. Each connect must
/// succeed within 5 s. The sockets are blocking; read them with timeouts.
pub fn open_idle(
    to: SocketAddr,
    n: usize,
    per_source: usize,
    subnet: u8,
    first_source: u8,
) -> Vec<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let host = u8::try_from(usize::from(first_source) + i / per_source)
                .expect("the flood fits in one /24 of source addresses");
            let source = Ipv4Addr::new(127, 0, subnet, host);
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind(SocketAddr::new(IpAddr::V4(source), 0))
                .expect("bind a loopback source");
            let s = tokio::time::timeout(Duration::from_secs(5), sock.connect(to))
                .await
                .expect("connect in time")
                .expect("connect");
            let s = s.into_std().expect("std socket");
            s.set_nonblocking(false).expect("blocking");
            out.push(s);
        }
        out
    })
}
