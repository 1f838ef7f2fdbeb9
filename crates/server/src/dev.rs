//! `breakglass serve --dev`: a throwaway setup on the embedded store with
//! demo principals, targets and policy, loopback only. Not for production,
//! and it says so.

use std::path::{Path, PathBuf};

use anyhow::Context;
use breakglass_core::token::sha256_hex;
use rand::RngCore;

use crate::config::Config;

pub const DEMO_POLICY: &str = r#"// Demo policy of `breakglass serve --dev`.

@id("oncall-db-read")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "read" };

@id("oncall-db-admin")
@approvals("2")
@approvers("sre-leads,security")
@max_duration("15m")
@require_ticket("^INC-[0-9]+$")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "admin" };

@id("ic-emergency")
@approvals("0")
@approvers("sre-leads")
@countersign_within("5m")
@max_duration("10m")
permit (principal in Group::"incident-commanders", action == Action::"emergency",
        resource in TargetGroup::"production");

@id("staging-self-service")
@approvals("0")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"staging");

@id("one-hour-cap")
forbid (principal, action, resource) when { context.duration_s > 3600 };
"#;

/// Demo principals: name, groups, what they show.
pub const DEMO_PRINCIPALS: [(&str, &[&str], &str); 5] = [
    ("alice", &["oncall"], "on-call engineer: requests access"),
    ("bob", &["sre-leads"], "SRE lead: approves"),
    (
        "carol",
        &["sre-leads", "security"],
        "SRE lead and security (admin): approves, revokes, reads the audit log",
    ),
    (
        "dave",
        &["security"],
        "security (admin): second approver for admin access",
    ),
    (
        "erin",
        &["incident-commanders", "oncall"],
        "incident commander: emergency self-activation",
    ),
];

/// A prepared dev setup: the config written into `data_dir`, and the tokens.
pub struct DevSetup {
    pub config_path: PathBuf,
    pub config: Config,
    pub tokens: Vec<(String, String)>,
}

fn new_token() -> String {
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("bgt_{}", hex::encode(b))
}

/// Writes a demo config and policy into `data_dir` (a new temp dir when
/// none is given) with fresh random tokens.
pub fn prepare(data_dir: Option<&Path>, listen: std::net::SocketAddr) -> anyhow::Result<DevSetup> {
    let dir = match data_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let mut b = [0u8; 6];
            rand::rngs::OsRng.fill_bytes(&mut b);
            std::env::temp_dir().join(format!("breakglass-dev-{}", hex::encode(b)))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut toml = format!(
        "# Written by `breakglass serve --dev`. Demo only: not for production.\n\
         [server]\nlisten = \"{listen}\"\ndata_dir = \".\"\npending_timeout = \"30m\"\nadmin_groups = [\"security\"]\n\n\
         [policy]\nfile = \"policy.cedar\"\n\n"
    );
    let mut tokens = Vec::new();
    for (name, groups, _) in DEMO_PRINCIPALS {
        let token = new_token();
        let groups: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
        toml.push_str(&format!(
            "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
            groups.join(", "),
            sha256_hex(token.as_bytes())
        ));
        tokens.push((name.to_string(), token));
    }
    toml.push_str(
        "[[targets]]\nname = \"prod-db\"\nkind = \"postgres\"\ngroups = [\"production\"]\nupstream = \"postgres://127.0.0.1:5432/app\"\n\
         [targets.roles.read]\nuser = \"bg_read\"\npassword_env = \"PROD_DB_READ_PASSWORD\"\n\
         [targets.roles.admin]\nuser = \"bg_admin\"\npassword_env = \"PROD_DB_ADMIN_PASSWORD\"\n\n\
         [[targets]]\nname = \"staging-db\"\nkind = \"postgres\"\ngroups = [\"staging\"]\nupstream = \"postgres://127.0.0.1:5433/app\"\n\
         [targets.roles.read]\nuser = \"bg_read\"\npassword_env = \"STAGING_DB_READ_PASSWORD\"\n",
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, toml)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    std::fs::write(dir.join("policy.cedar"), DEMO_POLICY)
        .with_context(|| format!("cannot write the demo policy in {}", dir.display()))?;
    let config = Config::load(&config_path)?;
    Ok(DevSetup {
        config_path,
        config,
        tokens,
    })
}

/// The loud banner with tokens and next steps.
pub fn banner(setup: &DevSetup, url: &str) -> String {
    let mut s = String::new();
    s.push_str("\n==================================================================\n");
    s.push_str("  breakglass DEV MODE: demo principals, demo policy, throwaway data.\n");
    s.push_str("  NOT FOR PRODUCTION. Tokens below are printed in clear on purpose.\n");
    s.push_str("==================================================================\n\n");
    s.push_str(&format!(
        "API:     {url}\nConfig:  {}\n\n",
        setup.config_path.display()
    ));
    for ((name, token), (_, _, what)) in setup.tokens.iter().zip(DEMO_PRINCIPALS) {
        s.push_str(&format!("  {name:<6} {token}   # {what}\n"));
    }
    let tok = |n: &str| {
        setup
            .tokens
            .iter()
            .find(|(name, _)| name == n)
            .map_or(String::new(), |(_, t)| t.clone())
    };
    s.push_str(&format!(
        "\nTry it (each line in a shell of that person):\n\
         \x20 export BREAKGLASS_URL={url}\n\
         \x20 BREAKGLASS_TOKEN={} breakglass request prod-db --role read --duration 15m --reason \"disk full on primary\"\n\
         \x20 BREAKGLASS_TOKEN={} breakglass approve <ID>\n\
         \x20 BREAKGLASS_TOKEN={} breakglass credentials <ID>\n\
         \x20 BREAKGLASS_TOKEN={} breakglass audit export\n\
         \x20 breakglass audit verify --config {}\n\n",
        tok("alice"),
        tok("bob"),
        tok("alice"),
        tok("carol"),
        setup.config_path.display()
    ));
    s
}
