//! Throwaway local PostgreSQL clusters: `initdb` with SCRAM into a fresh
//! directory, started on a free `127.0.0.1` port, stopped by pid and removed
//! when dropped. `breakglass serve --dev` runs its demo database with this
//! crate; the tests and benchmarks use it through `breakglass-testkit`.
//!
//! PostgreSQL refuses to run as root. When the caller is root, every server
//! process runs as the `postgres` OS user (created by the Debian
//! `postgresql` package) and the cluster's directory is handed to that user.
//! Clients (`psql`, `pgbench`) run as the current user.
//!
//! The binaries come from the system packages (`/usr/lib/postgresql/*/bin`);
//! [`pg_bin_dir`] says how to install them when they are missing.
//!
//! This crate returns [`anyhow`] errors: its callers (a demo mode, tests,
//! benchmarks) only need a readable chain of context.

pub mod os;
mod postgres;

pub use postgres::{
    AuthMethod, PgCluster, check_name, client_command, pg_bin_dir, psql_at, quote_ident,
    quote_literal,
};

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
/// cannot run these servers.
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
