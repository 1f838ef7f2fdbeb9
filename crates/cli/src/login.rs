//! Signing in with the organisation's identity provider (OpenID Connect):
//! the Device Authorization Grant (RFC 8628), the Authorization Code flow
//! with PKCE and a loopback redirect (RFC 7636, RFC 8252), refreshing, and
//! a GitHub Actions job's token.
//!
//! The CLI learns the issuer, client id and scopes from the server
//! (`GET /v1/auth/config`) and the endpoints from the issuer's discovery
//! document. It does not verify token signatures (the server does); it
//! checks that an ID token is for this client from this issuer before
//! keeping it, and reads its `exp` and `auth_time`.
//!
//! Limits: every answer is read up to [`BODY_BYTES_MAX`], a device login
//! polls at most [`POLLS_MAX`] times and for at most [`DEVICE_WAIT_MAX_S`],
//! the loopback redirect listener waits at most [`BROWSER_WAIT_MAX_S`] and
//! reads at most [`REDIRECT_HEAD_BYTES_MAX`] of each request.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

use crate::client::{host_of, is_loopback};
use crate::exit::{Exit, Failure};

/// The most bytes of an identity provider's answer read.
pub const BODY_BYTES_MAX: u64 = 1024 * 1024;
/// The most characters of a URL from a discovery document or the
/// environment.
pub const URL_LEN_MAX: usize = 2048;
/// The most bytes of a token accepted.
pub const TOKEN_BYTES_MAX: usize = 64 * 1024;
/// Polls of the token endpoint in one device login, at most.
pub const POLLS_MAX: u32 = 1000;
/// How long a device login waits at most, whatever `expires_in` says.
pub const DEVICE_WAIT_MAX_S: u64 = 30 * 60;
/// The polling interval when the provider names none (RFC 8628 §3.2).
pub const INTERVAL_DEFAULT_S: u64 = 5;
/// The most a provider may ask us to wait between polls.
pub const INTERVAL_MAX_S: u64 = 60;
/// How long `login --browser` waits for the redirect.
pub const BROWSER_WAIT_MAX_S: u64 = 10 * 60;
/// The most bytes of one request to the loopback redirect listener.
pub const REDIRECT_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Clock difference tolerated between here and the provider when
/// checking that a fresh login is fresh.
pub const CLOCK_LEEWAY_S: i64 = 60;

fn fail(code: &'static str, message: impl Into<String>) -> Failure {
    Failure::new(Exit::Error, code, message)
}

/// Checks a URL of the identity provider: https, or plain http to a
/// loopback address (the same rule as the server's URL; a provider on the
/// network needs TLS).
pub fn check_url(url: &str, what: &str) -> Result<(), Failure> {
    if url.len() > URL_LEN_MAX || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail(
            "idp_url",
            format!("the {what} is not a usable URL (too long, or with spaces)"),
        ));
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = lower.strip_prefix("http://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if is_loopback(&host_of(authority)) {
            return Ok(());
        }
    }
    Err(fail(
        "idp_url",
        format!(
            "refusing the {what} {}: an identity provider must use https (plain http only on a loopback address)",
            crate::render::clean(url)
        ),
    ))
}

/// Unix seconds now.
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn random_b64(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// Percent-encodes a query or form value.
pub fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn encode_form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The parameters of a query string.
fn query_params(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// Equal in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    use breakglass_core::token::{digest_eq, sha256};
    digest_eq(&sha256(a.as_bytes()), &sha256(b.as_bytes()))
}

/// The claims of a JWT, unverified (the server verifies the signature).
pub fn claims_of(jwt: &str) -> Result<serde_json::Value, Failure> {
    let bad = || {
        fail(
            "bad_token",
            "the identity provider sent a token that is not a JWT",
        )
    };
    if jwt.len() > TOKEN_BYTES_MAX {
        return Err(bad());
    }
    let mut parts = jwt.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// An HTTP answer: status and JSON body (`Null` when not JSON).
fn read_json(
    result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    url: &str,
) -> Result<(u16, serde_json::Value), Failure> {
    let mut resp = result.map_err(|e| {
        fail(
            "idp_unreachable",
            format!(
                "cannot reach the identity provider at {}: {e}",
                crate::render::clean(url)
            ),
        )
    })?;
    let status = resp.status().as_u16();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(BODY_BYTES_MAX)
        .read_to_vec()
        .map_err(|e| {
            fail(
                "idp_bad_response",
                format!(
                    "cannot read the answer of {}: {e}",
                    crate::render::clean(url)
                ),
            )
        })?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    ))
}

/// The identity provider as the server names it, with its endpoints.
#[derive(Debug)]
pub struct Provider {
    agent: ureq::Agent,
    pub issuer: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    token_endpoint: String,
    device_endpoint: Option<String>,
    authorization_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
}

/// Tokens from a login or a refresh.
#[derive(Debug)]
pub struct Tokens {
    pub id_token: crate::credentials::Secret,
    pub refresh_token: Option<crate::credentials::Secret>,
    pub expires_at: i64,
    pub auth_time: Option<i64>,
}

impl Provider {
    /// Reads the issuer's discovery document. Its `issuer` must be the one
    /// the server named, and every endpoint must pass [`check_url`].
    pub fn discover(
        agent: ureq::Agent,
        issuer: &str,
        client_id: &str,
        scopes: Vec<String>,
    ) -> Result<Provider, Failure> {
        check_url(issuer, "issuer")?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let (status, doc) = read_json(agent.get(&url).call(), &url)?;
        if status != 200 || !doc.is_object() {
            return Err(fail(
                "idp_bad_response",
                format!(
                    "the identity provider's discovery document {} answered HTTP {status} without JSON",
                    crate::render::clean(&url)
                ),
            ));
        }
        if doc["issuer"].as_str() != Some(issuer) {
            return Err(fail(
                "idp_bad_response",
                format!(
                    "the discovery document of {} names another issuer ({}); refusing it",
                    crate::render::clean(issuer),
                    crate::render::clean(doc["issuer"].as_str().unwrap_or("none"))
                ),
            ));
        }
        let endpoint = |name: &str| -> Result<Option<String>, Failure> {
            match doc[name].as_str() {
                Some(u) => {
                    check_url(u, name)?;
                    Ok(Some(u.to_string()))
                }
                None => Ok(None),
            }
        };
        let token_endpoint = endpoint("token_endpoint")?.ok_or_else(|| {
            fail(
                "idp_bad_response",
                "the identity provider's discovery document has no token_endpoint",
            )
        })?;
        Ok(Provider {
            device_endpoint: endpoint("device_authorization_endpoint")?,
            authorization_endpoint: endpoint("authorization_endpoint")?,
            revocation_endpoint: endpoint("revocation_endpoint")?,
            agent,
            issuer: issuer.to_string(),
            client_id: client_id.to_string(),
            scopes,
            token_endpoint,
        })
    }

    fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<(u16, serde_json::Value), Failure> {
        read_json(
            self.agent
                .post(url)
                .header("Accept", "application/json")
                .header("Content-Type", "application/x-www-form-urlencoded")
                .send(encode_form(form)),
            url,
        )
    }

    /// The tokens of a successful token response, checked: an ID token
    /// from this issuer, for this client, not expired.
    fn tokens(
        &self,
        body: &serde_json::Value,
        keep_refresh: Option<&crate::credentials::Secret>,
        nonce: Option<&str>,
    ) -> Result<Tokens, Failure> {
        let id_token = body["id_token"].as_str().ok_or_else(|| {
            fail(
                "idp_bad_response",
                "the identity provider's answer has no ID token (is the `openid` scope allowed for this client?)",
            )
        })?;
        let claims = claims_of(id_token)?;
        if claims["iss"].as_str() != Some(self.issuer.as_str()) {
            return Err(fail(
                "idp_bad_response",
                "the ID token is from another issuer",
            ));
        }
        let aud_ok = match &claims["aud"] {
            serde_json::Value::String(a) => *a == self.client_id,
            serde_json::Value::Array(all) => {
                all.iter().any(|a| a.as_str() == Some(&self.client_id))
            }
            _ => false,
        };
        if !aud_ok {
            return Err(fail(
                "idp_bad_response",
                "the ID token is not for this client (aud)",
            ));
        }
        if let Some(n) = nonce
            && !claims["nonce"].as_str().is_some_and(|c| same(c, n))
        {
            return Err(fail(
                "idp_bad_response",
                "the ID token's nonce does not match this login",
            ));
        }
        let expires_at = claims["exp"]
            .as_i64()
            .ok_or_else(|| fail("idp_bad_response", "the ID token has no exp"))?;
        let refresh_token = body["refresh_token"]
            .as_str()
            .filter(|t| !t.is_empty() && t.len() <= TOKEN_BYTES_MAX)
            .map(|t| crate::credentials::Secret(t.to_string()))
            .or_else(|| keep_refresh.cloned());
        Ok(Tokens {
            id_token: crate::credentials::Secret(id_token.to_string()),
            refresh_token,
            expires_at,
            auth_time: claims["auth_time"].as_i64(),
        })
    }

    /// New tokens from a refresh token (RFC 6749 §6).
    pub fn refresh(&self, refresh_token: &crate::credentials::Secret) -> Result<Tokens, Failure> {
        let (status, body) = self.post_form(
            &self.token_endpoint,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh_token.0),
                ("client_id", &self.client_id),
            ],
        )?;
        if status != 200 {
            return Err(fail(
                "refresh_failed",
                format!(
                    "the identity provider refused the refresh token ({})",
                    oauth_error(&body)
                ),
            ));
        }
        self.tokens(&body, Some(refresh_token), None)
    }

    /// Revokes a refresh token (RFC 7009). `Ok(false)` when the provider
    /// offers no revocation endpoint.
    pub fn revoke(&self, refresh_token: &crate::credentials::Secret) -> Result<bool, Failure> {
        let Some(endpoint) = self.revocation_endpoint.as_deref() else {
            return Ok(false);
        };
        let (status, body) = self.post_form(
            endpoint,
            &[
                ("token", &refresh_token.0),
                ("token_type_hint", "refresh_token"),
                ("client_id", &self.client_id),
            ],
        )?;
        if status != 200 {
            return Err(fail(
                "revoke_failed",
                format!(
                    "the identity provider did not revoke the refresh token (HTTP {status}, {})",
                    oauth_error(&body)
                ),
            ));
        }
        Ok(true)
    }

    /// The Device Authorization Grant: prints where to go and the code on
    /// `out`, then polls until the person has signed in.
    pub fn device_login(&self, fresh: bool, out: &mut dyn Write) -> Result<Tokens, Failure> {
        let endpoint = self.device_endpoint.as_deref().ok_or_else(|| {
            fail(
                "device_flow_unsupported",
                "the identity provider offers no device login (no device_authorization_endpoint); use `breakglass login --browser`",
            )
        })?;
        let scope = self.scopes.join(" ");
        let mut form = vec![
            ("client_id", self.client_id.as_str()),
            ("scope", scope.as_str()),
        ];
        if fresh {
            form.push(("max_age", "0"));
        }
        let started = now_s();
        let (status, auth) = self.post_form(endpoint, &form)?;
        if status != 200 {
            return Err(fail(
                "login_failed",
                format!(
                    "the identity provider refused to start a device login ({})",
                    oauth_error(&auth)
                ),
            ));
        }
        let text = |k: &str| auth[k].as_str().filter(|v| v.len() <= URL_LEN_MAX);
        let (Some(device_code), Some(user_code)) = (text("device_code"), text("user_code")) else {
            return Err(fail(
                "idp_bad_response",
                "the device login answer has no device_code or user_code",
            ));
        };
        // `verification_url` is what some providers (Google) send.
        let uri = text("verification_uri")
            .or_else(|| text("verification_url"))
            .ok_or_else(|| {
                fail(
                    "idp_bad_response",
                    "the device login answer has no verification_uri",
                )
            })?;
        check_url(uri, "verification URL")?;
        let expires_in = auth["expires_in"]
            .as_u64()
            .unwrap_or(600)
            .min(DEVICE_WAIT_MAX_S);
        let mut interval = Duration::from_secs(
            auth["interval"]
                .as_u64()
                .unwrap_or(INTERVAL_DEFAULT_S)
                .clamp(1, INTERVAL_MAX_S),
        );
        let clean = crate::render::clean;
        let mut message = format!(
            "To sign in, open {} and enter the code {}\n",
            clean(uri),
            clean(user_code)
        );
        if let Some(complete) = text("verification_uri_complete")
            && check_url(complete, "verification URL").is_ok()
        {
            message.push_str(&format!("(or open {})\n", clean(complete)));
        }
        message.push_str(&format!(
            "Waiting for you to sign in (the code expires in {})...\n",
            breakglass_core::time::format_duration(expires_in)
        ));
        out.write_all(message.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| fail("io", format!("cannot write: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(expires_in);
        for _ in 0..POLLS_MAX {
            std::thread::sleep(interval);
            if Instant::now() > deadline {
                break;
            }
            let (status, body) = self.post_form(
                &self.token_endpoint,
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                    ("device_code", device_code),
                    ("client_id", &self.client_id),
                ],
            )?;
            if status == 200 {
                let tokens = self.tokens(&body, None, None)?;
                if fresh {
                    check_fresh(&tokens, started)?;
                }
                return Ok(tokens);
            }
            next_poll(&mut interval, &body)?;
        }
        Err(fail(
            "login_expired_code",
            "the code expired before the sign-in was finished; run `breakglass login` again",
        ))
    }

    /// The Authorization Code flow with PKCE and a loopback redirect:
    /// prints the URL on `out` (and opens `$BROWSER` if set), waits for
    /// the redirect on 127.0.0.1, checks `state`, exchanges the code.
    pub fn browser_login(&self, fresh: bool, out: &mut dyn Write) -> Result<Tokens, Failure> {
        let endpoint = self.authorization_endpoint.as_deref().ok_or_else(|| {
            fail(
                "browser_flow_unsupported",
                "the identity provider has no authorization_endpoint; use `breakglass login` (device flow)",
            )
        })?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| {
            fail(
                "io",
                format!("cannot listen on 127.0.0.1 for the redirect: {e}"),
            )
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| fail("io", e.to_string()))?
            .port();
        let redirect_uri = format!("http://127.0.0.1:{port}/callback");
        let verifier = random_b64(32);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let state = random_b64(16);
        let nonce = random_b64(16);
        let scope = self.scopes.join(" ");
        let mut query = vec![
            ("response_type", "code"),
            ("client_id", self.client_id.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
            ("scope", scope.as_str()),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        if fresh {
            query.push(("max_age", "0"));
            query.push(("prompt", "login"));
        }
        let sep = if endpoint.contains('?') { '&' } else { '?' };
        let url = format!("{endpoint}{sep}{}", encode_form(&query));
        let started = now_s();
        writeln!(
            out,
            "Open this URL in a browser on this machine to sign in:\n  {url}"
        )
        .and_then(|()| out.flush())
        .map_err(|e| fail("io", format!("cannot write: {e}")))?;
        if let Some(browser) = std::env::var_os("BROWSER").filter(|b| !b.is_empty()) {
            // A configured browser only; failing to start it is fine: the
            // URL is printed.
            let _ = std::process::Command::new(browser)
                .arg(&url)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
        }
        let code = wait_for_redirect(&listener, &state, Duration::from_secs(BROWSER_WAIT_MAX_S))?;
        let (status, body) = self.post_form(
            &self.token_endpoint,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &redirect_uri),
                ("client_id", &self.client_id),
                ("code_verifier", &verifier),
            ],
        )?;
        if status != 200 {
            return Err(fail(
                "login_failed",
                format!(
                    "the identity provider refused the code ({})",
                    oauth_error(&body)
                ),
            ));
        }
        let tokens = self.tokens(&body, None, Some(&nonce))?;
        if fresh {
            check_fresh(&tokens, started)?;
        }
        Ok(tokens)
    }
}

/// A fresh login must show an `auth_time` from this login.
fn check_fresh(tokens: &Tokens, started: i64) -> Result<(), Failure> {
    match tokens.auth_time {
        Some(t) if t + CLOCK_LEEWAY_S >= started => Ok(()),
        _ => Err(fail(
            "not_fresh",
            "the identity provider did not ask you to sign in again (its token's auth_time is older than this login); \
             try `breakglass login --fresh --browser`, or sign out at the identity provider first",
        )),
    }
}

/// `error (error_description)` of an OAuth error answer.
fn oauth_error(body: &serde_json::Value) -> String {
    let clean = crate::render::clean;
    match (body["error"].as_str(), body["error_description"].as_str()) {
        (Some(e), Some(d)) => format!("{}: {}", clean(e), clean(d)),
        (Some(e), None) => clean(e),
        _ => "no OAuth error in the answer".to_string(),
    }
}

/// What a device login does after a token endpoint error (RFC 8628 §3.5):
/// keep polling (`authorization_pending`), poll 5 s slower (`slow_down`),
/// or stop with the reason.
pub fn next_poll(interval: &mut Duration, body: &serde_json::Value) -> Result<(), Failure> {
    match body["error"].as_str() {
        Some("authorization_pending") => Ok(()),
        Some("slow_down") => {
            *interval =
                (*interval + Duration::from_secs(5)).min(Duration::from_secs(INTERVAL_MAX_S));
            Ok(())
        }
        Some("expired_token") => Err(fail(
            "login_expired_code",
            "the code expired before the sign-in was finished; run `breakglass login` again",
        )),
        Some("access_denied") => Err(Failure::new(
            Exit::Refused,
            "login_denied",
            "the sign-in was declined at the identity provider",
        )),
        _ => Err(fail(
            "login_failed",
            format!(
                "the identity provider ended the device login ({})",
                oauth_error(body)
            ),
        )),
    }
}

/// Accepts connections on the loopback listener until one brings the
/// redirect to `/callback`: returns its code after checking `state`.
fn wait_for_redirect(
    listener: &TcpListener,
    state: &str,
    wait: Duration,
) -> Result<String, Failure> {
    listener
        .set_nonblocking(true)
        .map_err(|e| fail("io", e.to_string()))?;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(fail("io", format!("the redirect listener failed: {e}"))),
        };
        if let Some(result) = handle_redirect(stream, state) {
            return result;
        }
    }
    Err(fail(
        "login_timeout",
        format!(
            "no sign-in came back within {}; run `breakglass login --browser` again",
            breakglass_core::time::format_duration(wait.as_secs())
        ),
    ))
}

/// One request to the listener: `None` for anything but `/callback` (a
/// browser also asks for `/favicon.ico`), else the outcome of the login.
fn handle_redirect(mut stream: TcpStream, state: &str) -> Option<Result<String, Failure>> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REDIRECT_HEAD_BYTES_MAX {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let respond = |stream: &mut TcpStream, status: &str, text: &str| {
        let body = format!("<!DOCTYPE html><html><body><p>{text}</p></body></html>");
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
            body.len()
        );
    };
    if path != "/callback" {
        respond(&mut stream, "404 Not Found", "Not found.");
        return None;
    }
    let params = query_params(query);
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if !get("state").is_some_and(|s| same(s, state)) {
        respond(
            &mut stream,
            "400 Bad Request",
            "This sign-in does not belong to the waiting breakglass login.",
        );
        return Some(Err(fail(
            "login_state_mismatch",
            "the redirect's state does not match this login (a stale tab, or someone else's sign-in); run `breakglass login --browser` again",
        )));
    }
    if let Some(error) = get("error") {
        respond(
            &mut stream,
            "200 OK",
            "Sign-in failed. You can close this tab.",
        );
        let description = get("error_description").unwrap_or("");
        let exit = if error == "access_denied" {
            Exit::Refused
        } else {
            Exit::Error
        };
        return Some(Err(Failure::new(
            exit,
            "login_failed",
            format!(
                "the identity provider refused the sign-in ({}: {})",
                crate::render::clean(error),
                crate::render::clean(description)
            ),
        )));
    }
    match get("code").filter(|c| !c.is_empty() && c.len() <= TOKEN_BYTES_MAX) {
        Some(code) => {
            respond(
                &mut stream,
                "200 OK",
                "Signed in to breakglass. You can close this tab.",
            );
            Some(Ok(code.to_string()))
        }
        None => {
            respond(&mut stream, "400 Bad Request", "No code in the redirect.");
            Some(Err(fail("login_failed", "the redirect brought no code")))
        }
    }
}

/// A GitHub Actions job's OIDC token for `audience`, from
/// `ACTIONS_ID_TOKEN_REQUEST_URL` with `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
pub fn github_actions_token(agent: &ureq::Agent, audience: &str) -> Result<Tokens, Failure> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let (Some(url), Some(request_token)) = (
        env("ACTIONS_ID_TOKEN_REQUEST_URL"),
        env("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        return Err(Failure::usage(
            "not_github_actions",
            "ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set: \
             run this in a GitHub Actions job with `permissions: id-token: write`",
        ));
    };
    check_url(&url, "ACTIONS_ID_TOKEN_REQUEST_URL")?;
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!("{url}{sep}audience={}", encode(audience));
    let (status, body) = read_json(
        agent
            .get(&full)
            .header("Authorization", &format!("Bearer {}", request_token.trim()))
            .header("Accept", "application/json")
            .call(),
        &url,
    )?;
    if status != 200 {
        return Err(fail(
            "login_failed",
            format!(
                "the job's token endpoint answered HTTP {status}; does the job have `permissions: id-token: write`?"
            ),
        ));
    }
    let token = body["value"].as_str().ok_or_else(|| {
        fail(
            "idp_bad_response",
            "the job's token endpoint sent no token (value)",
        )
    })?;
    let claims = claims_of(token)?;
    Ok(Tokens {
        id_token: crate::credentials::Secret(token.to_string()),
        refresh_token: None,
        expires_at: claims["exp"]
            .as_i64()
            .ok_or_else(|| fail("idp_bad_response", "the job's token has no exp"))?,
        auth_time: None,
    })
}

/// The issuer (`iss`) of a JWT, unverified.
pub fn issuer_of(jwt: &str) -> String {
    claims_of(jwt)
        .ok()
        .and_then(|c| c["iss"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_polling_follows_rfc_8628() {
        let mut interval = Duration::from_secs(1);
        let err = |e: &str| serde_json::json!({ "error": e });
        assert!(next_poll(&mut interval, &err("authorization_pending")).is_ok());
        assert_eq!(interval, Duration::from_secs(1));
        assert!(next_poll(&mut interval, &err("slow_down")).is_ok());
        assert_eq!(interval, Duration::from_secs(6), "slow_down adds 5 s");
        let expired = next_poll(&mut interval, &err("expired_token")).expect_err("expired");
        assert_eq!(expired.code, "login_expired_code");
        assert!(
            expired.message.contains("breakglass login"),
            "{}",
            expired.message
        );
        let denied = next_poll(&mut interval, &err("access_denied")).expect_err("denied");
        assert_eq!((denied.code, denied.exit), ("login_denied", Exit::Refused));
        let other = next_poll(
            &mut interval,
            &serde_json::json!({"error": "invalid_grant", "error_description": "gone"}),
        )
        .expect_err("other");
        assert!(
            other.message.contains("invalid_grant: gone"),
            "{}",
            other.message
        );
        for _ in 0..20 {
            let _ = next_poll(&mut interval, &err("slow_down"));
        }
        assert_eq!(interval, Duration::from_secs(INTERVAL_MAX_S), "bounded");
    }

    #[test]
    fn a_fresh_login_must_show_a_new_auth_time() {
        let tokens = |auth_time| Tokens {
            id_token: crate::credentials::Secret("t".into()),
            refresh_token: None,
            expires_at: 0,
            auth_time,
        };
        assert!(check_fresh(&tokens(Some(1000)), 1000).is_ok());
        assert!(
            check_fresh(&tokens(Some(1000 - CLOCK_LEEWAY_S)), 1000).is_ok(),
            "leeway"
        );
        let stale = check_fresh(&tokens(Some(100)), 1000).expect_err("an old sign-in");
        assert!(
            stale.message.contains("--fresh --browser"),
            "{}",
            stale.message
        );
        assert!(check_fresh(&tokens(None), 1000).is_err(), "no auth_time");
    }

    /// Sends `request` to the listener from another thread.
    fn send(port: u16, request: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.write_all(request.as_bytes()).expect("send");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer
        })
    }

    #[test]
    fn the_redirect_listener_checks_state_and_ignores_other_paths() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let favicon = send(port, "GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n");
        let good = send(
            port,
            "GET /callback?code=c%2F1&state=s1 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        // Whichever arrives first, the favicon is answered 404 and skipped.
        let code = wait_for_redirect(&listener, "s1", Duration::from_secs(10)).expect("code");
        if !favicon.is_finished() {
            let again = wait_for_redirect(&listener, "s1", Duration::from_secs(2));
            assert!(again.is_err(), "only the favicon was left");
        }
        assert_eq!(code, "c/1");
        assert!(favicon.join().expect("favicon").starts_with("HTTP/1.1 404"));
        assert!(
            good.join()
                .expect("good")
                .contains("Signed in to breakglass")
        );

        let forged = send(port, "GET /callback?code=c&state=other HTTP/1.1\r\n\r\n");
        let e = wait_for_redirect(&listener, "s1", Duration::from_secs(10)).expect_err("forged");
        assert_eq!(e.code, "login_state_mismatch");
        assert!(forged.join().expect("forged").starts_with("HTTP/1.1 400"));

        let denied = send(
            port,
            "GET /callback?error=access_denied&state=s1 HTTP/1.1\r\n\r\n",
        );
        let e = wait_for_redirect(&listener, "s1", Duration::from_secs(10)).expect_err("denied");
        assert_eq!(e.exit, Exit::Refused);
        drop(denied.join());
        let e = wait_for_redirect(&listener, "s1", Duration::from_millis(200)).expect_err("none");
        assert_eq!(e.code, "login_timeout");
    }

    #[test]
    fn provider_urls_need_https_off_loopback() {
        assert!(check_url("https://idp.example.com", "issuer").is_ok());
        assert!(check_url("http://127.0.0.1:9000/realms/x", "issuer").is_ok());
        assert!(check_url("http://localhost:9000", "issuer").is_ok());
        assert!(check_url("http://[::1]:9000", "issuer").is_ok());
        let e = check_url("http://idp.example.com", "issuer").expect_err("plain http");
        assert!(e.message.contains("https"), "{}", e.message);
        assert!(check_url("http://127.0.0.1.evil.example/", "issuer").is_err());
        assert!(check_url("ftp://idp", "issuer").is_err());
    }

    #[test]
    fn query_strings_roundtrip() {
        let q = encode_form(&[("a b", "c&d=e/ü")]);
        assert_eq!(
            query_params(&q),
            vec![("a b".to_string(), "c&d=e/ü".to_string())]
        );
        assert!(same("abc", "abc") && !same("abc", "abd"));
        assert!(claims_of("a.b").is_err());
        let jwt = format!("x.{}.y", URL_SAFE_NO_PAD.encode(br#"{"iss":"i","exp":5}"#));
        assert_eq!(issuer_of(&jwt), "i");
    }
}
