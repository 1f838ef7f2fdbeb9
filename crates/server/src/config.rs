//! The TOML configuration (DESIGN §7). Unknown keys are errors that name the
//! key; relative paths are relative to the config file; secrets never appear
//! here in clear (principal tokens are SHA-256 digests, upstream passwords
//! come from the environment or a file).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use breakglass_core::lifecycle::check_name;
use breakglass_core::time::parse_duration;
use breakglass_core::token::parse_sha256_hex;
use serde::Deserialize;

/// Config files larger than this are refused.
pub const CONFIG_FILE_LEN_MAX: u64 = 4 * 1024 * 1024;
pub const PRINCIPALS_MAX: usize = 10_000;
pub const TARGETS_MAX: usize = 10_000;
/// The largest `server.max_connections` accepted.
pub const API_CONNECTIONS_MAX: usize = 65_536;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub policy: PolicyConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub principals: Vec<PrincipalConfig>,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub gateway: GatewayConfig,
}

/// `[gateway.*]`: protocol gateways in front of targets.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub postgres: Option<breakglass_gateway_postgres::PgGatewayConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP API.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Embedded store and keys.
    pub data_dir: PathBuf,
    /// A shared PostgreSQL store for several nodes (not in this release).
    #[serde(default)]
    pub database_url: Option<String>,
    /// A pending request times out after this long.
    #[serde(default = "default_pending_timeout")]
    pub pending_timeout: String,
    /// Members may read everything and revoke any grant.
    #[serde(default)]
    pub admin_groups: Vec<String>,
    /// API connections served at once; one more is answered 503.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// An API connection the server has sent nothing on for this long is
    /// closed (client bytes do not extend it).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
}

fn default_max_connections() -> usize {
    1024
}

fn default_idle_timeout() -> String {
    "60s".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_pending_timeout() -> String {
    "30m".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// How often the chain head is signed while events flow.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: String,
    /// Also append every checkpoint as a JSON line to this file, ideally on a
    /// volume the database admin does not control.
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_interval: default_checkpoint_interval(),
            checkpoint_file: None,
        }
    }
}

fn default_checkpoint_interval() -> String {
    "2s".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Lowercase hex SHA-256 of the principal's API token.
    pub token_sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// `postgres`, `ssh`, or `generic` (no gateway).
    pub kind: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub upstream: Option<String>,
    /// The roles one may ask for on this target; a request for any other
    /// role is refused.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleConfig>,
    /// Keep bound parameter values out of session recordings.
    #[serde(default)]
    pub redact_parameters: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// Upstream user the gateway connects as.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

const TARGET_KINDS: [&str; 3] = ["postgres", "ssh", "generic"];

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        if meta.len() > CONFIG_FILE_LEN_MAX {
            bail!(
                "{}: config file is {} bytes, the limit is {CONFIG_FILE_LEN_MAX}",
                path.display(),
                meta.len()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), base)
    }

    /// Parses config text; `label` names it in errors, `base` resolves
    /// relative paths.
    pub fn parse(text: &str, label: &str, base: &Path) -> anyhow::Result<Config> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.server.data_dir);
        resolve(&mut cfg.policy.file);
        if let Some(f) = cfg.audit.checkpoint_file.as_mut() {
            resolve(f);
        }
        if let Some(pg) = cfg.gateway.postgres.as_mut() {
            for f in [pg.tls_cert.as_mut(), pg.tls_key.as_mut()]
                .into_iter()
                .flatten()
            {
                resolve(f);
            }
        }
        for t in &mut cfg.targets {
            for r in t.roles.values_mut() {
                if let Some(f) = r.password_file.as_mut() {
                    resolve(f);
                }
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.server.database_url.is_some() {
            bail!(
                "server.database_url: the PostgreSQL store is not available in this release; remove it to use the embedded store in data_dir"
            );
        }
        parse_duration(&self.server.pending_timeout)
            .map_err(|e| anyhow::anyhow!("server.pending_timeout: {e}"))?;
        if !(1..=API_CONNECTIONS_MAX).contains(&self.server.max_connections) {
            bail!("server.max_connections: must be between 1 and {API_CONNECTIONS_MAX}");
        }
        let idle = parse_duration(&self.server.idle_timeout)
            .map_err(|e| anyhow::anyhow!("server.idle_timeout: {e}"))?;
        if !(1..=3600).contains(&idle) {
            bail!("server.idle_timeout: must be between 1s and 1h");
        }
        parse_duration(&self.audit.checkpoint_interval)
            .map_err(|e| anyhow::anyhow!("audit.checkpoint_interval: {e}"))?;
        if let Some(pg) = &self.gateway.postgres {
            pg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if self.principals.len() > PRINCIPALS_MAX {
            bail!("principals: more than {PRINCIPALS_MAX} entries");
        }
        if self.targets.len() > TARGETS_MAX {
            bail!("targets: more than {TARGETS_MAX} entries");
        }
        let mut names = BTreeSet::new();
        let mut digests = BTreeSet::new();
        for (i, p) in self.principals.iter().enumerate() {
            let at = format!("principals[{i}]");
            check_name(&format!("{at}.name"), &p.name).map_err(|e| anyhow::anyhow!("{e}"))?;
            if p.name == "system" {
                bail!("{at}.name: \"system\" is reserved for the service itself");
            }
            if !names.insert(p.name.as_str()) {
                bail!("{at}.name: duplicate principal {:?}", p.name);
            }
            for g in &p.groups {
                check_name(&format!("{at}.groups"), g).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            let Some(d) = parse_sha256_hex(&p.token_sha256) else {
                bail!(
                    "{at}.token_sha256: expected 64 hex digits (the SHA-256 of the token), got {} characters",
                    p.token_sha256.len()
                );
            };
            if !digests.insert(d) {
                bail!("{at}.token_sha256: the same token is configured for two principals");
            }
        }
        let mut targets = BTreeSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("targets[{i}]");
            check_name(&format!("{at}.name"), &t.name).map_err(|e| anyhow::anyhow!("{e}"))?;
            if !targets.insert(t.name.as_str()) {
                bail!("{at}.name: duplicate target {:?}", t.name);
            }
            if !TARGET_KINDS.contains(&t.kind.as_str()) {
                bail!(
                    "{at}.kind: unknown kind {:?} (expected one of {})",
                    t.kind,
                    TARGET_KINDS.join(", ")
                );
            }
            for g in &t.groups {
                check_name(&format!("{at}.groups"), g).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            if t.roles.is_empty() {
                bail!("{at}.roles: a target needs at least one role ([targets.roles.NAME])");
            }
            for (name, role) in &t.roles {
                check_name(&format!("{at}.roles"), name).map_err(|e| anyhow::anyhow!("{e}"))?;
                if role.password_env.is_some() && role.password_file.is_some() {
                    bail!("{at}.roles.{name}: set password_env or password_file, not both");
                }
                if t.kind == "postgres" && role.user.is_none() {
                    bail!(
                        "{at}.roles.{name}.user: a postgres target's role needs the upstream user to connect as"
                    );
                }
            }
            if t.kind == "postgres" {
                let Some(url) = &t.upstream else {
                    bail!(
                        "{at}.upstream: a postgres target needs upstream = \"postgres://host:port/db\""
                    );
                };
                breakglass_gateway_postgres::upstream::parse_url(url)
                    .map_err(|e| anyhow::anyhow!("{at}.upstream: {e}"))?;
            }
        }
        Ok(())
    }

    /// Reads the upstream password of every role of every target a gateway
    /// serves, so a missing secret stops start-up instead of surfacing at
    /// `connect` while a grant's clock runs. The error names the target,
    /// the role and the variable or file; the secret itself is never shown.
    pub fn check_upstream_secrets(&self) -> anyhow::Result<()> {
        if self.gateway.postgres.is_none() {
            return Ok(());
        }
        for (i, t) in self.targets.iter().enumerate() {
            if t.kind != "postgres" {
                continue;
            }
            for (name, role) in &t.roles {
                let at = format!("targets[{i}].roles.{name}");
                let user = role.user.as_deref().unwrap_or("?");
                let problem = match crate::gateway::role_password(role) {
                    Ok(Some(p)) if p.is_empty() => "is empty".to_string(),
                    Ok(_) => continue,
                    Err(why) => why,
                };
                if let Some(var) = &role.password_env {
                    let state = if problem == "is empty" {
                        "is empty"
                    } else {
                        "is not set"
                    };
                    bail!(
                        "{at}.password_env: target {} role {name}: the environment variable {var} \
                         (the upstream password of user {user}) {state}; set it in the service's \
                         environment, or use password_file",
                        t.name
                    );
                }
                if let Some(file) = &role.password_file {
                    bail!(
                        "{at}.password_file: target {} role {name}: cannot read the upstream \
                         password of user {user} from {}: {problem}",
                        t.name,
                        file.display()
                    );
                }
            }
        }
        Ok(())
    }

    /// `server.idle_timeout` (validated at load).
    pub fn api_idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(parse_duration(&self.server.idle_timeout).unwrap_or(60))
    }

    pub fn pending_timeout_s(&self) -> u64 {
        parse_duration(&self.server.pending_timeout).unwrap_or(1800)
    }

    pub fn checkpoint_interval_s(&self) -> u64 {
        parse_duration(&self.audit.checkpoint_interval).unwrap_or(2)
    }

    pub fn db_path(&self) -> PathBuf {
        self.server.data_dir.join("breakglass.db")
    }

    pub fn recordings_dir(&self) -> PathBuf {
        self.server.data_dir.join("recordings")
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn parse(text: &str) -> String {
        match Config::parse(text, "test.toml", Path::new("/etc/bg")) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let base = "[server]\ndata_dir = \"d\"\n[policy]\nfile = \"p.cedar\"\n";
        assert_eq!(parse(base), "ok");
        let e = parse(&format!("{base}[server2]\n"));
        assert!(e.contains("unknown field `server2`"), "{e}");
        let e = parse("[server]\ndata_dir = \"d\"\nlisten_addr = \"x\"\n[policy]\nfile = \"p\"\n");
        assert!(e.contains("listen_addr"), "{e}");
        let e = parse(&format!(
            "{base}[[principals]]\nname = \"alice\"\ntoken_sha256 = \"abc\"\n"
        ));
        assert!(e.contains("principals[0].token_sha256"), "{e}");
        let e = parse(&format!(
            "{base}[[principals]]\nname = \"a\"\ntoken_sha256 = \"{HEX}\"\n[[principals]]\nname = \"b\"\ntoken_sha256 = \"{HEX}\"\n"
        ));
        assert!(e.contains("same token"), "{e}");
        let e = parse(&format!(
            "{base}[[targets]]\nname = \"db\"\nkind = \"mysql\"\n[targets.roles.read]\n"
        ));
        assert!(e.contains("targets[0].kind"), "{e}");
        let e = parse(
            "[server]\ndata_dir = \"d\"\npending_timeout = \"soon\"\n[policy]\nfile = \"p\"\n",
        );
        assert!(e.contains("server.pending_timeout"), "{e}");
        for (line, key) in [
            ("max_connections = 0", "server.max_connections"),
            ("max_connections = 1000000", "server.max_connections"),
            ("idle_timeout = \"0s\"", "server.idle_timeout"),
            ("idle_timeout = \"2h\"", "server.idle_timeout"),
            ("idle_timeout = \"later\"", "server.idle_timeout"),
        ] {
            let e = parse(&format!(
                "[server]\ndata_dir = \"d\"\n{line}\n[policy]\nfile = \"p\"\n"
            ));
            assert!(e.contains(key), "{line}: {e}");
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let cfg = Config::parse(
            "[server]\ndata_dir = \"data\"\n[policy]\nfile = \"/abs/p.cedar\"\n",
            "t",
            Path::new("/etc/bg"),
        )
        .expect("valid");
        assert_eq!(cfg.server.data_dir, Path::new("/etc/bg/data"));
        assert_eq!(cfg.policy.file, Path::new("/abs/p.cedar"));
    }
}
