//! The HTTP API (DESIGN §7): axum routes over the application layer,
//! RFC 9457 problem documents with stable codes, body limits, metrics, and
//! the OpenAPI document generated from these handlers.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use breakglass_core::audit::AuditEventJson;
use breakglass_core::lifecycle::Command;
use breakglass_core::{Principal, Request, ReviewOutcome};
use breakglass_store::{ListQuery, PAGE_LEN_MAX};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::app::{App, AppError, GrantRefusal};
use crate::dto::{
    ApproveBody, AuditPage, AuthConfig, CreateRequest, Credentials, CredentialsBody,
    OidcClientConfig, Problem, Readiness, ReasonBody, RecordingPage, RequestList, ReviewBody,
    SessionList, TargetList, VerifyReport, WhoAmI,
};
use crate::evidence::{__path_evidence, evidence};
use crate::listener::ApiConn;
use crate::openapi::Truth;
use crate::slack::SlackSignature;

/// Request bodies larger than this are refused with 413.
pub const BODY_LEN_MAX: usize = 64 * 1024;
/// Default and maximum page sizes of `GET /v1/requests`.
const LIST_LEN_DEFAULT: u32 = 100;
pub const LIST_LEN_MAX: u32 = 500;
/// Default page size of the audit log and recordings (at most
/// `PAGE_LEN_MAX`).
const AUDIT_PAGE_LEN_DEFAULT: u32 = 1000;
/// Longest `after` cursor of `GET /v1/requests` (a request id is 36).
pub const CURSOR_LEN_MAX: usize = 64;

/// Largest `after` sequence number accepted (the store's `seq` is a signed
/// 64-bit integer).
pub const SEQ_MAX: u64 = i64::MAX as u64;

/// `after` of the audit log or a recording, or 0.
fn seq_after(after: Option<u64>) -> ApiResult<u64> {
    match after {
        None => Ok(0),
        Some(n) if n <= SEQ_MAX => Ok(n),
        Some(n) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("after: {n} is out of range; give 0 to {SEQ_MAX}"),
        )),
    }
}

/// `limit` of a page, or the default; out of `1..=max` is bad input (the
/// OpenAPI document says so, rather than answering another size).
fn page_limit(limit: Option<u32>, default: u32, max: u32) -> ApiResult<u32> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit: {n} is out of range; give 1 to {max}"),
        )),
    }
}

type AppState = Arc<App>;

/// An error on its way to the client as `application/problem+json`.
pub struct ApiError {
    status: StatusCode,
    code: String,
    detail: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            detail: detail.into(),
        }
    }

    /// The status, stable code and message, for the web console's pages.
    pub(crate) fn parts(&self) -> (StatusCode, &str, &str) {
        (self.status, &self.code, &self.detail)
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        let (status, code) = e.status_and_code();
        let detail = if e.is_internal() {
            // INVARIANT: internal causes are logged, never returned.
            tracing::error!(error = %e, code, "internal error");
            match status {
                503 => "the store is unavailable; try again shortly".to_string(),
                _ => "internal error; see the server log".to_string(),
            }
        } else {
            e.to_string()
        };
        ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            detail,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            type_: format!("urn:breakglass:problem:{}", self.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code,
        };
        let mut resp = (self.status, Json(problem)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A JSON body whose rejections become problem documents.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => {
                // Axum answers 422 for well-formed JSON of the wrong shape;
                // to the client both are bad input (DESIGN §7: 400).
                let status = match rej.status() {
                    StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
                    s => s,
                };
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "body_too_large"
                } else {
                    "bad_request"
                };
                Err(ApiError::new(status, code, rej.body_text()))
            }
        }
    }
}

/// Query parameters whose rejections become problem documents.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|rej| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", rej.body_text()))
    }
}

/// The authenticated caller.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts);
        let otp = parts.headers.get(OTP_HEADER).and_then(|v| v.to_str().ok());
        let who = app.authenticate(token, otp).await.map_err(ApiError::from)?;
        signed_in(parts);
        Ok(Auth(who))
    }
}

/// The header carrying a local principal's TOTP code.
pub const OTP_HEADER: &str = "x-breakglass-otp";

/// The bearer token of a request ("" without one).
fn bearer(parts: &Parts) -> &str {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
}

/// The connection showed a valid token: it leaves the evictable,
/// deadline-bound pool of unauthenticated connections (see `listener`).
pub(crate) fn signed_in(parts: &Parts) {
    if let Some(ConnectInfo(conn)) = parts.extensions.get::<ConnectInfo<ApiConn>>() {
        conn.slot.authenticate();
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Whether `who` is a local service principal (`kind = "service"`): only a
/// local token makes one; a person or workload of the same name is not.
fn is_service(app: &App, who: &Principal) -> bool {
    who.kind == breakglass_core::PrincipalKind::Local && app.config.is_service(&who.name)
}

/// Service principals check credentials; they never request, approve, deny
/// or review.
pub(crate) fn require_person(app: &App, who: &Principal) -> ApiResult<()> {
    if is_service(app, who) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "service_principal",
            format!(
                "{} is a service principal (kind = \"service\"): it may verify credentials, not request, approve, deny or review",
                who.name
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only requests in this state.
    state: Option<String>,
    /// Page size (default 100, at most 500).
    limit: Option<u32>,
    /// The `next` cursor of the previous page.
    after: Option<String>,
    /// Only the caller's own requests.
    mine: Option<bool>,
    /// Only requests whose id starts with this (1 to 64 letters, digits,
    /// `-`, `_`): how the CLI resolves a short id. At most 20 are returned;
    /// `next` is always null.
    id_prefix: Option<String>,
    /// `true`: only drill requests; `false`: only real use (no drill label).
    drill: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Events with a greater `seq` (default 0: from the start).
    after: Option<u64>,
    /// Page size (default 1000, at most 10000).
    limit: Option<u32>,
}

/// `POST /v1/credentials/verify`: is this grant credential usable now, for
/// this target?
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntrospectBody {
    pub token: String,
    /// Also require that the credential belongs to this principal.
    #[serde(default)]
    pub principal: Option<String>,
    /// The target the caller guards: a credential for another target is
    /// not active.
    #[schema(min_length = 1)]
    pub target: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Introspection {
    pub active: bool,
    /// Why it is not active.
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub requester: Option<String>,
    pub target: Option<String>,
    pub role: Option<String>,
    pub expires_at: Option<String>,
}

#[utoipa::path(post, path = "/v1/requests", request_body = CreateRequest,
    responses((status = 201, body = Request), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = [])))]
async fn create_request(
    State(app): State<AppState>,
    Auth(who): Auth,
    ApiJson(body): ApiJson<CreateRequest>,
) -> ApiResult<(StatusCode, Json<Request>)> {
    require_person(&app, &who)?;
    let req = app.create_request(&who, body).await?;
    Ok((StatusCode::CREATED, Json(req)))
}

#[utoipa::path(get, path = "/v1/requests", params(ListParams),
    responses((status = 200, body = RequestList), (status = 400, body = Problem)),
    security(("bearer" = [])))]
async fn list_requests(
    State(app): State<AppState>,
    Auth(who): Auth,
    ApiQuery(p): ApiQuery<ListParams>,
) -> ApiResult<Json<RequestList>> {
    let state = match p.state.as_deref() {
        None => None,
        Some(s) => Some(breakglass_core::State::parse(s).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("unknown state {s:?}"),
            )
        })?),
    };
    if let Some(prefix) = p.id_prefix.as_deref() {
        return list_by_prefix(&app, &who, prefix, p.limit).await;
    }
    let limit = page_limit(p.limit, LIST_LEN_DEFAULT, LIST_LEN_MAX)?;
    if p.after
        .as_ref()
        .is_some_and(|a| a.is_empty() || a.len() > CURSOR_LEN_MAX)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "after: give the `next` cursor of the previous page (1 to {CURSOR_LEN_MAX} characters)"
            ),
        ));
    }
    let q = ListQuery {
        state,
        requester: None,
        visible_to: None,
        drill: p.drill,
        after: p.after,
        limit,
    };
    let requests = app.list(&who, q, p.mine.unwrap_or(false)).await?;
    let next = if requests.len() as u32 == limit {
        requests.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(RequestList { requests, next }))
}

/// `GET /v1/requests?id_prefix=`: the visible requests whose id starts
/// with the prefix, newest first.
async fn list_by_prefix(
    app: &App,
    who: &Principal,
    prefix: &str,
    limit: Option<u32>,
) -> ApiResult<Json<RequestList>> {
    let limit = limit.unwrap_or(crate::app::ID_PREFIX_MATCHES_MAX);
    let requests = app.find_by_prefix(who, prefix, limit).await?;
    Ok(Json(RequestList {
        requests,
        next: None,
    }))
}

/// What the caller may request now: every configured target, role and
/// action the policy permits, with the governing obligations. Evaluated for
/// a one-second grant without a ticket, at the time of the call.
#[utoipa::path(get, path = "/v1/targets",
    responses((status = 200, body = TargetList), (status = 401, body = Problem)),
    security(("bearer" = [])))]
async fn targets(State(app): State<AppState>, Auth(who): Auth) -> ApiResult<Json<TargetList>> {
    let now = crate::app::now();
    // Policy evaluation is CPU work: keep it off the I/O threads.
    let targets = tokio::task::spawn_blocking(move || app.requestable(&who, now))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "listing targets failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
        })?;
    Ok(Json(TargetList { targets }))
}

#[utoipa::path(get, path = "/v1/requests/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Request), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_request(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Request>> {
    Ok(Json(app.get_visible(&who, &id).await?))
}

#[utoipa::path(post, path = "/v1/requests/{id}/approve", params(("id" = String, Path)), request_body = Option<ApproveBody>,
    responses((status = 200, body = Request), (status = 403, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn approve(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<Request>> {
    require_person(&app, &who)?;
    // The body is optional: `approve` with no comment needs none.
    let comment = optional_json::<ApproveBody>(&headers, body)?.and_then(|b| b.comment);
    Ok(Json(
        app.act(&who, &id, Command::Approve { comment }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/requests/{id}/deny", params(("id" = String, Path)), request_body = ReasonBody,
    responses((status = 200, body = Request), (status = 403, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn deny(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> ApiResult<Json<Request>> {
    require_person(&app, &who)?;
    Ok(Json(
        app.act(
            &who,
            &id,
            Command::Deny {
                reason: body.reason,
            },
        )
        .await?,
    ))
}

#[utoipa::path(post, path = "/v1/requests/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = Request), (status = 403, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn cancel(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Request>> {
    Ok(Json(app.act(&who, &id, Command::Cancel).await?))
}

#[utoipa::path(post, path = "/v1/requests/{id}/revoke", params(("id" = String, Path)), request_body = ReasonBody,
    responses((status = 200, body = Request), (status = 403, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn revoke(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> ApiResult<Json<Request>> {
    Ok(Json(
        app.act(
            &who,
            &id,
            Command::Revoke {
                reason: body.reason,
            },
        )
        .await?,
    ))
}

#[utoipa::path(post, path = "/v1/requests/{id}/review", params(("id" = String, Path)), request_body = ReviewBody,
    responses((status = 200, body = Request), (status = 400, body = Problem), (status = 403, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn review(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReviewBody>,
) -> ApiResult<Json<Request>> {
    require_person(&app, &who)?;
    let outcome = ReviewOutcome::parse(&body.outcome).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("outcome must be ok or misuse, not {:?}", body.outcome),
        )
    })?;
    let cmd = Command::Review {
        outcome,
        notes: body.notes,
    };
    Ok(Json(app.act(&who, &id, cmd).await?))
}

/// A JSON body that may be left out (empty, only whitespace, or `null`:
/// `None`); one that is there must be sent as JSON (415 otherwise).
fn optional_json<T: serde::de::DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Option<T>, ApiError> {
    let body = body.map_err(|rej| {
        let status = rej.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, rej.body_text())
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // A body that is there is JSON, said so as for every other body.
    if !is_json_type(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_request",
            "Expected request with `Content-Type: application/json`",
        ));
    }
    // `null` stands for no body, as the document's optional body says.
    serde_json::from_slice::<Option<T>>(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid JSON body: {e}"),
        )
    })
}

/// `Content-Type: application/json`, or another `application/*+json`
/// (parameters such as `charset` allowed), as axum's `Json` asks.
fn is_json_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(v) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Issues a grant credential to the requester of an active grant. A grant
/// has at most 1,024 (409 `credential_limit`); each is valid for the whole
/// grant. With `ssh_public_key` (an SSH target), the answer also holds a
/// certificate for that key that stands for the new credential.
#[utoipa::path(post, path = "/v1/requests/{id}/credentials", params(("id" = String, Path)), request_body = Option<CredentialsBody>,
    responses((status = 200, body = Credentials), (status = 400, body = Problem, description = "a bad body or ssh_public_key"), (status = 403, body = Problem), (status = 409, body = Problem, description = "wrong_state, credential_limit, or no_gateway")),
    security(("bearer" = [])))]
async fn credentials(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<Credentials>> {
    let body = optional_json::<CredentialsBody>(&headers, body)?.unwrap_or_default();
    Ok(Json(
        app.issue_credentials(&who, &id, body.ssh_public_key.as_deref())
            .await?,
    ))
}

/// Checks a grant credential for a target. Only service principals
/// (`kind = "service"`) may ask: a person has no use for other people's
/// credentials.
#[utoipa::path(post, path = "/v1/credentials/verify", request_body = IntrospectBody,
    responses((status = 200, body = Introspection),
        (status = 400, body = Problem, content_type = "application/problem+json", description = "no target, or a malformed body"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json", description = "not_service_principal: the caller is not a service principal"),
        (status = 503, body = Problem, content_type = "application/problem+json", description = "cannot tell now; treat the credential as not usable")),
    security(("bearer" = [])))]
async fn introspect(
    State(app): State<AppState>,
    Auth(who): Auth,
    ApiJson(body): ApiJson<IntrospectBody>,
) -> ApiResult<Json<Introspection>> {
    if !is_service(&app, &who) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_service_principal",
            format!(
                "{} may not verify credentials: only service principals can (kind = \"service\" in its [[principals]] entry)",
                who.name
            ),
        ));
    }
    if body.target.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "target must name the target the credential is used for",
        ));
    }
    let out = match app
        .check_grant(&body.token, body.principal.as_deref(), Some(&body.target))
        .await
    {
        Ok(g) => Introspection {
            active: true,
            reason: None,
            request_id: Some(g.request.id),
            requester: Some(g.credential.principal),
            target: Some(g.credential.target),
            role: Some(g.credential.role),
            expires_at: Some(g.credential.expires_at.to_rfc3339()),
        },
        // "Not active" would be a lie when the answer is "cannot tell".
        Err(GrantRefusal::Unavailable) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "cannot check the credential right now (store unavailable or audit chain broken); treat it as not usable",
            ));
        }
        Err(why) => Introspection {
            active: false,
            reason: Some(why.to_string()),
            request_id: None,
            requester: None,
            target: None,
            role: None,
            expires_at: None,
        },
    };
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/requests/{id}/sessions", params(("id" = String, Path)),
    responses((status = 200, body = SessionList), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn sessions(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionList>> {
    Ok(Json(SessionList {
        sessions: app.sessions(&who, &id).await?,
    }))
}

/// `GET /v1/sessions/{id}/recording` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecordingParams {
    /// Entries with a greater `seq` (default 0: from the start).
    after: Option<u64>,
    /// Page size (default 1000, at most 10000).
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/sessions/{id}/recording", params(("id" = String, Path), RecordingParams),
    responses((status = 200, body = RecordingPage), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn recording(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<RecordingParams>,
) -> ApiResult<Json<RecordingPage>> {
    let limit = page_limit(p.limit, AUDIT_PAGE_LEN_DEFAULT, PAGE_LEN_MAX)?;
    Ok(Json(
        app.recording(&who, &id, seq_after(p.after)?, limit).await?,
    ))
}

/// An SSH session's recording as one asciicast v2 file, verified as it is
/// read; a PostgreSQL session has no terminal and is refused.
#[utoipa::path(get, path = "/v1/sessions/{id}/cast", params(("id" = String, Path)),
    responses((status = 200, description = "the asciicast v2 file", content_type = "application/x-asciicast", body = String),
        (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn cast(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    let cast = crate::ssh::recording_cast(&app, &who, &id).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-asciicast")],
        cast,
    )
        .into_response())
}

pub(crate) fn require_admin(who: &Principal) -> ApiResult<()> {
    if who.admin {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            "the audit log is readable by members of the admin groups only",
        ))
    }
}

#[utoipa::path(get, path = "/v1/audit", params(AuditParams),
    responses((status = 200, body = AuditPage), (status = 403, body = Problem)),
    security(("bearer" = [])))]
async fn audit(
    State(app): State<AppState>,
    Auth(who): Auth,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditPage>> {
    require_admin(&who)?;
    let limit = page_limit(p.limit, AUDIT_PAGE_LEN_DEFAULT, PAGE_LEN_MAX)?;
    let events = app
        .store
        .audit(seq_after(p.after)?, limit)
        .await
        .map_err(AppError::from)?;
    let next = if events.len() as u32 == limit {
        events.last().map(|e| e.seq)
    } else {
        None
    };
    let events: Vec<AuditEventJson> = events.iter().map(|e| e.to_json()).collect();
    Ok(Json(AuditPage { events, next }))
}

#[utoipa::path(get, path = "/v1/audit/verify",
    responses((status = 200, body = VerifyReport), (status = 403, body = Problem)),
    security(("bearer" = [])))]
async fn audit_verify(
    State(app): State<AppState>,
    Auth(who): Auth,
) -> ApiResult<Json<VerifyReport>> {
    require_admin(&who)?;
    Ok(Json(verify_report(&app).await?))
}

/// The online verification of the whole log (`GET /v1/audit/verify`).
pub(crate) async fn verify_report(app: &App) -> ApiResult<VerifyReport> {
    let report = crate::verify::verify_store(
        app.store.as_ref(),
        &app.trusted_keys(),
        &app.config.recordings_dir(),
        &app.witnesses,
        &app.node_id(),
        Some(&|| app.live_sessions()),
    )
    .await
    .map_err(AppError::from)?;
    Ok(report)
}

#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = WhoAmI), (status = 401, body = Problem)),
    security(("bearer" = [])))]
async fn whoami(Auth(who): Auth) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: who.name,
        groups: who.groups.into_iter().collect(),
        admin: who.admin,
        kind: who.kind,
        auth_method: who.authn.method,
        expires_at: who.authn.expires_at,
        auth_time: who.authn.auth_time,
    })
}

/// How clients sign people in: the identity provider's issuer, the
/// client id and the scopes to ask for. Needs no authentication.
#[utoipa::path(get, path = "/v1/auth/config", responses((status = 200, body = AuthConfig)))]
async fn auth_config(State(app): State<AppState>) -> Json<AuthConfig> {
    Json(AuthConfig {
        oidc: app.identity.oidc().map(|o| OidcClientConfig {
            issuer: o.issuer.clone(),
            client_id: o.client_id.clone(),
            scopes: o.scopes.clone(),
        }),
    })
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 503 while the audit chain is broken or the store does not answer; 200
/// otherwise, with `"identity": "degraded"` while an identity provider is
/// unreachable (its cached keys keep working, so the node keeps serving).
async fn readyz(State(app): State<AppState>) -> ApiResult<Json<Readiness>> {
    if let Some(why) = app.writes_blocked() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_chain_broken",
            why.to_string(),
        ));
    }
    app.store.get("").await.map_err(AppError::from)?;
    if app.feed_lost() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "this node cannot read the shared event feed",
        ));
    }
    Ok(Json(Readiness {
        status: "ready".into(),
        identity: app.identity.health().as_str().into(),
    }))
}

/// `/metrics`: open, or with `server.metrics_token_sha256` only for the
/// bearer of that token (compared in constant time).
async fn metrics(State(app): State<AppState>, req: axum::extract::Request) -> ApiResult<Response> {
    let (parts, _) = req.into_parts();
    if let Some(want) = app
        .config
        .server
        .metrics_token_sha256
        .as_deref()
        .and_then(breakglass_core::token::parse_sha256_hex)
    {
        let token = bearer(&parts);
        if breakglass_core::token::match_token(token, [(&want, ())]).is_none() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "/metrics needs the metrics token: send Authorization: Bearer TOKEN (its SHA-256 is server.metrics_token_sha256)",
            ));
        }
        signed_in(&parts);
    }
    let states = app.store.count_by_state().await.map_err(AppError::from)?;
    let body = app
        .metrics
        .render(&states, app.store.head().0, app.scheduler.tracked());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

async fn openapi_json() -> Response {
    let doc = ApiDoc::openapi();
    match doc.to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn track_metrics(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    app.metrics.observe_http(
        &method,
        &route,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "breakglass", description = "Break-glass access: time-bound, multi-party, audited emergency grants."),
    paths(create_request, list_requests, get_request, approve, deny, cancel, revoke, review, credentials,
          sessions, recording, cast, introspect, audit, audit_verify, whoami, auth_config, targets,
          evidence,
          crate::drill_api::run_drill, crate::drill_api::drill_report,
          crate::review::summary, crate::review::queue, crate::review::report,
          crate::notify::notify_status, crate::notify::notify_test, crate::slack::slack_actions),
    components(schemas(Problem, AuditEventJson)),
    modifiers(&BearerAuth, &Truth, &SlackSignature)
)]
pub struct ApiDoc;

/// Builds the router.
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/v1/requests", post(create_request).get(list_requests))
        .route("/v1/requests/{id}", get(get_request))
        .route("/v1/requests/{id}/approve", post(approve))
        .route("/v1/requests/{id}/deny", post(deny))
        .route("/v1/requests/{id}/cancel", post(cancel))
        .route("/v1/requests/{id}/revoke", post(revoke))
        .route("/v1/requests/{id}/review", post(review))
        .route("/v1/requests/{id}/credentials", post(credentials))
        .route("/v1/requests/{id}/sessions", get(sessions))
        .route("/v1/sessions/{id}/recording", get(recording))
        .route("/v1/sessions/{id}/cast", get(cast))
        .route("/v1/requests/{id}/evidence", get(evidence))
        .route("/v1/requests/{id}/summary", get(crate::review::summary))
        .route("/v1/reviews", get(crate::review::queue))
        .route("/v1/reports", get(crate::review::report))
        .route("/v1/credentials/verify", post(introspect))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/whoami", get(whoami))
        .route("/v1/drills/{name}/run", post(crate::drill_api::run_drill))
        .route("/v1/drills/report", get(crate::drill_api::drill_report))
        .route("/v1/auth/config", get(auth_config))
        .route("/v1/targets", get(targets))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(crate::notify::routes())
        .merge(crate::slack::routes())
        .merge(crate::console::router(&app))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            track_metrics,
        ))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LEN_MAX))
        .with_state(app)
}
