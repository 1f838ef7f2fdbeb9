//! Nobody can lock everyone out of the PostgreSQL gateway: floods of idle
//! sockets against the real `breakglass serve` and a real PostgreSQL over
//! loopback, bounded in count and time, while a real `psql` and a raw
//! start-up still get in. Attack sockets come from other loopback
//! addresses (127.0.2.x): the per-source cap, which loopback is not exempt
//! from, is tested on its own.

mod gateway_support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use breakglass_testkit::{fd_limit, open_idle};
use gateway_support::{Bg, GwOptions, Raw, first_error, psql, startup_packet, upstream};

/// The attack: this many idle sockets at most.
const FLOOD_SOCKETS_MAX: usize = 1000;
/// Attack sockets per source address (under the default per-source cap).
const FLOOD_PER_SOURCE: usize = 100;
/// A real user must be in within this, flood or not.
const USER_IN_WITHIN: Duration = Duration::from_secs(5);

/// How many attack sockets fit in this process (the gateway is another
/// process with its own limit, which `breakglass serve` inherits).
fn flood_size() -> usize {
    let n = fd_limit().saturating_sub(300).min(FLOOD_SOCKETS_MAX);
    assert!(
        n >= 200,
        "ulimit -n is {}: too low to hold a flood; raise it",
        fd_limit()
    );
    n
}

/// The gateway's listening address.
fn gw(bg: &Bg) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], bg.gw_port))
}

/// What the gateway said before closing `s`, waiting at most `limit`.
fn last_words(s: &mut TcpStream, limit: Duration) -> Option<(String, String)> {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    first_error(&bytes)
}

#[test]
fn a_flood_of_idle_sockets_does_not_lock_out_psql() {
    let up = upstream();
    // Defaults: 1000 slots, 62 of them reserved, 128 per source; a start-up
    // deadline long enough that only eviction can make room in time.
    let bg = Bg::start(
        &up,
        GwOptions {
            startup_timeout: "30s",
            ..GwOptions::default()
        },
    );
    let g = bg.grant("alice", "pg", "rw", "10m");
    // A session from before the attack.
    let mut before = Raw::connect(bg.gw_port);
    before
        .login("alice", "pg", &g.token)
        .unwrap_or_else(|m| panic!("login before the flood: {:?}", m.error()));

    let n = flood_size();
    let started = Instant::now();
    let mut flood = open_idle(gw(&bg), n, FLOOD_PER_SOURCE, 2, 1);
    // Over the 938 slots start-up may hold, the oldest idle sockets were
    // closed to make room, and told why.
    if n > 938 {
        let told = flood
            .iter_mut()
            .take(3)
            .filter_map(|s| last_words(s, Duration::from_secs(2)))
            .collect::<Vec<_>>();
        assert!(
            told.iter()
                .any(|(code, msg)| code == "53300" && msg.contains("waited longest")),
            "{told:?}"
        );
    }
    for round in 0..3u8 {
        let t = Instant::now();
        let out = psql(
            bg.gw_port,
            "alice",
            &g.token,
            "pg",
            &["-c", "select 'through'"],
        );
        assert_eq!(out.code, 0, "round {round}: psql locked out: {out:#?}");
        assert!(out.stdout.contains("through"), "{out:#?}");
        assert!(
            t.elapsed() < USER_IN_WITHIN,
            "round {round}: psql took {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let mut raw = Raw::connect(bg.gw_port);
        raw.login("alice", "pg", &g.token)
            .unwrap_or_else(|m| panic!("round {round}: raw login refused: {:?}", m.error()));
        assert!(t.elapsed() < USER_IN_WITHIN);
        // The attacker reopens a tenth of its sockets.
        let fresh = open_idle(gw(&bg), n / 10, FLOOD_PER_SOURCE, 2, 20 + round);
        flood.drain(..n / 10);
        flood.extend(fresh);
    }
    // The session from before was not taken to make room.
    before.send(&gateway_support::frame(
        b'Q',
        &gateway_support::cstring("select 'still here'"),
    ));
    let answer = before.read_msg().expect("an answer");
    assert_ne!(answer.tag, b'E', "{:?}", answer.error());
    assert!(started.elapsed() < Duration::from_secs(90));
    drop(flood);
}

#[test]
fn the_per_source_cap_and_the_start_up_deadline_cover_the_whole_pre_auth_phase() {
    let up = upstream();
    let bg = Bg::start(
        &up,
        GwOptions {
            // Long enough to hold 128 idle sockets on a loaded machine.
            startup_timeout: "4s",
            tls: true,
            ..GwOptions::default()
        },
    );
    // 128 from one address (the default cap), the next one refused.
    let held = open_idle(gw(&bg), 128, 128, 2, 250);
    let mut over = open_idle(gw(&bg), 1, 128, 2, 250).pop().expect("socket");
    let (code, msg) = last_words(&mut over, Duration::from_secs(5)).expect("a refusal");
    assert_eq!(code, "53300");
    assert!(
        msg.contains("gateway.postgres.max_connections_per_source"),
        "{msg}"
    );
    drop(held);

    // A TLS handshake that stalls after SSLRequest is cut at the deadline.
    let mut stalled = Raw::connect(bg.gw_port);
    stalled.send(&[0, 0, 0, 8, 4, 210, 22, 47]);
    let t = Instant::now();
    let (bytes, closed) = stalled.read_to_close(Duration::from_secs(10));
    assert_eq!(bytes.first(), Some(&b'S'), "TLS offered");
    assert!(closed, "a stalled handshake is closed");
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());

    // A start-up packet and no password: cut at the deadline, saying why.
    let mut no_password = Raw::connect(bg.gw_port);
    no_password.send(&startup_packet(&[("user", "alice"), ("database", "pg")]));
    let (bytes, closed) = no_password.read_to_close(Duration::from_secs(10));
    assert!(closed);
    assert_eq!(
        first_error(&bytes).map(|(code, msg)| (code, msg.contains("not completed in time"))),
        Some(("08P01".to_string(), true)),
    );
}
