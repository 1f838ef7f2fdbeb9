//! The SSH gateway with the real OpenSSH client and a real, throwaway
//! `sshd` (testkit), and the real `breakglass` binary over loopback:
//! exec with its exit status, an interactive shell through a pseudo
//! terminal, `connect`, the certificate the gateway signs (its key id in
//! sshd's log), refusals (bad and ended credentials, SFTP, a host key that
//! is not the pinned one), cuts at revoke and at expiry while `sleep 60`
//! runs, the bound on channels a target forwards back (`ssh -R`),
//! `kill -9` with recovery and verification, an SFTP upload cut by
//! `kill -9` of the client (recorded as far as it went, and no further
//! than the recording), the recording played back with `asciinema cat`,
//! and drills on SSH targets.

mod gateway_support;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use breakglass_testkit::Sshd;
use breakglass_testkit::os;
use breakglass_testkit::sshd::keygen;
use gateway_support::{Bg, Grant, Out, Spawned, free_port, poll, principals_config, run};
use serde_json::{Value, json};

/// A server with the SSH gateway in front of one sshd, and its targets:
/// `web` (certificate login), `web-key` (key file login), `web-pinned-wrong`
/// (a host key that is not the upstream's).
struct Env {
    bg: Bg,
    sshd: Sshd,
    askpass: PathBuf,
}

fn start(sshd_ca_from: impl FnOnce(&Path) -> String) -> Env {
    start_with(sshd_ca_from, |_| String::new())
}

/// [`start`] with more config, written by `extra` in the config dir.
fn start_with(
    sshd_ca_from: impl FnOnce(&Path) -> String,
    extra: impl FnOnce(&Path) -> String,
) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    // The gateway's user CA, made beforehand so sshd can trust it.
    let ca_pub = sshd_ca_from(&d);
    let role_key_pub = keygen(&d.join("role_key")).expect("role key");
    let sshd = Sshd::start(&ca_pub, &[role_key_pub]).expect("sshd");
    let other = keygen(&d.join("other_host")).expect("other key");
    let http_port = free_port();
    let gw_port = free_port();
    let mut cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{http_port}\"\ndata_dir = \"data\"\n\
         admin_groups = [\"security\"]\n\n[policy]\nfile = \"policy.cedar\"\n\n\
         [audit]\ncheckpoint_interval = \"1s\"\n\n\
         [gateway.ssh]\nlisten = \"127.0.0.1:{gw_port}\"\nuser_ca_key_file = \"ssh_ca\"\n\
         handshake_timeout = \"3s\"\n\n"
    );
    cfg.push_str(&principals_config(&d));
    let up = format!("ssh://127.0.0.1:{}", sshd.port);
    cfg.push_str(&format!(
        "[[targets]]\nname = \"web\"\nkind = \"ssh\"\nupstream = \"{up}\"\nhost_key = \"{}\"\n\
         [targets.roles.ops]\nuser = \"{}\"\n\n\
         [[targets]]\nname = \"web-key\"\nkind = \"ssh\"\nupstream = \"{up}\"\nhost_key = \"{}\"\n\
         [targets.roles.ops]\nuser = \"{}\"\nkey_file = \"role_key\"\n\n\
         [[targets]]\nname = \"web-pinned-wrong\"\nkind = \"ssh\"\nupstream = \"{up}\"\nhost_key = \"{other}\"\n\
         [targets.roles.ops]\nuser = \"{}\"\n\n\
         [[targets]]\nname = \"web-fwd\"\nkind = \"ssh\"\nupstream = \"{up}\"\nhost_key = \"{}\"\n\
         [targets.roles.ops]\nuser = \"{}\"\nport_forwarding = true\n\n\
         [[targets]]\nname = \"web-files\"\nkind = \"ssh\"\nupstream = \"{up}\"\nhost_key = \"{}\"\n\
         [targets.roles.ops]\nuser = \"{}\"\nfile_transfer = true\n\n",
        sshd.host_key,
        sshd.user,
        sshd.host_key,
        sshd.user,
        sshd.user,
        sshd.host_key,
        sshd.user,
        sshd.host_key,
        sshd.user
    ));
    // The tests' own SSH_ASKPASS: answers with $BG_TEST_SSH_PASSWORD.
    let askpass = d.join("askpass.sh");
    std::fs::write(
        &askpass,
        "#!/bin/sh\nprintf '%s\\n' \"$BG_TEST_SSH_PASSWORD\"\n",
    )
    .expect("askpass");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755))
            .expect("chmod askpass");
    }
    cfg.push_str(&extra(&d));
    let bg = Bg::from_config(dir, http_port, gw_port, &cfg);
    Env { bg, sshd, askpass }
}

/// The usual set-up: the CA key made with ssh-keygen in the config dir.
fn env() -> Env {
    start(|d| keygen(&d.join("ssh_ca")).expect("ca"))
}

impl Env {
    /// `ssh` to `target` through the gateway with `password`, no host key
    /// checks of the gateway (the tests of `connect` check it).
    fn ssh(&self, target: &str, password: &str, args: &[&str]) -> Command {
        self.ssh_with(target, password, &[], args)
    }

    /// [`Env::ssh`] with client options `opts` (before the destination).
    fn ssh_with(&self, target: &str, password: &str, opts: &[&str], args: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.env("SSH_ASKPASS", &self.askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("BG_TEST_SSH_PASSWORD", password)
            .args([
                "-F",
                "/dev/null",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "PreferredAuthentications=keyboard-interactive,password",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "NumberOfPasswordPrompts=1",
                "-o",
                "ConnectTimeout=10",
                "-p",
            ])
            .arg(self.bg.gw_port.to_string())
            .args(opts)
            .arg(format!("{target}@127.0.0.1"))
            .args(args);
        cmd
    }

    /// The one session of a grant, once it has ended.
    fn ended_session(&self, g: &Grant) -> Value {
        self.bg
            .ended_sessions(g, 1, Duration::from_secs(20))
            .into_iter()
            .next()
            .expect("one session")
    }

    fn live_session(&self, g: &Grant) -> Value {
        poll(Duration::from_secs(20), || {
            self.bg
                .sessions(&g.principal, &g.id)
                .into_iter()
                .find(|s| s["ended_at"].is_null())
        })
        .expect("a live session")
    }

    fn events(&self, action: &str, session_id: &str) -> Vec<Value> {
        self.bg
            .audit()
            .into_iter()
            .filter(|e| e["action"] == action && e["details"]["session_id"] == session_id)
            .collect()
    }

    /// `breakglass recording ID --format asciicast` into a file.
    fn cast(&self, session_id: &str) -> PathBuf {
        let out = self.bg.cli(
            Some("alice"),
            &["recording", session_id, "--format", "asciicast"],
        );
        out.ok();
        let path = self.bg.dir.path().join(format!("{session_id}.cast"));
        std::fs::write(&path, &out.stdout).expect("write cast");
        path
    }
}

fn asciinema() -> String {
    std::env::var("BREAKGLASS_TEST_ASCIINEMA").unwrap_or_else(|_| "asciinema".into())
}

/// `asciinema cat FILE`: what the terminal showed.
fn asciinema_cat(path: &Path) -> String {
    let out = run(Command::new(asciinema()).arg("cat").arg(path));
    assert_eq!(out.code, 0, "asciinema cat failed: {out:#?}");
    out.stdout
}

fn kinds(rec: &[Value], kind: &str) -> Vec<Value> {
    rec.iter().filter(|e| e["kind"] == kind).cloned().collect()
}

fn output_text(rec: &[Value]) -> String {
    kinds(rec, "o")
        .iter()
        .map(|e| e["data"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn exec_returns_the_exit_status_and_is_recorded_with_a_certificate_login() {
    let e = env();
    let g = e.bg.grant("alice", "web", "ops", "10m");
    assert_eq!(g.connection["kind"], "ssh", "{:?}", g.connection);
    assert!(
        g.connection["host_key_fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("SHA256:")),
        "{:?}",
        g.connection
    );
    let out = run(&mut e.ssh(
        "web",
        &g.token,
        &["echo out-$((40+2)); echo err >&2; exit 7"],
    ));
    assert_eq!(out.code, 7, "{out:#?}");
    assert_eq!(out.stdout, "out-42\n", "{out:#?}");
    assert!(out.stderr.contains("err"), "{out:#?}");

    let s = e.ended_session(&g);
    let sid = s["session_id"].as_str().expect("sid").to_string();
    // The upstream login was a certificate the gateway signed for this
    // session: sshd logs its key id.
    let key_id = format!("breakglass:alice:{}:{sid}", g.id);
    assert!(
        e.sshd.log().contains(&key_id),
        "sshd log lacks {key_id}:\n{}",
        e.sshd.log()
    );
    let started = e.events("session.started", &sid);
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["details"]["protocol"], "ssh");
    assert_eq!(started[0]["details"]["upstream_user"], e.sshd.user.as_str());
    let ended = e.events("session.ended", &sid);
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["details"]["statements"], 1, "one exec");

    let rec = e.bg.recording(&sid);
    assert_eq!(rec[0]["kind"], "session");
    assert_eq!(rec[0]["protocol"], "ssh");
    let exec = kinds(&rec, "exec");
    assert_eq!(exec.len(), 1);
    assert_eq!(
        exec[0]["command"],
        "echo out-$((40+2)); echo err >&2; exit 7"
    );
    assert_eq!(kinds(&rec, "exit")[0]["status"], 7);
    let text = output_text(&rec);
    assert!(text.contains("out-42") && text.contains("err"), "{text:?}");
    assert!(
        kinds(&rec, "o").iter().any(|o| o["stream"] == "stderr"),
        "stderr is marked"
    );
    // The recording's chain ends where session.ended says.
    let last = rec.last().expect("entries");
    assert_eq!(last["kind"], "end");
    assert_eq!(
        ended[0]["details"]["recording_entries"],
        json!(rec.len() as u64)
    );
    assert_eq!(ended[0]["details"]["recording_sha256"], last["hash"]);

    // The cast plays: the command in the header, the output in the body.
    let cast = e.cast(&sid);
    let text = std::fs::read_to_string(&cast).expect("cast");
    let header: Value = serde_json::from_str(text.lines().next().expect("header")).expect("json");
    assert_eq!(header["version"], 2);
    assert_eq!(
        header["command"],
        "echo out-$((40+2)); echo err >&2; exit 7"
    );
    assert!(asciinema_cat(&cast).contains("out-42"));

    // A key file login works too.
    let k = e.bg.grant("bob", "web-key", "ops", "10m");
    let out = run(&mut e.ssh("web-key", &k.token, &["whoami"]));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.stdout.trim(), e.sshd.user);

    // The whole log verifies, recordings included.
    let (st, v) = e.bg.get("carol", "/v1/audit/verify");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn an_interactive_shell_through_a_pty_is_recorded_as_a_cast() {
    let e = env();
    let g = e.bg.grant("alice", "web", "ops", "10m");
    // The real ssh client on a pseudo terminal (util-linux `script`).
    let ssh = e.ssh("web", &g.token, &["-tt"]);
    let line = std::iter::once(ssh.get_program())
        .chain(ssh.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", &line, "/dev/null"])
        .envs(ssh.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("TERM", "xterm")
        .stdin(Stdio::piped());
    let mut child = Spawned::spawn(&mut cmd);
    let mut stdin = child.take_stdin().expect("stdin");
    // Wait for the session, then type.
    e.live_session(&g);
    std::thread::sleep(Duration::from_millis(500));
    let typed = stdin.write_all(b"echo typed-$((6*7))\n").is_ok() && {
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(b"exit 0\n").is_ok()
    };
    let out: Out = child.wait(Duration::from_secs(30));
    assert!(
        typed && out.stdout.contains("typed-42"),
        "typed: {typed}\n{out:#?}\nsshd log:\n{}",
        e.sshd.log()
    );

    let s = e.ended_session(&g);
    let sid = s["session_id"].as_str().expect("sid");
    let rec = e.bg.recording(sid);
    let pty = kinds(&rec, "pty");
    assert_eq!(pty.len(), 1, "{rec:#?}");
    assert_eq!(pty[0]["term"], "xterm");
    assert_eq!(kinds(&rec, "shell").len(), 1);
    let typed: String = kinds(&rec, "i")
        .iter()
        .map(|e| e["data"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(typed.contains("echo typed-$((6*7))"), "{typed:?}");
    assert!(output_text(&rec).contains("typed-42"));

    let cast = e.cast(sid);
    let text = std::fs::read_to_string(&cast).expect("cast");
    let header: Value = serde_json::from_str(text.lines().next().expect("header")).expect("json");
    assert_eq!(header["width"], pty[0]["cols"]);
    assert_eq!(header["height"], pty[0]["rows"]);
    assert!(
        text.lines().skip(1).any(|l| l.contains("\"i\"")),
        "input events"
    );
    assert!(asciinema_cat(&cast).contains("typed-42"));
}

#[test]
fn refusals_say_why_and_reach_no_upstream_when_they_should_not() {
    let e = env();
    // Not a credential at all.
    let out = run(&mut e.ssh("web", "bgg_not-a-token", &["true"]));
    assert_eq!(out.code, 255, "{out:#?}");
    assert!(out.stderr.contains("Permission denied"), "{out:#?}");
    // Another target's credential.
    let g = e.bg.grant("alice", "web-key", "ops", "10m");
    let out = run(&mut e.ssh("web", &g.token, &["true"]));
    assert_eq!(out.code, 255, "{out:#?}");
    // An ended grant's credential.
    let short = e.bg.grant("alice", "web", "ops", "1s");
    std::thread::sleep(Duration::from_millis(
        u64::try_from(short.expires_at_ms - gateway_support::now_ms() + 300).unwrap_or(0),
    ));
    let out = run(&mut e.ssh("web", &short.token, &["true"]));
    assert_eq!(out.code, 255, "{out:#?}");
    assert!(e.bg.sessions("alice", &short.id).is_empty());

    // A host key that is not the pinned one: refused before any
    // credential is sent (sshd never sees a login), and the client is
    // told why.
    let before = e.sshd.log().matches("Accepted publickey").count();
    let w = e.bg.grant("alice", "web-pinned-wrong", "ops", "10m");
    let out = run(&mut e.ssh("web-pinned-wrong", &w.token, &["true"]));
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(
        out.stderr.contains("not the pinned") && out.stderr.contains("before any credential"),
        "{out:#?}"
    );
    assert_eq!(e.sshd.log().matches("Accepted publickey").count(), before);
    assert!(e.bg.sessions("alice", &w.id).is_empty());

    // SFTP is refused with a message, and recorded as refused.
    let g = e.bg.grant("bob", "web", "ops", "10m");
    let mut sftp = Command::new("sftp");
    sftp.env("SSH_ASKPASS", &e.askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("BG_TEST_SSH_PASSWORD", &g.token)
        .args([
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "PubkeyAuthentication=no",
            // Not `-b`: batch mode turns password sign-in off, and sftp
            // would fail before it ever asked for the subsystem.
            "-P",
        ])
        .arg(e.bg.gw_port.to_string())
        .arg("web@127.0.0.1");
    let out = run(&mut sftp);
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(
        out.stderr.contains("SFTP is not allowed"),
        "told why: {out:#?}"
    );
    // Legacy scp runs `scp -t` as a command: refused too.
    let out = run(&mut e.ssh("web", &g.token, &["scp -t /tmp/x"]));
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("not allowed"), "{out:#?}");
    let sessions = e.bg.ended_sessions(&g, 2, Duration::from_secs(20));
    let refused: Vec<Value> = sessions
        .iter()
        .flat_map(|s| e.bg.recording(s["session_id"].as_str().expect("sid")))
        .filter(|x| x["kind"] == "refused")
        .collect();
    assert!(
        refused.iter().any(
            |r| r["what"] == "subsystem" && r["detail"].as_str().unwrap_or("").contains("SFTP")
        ),
        "{refused:#?}"
    );
    assert!(refused.iter().any(|r| r["what"] == "scp"), "{refused:#?}");
}

/// An upper-casing echo service on loopback for forwarded connections:
/// its port. It answers every connection until the test ends.
fn shouting_echo() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Connects to a forwarded port, sends `line`, and reads as many bytes
/// back (fewer at the end of the stream); the connection stays open.
fn exchange(port: u16, line: &str) -> Option<(std::net::TcpStream, Vec<u8>)> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    c.write_all(line.as_bytes()).ok()?;
    let mut got = vec![0u8; line.len()];
    let mut at = 0;
    while at < got.len() {
        match c.read(&mut got[at..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => at += n,
        }
    }
    got.truncate(at);
    Some((c, got))
}

/// Connects to a forwarded local port, sends `line`, returns the answer
/// (empty when the forwarded connection was refused).
fn through_forward(port: u16, line: &str) -> Option<String> {
    exchange(port, line).map(|(_, got)| String::from_utf8_lossy(&got).into_owned())
}

/// Revokes `g` as its holder and waits for `client` to end.
fn revoke_and_wait(e: &Env, g: &Grant, client: Spawned) {
    let (st, v) = e.bg.post(
        &g.principal,
        &format!("/v1/requests/{}/revoke", g.id),
        json!({"reason": "done"}),
    );
    assert_eq!(st, 200, "{v}");
    let _ = client.wait(Duration::from_secs(20));
}

/// `ssh -N -R` on `web-fwd` with grant `g`: the target listens on a free
/// port (returned) and forwards to `to` on the client's side.
fn remote_forward(e: &Env, g: &Grant, to: u16) -> (u16, Spawned) {
    let remote = free_port();
    let spec = format!("{remote}:127.0.0.1:{to}");
    let client = Spawned::spawn(&mut e.ssh_with(
        "web-fwd",
        &g.token,
        &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec],
        &[],
    ));
    (remote, client)
}

#[test]
fn local_port_forwarding_is_recorded_when_the_role_allows_it_and_refused_otherwise() {
    let e = start_with(
        |d| keygen(&d.join("ssh_ca")).expect("ca"),
        |_| String::new(),
    );
    let echo = shouting_echo();
    let fwd = |target: &str, token: &str, local: u16| {
        let spec = format!("{local}:127.0.0.1:{echo}");
        Spawned::spawn(&mut e.ssh_with(
            target,
            token,
            &["-N", "-o", "ExitOnForwardFailure=yes", "-L", &spec],
            &[],
        ))
    };
    // Allowed: bytes go both ways and are in the recording.
    let g = e.bg.grant("alice", "web-fwd", "ops", "10m");
    let local = free_port();
    let client = fwd("web-fwd", &g.token, local);
    let answer = poll(Duration::from_secs(20), || {
        through_forward(local, "select 1;\n").filter(|a| !a.is_empty())
    });
    assert_eq!(answer.as_deref(), Some("SELECT 1;\n"));
    let live = e.live_session(&g);
    let sid = live["session_id"].as_str().expect("sid").to_string();
    let out = e.bg.post(
        "alice",
        &format!("/v1/requests/{}/revoke", g.id),
        json!({"reason": "done"}),
    );
    assert_eq!(out.0, 200, "{:?}", out.1);
    let _ = client.wait(Duration::from_secs(20));
    let rec = e.bg.recording(&sid);
    let forward = kinds(&rec, "forward");
    assert_eq!(forward.len(), 1, "{rec:#?}");
    assert_eq!(forward[0]["host"], "127.0.0.1");
    assert_eq!(forward[0]["port"], u64::from(echo));
    let sent: String = kinds(&rec, "forward_in")
        .iter()
        .map(|x| x["data"].as_str().unwrap_or("").to_string())
        .collect();
    let came: String = kinds(&rec, "forward_out")
        .iter()
        .map(|x| x["data"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        (sent.as_str(), came.as_str()),
        ("select 1;\n", "SELECT 1;\n")
    );
    // Forwarded bytes are not terminal output: the cast holds none.
    assert!(
        kinds(&rec, "o").is_empty() && kinds(&rec, "i").is_empty(),
        "{rec:#?}"
    );

    // Remote forwarding: the target listens, the client's side answers.
    let g = e.bg.grant("alice", "web-fwd", "ops", "10m");
    let (remote, client) = remote_forward(&e, &g, echo);
    let answer = poll(Duration::from_secs(20), || {
        through_forward(remote, "ping\n").filter(|a| !a.is_empty())
    });
    assert_eq!(answer.as_deref(), Some("PING\n"));
    let sid = e.live_session(&g)["session_id"]
        .as_str()
        .expect("sid")
        .to_string();
    revoke_and_wait(&e, &g, client);
    let rec = e.bg.recording(&sid);
    let listening = kinds(&rec, "remote_forward");
    assert_eq!(listening.len(), 1, "{rec:#?}");
    assert_eq!(listening[0]["port"], u64::from(remote));
    let forward = kinds(&rec, "forward");
    assert!(
        forward
            .iter()
            .any(|f| f["remote"] == true && f["port"] == u64::from(remote)),
        "{forward:#?}"
    );
    let text = |kind: &str| -> String {
        kinds(&rec, kind)
            .iter()
            .map(|x| x["data"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(
        (text("forward_out"), text("forward_in")),
        ("ping\n".to_string(), "PING\n".to_string())
    );

    // Not allowed: the connection is refused and the refusal recorded.
    let g = e.bg.grant("bob", "web", "ops", "10m");
    let local = free_port();
    let client = fwd("web", &g.token, local);
    let live = e.live_session(&g);
    let sid = live["session_id"].as_str().expect("sid").to_string();
    // The client may still be setting up its listener after sign-in: try
    // until a connection reached the gateway and was refused.
    let refused = poll(Duration::from_secs(20), || {
        let answer = through_forward(local, "select 1;\n");
        assert!(answer.as_deref().is_none_or(str::is_empty), "{answer:?}");
        let r: Vec<Value> = kinds(&e.bg.recording(&sid), "refused");
        (!r.is_empty()).then_some(r)
    })
    .expect("the refusal is recorded");
    assert_eq!(refused[0]["what"], "port_forwarding");
    assert!(
        refused[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("port_forwarding = false"),
        "{refused:#?}"
    );
    drop(client);
    // A remote forward is refused at once: the client exits.
    let spec = format!("{}:127.0.0.1:{echo}", free_port());
    let out = run(&mut e.ssh_with(
        "web",
        &g.token,
        &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec],
        &[],
    ));
    assert_eq!(out.code, 255, "{out:#?}");
    // ... for the role's reason, not any other (the same grant signed in).
    let why = poll(Duration::from_secs(10), || {
        e.bg.sessions("bob", &g.id)
            .iter()
            .flat_map(|s| e.bg.recording(s["session_id"].as_str().unwrap_or("")))
            .filter(|x| x["kind"] == "refused")
            .find_map(|x| {
                x["detail"]
                    .as_str()
                    .filter(|d| d.starts_with("remote port forwarding"))
                    .map(String::from)
            })
    })
    .expect("the remote forward's refusal is recorded");
    assert!(why.contains("port_forwarding = false"), "{why}");
}

/// Opens a connection to `port`, sends `line` and reads the echo; the
/// connection is kept open when the echo came back (None otherwise).
fn held_through_forward(port: u16, line: &str) -> Option<std::net::TcpStream> {
    exchange(port, line)
        .filter(|(_, got)| *got == line.to_ascii_uppercase().as_bytes())
        .map(|(c, _)| c)
}

#[test]
fn connections_a_target_forwards_back_are_bounded_per_connection_and_the_rest_refused() {
    let e = env();
    let echo = shouting_echo();
    let g = e.bg.grant("alice", "web-fwd", "ops", "10m");
    // `-N`: no session channel, so every channel of the connection is a
    // forwarded one; the gateway allows 10 (the default).
    let (remote, client) = remote_forward(&e, &g, echo);
    let first = poll(Duration::from_secs(20), || {
        held_through_forward(remote, "ping\n")
    })
    .expect("the remote forward answers");
    let mut held = vec![first];
    let mut turned_away = 0;
    // Whoever connects on the target's side, one at a time, each kept open.
    for i in 0..11 {
        match held_through_forward(remote, &format!("conn {i}\n")) {
            Some(c) => held.push(c),
            None => turned_away += 1,
        }
    }
    assert_eq!((held.len(), turned_away), (10, 2));
    let sid = e.live_session(&g)["session_id"]
        .as_str()
        .expect("sid")
        .to_string();
    let refused: Vec<Value> = kinds(&e.bg.recording(&sid), "refused")
        .into_iter()
        .filter(|r| r["detail"] == "too many channels on this connection")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(refused.iter().all(|r| r["what"] == "port_forwarding"));
    // A slot given back is taken again.
    drop(held.pop());
    let again = poll(Duration::from_secs(10), || {
        held_through_forward(remote, "again\n")
    });
    assert!(again.is_some(), "a closed channel frees its slot");
    revoke_and_wait(&e, &g, client);
}

#[test]
fn garbage_endless_versions_failed_negotiations_and_idle_sockets_are_dropped_alone() {
    let e = env();
    // A session that runs through everything below and must not notice.
    let g = e.bg.grant("alice", "web", "ops", "10m");
    let mut steady = e.ssh("web", &g.token, &["sleep 4; echo still here"]);
    let steady = Spawned::spawn(steady.stdin(Stdio::null()));
    let connect = || gateway_support::Raw::connect(e.bg.gw_port);

    // Garbage instead of a version line.
    let mut c = connect();
    c.try_send(&[0x00, 0xff, 0x13, 0x37].repeat(300));
    let (_, closed) = c.read_to_close(Duration::from_secs(10));
    assert!(closed, "garbage was not dropped");

    // A version line that never ends: dropped long before the handshake
    // timeout could matter, whatever is still being sent.
    let mut c = connect();
    let mut endless = b"SSH-2.0-".to_vec();
    endless.extend(std::iter::repeat_n(b'a', 64 * 1024));
    c.try_send(&endless);
    let (_, closed) = c.read_to_close(Duration::from_secs(10));
    assert!(closed, "an endless version line was not dropped");

    // Nothing at all: dropped at the handshake timeout (3 s here).
    let mut idle = connect();
    let t0 = Instant::now();
    let (said, closed) = idle.read_to_close(Duration::from_secs(15));
    assert!(closed, "an idle socket was kept");
    assert!(
        said.starts_with(b"SSH-2.0-breakglass"),
        "{:?}",
        String::from_utf8_lossy(&said)
    );
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());

    // Algorithms the gateway does not speak: the negotiation fails at
    // once (not at a timeout) and no session starts.
    // By default the gateway offers AES-GCM alone: a client that only
    // speaks ChaCha20-Poly1305 or AES-CTR is refused the same way.
    for opt in [
        "Ciphers=3des-cbc",
        "Ciphers=chacha20-poly1305@openssh.com",
        "Ciphers=aes128-ctr",
        "KexAlgorithms=diffie-hellman-group1-sha1",
    ] {
        // `-v`: the client says why at its info level, under LogLevel=ERROR.
        let out = run(&mut e.ssh_with("web", &g.token, &["-v", "-o", opt], &["true"]));
        assert_eq!(out.code, 255, "{opt}: {out:#?}");
        assert!(out.elapsed < Duration::from_secs(2), "{opt}: {out:#?}");
        // (This client no longer speaks 3des-cbc itself.)
        if opt.starts_with("Ciphers=") && opt != "Ciphers=3des-cbc" {
            assert!(out.stderr.contains("no matching cipher"), "{opt}: {out:#?}");
        }
    }
    // Either AES-GCM goes through.
    for opt in [
        "Ciphers=aes128-gcm@openssh.com",
        "Ciphers=aes256-gcm@openssh.com",
    ] {
        let out = run(&mut e.ssh_with("web", &g.token, &["-o", opt], &["echo gcm"]));
        assert_eq!((out.code, out.stdout.trim()), (0, "gcm"), "{opt}: {out:#?}");
    }
    assert_eq!(
        e.bg.sessions("alice", &g.id).len(),
        3,
        "only the steady session and the two AES-GCM ones started"
    );

    // Through all of it, the session went on; and the gateway still
    // serves new ones.
    let out = steady.wait(Duration::from_secs(30));
    assert_eq!((out.code, out.stdout.trim()), (0, "still here"), "{out:#?}");
    let out = run(&mut e.ssh("web", &g.token, &["echo again"]));
    assert_eq!((out.code, out.stdout.trim()), (0, "again"), "{out:#?}");
}

/// Runs `sleep 60` through the gateway; returns the running client.
fn sleeper(e: &Env, g: &Grant) -> Spawned {
    let mut cmd = e.ssh("web", &g.token, &["sleep 60"]);
    cmd.stdin(Stdio::null());
    let child = Spawned::spawn(&mut cmd);
    e.live_session(g);
    child
}

#[test]
fn sessions_are_cut_at_revoke_and_at_expiry_while_sleep_runs() {
    let e = env();
    let g = e.bg.grant("alice", "web", "ops", "10m");
    let client = sleeper(&e, &g);
    let revoked_at = Instant::now();
    let (st, r) = e.bg.post(
        "carol",
        &format!("/v1/requests/{}/revoke", g.id),
        json!({"reason": "ssh cut test"}),
    );
    assert_eq!(st, 200, "{r}");
    let out = client.wait(Duration::from_secs(20));
    let took = revoked_at.elapsed();
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(
        out.stderr
            .contains("breakglass: the grant has ended (revoked by carol)"),
        "{out:#?}"
    );
    assert!(took < Duration::from_secs(10), "cut took {took:?}");
    let s = e.ended_session(&g);
    assert_eq!(s["end_reason"], "revoked");

    // Expiry, with the sleep still running on the target.
    let g = e.bg.grant("bob", "web", "ops", "4s");
    let client = sleeper(&e, &g);
    let out = client.wait(Duration::from_secs(20));
    let late = gateway_support::now_ms() - g.expires_at_ms;
    assert!(out.stderr.contains("the grant expired"), "{out:#?}");
    assert!(late < 5000, "ended {late} ms after expiry");
    let s = e.ended_session(&g);
    assert_eq!(s["end_reason"], "expired");
    let rec = e.bg.recording(s["session_id"].as_str().expect("sid"));
    assert_eq!(rec.last().expect("end")["reason"], "expired");
}

#[test]
fn kill_9_during_a_session_then_recovery_and_verify() {
    let mut e = env();
    let g = e.bg.grant("alice", "web", "ops", "10m");
    let client = sleeper(&e, &g);
    let s = e.live_session(&g);
    let sid = s["session_id"].as_str().expect("sid").to_string();
    e.bg.kill9();
    // The client sees its connection drop.
    let out = client.wait(Duration::from_secs(20));
    assert_ne!(out.code, 0);
    assert_eq!(e.bg.open_markers(), vec![format!("{sid}.open")]);
    e.bg.restart_after_kill9(1);
    let s = e.ended_session(&g);
    assert_eq!(s["end_reason"], "service_restart");
    assert!(e.bg.open_markers().is_empty());
    let config = e.bg.config_path().display().to_string();
    e.bg.kill9();
    let out = e.bg.cli(None, &["audit", "verify", "--config", &config]);
    assert_eq!(out.code, 0, "{out:#?}");
}

#[test]
fn connect_runs_ssh_with_the_grant_and_returns_the_command_status() {
    let e = env();
    let g = e.bg.grant("alice", "web", "ops", "10m");
    let out = e.bg.cli(
        Some("alice"),
        &["connect", &g.id, "--", "echo via-connect; exit 5"],
    );
    assert_eq!(out.code, 5, "{out:#?}");
    assert_eq!(out.stdout, "via-connect\n", "{out:#?}");
    // The token never shows in the output.
    assert!(!out.stderr.contains(&g.token) && !out.stdout.contains(&g.token));
    let s = e.ended_session(&g);
    let rec = e.bg.recording(s["session_id"].as_str().expect("sid"));
    assert_eq!(
        kinds(&rec, "exec")[0]["command"],
        "echo via-connect; exit 5"
    );
    // `connect` signed in with a certificate for a key of its own: the
    // credential it was issued names the key, and ssh offered nothing but
    // that key (PreferredAuthentications=publickey).
    let issued: Vec<Value> =
        e.bg.audit()
            .into_iter()
            .filter(|x| x["action"] == "credentials.issued" && x["request_id"] == json!(g.id))
            .collect();
    let last = issued.last().expect("connect's credential");
    assert!(
        last["details"]["ssh_certificate_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("SHA256:")),
        "{last}"
    );
}

impl Env {
    /// alice's credentials for grant `id` with a certificate for `public`,
    /// written to `path`; the whole answer (token, certificate).
    fn certify(&self, id: &str, public: &str, path: &Path) -> Value {
        let (st, c) = self.bg.post(
            "alice",
            &format!("/v1/requests/{id}/credentials"),
            json!({"ssh_public_key": public}),
        );
        assert_eq!(st, 200, "{c}");
        let cert = c["ssh_certificate"].as_str().expect("a certificate");
        std::fs::write(path, format!("{cert}\n")).expect("certificate file");
        c
    }

    /// `ssh` to `target` through the gateway with a key and certificate
    /// only (no password method, no agent).
    fn ssh_cert(&self, target: &str, key: &Path, cert: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(cert_options(key, cert))
            .args(["-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-p"])
            .arg(self.bg.gw_port.to_string())
            .arg(format!("{target}@127.0.0.1"))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }
}

/// Client options that sign in with `key` and its certificate `cert` only
/// (no password method, no agent, no other key), to a gateway whose host
/// key the test does not pin.
fn cert_options(key: &Path, cert: &Path) -> Vec<std::ffi::OsString> {
    let mut o: Vec<std::ffi::OsString> =
        vec!["-F".into(), "/dev/null".into(), "-i".into(), key.into()];
    for opt in [
        format!("CertificateFile={}", cert.display()),
        "IdentitiesOnly=yes".into(),
        "IdentityAgent=none".into(),
        "PreferredAuthentications=publickey".into(),
        "StrictHostKeyChecking=no".into(),
        "UserKnownHostsFile=/dev/null".into(),
    ] {
        o.push("-o".into());
        o.push(opt.into());
    }
    o
}

/// A grant on `web-files` with a signed client certificate, and a local
/// file of `len` bytes that are not all alike (so a hash means something).
struct SftpFixture {
    grant: Grant,
    cert: PathBuf,
    key: PathBuf,
    body: Vec<u8>,
    local: PathBuf,
}

impl SftpFixture {
    fn new(e: &Env, len: u32) -> SftpFixture {
        let d = e.bg.dir.path();
        let key = d.join("client");
        let public = keygen(&key).expect("client key");
        let grant = e.bg.grant("alice", "web-files", "ops", "10m");
        let cert = d.join("client-cert.pub");
        e.certify(&grant.id, &public, &cert);
        let body: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let local = d.join("up.bin");
        std::fs::write(&local, &body).expect("local file");
        SftpFixture {
            grant,
            cert,
            key,
            body,
            local,
        }
    }

    /// `sftp -b` with `batch` and `opts` through the gateway, as the
    /// grant's holder.
    fn sftp(&self, e: &Env, opts: &[&str], batch: &str) -> Command {
        let file = e.bg.dir.path().join("batch");
        std::fs::write(&file, batch).expect("batch");
        let mut cmd = Command::new("sftp");
        cmd.arg("-b")
            .arg(&file)
            .args(opts)
            .args(cert_options(&self.key, &self.cert))
            .arg("-P")
            .arg(e.bg.gw_port.to_string())
            .arg("web-files@127.0.0.1");
        cmd
    }
}

#[test]
fn sftp_transfers_are_recorded_with_path_direction_size_and_sha256_when_the_role_allows_them() {
    use sha2::Digest as _;
    let e = env();
    let d = e.bg.dir.path();
    // 300 KB that are not all alike, so the hash means something.
    let f = SftpFixture::new(&e, 300_000);
    let (body, local) = (&f.body, &f.local);
    let remote = format!("/tmp/bg-sftp-{}.bin", std::process::id());
    let out = run(&mut f.sftp(
        &e,
        &[],
        &format!(
            "put {} {remote}\nget {remote} {}\nrename {remote} {remote}.2\nrm {remote}.2\n",
            local.display(),
            d.join("down.bin").display()
        ),
    ));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(
        &std::fs::read(d.join("down.bin")).expect("downloaded"),
        body
    );
    let s = e.ended_session(&f.grant);
    let rec = e.bg.recording(s["session_id"].as_str().expect("sid"));
    let sha = hex::encode(sha2::Sha256::digest(body));
    let files = kinds(&rec, "file");
    let summary: Vec<(String, String, u64, String, bool)> = files
        .iter()
        .map(|f| {
            (
                f["direction"].as_str().unwrap_or("").to_string(),
                f["path"].as_str().unwrap_or("").to_string(),
                f["size"].as_u64().unwrap_or(0),
                f["sha256"].as_str().unwrap_or("").to_string(),
                f["closed"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "upload".into(),
                remote.clone(),
                body.len() as u64,
                sha.clone(),
                true
            ),
            (
                "download".into(),
                remote.clone(),
                body.len() as u64,
                sha,
                true
            ),
        ],
        "{rec:#?}"
    );
    let ops: Vec<(String, String)> = kinds(&rec, "sftp")
        .iter()
        .map(|o| {
            (
                o["op"].as_str().unwrap_or("").to_string(),
                o["path"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(ops.contains(&("rename".into(), remote.clone())), "{ops:?}");
    assert!(
        ops.contains(&("remove".into(), format!("{remote}.2"))),
        "{ops:?}"
    );
    // File contents are not in the recording: no input or output entries.
    assert!(
        kinds(&rec, "i").is_empty() && kinds(&rec, "o").is_empty(),
        "{rec:#?}"
    );
}

#[test]
fn an_upload_cut_by_kill_9_of_the_client_is_recorded_as_far_as_it_went() {
    use sha2::Digest as _;
    let e = env();
    // 8 MB at 4 Mbit/s (`-l`): about 16 s, cut after the first 256 KB.
    let f = SftpFixture::new(&e, 8_000_000);
    let (g, body) = (&f.grant, &f.body);
    let remote = format!("/tmp/bg-sftp-cut-{}.bin", std::process::id());
    let mut cmd = f.sftp(
        &e,
        &["-l", "4000"],
        &format!("put {} {remote}\n", f.local.display()),
    );
    cmd.stdin(Stdio::null());
    let client = Spawned::spawn(&mut cmd);
    let grown = poll(Duration::from_secs(20), || {
        std::fs::metadata(&remote)
            .ok()
            .filter(|m| m.len() >= 256 * 1024)
    });
    assert!(grown.is_some(), "the upload did not start");
    // The transport is `ssh`, a child of `sftp`: killed first, it cannot
    // close its channel; the gateway sees the connection drop mid-write.
    let transports = os::children(client.pid());
    assert!(!transports.is_empty(), "sftp runs ssh as its child");
    for pid in transports {
        os::signal(pid, "KILL");
    }
    os::signal(client.pid(), "KILL");
    let out = client.wait(Duration::from_secs(20));
    assert_ne!(out.code, 0, "{out:#?}");
    let s = e.ended_session(g);
    let rec = e.bg.recording(s["session_id"].as_str().expect("sid"));
    let files = kinds(&rec, "file");
    assert_eq!(files.len(), 1, "{files:#?}");
    let f = &files[0];
    assert_eq!(f["direction"], "upload", "{f}");
    assert_eq!(f["path"], remote.as_str(), "{f}");
    assert_eq!(f["closed"], false, "the handle was never closed: {f}");
    let size = f["size"].as_u64().expect("size");
    assert!(
        size >= 256 * 1024 && size < body.len() as u64,
        "recorded {size} of {} bytes",
        body.len()
    );
    // What the recording vouches for is exactly the file's first bytes.
    let prefix = &body[..usize::try_from(size).expect("size fits")];
    assert_eq!(
        f["sha256"].as_str(),
        Some(hex::encode(sha2::Sha256::digest(prefix)).as_str()),
        "{f}"
    );
    // Nothing reached the target that the recording does not hold.
    let on_target = std::fs::read(&remote).expect("the partial upload");
    let _ = std::fs::remove_file(&remote);
    assert!(
        on_target.len() as u64 <= size,
        "{} bytes on the target, {size} recorded",
        on_target.len()
    );
    assert_eq!(on_target, prefix[..on_target.len()], "the target's bytes");
    assert_eq!(s["end_reason"], "client_closed", "{s}");
}

#[test]
fn a_certificate_stands_for_its_credential_only_on_its_target_and_only_while_the_grant_lives() {
    let e = env();
    let d = e.bg.dir.path();
    let public = keygen(&d.join("client")).expect("client key");
    let g = e.bg.grant("alice", "web", "ops", "10m");
    let cert_path = d.join("client-cert.pub");
    let c = e.certify(&g.id, &public, &cert_path);
    let cert = c["ssh_certificate"].as_str().expect("a certificate");
    assert!(
        cert.starts_with("ssh-ed25519-cert-v01@openssh.com "),
        "{cert}"
    );
    assert!(!cert.contains(c["token"].as_str().expect("token")));
    let key = d.join("client");
    let out = run(&mut e.ssh_cert("web", &key, &cert_path, &["echo cert-ok"]));
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "cert-ok\n"),
        "{out:#?}"
    );
    // What ssh-keygen reads in it: the target as principal, the grant as key id.
    let shown = run(Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(&cert_path));
    assert!(
        shown.stdout.contains(&format!("breakglass:alice:{}", g.id)),
        "{shown:#?}"
    );
    assert!(shown.stdout.contains("credential@breakglass"), "{shown:#?}");

    // Each refusal below is the gateway's, for its own reason (ssh exits
    // 255 for any failure, its own ones included): the server logs the
    // reason before the client is told.
    let refused = |why: &str| e.bg.stderr().matches(why).count();

    // Another target, with the same certificate: refused.
    let before = refused("not a certificate for this target");
    let out = run(&mut e.ssh_cert("web-key", &key, &cert_path, &["true"]));
    assert_eq!(out.code, 255, "{out:#?}");
    assert!(
        refused("not a certificate for this target") > before,
        "{out:#?}"
    );

    // A certificate from a CA that is not the service's: refused, even
    // when it names the hash of a live credential (the holder of a token
    // knows its hash).
    let token_hash = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(
            c["token"].as_str().expect("token").as_bytes(),
        ))
    };
    let other_ca = d.join("other_ca");
    keygen(&other_ca).expect("other CA");
    let forged = run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&other_ca)
        .args(["-I", "forged", "-n", "web", "-O"])
        .arg(format!("extension:credential@breakglass={token_hash}"))
        .arg(d.join("client.pub")));
    assert_eq!(forged.code, 0, "{forged:#?}");
    // ssh-keygen wrote the forged certificate over the real one (it
    // names the certificate after the key: `client-cert.pub`).
    let before = refused("not signed by this service's client CA");
    let out = run(&mut e.ssh_cert("web", &key, &cert_path, &["true"]));
    assert_eq!(out.code, 255, "{out:#?}");
    assert!(
        refused("not signed by this service's client CA") > before,
        "{out:#?}"
    );

    // Bad keys are refused with the reason.
    let (st, v) = e.bg.post(
        "alice",
        &format!("/v1/requests/{}/credentials", g.id),
        json!({"ssh_public_key": "ssh-ed25519 not-base64"}),
    );
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("ssh_public_key"),
        "{v}"
    );

    // After the revoke, a certificate of the grant opens nothing.
    let g2 = e.bg.grant("alice", "web", "ops", "10m");
    e.certify(&g2.id, &public, &cert_path);
    let out = run(&mut e.ssh_cert("web", &key, &cert_path, &["true"]));
    assert_eq!(out.code, 0, "{out:#?}");
    let (st, v) = e.bg.post(
        "alice",
        &format!("/v1/requests/{}/revoke", g2.id),
        json!({"reason": "done"}),
    );
    assert_eq!(st, 200, "{v}");
    let before = refused("ssh sign-in refused");
    let out = run(&mut e.ssh_cert("web", &key, &cert_path, &["true"]));
    assert_eq!(out.code, 255, "{out:#?}");
    assert!(refused("ssh sign-in refused") > before, "{out:#?}");
}

#[test]
fn a_drill_on_an_ssh_target_runs_true_through_the_gateway_and_sees_the_cut() {
    // Two drills: one on `web`, one on the target whose pinned host key is
    // not the upstream's. `every` is long, so only the manual runs happen.
    let e = start_with(
        |d| keygen(&d.join("ssh_ca")).expect("ca"),
        |d| {
            std::fs::write(d.join("alice.token"), gateway_support::token("alice"))
                .expect("token file");
            let drill = |name: &str, target: &str| {
                format!(
                    "[[drills]]\nname = \"{name}\"\nevery = \"30d\"\ntarget = \"{target}\"\n\
                     role = \"ops\"\nduration = \"2m\"\nstep_timeout = \"15s\"\n\
                     requester = {{ principal = \"alice\", token_file = \"alice.token\" }}\n\n"
                )
            };
            drill("ssh-canary", "web") + &drill("ssh-wrong-key", "web-pinned-wrong")
        },
    );
    let out = e.bg.cli(Some("carol"), &["drill", "run", "ssh-canary"]);
    assert_eq!(out.code, 0, "{out:#?}\n{}", e.bg.stderr());
    for step in [
        "request",
        "credentials",
        "session",
        "revoke",
        "recording",
        "chain",
    ] {
        assert!(
            out.stdout.contains(step),
            "step {step} shown: {}",
            out.stdout
        );
    }
    let done: Vec<Value> =
        e.bg.audit()
            .into_iter()
            .filter(|v| v["action"] == "drill.completed")
            .collect();
    assert_eq!(done.len(), 1, "{done:?}");
    let run = &done[0]["details"];
    assert_eq!(run["result"], "pass", "{run}");
    assert!(
        run["time_to_first_statement_ms"].as_f64().is_some(),
        "{run}"
    );
    assert!(run["cut_latency_ms"].as_f64().is_some(), "{run}");
    // The session went through the gateway, ran `true`, and was cut when
    // the grant ended.
    let session_id = run["session_id"]
        .as_str()
        .expect("the run names its session");
    let rec = e.bg.recording(session_id);
    let execs = kinds(&rec, "exec");
    assert_eq!(execs.len(), 1, "{rec:?}");
    assert_eq!(execs[0]["command"], "true");
    let request_id = run["request_id"]
        .as_str()
        .expect("the run names its request");
    let sessions = e.bg.sessions("alice", request_id);
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    // The drill's requester ends its own grant: a release.
    assert_eq!(sessions[0]["end_reason"], "released", "{sessions:?}");

    // A drill whose target's host key is not the pinned one fails at the
    // session step, saying so, and leaves no grant open.
    let out = e.bg.cli(Some("carol"), &["drill", "run", "ssh-wrong-key"]);
    assert_eq!(out.code, 1, "{out:#?}");
    let said = format!("{}{}", out.stdout, out.stderr);
    let failed: Vec<&str> = said
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED"))
        .collect();
    assert_eq!(failed.len(), 1, "{said}");
    assert!(failed[0].trim_start().starts_with("session "), "{said}");
    assert!(said.contains("not the pinned"), "{said}");
    let last =
        e.bg.audit()
            .into_iter()
            .rfind(|v| v["action"] == "drill.completed")
            .expect("a completed run");
    assert_eq!(last["details"]["drill"], "ssh-wrong-key");
    assert_eq!(last["details"]["failed_step"], "session", "{last}");
    let (_, list) = e.bg.get("carol", "/v1/requests?state=active");
    assert_eq!(list["requests"], json!([]), "{list}");
}
