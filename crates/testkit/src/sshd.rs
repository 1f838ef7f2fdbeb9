//! Throwaway OpenSSH servers: `sshd -D -f CONFIG` on a free loopback port,
//! with a host key of its own, a `TrustedUserCAKeys` file and an
//! `AuthorizedKeysFile`, run as the unprivileged user `breakglass-sshd`
//! (created with `useradd` when missing) when the tests run as root, or as
//! the current user otherwise. Logins are as that user, the only one an
//! unprivileged sshd can log in. Stopped by pid when dropped; its
//! directory is removed after.
//!
//! `cargo xtask test` installs Debian's `openssh-server` and
//! `openssh-client` when they are missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use breakglass_localpg::os::{output, port_was_taken, running_as_root, stop_child};

/// The user sshd runs as (and the tests log in as) when started as root.
pub const SSHD_USER: &str = "breakglass-sshd";
/// How long sshd may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Starts tried when another process took the chosen port first.
const PORT_ATTEMPTS_MAX: u32 = 3;

/// A running sshd.
pub struct Sshd {
    pub port: u16,
    /// The user logins are for.
    pub user: String,
    /// The pinned host key line (`ssh-ed25519 AAAA...`).
    pub host_key: String,
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
}

/// Who runs sshd: uid and gid, and the user's name.
fn login_user() -> anyhow::Result<(String, Option<(u32, u32)>)> {
    if !running_as_root()? {
        let name = std::env::var("USER")
            .ok()
            .or_else(|| {
                output(Command::new("id").arg("-un"))
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .context("cannot tell the current user's name")?;
        return Ok((name, None));
    }
    let find = || -> anyhow::Result<Option<(u32, u32)>> {
        let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
        Ok(passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            match f.as_slice() {
                [name, _, uid, gid, ..] if *name == SSHD_USER => {
                    Some((uid.parse().ok()?, gid.parse().ok()?))
                }
                _ => None,
            }
        }))
    };
    // One test process at a time creates the user, and none goes on while
    // another is half-way through `useradd` (the user in /etc/passwd, its
    // group or home not yet made).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("breakglass-testkit-useradd.lock"))
        .context("the useradd lock file")?;
    lock.lock().context("lock the useradd lock file")?;
    if find()?.is_none() {
        // `*` as the password: no password works, but the account is not
        // locked (sshd refuses locked accounts even for key logins).
        let out = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--password", "*"])
            .arg(SSHD_USER)
            .output()
            .context("useradd")?;
        // Another test binary may have created it meanwhile.
        if !out.status.success() && find()?.is_none() {
            bail!(
                "useradd {SSHD_USER} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let ids = find()?.context("the sshd user is missing after useradd")?;
    Ok((SSHD_USER.to_string(), Some(ids)))
}

/// The `tty` group's id, from `/etc/group`.
fn tty_gid() -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        match f.as_slice() {
            ["tty", _, gid, ..] => gid.parse().ok(),
            _ => None,
        }
    })
}

fn chown(path: &Path, ids: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// The sshd binary (Debian: `/usr/sbin/sshd`; sshd wants an absolute path).
pub fn sshd_bin() -> anyhow::Result<PathBuf> {
    let p = PathBuf::from("/usr/sbin/sshd");
    if p.exists() {
        return Ok(p);
    }
    bail!(
        "/usr/sbin/sshd is missing: install it with `cargo xtask test` or `apt-get install -y openssh-server openssh-client`"
    )
}

/// Makes an ed25519 key pair with `ssh-keygen` at `path` (and `path.pub`);
/// returns the public key line.
pub fn keygen(path: &Path) -> anyhow::Result<String> {
    output(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "breakglass-test",
                "-f",
            ])
            .arg(path),
    )?;
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .with_context(|| format!("read {}.pub", path.display()))?;
    Ok(public.trim().to_string())
}

impl Sshd {
    /// Starts sshd trusting the user CA `ca_public` (a public key line)
    /// and the keys in `authorized` (lines, may be empty).
    pub fn start(ca_public: &str, authorized: &[String]) -> anyhow::Result<Sshd> {
        let (user, ids) = login_user()?;
        let bin = sshd_bin()?;
        if ids.is_some() {
            // The privilege separation directory sshd checks at start.
            std::fs::create_dir_all("/run/sshd").context("create /run/sshd")?;
        }
        let dir = tempfile::Builder::new()
            .prefix("bg-sshd-")
            .tempdir_in("/tmp")
            .context("sshd temp dir")?;
        let d = dir.path();
        let host_key = keygen(&d.join("host_ed25519_key"))?;
        std::fs::write(d.join("ca.pub"), format!("{ca_public}\n"))?;
        std::fs::write(d.join("authorized_keys"), authorized.join("\n") + "\n")?;
        for f in [
            "host_ed25519_key",
            "host_ed25519_key.pub",
            "ca.pub",
            "authorized_keys",
        ] {
            chown(&d.join(f), ids)?;
        }
        chown(d, ids)?;
        for attempt in 1..=PORT_ATTEMPTS_MAX {
            let port = crate::free_port();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519_key\n\
                 PidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 TrustedUserCAKeys {d}/ca.pub\nAuthorizedKeysFile {d}/authorized_keys\n\
                 LogLevel VERBOSE\nSubsystem sftp internal-sftp\nPermitUserEnvironment no\n\
                 PrintMotd no\nPrintLastLog no\nMaxStartups 100:30:200\nMaxSessions 50\n",
                d = d.display()
            );
            std::fs::write(d.join("sshd_config"), config)?;
            chown(&d.join("sshd_config"), ids)?;
            let mut cmd = match ids {
                Some((uid, gid)) => {
                    // With the `tty` group as its group, the pseudo terminals
                    // it opens for sessions are already (user, tty), so it need
                    // not chown them, which an unprivileged sshd may not do
                    // (it gives up the session: "chown(/dev/pts/N) failed").
                    let gid = tty_gid().unwrap_or(gid);
                    let mut c = Command::new("setpriv");
                    c.arg(format!("--reuid={uid}"))
                        .arg(format!("--regid={gid}"))
                        .arg("--init-groups")
                        .arg("--")
                        .arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            // What goes to stderr (setpriv's errors, sshd's before its log
            // is open) is kept beside the log.
            let stderr =
                std::fs::File::create(d.join("sshd.stderr")).context("sshd stderr file")?;
            cmd.arg("-D")
                .arg("-f")
                .arg(d.join("sshd_config"))
                .arg("-E")
                .arg(d.join("sshd.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            let mut child = cmd.spawn().context("spawn sshd")?;
            let mut exited = None;
            let listening = crate::poll(START_TIMEOUT, || {
                if let Ok(Some(st)) = child.try_wait() {
                    exited = Some(st);
                    return Some(false);
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| true)
            });
            if listening == Some(true) {
                return Ok(Sshd {
                    port,
                    user,
                    host_key,
                    dir: Some(dir),
                    child: Some(child),
                });
            }
            stop_child(Some(child), Duration::from_secs(2));
            let log = std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default();
            let err = std::fs::read_to_string(d.join("sshd.stderr")).unwrap_or_default();
            let what = match exited {
                Some(st) => format!("sshd exited ({st})"),
                None => format!("sshd did not listen on port {port} within {START_TIMEOUT:?}"),
            };
            if exited.is_none() || attempt == PORT_ATTEMPTS_MAX || !port_was_taken(&log) {
                bail!("{what}:\n{log}\nstderr:\n{err}");
            }
            eprintln!("breakglass-testkit: sshd's port {port} taken, retrying");
            let _ = std::fs::remove_file(d.join("sshd.log"));
        }
        unreachable!("the last attempt returns or fails")
    }

    /// sshd's log (it names every certificate's key id).
    pub fn log(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("sshd.log")).ok())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        stop_child(self.child.take(), Duration::from_secs(2));
        // The directory goes after the process.
        drop(self.dir.take());
    }
}
