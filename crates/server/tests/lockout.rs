//! Nobody can lock everyone out of the API: floods of idle sockets against
//! the real listener over loopback, bounded in count and time. Attack
//! sockets come from other loopback addresses (127.0.1.x) so that the
//! per-source cap, which loopback is not exempt from, is tested apart from
//! the slot reserve and the eviction of the oldest unauthenticated
//! connection.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use breakglass_testkit::{fd_limit, open_idle};
use common::{TestServer, token};

/// The attack: this many idle sockets at most.
const FLOOD_SOCKETS_MAX: usize = 1000;
/// Attack sockets per source address (under the default per-source cap).
const FLOOD_PER_SOURCE: usize = 100;
/// A real user must get an answer within this, flood or not.
const USER_ANSWER_WITHIN: Duration = Duration::from_secs(3);

fn addr_of(s: &TestServer) -> SocketAddr {
    s.url
        .trim_start_matches("http://")
        .parse()
        .expect("server address")
}

/// How many attack sockets fit: the server runs in this process, so each
/// costs two descriptors; a margin stays for the store and the test.
fn flood_size() -> usize {
    let n = (fd_limit().saturating_sub(400) / 2).min(FLOOD_SOCKETS_MAX);
    assert!(
        n >= 200,
        "ulimit -n is {}: too low to hold a flood; raise it",
        fd_limit()
    );
    n
}

/// Sockets the server has closed (EOF or reset), without waiting.
fn closed_count(socks: &[TcpStream]) -> usize {
    socks
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).expect("nonblocking");
            let mut b = [0u8; 512];
            let closed = match s.peek(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            s.set_nonblocking(false).expect("blocking");
            closed
        })
        .count()
}

/// One request on an open keep-alive connection; the status, or `None`
/// when the server closed it.
fn request_on(s: &mut TcpStream, path: &str, who: Option<&str>) -> Option<u16> {
    let auth = who.map_or(String::new(), |w| {
        format!("Authorization: Bearer {}\r\n", token(w))
    });
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: api\r\n{auth}\r\n").as_bytes())
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// A real user's call on a new connection from 127.0.0.1, and how long
/// it took.
fn user_call(s: &TestServer) -> (u16, Duration) {
    let t = Instant::now();
    let (st, _) = s.call("alice", "GET", "/v1/whoami", None);
    (st, t.elapsed())
}

#[test]
fn a_flood_of_idle_sockets_does_not_lock_out_a_real_user() {
    let s = TestServer::start_with(
        tempfile::tempdir().expect("tempdir"),
        "unauthenticated_timeout = \"30s\"",
    );
    let to = addr_of(&s);
    // A signed-in keep-alive connection from before the attack.
    let mut signed_in = TcpStream::connect(to).expect("connect");
    assert_eq!(
        request_on(&mut signed_in, "/v1/whoami", Some("bob")),
        Some(200)
    );

    let n = flood_size();
    let started = Instant::now();
    let mut flood = open_idle(to, n, FLOOD_PER_SOURCE, 1, 1);
    // Eviction takes the oldest sockets, the ones the attacker drops first:
    // count those the server closed before they are dropped.
    let mut closed = 0;
    // The flood outnumbers the slots unauthenticated connections may hold
    // (1024 - 64 reserved): without eviction the next client gets nothing.
    for round in 0..5 {
        let (st, took) = user_call(&s);
        assert_eq!(st, 200, "round {round}: a real user was locked out");
        assert!(
            took < USER_ANSWER_WITHIN,
            "round {round}: the user waited {took:?}"
        );
        // The attacker reopens a tenth of its sockets between calls.
        let fresh = open_idle(to, n / 10, FLOOD_PER_SOURCE, 1, 20 + round as u8);
        closed += closed_count(&flood[..n / 10]);
        flood.drain(..n / 10);
        flood.extend(fresh);
    }
    // The signed-in connection was never taken to make room.
    assert_eq!(
        request_on(&mut signed_in, "/v1/whoami", Some("bob")),
        Some(200),
        "a signed-in connection was evicted"
    );
    closed += closed_count(&flood);
    assert!(
        n < 960 || closed > 0,
        "with {n} idle sockets some must have been closed to make room"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the flood test ran too long"
    );
    drop(flood);
    s.stop();
}

#[test]
fn the_per_source_cap_names_its_key_and_spares_other_sources() {
    let s = TestServer::start_with(
        tempfile::tempdir().expect("tempdir"),
        "max_connections_per_source = 8",
    );
    let to = addr_of(&s);
    let held = open_idle(to, 8, 8, 1, 200);
    // Give the server time to accept them all.
    std::thread::sleep(Duration::from_millis(200));
    let over = open_idle(to, 1, 8, 1, 200).pop().expect("socket");
    let mut over = over;
    over.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = over.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("server.max_connections_per_source"),
        "{answer}"
    );
    // Another source is not affected.
    let (st, took) = user_call(&s);
    assert_eq!(st, 200);
    assert!(took < USER_ANSWER_WITHIN, "{took:?}");
    drop(held);
    s.stop();
}

#[test]
fn unauthenticated_connections_have_a_short_deadline_signed_in_ones_do_not() {
    let s = TestServer::start_with(
        tempfile::tempdir().expect("tempdir"),
        "unauthenticated_timeout = \"1s\"\nidle_timeout = \"30s\"",
    );
    let to = addr_of(&s);
    let mut silent = TcpStream::connect(to).expect("connect");
    let mut anonymous = TcpStream::connect(to).expect("connect");
    assert_eq!(request_on(&mut anonymous, "/healthz", None), Some(200));
    let mut wrong = TcpStream::connect(to).expect("connect");
    assert_eq!(
        request_on(&mut wrong, "/v1/whoami", Some("nobody")),
        Some(401)
    );
    let mut user = TcpStream::connect(to).expect("connect");
    assert_eq!(
        request_on(&mut user, "/v1/whoami", Some("alice")),
        Some(200)
    );
    let t = Instant::now();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let n = silent.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "a silent connection is closed");
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "closed after {waited:?}, not at unauthenticated_timeout"
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        closed_count(&[anonymous.try_clone().expect("clone"), wrong]),
        2,
        "connections without a valid token are closed at the deadline"
    );
    // Past the unauthenticated deadline, well within idle_timeout.
    assert_eq!(
        request_on(&mut user, "/v1/whoami", None),
        Some(401),
        "a signed-in connection stays open (each request still needs its token)"
    );
    assert_eq!(
        request_on(&mut user, "/v1/whoami", Some("alice")),
        Some(200)
    );
    drop(anonymous);
    s.stop();
}

#[test]
fn the_reserve_is_for_signed_in_connections() {
    // 8 slots, 4 for unauthenticated connections at most.
    let s = TestServer::start_with(
        tempfile::tempdir().expect("tempdir"),
        "max_connections = 8\nreserved_connections = 4",
    );
    let to = addr_of(&s);
    let mut users: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut c = TcpStream::connect(to).expect("connect");
            assert_eq!(request_on(&mut c, "/v1/whoami", Some("alice")), Some(200));
            c
        })
        .collect();
    // Idle sockets take the last two slots, then push each other out.
    let flood = open_idle(to, 40, 40, 1, 100);
    std::thread::sleep(Duration::from_millis(300));
    assert!(closed_count(&flood) >= 38, "only two unauthenticated slots");
    for u in &mut users {
        assert_eq!(request_on(u, "/v1/whoami", Some("alice")), Some(200));
    }
    // A newcomer still gets in (it takes an idle socket's slot)...
    let (st, _) = user_call(&s);
    assert_eq!(st, 200);
    // (its connection is closed; let the server see it go)
    std::thread::sleep(Duration::from_millis(300));
    // ...until every slot is signed in.
    for _ in 0..2 {
        let mut c = TcpStream::connect(to).expect("connect");
        assert_eq!(request_on(&mut c, "/v1/whoami", Some("alice")), Some(200));
        users.push(c);
    }
    let (st, body) = common::call_raw(&s.url, Some(&token("alice")), "GET", "/v1/whoami", None);
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["code"], "too_many_connections", "{body}");
    drop(users);
    drop(flood);
    s.stop();
}
