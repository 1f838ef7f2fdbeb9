//! The web console (DESIGN §14): server-rendered pages at `/` over the same
//! `App` calls the HTTP API handlers make, so every refusal carries the
//! API's own message. Pages are askama templates compiled into the binary;
//! the small JavaScript (countdowns, copy button, the player) and the
//! vendored `asciinema-player` are embedded too. Every page works without
//! JavaScript except the countdowns and the player.
//!
//! Signing in turns a bearer token (a local principal's token plus TOTP,
//! or an identity provider's ID token) into a console session: a random
//! id in an `HttpOnly`, `SameSite=Lax` cookie (`Secure` behind TLS) that
//! ends with the token. Every form carries the session's CSRF token.

mod assets;
mod oidc;
mod pages;
mod reports;
mod session;
pub mod view;

use std::sync::Arc;

use anyhow::bail;
use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::app::{App, AppError};
use crate::config::Config;
use crate::http::ApiError;
pub use session::{SESSION_LIFETIME_S, SESSIONS_MAX, Sessions, SignedIn};

/// The longest `server.public_url` accepted.
pub const PUBLIC_URL_LEN_MAX: usize = 2048;

/// `[console]`: the web console at `/`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the web console at `/` (on with `serve --dev`).
    #[serde(default)]
    pub enabled: bool,
}

/// Checks `server.public_url`: an absolute `http(s)://` base URL without
/// query or fragment.
pub fn validate_config(config: &Config) -> anyhow::Result<()> {
    let Some(url) = &config.server.public_url else {
        return Ok(());
    };
    if url.len() > PUBLIC_URL_LEN_MAX {
        bail!(
            "server.public_url: {} bytes, the limit is {PUBLIC_URL_LEN_MAX}",
            url.len()
        );
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let Some(rest) = rest else {
        bail!(
            "server.public_url: expected an absolute http:// or https:// URL such as \"https://breakglass.example.com\""
        );
    };
    if rest.is_empty() || rest.starts_with('/') {
        bail!("server.public_url: the URL names no host");
    }
    if url
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        bail!("server.public_url: no spaces, control characters, query or fragment");
    }
    Ok(())
}

/// The console's state: the application, its sign-in sessions, and
/// whether cookies are marked `Secure`.
pub struct Console {
    pub(crate) app: Arc<App>,
    pub(crate) sessions: Sessions,
    /// Sign-ins with the identity provider in progress.
    pub(crate) oidc: oidc::OidcLogins,
    /// The service is reached over TLS (its own, or a proxy's named by an
    /// `https://` `server.public_url`).
    pub(crate) secure: bool,
}

impl Console {
    fn new(app: Arc<App>) -> Console {
        let c = &app.config.server;
        let secure = c.tls_cert.is_some()
            || c.public_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"));
        Console {
            app,
            sessions: Sessions::default(),
            oidc: oidc::OidcLogins::default(),
            secure,
        }
    }

    /// The session cookie's name: `__Host-` over TLS, so only this origin
    /// over HTTPS can set it.
    pub(crate) fn cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-bg_session"
        } else {
            "bg_session"
        }
    }

    /// The pre-sign-in cookie that carries the sign-in form's CSRF token.
    pub(crate) fn signin_cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-bg_signin"
        } else {
            "bg_signin"
        }
    }

    /// The cookie that ties a sign-in with the identity provider to the
    /// browser that started it (its `state`).
    pub(crate) fn oidc_cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-bg_oidc"
        } else {
            "bg_oidc"
        }
    }

    /// A `Set-Cookie` value: `HttpOnly`, `SameSite=Lax`, path `/`, and
    /// `Secure` over TLS; `max_age_s` 0 removes it.
    pub(crate) fn cookie(&self, name: &str, value: &str, max_age_s: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let text =
            format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_s}{secure}");
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

pub(crate) type ConsoleState = Arc<Console>;

/// The console's routes, or none when `[console]` is off.
pub fn router(app: &Arc<App>) -> Router<Arc<App>> {
    if !app.config.console.enabled {
        return Router::new();
    }
    let console = Arc::new(Console::new(app.clone()));
    pages::routes()
        .merge(reports::routes())
        .merge(oidc::routes())
        .merge(assets::routes())
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

/// The Content-Security-Policy of every page: scripts, styles and images
/// from this origin only, no inline script or style, no framing, forms
/// post only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The replay page's policy: the player compiles its terminal emulator
/// from WebAssembly, nothing more.
pub const CSP_PLAYER: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Marks a response that needs the player's policy.
#[derive(Clone, Copy)]
pub(crate) struct PlayerPage;

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let player = resp.extensions().get::<PlayerPage>().is_some();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(if player { CSP_PLAYER } else { CSP }),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// A refusal on its way to the browser as a page: the API's status, code
/// and message.
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub code: String,
    pub detail: String,
}

impl PageError {
    pub(crate) fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> PageError {
        PageError {
            status,
            code: code.to_string(),
            detail: detail.into(),
        }
    }

    pub(crate) fn bad_input(detail: impl Into<String>) -> PageError {
        PageError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> PageError {
        // INVARIANT: internal causes are logged, never shown.
        tracing::error!(error = %e, "console: {what}");
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        let (status, code, detail) = e.parts();
        PageError::new(status, code, detail)
    }
}

impl From<AppError> for PageError {
    fn from(e: AppError) -> Self {
        PageError::from(ApiError::from(e))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        pages::error_page(&self)
    }
}

/// The signed-in viewer of a page; without a session, pages redirect to
/// the sign-in form.
pub(crate) struct Viewer(pub SignedIn);

/// Why there is no viewer: not signed in (go and sign in).
pub(crate) struct NotSignedIn(String);

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        let next = view::query_value(&self.0);
        Redirect::to(&format!("/signin?next={next}")).into_response()
    }
}

impl FromRequestParts<ConsoleState> for Viewer {
    type Rejection = NotSignedIn;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        let here = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        // Where to come back after signing in: only a page reached by GET.
        let back = if parts.method == axum::http::Method::GET {
            here
        } else {
            "/".to_string()
        };
        let Some(id) = cookie(parts, console.cookie_name()) else {
            return Err(NotSignedIn(back));
        };
        let now = crate::app::now();
        let Some(s) = console.sessions.get(id, now) else {
            return Err(NotSignedIn(back));
        };
        // A principal removed from the config since signing in has no
        // session any more.
        if !console.app.knows_principal(&s.principal.name) {
            console.sessions.remove(id);
            return Err(NotSignedIn(back));
        }
        crate::http::signed_in(parts);
        Ok(Viewer(s))
    }
}

/// Cookies a request may carry at most, and bytes of the `Cookie` header.
const COOKIE_HEADER_LEN_MAX: usize = 8192;

/// The value of cookie `name`, if the request carries it.
pub(crate) fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    for h in parts.headers.get_all(header::COOKIE) {
        let Ok(text) = h.to_str() else { continue };
        if text.len() > COOKIE_HEADER_LEN_MAX {
            continue;
        }
        for pair in text.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k == name
            {
                return Some(v);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_public_url(url: &str) -> anyhow::Result<()> {
        let text = format!(
            "[server]\ndata_dir = \"d\"\npublic_url = {url:?}\n[policy]\nfile = \"p.cedar\"\n"
        );
        let config: Config = toml::from_str(&text)?;
        validate_config(&config)
    }

    #[test]
    fn public_url_is_an_absolute_base_url() {
        for ok in [
            "https://bg.example.com",
            "http://127.0.0.1:8080",
            "https://x.example/bg",
        ] {
            assert!(with_public_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "bg.example.com",
            "ftp://bg.example.com",
            "https://",
            "https:///path",
            "https://bg.example.com/?x=1",
            "https://bg.example.com/#top",
            "https://bg example.com",
        ] {
            let e = with_public_url(bad).expect_err(bad).to_string();
            assert!(e.starts_with("server.public_url:"), "{bad}: {e}");
        }
        let long = format!("https://{}", "a".repeat(PUBLIC_URL_LEN_MAX));
        assert!(with_public_url(&long).is_err());
    }
}
