//! `[identity.oidc]` and `[[identity.workloads]]`: where people's and
//! workloads' tokens come from, validated at load.

use std::collections::BTreeMap;

use anyhow::bail;
use serde::Deserialize;

/// `[[identity.workloads]]` entries at most.
pub const WORKLOADS_MAX: usize = 256;
/// Exact-match claims of one workload entry at most.
pub const WORKLOAD_CLAIMS_MAX: usize = 32;
/// Longest issuer URL accepted.
pub const ISSUER_LEN_MAX: usize = 512;

/// `[identity]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// People: the organisation's OpenID Connect identity provider.
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// CI/CD and cloud workloads' OIDC tokens.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
}

/// `[identity.oidc]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL exactly as the provider's tokens say it (`iss`); its
    /// discovery document is `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// The client the CLI signs in as (a public client).
    pub client_id: String,
    /// Environment variable holding the client secret, for the web
    /// console's authorization code flow. The API does not need it.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// The audience ID tokens must carry (default: `client_id`).
    #[serde(default)]
    pub audience: Option<String>,
    /// The claim that names the person.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// The claim listing the person's groups (a list of strings).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// `amr` values that count as a second factor (`@require_mfa`).
    #[serde(default = "default_mfa_amr")]
    pub mfa_amr: Vec<String>,
    /// Scopes the CLI asks for (served by `GET /v1/auth/config`).
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
}

fn default_username_claim() -> String {
    "preferred_username".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_mfa_amr() -> Vec<String> {
    ["mfa", "otp", "hwk", "swk"].map(String::from).to_vec()
}

/// `openid` for an ID token, `profile` for the username, `offline_access`
/// for a refresh token, `groups` for the groups claim (Keycloak, Okta and
/// others release it only on that scope).
fn default_scopes() -> Vec<String> {
    ["openid", "profile", "offline_access", "groups"]
        .map(String::from)
        .to_vec()
}

impl OidcConfig {
    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(&self.client_id)
    }
}

/// `[[identity.workloads]]`: tokens of one kind of workload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The principal's name, with `{claim}` placeholders filled from the
    /// token, e.g. `"gha:{repository}:{environment}"`.
    pub name: String,
    /// The token issuer (`iss`), e.g.
    /// `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// The audience the token must carry (required: a token minted for
    /// another service must not work here).
    pub audience: String,
    /// Claims that must match exactly, e.g. `repository = "acme/payments"`.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// Groups the workload is in, as policy sees them.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A name template split into literal text and claim placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Claim(String),
}

/// Parses `"gha:{repository}:{environment}"`. Every placeholder names a
/// claim (letters, digits, `_`, `-`, `.`); braces must balance; at least
/// one placeholder is needed, or every token would be the same principal.
pub fn parse_template(t: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = t.chars();
    while let Some(c) = chars.next() {
        match c {
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err(format!("placeholder {{{name} is not closed"));
                }
                if name.is_empty() {
                    return Err("a placeholder {} names no claim".into());
                }
                if !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                {
                    return Err(format!("placeholder {{{name}}} is not a claim name"));
                }
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(Piece::Claim(name));
            }
            '}' => return Err("a closing brace without an opening one".into()),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    if !out.iter().any(|p| matches!(p, Piece::Claim(_))) {
        return Err(
            "names no claim: give at least one {claim} placeholder so each workload is told apart"
                .into(),
        );
    }
    match out.first() {
        Some(Piece::Text(prefix)) if prefix.ends_with(':') && prefix.len() > 1 => {}
        _ => {
            return Err(
                "must start with a fixed prefix ending in ':' (e.g. \"gha:\"), so workload names never look like people's".into(),
            );
        }
    }
    Ok(out)
}

/// Whether an issuer URL is acceptable: https, or http on loopback only.
pub fn check_issuer_url(url: &str) -> Result<(), String> {
    if url.len() > ISSUER_LEN_MAX {
        return Err(format!("longer than {ISSUER_LEN_MAX} characters"));
    }
    if url.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be a plain URL without query, fragment or spaces".into());
    }
    if let Some(rest) = url.strip_prefix("https://") {
        if rest.is_empty() || rest.starts_with('/') {
            return Err("has no host".into());
        }
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let authority = rest.split('/').next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        if is_loopback(host) {
            return Ok(());
        }
        return Err("plain http is accepted on loopback only; use https".into());
    }
    Err("must start with https://".into())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

impl IdentityConfig {
    /// The fixed prefixes of the workload name templates (`gha:`): names
    /// in these name spaces are workloads', never a person's or a local
    /// principal's.
    pub fn workload_prefixes(&self) -> Vec<String> {
        self.workloads
            .iter()
            .filter_map(|w| match parse_template(&w.name).ok()?.first()? {
                Piece::Text(t) => Some(t.clone()),
                Piece::Claim(_) => None,
            })
            .collect()
    }

    /// Checks every key, naming it in the error.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(o) = &self.oidc {
            check_issuer_url(&o.issuer)
                .map_err(|e| anyhow::anyhow!("identity.oidc.issuer: {e}"))?;
            for (key, v) in [
                ("client_id", &o.client_id),
                ("username_claim", &o.username_claim),
                ("groups_claim", &o.groups_claim),
            ] {
                if v.trim().is_empty() || v.len() > 256 {
                    bail!("identity.oidc.{key}: must be 1 to 256 characters");
                }
            }
            if o.audience.as_ref().is_some_and(|a| a.trim().is_empty()) {
                bail!("identity.oidc.audience: must not be empty (leave it out to use client_id)");
            }
            if !o.scopes.iter().any(|s| s == "openid") {
                bail!("identity.oidc.scopes: must include \"openid\" (the CLI needs an ID token)");
            }
            if o.scopes.len() > 32 || o.mfa_amr.len() > 32 {
                bail!("identity.oidc: scopes and mfa_amr hold at most 32 values each");
            }
        }
        if self.workloads.len() > WORKLOADS_MAX {
            bail!("identity.workloads: more than {WORKLOADS_MAX} entries");
        }
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("identity.workloads[{i}]");
            parse_template(&w.name).map_err(|e| anyhow::anyhow!("{at}.name: {e}"))?;
            check_issuer_url(&w.issuer).map_err(|e| anyhow::anyhow!("{at}.issuer: {e}"))?;
            if self.oidc.as_ref().is_some_and(|o| o.issuer == w.issuer) {
                bail!(
                    "{at}.issuer: the same issuer as identity.oidc.issuer; its tokens are people's (a token is told apart by its issuer)"
                );
            }
            if w.audience.trim().is_empty() {
                bail!("{at}.audience: required and not empty");
            }
            if w.claims.len() > WORKLOAD_CLAIMS_MAX {
                bail!("{at}.claims: more than {WORKLOAD_CLAIMS_MAX} claims");
            }
            for g in &w.groups {
                breakglass_core::lifecycle::check_name(&format!("{at}.groups"), g)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_must_name_claims() {
        assert_eq!(
            parse_template("gha:{repository}:{environment}").expect("parses"),
            vec![
                Piece::Text("gha:".into()),
                Piece::Claim("repository".into()),
                Piece::Text(":".into()),
                Piece::Claim("environment".into()),
            ]
        );
        assert!(parse_template("gha:static").is_err());
        assert!(parse_template("gha:{}").is_err());
        assert!(parse_template("gha:{repo").is_err());
        assert!(parse_template("gha:repo}").is_err());
        assert!(parse_template("gha:{a b}").is_err());
        assert!(parse_template("{repository}").is_err(), "no prefix");
        assert!(parse_template("gha{repository}").is_err(), "no ':'");
    }

    fn validate(text: &str) -> String {
        match toml::from_str::<IdentityConfig>(text) {
            Ok(c) => c
                .validate()
                .map_or_else(|e| e.to_string(), |()| "ok".into()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn identity_tables_are_checked_at_load_naming_the_key() {
        let oidc = "[oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"bg\"\n";
        assert_eq!(validate(oidc), "ok");
        let gha = "[[workloads]]\nname = \"gha:{repository}\"\nissuer = \"https://token.actions.githubusercontent.com\"\naudience = \"bg\"\n";
        assert_eq!(validate(&format!("{oidc}{gha}")), "ok");
        for (text, want) in [
            (
                "[oidc]\nissuer = \"http://idp.example.com\"\nclient_id = \"bg\"\n".to_string(),
                "identity.oidc.issuer: plain http is accepted on loopback only",
            ),
            (
                format!("{oidc}scopes = [\"profile\"]\n"),
                "identity.oidc.scopes: must include \"openid\"",
            ),
            (
                gha.replace("gha:{repository}", "{repository}"),
                "identity.workloads[0].name: must start with a fixed prefix",
            ),
            (
                gha.replace("gha:{repository}", "gha:static"),
                "identity.workloads[0].name: names no claim",
            ),
            (
                gha.replace("audience = \"bg\"", "audience = \"\""),
                "identity.workloads[0].audience: required",
            ),
            (
                format!(
                    "{oidc}{}",
                    gha.replace(
                        "https://token.actions.githubusercontent.com",
                        "https://idp.example.com"
                    )
                ),
                "identity.workloads[0].issuer: the same issuer as identity.oidc.issuer",
            ),
            (
                format!("{oidc}colour = \"blue\"\n"),
                "unknown field `colour`",
            ),
        ] {
            let got = validate(&text);
            assert!(got.contains(want), "{text}\n=> {got}");
        }
    }

    #[test]
    fn plain_http_issuers_only_on_loopback() {
        assert!(check_issuer_url("https://login.example.com/realms/x").is_ok());
        assert!(check_issuer_url("http://127.0.0.1:8080/").is_ok());
        assert!(check_issuer_url("http://[::1]:9/x").is_ok());
        assert!(check_issuer_url("http://localhost:3000").is_ok());
        assert!(check_issuer_url("http://idp.example.com").is_err());
        assert!(check_issuer_url("http://127.0.0.1.evil.com/").is_err());
        assert!(check_issuer_url("ftp://x").is_err());
        assert!(check_issuer_url("https://").is_err());
    }
}
