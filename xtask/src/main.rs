//! Project automation. `cargo xtask test` is the one command that runs every
//! test (CI runs exactly this); `cargo xtask bench` runs the benchmarks.

use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The system tools the tests start for real, and the Debian package that
/// brings each: PostgreSQL server and client, pgbench, pgbouncer, OpenSSL
/// (test CAs), OpenSSH server and client (the SSH gateway's peers),
/// Chromium (the console's browser tests) and rsyslog (a syslog receiver).
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("/usr/lib/postgresql/*/bin/initdb", "postgresql"),
    ("/usr/lib/postgresql/*/bin/pgbench", "postgresql-contrib"),
    ("/usr/bin/psql", "postgresql"),
    ("/usr/sbin/pgbouncer", "pgbouncer"),
    ("/usr/bin/openssl", "openssl"),
    ("/usr/sbin/sshd", "openssh-server"),
    ("/usr/bin/ssh", "openssh-client"),
    ("/usr/bin/ssh-keygen", "openssh-client"),
    ("/usr/bin/chromium", "chromium"),
    ("/usr/sbin/rsyslogd", "rsyslog"),
];

/// Installs the packages of [`SYSTEM_TOOLS`] whose tool is missing; needs
/// root.
fn ensure_system_packages() -> anyhow::Result<()> {
    let present = |path: &str| match path.split_once("/*/") {
        // One level of wildcard: any version directory.
        Some((dir, rest)) => std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| entry.path().join(rest).is_file()),
        None => std::path::Path::new(path).is_file(),
    };
    let mut missing = Vec::new();
    let mut packages: Vec<&str> = Vec::new();
    for (path, package) in SYSTEM_TOOLS {
        if !present(path) {
            missing.push(*path);
            if !packages.contains(package) {
                packages.push(package);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"));
        uids.and_then(|ids| ids.split_whitespace().nth(1)) == Some("0")
    });
    if !root {
        bail!(
            "the tests need {} (missing); install them with `sudo apt-get install -y {}`",
            missing.join(", "),
            packages.join(" ")
        );
    }
    eprintln!(
        "xtask: missing {}; installing {}",
        missing.join(", "),
        packages.join(" ")
    );
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        eprintln!("xtask: install failed; updating the package lists and retrying");
        run(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    Ok(())
}

/// Runs `cargo test` with the given arguments, echoing its output, and
/// adds up its `test result:` lines.
fn cargo_test(
    args: &[&str],
    node_modules: &std::path::Path,
    python_bin: &std::path::Path,
    passed: &mut u64,
    failed: &mut u64,
) -> anyhow::Result<bool> {
    use std::io::{BufRead, BufReader};
    let mut cmd = cargo();
    cmd.arg("test")
        .args(args)
        // The testkit finds the same directory by itself; the variable
        // makes the choice explicit for every test binary.
        .env("BREAKGLASS_TEST_NODE_MODULES", node_modules)
        // `asciinema` (plays SSH recordings back) from the tools venv.
        .env("BREAKGLASS_TEST_ASCIINEMA", python_bin.join("asciinema"))
        .stdout(std::process::Stdio::piped());
    eprintln!("$ {cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next().map(str::to_owned))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            *passed += count(" passed");
            *failed += count(" failed");
        }
    }
    Ok(child.wait()?.success())
}

/// Where the test identity providers' node modules go: a cache directory
/// named after the lock file's hash, as `breakglass-testkit` computes it.
fn node_install_dir() -> anyhow::Result<std::path::PathBuf> {
    use sha2::Digest;
    let lock = workspace_root().join("crates/testkit/oidc/package-lock.json");
    let bytes = std::fs::read(&lock).with_context(|| format!("cannot read {}", lock.display()))?;
    let hash: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
        _ => std::path::PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache"),
    };
    Ok(cache
        .join("breakglass")
        .join(format!("test-node-{}", &hash[..16])))
}

/// Installs the node modules of the test identity providers
/// (`crates/testkit/oidc`: `oidc-provider`, `jose`) with `npm ci` from the
/// committed lock file when they are missing; returns their
/// `node_modules` directory.
fn ensure_node_modules() -> anyhow::Result<std::path::PathBuf> {
    let dir = node_install_dir()?;
    let modules = dir.join("node_modules");
    let marker = dir.join("installed");
    if marker.is_file() {
        return Ok(modules);
    }
    if Command::new("npm").arg("--version").output().is_err() {
        bail!(
            "the tests need Node.js 20.19 or later with npm (`sudo apt-get install -y nodejs npm`)"
        );
    }
    eprintln!(
        "xtask: installing the test identity provider's node modules into {}",
        dir.display()
    );
    // Installed beside a copy of the manifest and lock file, then marked,
    // so an interrupted install is redone.
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let source = workspace_root().join("crates/testkit/oidc");
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(source.join(file), dir.join(file))
            .with_context(|| format!("cannot copy {file}"))?;
    }
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(&dir))?;
    std::fs::write(&marker, "")?;
    Ok(modules)
}

fn test() -> anyhow::Result<()> {
    ensure_system_packages()?;
    let modules = ensure_node_modules()?;
    let python = python_tools()?;
    // Build everything first so test binaries that start the real
    // `breakglass` binary find it built.
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let (mut passed, mut failed) = (0, 0);
    let units = cargo_test(
        &["--workspace", "--all-targets", "--no-fail-fast"],
        &modules,
        &python,
        &mut passed,
        &mut failed,
    )?;
    // There are no doc tests: `cargo test --doc` would only rebuild every
    // dependency in another mode, minutes on a cold CI machine.
    let fuzz = api_fuzz();
    if let Err(e) = &fuzz {
        eprintln!("xtask: API fuzzing failed: {e:#}");
    }
    // The one closing line a reader (or CI) needs.
    println!(
        "tests: {passed} passed, {failed} failed; API fuzzing (schemathesis): {}",
        if fuzz.is_ok() { "passed" } else { "FAILED" }
    );
    if !units || failed > 0 {
        bail!("tests failed");
    }
    fuzz.context("API fuzzing failed")?;
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The schemathesis release the API is fuzzed with (from PyPI).
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Examples per API operation: enough to find undocumented statuses and
/// rejected valid inputs, small enough for well under two minutes on two
/// cores.
const FUZZ_EXAMPLES_PER_OPERATION: u32 = 25;

/// How long `serve --dev` may take to print its banner.
const DEV_BANNER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// The cargo target directory, as cargo itself resolves it.
fn target_dir() -> anyhow::Result<std::path::PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir()?.join(dir),
        None => workspace_root().join("target"),
    })
}

/// The asciinema release the tests play SSH recordings back with (from
/// PyPI).
const ASCIINEMA_VERSION: &str = "2.4.0";

/// A virtualenv under the target dir with the pinned Python tools the tests
/// use (schemathesis, asciinema); returns its `bin` directory.
fn python_tools() -> anyhow::Result<std::path::PathBuf> {
    let venv = target_dir()?.join("test-venv");
    let bin = venv.join("bin");
    let pins = [
        format!("schemathesis=={SCHEMATHESIS_VERSION}"),
        format!("asciinema=={ASCIINEMA_VERSION}"),
    ];
    let marker = venv.join(format!("installed-{}", pins.join("-")));
    if marker.is_file() {
        return Ok(bin);
    }
    let python = if Command::new("python3").arg("--version").output().is_ok() {
        "python3"
    } else {
        bail!("the tests need python3 with venv (`sudo apt-get install -y python3-venv`)");
    };
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("cannot remove {}", venv.display()))?;
    }
    run(Command::new(python).args(["-m", "venv"]).arg(&venv))
        .context("cannot create a virtualenv (`sudo apt-get install -y python3-venv`)")?;
    run(Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(&pins))?;
    std::fs::write(&marker, "")?;
    Ok(bin)
}

/// A `breakglass serve --dev` child, stopped with SIGTERM (so its demo
/// cluster stops too) when dropped.
struct DevServer {
    child: std::process::Child,
    stderr: std::path::PathBuf,
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs schemathesis against a live `breakglass serve --dev` with an admin
/// token: every documented operation, with generated valid and invalid
/// inputs, must answer as the OpenAPI document says.
fn api_fuzz() -> anyhow::Result<()> {
    let schemathesis = python_tools()?.join("schemathesis");
    let target = target_dir()?;
    let breakglass = target.join("debug").join("breakglass");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let stderr = target.join("schemathesis-server.stderr");
    let child = Command::new(&breakglass)
        .args(["serve", "--dev", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .env("NO_COLOR", "1")
        .env_remove("BREAKGLASS_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()
        .with_context(|| format!("cannot run {}", breakglass.display()))?;
    let mut server = DevServer { child, stderr };
    let deadline = std::time::Instant::now() + DEV_BANNER_TIMEOUT;
    let banner = loop {
        let text = std::fs::read_to_string(&server.stderr).unwrap_or_default();
        if text.contains("breakglass connect ID") {
            break text;
        }
        if let Some(status) = server.child.try_wait()? {
            bail!("serve --dev exited ({status}):\n{text}");
        }
        if std::time::Instant::now() > deadline {
            bail!("serve --dev printed no banner within {DEV_BANNER_TIMEOUT:?}:\n{text}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Carol is an admin: every operation, the audit log included, is open
    // to her, so the fuzzer reaches the handlers rather than 403s.
    let token = banner
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .flat_map(str::split_whitespace)
        .find_map(|pair| pair.strip_prefix("CAROL="))
        .context("no CAROL token in the dev banner")?
        .to_string();
    let mut cmd = Command::new(&schemathesis);
    cmd.arg("run")
        .arg(format!("{url}/openapi.json"))
        .args(["--url", &url])
        .args(["--max-examples", &FUZZ_EXAMPLES_PER_OPERATION.to_string()])
        // One worker: with two, CPython 3.11's `ast` (which Hypothesis
        // reaches from several threads) now and then fails with "AST
        // constructor recursion depth mismatch", a runner error that is not
        // ours; one worker is no slower here.
        .args(["--workers", "1", "--seed", "1", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "10"])
        .args(["--generation-database", ":memory:"])
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        .current_dir(&target)
        .stdout(std::process::Stdio::piped());
    eprintln!("$ schemathesis run {url}/openapi.json ... (token of the dev admin)");
    let mut child = cmd.spawn().context("cannot run schemathesis")?;
    let out = child.stdout.take().context("no stdout")?;
    use std::io::{BufRead, BufReader};
    for line in BufReader::new(out).lines() {
        // Prefixed, so its own "N passed, N failed" summary is not read
        // as the test command's closing line.
        println!("schemathesis | {}", line?);
    }
    let status = child.wait()?;
    drop(server);
    if !status.success() {
        bail!("schemathesis reported failures ({status}); see the lines above");
    }
    Ok(())
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> std::path::PathBuf {
    let xtask = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    // A relative CARGO_TARGET_DIR is relative to where cargo was started,
    // as cargo itself reads it; the default is the workspace's `target`.
    let custom = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| std::env::current_dir().map(|cwd| cwd.join(dir)))
        .transpose()?;
    let target = custom.clone().unwrap_or_else(|| root.join("target"));
    let mut build = cargo();
    build.current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "breakglass",
        "-p",
        "breakglass-bench",
    ]);
    if let Some(dir) = &custom {
        build.env("CARGO_TARGET_DIR", dir);
    }
    run(&mut build)?;
    let bin = target.join("release");
    run(Command::new(bin.join("breakglass-bench"))
        .arg("--breakglass")
        .arg(bin.join("breakglass"))
        .args(args))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask test | cargo xtask bench [ARGS]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
