//! The breakglass service: configuration, the application layer over the
//! store, the expiry scheduler, and the HTTP API.

pub mod dto;
pub mod offline;

use std::path::PathBuf;

/// How `breakglass serve` writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Options of `breakglass serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The TOML config file; ignored with `dev`.
    pub config: Option<PathBuf>,
    /// Quick start: embedded store in a temp dir, demo principals and policy,
    /// loopback only.
    pub dev: bool,
    /// With `dev`: where to keep the data (default: a new temp dir).
    pub data_dir: Option<PathBuf>,
    pub log_format: LogFormat,
}

/// Runs the service until SIGTERM or SIGINT. Returns an error (with a message
/// naming the file, key or line) when the config or policy is wrong.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let _ = opts;
    anyhow::bail!("not implemented yet")
}
