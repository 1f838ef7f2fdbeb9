//! Signing in to the console with the identity provider: OpenID Connect's
//! authorization code flow with PKCE (RFC 7636), `state` and `nonce`.
//!
//! `GET /signin/oidc` keeps a pending sign-in in this node's memory (keyed
//! by the SHA-256 of its `state`, with the PKCE verifier, the nonce and
//! where to go after), puts the `state` in a short-lived cookie, and sends
//! the browser to the provider. `GET /signin/oidc/callback` takes the
//! pending sign-in once (the cookie must hold the same `state`), trades the
//! code for tokens at the provider's token endpoint, and checks the ID
//! token with `App::authenticate`, exactly as an API call's bearer ID
//! token is checked, and then its `nonce`. The console session that
//! follows is the one a token sign-in starts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::pages::{PageResult, parts_of, safe_next, see_other, signin_page, start_session};
use super::session::{random_hex, same_secret};
use super::{ConsoleState, cookie};
use crate::identity::config::{OidcConfig, check_issuer_url};
use crate::identity::keys::{DISCOVERY_LEN_MAX, http_agent, read_json};

/// Sign-ins started and not finished that one node keeps at most (the
/// oldest gives way to a new one).
pub const PENDING_MAX: usize = 10_000;
/// How long a started sign-in may take at the provider.
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// Largest token endpoint answer read.
const TOKEN_RESPONSE_LEN_MAX: u64 = 64 * 1024;
/// Longest `code` and `error_description` taken from the callback's query.
const CODE_LEN_MAX: usize = 4096;
const ERROR_SHOWN_MAX: usize = 200;

/// The provider's endpoints, from its discovery document.
#[derive(Clone)]
struct Endpoints {
    authorization: String,
    token: String,
}

struct Pending {
    verifier: String,
    nonce: String,
    next: String,
    at: Instant,
}

/// Sign-ins in flight, and the provider's endpoints once discovered.
#[derive(Default)]
pub struct OidcLogins {
    pending: Mutex<HashMap<[u8; 32], Pending>>,
    endpoints: tokio::sync::Mutex<Option<Endpoints>>,
}

impl OidcLogins {
    /// Keeps a new pending sign-in. When full, the oldest one gives way:
    /// anyone may start sign-ins, so a flood of them must not lock out the
    /// next person (it can only outrun sign-ins already at the provider).
    fn insert(&self, state: &str, p: Pending) {
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, v| now.duration_since(v.at) < PENDING_TTL);
        if map.len() >= PENDING_MAX
            && let Some(oldest) = map.iter().min_by_key(|(_, v)| v.at).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(Sha256::digest(state.as_bytes()).into(), p);
    }

    /// Takes the pending sign-in of `state` (once), if it has not expired.
    fn take(&self, state: &str) -> Option<Pending> {
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let p = map.remove(&<[u8; 32]>::from(Sha256::digest(state.as_bytes())))?;
        (p.at.elapsed() < PENDING_TTL).then_some(p)
    }

    async fn endpoints(&self, issuer: &str) -> Result<Endpoints, String> {
        let mut cached = self.endpoints.lock().await;
        if let Some(e) = cached.as_ref() {
            return Ok(e.clone());
        }
        let issuer = issuer.to_string();
        let found = tokio::task::spawn_blocking(move || discover(&issuer))
            .await
            .map_err(|e| format!("discovery failed: {e}"))??;
        *cached = Some(found.clone());
        Ok(found)
    }
}

/// Reads the discovery document's two endpoints. Blocking.
fn discover(issuer: &str) -> Result<Endpoints, String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let doc = read_json(
        http_agent()
            .get(&url)
            .header("Accept", "application/json")
            .call(),
        DISCOVERY_LEN_MAX,
    )
    .map_err(|e| format!("GET {url}: {e}"))?;
    if doc["issuer"].as_str() != Some(issuer) {
        return Err(format!(
            "the discovery document names issuer {}, not {issuer}",
            doc["issuer"]
        ));
    }
    let endpoint = |name: &str| -> Result<String, String> {
        let url = doc[name]
            .as_str()
            .ok_or_else(|| format!("the discovery document has no {name}"))?;
        check_issuer_url(url).map_err(|e| format!("{name} {url}: {e}"))?;
        Ok(url.to_string())
    };
    Ok(Endpoints {
        authorization: endpoint("authorization_endpoint")?,
        token: endpoint("token_endpoint")?,
    })
}

fn clip(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    s.chars().take(ERROR_SHOWN_MAX).collect()
}

/// Where the provider sends the browser back: under `server.public_url`,
/// the address people reach the console by (and the provider knows).
fn redirect_uri(c: &ConsoleState) -> Option<String> {
    let base = c.app.config.server.public_url.as_deref()?;
    Some(format!(
        "{}/signin/oidc/callback",
        base.trim_end_matches('/')
    ))
}

/// Whether the sign-in page offers the identity provider.
pub fn offered(c: &ConsoleState) -> bool {
    c.app.identity.oidc().is_some() && redirect_uri(c).is_some()
}

pub fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/signin/oidc", get(start))
        .route("/signin/oidc/callback", get(callback))
}

#[derive(Deserialize)]
struct StartQuery {
    #[serde(default)]
    next: String,
}

/// A refusal shown on the sign-in page, with a fresh form.
fn refused(c: &ConsoleState, next: &str, status: StatusCode, why: String) -> PageResult {
    let mut resp = signin_page(c, random_hex(), next.to_string(), Some(why), status)?;
    resp.headers_mut()
        .append(header::SET_COOKIE, c.cookie(c.oidc_cookie_name(), "", 0));
    Ok(resp)
}

fn configured(c: &ConsoleState) -> Result<(OidcConfig, String), String> {
    let oidc = c
        .app
        .identity
        .oidc()
        .cloned()
        .ok_or("no identity provider is configured ([identity.oidc])".to_string())?;
    let redirect = redirect_uri(c).ok_or(
        "signing in with the identity provider needs server.public_url (the console's address, registered at the provider)".to_string(),
    )?;
    Ok((oidc, redirect))
}

/// The provider's configuration, the redirect URI and its endpoints; or
/// the sign-in page saying why not.
async fn provider(
    c: &ConsoleState,
    next: &str,
) -> Result<(OidcConfig, String, Endpoints), PageResult> {
    let (oidc, redirect) =
        configured(c).map_err(|why| refused(c, next, StatusCode::NOT_FOUND, why))?;
    let endpoints = c.oidc.endpoints(&oidc.issuer).await.map_err(|why| {
        tracing::warn!(error = %why, "cannot read the identity provider's discovery document");
        refused(
            c,
            next,
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the identity provider cannot be reached: {}", clip(&why)),
        )
    })?;
    Ok((oidc, redirect, endpoints))
}

async fn start(State(c): State<ConsoleState>, Query(q): Query<StartQuery>) -> PageResult {
    let next = safe_next(&q.next);
    let (oidc, redirect, endpoints) = match provider(&c, &next).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let (state, nonce, verifier) = (random_hex(), random_hex(), random_hex());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    c.oidc.insert(
        &state,
        Pending {
            verifier,
            nonce: nonce.clone(),
            next,
            at: Instant::now(),
        },
    );
    let mut scopes = oidc.scopes.clone();
    if !scopes.iter().any(|s| s == "openid") {
        scopes.insert(0, "openid".into());
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("response_type", "code"),
            ("client_id", oidc.client_id.as_str()),
            ("redirect_uri", redirect.as_str()),
            ("scope", scopes.join(" ").as_str()),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .finish();
    let sep = if endpoints.authorization.contains('?') {
        '&'
    } else {
        '?'
    };
    let mut resp = see_other(&format!("{}{sep}{query}", endpoints.authorization));
    resp.headers_mut().append(
        header::SET_COOKIE,
        c.cookie(c.oidc_cookie_name(), &state, PENDING_TTL.as_secs()),
    );
    Ok(resp)
}

#[derive(Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    code: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

async fn callback(
    State(c): State<ConsoleState>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> PageResult {
    let parts = parts_of(&headers);
    let expected = cookie(&parts, c.oidc_cookie_name()).unwrap_or("");
    // INVARIANT: the state comes back to the browser that started the
    // sign-in (its cookie), and a pending sign-in is taken once.
    let same_browser = same_secret(&q.state, expected);
    if !same_browser {
        return refused(
            &c,
            "/",
            StatusCode::FORBIDDEN,
            "this sign-in did not start in this browser; sign in again".into(),
        );
    }
    let Some(pending) = c.oidc.take(&q.state) else {
        return refused(
            &c,
            "/",
            StatusCode::FORBIDDEN,
            "this sign-in expired or was already used; sign in again".into(),
        );
    };
    let next = pending.next.clone();
    if !q.error.is_empty() {
        return refused(
            &c,
            &next,
            StatusCode::UNAUTHORIZED,
            format!(
                "the identity provider did not sign you in: {} {}",
                clip(&q.error),
                clip(&q.error_description)
            ),
        );
    }
    if q.code.is_empty() || q.code.len() > CODE_LEN_MAX {
        return refused(
            &c,
            &next,
            StatusCode::BAD_REQUEST,
            "the identity provider sent no usable code".into(),
        );
    }
    let (oidc, redirect, endpoints) = match provider(&c, &next).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let secret = match oidc.client_secret_env.as_deref().map(std::env::var) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => {
            tracing::error!(
                "identity.oidc.client_secret_env names a variable that is not set: the console cannot trade codes"
            );
            return refused(
                &c,
                &next,
                StatusCode::SERVICE_UNAVAILABLE,
                "the console's client secret is not available; see the server log".into(),
            );
        }
    };
    let exchange = {
        let (token_url, code, client_id) = (endpoints.token, q.code, oidc.client_id.clone());
        let verifier = pending.verifier;
        tokio::task::spawn_blocking(move || {
            let mut form = vec![
                ("grant_type", "authorization_code".to_string()),
                ("code", code),
                ("redirect_uri", redirect),
                ("client_id", client_id),
                ("code_verifier", verifier),
            ];
            if let Some(s) = secret {
                form.push(("client_secret", s));
            }
            let body: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
                .finish();
            read_json(
                http_agent()
                    .post(&token_url)
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .header("Accept", "application/json")
                    // The provider's error answer is read, not thrown.
                    .config()
                    .http_status_as_error(false)
                    .build()
                    .send(body),
                TOKEN_RESPONSE_LEN_MAX,
            )
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    let id_token = match exchange.and_then(|v| {
        v["id_token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "the token answer has no id_token".to_string())
    }) {
        Ok(t) => t,
        Err(why) => {
            tracing::info!(error = %why, "console sign-in: the code exchange failed");
            return refused(
                &c,
                &next,
                StatusCode::UNAUTHORIZED,
                format!(
                    "the identity provider did not trade the code: {}",
                    clip(&why)
                ),
            );
        }
    };
    // The ID token is checked as any bearer ID token is...
    let who = match c.app.authenticate(&id_token, None).await {
        Ok(who) => who,
        Err(e) => {
            let e = super::PageError::from(e);
            return refused(&c, &next, e.status, e.detail);
        }
    };
    // ...and it must answer this sign-in.
    let nonce = crate::identity::jwt::decode(&id_token)
        .ok()
        .and_then(|j| {
            j.claims
                .get("nonce")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default();
    let nonce_ok = same_secret(&nonce, &pending.nonce);
    if !nonce_ok {
        tracing::info!(principal = %who.name, "console sign-in refused: the ID token's nonce is not this sign-in's");
        return refused(
            &c,
            &next,
            StatusCode::UNAUTHORIZED,
            "the ID token does not answer this sign-in (nonce); sign in again".into(),
        );
    }
    let mut resp = start_session(&c, who, &next)?;
    resp.headers_mut()
        .append(header::SET_COOKIE, c.cookie(c.oidc_cookie_name(), "", 0));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_sign_in_is_taken_once_and_expires() {
        let logins = OidcLogins::default();
        let p = |at| Pending {
            verifier: "v".into(),
            nonce: "n".into(),
            next: "/".into(),
            at,
        };
        logins.insert("s1", p(Instant::now()));
        assert!(logins.take("s2").is_none(), "another state");
        assert!(logins.take("s1").is_some());
        assert!(logins.take("s1").is_none(), "taken once");
        if let Some(old) = Instant::now().checked_sub(PENDING_TTL + Duration::from_secs(1)) {
            logins.insert("s3", p(old));
            assert!(logins.take("s3").is_none(), "expired");
        }
    }

    #[test]
    fn a_flood_of_started_sign_ins_never_locks_out_the_next_one() {
        let logins = OidcLogins::default();
        let start = Instant::now();
        let p = |i: u64| Pending {
            verifier: "v".into(),
            nonce: "n".into(),
            next: "/".into(),
            at: start + Duration::from_millis(i),
        };
        for i in 0..=PENDING_MAX as u64 {
            logins.insert(&format!("flood-{i}"), p(i));
        }
        logins.insert("person", p(PENDING_MAX as u64 + 1));
        let held = logins.pending.lock().map(|m| m.len()).unwrap_or(0);
        assert_eq!(held, PENDING_MAX, "bounded");
        assert!(logins.take("person").is_some(), "the newest is kept");
        assert!(logins.take("flood-0").is_none(), "the oldest gave way");
        assert!(logins.take("flood-1").is_none(), "and the next oldest");
        assert!(logins.take(&format!("flood-{PENDING_MAX}")).is_some());
    }
}
