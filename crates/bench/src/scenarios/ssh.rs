//! `ssh`: the SSH gateway against the same sshd reached directly, with the
//! stock OpenSSH client in both cases, in one run:
//! - bulk throughput of `head -c 200M /dev/zero` read to /dev/null;
//! - the round trip of one keystroke through `cat` (what a typed key and
//!   its echo cost), p50 and p99 of each path and the added p99;
//! - cut latency: from the revoke's answer, and from `expires_at`, until
//!   the client running `sleep 60` has lost its session.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use breakglass_core::Timestamp;
use breakglass_testkit::Sshd;
use breakglass_testkit::sshd::keygen;
use serde_json::{Value, json};

use super::Ctx;
use crate::server::{self, Client, requester};
use crate::stats::{Goal, Row, Samples, fmt_secs};

/// Bytes of the bulk transfer.
const BULK_BYTES: u64 = 200 * 1024 * 1024;
/// How long one client may take for anything.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// The two ways to the same sshd.
struct Paths {
    dir: tempfile::TempDir,
    askpass: PathBuf,
    gw_port: u16,
    sshd: Sshd,
}

impl Paths {
    /// The stock client to `target` through the gateway with `token`.
    fn via_gateway(&self, token: &str) -> Command {
        let mut c = Command::new("ssh");
        c.env("SSH_ASKPASS", &self.askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("BG_BENCH_PASSWORD", token)
            .args(common_args())
            .args([
                "-o",
                "PreferredAuthentications=keyboard-interactive,password",
                "-o",
                "PubkeyAuthentication=no",
                "-p",
            ])
            .arg(self.gw_port.to_string())
            .arg("box@127.0.0.1");
        c
    }

    /// The stock client straight to sshd with the role's key.
    fn direct(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(common_args())
            .args(["-o", "PreferredAuthentications=publickey", "-i"])
            .arg(self.dir.path().join("role_key"))
            .arg("-p")
            .arg(self.sshd.port.to_string())
            .arg(format!("{}@127.0.0.1", self.sshd.user));
        c
    }
}

fn common_args() -> [&'static str; 10] {
    [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
    ]
}

/// Waits for `child` at most `limit`; its exit status.
fn wait(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ssh did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A grant on `box` (the 0-approval drill policy) and its credential.
fn grant(c: &Client, who: &str, duration: &str) -> anyhow::Result<(String, String, Timestamp)> {
    let body =
        json!({"target": "box", "role": "read", "duration": duration, "reason": "ssh bench"});
    let r = c
        .post(who, "/v1/requests", Some(&body))?
        .expect(201, "create")?;
    let id = r["id"].as_str().context("id")?.to_string();
    let creds = c
        .post(who, &format!("/v1/requests/{id}/credentials"), None)?
        .expect(200, "credentials")?;
    let token = creds["token"].as_str().context("token")?.to_string();
    let expires = creds["expires_at"]
        .as_str()
        .and_then(|t| Timestamp::parse_rfc3339(t).ok())
        .context("expires_at")?;
    Ok((id, token, expires))
}

/// Runs `cmd` (a client already holding its target) to read
/// [`BULK_BYTES`] zeros; seconds taken.
fn bulk(mut cmd: Command) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut child = cmd
        .arg(format!("head -c {BULK_BYTES} /dev/zero"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let st = wait(&mut child, CLIENT_LIMIT)?;
    if !st.success() || got != BULK_BYTES {
        bail!("bulk transfer: {st}, {got} of {BULK_BYTES} bytes");
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// `n` one-byte round trips through `cat` on the far side.
fn keystrokes(mut cmd: Command, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut child = cmd
        .arg("cat")
        .arg("-T")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    let mut output = child.stdout.take().context("stdout")?;
    let mut one = [0u8; 1];
    // The first echo also waits for the sign-in and the session.
    input.write_all(b"w")?;
    output.read_exact(&mut one)?;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let key = b'a' + (i % 26) as u8;
        let t0 = Instant::now();
        input.write_all(&[key])?;
        input.flush()?;
        output.read_exact(&mut one)?;
        v.push(t0.elapsed().as_secs_f64());
        if one[0] != key {
            bail!("echo {:?} for {:?}", one[0] as char, key as char);
        }
    }
    drop(input);
    wait(&mut child, CLIENT_LIMIT)?;
    Ok(v)
}

/// Starts `sleep 60` through the gateway and waits until the session is
/// live (the server lists it).
fn sleeper(p: &Paths, c: &Client, who: &str, id: &str, token: &str) -> anyhow::Result<Child> {
    let child = p
        .via_gateway(token)
        .arg("sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = c
            .get(who, &format!("/v1/requests/{id}/sessions"))?
            .expect(200, "sessions")?;
        if v["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["ended_at"].is_null()))
        {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!("the sleeper's session never went live");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Ctx {
    pub fn ssh(&mut self) -> anyhow::Result<()> {
        let dir = tempfile::Builder::new().prefix("bg-bench-ssh-").tempdir()?;
        let ca_pub = keygen(&dir.path().join("ssh_ca"))?;
        let role_pub = keygen(&dir.path().join("role_key"))?;
        let sshd = Sshd::start(&ca_pub, &[role_pub])?;
        let setup = server::setup()?;
        copy_private(&dir.path().join("ssh_ca"), &setup.dir.path().join("ssh_ca"))?;
        let gw_port = breakglass_testkit::free_port();
        let mut text = std::fs::read_to_string(&setup.config)?;
        text.push_str(&format!(
            "\n[gateway.ssh]\nlisten = \"127.0.0.1:{gw_port}\"\nuser_ca_key_file = \"ssh_ca\"\n\n\
             [[targets]]\nname = \"box\"\nkind = \"ssh\"\ngroups = [\"drills\"]\n\
             upstream = \"ssh://127.0.0.1:{}\"\nhost_key = \"{}\"\n[targets.roles.read]\nuser = \"{}\"\n",
            sshd.port, sshd.host_key, sshd.user
        ));
        std::fs::write(&setup.config, text)?;
        let askpass = dir.path().join("askpass.sh");
        std::fs::write(
            &askpass,
            "#!/bin/sh\nprintf '%s\\n' \"$BG_BENCH_PASSWORD\"\n",
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755))?;
        }
        let paths = Paths {
            dir,
            askpass,
            gw_port,
            sshd,
        };
        let srv = self.start(&setup)?;
        let c = Client::new(&srv.url);
        let who = requester(0);

        // Bulk, interleaved.
        let rounds = self.n(3, 1);
        let (mut via, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (_, token, _) = grant(&c, &who, "15m")?;
            direct.push(bulk(paths.direct())?);
            via.push(bulk(paths.via_gateway(&token))?);
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let mb = BULK_BYTES as f64 / (1024.0 * 1024.0);
        let (gw_rate, direct_rate) = (mb / best(&via), mb / best(&direct));
        self.rows.push(Row::target(
            "ssh: bulk throughput (head -c 200M), gateway / direct",
            format!(
                "{gw_rate:.0} MB/s vs {direct_rate:.0} MB/s ({:.2})",
                gw_rate / direct_rate
            ),
            gw_rate / direct_rate,
            ">= 0.8",
            Goal::AtLeast(0.8),
            format!("best of {rounds} interleaved runs each, stock ssh client, same sshd"),
        ));
        let rates = |v: &[f64]| {
            v.iter()
                .map(|s| format!("{:.0}", mb / s))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.notes.push(format!(
            "ssh: every bulk run in MB/s, in order: direct {}; gateway {}",
            rates(&direct),
            rates(&via)
        ));

        // Keystrokes.
        let n = self.n(1000, 100);
        let (_, token, _) = grant(&c, &who, "15m")?;
        let d = Samples::from_secs(keystrokes(paths.direct(), n)?);
        let g = Samples::from_secs(keystrokes(paths.via_gateway(&token), n)?);
        self.rows.push(Row::info(
            "ssh: keystroke round trip, direct",
            format!("p50 {} · p99 {}", fmt_secs(d.p50()), fmt_secs(d.p99())),
            format!("{n} one-byte echoes through cat"),
        ));
        self.rows.push(Row::target(
            "ssh: keystroke round trip added by the gateway, p99",
            format!(
                "{} (gateway p50 {} · p99 {})",
                fmt_secs(g.p99() - d.p99()),
                fmt_secs(g.p50()),
                fmt_secs(g.p99())
            ),
            g.p99() - d.p99(),
            "< 2 ms",
            Goal::AtMost(0.002),
            format!(
                "{n} one-byte echoes through cat; added p99 {}",
                self.base.describe(g.p99() - d.p99())
            ),
        ));

        // Cuts at revoke and at expiry.
        let cuts = self.n(10, 3);
        let mut at_revoke = Vec::with_capacity(cuts);
        for _ in 0..cuts {
            let (id, token, _) = grant(&c, &who, "15m")?;
            let mut child = sleeper(&paths, &c, &who, &id, &token)?;
            c.post(
                &who,
                &format!("/v1/requests/{id}/revoke"),
                Some(&json!({"reason": "bench cut"})),
            )?
            .expect(200, "revoke")?;
            let t0 = Instant::now();
            wait(&mut child, Duration::from_secs(10))?;
            at_revoke.push(t0.elapsed().as_secs_f64());
        }
        let mut at_expiry = Vec::with_capacity(cuts);
        for _ in 0..cuts {
            let (id, token, expires) = grant(&c, &who, "3s")?;
            let mut child = sleeper(&paths, &c, &who, &id, &token)?;
            wait(&mut child, Duration::from_secs(15))?;
            let late_ms = Timestamp::now().millis() - expires.millis();
            at_expiry.push((late_ms.max(0) as f64) / 1000.0);
        }
        for (what, v) in [("revoke's answer", at_revoke), ("expires_at", at_expiry)] {
            let s = Samples::from_secs(v);
            self.rows.push(Row::target(
                format!("ssh: cut latency after {what}, p99"),
                format!("{} (p50 {})", fmt_secs(s.p99()), fmt_secs(s.p50())),
                s.p99(),
                "<= 100 ms",
                Goal::AtMost(0.1),
                format!(
                    "{} sessions running sleep 60, until the stock client exits",
                    s.len()
                ),
            ));
        }
        srv.stop()?;
        Ok(())
    }
}

/// Copies a private key, keeping it readable by its owner only.
fn copy_private(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
