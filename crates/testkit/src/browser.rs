//! Browser tests: a Node.js script driving Debian's Chromium
//! (`/usr/bin/chromium`) through `playwright-core`, from the same node
//! modules as the identity providers. The browser is never downloaded.
//!
//! A script gets one argument, a JSON file with its input, and prints one
//! JSON line, its result, as the last line of stdout; it fails by exiting
//! non-zero with the reason on stderr. It runs in a temporary directory
//! with a `node_modules` link, as a child process stopped by pid when it
//! overruns its time or the caller goes away.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The browser the scripts launch.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Flags every launch passes (besides playwright's own fresh profile
/// directory).
pub const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// Bytes of a script's stdout kept (its result is the last line).
const STDOUT_LEN_MAX: u64 = 4 << 20;

/// Runs `script` (its text, written as `name`) with `input`, within
/// `limit`. Screenshots and other artefacts go where `input` says.
pub fn run_script(
    name: &str,
    script: &str,
    input: &serde_json::Value,
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    if !Path::new(CHROMIUM).is_file() {
        bail!("{CHROMIUM} is missing: install Debian's chromium (`cargo xtask test` does)");
    }
    let modules = crate::oidc::node_modules()?;
    if !modules
        .join("playwright-core")
        .join("package.json")
        .is_file()
    {
        bail!(
            "playwright-core is not installed in {}; run `cargo xtask test`, which installs it",
            modules.display()
        );
    }
    let dir = tempfile::Builder::new().prefix("bg-browser-").tempdir()?;
    std::fs::write(dir.path().join(name), script)?;
    std::os::unix::fs::symlink(&modules, dir.path().join("node_modules"))
        .context("cannot link node_modules")?;
    let mut input = input.clone();
    input["chromium"] = CHROMIUM.into();
    input["chromium_args"] = CHROMIUM_ARGS.into();
    let input_path = dir.path().join("input.json");
    std::fs::write(&input_path, serde_json::to_vec_pretty(&input)?)?;
    let stdout_path: PathBuf = dir.path().join("stdout");
    let stderr_path: PathBuf = dir.path().join("stderr");
    let mut child = Child(Some(
        Command::new("node")
            .arg(dir.path().join(name))
            .arg(&input_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path)?)
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()
            .context("cannot run `node` (Node.js 20.19 or later is needed)")?,
    ));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            child.stop();
            bail!(
                "{name} did not finish within {limit:?}:\n{}",
                breakglass_localpg::os::log_tail(&stderr_path, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    use std::io::Read as _;
    std::fs::File::open(&stdout_path)?
        .take(STDOUT_LEN_MAX)
        .read_to_string(&mut out)?;
    if !status.success() {
        bail!(
            "{name} failed ({status}):\n{}\nstdout:\n{}",
            breakglass_localpg::os::log_tail(&stderr_path, 60),
            out.lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let last = out.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("{name} printed no JSON result: {last:?}"))
}

/// The script's process, stopped by pid when dropped (a test that fails or
/// panics leaves no browser behind).
struct Child(Option<std::process::Child>);

impl Child {
    fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(c) = self.0.as_mut() else {
            bail!("the script's process is gone");
        };
        let st = c.try_wait()?;
        if st.is_some() {
            // Reaped: its pid may be reused, so it is never signalled again.
            self.0 = None;
        }
        Ok(st)
    }

    fn stop(&mut self) {
        breakglass_localpg::os::stop_child(self.0.take(), Duration::from_secs(3));
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}
