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
pub use postgres::{AuthMethod, PgCluster, client_command, pg_bin_dir, psql_at};

/// Returns a TCP port on `127.0.0.1` that was free a moment ago.
///
/// Binds port 0, reads the port the kernel picked and closes the socket.
/// Another process may take the port before the caller binds it; the
/// servers started here retry with a new port when that happens.
///
/// # Panics
///
/// Panics if the loopback interface cannot be bound at all, which means the
/// machine cannot run these tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}
