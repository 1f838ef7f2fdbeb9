//! Operating-system plumbing shared by the servers: which user a server runs
//! as, temporary directories it can use, running commands with their output
//! in errors, and checking and signalling processes by pid.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Who server processes run as.
#[derive(Debug, Clone, Copy)]
pub enum RunAs {
    /// Not root: servers run as the current user.
    Me,
    /// Root: servers run as the `postgres` OS user, which owns their files.
    Postgres { uid: u32, gid: u32 },
}

impl RunAs {
    /// Decides from the effective uid; as root, looks up the `postgres` user.
    pub fn detect() -> anyhow::Result<RunAs> {
        if !running_as_root()? {
            return Ok(RunAs::Me);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let [name, _, uid, gid, ..] = fields.as_slice()
                && *name == "postgres"
            {
                let uid = uid.parse().context("bad uid for postgres in /etc/passwd")?;
                let gid = gid.parse().context("bad gid for postgres in /etc/passwd")?;
                return Ok(RunAs::Postgres { uid, gid });
            }
        }
        bail!(
            "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
             OS user to run it as; install the server with `cargo xtask test` or \
             `apt-get install -y postgresql pgbouncer`"
        )
    }

    /// A command that runs `program` as this user.
    ///
    /// Uses `setpriv`, which changes user and then execs the program in the
    /// same process (unlike `runuser`, which forks and waits), so the pid of
    /// the spawned child is the pid of the server.
    pub fn command(self, program: &Path) -> Command {
        match self {
            RunAs::Me => Command::new(program),
            RunAs::Postgres { uid, gid } => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                cmd
            }
        }
    }

    /// Gives `path` to this user (no-op for [`RunAs::Me`]).
    pub fn own(self, path: &Path) -> anyhow::Result<()> {
        if let RunAs::Postgres { uid, gid } = self {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {} to the postgres user", path.display()))?;
        }
        Ok(())
    }

    /// Writes a file and gives it to this user.
    pub fn write(self, path: &Path, contents: &str) -> anyhow::Result<()> {
        std::fs::write(path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.own(path)
    }

    /// A fresh temporary directory owned by this user.
    ///
    /// Always under `/tmp`, not `$TMPDIR`: the `postgres` user must be able
    /// to reach it, and PostgreSQL puts its unix socket in it, whose path
    /// must stay under the 107-byte `sun_path` limit.
    pub fn temp_dir(self, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
        self.temp_dir_in(Path::new("/tmp"), prefix)
    }

    /// A fresh temporary directory under `parent`, owned by this user.
    pub fn temp_dir_in(self, parent: &Path, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .with_context(|| {
                format!(
                    "cannot create a temporary directory under {}",
                    parent.display()
                )
            })?;
        self.own(dir.path())?;
        Ok(dir)
    }
}

/// Whether the effective uid is 0, read from `/proc/self/status`.
pub fn running_as_root() -> anyhow::Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(euid == "0")
}

/// The program and arguments of a command, without its environment (which
/// may hold `PGPASSWORD`).
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion and returns its stdout; on failure the error
/// names the command and carries its stderr and stdout.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{}` failed with {}\nstderr:\n{}\nstdout:\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            stdout.trim_end()
        );
    }
    Ok(stdout)
}

/// The last `lines` lines of a log file, or a note saying why there are none.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    // The state is the field after the parenthesised command name, which may
    // itself contain spaces and parentheses.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The pids of `pid`'s children, from `/proc/*/stat` (the parent's pid is
/// the second field after the parenthesised command name).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == pid).then_some(child)
    })
    .collect()
}

/// Sends `signal` (e.g. `"KILL"`) to `pid` with the `kill` command; this
/// crate forbids `unsafe`, so it does not call `kill(2)` directly.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polls `done` every 20 ms until it returns true or `timeout` passes;
/// returns whether it finished in time.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A random hex string of `bytes` bytes from `/dev/urandom`.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Finds `name` in `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whether a server log says its listen port was taken (so a retry with a
/// new port may succeed).
pub fn port_was_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not bind")
}

/// Stops a child process: `SIGTERM`, then `SIGKILL` after `grace`, and
/// reaps it. Nothing happens for `None` or a child that already exited.
pub fn stop_child(child: Option<std::process::Child>, grace: Duration) {
    let Some(mut child) = child else {
        return;
    };
    if let Ok(None) = child.try_wait() {
        signal(child.id(), "TERM");
        let exited = wait_until(grace, || !matches!(child.try_wait(), Ok(None)));
        if !exited {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}
