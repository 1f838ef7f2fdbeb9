//! `[[drills]]`: drills that run the real break-glass path on a schedule
//! against a canary target (DESIGN §15). A drill is a client of the public
//! API, so it names the principals it acts as and where their tokens are
//! (an environment variable or a file); the tokens are read at each run and
//! never kept in the config.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::bail;
use breakglass_core::lifecycle::check_name;
use breakglass_core::time::{parse_duration, parse_duration_at_most};
use serde::Deserialize;

use crate::config::Config;

/// The most `[[drills]]` one config may hold.
pub const DRILLS_MAX: usize = 64;
/// The most approver principals one drill may name.
pub const DRILL_APPROVERS_MAX: usize = 10;
/// The shortest `every`: tests use seconds, deployments hours.
pub const DRILL_EVERY_MIN_S: u64 = 1;
/// The longest `every`: 30 days.
pub const DRILL_EVERY_MAX_S: u64 = 30 * 24 * 3600;
/// The longest `step_timeout`.
pub const DRILL_STEP_TIMEOUT_MAX_S: u64 = 600;
/// The longest token read from a `token_file`.
pub const DRILL_TOKEN_LEN_MAX: u64 = 8192;

/// How a drill asks for access.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillMode {
    /// A normal request that the approvers approve.
    #[default]
    Normal,
    /// An emergency request (self-activated where the policy allows), which
    /// the approvers countersign.
    Emergency,
}

/// A principal a drill acts as, and where its API token is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillPrincipal {
    /// The principal's name (a `[[principals]]` entry, or a workload name).
    pub principal: String,
    /// Environment variable holding the principal's API token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding the principal's API token (surrounding whitespace is
    /// ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl DrillPrincipal {
    /// Reads the token now. The error names the variable or file, never
    /// the token.
    pub fn token(&self) -> Result<String, String> {
        if let Some(var) = &self.token_env {
            return match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
                Ok(_) => Err(format!(
                    "the token of {} (environment variable {var}) is empty",
                    self.principal
                )),
                Err(_) => Err(format!(
                    "the token of {} (environment variable {var}) is not set",
                    self.principal
                )),
            };
        }
        if let Some(file) = &self.token_file {
            let meta = std::fs::metadata(file).map_err(|e| {
                format!(
                    "cannot read the token of {} from {}: {e}",
                    self.principal,
                    file.display()
                )
            })?;
            if meta.len() > DRILL_TOKEN_LEN_MAX {
                return Err(format!(
                    "the token file of {} ({}) is {} bytes, the limit is {DRILL_TOKEN_LEN_MAX}",
                    self.principal,
                    file.display(),
                    meta.len()
                ));
            }
            let text = std::fs::read_to_string(file).map_err(|e| {
                format!(
                    "cannot read the token of {} from {}: {e}",
                    self.principal,
                    file.display()
                )
            })?;
            let t = text.trim();
            if t.is_empty() {
                return Err(format!(
                    "the token file of {} ({}) is empty",
                    self.principal,
                    file.display()
                ));
            }
            return Ok(t.to_string());
        }
        Err(format!("no token_env or token_file for {}", self.principal))
    }
}

/// One `[[drills]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    pub name: String,
    /// How often the drill runs, like `6h`; each run starts at a random
    /// moment in the first tenth of its period, so nodes and drills do not
    /// stampede.
    pub every: String,
    /// The canary target: a `postgres` target behind the PostgreSQL gateway
    /// or an `ssh` target behind the SSH gateway.
    pub target: String,
    pub role: String,
    /// The grant's duration, like `2m` (the run revokes it when done).
    pub duration: String,
    #[serde(default)]
    pub mode: DrillMode,
    /// The principal that requests: a workload or local principal.
    pub requester: DrillPrincipal,
    /// The principals that approve (or countersign) through the normal API.
    #[serde(default)]
    pub approvers: Vec<DrillPrincipal>,
    /// Each step of a run fails when it takes longer than this.
    #[serde(default = "default_step_timeout")]
    pub step_timeout: String,
}

fn default_step_timeout() -> String {
    "30s".into()
}

impl DrillConfig {
    /// `every` in seconds (validated at load).
    pub fn every_s(&self) -> u64 {
        parse_duration_at_most(&self.every, DRILL_EVERY_MAX_S).unwrap_or(6 * 3600)
    }

    /// `step_timeout` (validated at load).
    pub fn step_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(parse_duration(&self.step_timeout).unwrap_or(30))
    }
}

/// Checks every `[[drills]]` entry against the rest of the config; the error
/// names the entry and key.
pub fn validate(config: &Config) -> anyhow::Result<()> {
    if config.drills.len() > DRILLS_MAX {
        bail!("drills: more than {DRILLS_MAX} entries");
    }
    let mut names = BTreeSet::new();
    for (i, d) in config.drills.iter().enumerate() {
        let at = format!("drills[{i}]");
        check_name(&format!("{at}.name"), &d.name).map_err(|e| anyhow::anyhow!("{e}"))?;
        if !names.insert(d.name.as_str()) {
            bail!("{at}.name: duplicate drill {:?}", d.name);
        }
        // Longer than a grant may last: a drill's period is not a grant.
        let every = parse_duration_at_most(&d.every, DRILL_EVERY_MAX_S)
            .map_err(|e| anyhow::anyhow!("{at}.every: {e}"))?;
        if every < DRILL_EVERY_MIN_S {
            bail!("{at}.every: must be between 1s and 30d");
        }
        parse_duration(&d.duration).map_err(|e| anyhow::anyhow!("{at}.duration: {e}"))?;
        let step = parse_duration(&d.step_timeout)
            .map_err(|e| anyhow::anyhow!("{at}.step_timeout: {e}"))?;
        if !(1..=DRILL_STEP_TIMEOUT_MAX_S).contains(&step) {
            bail!("{at}.step_timeout: must be between 1s and 10m");
        }
        let Some(target) = config.target(&d.target) else {
            bail!(
                "{at}.target: no target {:?} in [[targets]] (a drill needs a canary target of its own)",
                d.target
            );
        };
        match target.kind.as_str() {
            "postgres" => {
                if config.gateway.postgres.is_none() {
                    bail!(
                        "{at}.target: a drill opens a session through the PostgreSQL gateway; configure [gateway.postgres]"
                    );
                }
            }
            "ssh" => {
                if config.gateway.ssh.is_none() {
                    bail!(
                        "{at}.target: a drill on an SSH target runs `true` through the SSH gateway; configure [gateway.ssh]"
                    );
                }
            }
            other => bail!(
                "{at}.target: target {:?} is of kind {other:?}; a drill needs a postgres or ssh target behind a gateway",
                d.target
            ),
        }
        if !target.roles.contains_key(&d.role) {
            bail!(
                "{at}.role: target {} has no role {:?} (roles: {})",
                target.name,
                d.role,
                target.roles.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        if d.approvers.len() > DRILL_APPROVERS_MAX {
            bail!("{at}.approvers: more than {DRILL_APPROVERS_MAX} principals");
        }
        let mut seen = BTreeSet::new();
        for (j, p) in std::iter::once(&d.requester)
            .chain(d.approvers.iter())
            .enumerate()
        {
            let key = if j == 0 {
                format!("{at}.requester")
            } else {
                format!("{at}.approvers[{}]", j - 1)
            };
            check_name(&format!("{key}.principal"), &p.principal)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if !seen.insert(p.principal.as_str()) {
                bail!(
                    "{key}.principal: {:?} appears twice among the drill's principals (the requester never approves, and an approver counts once)",
                    p.principal
                );
            }
            match (&p.token_env, &p.token_file) {
                (Some(_), Some(_)) => bail!("{key}: set token_env or token_file, not both"),
                (None, None) => bail!(
                    "{key}: the drill acts through the API with this principal's token; set token_env or token_file"
                ),
                _ => {}
            }
        }
        let requester = &d.requester.principal;
        let local = config.principals.iter().find(|p| &p.name == requester);
        let workload = config
            .identity
            .workload_prefixes()
            .iter()
            .any(|w| requester.starts_with(w.as_str()));
        match local {
            Some(p) if p.kind == crate::config::PrincipalKind::Service => bail!(
                "{at}.requester.principal: {requester:?} is a service principal, which may not request"
            ),
            Some(_) => {}
            None if workload => {}
            None => bail!(
                "{at}.requester.principal: {requester:?} is neither a [[principals]] entry nor a workload name"
            ),
        }
    }
    Ok(())
}

/// Resolves relative `token_file`s against the config's directory.
pub fn resolve_paths(config: &mut Config, base: &Path) {
    for d in &mut config.drills {
        for p in std::iter::once(&mut d.requester).chain(d.approvers.iter_mut()) {
            if let Some(f) = p.token_file.as_mut()
                && f.is_relative()
            {
                *f = base.join(&*f);
            }
        }
    }
}

impl Config {
    /// The `[[drills]]` entry named `name`.
    pub fn drill(&self, name: &str) -> Option<&DrillConfig> {
        self.drills.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
    const HEX2: &str = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

    /// A config with a postgres and an ssh target, the gateway, two
    /// principals, and `drill` as the only drill.
    fn parse(drill: &str) -> String {
        let text = format!(
            r#"
[server]
data_dir = "data"
[policy]
file = "p.cedar"
[gateway.postgres]
listen = "127.0.0.1:6432"
[[principals]]
name = "bot"
token_sha256 = "{HEX}"
[[principals]]
name = "approver"
token_sha256 = "{HEX2}"
[[targets]]
name = "canary"
kind = "postgres"
upstream = "postgres://127.0.0.1:5432/app"
[targets.roles.read]
user = "u"
[[targets]]
name = "box"
kind = "ssh"
upstream = "ssh://127.0.0.1:22"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMRqDckyw+l2fyqXEkP5USK3OTXD7oFo9OlTXbHyaEjv"
[targets.roles.login]
user = "root"
[[drills]]
{drill}
"#
        );
        match Config::parse(&text, "test.toml", Path::new("/etc/bg")) {
            Ok(c) => format!(
                "ok {:?}",
                c.drills[0]
                    .approvers
                    .first()
                    .and_then(|a| a.token_file.clone())
            ),
            Err(e) => e.to_string(),
        }
    }

    const OK: &str = r#"name = "d"
every = "6h"
target = "canary"
role = "read"
duration = "2m"
requester = { principal = "bot", token_env = "BOT_TOKEN" }
approvers = [{ principal = "approver", token_file = "approver.token" }]"#;

    #[test]
    fn a_drill_is_checked_against_the_rest_of_the_config() {
        let check = |from: &str, to: &str| parse(&OK.replacen(from, to, 1));
        assert_eq!(parse(OK), "ok Some(\"/etc/bg/approver.token\")");
        for (from, to, want) in [
            (
                "\"canary\"",
                "\"box\"",
                "drills[0].target: a drill on an SSH target runs `true` through the SSH gateway; configure [gateway.ssh]",
            ),
            (
                "\"canary\"",
                "\"nope\"",
                "drills[0].target: no target \"nope\"",
            ),
            (
                "\"6h\"",
                "\"31d\"",
                "drills[0].every: duration \"31d\" is longer than the maximum of 2592000s",
            ),
            (
                "\"read\"",
                "\"write\"",
                "drills[0].role: target canary has no role \"write\"",
            ),
            ("\"6h\"", "\"0s\"", "drills[0].every"),
            (
                "principal = \"bot\"",
                "principal = \"stranger\"",
                "drills[0].requester.principal: \"stranger\" is neither",
            ),
            (
                "principal = \"approver\"",
                "principal = \"bot\"",
                "appears twice",
            ),
            (
                ", token_env = \"BOT_TOKEN\"",
                "",
                "drills[0].requester: the drill acts through the API",
            ),
            (
                "token_env = \"BOT_TOKEN\"",
                "token_env = \"A\", token_file = \"f\"",
                "not both",
            ),
            (
                "name = \"d\"",
                "name = \"d\"\nmode = \"chaos\"",
                "unknown variant",
            ),
            (
                "name = \"d\"",
                "name = \"d\"\nshell = true",
                "unknown field `shell`",
            ),
        ] {
            let got = check(from, to);
            assert!(got.contains(want), "{from} -> {to}: {got}");
        }
        // A period may be longer than any grant.
        assert!(check("\"6h\"", "\"30d\"").starts_with("ok"));
    }

    #[test]
    fn an_unknown_approver_is_allowed_so_the_drill_fails_loudly_at_its_approval_step() {
        let got = parse(&OK.replacen("principal = \"approver\"", "principal = \"gone\"", 1));
        assert!(got.starts_with("ok"), "{got}");
    }
}
