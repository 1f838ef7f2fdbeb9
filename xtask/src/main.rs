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

/// Installs the system tools the tests start for real (PostgreSQL server
/// and client, pgbench, pgbouncer) when any is missing; needs root.
fn ensure_system_packages() -> anyhow::Result<()> {
    let in_pg_bin = |tool: &str| {
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .any(|version| version.path().join("bin").join(tool).is_file())
    };
    let mut missing = Vec::new();
    for tool in ["initdb", "pgbench"] {
        if !in_pg_bin(tool) {
            missing.push(format!("/usr/lib/postgresql/*/bin/{tool}"));
        }
    }
    for path in ["/usr/bin/psql", "/usr/sbin/pgbouncer", "/usr/bin/openssl"] {
        if !std::path::Path::new(path).is_file() {
            missing.push(path.to_owned());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let packages = ["postgresql", "postgresql-contrib", "pgbouncer", "openssl"];
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
            .args(packages)
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
fn cargo_test(args: &[&str], passed: &mut u64, failed: &mut u64) -> anyhow::Result<bool> {
    use std::io::{BufRead, BufReader};
    let mut cmd = cargo();
    cmd.arg("test")
        .args(args)
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

fn test() -> anyhow::Result<()> {
    ensure_system_packages()?;
    // Build everything first so test binaries that start the real
    // `breakglass` binary find it built.
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let (mut passed, mut failed) = (0, 0);
    let units = cargo_test(
        &["--workspace", "--all-targets", "--no-fail-fast"],
        &mut passed,
        &mut failed,
    )?;
    // There are no doc tests: `cargo test --doc` would only rebuild every
    // dependency in another mode, minutes on a cold CI machine.
    // The one closing line a reader (or CI) needs.
    println!("tests: {passed} passed, {failed} failed");
    if !units || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
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
