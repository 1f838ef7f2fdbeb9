//! The HTTP client of the breakglass API (DESIGN §7): one method per route,
//! the JSON bodies of `breakglass_server::dto`, and every failure mapped to an
//! [`ApiError`] that knows its exit code.
//!
//! Limits: every call has a global timeout and every response body is read up
//! to a cap, so a slow or hostile server cannot hang or exhaust the CLI.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use breakglass_core::Request;
use breakglass_server::dto::{
    ApproveBody, AuditPage, AuthConfig, CreateRequest, Credentials, Problem, ReasonBody,
    RecordingPage, RequestList, ReviewBody, SessionList, TargetList, WhoAmI,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::exit::{Exit, Failure};

/// The whole exchange (connect, send, receive the body) must finish within this.
pub const CALL_TIMEOUT_S: u64 = 30;
/// Connecting alone gets less, so an unreachable server is reported quickly.
pub const CONNECT_TIMEOUT_S: u64 = 5;
/// The most bytes of one response body the client reads.
pub const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// A cast is at most this long (the server's limit too).
const CAST_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// The most characters of a base URL accepted.
pub const URL_LEN_MAX: usize = 2048;
/// The most bytes of a `--ca-file` read.
pub const CA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// The header carrying a local principal's one-time (TOTP) code.
pub const OTP_HEADER: &str = "X-Breakglass-OTP";

/// The caller's API token. Its `Debug` never shows it, so it cannot leak
/// through an error message or a log line.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// `None` for an empty value, so `BREAKGLASS_TOKEN=` means "no token".
    pub fn new(s: &str) -> Option<Token> {
        let t = s.trim();
        (!t.is_empty()).then(|| Token(t.to_string()))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum ApiError {
    /// The server answered with an error status and an RFC 9457 problem.
    Problem { status: u16, problem: Problem },
    /// An error status without a readable problem document (a proxy in the
    /// way, or not a breakglass server).
    Status { status: u16 },
    /// Nothing answered at the URL.
    Unreachable { url: String, cause: String },
    /// Something answered, but not in HTTP: another service's port (the
    /// PostgreSQL gateway's), or TLS where plain http was asked for.
    NotHttp { url: String, cause: String },
    /// The TLS handshake failed: an untrusted certificate, or no TLS at all
    /// on the other side.
    Tls { url: String, cause: String },
    /// The server did not finish answering in time.
    Timeout { url: String },
    /// The server answered something this client cannot read.
    BadResponse { detail: String },
    /// The token cannot be sent as a header (for example it holds a line
    /// break). The token itself is never part of the message.
    BadToken,
}

impl ApiError {
    pub fn exit(&self) -> Exit {
        match self {
            ApiError::Problem { status, .. } | ApiError::Status { status } => {
                Exit::for_status(*status)
            }
            ApiError::Unreachable { .. }
            | ApiError::NotHttp { .. }
            | ApiError::Tls { .. }
            | ApiError::Timeout { .. }
            | ApiError::BadResponse { .. } => Exit::Error,
            ApiError::BadToken => Exit::Usage,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Problem { status, .. } | ApiError::Status { status } => Some(*status),
            _ => None,
        }
    }

    /// The stable code: the server's problem `code`, or a local one.
    pub fn code(&self) -> String {
        match self {
            ApiError::Problem { problem, .. } => problem.code.clone(),
            ApiError::Status { status } => format!("http_{status}"),
            ApiError::Unreachable { .. } => "unreachable".to_string(),
            ApiError::NotHttp { .. } => "not_http".to_string(),
            ApiError::Tls { .. } => "tls".to_string(),
            ApiError::Timeout { .. } => "timeout".to_string(),
            ApiError::BadResponse { .. } => "bad_response".to_string(),
            ApiError::BadToken => "bad_token".to_string(),
        }
    }

    /// What went wrong, for people.
    pub fn detail(&self) -> String {
        match self {
            ApiError::Problem { problem, .. } => {
                if problem.detail.trim().is_empty() {
                    problem.title.clone()
                } else {
                    problem.detail.clone()
                }
            }
            ApiError::Status { status } => {
                format!("the server answered HTTP {status} without a problem document")
            }
            ApiError::Unreachable { url, cause } => {
                format!("cannot reach the breakglass server at {url}: {cause}")
            }
            ApiError::NotHttp { url, cause } => {
                format!("the server at {url} did not answer in HTTP: {cause}")
            }
            ApiError::Tls { url, cause } => {
                format!("no secure connection to {url}: {cause}")
            }
            ApiError::Timeout { url } => {
                format!("no complete answer from {url} within {CALL_TIMEOUT_S}s")
            }
            ApiError::BadResponse { detail } => {
                format!("unexpected answer from the server: {detail}")
            }
            ApiError::BadToken => {
                "the token cannot be sent in an HTTP header (it contains invalid characters)"
                    .to_string()
            }
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.detail(), self.code())
    }
}

impl std::error::Error for ApiError {}

/// A checked base URL of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `scheme://host[:port][/prefix]`, without a trailing slash.
    pub url: String,
    pub https: bool,
}

/// Checks and normalizes a base URL: `https://host[:port][/prefix]`, or
/// `http://` to a loopback address (anywhere with `insecure_http`), without
/// credentials, query or fragment, trailing slashes removed. Nothing is
/// resolved or contacted here.
pub fn parse_base_url(text: &str, insecure_http: bool) -> Result<BaseUrl, Failure> {
    let bad = |m: String| Failure::usage("bad_url", format!("invalid --url: {m}"));
    let t = text.trim();
    if t.len() > URL_LEN_MAX {
        return Err(bad(format!(
            "the URL is longer than {URL_LEN_MAX} characters"
        )));
    }
    let lower = t.to_ascii_lowercase();
    let (https, rest) = if lower.starts_with("https://") {
        (true, &t["https://".len()..])
    } else if lower.starts_with("http://") {
        (false, &t["http://".len()..])
    } else {
        return Err(bad(format!(
            "{t}: expected a URL like https://breakglass.example.com or http://127.0.0.1:8080"
        )));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad(format!("{t}: the URL has no host")));
    }
    if authority.contains('@') {
        return Err(bad(format!(
            "{t}: credentials in the URL are not allowed; set BREAKGLASS_TOKEN instead"
        )));
    }
    if t.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(bad(format!(
            "{t}: the URL must not contain spaces, a query or a fragment"
        )));
    }
    let scheme = if https { "https" } else { "http" };
    let path = rest[authority.len()..].trim_end_matches('/');
    if path.to_ascii_lowercase().ends_with("/v1") {
        let base = format!("{scheme}://{authority}{}", &path[..path.len() - 3]);
        return Err(Failure::usage(
            "url_has_api_path",
            format!(
                "invalid --url: {t} ends in /v1; give the server's base URL ({base}): the CLI adds /v1 itself"
            ),
        ));
    }
    let host = host_of(authority);
    if !https && !insecure_http && !is_loopback(&host) {
        return Err(Failure::usage(
            "insecure_http",
            format!(
                "refusing plain http to {host}: it is not a loopback address, so your token and \
                 every request would cross the network unencrypted. Use https:// (add \
                 --ca-file FILE if the server's certificate comes from a private CA), or pass \
                 --insecure-http if this network is trusted"
            ),
        ));
    }
    Ok(BaseUrl {
        url: format!("{scheme}://{}", rest.trim_end_matches('/')),
        https,
    })
}

/// The host of `host[:port]` or `[v6][:port]`, lowercase, without brackets.
pub fn host_of(authority: &str) -> String {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.to_ascii_lowercase()
}

/// `localhost`, 127.0.0.0/8 and ::1: addresses whose traffic never leaves
/// the machine. Names other than `localhost` are not resolved: a name that
/// happens to point at loopback still needs https or `--insecure-http`.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
        || host.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback())
}

/// The certificates trusted for https: the system's (the file or directory
/// OpenSSL would use, or `SSL_CERT_FILE`/`SSL_CERT_DIR`) and `extra`.
pub fn trusted_roots(
    extra: Vec<ureq::tls::Certificate<'static>>,
) -> Result<Vec<ureq::tls::Certificate<'static>>, Failure> {
    let system = rustls_native_certs::load_native_certs();
    let mut roots: Vec<ureq::tls::Certificate<'static>> = system
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    roots.extend(extra);
    if roots.is_empty() {
        return Err(Failure::new(
            Exit::Error,
            "no_ca",
            "no trusted CA certificates: install the system's CA bundle (ca-certificates) \
             or pass the server's CA with --ca-file FILE",
        ));
    }
    Ok(roots)
}

/// The certificates of a PEM file given with `--ca-file`.
pub fn read_ca_file(
    path: &std::path::Path,
) -> Result<Vec<ureq::tls::Certificate<'static>>, Failure> {
    use std::io::Read as _;
    let fail = |m: String| Failure::usage("bad_ca_file", m);
    let file = std::fs::File::open(path)
        .map_err(|e| fail(format!("cannot read --ca-file {}: {e}", path.display())))?;
    let mut pem = Vec::new();
    file.take(CA_FILE_BYTES_MAX + 1)
        .read_to_end(&mut pem)
        .map_err(|e| fail(format!("cannot read --ca-file {}: {e}", path.display())))?;
    if pem.len() as u64 > CA_FILE_BYTES_MAX {
        return Err(fail(format!(
            "--ca-file {} is larger than {CA_FILE_BYTES_MAX} bytes",
            path.display()
        )));
    }
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(fail(format!(
                    "--ca-file {} is not valid PEM: {e}",
                    path.display()
                )));
            }
        }
    }
    if certs.is_empty() {
        return Err(fail(format!(
            "--ca-file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// A client of one breakglass server, acting as the holder of one token.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<Token>,
    /// The one-time code sent as `X-Breakglass-OTP`, if any.
    otp: std::sync::Mutex<Option<String>>,
    otp_prompt: bool,
}

/// The HTTP agent of the CLI, for the API and the identity provider:
/// `roots` are trusted for https, every call has a deadline, redirects are
/// not followed and no proxy from the environment is used (bearer tokens
/// travel in clear over loopback http).
pub fn agent(roots: Vec<ureq::tls::Certificate<'static>>) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        // The same rustls and provider (ring) as the gateway's TLS.
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls)
        // Error statuses carry problem documents we want to read.
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(CALL_TIMEOUT_S)))
        .timeout_connect(Some(Duration::from_secs(CONNECT_TIMEOUT_S)))
        // The API never redirects; a redirect means something else answered.
        .max_redirects(0)
        // The bearer token travels in clear over http: never hand it to a
        // proxy picked up from the environment.
        .proxy(None)
        .user_agent(concat!("breakglass/", env!("CARGO_PKG_VERSION")))
        .build();
    breakglass_notify::agent::agent(config)
}

impl Client {
    /// `base` must come from [`parse_base_url`]; `roots` are the
    /// certificates trusted for https (see [`trusted_roots`]), unused for
    /// http.
    pub fn new(
        base: BaseUrl,
        token: Option<Token>,
        roots: Vec<ureq::tls::Certificate<'static>>,
    ) -> Client {
        Client {
            agent: agent(roots),
            base: base.url,
            token,
            otp: std::sync::Mutex::new(None),
            otp_prompt: false,
        }
    }

    /// Sends `code` as `X-Breakglass-OTP` with every call.
    pub fn with_otp(mut self, code: Option<String>) -> Client {
        self.otp = std::sync::Mutex::new(code);
        self
    }

    /// On `otp_required`, asks for the code on the terminal and retries
    /// once (only when stdin and stderr are terminals).
    pub fn with_otp_prompt(mut self, prompt: bool) -> Client {
        self.otp_prompt = prompt;
        self
    }

    // ---- routes (DESIGN §7) ----

    /// `POST /v1/requests`.
    pub fn create_request(&self, body: &CreateRequest) -> Result<Request, ApiError> {
        self.post("/v1/requests", Some(body))
    }

    /// `GET /v1/requests?state=&mine=&limit=&after=`.
    pub fn list_requests(
        &self,
        state: Option<&str>,
        mine: bool,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<RequestList, ApiError> {
        let mut query = Vec::new();
        if let Some(s) = state {
            query.push(("state", s.to_string()));
        }
        // Only sent when asked for, so a plain list works with any server.
        if mine {
            query.push(("mine", "true".to_string()));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(a) = after {
            query.push(("after", a.to_string()));
        }
        self.get("/v1/requests", &query)
    }

    /// `GET /v1/requests/{id}`.
    pub fn get_request(&self, id: &str) -> Result<Request, ApiError> {
        self.get(&format!("/v1/requests/{id}"), &[])
    }

    /// `GET /v1/requests/{id}/summary`.
    pub fn summary(
        &self,
        id: &str,
    ) -> Result<breakglass_server::review::SummaryResponse, ApiError> {
        self.get(&format!("/v1/requests/{id}/summary"), &[])
    }

    /// `GET /v1/reviews?overdue=`.
    pub fn reviews(
        &self,
        overdue: bool,
    ) -> Result<breakglass_server::review::ReviewQueue, ApiError> {
        let query = if overdue {
            vec![("overdue", "true".to_string())]
        } else {
            Vec::new()
        };
        self.get("/v1/reviews", &query)
    }

    /// `GET /v1/reports?since=`.
    pub fn report(&self, since: &str) -> Result<breakglass_server::review::Report, ApiError> {
        self.get("/v1/reports", &[("since", since.to_string())])
    }

    /// `POST /v1/requests/{id}/approve` (also countersigns).
    pub fn approve(&self, id: &str, body: &ApproveBody) -> Result<Request, ApiError> {
        self.post(&format!("/v1/requests/{id}/approve"), Some(body))
    }

    /// `POST /v1/requests/{id}/deny`.
    pub fn deny(&self, id: &str, body: &ReasonBody) -> Result<Request, ApiError> {
        self.post(&format!("/v1/requests/{id}/deny"), Some(body))
    }

    /// `POST /v1/requests/{id}/cancel`.
    pub fn cancel(&self, id: &str) -> Result<Request, ApiError> {
        self.post::<(), _>(&format!("/v1/requests/{id}/cancel"), None)
    }

    /// `POST /v1/requests/{id}/revoke`.
    pub fn revoke(&self, id: &str, body: &ReasonBody) -> Result<Request, ApiError> {
        self.post(&format!("/v1/requests/{id}/revoke"), Some(body))
    }

    /// `POST /v1/requests/{id}/review`.
    pub fn review(&self, id: &str, body: &ReviewBody) -> Result<Request, ApiError> {
        self.post(&format!("/v1/requests/{id}/review"), Some(body))
    }

    /// `POST /v1/requests/{id}/credentials`.
    pub fn credentials(&self, id: &str) -> Result<Credentials, ApiError> {
        self.post::<(), _>(&format!("/v1/requests/{id}/credentials"), None)
    }

    /// `POST /v1/requests/{id}/credentials` with an SSH public key: for an
    /// SSH target the answer holds a certificate for it.
    pub fn credentials_with_ssh_key(
        &self,
        id: &str,
        ssh_public_key: &str,
    ) -> Result<Credentials, ApiError> {
        let body = breakglass_server::dto::CredentialsBody {
            ssh_public_key: Some(ssh_public_key.to_string()),
        };
        self.post(&format!("/v1/requests/{id}/credentials"), Some(&body))
    }

    /// `GET /v1/audit?after=SEQ&limit=N`.
    pub fn audit_page(&self, after: Option<u64>, limit: u32) -> Result<AuditPage, ApiError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(a) = after {
            query.push(("after", a.to_string()));
        }
        self.get("/v1/audit", &query)
    }

    /// `GET /v1/requests/{id}/sessions`.
    pub fn sessions(&self, id: &str) -> Result<SessionList, ApiError> {
        self.get(&format!("/v1/requests/{id}/sessions"), &[])
    }

    /// `GET /v1/sessions/{id}/recording?after=&limit=`.
    pub fn recording_page(
        &self,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<RecordingPage, ApiError> {
        let query = vec![("after", after.to_string()), ("limit", limit.to_string())];
        self.get(&format!("/v1/sessions/{id}/recording"), &query)
    }

    /// `GET /v1/sessions/{id}/cast`: an SSH session's cast, as the
    /// server wrote it.
    pub fn recording_cast(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let url = self.url(&format!("/v1/sessions/{id}/cast"));
        self.with_otp_retry(|otp| {
            let mut req = self.agent.get(&url).header(
                "Accept",
                "application/x-asciicast, application/problem+json",
            );
            if let Some(auth) = self.auth_header() {
                req = req.header("Authorization", auth);
            }
            if let Some(code) = otp {
                req = req.header(OTP_HEADER, code);
            }
            self.finish_bytes(req.call(), CAST_BYTES_MAX)
                .map(|(_, b)| b)
        })
    }

    /// `GET /v1/auth/config`, without the token: how to sign in.
    pub fn auth_config(&self) -> Result<AuthConfig, ApiError> {
        let url = self.url("/v1/auth/config");
        let req = self
            .agent
            .get(&url)
            .header("Accept", "application/json, application/problem+json");
        self.finish(req.call())
    }

    /// `GET /v1/whoami`.
    pub fn whoami(&self) -> Result<WhoAmI, ApiError> {
        self.get("/v1/whoami", &[])
    }

    /// `GET /v1/targets`.
    pub fn targets(&self) -> Result<TargetList, ApiError> {
        self.get("/v1/targets", &[])
    }

    /// `GET /v1/requests?id_prefix=`: the visible requests whose id starts
    /// with `prefix`.
    pub fn find_by_prefix(&self, prefix: &str, limit: u32) -> Result<RequestList, ApiError> {
        self.get(
            "/v1/requests",
            &[
                ("id_prefix", prefix.to_string()),
                ("limit", limit.to_string()),
            ],
        )
    }

    /// `POST /v1/drills/{name}/run`.
    pub fn drill_run(
        &self,
        name: &str,
        body: &breakglass_server::drill::RunBody,
    ) -> Result<breakglass_server::drill::RunAnswer, ApiError> {
        self.post(&format!("/v1/drills/{name}/run"), Some(body))
    }

    /// `GET /v1/drills/report?since=`.
    pub fn drill_report(
        &self,
        since: &str,
    ) -> Result<breakglass_server::drill::DrillReport, ApiError> {
        self.get("/v1/drills/report", &[("since", since.to_string())])
    }

    // ---- plumbing ----

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn auth_header(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {}", t.0))
    }

    /// `GET /v1/requests/{id}/evidence`, as sent (bundles may be larger
    /// than other answers).
    pub fn evidence(&self, id: &str) -> Result<serde_json::Value, ApiError> {
        self.get_limited(
            &format!("/v1/requests/{id}/evidence"),
            &[],
            breakglass_server::evidence::BUNDLE_LEN_MAX,
        )
    }

    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ApiError> {
        self.get_limited(path, query, RESPONSE_BYTES_MAX)
    }

    fn get_limited<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        limit: u64,
    ) -> Result<T, ApiError> {
        let url = self.url(path);
        self.with_otp_retry(|otp| {
            let mut req = self
                .agent
                .get(&url)
                .header("Accept", "application/json, application/problem+json");
            if let Some(auth) = self.auth_header() {
                req = req.header("Authorization", auth);
            }
            if let Some(code) = otp {
                req = req.header(OTP_HEADER, code);
            }
            for (k, v) in query {
                req = req.query(*k, v);
            }
            let (status, bytes) = self.finish_bytes(req.call(), limit)?;
            serde_json::from_slice(&bytes).map_err(|e| ApiError::BadResponse {
                detail: format!("cannot decode the JSON body of an HTTP {status} answer: {e}"),
            })
        })
    }

    pub(crate) fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let url = self.url(path);
        self.with_otp_retry(|otp| {
            let mut req = self
                .agent
                .post(&url)
                .header("Accept", "application/json, application/problem+json");
            if let Some(auth) = self.auth_header() {
                req = req.header("Authorization", auth);
            }
            if let Some(code) = otp {
                req = req.header(OTP_HEADER, code);
            }
            let result = match body {
                Some(b) => req.send_json(b),
                None => req.send_empty(),
            };
            self.finish(result)
        })
    }

    /// Runs `call` with the one-time code, if any. When the server answers
    /// `otp_required` and prompting is on, asks for the code on the
    /// terminal and runs `call` once more: the refused call did nothing,
    /// so sending it again is safe. The code is used once: the server
    /// refuses a code it has seen.
    fn with_otp_retry<T>(
        &self,
        call: impl Fn(Option<&str>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let otp = self.otp.lock().unwrap_or_else(|p| p.into_inner()).take();
        match call(otp.as_deref()) {
            Err(ApiError::Problem {
                status: 401,
                problem,
            }) if problem.code == "otp_required" && otp.is_none() && self.otp_prompt => {
                match crate::prompt::otp_code(&problem.detail) {
                    Ok(code) => call(Some(&code)),
                    // No answer (end of input): the refusal stands, and
                    // its hint names --otp.
                    Err(_) => Err(ApiError::Problem {
                        status: 401,
                        problem,
                    }),
                }
            }
            other => other,
        }
    }

    fn finish<T: DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ApiError> {
        let (status, bytes) = self.finish_bytes(result, RESPONSE_BYTES_MAX)?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadResponse {
            detail: format!("cannot decode the JSON body of an HTTP {status} answer: {e}"),
        })
    }

    /// The body of a successful answer (at most `limit` bytes), or the
    /// problem of a failed one.
    fn finish_bytes(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        limit: u64,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let mut resp = result.map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().with_config().limit(limit).read_to_vec();
        if (200..300).contains(&status) {
            let bytes = body.map_err(|e| self.transport_error(e))?;
            Ok((status, bytes))
        } else {
            // Whatever went wrong reading an error body, the status decides.
            let problem = body
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Problem>(&bytes).ok());
            Err(match problem {
                Some(problem) => ApiError::Problem { status, problem },
                None => ApiError::Status { status },
            })
        }
    }

    fn transport_error(&self, e: ureq::Error) -> ApiError {
        let url = self.base.clone();
        match e {
            ureq::Error::Timeout(_) => ApiError::Timeout { url },
            ureq::Error::BodyExceedsLimit(n) => ApiError::BadResponse {
                detail: format!("the answer is larger than {n} bytes"),
            },
            ureq::Error::Http(_) => ApiError::BadToken,
            ureq::Error::Protocol(p) => ApiError::NotHttp {
                url,
                cause: p.to_string(),
            },
            // The TLS layer reports through I/O errors.
            ureq::Error::Io(io)
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>()) =>
            {
                ApiError::Tls {
                    url,
                    cause: io.to_string(),
                }
            }
            // Reset or closed mid-answer: typically a service that does not
            // speak HTTP dropping what it cannot parse.
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                ApiError::NotHttp {
                    url,
                    cause: io.to_string(),
                }
            }
            ureq::Error::Rustls(e) => ApiError::Tls {
                url,
                cause: e.to_string(),
            },
            ureq::Error::Tls(e) => ApiError::Tls {
                url,
                cause: e.to_string(),
            },
            ureq::Error::Json(j) => ApiError::BadResponse {
                detail: format!("JSON: {j}"),
            },
            other => ApiError::Unreachable {
                url,
                cause: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(url: &str) -> Result<String, String> {
        parse_base_url(url, false)
            .map(|b| b.url)
            .map_err(|f| f.message)
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base("http://127.0.0.1:8080/").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert_eq!(
            base(" HTTP://localhost:9/bg// ").as_deref(),
            Ok("http://localhost:9/bg")
        );
        assert_eq!(base("http://[::1]:9").as_deref(), Ok("http://[::1]:9"));
        assert_eq!(
            base("https://bg.example.com").as_deref(),
            Ok("https://bg.example.com")
        );
        for bad in [
            "",
            "127.0.0.1:8080",
            "http://",
            "http:///v1",
            "http://user:pw@host",
            "http://host/?x=1",
            "http://ho st",
            "ftp://host",
        ] {
            assert!(base(bad).is_err(), "{bad:?} accepted");
        }
        let v1 = base("https://bg.example.com:8443/v1/").expect_err("/v1");
        assert!(v1.contains("(https://bg.example.com:8443)"), "{v1}");
        for remote in [
            "http://192.0.2.1:8080",
            "http://bg.example.com",
            "http://[2001:db8::1]:80",
        ] {
            let e = base(remote).expect_err("plain http off loopback");
            assert!(
                e.contains("--insecure-http") && e.contains("https://"),
                "{e}"
            );
            assert!(
                parse_base_url(remote, true).is_ok(),
                "{remote} with --insecure-http"
            );
        }
    }

    #[test]
    fn token_is_never_shown() {
        let t = Token::new("s3cret-value").expect("token");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        let b = parse_base_url("http://127.0.0.1:1", false).expect("url");
        let c = Client::new(b, Some(t), Vec::new());
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(Token::new("  ").is_none());
    }

    #[test]
    fn api_errors_map_to_exit_codes_and_codes() {
        let problem = |status: u16, code: &str| ApiError::Problem {
            status,
            problem: Problem {
                type_: "about:blank".to_string(),
                title: "Forbidden".to_string(),
                status,
                detail: "you cannot approve your own request".to_string(),
                code: code.to_string(),
            },
        };
        let e = problem(403, "self_approval");
        assert_eq!(e.exit(), Exit::Refused);
        assert_eq!(
            e.to_string(),
            "you cannot approve your own request (self_approval)"
        );
        assert_eq!(problem(401, "unauthenticated").exit(), Exit::Refused);
        assert_eq!(problem(409, "wrong_state").exit(), Exit::Error);
        assert_eq!(ApiError::Status { status: 502 }.exit(), Exit::Error);
        assert_eq!(ApiError::Status { status: 502 }.code(), "http_502");
        let down = ApiError::Unreachable {
            url: "http://127.0.0.1:1".to_string(),
            cause: "connection refused".to_string(),
        };
        assert_eq!(down.exit(), Exit::Error);
        assert_eq!(
            down.to_string(),
            "cannot reach the breakglass server at http://127.0.0.1:1: connection refused (unreachable)"
        );
        assert_eq!(ApiError::BadToken.exit(), Exit::Usage);
    }

    #[test]
    fn unreachable_server_is_an_error() {
        // Port 1 on loopback: nothing listens there, the connect fails fast.
        let b = parse_base_url("http://127.0.0.1:1", false).expect("url");
        let c = Client::new(b, Token::new("t"), Vec::new());
        let e = c.whoami().expect_err("nothing listens on port 1");
        assert_eq!(e.exit(), Exit::Error);
        assert!(
            matches!(e, ApiError::Unreachable { .. } | ApiError::Timeout { .. }),
            "{e:?}"
        );
    }
}
