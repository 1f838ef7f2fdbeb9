//! Who is calling: every bearer token becomes a [`Principal`] (name,
//! groups, kind, how it authenticated) before policy or lifecycle sees it.
//!
//! - A token shaped like a JWT is verified as an ID token of
//!   `[identity.oidc]` or a workload token of `[[identity.workloads]]`,
//!   chosen by its `iss`; it is never tried as a local token.
//! - Anything else is a local principal's token (`[[principals]]`,
//!   compared by SHA-256 in constant time), plus a TOTP code when the
//!   principal has a TOTP secret.
//!
//! Issuers' keys come from their discovery document and JWKS
//! ([`keys::KeySource`]), cached in memory and in the data dir.

pub mod config;
pub mod jwt;
pub mod keys;
pub mod totp;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use breakglass_core::model::NAME_LEN_MAX;
use breakglass_core::token::{self, match_token};
use breakglass_core::{AuthMethod, Authn, Principal, PrincipalKind, Timestamp};
use breakglass_store::Store;
use serde_json::Value;
use thiserror::Error;

use crate::config::Config;
use config::{OidcConfig, Piece, WorkloadConfig, parse_template};
use jwt::{Expect, JwtError, LEEWAY_MAX_S};
use keys::KeySource;
use totp::{Totp, TotpRefusal};

/// Why a call is not authenticated.
/// Wrong one-time codes a local principal may send per 30 s time step (per
/// node) before codes are refused unchecked until the next step.
pub const TOTP_WRONG_PER_STEP_MAX: u32 = 5;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The token is a local principal's with TOTP, and no code was sent.
    #[error(
        "{0} needs a one-time code: send the current TOTP code in the X-Breakglass-OTP header (breakglass --otp CODE)"
    )]
    OtpRequired(String),
    #[error("{0}")]
    Refused(String),
    /// The store that remembers used one-time codes did not answer.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
}

impl From<JwtError> for AuthError {
    fn from(e: JwtError) -> Self {
        AuthError::Refused(e.to_string())
    }
}

struct Local {
    digest: [u8; 32],
    principal: Principal,
    /// `Some(Err)` when the principal has a TOTP secret that could not be
    /// read: it cannot sign in at all (fail closed).
    totp: Option<Result<Totp, String>>,
}

struct Oidc {
    config: OidcConfig,
    source: Arc<KeySource>,
}

struct Workload {
    config: WorkloadConfig,
    template: Vec<Piece>,
    source: Arc<KeySource>,
}

/// The service's view of identity: OIDC, workloads, local principals.
pub struct Identity {
    oidc: Option<Oidc>,
    workloads: Vec<Workload>,
    /// One per distinct issuer.
    sources: Vec<Arc<KeySource>>,
    locals: Vec<Local>,
    /// The newest TOTP step accepted per local principal: a code is
    /// accepted once, and never one older than the newest accepted.
    totp_last: Mutex<HashMap<String, u64>>,
    /// Wrong one-time codes per local principal in the current time step
    /// (step, count): beyond [`TOTP_WRONG_PER_STEP_MAX`] codes are not
    /// even checked until the next step, so guessing takes weeks.
    totp_wrong: Mutex<HashMap<String, (u64, u32)>>,
    admin_groups: BTreeSet<String>,
    /// The fixed prefixes of workload names (`gha:`): no person's name
    /// starts with one.
    workload_prefixes: Vec<String>,
    /// People of the identity provider seen on this node, by verified
    /// e-mail (lowercased), as their newest ID token made them, until it
    /// expires: chat integrations act as them (`person_by_email`).
    people: Mutex<HashMap<String, Principal>>,
}

/// People remembered by e-mail at most (expired ones are dropped first).
pub const PEOPLE_REMEMBERED_MAX: usize = 10_000;
/// The longest e-mail address remembered.
pub const EMAIL_LEN_MAX: usize = 254;

/// `/readyz`'s word on identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No identity provider is configured (local principals only).
    Off,
    Ok,
    /// An issuer could not be reached at the last attempt: its cached keys
    /// keep working.
    Degraded,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Off => "off",
            Health::Ok => "ok",
            Health::Degraded => "degraded",
        }
    }
}

/// Reads a TOTP secret from the environment or a file.
pub fn read_totp_secret(p: &crate::config::PrincipalConfig) -> Option<Result<Vec<u8>, String>> {
    let text = match (&p.totp_secret_env, &p.totp_secret_file) {
        (Some(var), _) => std::env::var(var)
            .map_err(|_| format!("environment variable {var} (totp_secret_env) is not set")),
        (None, Some(file)) => std::fs::read_to_string(file).map_err(|e| {
            format!(
                "cannot read totp_secret_file {}: {}",
                file.display(),
                e.kind()
            )
        }),
        (None, None) => return None,
    };
    Some(text.and_then(|t| totp::decode_base32(t.trim()).map_err(|e| format!("TOTP secret {e}"))))
}

/// Fails start-up when a local principal's TOTP secret cannot be read or
/// is not a valid base32 secret, naming the principal (never the secret).
pub fn check_totp_secrets(config: &Config) -> anyhow::Result<()> {
    for (i, p) in config.principals.iter().enumerate() {
        if let Some(Err(e)) = read_totp_secret(p) {
            anyhow::bail!("principals[{i}] ({}): {e}", p.name);
        }
    }
    Ok(())
}

/// Names a workload may be given: printable, no spaces, at most
/// [`NAME_LEN_MAX`] bytes; `/` is allowed (repositories are `owner/name`).
fn check_workload_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Err(format!("is empty or longer than {NAME_LEN_MAX} bytes"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':' | '/'))
    {
        return Err("may only contain letters, digits and - _ . @ : /".into());
    }
    Ok(())
}

/// A group name from a token: 1 to [`NAME_LEN_MAX`] bytes, no control or
/// invisible characters.
fn check_group(g: &str) -> Result<(), String> {
    if g.is_empty() || g.len() > NAME_LEN_MAX {
        return Err(format!(
            "a group is empty or longer than {NAME_LEN_MAX} bytes"
        ));
    }
    breakglass_core::model::check_text_chars("group", g)?;
    if g.contains(['\n', '\t']) {
        return Err("a group contains a tab or newline".into());
    }
    Ok(())
}

impl Identity {
    /// Builds the identity sources of `config`. Fetching keys starts with
    /// [`Identity::spawn_refresh`]; until then cached keys are used.
    pub fn new(config: &Config) -> Identity {
        let admin_groups: BTreeSet<String> = config.server.admin_groups.iter().cloned().collect();
        let cache_dir = config.server.data_dir.join("identity");
        let mut sources: Vec<Arc<KeySource>> = Vec::new();
        let mut source_for = |issuer: &str| -> Arc<KeySource> {
            if let Some(s) = sources.iter().find(|s| s.issuer() == issuer) {
                return s.clone();
            }
            let s = Arc::new(KeySource::new(issuer, Some(&cache_dir)));
            sources.push(s.clone());
            s
        };
        let oidc = config.identity.oidc.as_ref().map(|c| Oidc {
            config: c.clone(),
            source: source_for(&c.issuer),
        });
        let workloads = config
            .identity
            .workloads
            .iter()
            .filter_map(|w| {
                Some(Workload {
                    config: w.clone(),
                    // Validated at load.
                    template: parse_template(&w.name).ok()?,
                    source: source_for(&w.issuer),
                })
            })
            .collect();
        let locals = config
            .principals
            .iter()
            .filter_map(|p| {
                let groups: BTreeSet<String> = p.groups.iter().cloned().collect();
                let admin = groups.iter().any(|g| admin_groups.contains(g));
                Some(Local {
                    digest: token::parse_sha256_hex(&p.token_sha256)?,
                    principal: Principal::local(p.name.clone(), groups, admin),
                    totp: read_totp_secret(p).map(|r| r.map(|s| Totp::new(&s))),
                })
            })
            .collect();
        Identity {
            oidc,
            workloads,
            sources,
            locals,
            totp_last: Mutex::new(HashMap::new()),
            totp_wrong: Mutex::new(HashMap::new()),
            admin_groups,
            workload_prefixes: config.identity.workload_prefixes(),
            people: Mutex::new(HashMap::new()),
        }
    }

    /// The identity provider's person whose verified e-mail is `email`, as
    /// their newest ID token seen on this node made them, while that token
    /// has not expired. A chat click signed by the chat service and tied to
    /// the same verified e-mail acts with exactly what that token grants.
    pub fn person_by_email(&self, email: &str, now: Timestamp) -> Option<Principal> {
        let people = self.people.lock().unwrap_or_else(|p| p.into_inner());
        let who = people.get(&email.to_lowercase())?;
        who.authn
            .expires_at
            .is_some_and(|exp| exp > now)
            .then(|| who.clone())
    }

    /// Remembers a person by the verified e-mail of their ID token.
    fn remember(&self, claims: &serde_json::Map<String, Value>, who: &Principal, now: Timestamp) {
        let (Some(email), Some(true)) = (
            claims.get("email").and_then(Value::as_str),
            claims.get("email_verified").and_then(Value::as_bool),
        ) else {
            return;
        };
        if email.len() > EMAIL_LEN_MAX
            || !email.contains('@')
            || email.chars().any(char::is_control)
        {
            return;
        }
        let key = email.to_lowercase();
        let mut people = self.people.lock().unwrap_or_else(|p| p.into_inner());
        // A token no newer than the one remembered changes nothing (the
        // same token on every call of a session: no copy per call).
        if let Some(known) = people.get(&key)
            && known.authn.issued_at >= who.authn.issued_at
        {
            return;
        }
        if people.len() >= PEOPLE_REMEMBERED_MAX && !people.contains_key(&key) {
            people.retain(|_, p| p.authn.expires_at.is_some_and(|e| e > now));
            if people.len() >= PEOPLE_REMEMBERED_MAX {
                return;
            }
        }
        people.insert(key, who.clone());
    }

    /// Fetches every issuer's keys now and then on a timer, in the
    /// background.
    pub fn spawn_refresh(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.sources
            .iter()
            .map(|s| s.clone().spawn_refresh())
            .collect()
    }

    pub fn health(&self) -> Health {
        if self.sources.is_empty() {
            Health::Off
        } else if self.sources.iter().all(|s| s.healthy()) {
            Health::Ok
        } else {
            Health::Degraded
        }
    }

    pub fn oidc(&self) -> Option<&OidcConfig> {
        self.oidc.as_ref().map(|o| &o.config)
    }

    /// Whether `name` may belong to a principal the service knows: a local
    /// principal, any person when an identity provider is configured, or a
    /// name one of the workload templates can produce.
    pub fn may_know(&self, name: &str) -> bool {
        if self.locals.iter().any(|l| l.principal.name == name) || self.oidc.is_some() {
            return true;
        }
        self.workload_prefixes
            .iter()
            .any(|prefix| name.starts_with(prefix.as_str()))
    }

    /// Authenticates one call: `bearer` is the token, `otp` the
    /// `X-Breakglass-OTP` header.
    pub async fn authenticate(
        &self,
        bearer: &str,
        otp: Option<&str>,
        now: Timestamp,
        codes: &dyn Store,
    ) -> Result<Principal, AuthError> {
        if bearer.is_empty() {
            return Err(AuthError::Refused(
                "missing bearer token (Authorization: Bearer TOKEN)".into(),
            ));
        }
        // INVARIANT: a JWT is verified as one, never as a local token.
        let result = if jwt::looks_like_jwt(bearer) {
            self.verify_jwt(bearer, now).await
        } else {
            self.local(bearer, otp, now, codes).await
        };
        // Refusals are logged with their reason (never the token), so
        // guessing at codes or replaying old tokens shows in the log.
        if let Err(AuthError::Refused(why)) = &result {
            // Debug formatting escapes control characters a token may carry.
            tracing::info!(reason = ?why, "authentication refused");
        }
        result
    }

    async fn local(
        &self,
        bearer: &str,
        otp: Option<&str>,
        now: Timestamp,
        codes: &dyn Store,
    ) -> Result<Principal, AuthError> {
        let local = match_token(bearer, self.locals.iter().map(|l| (&l.digest, l)))
            .ok_or_else(|| AuthError::Refused("unknown bearer token".into()))?;
        let mut who = local.principal.clone();
        let Some(totp) = &local.totp else {
            return Ok(who);
        };
        let totp = totp.as_ref().map_err(|e| {
            tracing::error!(principal = %who.name, error = %e, "TOTP secret unreadable: the principal cannot sign in");
            AuthError::Refused(format!(
                "{} cannot sign in: its TOTP secret is not readable on the server",
                who.name
            ))
        })?;
        let Some(code) = otp.filter(|c| !c.trim().is_empty()) else {
            return Err(AuthError::OtpRequired(who.name));
        };
        let replayed = || {
            AuthError::Refused(format!(
                "this one-time code of {} was already used (or a newer one was); wait for the next code",
                who.name
            ))
        };
        let last = self
            .totp_last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&who.name)
            .copied();
        let current = Totp::step_of(now);
        let wrong_so_far = |map: &HashMap<String, (u64, u32)>| match map.get(&who.name) {
            Some((step, n)) if *step == current => *n,
            _ => 0,
        };
        if wrong_so_far(&self.totp_wrong.lock().unwrap_or_else(|p| p.into_inner()))
            >= TOTP_WRONG_PER_STEP_MAX
        {
            return Err(AuthError::Refused(format!(
                "too many wrong one-time codes for {} just now; wait for the next code ({} s)",
                who.name,
                totp::STEP_S
            )));
        }
        let step = totp.check(code, now, last).map_err(|r| match r {
            TotpRefusal::Malformed => {
                AuthError::Refused("the one-time code must be 6 digits".into())
            }
            TotpRefusal::Wrong => {
                let mut wrong = self.totp_wrong.lock().unwrap_or_else(|p| p.into_inner());
                let n = wrong_so_far(&wrong) + 1;
                wrong.insert(who.name.clone(), (current, n));
                AuthError::Refused(format!("wrong one-time code for {}", who.name))
            }
            TotpRefusal::Replayed => replayed(),
        })?;
        // INVARIANT: the store decides whether the step is new, atomically
        // and durably, so a code is accepted once across every node and
        // every restart; the map above only answers repeats early.
        let fresh = codes
            .use_one_time_code(&who.name, step)
            .await
            .map_err(|e| AuthError::StoreUnavailable(e.to_string()))?;
        if !fresh {
            return Err(replayed());
        }
        let mut last = self.totp_last.lock().unwrap_or_else(|p| p.into_inner());
        let newest = last.entry(who.name.clone()).or_insert(step);
        *newest = (*newest).max(step);
        who.authn = Authn {
            method: AuthMethod::LocalTotp,
            auth_time: Some(now),
            issued_at: None,
            expires_at: None,
            mfa: true,
            claims: BTreeMap::new(),
        };
        Ok(who)
    }

    async fn verify_jwt(&self, bearer: &str, now: Timestamp) -> Result<Principal, AuthError> {
        let jws = jwt::decode(bearer)?;
        // The issuer picks the keys; it is verified again with the claims.
        let iss = jws
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::MissingClaim("iss".into()))?
            .to_string();
        if let Some(oidc) = self.oidc.as_ref().filter(|o| o.config.issuer == iss) {
            let keys = oidc.source.keys_for(jws.kid.as_deref()).await;
            jws.verify(&keys)?;
            return self.person(&oidc.config, &jws.claims, now);
        }
        let entries: Vec<&Workload> = self
            .workloads
            .iter()
            .filter(|w| w.config.issuer == iss)
            .collect();
        let Some(first) = entries.first() else {
            return Err(AuthError::Refused(format!(
                "issuer {:?} is not configured (neither identity.oidc nor a workload entry)",
                iss.chars().take(128).collect::<String>()
            )));
        };
        let keys = first.source.keys_for(jws.kid.as_deref()).await;
        jws.verify(&keys)?;
        self.workload(&entries, &jws.claims, now)
    }

    fn person(
        &self,
        c: &OidcConfig,
        claims: &serde_json::Map<String, Value>,
        now: Timestamp,
    ) -> Result<Principal, AuthError> {
        let reg = jwt::validate(
            claims,
            &Expect {
                issuer: &c.issuer,
                audience: c.audience(),
                azp: &c.client_id,
                leeway_s: LEEWAY_MAX_S,
                now,
            },
        )?;
        let name = jwt::claim_text(claims, &c.username_claim)
            .ok_or_else(|| JwtError::MissingClaim(c.username_claim.clone()))?;
        breakglass_core::lifecycle::check_name("username", &name)
            .map_err(|e| JwtError::BadClaim(c.username_claim.clone(), e.to_string()))?;
        if let Some(prefix) = self
            .workload_prefixes
            .iter()
            .find(|p| name.starts_with(p.as_str()))
        {
            return Err(JwtError::BadClaim(
                c.username_claim.clone(),
                format!("{name:?} is in the name space of workload names ({prefix:?})"),
            )
            .into());
        }
        if name == "system" {
            return Err(JwtError::BadClaim(
                c.username_claim.clone(),
                "\"system\" is reserved for the service itself".into(),
            )
            .into());
        }
        let groups: BTreeSet<String> = match claims.get(&c.groups_claim) {
            Some(Value::Array(list)) => {
                if list.len() > jwt::GROUPS_MAX {
                    return Err(JwtError::BadClaim(
                        c.groups_claim.clone(),
                        format!("more than {} groups", jwt::GROUPS_MAX),
                    )
                    .into());
                }
                list.iter()
                    .map(|g| {
                        let g = g.as_str().ok_or_else(|| {
                            JwtError::BadClaim(
                                c.groups_claim.clone(),
                                "not a list of strings".into(),
                            )
                        })?;
                        check_group(g)
                            .map_err(|e| JwtError::BadClaim(c.groups_claim.clone(), e))?;
                        Ok(g.to_string())
                    })
                    .collect::<Result<_, JwtError>>()?
            }
            Some(Value::String(g)) => {
                check_group(g).map_err(|e| JwtError::BadClaim(c.groups_claim.clone(), e))?;
                BTreeSet::from([g.clone()])
            }
            Some(_) => {
                return Err(JwtError::BadClaim(
                    c.groups_claim.clone(),
                    "not a list of strings".into(),
                )
                .into());
            }
            None => {
                return Err(AuthError::Refused(format!(
                    "groups claim {:?} is missing from the ID token; ask the identity provider to release it (scope or mapper)",
                    c.groups_claim
                )));
            }
        };
        let mfa = match claims.get("amr") {
            Some(Value::Array(amr)) => amr
                .iter()
                .filter_map(Value::as_str)
                .any(|m| c.mfa_amr.iter().any(|w| w == m)),
            _ => false,
        };
        let who = Principal {
            name,
            admin: groups.iter().any(|g| self.admin_groups.contains(g)),
            groups,
            kind: PrincipalKind::Human,
            authn: Authn {
                method: AuthMethod::Oidc,
                auth_time: reg.auth_time,
                issued_at: Some(reg.issued_at),
                expires_at: Some(reg.expires_at),
                mfa,
                claims: BTreeMap::new(),
            },
        };
        self.remember(claims, &who, now);
        Ok(who)
    }

    /// The first entry whose audience and claims the token matches names
    /// the workload.
    fn workload(
        &self,
        entries: &[&Workload],
        claims: &serde_json::Map<String, Value>,
        now: Timestamp,
    ) -> Result<Principal, AuthError> {
        let mut why: Vec<String> = Vec::new();
        for w in entries {
            let c = &w.config;
            let reg = match jwt::validate(
                claims,
                &Expect {
                    issuer: &c.issuer,
                    audience: &c.audience,
                    azp: &c.audience,
                    leeway_s: LEEWAY_MAX_S,
                    now,
                },
            ) {
                Ok(r) => r,
                // Expiry and the like are the same for every entry.
                Err(e @ (JwtError::WrongAudience { .. } | JwtError::BadAzp { .. })) => {
                    why.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mismatch = c
                .claims
                .iter()
                .find_map(|(k, want)| match jwt::claim_text(claims, k) {
                    Some(got) if &got == want => None,
                    Some(got) => Some(format!(
                        "claim {k} = {:?} is not accepted",
                        got.chars().take(128).collect::<String>()
                    )),
                    None => Some(format!("claim {k} is missing")),
                });
            if let Some(m) = mismatch {
                why.push(m);
                continue;
            }
            let mut name = String::new();
            let mut matched: BTreeMap<String, String> = c.claims.clone();
            for piece in &w.template {
                match piece {
                    Piece::Text(t) => name.push_str(t),
                    Piece::Claim(k) => {
                        let v = jwt::claim_text(claims, k).ok_or_else(|| {
                            AuthError::Refused(format!(
                                "claim {k:?} needed by the workload name template {:?} is missing from the token",
                                c.name
                            ))
                        })?;
                        name.push_str(&v);
                        matched.insert(k.clone(), v);
                    }
                }
            }
            check_workload_name(&name).map_err(|e| {
                AuthError::Refused(format!(
                    "workload name {:?} {e}",
                    name.chars().take(160).collect::<String>()
                ))
            })?;
            let groups: BTreeSet<String> = c.groups.iter().cloned().collect();
            return Ok(Principal {
                name,
                admin: false,
                groups,
                kind: PrincipalKind::Workload,
                authn: Authn {
                    method: AuthMethod::Workload,
                    auth_time: None,
                    issued_at: Some(reg.issued_at),
                    expires_at: Some(reg.expires_at),
                    mfa: false,
                    claims: matched,
                },
            });
        }
        why.dedup();
        why.truncate(4);
        Err(AuthError::Refused(format!(
            "no workload entry matches this token: {}",
            why.join("; ")
        )))
    }
}
