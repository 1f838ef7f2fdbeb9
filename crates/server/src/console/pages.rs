//! The console's pages and form handlers. Each calls the `App` function
//! (and the `http` check) its API handler calls, so a refusal is the API's
//! own status, code and message.

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequest, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use breakglass_core::lifecycle::Command;
use breakglass_core::{Principal, Request, ReviewOutcome, State as ReqState, Timestamp};
use breakglass_store::{ListQuery, PAGE_LEN_MAX};
use serde::Deserialize;

use super::reports::SummaryView;
use super::session::SignedIn;
use super::view::{self, Statement, TimelineEntry};
use super::{ConsoleState, PageError, PlayerPage, Viewer, cookie};
use crate::app::App;
use crate::dto::{CreateRequest, Credentials, SessionSummary, TargetOption, VerifyReport};

pub(super) type PageResult = Result<Response, PageError>;

/// Requests of one state read at most to fill the inbox (pages of
/// `LIST_PAGE_LEN`); the inbox counts what it could not read.
pub const INBOX_SCAN_MAX: usize = 5000;
/// Rows the inbox shows at most.
pub const INBOX_SHOWN_MAX: usize = 100;
/// Rows of one page of the admin's request list and of the audit log.
pub const ADMIN_PAGE_LEN: u32 = 100;
/// Page size when reading the store for the console.
const LIST_PAGE_LEN: u32 = 500;
/// Events of one request's timeline read at most.
const TIMELINE_LEN_MAX: u32 = 2000;
/// Recording entries a replay page reads at most.
const REPLAY_ENTRIES_MAX: usize = 50_000;
/// Bytes of the sign-in form's token and code fields.
const TOKEN_FIELD_LEN_MAX: usize = 16 * 1024;
/// Bytes of a `next` path after signing in.
const NEXT_LEN_MAX: usize = 1024;

pub fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/", get(inbox))
        .route("/signin", get(signin_form).post(signin))
        .route("/signout", post(signout))
        .route("/requests/new", get(new_request_form))
        .route("/requests", post(create_request))
        .route("/requests/{id}", get(request_page))
        .route("/requests/{id}/decide", post(decide))
        .route("/requests/{id}/cancel", post(cancel))
        .route("/requests/{id}/revoke", post(revoke))
        .route("/requests/{id}/review", post(review))
        .route("/requests/{id}/credentials", post(credentials))
        .route("/requests/{id}/sessions/{sid}", get(replay))
        .route("/requests/{id}/sessions/{sid}/cast", get(cast))
        .route("/grants", get(grants))
        .route("/admin", get(admin_requests))
        .route("/admin/audit", get(admin_audit))
}

// ---------------------------------------------------------------- forms

/// A form body whose rejections become pages.
pub struct PageForm<T>(pub T);

impl<T, S> FromRequest<S> for PageForm<T>
where
    axum::Form<T>: FromRequest<S, Rejection = FormRejection>,
    S: Send + Sync,
{
    type Rejection = PageError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, PageError> {
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(v)) => Ok(PageForm(v)),
            Err(rej) => Err(PageError::new(rej.status(), "bad_request", rej.body_text())),
        }
    }
}

/// Refuses a form whose CSRF token is not the session's.
fn check_csrf(s: &SignedIn, sent: &str) -> Result<(), PageError> {
    if s.csrf_ok(sent) {
        Ok(())
    } else {
        Err(PageError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "this form's CSRF token does not belong to your session; reload the page and submit it again",
        ))
    }
}

pub(super) fn html(page: impl Template) -> PageResult {
    html_status(StatusCode::OK, page)
}

fn html_status(status: StatusCode, page: impl Template) -> PageResult {
    let body = page
        .render()
        .map_err(|e| PageError::internal("rendering a page failed", e))?;
    Ok((status, Html(body)).into_response())
}

pub(super) fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// The navigation bar of every signed-in page.
pub struct Nav {
    pub name: String,
    pub admin: bool,
    pub csrf: String,
    /// Which entry is the current page.
    pub here: &'static str,
}

impl Nav {
    pub(super) fn of(s: &SignedIn, here: &'static str) -> Nav {
        Nav {
            name: s.principal.name.clone(),
            admin: s.principal.admin,
            csrf: s.csrf.clone(),
            here,
        }
    }
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    status: u16,
    code: &'a str,
    detail: &'a str,
}

/// A refusal as a page; plain text if even that cannot be rendered.
pub fn error_page(e: &PageError) -> Response {
    let page = ErrorPage {
        status: e.status.as_u16(),
        code: &e.code,
        detail: &e.detail,
    };
    match page.render() {
        Ok(body) => (e.status, Html(body)).into_response(),
        Err(_) => (e.status, e.detail.clone()).into_response(),
    }
}

// --------------------------------------------------------------- sign-in

#[derive(Template)]
#[template(path = "console/signin.html")]
struct SigninPage {
    csrf: String,
    next: String,
    error: Option<String>,
    /// Where signing in with the identity provider starts, when offered.
    oidc: Option<String>,
}

#[derive(Deserialize)]
struct NextQuery {
    #[serde(default)]
    next: String,
}

/// Only a path on this site: `/...`, never `//host` or `/\host`.
pub(super) fn safe_next(next: &str) -> String {
    let ok = next.len() <= NEXT_LEN_MAX
        && next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(|c| c.is_control());
    if ok { next.to_string() } else { "/".into() }
}

/// The sign-in form, with a fresh pre-sign-in CSRF token in a cookie.
async fn signin_form(State(c): State<ConsoleState>, Query(q): Query<NextQuery>) -> PageResult {
    let token = super::session::random_hex();
    signin_page(&c, token, safe_next(&q.next), None, StatusCode::OK)
}

pub(super) fn signin_page(
    c: &ConsoleState,
    csrf: String,
    next: String,
    error: Option<String>,
    status: StatusCode,
) -> PageResult {
    let cookie = c.cookie(c.signin_cookie_name(), &csrf, 3600);
    let oidc =
        super::oidc::offered(c).then(|| format!("/signin/oidc?next={}", view::query_value(&next)));
    let mut resp = html_status(
        status,
        SigninPage {
            csrf,
            next,
            error,
            oidc,
        },
    )?;
    resp.headers_mut().append(header::SET_COOKIE, cookie);
    Ok(resp)
}

#[derive(Deserialize)]
struct SigninForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    otp: String,
    #[serde(default)]
    next: String,
}

pub(super) fn parts_of(headers: &HeaderMap) -> Parts {
    let mut req = axum::http::Request::new(());
    *req.headers_mut() = headers.clone();
    req.into_parts().0
}

/// Signs in with a token (and TOTP code): `App::authenticate` decides, as
/// for every API call.
async fn signin(
    State(c): State<ConsoleState>,
    headers: HeaderMap,
    PageForm(f): PageForm<SigninForm>,
) -> PageResult {
    let parts = parts_of(&headers);
    let next = safe_next(&f.next);
    let expected = cookie(&parts, c.signin_cookie_name()).unwrap_or("");
    let csrf_ok = super::session::same_secret(&f.csrf, expected);
    let fresh = super::session::random_hex();
    if !csrf_ok {
        return signin_page(
            &c,
            fresh,
            next,
            Some("the sign-in form expired or came from another page; sign in again".into()),
            StatusCode::FORBIDDEN,
        );
    }
    if f.token.len() > TOKEN_FIELD_LEN_MAX || f.otp.len() > TOKEN_FIELD_LEN_MAX {
        return signin_page(
            &c,
            fresh,
            next,
            Some(format!(
                "the token is longer than {TOKEN_FIELD_LEN_MAX} bytes; paste the token itself"
            )),
            StatusCode::BAD_REQUEST,
        );
    }
    let otp = Some(f.otp.trim()).filter(|o| !o.is_empty());
    let who = match c.app.authenticate(f.token.trim(), otp).await {
        Ok(who) => who,
        Err(e) => {
            let e = PageError::from(e);
            return signin_page(&c, fresh, next, Some(e.detail), e.status);
        }
    };
    let mut resp = start_session(&c, who, &next)?;
    resp.headers_mut()
        .append(header::SET_COOKIE, c.cookie(c.signin_cookie_name(), "", 0));
    Ok(resp)
}

/// Starts a console session for `who` (until its token expires, at most
/// `SESSION_LIFETIME_S`) and sends the browser to `next`.
pub(super) fn start_session(c: &ConsoleState, who: Principal, next: &str) -> PageResult {
    let now = crate::app::now();
    let cap = Timestamp(now.millis() + (super::SESSION_LIFETIME_S as i64) * 1000);
    let expires_at = who.authn.expires_at.map_or(cap, |t| t.min(cap));
    let Some((id, _)) = c.sessions.start(who, expires_at, now) else {
        return signin_page(
            c,
            super::session::random_hex(),
            next.to_string(),
            Some(format!(
                "the console holds {} sessions, its limit; try again later",
                super::SESSIONS_MAX
            )),
            StatusCode::SERVICE_UNAVAILABLE,
        );
    };
    let max_age = ((expires_at.millis() - now.millis()) / 1000).max(0) as u64;
    let mut resp = see_other(next);
    resp.headers_mut()
        .append(header::SET_COOKIE, c.cookie(c.cookie_name(), &id, max_age));
    Ok(resp)
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn signout(
    State(c): State<ConsoleState>,
    headers: HeaderMap,
    Viewer(s): Viewer,
    PageForm(f): PageForm<CsrfForm>,
) -> PageResult {
    check_csrf(&s, &f.csrf)?;
    if let Some(id) = cookie(&parts_of(&headers), c.cookie_name()) {
        c.sessions.remove(id);
    }
    let mut resp = see_other("/signin");
    resp.headers_mut()
        .append(header::SET_COOKIE, c.cookie(c.cookie_name(), "", 0));
    Ok(resp)
}

// ----------------------------------------------------------------- inbox

/// One request in a list, as the templates show it.
pub struct Row {
    pub id: String,
    pub short_id: String,
    pub requester: String,
    pub target: String,
    pub role: String,
    pub reason: String,
    pub ticket: String,
    pub duration: String,
    pub emergency: bool,
    pub state: String,
    pub approvals: Vec<String>,
    pub missing: u32,
    pub countersign: bool,
    pub created: String,
    /// What the countdown counts to, its RFC 3339 moment, and the time
    /// left as rendered by the server (JavaScript keeps it ticking).
    pub deadline: Option<(&'static str, String, String)>,
    /// Show the state (the inbox does not: all of it awaits you).
    pub show_state: bool,
}

impl Row {
    fn of(r: &Request, now: Timestamp) -> Row {
        Row {
            id: r.id.clone(),
            short_id: r.id.chars().take(8).collect(),
            requester: r.requester.clone(),
            target: r.target.clone(),
            role: r.role.clone(),
            reason: r.reason.clone(),
            ticket: r.ticket.clone().unwrap_or_default(),
            duration: view::duration(r.duration_s),
            emergency: r.emergency,
            state: r.state.as_str().to_string(),
            approvals: r
                .approvals
                .iter()
                .map(|a| match &a.comment {
                    Some(c) if !c.is_empty() => format!("{} ({c})", a.by),
                    _ => a.by.clone(),
                })
                .collect(),
            missing: r
                .approvals_required
                .saturating_sub(r.approvals.len() as u32),
            countersign: r.state == ReqState::Active,
            created: view::moment(r.created_at),
            show_state: true,
            deadline: view::deadline(r).map(|(what, at)| {
                let left = ((at.millis() - now.millis()) / 1000).max(0) as u64;
                (what, at.to_rfc3339(), view::duration(left))
            }),
        }
    }
}

#[derive(Template)]
#[template(path = "console/inbox.html")]
struct InboxPage {
    nav: Nav,
    rows: Vec<Row>,
    more: usize,
}

/// Every request of one state `who` may see, up to `INBOX_SCAN_MAX`.
async fn scan(app: &App, who: &Principal, state: ReqState) -> Result<Vec<Request>, PageError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let q = ListQuery {
            state: Some(state),
            requester: None,
            visible_to: None,
            after: after.clone(),
            limit: LIST_PAGE_LEN,
            drill: None,
        };
        let page = app.list(who, q, false).await?;
        let full = page.len() as u32 == LIST_PAGE_LEN;
        after = page.last().map(|r| r.id.clone());
        out.extend(page);
        if !full || out.len() >= INBOX_SCAN_MAX {
            break;
        }
    }
    Ok(out)
}

/// What `who` can approve or countersign now, emergencies first, then
/// newest first.
pub async fn inbox_rows(app: &App, who: &Principal) -> Result<(Vec<Row>, usize), PageError> {
    let mut reqs = scan(app, who, ReqState::Pending).await?;
    let active = scan(app, who, ReqState::Active).await?;
    reqs.extend(
        active
            .into_iter()
            .filter(|r| r.emergency && r.countersign_by.is_some()),
    );
    reqs.retain(|r| view::awaits(who, r));
    view::inbox_order(&mut reqs);
    let now = crate::app::now();
    let more = reqs.len().saturating_sub(INBOX_SHOWN_MAX);
    let rows = reqs
        .iter()
        .take(INBOX_SHOWN_MAX)
        .map(|r| Row {
            show_state: false,
            ..Row::of(r, now)
        })
        .collect();
    Ok((rows, more))
}

async fn inbox(State(c): State<ConsoleState>, Viewer(s): Viewer) -> PageResult {
    let (rows, more) = inbox_rows(&c.app, &s.principal).await?;
    html(InboxPage {
        nav: Nav::of(&s, "inbox"),
        rows,
        more,
    })
}

#[derive(Deserialize)]
struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    decision: String,
}

/// Approve (or countersign) or deny, with the comment.
async fn decide(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path(id): Path<String>,
    PageForm(f): PageForm<DecideForm>,
) -> PageResult {
    check_csrf(&s, &f.csrf)?;
    let who = &s.principal;
    crate::http::require_person(&c.app, who)?;
    let comment = f.comment.trim().to_string();
    let cmd = match f.decision.as_str() {
        "approve" => Command::Approve {
            comment: Some(comment).filter(|c| !c.is_empty()),
        },
        "deny" => Command::Deny { reason: comment },
        other => {
            return Err(PageError::bad_input(format!(
                "decision must be approve or deny, not {other:?}"
            )));
        }
    };
    let req = c.app.act(who, &id, cmd).await?;
    Ok(see_other(&format!("/requests/{}", req.id)))
}

// ----------------------------------------------------------- new request

/// One choice of the new-request form: a target and role the policy lets
/// the viewer ask for.
pub struct Choice {
    pub value: String,
    pub target: String,
    pub role: String,
    pub max: String,
    pub approvals: u32,
    pub tickets: String,
    pub emergency: bool,
    pub normal: bool,
}

#[derive(Template)]
#[template(path = "console/new.html")]
struct NewPage {
    nav: Nav,
    choices: Vec<Choice>,
    form: NewForm,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
struct ConfirmPage {
    nav: Nav,
    form: NewForm,
}

#[derive(Deserialize, Default, Clone)]
struct NewForm {
    #[serde(default)]
    csrf: String,
    /// `TARGET ROLE`.
    #[serde(default)]
    choice: String,
    #[serde(default)]
    duration: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    ticket: String,
    #[serde(default)]
    emergency: Option<String>,
    /// The second confirmation an emergency request needs.
    #[serde(default)]
    confirm: Option<String>,
}

/// The targets and roles the policy engine lets `who` ask for now, as
/// `App::requestable` (`GET /v1/targets`) computes them.
async fn choices(app: &Arc<App>, who: &Principal) -> Result<Vec<Choice>, PageError> {
    let now = crate::app::now();
    let (app, who) = (app.clone(), who.clone());
    let opts: Vec<TargetOption> = tokio::task::spawn_blocking(move || app.requestable(&who, now))
        .await
        .map_err(|e| PageError::internal("listing targets failed", e))?;
    let mut out: Vec<Choice> = Vec::new();
    for o in opts {
        let value = format!("{} {}", o.target, o.role);
        let ticket = o.ticket_patterns.join(", ");
        if let Some(c) = out.iter_mut().find(|c| c.value == value) {
            c.emergency |= o.emergency;
            c.normal |= !o.emergency;
            if !o.emergency {
                c.max = view::duration(o.max_duration_s);
                c.approvals = o.approvals_required;
                c.tickets = ticket;
            }
            continue;
        }
        out.push(Choice {
            value,
            target: o.target,
            role: o.role,
            max: view::duration(o.max_duration_s),
            approvals: o.approvals_required,
            tickets: ticket,
            emergency: o.emergency,
            normal: !o.emergency,
        });
    }
    Ok(out)
}

async fn new_request_form(State(c): State<ConsoleState>, Viewer(s): Viewer) -> PageResult {
    let choices = choices(&c.app, &s.principal).await?;
    html(NewPage {
        nav: Nav::of(&s, "new"),
        choices,
        form: NewForm {
            duration: "15m".into(),
            ..NewForm::default()
        },
        error: None,
    })
}

async fn create_request(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    PageForm(f): PageForm<NewForm>,
) -> PageResult {
    check_csrf(&s, &f.csrf)?;
    let who = &s.principal;
    let emergency = f.emergency.as_deref() == Some("yes");
    if emergency && f.confirm.as_deref() != Some("yes") {
        // INVARIANT: an emergency request needs a second, explicit step.
        return html(ConfirmPage {
            nav: Nav::of(&s, "new"),
            form: f,
        });
    }
    let Some((target, role)) = f.choice.split_once(' ') else {
        let e = PageError::bad_input("choose a target and role");
        return new_refused(&c, &s, e, f).await;
    };
    if let Err(e) = crate::http::require_person(&c.app, who) {
        return new_refused(&c, &s, e.into(), f).await;
    }
    let body = CreateRequest {
        target: target.to_string(),
        role: role.to_string(),
        duration: f.duration.trim().to_string(),
        reason: f.reason.clone(),
        ticket: Some(f.ticket.trim().to_string()).filter(|t| !t.is_empty()),
        emergency,
        drill: None,
    };
    match c.app.create_request(who, body).await {
        Ok(req) => Ok(see_other(&format!("/requests/{}", req.id))),
        Err(e) => new_refused(&c, &s, e.into(), f).await,
    }
}

/// The new-request form again, with the refusal and what was entered.
async fn new_refused(c: &ConsoleState, s: &SignedIn, e: PageError, f: NewForm) -> PageResult {
    let choices = choices(&c.app, &s.principal).await?;
    html_status(
        e.status,
        NewPage {
            nav: Nav::of(s, "new"),
            choices,
            form: f,
            error: Some(e.detail),
        },
    )
}

// ---------------------------------------------------------------- grants

#[derive(Template)]
#[template(path = "console/grants.html")]
struct GrantsPage {
    nav: Nav,
    rows: Vec<Row>,
    open: Vec<Row>,
}

async fn grants(State(c): State<ConsoleState>, Viewer(s): Viewer) -> PageResult {
    let who = &s.principal;
    let now = crate::app::now();
    let mine = |state| ListQuery {
        state: Some(state),
        requester: None,
        visible_to: None,
        after: None,
        limit: LIST_PAGE_LEN,
        drill: None,
    };
    let active = c.app.list(who, mine(ReqState::Active), true).await?;
    let pending = c.app.list(who, mine(ReqState::Pending), true).await?;
    html(GrantsPage {
        nav: Nav::of(&s, "grants"),
        rows: active
            .iter()
            .filter(|r| r.is_live(now))
            .map(|r| Row::of(r, now))
            .collect(),
        open: pending.iter().map(|r| Row::of(r, now)).collect(),
    })
}

#[derive(Template)]
#[template(path = "console/credentials.html")]
struct CredentialsPage {
    nav: Nav,
    c: Credentials,
    expires: String,
    expires_in: String,
    psql: Option<String>,
}

/// Issues a grant credential and shows it once (the page is never cached).
async fn credentials(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path(id): Path<String>,
    PageForm(f): PageForm<CsrfForm>,
) -> PageResult {
    check_csrf(&s, &f.csrf)?;
    let cred = c.app.issue_credentials(&s.principal, &id, None).await?;
    let now = crate::app::now();
    let psql = cred
        .connection
        .as_ref()
        .filter(|k| k.kind == "postgres")
        .map(|k| {
            format!(
                "psql \"host={} port={} user={} dbname={}\"",
                k.host,
                k.port,
                k.user,
                k.database.as_deref().unwrap_or(&cred.target)
            )
        });
    let left = ((cred.expires_at.millis() - now.millis()) / 1000).max(0) as u64;
    html(CredentialsPage {
        nav: Nav::of(&s, "grants"),
        expires: cred.expires_at.to_rfc3339(),
        expires_in: view::duration(left),
        psql,
        c: cred,
    })
}

// --------------------------------------------------------- request page

#[derive(Template)]
#[template(path = "console/request.html")]
struct RequestPage {
    nav: Nav,
    row: Row,
    timeline: Vec<TimelineEntry>,
    sessions: Vec<SessionRow>,
    can_decide: bool,
    mine: bool,
    live: bool,
    can_review: bool,
    ended: String,
    review: String,
    /// What the sessions did, when there were any.
    summary: Option<SummaryView>,
}

pub struct SessionRow {
    pub id: String,
    pub started: String,
    pub ended: String,
    pub statements: String,
    pub end_reason: String,
}

impl SessionRow {
    fn of(s: &SessionSummary) -> SessionRow {
        SessionRow {
            id: s.session_id.clone(),
            started: view::moment(s.started_at),
            ended: s
                .ended_at
                .map(view::moment)
                .unwrap_or_else(|| "live".into()),
            statements: s.statements.map(|n| n.to_string()).unwrap_or_default(),
            end_reason: s.end_reason.clone().unwrap_or_default(),
        }
    }
}

async fn request_page(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path(id): Path<String>,
) -> PageResult {
    let who = &s.principal;
    let r = c.app.get_visible(who, &id).await?;
    let events = c
        .app
        .store
        .request_events(&r.id, TIMELINE_LEN_MAX)
        .await
        .map_err(crate::app::AppError::from)?;
    let sessions = c.app.sessions(who, &r.id).await?;
    let summary = if sessions.is_empty() {
        None
    } else {
        let s = crate::review::summary_of(&c.app, who, &r.id).await?;
        Some(SummaryView::of(&s))
    };
    let now = crate::app::now();
    let mine = r.requester == who.name;
    let live = r.is_live(now);
    let ended = match (&r.end_reason, &r.ended_by) {
        (Some(why), Some(by)) => format!("{} by {by}", why.as_str()),
        (Some(why), None) => why.as_str().to_string(),
        _ => String::new(),
    };
    let review = r
        .review
        .as_ref()
        .map(|v| {
            format!(
                "{} by {}: {}",
                if v.outcome == ReviewOutcome::Ok {
                    "ok"
                } else {
                    "misuse"
                },
                v.by,
                v.notes
            )
        })
        .unwrap_or_default();
    html(RequestPage {
        nav: Nav::of(&s, ""),
        row: Row::of(&r, now),
        can_decide: view::awaits(who, &r),
        can_review: r.review_required && r.review.is_none() && r.state.is_final() && !mine,
        mine,
        live,
        ended,
        review,
        timeline: view::timeline(&events),
        sessions: sessions.iter().map(SessionRow::of).collect(),
        summary,
    })
}

async fn cancel(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path(id): Path<String>,
    PageForm(f): PageForm<CsrfForm>,
) -> PageResult {
    check_csrf(&s, &f.csrf)?;
    let req = c.app.act(&s.principal, &id, Command::Cancel).await?;
    Ok(see_other(&format!("/requests/{}", req.id)))
}

#[derive(Deserialize)]
struct ReasonForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
    /// Where to go afterwards: `admin` back to the admin list.
    #[serde(default)]
    back: String,
}

/// Revoke (an admin, an approver) or release (the requester) a grant.
async fn revoke(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path(id): Path<String>,
    PageForm(f): PageForm<ReasonForm>,
) -> PageResult {
    check_csrf(&s, &f.csrf)?;
    let reason = f.reason.trim().to_string();
    let req = c
        .app
        .act(&s.principal, &id, Command::Revoke { reason })
        .await?;
    if f.back == "admin" {
        return Ok(see_other("/admin?state=active"));
    }
    Ok(see_other(&format!("/requests/{}", req.id)))
}

#[derive(Deserialize)]
struct ReviewForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    notes: String,
}

async fn review(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path(id): Path<String>,
    PageForm(f): PageForm<ReviewForm>,
) -> PageResult {
    check_csrf(&s, &f.csrf)?;
    crate::http::require_person(&c.app, &s.principal)?;
    let outcome = ReviewOutcome::parse(&f.outcome).ok_or_else(|| {
        PageError::bad_input(format!("outcome must be ok or misuse, not {:?}", f.outcome))
    })?;
    let cmd = Command::Review {
        outcome,
        notes: f.notes,
    };
    let req = c.app.act(&s.principal, &id, cmd).await?;
    Ok(see_other(&format!("/requests/{}", req.id)))
}

// ---------------------------------------------------------------- replay

#[derive(Template)]
#[template(path = "console/replay.html")]
struct ReplayPage {
    nav: Nav,
    request_id: String,
    session_id: String,
    /// PostgreSQL: the statements; otherwise the player.
    postgres: bool,
    statements: Vec<Statement>,
    matched: usize,
    search: String,
    complete: bool,
    truncated: bool,
}

#[derive(Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
}

/// The session `sid` of request `id`, and its target's kind.
async fn session_of(
    app: &App,
    who: &Principal,
    id: &str,
    sid: &str,
) -> Result<(SessionSummary, String), PageError> {
    let sessions = app.sessions(who, id).await?;
    let s = sessions
        .into_iter()
        .find(|s| s.session_id == sid)
        .ok_or_else(|| {
            PageError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no session {sid}"),
            )
        })?;
    let kind = s
        .target
        .as_deref()
        .and_then(|t| app.config.target(t))
        .map_or_else(|| "postgres".to_string(), |t| t.kind.clone());
    Ok((s, kind))
}

async fn replay(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path((id, sid)): Path<(String, String)>,
    Query(q): Query<SearchQuery>,
) -> PageResult {
    let who = &s.principal;
    if q.q.chars().count() > view::SEARCH_LEN_MAX {
        return Err(PageError::bad_input(format!(
            "q: at most {} characters",
            view::SEARCH_LEN_MAX
        )));
    }
    let (session, kind) = session_of(&c.app, who, &id, &sid).await?;
    let mut page = ReplayPage {
        nav: Nav::of(&s, ""),
        request_id: session.request_id.clone(),
        session_id: session.session_id.clone(),
        postgres: kind == "postgres",
        statements: Vec::new(),
        matched: 0,
        search: q.q.clone(),
        complete: true,
        truncated: false,
    };
    if !page.postgres {
        let mut resp = html(page)?;
        resp.extensions_mut().insert(PlayerPage);
        return Ok(resp);
    }
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let rec = c.app.recording(who, &sid, after, PAGE_LEN_MAX).await?;
        page.complete = rec.complete;
        entries.extend(rec.entries);
        match rec.next {
            Some(n) if entries.len() < REPLAY_ENTRIES_MAX => after = n,
            Some(_) => {
                page.truncated = true;
                break;
            }
            None => break,
        }
    }
    let (statements, matched) = view::statements(&entries, &q.q);
    page.statements = statements;
    page.matched = matched;
    html(page)
}

/// The asciicast of a session, for the player.
///
/// Only SSH sessions replay in the player (the same cast as
/// `GET /v1/sessions/{id}/cast`); a PostgreSQL
/// session replays as its statement list.
async fn session_cast(
    app: &App,
    who: &Principal,
    id: &str,
    sid: &str,
) -> Result<String, PageError> {
    let (_, kind) = session_of(app, who, id, sid).await?;
    if kind == "postgres" {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            "not_a_terminal_session",
            "a PostgreSQL session replays as its list of statements, not in the player",
        ));
    }
    Ok(crate::ssh::recording_cast(app, who, sid).await?)
}

async fn cast(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Path((id, sid)): Path<(String, String)>,
) -> PageResult {
    let body = session_cast(&c.app, &s.principal, &id, &sid).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-asciicast"),
        )],
        body,
    )
        .into_response())
}

// ----------------------------------------------------------------- admin

#[derive(Template)]
#[template(path = "console/admin.html")]
struct AdminPage {
    nav: Nav,
    rows: Vec<Row>,
    state: String,
    requester: String,
    next: Option<String>,
    states: &'static [&'static str],
}

#[derive(Deserialize)]
struct AdminQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    requester: String,
    #[serde(default)]
    after: Option<String>,
}

const STATES: &[&str] = &[
    "pending",
    "active",
    "expired",
    "revoked",
    "denied",
    "cancelled",
    "timed_out",
];

async fn admin_requests(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Query(q): Query<AdminQuery>,
) -> PageResult {
    let who = &s.principal;
    crate::http::require_admin(who)?;
    let state = match q.state.as_str() {
        "" => None,
        st => Some(
            ReqState::parse(st)
                .ok_or_else(|| PageError::bad_input(format!("unknown state {st:?}")))?,
        ),
    };
    if q.after
        .as_ref()
        .is_some_and(|a| a.len() > crate::http::CURSOR_LEN_MAX)
        || q.requester.len() > breakglass_core::model::NAME_LEN_MAX
    {
        return Err(PageError::bad_input("after or requester is too long"));
    }
    let lq = ListQuery {
        state,
        requester: Some(q.requester.trim().to_string()).filter(|r| !r.is_empty()),
        visible_to: None,
        after: q.after.clone().filter(|a| !a.is_empty()),
        limit: ADMIN_PAGE_LEN,
        drill: None,
    };
    let reqs = c.app.list(who, lq, false).await?;
    let now = crate::app::now();
    let next = if reqs.len() as u32 == ADMIN_PAGE_LEN {
        reqs.last().map(|r| {
            format!(
                "/admin?state={}&requester={}&after={}",
                view::query_value(&q.state),
                view::query_value(&q.requester),
                view::query_value(&r.id)
            )
        })
    } else {
        None
    };
    html(AdminPage {
        nav: Nav::of(&s, "admin"),
        rows: reqs.iter().map(|r| Row::of(r, now)).collect(),
        state: q.state,
        requester: q.requester,
        next,
        states: STATES,
    })
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    nav: Nav,
    events: Vec<AuditRow>,
    next: Option<u64>,
    head: u64,
    blocked: Option<String>,
    report: Option<VerifyReport>,
}

pub struct AuditRow {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    pub action: String,
    pub request_id: String,
    pub details: String,
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    /// `yes`: run the full verification now.
    #[serde(default)]
    verify: String,
}

async fn admin_audit(
    State(c): State<ConsoleState>,
    Viewer(s): Viewer,
    Query(q): Query<AuditQuery>,
) -> PageResult {
    let who = &s.principal;
    crate::http::require_admin(who)?;
    if q.after > crate::http::SEQ_MAX {
        return Err(PageError::bad_input("after is out of range"));
    }
    let events = c
        .app
        .store
        .audit(q.after, ADMIN_PAGE_LEN)
        .await
        .map_err(crate::app::AppError::from)?;
    let next = if events.len() as u32 == ADMIN_PAGE_LEN {
        events.last().map(|e| e.seq)
    } else {
        None
    };
    let report = if q.verify == "yes" {
        Some(crate::http::verify_report(&c.app).await?)
    } else {
        None
    };
    html(AuditPage {
        nav: Nav::of(&s, "audit"),
        events: events
            .iter()
            .map(|e| AuditRow {
                seq: e.seq,
                time: view::moment(e.time),
                actor: e.actor.clone(),
                action: e.action.clone(),
                request_id: e.request_id.clone().unwrap_or_default(),
                details: e.details.clone(),
            })
            .collect(),
        next,
        head: c.app.store.head().0,
        blocked: c.app.writes_blocked(),
        report,
    })
}
