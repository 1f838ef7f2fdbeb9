//! Test support: throwaway real PostgreSQL servers, pgbouncer instances and
//! identity providers for tests and benchmarks, so nothing in the workspace
//! needs a mock.
//!
//! The PostgreSQL clusters come from `breakglass-localpg` (shared with
//! `breakglass serve --dev`); this crate adds pgbouncer and polling helpers.
//! Each [`PgCluster`] and [`PgBouncer`] lives in its own temporary directory
//! under `/tmp`, listens on `127.0.0.1` only, and is stopped by its pid when
//! dropped; the directory is removed after the process is gone.
//!
//! The binaries come from the system packages; `cargo xtask test` installs
//! them when they are missing (`apt-get install postgresql
//! postgresql-contrib pgbouncer`). The identity providers ([`oidc`]) are
//! Node.js scripts; `cargo xtask test` installs their node modules.
//!
//! This crate returns [`anyhow`] errors: it is only used from tests and
//! benchmarks, where a readable chain of context is all a caller needs.

mod certs;
mod flood;
pub mod oidc;
mod pgbouncer;

pub use certs::make_test_ca;
pub use flood::{fd_limit, open_idle};
pub use oidc::{GithubActionsIssuer, OidcOptions, OidcProvider};
pub use pgbouncer::{PgBouncer, pgbouncer_bin};
use std::time::{Duration, Instant};

pub use breakglass_localpg::{
    AuthMethod, PgCluster, client_command, free_port, pg_bin_dir, psql_at,
};

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
