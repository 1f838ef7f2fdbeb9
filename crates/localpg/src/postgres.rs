//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory,
//! start on a free loopback port, manage roles, databases and `pg_hba.conf`,
//! run `psql`/`pgbench` against it, and stop it by pid on drop.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::os::{self, RunAs};

/// The only address the servers listen on and clients connect to.
const HOST: &str = "127.0.0.1";

/// The cluster superuser's name.
const SUPERUSER: &str = "postgres";

/// The client the tests use; Debian's wrapper picks the newest installed
/// version.
const PSQL: &str = "/usr/bin/psql";

/// Where Debian installs the PostgreSQL server versions.
const PG_LIB_DIR: &str = "/usr/lib/postgresql";

/// `max_connections` of every cluster: room for benchmarks with many clients
/// plus pgbouncer pools.
const CONNECTIONS_MAX: u32 = 200;

/// How long `pg_ctl start` may take before start fails.
const START_TIMEOUT_S: u32 = 30;

/// How many times start picks a new port when the chosen one was taken.
const PORT_ATTEMPTS_MAX: u32 = 3;

/// How long a configuration reload may take to be visible to new sessions.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest role or database name accepted (PostgreSQL's NAMEDATALEN - 1).
const NAME_LEN_MAX: usize = 63;

/// How a role authenticates over TCP: the method of its `pg_hba.conf` line,
/// and for passwords, how the password is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `scram-sha-256`, password stored as a SCRAM secret.
    Scram,
    /// `md5`, password stored as an MD5 hash (so the server really asks for
    /// MD5 rather than upgrading to SCRAM).
    Md5,
    /// `trust`: no password is asked for.
    Trust,
}

impl AuthMethod {
    /// The method keyword in `pg_hba.conf`.
    fn hba_method(self) -> &'static str {
        match self {
            AuthMethod::Scram => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Trust => "trust",
        }
    }

    /// The `password_encryption` used when storing the role's password.
    fn password_encryption(self) -> &'static str {
        match self {
            AuthMethod::Md5 => "md5",
            AuthMethod::Scram | AuthMethod::Trust => "scram-sha-256",
        }
    }
}

/// The newest installed PostgreSQL server's binary directory: the
/// `/usr/lib/postgresql/<version>/bin` with the highest version that holds
/// `initdb`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let newest = std::fs::read_dir(PG_LIB_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server found (no {PG_LIB_DIR}/*/bin/initdb); run `cargo xtask test`, \
             which installs it, or `apt-get install -y postgresql postgresql-contrib pgbouncer`"
        ),
    }
}

/// A command for a libpq client tool (`psql`, `pgbench`, ...) that connects
/// to `127.0.0.1:port` as `user`, with `-h`, `-p` and `-U` already given.
///
/// The libpq environment is cleaned so the caller's `PG*` variables and
/// `~/.pgpass` cannot redirect it; `password` goes in `PGPASSWORD` (none
/// for trust). Append the tool's own arguments and the database name.
pub fn client_command(program: &Path, port: u16, user: &str, password: Option<&str>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGCLUSTER",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PGPASSFILE", "/dev/null")
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    cmd.args(["-h", HOST, "-p", &port.to_string(), "-U", user]);
    cmd
}

/// Runs one `psql -c sql` against `127.0.0.1:port` (a cluster, pgbouncer or
/// a gateway) as `user` and returns its unaligned, tuples-only stdout.
///
/// Uses `-X -A -t -w -v ON_ERROR_STOP=1`: no `.psqlrc`, no prompt for a
/// password, and a failing statement fails the call with psql's stderr.
pub fn psql_at(
    port: u16,
    user: &str,
    password: Option<&str>,
    db: &str,
    sql: &str,
) -> anyhow::Result<String> {
    let mut cmd = client_command(Path::new(PSQL), port, user, password);
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-w",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        db,
        "-c",
        sql,
    ]);
    os::output(&mut cmd)
        .with_context(|| format!("psql as {user} to database {db} on port {port}: {sql}"))
}

/// A running throwaway PostgreSQL cluster on `127.0.0.1:port`.
///
/// Started with [`PgCluster::start`]; stopped (`pg_ctl stop -m immediate`,
/// then `kill -KILL` of the postmaster pid if it is still there) and its
/// directory removed when dropped.
#[derive(Debug)]
pub struct PgCluster {
    /// The TCP port on `127.0.0.1`.
    pub port: u16,
    /// The password of the superuser `postgres` (SCRAM over TCP).
    pub superuser_password: String,
    bin_dir: PathBuf,
    run_as: RunAs,
    /// The postmaster's pid, once started.
    pid: Option<u32>,
    /// Roles added with [`PgCluster::create_role`], in order: one
    /// `pg_hba.conf` line each.
    roles: Mutex<Vec<(String, AuthMethod)>>,
    // INVARIANT: declared last so it is removed only after `Drop::drop` has
    // stopped the server that uses it.
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// Creates and starts a cluster: `initdb --auth=scram-sha-256` with a
    /// random superuser password, `password_encryption = scram-sha-256`,
    /// `listen_addresses = '127.0.0.1'` on a free port, the unix socket in
    /// the temporary directory, `max_connections = 200`. Returns once the
    /// server accepts connections (bounded by a timeout).
    pub fn start() -> anyhow::Result<PgCluster> {
        PgCluster::start_under(Path::new("/tmp"))
    }

    /// Like [`PgCluster::start`], with the cluster's directory (data, log,
    /// unix socket) created under `parent`, which the server user must be
    /// able to traverse. The socket path must stay under 107 bytes, so keep
    /// `parent` short.
    pub fn start_under(parent: &Path) -> anyhow::Result<PgCluster> {
        let bin_dir = pg_bin_dir()?;
        let run_as = RunAs::detect()?;
        let dir = run_as.temp_dir_in(parent, "breakglass-pg-")?;
        let superuser_password = os::random_hex(16)?;
        let mut cluster = PgCluster {
            port: 0,
            superuser_password,
            bin_dir,
            run_as,
            pid: None,
            roles: Mutex::new(Vec::new()),
            dir,
        };
        cluster.init()?;
        cluster.write_hba()?;
        for attempt in 1..=PORT_ATTEMPTS_MAX {
            cluster.port = crate::free_port();
            cluster.write_settings()?;
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(e)
                    if attempt < PORT_ATTEMPTS_MAX
                        && os::port_was_taken(&os::log_tail(&cluster.log_file(), 20)) =>
                {
                    eprintln!(
                        "breakglass-testkit: port {} taken, retrying: {e:#}",
                        cluster.port
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let pid_file = cluster.data_dir().join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("cannot read {}", pid_file.display()))?;
        cluster.pid = Some(
            pid.lines()
                .next()
                .and_then(|line| line.trim().parse().ok())
                .with_context(|| format!("no pid in {}", pid_file.display()))?,
        );
        Ok(cluster)
    }

    /// The cluster's directory (data, server log, unix socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the cluster's directory when dropped (the server is still
    /// stopped), so its data and log can be looked at afterwards.
    pub fn keep_files(&mut self) {
        self.dir.disable_cleanup(true);
    }

    /// The host clients connect to: `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// A libpq URL for `user` and `db`, without a password:
    /// `postgres://user@127.0.0.1:PORT/db`.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@{HOST}:{}/{db}", self.port)
    }

    /// The directory of the server binaries (`initdb`, `pg_ctl`, `pgbench`,
    /// ...) this cluster runs with.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The unix socket directory (also the cluster's temporary directory).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `sql` with `psql` as the superuser over TCP; see [`psql_at`].
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        psql_at(
            self.port,
            SUPERUSER,
            Some(&self.superuser_password),
            db,
            sql,
        )
    }

    /// Runs `sql` with `psql` as `user` over TCP, with `password` in
    /// `PGPASSWORD` (`None` for trust); see [`psql_at`].
    pub fn psql_as(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
        sql: &str,
    ) -> anyhow::Result<String> {
        psql_at(self.port, user, password, db, sql)
    }

    /// Creates a `LOGIN` role whose password is stored for `method` and adds
    /// its `pg_hba.conf` line (`host all NAME 127.0.0.1/32 METHOD`), then
    /// reloads the configuration and waits until new sessions see it.
    pub fn create_role(
        &self,
        name: &str,
        password: &str,
        method: AuthMethod,
    ) -> anyhow::Result<()> {
        check_name(name)?;
        self.psql(
            "postgres",
            &format!(
                "SET password_encryption = '{}'; CREATE ROLE {} LOGIN PASSWORD {}",
                method.password_encryption(),
                quote_ident(name),
                quote_literal(password)
            ),
        )
        .with_context(|| format!("cannot create role {name}"))?;
        self.roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_owned(), method));
        self.write_hba()?;
        self.reload()
            .with_context(|| format!("cannot enable pg_hba.conf line of role {name}"))
    }

    /// Creates database `name` owned by role `owner`.
    pub fn create_db(&self, name: &str, owner: &str) -> anyhow::Result<()> {
        check_name(name)?;
        check_name(owner)?;
        self.psql(
            "postgres",
            &format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(name),
                quote_ident(owner)
            ),
        )
        .with_context(|| format!("cannot create database {name}"))?;
        Ok(())
    }

    /// Fills `db` with the pgbench tables at `scale` (`pgbench -i -s N -q`)
    /// as the superuser.
    pub fn pgbench_init(&self, db: &str, scale: u32) -> anyhow::Result<()> {
        let mut cmd = client_command(
            &self.bin_dir.join("pgbench"),
            self.port,
            SUPERUSER,
            Some(&self.superuser_password),
        );
        cmd.args(["-i", "-s", &scale.to_string(), "-q", db]);
        os::output(&mut cmd).with_context(|| format!("cannot initialise pgbench in {db}"))?;
        Ok(())
    }

    /// How many client sessions of `user` the server has right now: rows of
    /// `pg_stat_activity` with `backend_type = 'client backend'` (so the
    /// superuser's background workers are not counted, but the session
    /// running this query is when `user` is `postgres`).
    ///
    /// A backend leaves `pg_stat_activity` a moment after its client
    /// disconnects; use [`PgCluster::wait_for_backends`] to wait for a count.
    pub fn backends_of(&self, user: &str) -> anyhow::Result<u32> {
        let out = self.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND usename = {}",
                quote_literal(user)
            ),
        )?;
        out.trim()
            .parse()
            .with_context(|| format!("unexpected count of backends of {user}: {out:?}"))
    }

    /// Waits until [`PgCluster::backends_of`] `user` is `count`, for at most
    /// `timeout`; the error gives the last count seen.
    pub fn wait_for_backends(
        &self,
        user: &str,
        count: u32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let mut last = Ok(0);
        if os::wait_until(timeout, || {
            last = self.backends_of(user);
            last.as_ref().is_ok_and(|n| *n == count)
        }) {
            return Ok(());
        }
        let last = last?;
        bail!("{user} still has {last} backends after {timeout:?}, expected {count}")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for a server binary, run as the server user from the
    /// temporary directory (the current directory may be unreadable to it).
    fn server_command(&self, program: &str) -> Command {
        let mut cmd = self.run_as.command(&self.bin_dir.join(program));
        cmd.current_dir(self.dir.path());
        cmd
    }

    /// Runs `initdb` and makes `postgresql.conf` include our settings file.
    fn init(&self) -> anyhow::Result<()> {
        let pwfile = self.dir.path().join("pwfile");
        self.run_as.write(&pwfile, &self.superuser_password)?;
        let mut initdb = self.server_command("initdb");
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .arg(format!("--username={SUPERUSER}"))
            .arg(arg_with("--pwfile=", &pwfile))
            .args([
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                // The cluster is thrown away; the running server keeps fsync.
                "--no-sync",
                "--no-instructions",
            ]);
        let result = os::output(&mut initdb).context("initdb failed");
        let _ = std::fs::remove_file(&pwfile);
        result?;
        let conf = self.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .with_context(|| format!("cannot read {}", conf.display()))?;
        text.push_str("\ninclude 'breakglass.conf'\ninclude_if_exists 'breakglass-tls.conf'\n");
        self.run_as.write(&conf, &text)
    }

    /// Writes the settings that change per start attempt (the port).
    fn write_settings(&self) -> anyhow::Result<()> {
        let settings = format!(
            "port = {port}\n\
             listen_addresses = '{HOST}'\n\
             unix_socket_directories = '{socket}'\n\
             max_connections = {CONNECTIONS_MAX}\n\
             password_encryption = 'scram-sha-256'\n\
             logging_collector = off\n",
            port = self.port,
            socket = self.dir.path().display(),
        );
        self.run_as
            .write(&self.data_dir().join("breakglass.conf"), &settings)
    }

    /// Writes `pg_hba.conf`: one line per created role, then SCRAM for
    /// everyone else (including the superuser) over loopback TCP.
    fn write_hba(&self) -> anyhow::Result<()> {
        let mut hba = String::from(
            "# Written by breakglass-testkit.\n\
             # TYPE  DATABASE  USER  ADDRESS  METHOD\n\
             local all all scram-sha-256\n",
        );
        for (name, method) in self
            .roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            hba.push_str(&format!(
                "host all \"{name}\" {HOST}/32 {}\n",
                method.hba_method()
            ));
        }
        hba.push_str(&format!("host all all {HOST}/32 scram-sha-256\n"));
        self.run_as
            .write(&self.data_dir().join("pg_hba.conf"), &hba)
    }

    /// `pg_ctl start -w`: returns once the server accepts connections.
    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", &START_TIMEOUT_S.to_string(), "-s"]);
        os::output(&mut cmd).with_context(|| {
            format!(
                "cannot start PostgreSQL on port {}; server log:\n{}",
                self.port,
                os::log_tail(&self.log_file(), 20)
            )
        })?;
        Ok(())
    }

    /// A URL for the superuser on database `db`, password included (for
    /// tests and benchmarks that hand a whole connection string to a
    /// program): `postgres://postgres:PASSWORD@127.0.0.1:PORT/db`.
    pub fn superuser_url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@{HOST}:{}/{db}",
            self.superuser_password, self.port
        )
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are terminated,
    /// committed data kept) and keeps the cluster's files, so
    /// [`PgCluster::start_again`] can bring the same data back on the same
    /// port. For tests of clients that must survive a database restart.
    pub fn stop_server(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "30", "-s"]);
        os::output(&mut cmd).context("pg_ctl stop failed")?;
        self.pid = None;
        Ok(())
    }

    /// Starts the server stopped by [`PgCluster::stop_server`] again, on
    /// the same port.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.pg_ctl_start()?;
        let pid_file = self.data_dir().join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("cannot read {}", pid_file.display()))?;
        self.pid = pid.lines().next().and_then(|line| line.trim().parse().ok());
        Ok(())
    }

    /// Turns on TLS (`ssl = on`) with the given PEM certificate and key,
    /// copied into the data directory; takes effect after the reload here.
    pub fn enable_tls(&self, cert_pem: &Path, key_pem: &Path) -> anyhow::Result<()> {
        let data = self.data_dir();
        for (src, name) in [(cert_pem, "server.crt"), (key_pem, "server.key")] {
            let text = std::fs::read_to_string(src)
                .with_context(|| format!("cannot read {}", src.display()))?;
            let dst = data.join(name);
            self.run_as.write(&dst, &text)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot chmod {}", dst.display()))?;
        }
        self.run_as.write(
            &data.join("breakglass-tls.conf"),
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )?;
        self.reload()?;
        let on = self.psql("postgres", "SHOW ssl")?;
        if on.trim() != "on" {
            bail!(
                "TLS did not come on (ssl = {}); server log:\n{}",
                on.trim(),
                os::log_tail(&self.log_file(), 20)
            );
        }
        Ok(())
    }

    /// Reloads the configuration and waits until new sessions see it.
    ///
    /// `pg_reload_conf()` only signals the postmaster, so a session opened
    /// right after it may still be checked against the old `pg_hba.conf`;
    /// `pg_conf_load_time()` tells when the reload has happened.
    fn reload(&self) -> anyhow::Result<()> {
        let load_time = "SELECT pg_conf_load_time()";
        let before = self.psql("postgres", load_time)?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        let mut last = Ok(before.clone());
        let reloaded = os::wait_until(RELOAD_TIMEOUT, || {
            last = self.psql("postgres", load_time);
            last.as_ref().is_ok_and(|now| *now != before)
        });
        if !reloaded {
            last?;
            bail!(
                "configuration not reloaded within {RELOAD_TIMEOUT:?}; server log:\n{}",
                os::log_tail(&self.log_file(), 20)
            );
        }
        let errors = self.psql(
            "postgres",
            "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL",
        )?;
        if !errors.trim().is_empty() {
            bail!("pg_hba.conf has errors:\n{errors}");
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data_dir().join("postmaster.pid").exists() {
            let mut cmd = self.server_command("pg_ctl");
            cmd.arg("stop").arg("-D").arg(self.data_dir()).args([
                "-m",
                "immediate",
                "-w",
                "-t",
                "10",
                "-s",
            ]);
            if let Err(e) = os::output(&mut cmd) {
                eprintln!("breakglass-testkit: stopping PostgreSQL: {e:#}");
            }
        }
        if let Some(pid) = self.pid
            && os::pid_alive(pid)
        {
            os::signal(pid, "KILL");
            if !os::wait_until(Duration::from_secs(5), || !os::pid_alive(pid)) {
                eprintln!("breakglass-testkit: PostgreSQL pid {pid} survived kill -KILL");
            }
        }
    }
}

/// Accepts names this crate can quote safely everywhere (SQL, pg_hba.conf,
/// pgbouncer's files, URLs): ASCII letters, digits, `_` and `-`.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_LEN_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        bail!(
            "name {name:?} not supported by the testkit: use 1 to {NAME_LEN_MAX} ASCII letters, \
             digits, '_' or '-'"
        );
    }
    Ok(())
}

/// `"name"` as an SQL identifier (case kept as given).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` as an SQL string literal (`standard_conforming_strings` is on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `--flag=PATH` as one argument without going through UTF-8.
fn arg_with(flag: &str, path: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(flag);
    arg.push(OsStr::new(path));
    arg
}
