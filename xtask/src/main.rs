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

fn test() -> anyhow::Result<()> {
    // Build everything first so test binaries that start the real
    // `breakglass` binary find it built.
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    run(cargo().args(["test", "--workspace", "--all-targets", "--no-fail-fast"]))?;
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    Ok(())
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "breakglass",
        "-p",
        "breakglass-bench",
    ]))?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let bin = std::path::Path::new(&target).join("release");
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
