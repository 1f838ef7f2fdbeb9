//! The README's quick start, literally: `breakglass serve --dev` as a real
//! process with its demo database, the exports and the three commands its
//! banner prints run as Alice and Bob, a `psql` statement through
//! `connect` that lands in the recording, a revoke that cuts a live
//! session, and a SIGTERM after which the temp dir and the cluster are gone.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{BIN, CliOutput, Server, free_port, poll, wait_cli};
use serde_json::Value;

/// How long `serve --dev` may take to print its banner (initdb included).
const BANNER_TIMEOUT: Duration = Duration::from_secs(90);

/// Stops the dev server with SIGTERM when the test ends early, so its demo
/// cluster is stopped too (a SIGKILL would leave the cluster running).
struct DevServer(Server);

impl Drop for DevServer {
    fn drop(&mut self) {
        if self.0.try_wait().is_none() {
            let _ = self.0.terminate(Duration::from_secs(30));
        }
    }
}

/// The banner: the exported variables and the commands to run, in order.
struct Banner {
    exports: Vec<(String, String)>,
    commands: Vec<Vec<String>>,
    config: PathBuf,
}

impl Banner {
    fn var(&self, name: &str) -> &str {
        self.exports
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the banner exports no {name}"))
    }
}

/// Splits a shell line into words: spaces separate, double quotes group.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

fn parse_banner(text: &str) -> Banner {
    let mut exports = Vec::new();
    let mut commands = Vec::new();
    let mut config = None;
    let mut in_commands = false;
    for line in text.lines() {
        let trimmed = line.trim();
        in_commands |= line.starts_with("Then");
        if let Some(rest) = trimmed.strip_prefix("export ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("export NAME=VALUE");
                exports.push((k.to_string(), v.to_string()));
            }
        } else if in_commands && trimmed.starts_with("breakglass ") && line.starts_with("  ") {
            // `breakglass approve ID     (as bob)`: the note is not part of it.
            let command = trimmed.split("  (").next().unwrap_or(trimmed).trim_end();
            commands.push(shell_words(command));
        } else if let Some(path) = trimmed.strip_prefix("Config:") {
            config = Some(PathBuf::from(path.trim()));
        }
    }
    Banner {
        exports,
        commands,
        config: config.expect("the banner names the config"),
    }
}

/// The CLI as a user runs it after pasting the exports: `BREAKGLASS_URL`
/// and `BREAKGLASS_TOKEN` from the environment, no flags added.
fn cli(banner: &Banner, who: &str, words: &[String]) -> Command {
    let (program, args) = words.split_first().expect("a command");
    assert_eq!(program, "breakglass");
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("BREAKGLASS_URL", banner.var("BREAKGLASS_URL"))
        .env("BREAKGLASS_TOKEN", banner.var(who))
        .env_remove("BREAKGLASS_LOG")
        .env("NO_COLOR", "1")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run(banner: &Banner, who: &str, words: &[String]) -> CliOutput {
    let child = cli(banner, who, words).spawn().expect("spawn the CLI");
    wait_cli(child, Duration::from_secs(60))
}

fn words(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn with_id(command: &[String], id: &str) -> Vec<String> {
    command
        .iter()
        .map(|w| if w == "ID" { id.to_string() } else { w.clone() })
        .collect()
}

/// Spawns `request ... --wait` and returns the child with the request id
/// it printed while waiting.
fn request_and_wait(banner: &Banner, words: &[String]) -> (Child, String, mpsc::Receiver<String>) {
    let mut child = cli(banner, "ALICE", words).spawn().expect("spawn request");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("request --wait printed no request id");
        };
        if let Some(rest) = line.strip_prefix("Request ")
            && let Some(id) = rest.split_whitespace().next()
            && rest.contains("pending")
        {
            return (child, id.to_string(), rx);
        }
    }
}

fn wait_child(mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn quick_start_from_the_banner_to_a_cut_session() {
    assert!(
        breakglass_testkit::pg_bin_dir().is_ok(),
        "PostgreSQL's server is not installed; `cargo xtask test` installs it"
    );
    let logs = tempfile::tempdir().expect("log dir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = DevServer(Server::spawn_args(
        &["serve", "--dev", "--listen", &listen],
        logs.path(),
        &format!("http://{listen}"),
    ));

    // 1. The banner, once the server is ready.
    let text = poll(BANNER_TIMEOUT, || {
        if let Some(st) = server.0.try_wait() {
            panic!("serve --dev exited ({st}); stderr:\n{}", server.0.stderr());
        }
        let err = server.0.stderr();
        err.contains("breakglass connect ID").then_some(err)
    })
    .unwrap_or_else(|| panic!("no banner; stderr:\n{}", server.0.stderr()));
    assert!(!text.contains("PostgreSQL is not installed"), "{text}");
    let banner = parse_banner(&text);
    assert_eq!(banner.var("BREAKGLASS_URL"), format!("http://{listen}"));
    let dev_dir = banner
        .config
        .parent()
        .expect("config in the dev dir")
        .to_path_buf();
    assert!(dev_dir.is_dir(), "{}", dev_dir.display());
    assert_eq!(banner.commands.len(), 3, "{text}");
    let [request, approve, connect] = [
        banner.commands[0].clone(),
        banner.commands[1].clone(),
        banner.commands[2].clone(),
    ];
    assert_eq!(request[1], "request", "{request:?}");
    assert!(request.iter().any(|w| w == "--wait"), "{request:?}");
    assert_eq!(approve, words(&["breakglass", "approve", "ID"]));
    assert_eq!(connect, words(&["breakglass", "connect", "ID"]));
    // The demo passwords stay with the server: not in the banner.
    for secret in std::fs::read_dir(dev_dir.join("secrets")).expect("secrets dir") {
        let path = secret.expect("entry").path();
        let pw = std::fs::read_to_string(&path).expect("password file");
        assert!(!pw.is_empty() && !text.contains(&pw), "{}", path.display());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }

    // 2. Alice asks and waits; Bob approves; Alice's wait ends with exit 0.
    let (waiting, id, lines) = request_and_wait(&banner, &request);
    let out = run(&banner, "BOB", &with_id(&approve, &id));
    assert_eq!(out.code, 0, "approve: {}{}", out.stdout, out.stderr);
    let st = wait_child(waiting, Duration::from_secs(30));
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(st.success(), "request --wait: {st}; {rest:?}");

    // 3. A statement through the gateway.
    let mut count = with_id(&connect, &id);
    count.extend(words(&["--", "-c", "select count(*) from orders"]));
    let out = run(&banner, "ALICE", &count);
    assert_eq!(out.code, 0, "connect: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("50"), "{}", out.stdout);

    // 4. The statement is in the recording.
    let out = run(
        &banner,
        "ALICE",
        &words(&["breakglass", "sessions", &id, "--output", "json"]),
    );
    assert_eq!(out.code, 0, "sessions: {}", out.stderr);
    let sessions: Value = serde_json::from_str(&out.stdout).expect("sessions JSON");
    let session = sessions["sessions"][0]["session_id"]
        .as_str()
        .expect("a session")
        .to_string();
    let out = run(
        &banner,
        "ALICE",
        &words(&["breakglass", "recording", &session, "--output", "json"]),
    );
    assert_eq!(out.code, 0, "recording: {}", out.stderr);
    assert!(
        out.stdout.contains("select count(*) from orders"),
        "{}",
        out.stdout
    );

    // 5. Revoke: a live session is cut with the grant-ended FATAL.
    let mut sleep = with_id(&connect, &id);
    sleep.extend(words(&["--", "-c", "select pg_sleep(30)"]));
    let sleeper = cli(&banner, "ALICE", &sleep)
        .spawn()
        .expect("spawn connect");
    let started = Instant::now();
    let live = poll(Duration::from_secs(20), || {
        let out = run(
            &banner,
            "ALICE",
            &words(&["breakglass", "sessions", &id, "--output", "json"]),
        );
        let v: Value = serde_json::from_str(&out.stdout).ok()?;
        let open = v["sessions"]
            .as_array()?
            .iter()
            .filter(|s| s["ended_at"].is_null())
            .count();
        (open == 1).then_some(())
    });
    assert!(live.is_some(), "the pg_sleep session never showed up");
    let out = run(
        &banner,
        "CAROL",
        &words(&["breakglass", "revoke", &id, "--reason", "fixed"]),
    );
    assert_eq!(out.code, 0, "revoke: {}{}", out.stdout, out.stderr);
    let cut = wait_cli(sleeper, Duration::from_secs(20));
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the session ran its pg_sleep out"
    );
    assert_ne!(cut.code, 0, "{}", cut.stdout);
    assert!(
        cut.stderr.contains("the grant has ended"),
        "psql stderr: {}",
        cut.stderr
    );

    // 6. SIGTERM: the server exits cleanly and leaves nothing behind.
    let st = server
        .0
        .terminate(Duration::from_secs(30))
        .expect("serve --dev did not exit after SIGTERM");
    assert!(st.success(), "{st}; stderr:\n{}", server.0.stderr());
    assert!(
        !dev_dir.exists(),
        "{} still exists after exit",
        dev_dir.display()
    );
}

#[test]
fn keep_leaves_the_dev_dir_and_says_where() {
    let logs = tempfile::tempdir().expect("log dir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = DevServer(Server::spawn_args(
        &["serve", "--dev", "--keep", "--listen", &listen],
        logs.path(),
        &format!("http://{listen}"),
    ));
    let text = poll(BANNER_TIMEOUT, || {
        if let Some(st) = server.0.try_wait() {
            panic!("serve --dev exited ({st}); stderr:\n{}", server.0.stderr());
        }
        let err = server.0.stderr();
        err.contains("breakglass connect ID").then_some(err)
    })
    .unwrap_or_else(|| panic!("no banner; stderr:\n{}", server.0.stderr()));
    let banner = parse_banner(&text);
    let dev_dir = banner.config.parent().expect("dev dir").to_path_buf();
    assert!(
        text.contains(&format!("kept on exit in {}", dev_dir.display())),
        "{text}"
    );
    let st = server
        .0
        .terminate(Duration::from_secs(30))
        .expect("serve --dev did not exit after SIGTERM");
    assert!(st.success(), "{st}");
    let stderr = server.0.stderr();
    assert!(
        stderr.contains(&format!("dev files kept in {}", dev_dir.display())),
        "{stderr}"
    );
    assert!(banner.config.is_file(), "{}", banner.config.display());
    std::fs::remove_dir_all(&dev_dir).expect("remove the kept dir");
}
