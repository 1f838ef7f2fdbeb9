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
    #[serde(default)]
    pub emergency: EmergencyConfig,
    /// Where people's and workloads' tokens come from (besides the local
    /// principals).
    #[serde(default)]
    pub identity: crate::identity::config::IdentityConfig,
    /// Drills: the real path run on a schedule against canary targets.
    #[serde(default)]
    pub drills: Vec<crate::drill_config::DrillConfig>,
    /// `[review]`: the automated review of ended grants.
    #[serde(default)]
    pub review: crate::review::ReviewConfig,
    /// Notification sinks (`[[notify]]`).
    #[serde(default)]
    pub notify: Vec<breakglass_notify::SinkConfig>,
    /// Chat integrations that act on requests (`[integrations.slack]`).
    #[serde(default)]
    pub integrations: crate::slack::IntegrationsConfig,
    /// The web console at `/`.
    #[serde(default)]
    pub console: crate::console::ConsoleConfig,
}

/// The most emergency requests one principal may be allowed to hold at once.
pub const EMERGENCY_ACTIVE_PER_PRINCIPAL_MAX: u32 = 100;
/// The longest `emergency.review_within` accepted: 30 days.
pub const EMERGENCY_REVIEW_WITHIN_MAX_S: u64 = 30 * 24 * 3600;

/// `[emergency]`: limits on emergency self-activation that hold whatever
/// the policy says.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyConfig {
    /// Emergency requests (pending or live) one principal may hold at once.
    #[serde(default = "default_emergency_active")]
    pub max_active_per_principal: u32,
    /// An ended emergency grant must be reviewed within this long; until it
    /// is, its requester gets no new emergency access.
    #[serde(default = "default_review_within")]
    pub review_within: String,
}

impl Default for EmergencyConfig {
    fn default() -> Self {
        EmergencyConfig {
            max_active_per_principal: default_emergency_active(),
            review_within: default_review_within(),
        }
    }
}

fn default_emergency_active() -> u32 {
    1
}

fn default_review_within() -> String {
    "24h".into()
}

/// `[gateway.*]`: protocol gateways in front of targets.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub postgres: Option<breakglass_gateway_postgres::PgGatewayConfig>,
    #[serde(default)]
    pub ssh: Option<breakglass_gateway_ssh::SshGatewayConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP API.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Embedded store and keys; with a shared PostgreSQL store, only this
    /// node's signing key and session recordings.
    pub data_dir: PathBuf,
    /// Refused with a message: the connection string holds a password, so
    /// it comes from `database_url_env` or `database_url_file`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Several nodes: the environment variable holding the PostgreSQL
    /// connection string of the shared store.
    #[serde(default)]
    pub database_url_env: Option<String>,
    /// Several nodes: a file holding the PostgreSQL connection string.
    #[serde(default)]
    pub database_url_file: Option<PathBuf>,
    /// Several nodes: live gateway sessions are cut once this node has
    /// been unable to read the shared event feed for this long (a revoke
    /// could be waiting there).
    #[serde(default = "default_feed_loss_grace")]
    pub feed_loss_grace: String,
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
    /// API connections at once from one client address (IPv6: per /64).
    /// Loopback is not exempt; behind a reverse proxy, raise it.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Of `max_connections`, how many only connections that have shown a
    /// valid token may use (default: one sixteenth).
    #[serde(default)]
    pub reserved_connections: Option<usize>,
    /// A connection that has not sent a request with a valid token within
    /// this is closed (separate from `idle_timeout`).
    #[serde(default = "default_unauthenticated_timeout")]
    pub unauthenticated_timeout: String,
    /// PEM certificate chain and private key: with both set the API serves
    /// HTTPS only.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Lowercase hex SHA-256 of a bearer token that `/metrics` requires;
    /// without it `/metrics` is open.
    #[serde(default)]
    pub metrics_token_sha256: Option<String>,
    /// The base URL users reach the service at (`https://breakglass.example.com`),
    /// for links to its pages (the web console); links in notifications
    /// point there. Unset: messages show the CLI command.
    #[serde(default)]
    pub public_url: Option<String>,
}

fn default_feed_loss_grace() -> String {
    "10s".into()
}

/// The longest connection string read from `database_url_file`.
pub const DATABASE_URL_LEN_MAX: u64 = 4096;

fn default_max_connections_per_source() -> usize {
    128
}

fn default_unauthenticated_timeout() -> String {
    "10s".into()
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
    /// The checkpoint witness file: every checkpoint is appended to it as a
    /// JSON line, ideally on a volume the database admin does not control.
    /// Default: `checkpoints.jsonl` in `<data_dir>.witness/` (a sibling of
    /// the data dir, created owner-only).
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
    /// Keep the checkpoint witness file (default on). Off, truncating the
    /// log together with its checkpoints cannot be detected.
    #[serde(default = "default_true")]
    pub checkpoint_witness: bool,
    /// Public keys verification trusts, each as the node's
    /// `audit-signing.pub` holds it (64 hex digits). Empty: the key in
    /// `data_dir` is trusted, so a chain re-signed with a key planted there
    /// is not detected.
    #[serde(default)]
    pub verify_keys: Vec<String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_interval: default_checkpoint_interval(),
            checkpoint_file: None,
            checkpoint_witness: true,
            verify_keys: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// `<data_dir>.witness/checkpoints.jsonl`, beside (not inside) the data
/// dir; `None` when the data dir has no last component to name it by.
pub fn default_witness_file(data_dir: &Path) -> Option<PathBuf> {
    let name = data_dir.file_name()?;
    let parent = data_dir.parent().unwrap_or(Path::new(""));
    let mut dir = name.to_os_string();
    dir.push(".witness");
    Some(parent.join(dir).join(WITNESS_FILE_NAME))
}

/// The most keys `audit.verify_keys` may list.
pub const VERIFY_KEYS_MAX: usize = 256;
/// The witness file's name in the default witness directory.
pub const WITNESS_FILE_NAME: &str = "checkpoints.jsonl";

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
    /// `human` (the default) or `service`: a gateway or other service that
    /// checks grant credentials (`POST /v1/credentials/verify`) and may
    /// neither request nor approve.
    #[serde(default)]
    pub kind: PrincipalKind,
    /// Environment variable holding the principal's TOTP secret (base32):
    /// then every call also needs the current code (`X-Breakglass-OTP`).
    #[serde(default)]
    pub totp_secret_env: Option<String>,
    /// File holding the principal's TOTP secret (base32), instead of
    /// `totp_secret_env`.
    #[serde(default)]
    pub totp_secret_file: Option<PathBuf>,
    /// The principal's Slack user id (`U…`): buttons pressed in Slack by
    /// that user act as this principal.
    #[serde(default)]
    pub slack_user: Option<String>,
}

/// What a principal is (see [`PrincipalConfig::kind`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    #[default]
    Human,
    Service,
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
    /// SSH targets: the upstream's host key, pinned (`ssh-ed25519 AAAA...`,
    /// as in `/etc/ssh/ssh_host_ed25519_key.pub`). Required; any other key
    /// is refused before a credential is sent.
    #[serde(default)]
    pub host_key: Option<String>,
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
    /// SSH targets: a private key file (OpenSSH format, unencrypted, mode
    /// 0600) the gateway logs in with. Without it the gateway logs in with
    /// a certificate from its user CA, valid until the grant ends.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// SSH targets: allow local port forwarding (`ssh -L`) through the
    /// gateway; each forwarded connection is recorded like a session
    /// channel (destination, then every byte each way).
    #[serde(default)]
    pub port_forwarding: bool,
    /// SSH targets: allow SFTP and `scp` through the gateway; each file
    /// transfer is recorded with its path, direction, size and SHA-256.
    #[serde(default)]
    pub file_transfer: bool,
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
        for f in [cfg.server.tls_cert.as_mut(), cfg.server.tls_key.as_mut()]
            .into_iter()
            .flatten()
        {
            resolve(f);
        }
        resolve(&mut cfg.policy.file);
        if let Some(f) = cfg.server.database_url_file.as_mut() {
            resolve(f);
        }
        if let Some(f) = cfg.audit.checkpoint_file.as_mut() {
            resolve(f);
        }
        if let Some(ssh) = cfg.gateway.ssh.as_mut() {
            for f in [
                ssh.host_key_file.as_mut(),
                ssh.user_ca_key_file.as_mut(),
                ssh.client_ca_key_file.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                resolve(f);
            }
        }
        for t in &mut cfg.targets {
            for role in t.roles.values_mut() {
                if let Some(f) = role.key_file.as_mut() {
                    resolve(f);
                }
            }
        }
        if let Some(pg) = cfg.gateway.postgres.as_mut() {
            for f in [pg.tls_cert.as_mut(), pg.tls_key.as_mut()]
                .into_iter()
                .flatten()
            {
                resolve(f);
            }
        }
        for p in &mut cfg.principals {
            if let Some(f) = p.totp_secret_file.as_mut() {
                resolve(f);
            }
        }
        for n in &mut cfg.notify {
            n.resolve_paths(base);
        }
        cfg.integrations.resolve_paths(base);
        for t in &mut cfg.targets {
            for r in t.roles.values_mut() {
                if let Some(f) = r.password_file.as_mut() {
                    resolve(f);
                }
            }
        }
        crate::drill_config::resolve_paths(&mut cfg, base);
        if cfg.audit.checkpoint_witness && cfg.audit.checkpoint_file.is_none() {
            match default_witness_file(&cfg.server.data_dir) {
                Some(f) => cfg.audit.checkpoint_file = Some(f),
                None => bail!(
                    "{label}: server.data_dir: cannot place the default checkpoint witness beside {}; set audit.checkpoint_file",
                    cfg.server.data_dir.display()
                ),
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.server.database_url.is_some() {
            bail!(
                "server.database_url: a connection string holds a password and never goes into the config; put it in an environment variable named by server.database_url_env, or a file named by server.database_url_file"
            );
        }
        if self.server.database_url_env.is_some() && self.server.database_url_file.is_some() {
            bail!("server.database_url_env, server.database_url_file: set one of them, not both");
        }
        crate::console::validate_config(self)?;
        let grace = parse_duration(&self.server.feed_loss_grace)
            .map_err(|e| anyhow::anyhow!("server.feed_loss_grace: {e}"))?;
        if !(1..=3600).contains(&grace) {
            bail!("server.feed_loss_grace: must be between 1s and 1h");
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
        self.validate_listener()?;
        parse_duration(&self.audit.checkpoint_interval)
            .map_err(|e| anyhow::anyhow!("audit.checkpoint_interval: {e}"))?;
        if self.audit.verify_keys.len() > VERIFY_KEYS_MAX {
            bail!("audit.verify_keys: more than {VERIFY_KEYS_MAX} keys");
        }
        for (i, k) in self.audit.verify_keys.iter().enumerate() {
            crate::keys::parse_public(k)
                .map_err(|e| anyhow::anyhow!("audit.verify_keys[{i}]: {e}"))?;
        }
        if !self.audit.checkpoint_witness && self.audit.checkpoint_file.is_some() {
            bail!(
                "audit.checkpoint_file: set while audit.checkpoint_witness = false; remove one of them"
            );
        }
        if !(1..=EMERGENCY_ACTIVE_PER_PRINCIPAL_MAX)
            .contains(&self.emergency.max_active_per_principal)
        {
            bail!(
                "emergency.max_active_per_principal: must be between 1 and {EMERGENCY_ACTIVE_PER_PRINCIPAL_MAX}"
            );
        }
        let review = parse_duration(&self.emergency.review_within)
            .map_err(|e| anyhow::anyhow!("emergency.review_within: {e}"))?;
        if !(1..=EMERGENCY_REVIEW_WITHIN_MAX_S).contains(&review) {
            bail!("emergency.review_within: must be between 1s and 30d");
        }
        self.review.validate()?;
        if let Some(pg) = &self.gateway.postgres {
            pg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if let Some(ssh) = &self.gateway.ssh {
            ssh.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if self.principals.len() > PRINCIPALS_MAX {
            bail!("principals: more than {PRINCIPALS_MAX} entries");
        }
        if self.targets.len() > TARGETS_MAX {
            bail!("targets: more than {TARGETS_MAX} entries");
        }
        // Lowercased name -> (index, name): names differ by more than case,
        // so that "Alice" can never pass for "alice" in a log or approval.
        let mut names: BTreeMap<String, (usize, &str)> = BTreeMap::new();
        let mut digests = BTreeSet::new();
        for (i, p) in self.principals.iter().enumerate() {
            let at = format!("principals[{i}]");
            check_name(&format!("{at}.name"), &p.name).map_err(|e| anyhow::anyhow!("{e}"))?;
            if p.name == "system" {
                bail!("{at}.name: \"system\" is reserved for the service itself");
            }
            if let Some((j, first)) = names.insert(p.name.to_lowercase(), (i, p.name.as_str())) {
                bail!(
                    "{at}.name: principal {:?} is the same name as principals[{j}].name {first:?} (names must be unique regardless of case)",
                    p.name
                );
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
            if p.totp_secret_env.is_some() && p.totp_secret_file.is_some() {
                bail!("{at}: set totp_secret_env or totp_secret_file, not both");
            }
        }
        self.identity.validate()?;
        crate::notify::validate(self)?;
        let prefixes = self.identity.workload_prefixes();
        for (i, p) in self.principals.iter().enumerate() {
            if let Some(prefix) = prefixes.iter().find(|w| p.name.starts_with(w.as_str())) {
                bail!(
                    "principals[{i}].name: {:?} is in the name space of workload names ({prefix:?}, from identity.workloads)",
                    p.name
                );
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
            if t.kind == "ssh" {
                crate::ssh::validate_target(t).map_err(|e| anyhow::anyhow!("{at}.{e}"))?;
            } else if t.host_key.is_some() {
                bail!("{at}.host_key: only ssh targets have a pinned host key");
            } else {
                for (name, role) in &t.roles {
                    if role.port_forwarding {
                        bail!("{at}.roles.{name}.port_forwarding: only ssh targets forward ports");
                    }
                    if role.file_transfer {
                        bail!("{at}.roles.{name}.file_transfer: only ssh targets transfer files");
                    }
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
        crate::drill_config::validate(self)?;
        Ok(())
    }

    /// The API listener's own keys: slots, deadlines, TLS, the metrics token.
    fn validate_listener(&self) -> anyhow::Result<()> {
        let s = &self.server;
        if !(1..=API_CONNECTIONS_MAX).contains(&s.max_connections_per_source) {
            bail!("server.max_connections_per_source: must be between 1 and {API_CONNECTIONS_MAX}");
        }
        if let Some(r) = s.reserved_connections
            && r >= s.max_connections
        {
            bail!(
                "server.reserved_connections: must be less than server.max_connections ({})",
                s.max_connections
            );
        }
        let unauth = parse_duration(&s.unauthenticated_timeout)
            .map_err(|e| anyhow::anyhow!("server.unauthenticated_timeout: {e}"))?;
        if !(1..=300).contains(&unauth) {
            bail!("server.unauthenticated_timeout: must be between 1s and 5m");
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            bail!("server.tls_cert, server.tls_key: set both, or neither");
        }
        if let Some(m) = &s.metrics_token_sha256
            && parse_sha256_hex(m).is_none()
        {
            bail!(
                "server.metrics_token_sha256: expected 64 hex digits (the SHA-256 of the token), got {} characters",
                m.len()
            );
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

    /// The API listener's slot limits (validated at load).
    pub fn api_slot_limits(&self) -> breakglass_core::slots::SlotLimits {
        let s = &self.server;
        breakglass_core::slots::SlotLimits::new(
            s.max_connections,
            s.reserved_connections,
            s.max_connections_per_source,
        )
    }

    /// `server.unauthenticated_timeout` (validated at load).
    pub fn api_unauthenticated_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            parse_duration(&self.server.unauthenticated_timeout).unwrap_or(10),
        )
    }

    /// `server.idle_timeout` (validated at load).
    pub fn api_idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(parse_duration(&self.server.idle_timeout).unwrap_or(60))
    }

    pub fn pending_timeout_s(&self) -> u64 {
        parse_duration(&self.server.pending_timeout).unwrap_or(1800)
    }

    /// The `[emergency]` limits (validated at load).
    pub fn emergency_limits(&self) -> breakglass_core::lifecycle::EmergencyLimits {
        breakglass_core::lifecycle::EmergencyLimits {
            active_per_principal_max: self.emergency.max_active_per_principal,
            review_within_s: parse_duration(&self.emergency.review_within).unwrap_or(24 * 3600),
        }
    }

    /// Rules of `engine` nobody among the known principals can satisfy.
    /// With an identity provider, approver groups are filled there, out of
    /// the service's sight: nothing can be judged, so nothing is said.
    pub fn policy_warnings(&self, engine: &breakglass_core::policy::PolicyEngine) -> Vec<String> {
        if self.identity.oidc.is_some() {
            return Vec::new();
        }
        engine.warnings(&self.policy_principals())
    }

    /// The configured principals as the policy sees them (for the policy
    /// warnings; admin rights play no part there).
    pub fn policy_principals(&self) -> Vec<breakglass_core::Principal> {
        self.principals
            .iter()
            .map(|p| {
                breakglass_core::Principal::local(
                    p.name.clone(),
                    p.groups.iter().cloned().collect(),
                    false,
                )
            })
            .collect()
    }

    pub fn checkpoint_interval_s(&self) -> u64 {
        parse_duration(&self.audit.checkpoint_interval).unwrap_or(2)
    }

    /// The checkpoint witness file, unless `audit.checkpoint_witness` is off.
    pub fn witness_file(&self) -> Option<PathBuf> {
        if !self.audit.checkpoint_witness {
            return None;
        }
        if let Some(f) = &self.audit.checkpoint_file {
            return Some(f.clone());
        }
        default_witness_file(&self.server.data_dir)
    }

    /// `audit.verify_keys` (validated at load).
    pub fn verify_keys(&self) -> Vec<ed25519_dalek::VerifyingKey> {
        self.audit
            .verify_keys
            .iter()
            .filter_map(|k| crate::keys::parse_public(k).ok())
            .collect()
    }

    /// The shared store's connection string, from `server.database_url_env`
    /// or `server.database_url_file`; `None` for the embedded store. The
    /// error names the variable or file, never the value.
    pub fn database_url(&self) -> anyhow::Result<Option<String>> {
        if let Some(var) = &self.server.database_url_env {
            let url = std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "server.database_url_env: environment variable {var} is not set (it must hold the PostgreSQL connection string)"
                )
            })?;
            return Ok(Some(url));
        }
        if let Some(path) = &self.server.database_url_file {
            let meta = std::fs::metadata(path).with_context(|| {
                format!("server.database_url_file: cannot read {}", path.display())
            })?;
            if meta.len() > DATABASE_URL_LEN_MAX {
                bail!(
                    "server.database_url_file: {} is longer than {DATABASE_URL_LEN_MAX} bytes",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("server.database_url_file: cannot read {}", path.display())
            })?;
            return Ok(Some(text.trim().to_string()));
        }
        Ok(None)
    }

    /// Whether the store is the shared PostgreSQL one.
    pub fn shared_store(&self) -> bool {
        self.server.database_url_env.is_some() || self.server.database_url_file.is_some()
    }

    /// `server.feed_loss_grace` (validated at load).
    pub fn feed_loss_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(parse_duration(&self.server.feed_loss_grace).unwrap_or(10))
    }

    pub fn db_path(&self) -> PathBuf {
        self.server.data_dir.join("breakglass.db")
    }

    pub fn recordings_dir(&self) -> PathBuf {
        self.server.data_dir.join("recordings")
    }

    /// The SSH gateway's host key file.
    pub fn ssh_host_key_file(&self) -> Option<PathBuf> {
        let ssh = self.gateway.ssh.as_ref()?;
        Some(
            ssh.host_key_file
                .clone()
                .unwrap_or_else(|| self.server.data_dir.join("ssh").join("host_ed25519_key")),
        )
    }

    /// The SSH gateway's user CA key file.
    pub fn ssh_user_ca_key_file(&self) -> Option<PathBuf> {
        let ssh = self.gateway.ssh.as_ref()?;
        Some(
            ssh.user_ca_key_file
                .clone()
                .unwrap_or_else(|| self.server.data_dir.join("ssh").join("user_ca_ed25519_key")),
        )
    }

    /// The SSH gateway's client CA key file (`connect`'s certificates).
    pub fn ssh_client_ca_key_file(&self) -> Option<PathBuf> {
        let ssh = self.gateway.ssh.as_ref()?;
        Some(ssh.client_ca_key_file.clone().unwrap_or_else(|| {
            self.server
                .data_dir
                .join("ssh")
                .join("client_ca_ed25519_key")
        }))
    }

    /// Whether `name` is a service principal (`kind = "service"`).
    pub fn is_service(&self, name: &str) -> bool {
        self.principals
            .iter()
            .any(|p| p.name == name && p.kind == PrincipalKind::Service)
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
            "{base}[[principals]]\nname = \"alice\"\ntoken_sha256 = \"{HEX}\"\n[[principals]]\nname = \"Alice\"\ntoken_sha256 = \"{}\"\n",
            "0".repeat(64)
        ));
        assert!(
            e.contains("principals[1].name")
                && e.contains("\"Alice\"")
                && e.contains("principals[0].name \"alice\""),
            "{e}"
        );
        let e = parse(&format!(
            "{base}[[principals]]\nname = \"gw\"\nkind = \"robot\"\ntoken_sha256 = \"{HEX}\"\n"
        ));
        assert!(e.contains("robot"), "{e}");
        let e = parse(&format!(
            "{base}[[targets]]\nname = \"db\"\nkind = \"mysql\"\n[targets.roles.read]\n"
        ));
        assert!(e.contains("targets[0].kind"), "{e}");
        let e = parse(&format!(
            "{base}[[targets]]\nname = \"db\"\nkind = \"generic\"\n[targets.roles.read]\nport_forwarding = true\n"
        ));
        assert!(
            e.contains("targets[0].roles.read.port_forwarding") && e.contains("only ssh targets"),
            "{e}"
        );
        let e = parse(&format!(
            "{base}[[targets]]\nname = \"db\"\nkind = \"generic\"\n[targets.roles.read]\nfile_transfer = true\n"
        ));
        assert!(
            e.contains("targets[0].roles.read.file_transfer") && e.contains("only ssh targets"),
            "{e}"
        );
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
            (
                "max_connections_per_source = 0",
                "server.max_connections_per_source",
            ),
            ("reserved_connections = 1024", "server.reserved_connections"),
            (
                "unauthenticated_timeout = \"0s\"",
                "server.unauthenticated_timeout",
            ),
            (
                "unauthenticated_timeout = \"1h\"",
                "server.unauthenticated_timeout",
            ),
            ("tls_cert = \"c.pem\"", "server.tls_cert"),
            (
                "metrics_token_sha256 = \"abc\"",
                "server.metrics_token_sha256",
            ),
            (
                "[emergency]\nmax_active_per_principal = 0",
                "emergency.max_active_per_principal",
            ),
            (
                "[emergency]\nreview_within = \"soon\"",
                "emergency.review_within",
            ),
            (
                "[emergency]\nreview_within = \"31d\"",
                "emergency.review_within",
            ),
            ("[emergency]\nreview = \"1h\"", "unknown field `review`"),
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

    #[test]
    fn the_witness_defaults_to_a_sibling_of_the_data_dir() {
        let at = |text: &str| {
            Config::parse(text, "t", Path::new("/etc/bg"))
                .expect("valid")
                .witness_file()
        };
        let base = "[policy]\nfile = \"p\"\n";
        for dir in ["data", "data/", "/var/lib/bg/data"] {
            let f = at(&format!("[server]\ndata_dir = \"{dir}\"\n{base}")).expect("witness");
            let data = if dir.starts_with('/') {
                PathBuf::from(dir)
            } else {
                Path::new("/etc/bg").join(dir.trim_end_matches('/'))
            };
            assert!(
                !f.starts_with(&data),
                "{} is inside {}",
                f.display(),
                data.display()
            );
            assert_eq!(
                f.parent().and_then(Path::parent),
                data.parent(),
                "{}",
                f.display()
            );
            assert!(
                f.ends_with("data.witness/checkpoints.jsonl"),
                "{}",
                f.display()
            );
        }
        assert_eq!(
            at(&format!(
                "[server]\ndata_dir = \"d\"\n{base}[audit]\ncheckpoint_file = \"w/c.jsonl\"\n"
            )),
            Some(PathBuf::from("/etc/bg/w/c.jsonl"))
        );
        assert_eq!(
            at(&format!(
                "[server]\ndata_dir = \"d\"\n{base}[audit]\ncheckpoint_witness = false\n"
            )),
            None
        );
        for (line, key) in [
            ("verify_keys = [\"abc\"]", "audit.verify_keys[0]"),
            (
                "checkpoint_witness = false\ncheckpoint_file = \"x\"",
                "audit.checkpoint_file",
            ),
        ] {
            let e = parse(&format!(
                "[server]\ndata_dir = \"d\"\n{base}[audit]\n{line}\n"
            ));
            assert!(e.contains(key), "{line}: {e}");
        }
    }
}
