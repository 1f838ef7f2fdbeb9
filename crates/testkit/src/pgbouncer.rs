//! A throwaway pgbouncer in session-pooling mode in front of a [`PgCluster`],
//! run in the foreground as a child process and stopped by pid on drop.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use breakglass_localpg::os::{self, RunAs};
use breakglass_localpg::{PgCluster, check_name, free_port};

/// Where Debian installs pgbouncer.
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// Client connections pgbouncer accepts; more than any benchmark opens.
const CLIENTS_MAX: u32 = 200;

/// Server connections per (database, user) pool; enough for `pgbench -c 8`
/// in session mode with room to spare, and below the cluster's 200.
const POOL_SIZE: u32 = 50;

/// How long pgbouncer may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times start picks a new port when the chosen one was taken.
const PORT_ATTEMPTS_MAX: u32 = 3;

/// The pgbouncer binary: `/usr/sbin/pgbouncer`, else `pgbouncer` in `$PATH`.
pub fn pgbouncer_bin() -> anyhow::Result<PathBuf> {
    let debian = PathBuf::from(PGBOUNCER);
    if debian.is_file() {
        return Ok(debian);
    }
    os::which("pgbouncer").context(
        "pgbouncer not found (not at /usr/sbin/pgbouncer nor in PATH); run `cargo xtask test`, \
         which installs it, or `apt-get install -y pgbouncer`",
    )
}

/// A running pgbouncer on `127.0.0.1:port`, session pooling to one cluster.
///
/// Dropping it sends `SIGTERM` to its pid, then `SIGKILL` if it has not
/// exited within a few seconds, and removes its directory.
#[derive(Debug)]
pub struct PgBouncer {
    /// The TCP port on `127.0.0.1` clients connect to.
    pub port: u16,
    child: Option<Child>,
    // INVARIANT: declared last so it is removed only after `Drop::drop` has
    // stopped the process that uses it.
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts pgbouncer in front of `cluster`, serving database `db` (and,
    /// through a `*` fallback, any other database of the cluster).
    ///
    /// Clients authenticate with SCRAM-SHA-256 against an `auth_file` that
    /// holds `user`'s plain `password`; pgbouncer uses the same password to
    /// log in to the cluster with whatever method the cluster asks for
    /// (SCRAM or MD5), so `user` must have been created with that password.
    /// Returns once pgbouncer accepts TCP connections.
    pub fn start(
        cluster: &PgCluster,
        db: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<PgBouncer> {
        check_name(db)?;
        check_name(user)?;
        let bin = pgbouncer_bin()?;
        let run_as = RunAs::detect()?;
        let dir = run_as.temp_dir("breakglass-bouncer-")?;
        let auth_file = dir.path().join("userlist.txt");
        run_as.write(
            &auth_file,
            &format!("{} {}\n", quote(user), quote(password)),
        )?;
        let mut bouncer = PgBouncer {
            port: 0,
            child: None,
            dir,
        };
        let log_file = bouncer.dir.path().join("pgbouncer.log");
        let ini = bouncer.dir.path().join("pgbouncer.ini");
        for attempt in 1..=PORT_ATTEMPTS_MAX {
            bouncer.port = free_port();
            let config = format!(
                "[databases]\n\
                 {db} = host={host} port={pg_port} dbname={db}\n\
                 * = host={host} port={pg_port}\n\
                 \n\
                 [pgbouncer]\n\
                 listen_addr = {host}\n\
                 listen_port = {port}\n\
                 unix_socket_dir = {dir}\n\
                 auth_type = scram-sha-256\n\
                 auth_file = {auth_file}\n\
                 pool_mode = session\n\
                 max_client_conn = {CLIENTS_MAX}\n\
                 default_pool_size = {POOL_SIZE}\n\
                 logfile = {log}\n\
                 ignore_startup_parameters = extra_float_digits\n",
                host = cluster.host(),
                pg_port = cluster.port,
                port = bouncer.port,
                dir = bouncer.dir.path().display(),
                auth_file = auth_file.display(),
                log = log_file.display(),
            );
            run_as.write(&ini, &config)?;
            let mut cmd = run_as.command(&bin);
            cmd.arg(&ini)
                .current_dir(bouncer.dir.path())
                .stdin(Stdio::null())
                // pgbouncer also logs to stderr; the log file has it all.
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot run `{}`", os::describe(&cmd)))?;
            bouncer.child = Some(child);
            match bouncer.wait_ready() {
                Ok(()) => return Ok(bouncer),
                Err(e)
                    if attempt < PORT_ATTEMPTS_MAX
                        && os::port_was_taken(&os::log_tail(&log_file, 20)) =>
                {
                    eprintln!(
                        "breakglass-testkit: port {} taken, retrying: {e:#}",
                        bouncer.port
                    );
                    bouncer.stop();
                }
                Err(e) => return Err(e),
            }
        }
        bail!("pgbouncer did not start after {PORT_ATTEMPTS_MAX} attempts")
    }

    /// The host clients connect to: `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// Waits until pgbouncer accepts TCP connections or has exited.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut exited = None;
        let ready = os::wait_until(START_TIMEOUT, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
                return true;
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        let log = os::log_tail(&self.dir.path().join("pgbouncer.log"), 20);
        if let Some(status) = exited {
            bail!(
                "pgbouncer exited with {status} on port {}; log:\n{log}",
                self.port
            );
        }
        if !ready {
            bail!(
                "pgbouncer not accepting connections on port {} within {START_TIMEOUT:?}; log:\n{log}",
                self.port
            );
        }
        Ok(())
    }

    /// Stops the process: `SIGTERM`, then `SIGKILL` after a grace period,
    /// and reaps it.
    fn stop(&mut self) {
        os::stop_child(self.child.take(), Duration::from_secs(3));
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `"text"` for pgbouncer's auth_file, which doubles embedded quotes.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}
