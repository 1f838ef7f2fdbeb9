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

pub mod browser;
mod certs;
mod flood;
pub mod oidc;
mod pgbouncer;
pub mod receiver;
pub mod sshd;

pub use certs::make_test_ca;
pub use flood::{fd_limit, open_idle};
pub use oidc::{GithubActionsIssuer, OidcOptions, OidcProvider};
pub use pgbouncer::{PgBouncer, pgbouncer_bin};
pub use sshd::Sshd;
use std::time::{Duration, Instant};

/// Process helpers (signals, children, polling) the tests share.
pub use breakglass_localpg::os;
pub use breakglass_localpg::{
    AuthMethod, PgCluster, client_command, free_port, pg_bin_dir, psql_at,
};

/// The cluster the tests of one test binary share while any of them runs.
///
/// Each caller holds an `Arc`; the cluster stops (by pid) and its files go
/// when the last holder drops it, so a test binary never leaves a server
/// behind, and tests that run at the same time share one server. Each test
/// takes its own database from it with [`fresh_database`].
pub fn shared_cluster() -> anyhow::Result<std::sync::Arc<PgCluster>> {
    use std::sync::{Arc, Mutex, Weak};
    static SHARED: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());
    let mut slot = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(pg) = slot.upgrade() {
        return Ok(pg);
    }
    let pg = Arc::new(PgCluster::start()?);
    *slot = Arc::downgrade(&pg);
    Ok(pg)
}

/// Creates an empty database with a name no other test uses and returns its
/// superuser URL (password included).
pub fn fresh_database(pg: &PgCluster) -> anyhow::Result<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    pg.psql("postgres", &format!("CREATE DATABASE {name}"))?;
    Ok(pg.superuser_url(&name))
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
