//! Test support: throwaway real PostgreSQL servers and pgbouncer instances
//! for tests and benchmarks, so nothing in the workspace needs a mock.
//!
//! Each [`PgCluster`] and [`PgBouncer`] lives in its own temporary directory
//! under `/tmp`, listens on `127.0.0.1` only, and is stopped by its pid when
//! dropped; the directory is removed after the process is gone.
//!
//! PostgreSQL and pgbouncer refuse to run as root. When the tests run as
//! root, every server process runs as the `postgres` OS user (created by the
//! Debian `postgresql` package) and the temporary directories are handed to
//! that user. Clients (`psql`, `pgbench`) run as the current user.
//!
//! The binaries come from the system packages; `cargo xtask test` installs
//! them when they are missing (`apt-get install postgresql
//! postgresql-contrib pgbouncer`).
//!
//! This crate returns [`anyhow`] errors: it is only used from tests and
//! benchmarks, where a readable chain of context is all a caller needs.

mod os;
mod pgbouncer;
mod postgres;

pub use pgbouncer::{PgBouncer, pgbouncer_bin};
use std::time::{Duration, Instant};

pub use postgres::{AuthMethod, PgCluster, client_command, pg_bin_dir, psql_at};

/// Returns a TCP port on `127.0.0.1` that is free right now.
///
/// Ports come from below the kernel's ephemeral range (32768 and up by
/// default), so neither an outgoing connection nor another `bind(0)` can
/// take the port between this call and the caller's own bind. Each port is
/// handed out once per process, from a start that differs per process, and
/// is checked by binding it. Another process choosing the same port at the
/// same moment is still possible; the servers started here retry with a
/// new port when that happens.
///
/// # Panics
///
/// Panics if no port in the range can be bound, which means the machine
/// cannot run these tests.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 16_384;
    const COUNT: u32 = 16_384;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {FIRST}..{}", FIRST + COUNT)
}

/// Polls `f` every 20 ms until it returns `Some`, at most `limit`.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
