//! The glue of each verb: call the client or the offline functions, print the
//! result as text or JSON, and choose the exit code.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use breakglass_core::time::format_duration;
use breakglass_core::{Request, State, Timestamp};
use breakglass_server::dto::{ApproveBody, CreateRequest, ReasonBody, RequestList, ReviewBody};
use breakglass_server::offline::{self, Sample};
use serde::Serialize;

use crate::Output;
use crate::client::{
    ApiError, BaseUrl, Client, Token, parse_base_url, read_ca_file, trusted_roots,
};
use crate::exit::{Exit, Failure};
use crate::render;
use crate::{credentials, login};

/// `--wait` polls this often at first, when a quick approval is likely and
/// every millisecond of time-to-access counts...
const POLL_FAST_MS: u64 = 250;
/// ...for this long, then backs off.
const POLL_FAST_FOR_S: u64 = 10;
const POLL_SLOW_MS: u64 = 1000;
/// Page size asked of `GET /v1/requests`.
const LIST_PAGE_SIZE_MAX: u32 = 100;
/// Pages `list` reads at most, whatever the server's cursors do.
const LIST_PAGES_MAX: usize = 100;
/// Page size asked of `GET /v1/audit`.
const AUDIT_PAGE_SIZE: u32 = 500;

/// Where the server is and how to reach it, as given by the flags and the
/// environment of a command that talks to the server.
#[derive(Debug, Clone, Default)]
pub struct ServerConn {
    pub url: String,
    pub token: Option<String>,
    /// The token came from `BREAKGLASS_TOKEN`: hints never suggest putting
    /// it on the command line.
    pub token_from_env: bool,
    pub ca_file: Option<PathBuf>,
    pub insecure_http: bool,
    /// `--otp` / `BREAKGLASS_OTP`.
    pub otp: Option<String>,
}

/// A stored login is renewed when it expires within this many seconds,
/// so it does not run out in the middle of a call.
const REFRESH_MARGIN_S: i64 = 60;

/// What `breakglass login` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct LoginOptions {
    pub browser: bool,
    pub fresh: bool,
    pub github_actions: bool,
    pub audience: Option<String>,
}

/// What every verb needs: where the server is, who we are, how to print.
pub struct Ctx {
    url: String,
    token: Option<Token>,
    token_from_env: bool,
    ca_file: Option<PathBuf>,
    insecure_http: bool,
    otp: Option<String>,
    /// Set when the call used the stored login (for the hints).
    used_stored: std::cell::Cell<bool>,
    pub output: Output,
}

impl Ctx {
    pub fn new(conn: ServerConn, output: Output) -> Ctx {
        Ctx {
            url: conn.url,
            token: conn.token.as_deref().and_then(Token::new),
            token_from_env: conn.token_from_env,
            ca_file: conn.ca_file,
            insecure_http: conn.insecure_http,
            otp: conn.otp.map(|c| c.trim().to_string()),
            used_stored: std::cell::Cell::new(false),
            output,
        }
    }

    /// The server's base URL and the certificates trusted for it.
    fn server(&self) -> Result<(BaseUrl, Vec<ureq::tls::Certificate<'static>>), Failure> {
        let base = parse_base_url(&self.url, self.insecure_http)?;
        let extra = match &self.ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        let roots = if base.https {
            trusted_roots(extra)?
        } else {
            extra
        };
        Ok((base, roots))
    }

    /// The certificates trusted for an identity provider at `url`: the
    /// system's (for https) and `--ca-file`.
    fn idp_roots(&self, url: &str) -> Result<Vec<ureq::tls::Certificate<'static>>, Failure> {
        let extra = match &self.ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        if url.to_ascii_lowercase().starts_with("https://") {
            trusted_roots(extra)
        } else {
            Ok(extra)
        }
    }

    /// The stored login for `server`, renewed first when it is about to
    /// expire. `None` when there is none. The credentials file is read
    /// only here, so `--token` and `BREAKGLASS_TOKEN` never touch it.
    fn stored_token(&self, server: &str) -> anyhow::Result<Option<Token>> {
        let store = credentials::Store::from_env()?;
        let Some(entry) = store.get(server)? else {
            return Ok(None);
        };
        if entry.expires_at - REFRESH_MARGIN_S > login::now_s() {
            return Ok(Token::new(&entry.id_token.0));
        }
        let expired = |why: String| -> anyhow::Error {
            Failure::new(
                Exit::Refused,
                "login_expired",
                format!("your login to {} has expired{why}", render::clean(server)),
            )
            .into()
        };
        let renewed = match (entry.source, &entry.refresh_token) {
            (credentials::Source::GithubActions, _) => {
                return Err(expired(
                    "; run `breakglass login --github-actions` again".to_string(),
                ));
            }
            (credentials::Source::Oidc, None) => {
                return Err(expired(
                    " and cannot be renewed (no refresh token); run `breakglass login`".to_string(),
                ));
            }
            (credentials::Source::Oidc, Some(refresh)) => {
                let agent = crate::client::agent(self.idp_roots(&entry.issuer)?);
                login::Provider::discover(agent, &entry.issuer, &entry.client_id, Vec::new())
                    .and_then(|p| p.refresh(refresh))
            }
        };
        let tokens = renewed.map_err(|e| {
            expired(format!(
                " and could not be renewed ({}); run `breakglass login`",
                e.message
            ))
        })?;
        let token = Token::new(&tokens.id_token.0);
        store.put(
            server,
            credentials::Entry {
                id_token: tokens.id_token,
                refresh_token: tokens.refresh_token,
                expires_at: tokens.expires_at,
                ..entry
            },
        )?;
        Ok(token)
    }

    /// The client, built only by verbs that talk to the server, so a bad
    /// `BREAKGLASS_URL` never breaks `serve` or the offline verbs. Plain
    /// http to a non-loopback address is refused here, before anything is
    /// resolved or sent.
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        let (base, roots) = self.server()?;
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => {
                let stored = self.stored_token(&base.url)?;
                self.used_stored.set(stored.is_some());
                stored
            }
        };
        Ok(Client::new(base, token, roots)
            .with_otp(self.otp.clone())
            .with_otp_prompt(crate::prompt::interactive()))
    }

    pub(crate) fn json(&self) -> bool {
        self.output == Output::Json
    }
}

pub(crate) fn print_text(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// One JSON document, pretty-printed, then a newline.
pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    text.push('\n');
    print_text(&text)?;
    Ok(())
}

/// Prints a request as JSON, or as `heading` plus what happens next.
fn print_request(ctx: &Ctx, heading: Option<String>, r: &Request) -> anyhow::Result<()> {
    if ctx.json() {
        return print_json(r);
    }
    let mut text = heading.map(|h| h + "\n").unwrap_or_default();
    text.push_str(&render::next_steps(r, Timestamp::now()));
    print_text(&text)?;
    Ok(())
}

/// The exit code an error stands for: the HTTP status of an API error, the
/// code of a local failure, 1 for anything else, 0 for a closed pipe
/// (`breakglass audit export | head` is the reader's choice, not a failure).
pub fn exit_for(err: &anyhow::Error) -> Exit {
    if is_broken_pipe(err) {
        return Exit::Success;
    }
    if let Some(a) = err.chain().find_map(|e| e.downcast_ref::<ApiError>()) {
        return a.exit();
    }
    match err.chain().find_map(|e| e.downcast_ref::<Failure>()) {
        Some(f) => f.exit,
        None => Exit::Error,
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// What to do next, where the error alone does not say it. Never suggests
/// putting the token on the command line when it came from the
/// environment.
pub fn hint(ctx: &Ctx, err: &anyhow::Error) -> Option<String> {
    if let Some(f) = err.chain().find_map(|e| e.downcast_ref::<Failure>()) {
        return match f.code {
            "ambiguous_id" => Some("give more characters of the id".to_string()),
            _ => None,
        };
    }
    let api = err.chain().find_map(|e| e.downcast_ref::<ApiError>())?;
    let targets = "see what you may request, with its limits: breakglass targets";
    let code = match api {
        ApiError::Problem { problem, .. } => problem.code.as_str(),
        _ => "",
    };
    let h = match api {
        _ if code == "otp_required" && ctx.otp.is_some() => "a one-time code is accepted once, \
                                                            and this command needed another \
                                                            call: give the full request id, or \
                                                            run it on a terminal, which asks for \
                                                            the next code"
            .to_string(),
        _ if code == "otp_required" => "pass the current one-time code with --otp CODE (or \
                                        BREAKGLASS_OTP); on a terminal breakglass asks for it"
            .to_string(),
        _ if code == "step_up_required" => "this needs a recent sign-in: run `breakglass login \
                                            --fresh`, then try again"
            .to_string(),
        ApiError::Problem { status: 401, .. } | ApiError::Status { status: 401 }
            if ctx.used_stored.get() =>
        {
            format!(
                "the server did not accept your stored login for {}: run `breakglass login`",
                render::clean(&ctx.url)
            )
        }
        ApiError::Problem { status: 401, .. } | ApiError::Status { status: 401 } => {
            match (&ctx.token, ctx.token_from_env) {
                (None, _) => "not signed in: run `breakglass login`, or set BREAKGLASS_TOKEN to \
                              your breakglass token (export BREAKGLASS_TOKEN=...)"
                    .to_string(),
                (Some(_), true) => "the server did not accept your token: check BREAKGLASS_TOKEN \
                                    (is it for the server at BREAKGLASS_URL?)"
                    .to_string(),
                (Some(_), false) => "the server did not accept the token given with --token: \
                                     check it, and prefer BREAKGLASS_TOKEN (arguments show up in \
                                     process lists and shell history)"
                    .to_string(),
            }
        }
        ApiError::Problem { problem, status } => match problem.code.as_str() {
            "unknown_target" | "unknown_role" => targets.to_string(),
            "policy_denied" | "duration_exceeds_policy" | "ticket_required" => targets.to_string(),
            "self_approval" => {
                "an approver other than the requester must approve it: pass the approve \
                 command on to one"
                    .to_string()
            }
            "not_found" if *status == 404 && problem.detail == "no such route" => format!(
                "the server has no such route: is {} the API's base URL (like \
                 https://HOST[:PORT], without /v1)?",
                render::clean(&ctx.url)
            ),
            _ => return None,
        },
        ApiError::Status { status: 404 } => format!(
            "is {} the breakglass API? Something else answered (a proxy, or another service)",
            render::clean(&ctx.url)
        ),
        ApiError::Unreachable { .. } => "is the server running? `breakglass serve --dev` starts \
                                         one; set BREAKGLASS_URL (or --url) to reach another"
            .to_string(),
        ApiError::NotHttp { .. } => "is --url the breakglass API (server.listen, by default \
                                     http://127.0.0.1:8080) and not the PostgreSQL gateway's \
                                     port (gateway.postgres.listen, e.g. 6432)? If the API \
                                     serves TLS, write https://"
            .to_string(),
        ApiError::Tls { cause, .. } => {
            let c = cause.to_ascii_lowercase();
            if c.contains("certificate") || c.contains("issuer") {
                "the server's certificate is not trusted here: pass the CA that signed it with \
                 --ca-file FILE (or BREAKGLASS_CA_FILE)"
                    .to_string()
            } else {
                "the server does not seem to speak TLS on this port: if it serves plain http on \
                 loopback, write http://"
                    .to_string()
            }
        }
        _ => return None,
    };
    Some(h)
}

/// `error: <detail> (<code>)`, and a `hint:` line where one helps; nothing
/// for a closed pipe. Never contains the token.
pub fn error_text(ctx: &Ctx, err: &anyhow::Error) -> Option<String> {
    if is_broken_pipe(err) {
        return None;
    }
    // Multi-line messages (a TOML error with its excerpt) keep their line
    // breaks; every other control character is still escaped.
    let message = format!("{err:#}");
    let lines: Vec<String> = message.lines().map(render::clean).collect();
    let mut text = format!("error: {}\n", lines.join("\n"));
    if let Some(h) = hint(ctx, err) {
        text.push_str("hint: ");
        text.push_str(&h);
        text.push('\n');
    }
    Some(text)
}

/// The error as one JSON object (`--output json`): the server's problem
/// document as it came (RFC 9457), or one of the same shape for a local
/// error, with `exit_code` and `hint` added.
pub fn error_json(ctx: &Ctx, err: &anyhow::Error) -> Option<serde_json::Value> {
    if is_broken_pipe(err) {
        return None;
    }
    let exit = exit_for(err);
    let api = err.chain().find_map(|e| e.downcast_ref::<ApiError>());
    let mut doc = match api {
        Some(ApiError::Problem { problem, .. }) => {
            serde_json::to_value(problem).unwrap_or_else(|_| serde_json::json!({}))
        }
        _ => {
            let code = match (api, err.chain().find_map(|e| e.downcast_ref::<Failure>())) {
                (Some(a), _) => a.code(),
                (None, Some(f)) => f.code.to_string(),
                (None, None) => "error".to_string(),
            };
            let mut doc = serde_json::json!({
                "type": format!("urn:breakglass:problem:{code}"),
                "title": title_of(exit),
                "detail": format!("{err:#}"),
                "code": code,
            });
            if let Some(status) = api.and_then(ApiError::status) {
                doc["status"] = status.into();
            }
            doc
        }
    };
    doc["exit_code"] = exit.code().into();
    if let Some(h) = hint(ctx, err) {
        doc["hint"] = h.into();
    }
    Some(doc)
}

fn title_of(exit: Exit) -> &'static str {
    match exit {
        Exit::Success => "Success",
        Exit::Error => "Error",
        Exit::Usage => "Usage error",
        Exit::Refused => "Refused",
        Exit::WaitTimeout => "Wait timed out",
        Exit::Child(_) => "The remote command failed",
    }
}

/// Prints the error to stderr (as JSON with `--output json`) and returns
/// its exit code.
pub fn report_error(ctx: &Ctx, err: &anyhow::Error) -> Exit {
    let text = if ctx.json() {
        error_json(ctx, err).map(|doc| format!("{doc}\n"))
    } else {
        error_text(ctx, err)
    };
    if let Some(text) = text {
        let _ = io::stderr().lock().write_all(text.as_bytes());
    }
    exit_for(err)
}

/// Request ids given with fewer characters than this are looked up as a
/// prefix; full ids (36 characters) are used as they are.
const FULL_ID_LEN: usize = 36;
/// Candidates asked for (and listed) when a prefix is ambiguous.
const PREFIX_CANDIDATES_MAX: u32 = 10;

/// The full id of the one request visible to the caller whose id starts
/// with `id` (like a short git hash). The server does the matching, so
/// only requests the caller may see are considered.
pub(crate) fn resolve_id(client: &Client, id: &str) -> anyhow::Result<String> {
    if id.len() >= FULL_ID_LEN {
        return Ok(id.to_string());
    }
    let found = client.find_by_prefix(id, PREFIX_CANDIDATES_MAX)?.requests;
    if let Some(exact) = found.iter().find(|r| r.id == id) {
        return Ok(exact.id.clone());
    }
    match found.as_slice() {
        [] => Err(Failure::new(
            Exit::Error,
            "not_found",
            format!(
                "no request you can see has an id starting with {}; list them with: breakglass list",
                render::clean(id)
            ),
        )
        .into()),
        [one] => Ok(one.id.clone()),
        many => {
            let more = if many.len() as u32 >= PREFIX_CANDIDATES_MAX {
                " or more"
            } else {
                ""
            };
            let mut message = format!(
                "the id prefix {} is ambiguous: it matches {}{more} requests:",
                render::clean(id),
                many.len()
            );
            for r in many {
                message.push_str(&format!(
                    "\n  {}  {}  {} on {} ({})",
                    render::clean(&r.id),
                    r.state,
                    render::clean(&r.requester),
                    render::clean(&r.target),
                    render::clean(&r.role)
                ));
            }
            Err(Failure::usage("ambiguous_id", message).into())
        }
    }
}

pub fn serve(opts: breakglass_server::ServeOptions) -> anyhow::Result<Exit> {
    breakglass_server::serve(opts)?;
    Ok(Exit::Success)
}

pub fn request(ctx: &Ctx, body: CreateRequest, wait_s: Option<u64>) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let created = client.create_request(&body)?;
    let Some(wait_s) = wait_s else {
        print_request(ctx, None, &created)?;
        return Ok(Exit::Success);
    };
    if created.state != State::Pending {
        print_request(ctx, None, &created)?;
        return decided(&created);
    }
    if !ctx.json() {
        print_text(&render::next_steps(&created, Timestamp::now()))?;
        eprintln!(
            "Waiting up to {} for a decision on {} (Ctrl-C stops waiting, not the request)...",
            format_duration(wait_s),
            render::clean(&created.id)
        );
    }
    let latest = wait_for_decision(&client, created, Duration::from_secs(wait_s))?;
    // In text the pending state was shown above; say only what changed.
    if ctx.json() || latest.state != State::Pending {
        print_request(ctx, None, &latest)?;
    }
    decided(&latest)
}

/// Polls until the request leaves `pending` or `limit` has passed; returns
/// the last state seen.
fn wait_for_decision(client: &Client, mut r: Request, limit: Duration) -> anyhow::Result<Request> {
    let start = Instant::now();
    let deadline = start + limit;
    while r.state == State::Pending {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let interval = if now.duration_since(start) < Duration::from_secs(POLL_FAST_FOR_S) {
            Duration::from_millis(POLL_FAST_MS)
        } else {
            Duration::from_millis(POLL_SLOW_MS)
        };
        thread::sleep(interval.min(deadline - now));
        r = client.get_request(&r.id).with_context(|| {
            format!(
                "lost track of request {} while waiting; check it with: breakglass show {}",
                r.id, r.id
            )
        })?;
    }
    Ok(r)
}

/// The exit code of `request --wait` for the state it ended in (DESIGN §7).
pub fn exit_after_wait(state: State) -> Exit {
    match state {
        State::Active => Exit::Success,
        State::Denied => Exit::Refused,
        State::Pending => Exit::WaitTimeout,
        State::Cancelled | State::TimedOut | State::Expired | State::Revoked => Exit::Error,
    }
}

/// `Ok` for an active grant; otherwise an error line on stderr with the
/// matching exit code.
fn decided(r: &Request) -> anyhow::Result<Exit> {
    let exit = exit_after_wait(r.state);
    let id = &r.id;
    let failure = match r.state {
        State::Active => return Ok(exit),
        State::Pending => Failure::new(
            exit,
            "wait_timeout",
            format!(
                "request {id} is still pending after the wait; check on it with: breakglass show {id}"
            ),
        ),
        State::Denied => Failure::new(exit, "denied", format!("request {id} was denied")),
        State::Cancelled => Failure::new(exit, "cancelled", format!("request {id} was cancelled")),
        State::TimedOut => Failure::new(
            exit,
            "timed_out",
            format!("request {id} timed out undecided"),
        ),
        State::Expired | State::Revoked => Failure::new(
            exit,
            "ended",
            format!(
                "request {id} was granted but has already ended ({})",
                r.state
            ),
        ),
    };
    Err(failure.into())
}

pub fn approve(ctx: &Ctx, id: &str, comment: Option<String>) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let r = client.approve(id, &ApproveBody { comment })?;
    let heading = match (&r.countersignature, r.state) {
        (Some(_), State::Active) if r.emergency => format!("Countersigned {}.", render::clean(id)),
        _ => format!(
            "Approved {} ({} of {} approval(s)).",
            render::clean(id),
            r.approvals.len(),
            r.approvals_required
        ),
    };
    print_request(ctx, Some(heading), &r)?;
    Ok(Exit::Success)
}

pub fn deny(ctx: &Ctx, id: &str, reason: String) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let r = client.deny(id, &ReasonBody { reason })?;
    print_request(ctx, None, &r)?;
    Ok(Exit::Success)
}

pub fn cancel(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let r = client.cancel(id)?;
    print_request(ctx, None, &r)?;
    Ok(Exit::Success)
}

pub fn revoke(ctx: &Ctx, id: &str, reason: String) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let r = client.revoke(id, &ReasonBody { reason })?;
    print_request(ctx, None, &r)?;
    Ok(Exit::Success)
}

pub fn review(ctx: &Ctx, id: &str, outcome: &str, notes: String) -> anyhow::Result<Exit> {
    let body = ReviewBody {
        outcome: outcome.to_string(),
        notes,
    };
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let r = client.review(id, &body)?;
    print_request(
        ctx,
        Some(format!(
            "Review recorded for {}: {outcome}.",
            render::clean(id)
        )),
        &r,
    )?;
    Ok(Exit::Success)
}

pub fn list(ctx: &Ctx, state: Option<State>, mine: bool, limit: u32) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut requests = Vec::new();
    let mut after: Option<String> = None;
    let mut next = None;
    for _ in 0..LIST_PAGES_MAX {
        let wanted = limit.saturating_sub(requests.len());
        let page_size = u32::try_from(wanted)
            .unwrap_or(LIST_PAGE_SIZE_MAX)
            .min(LIST_PAGE_SIZE_MAX);
        let page = client.list_requests(
            state.map(State::as_str),
            mine,
            Some(page_size),
            after.as_deref(),
        )?;
        let got = page.requests.len();
        requests.extend(page.requests);
        next = page.next;
        // Stop on a full list, the last page, or a cursor that does not move.
        if requests.len() >= limit || got == 0 || next.is_none() || next == after {
            break;
        }
        after = next.clone();
    }
    // A server that ignores the page size must not make the list longer.
    requests.truncate(limit);
    let list = RequestList { requests, next };
    if ctx.json() {
        print_json(&list)?;
    } else {
        print_text(&render::request_table(&list, Timestamp::now()))?;
    }
    Ok(Exit::Success)
}

pub fn show(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let r = client.get_request(id)?;
    if ctx.json() {
        print_json(&r)?;
    } else {
        let mut text = render::request_block(&r, Timestamp::now());
        // The reviewer sees the summary and findings first, the raw
        // recording one step away (DESIGN §16). A server without summaries
        // (or one that refuses) leaves the block out.
        if r.activated_at.is_some()
            && let Ok(s) = client.summary(id)
        {
            text.push_str(&crate::review::summary_text(&s));
        }
        print_text(&text)?;
    }
    Ok(Exit::Success)
}

pub fn credentials(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let c = client.credentials(id)?;
    if ctx.json() {
        print_json(&c)?;
    } else {
        print_text(&render::credentials(&c, Timestamp::now()))?;
    }
    Ok(Exit::Success)
}

/// Fetches fresh credentials and runs the target's client against its
/// gateway. The token travels in the client's environment (PGPASSWORD),
/// never on a command line.
pub fn connect(
    ctx: &Ctx,
    id: &str,
    program: Option<&str>,
    args: &[String],
) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    // A key of this connection's own, in memory: for an SSH target the
    // server signs a certificate for it that stands for the new credential,
    // so ssh signs in with it and no token crosses the terminal. It reaches
    // the disk only for ssh, and nothing else uses it.
    let key = breakglass_gateway_ssh::keys::random_ed25519();
    let public = key
        .public_key()
        .to_openssh()
        .context("cannot encode the session key")?;
    let c = client.credentials_with_ssh_key(id, &public)?;
    let Some(conn) = c.connection.as_ref() else {
        return Err(Failure::new(
            Exit::Error,
            "no_gateway",
            format!(
                "target {} has no gateway on this server; use the credentials directly",
                c.target
            ),
        )
        .into());
    };
    if conn.kind == "ssh" {
        let keys = tempfile::tempdir().context("cannot create a directory for the session key")?;
        let cert = match &c.ssh_certificate {
            Some(cert) => {
                let key_path = keys.path().join("id_ed25519");
                breakglass_gateway_ssh::keys::write_private_key(&key_path, &key)
                    .map_err(|e| anyhow::anyhow!("cannot write the session key: {e}"))?;
                let path = keys.path().join("id_ed25519-cert.pub");
                std::fs::write(&path, format!("{cert}\n"))
                    .context("cannot write the session certificate")?;
                Some((key_path, path))
            }
            None => None,
        };
        return connect_ssh(&c, conn, cert, program.unwrap_or("ssh"), args);
    }
    let program = program.unwrap_or("psql");
    if conn.kind != "postgres" {
        return Err(Failure::new(
            Exit::Error,
            "no_gateway",
            format!(
                "connect does not know how to run a client for {} targets",
                conn.kind
            ),
        )
        .into());
    }
    let mut child = std::process::Command::new(program);
    child
        .env("PGPASSWORD", &c.token)
        .env("PGHOST", &conn.host)
        .env("PGPORT", conn.port.to_string())
        .env("PGUSER", &conn.user)
        .env("PGDATABASE", conn.database.as_deref().unwrap_or(&c.target))
        .env("PGAPPNAME", format!("breakglass:{id}"))
        .args(args);
    eprintln!(
        "Connecting to {} as {} (role {}) until {}; every statement is recorded.",
        c.target,
        c.requester,
        c.role,
        c.expires_at.to_rfc3339()
    );
    let status = child.status().map_err(|e| {
        Failure::new(
            Exit::Error,
            "client_failed",
            format!("cannot run {program}: {e}"),
        )
    })?;
    Ok(if status.success() {
        Exit::Success
    } else {
        Exit::Error
    })
}

/// The environment variable that makes this binary an `SSH_ASKPASS`
/// program answering with the grant credential it holds.
const ASKPASS_TOKEN_ENV: &str = "BREAKGLASS_SSH_ASKPASS_TOKEN";

/// When run by ssh as its `SSH_ASKPASS` (see `connect_ssh`): prints the
/// grant credential for ssh to read, and says so by returning an exit code.
pub fn ssh_askpass() -> Option<std::process::ExitCode> {
    let token = std::env::var(ASKPASS_TOKEN_ENV).ok()?;
    // ssh runs the askpass program with one argument, the prompt.
    if std::env::args_os().count() != 2 {
        return None;
    }
    let mut out = io::stdout().lock();
    let ok = writeln!(out, "{token}").and_then(|()| out.flush()).is_ok();
    Some(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Runs the system's ssh through the SSH gateway: the gateway's host key
/// pinned in a known-hosts file of its own; signed in with the session's
/// key and its certificate (`cert`: key file, certificate file), or, from
/// a server that signed none, with the grant credential answered by this
/// binary as `SSH_ASKPASS` (in ssh's environment only, as PGPASSWORD is
/// for psql). Arguments are the remote command; the exit status is the
/// command's.
fn connect_ssh(
    c: &breakglass_server::dto::Credentials,
    conn: &breakglass_server::dto::Connection,
    cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    program: &str,
    args: &[String],
) -> anyhow::Result<Exit> {
    let Some(host_key) = conn.host_key.as_deref() else {
        return Err(Failure::new(
            Exit::Error,
            "no_gateway",
            "the server did not say its SSH gateway's host key; cannot connect safely",
        )
        .into());
    };
    let me = std::env::current_exe().context("cannot find this program for SSH_ASKPASS")?;
    let known = tempfile::NamedTempFile::new().context("cannot create a known-hosts file")?;
    let host_pattern = if conn.port == 22 {
        conn.host.clone()
    } else {
        format!("[{}]:{}", conn.host, conn.port)
    };
    std::fs::write(known.path(), format!("{host_pattern} {host_key}\n"))
        .context("cannot write a known-hosts file")?;
    let mut child = std::process::Command::new(program);
    child
        .arg("-p")
        .arg(conn.port.to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.path().display()));
    match &cert {
        Some((key, cert)) => {
            child
                .arg("-i")
                .arg(key)
                .arg("-o")
                .arg(format!("CertificateFile={}", cert.display()))
                .args([
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "IdentityAgent=none",
                    "-o",
                    "PreferredAuthentications=publickey",
                ]);
        }
        None => {
            child
                .env(ASKPASS_TOKEN_ENV, &c.token)
                .env("SSH_ASKPASS", &me)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .args([
                    "-o",
                    "PreferredAuthentications=keyboard-interactive,password",
                    "-o",
                    "PubkeyAuthentication=no",
                    "-o",
                    "NumberOfPasswordPrompts=1",
                ]);
        }
    }
    child
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ForwardAgent=no",
            "-o",
            "ForwardX11=no",
            "-o",
            "LogLevel=ERROR",
            "-l",
        ])
        .arg(&conn.user)
        .arg(&conn.host);
    if !args.is_empty() {
        child.arg("--").args(args);
    }
    eprintln!(
        "Connecting to {} as {} (role {}) until {}; the session is recorded.",
        c.target,
        c.requester,
        c.role,
        c.expires_at.to_rfc3339()
    );
    let status = child.status().map_err(|e| {
        Failure::new(
            Exit::Error,
            "client_failed",
            format!("cannot run {program}: {e}"),
        )
    })?;
    drop(known);
    Ok(match status.code() {
        Some(0) => Exit::Success,
        Some(n) => Exit::Child(u8::try_from(n).unwrap_or(1)),
        None => Exit::Error,
    })
}

pub fn sessions(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = &resolve_id(&client, id)?;
    let list = client.sessions(id)?;
    if ctx.json() {
        print_json(&list)?;
        return Ok(Exit::Success);
    }
    if list.sessions.is_empty() {
        print_text(&format!("No gateway sessions for {id}.\n"))?;
        return Ok(Exit::Success);
    }
    let mut out = String::new();
    for s in &list.sessions {
        out.push_str(&format!(
            "{}  {}  started {}  {}  statements {}  client {}\n",
            s.session_id,
            s.principal,
            s.started_at.to_rfc3339(),
            match (&s.ended_at, &s.end_reason) {
                (Some(t), Some(r)) => format!("ended {} ({r})", t.to_rfc3339()),
                _ => "LIVE".to_string(),
            },
            s.statements.map_or("-".to_string(), |n| n.to_string()),
            s.client.as_deref().unwrap_or("-"),
        ));
    }
    print_text(&out)?;
    Ok(Exit::Success)
}

/// Prints a recording page by page; JSON lines with `--output json`.
pub fn recording(ctx: &Ctx, id: &str, asciicast: bool) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if asciicast {
        out.write_all(&client.recording_cast(id)?)?;
        out.flush()?;
        return Ok(Exit::Success);
    }
    let mut after = 0;
    loop {
        let page = client.recording_page(id, after, AUDIT_PAGE_SIZE)?;
        for e in &page.entries {
            if ctx.json() {
                serde_json::to_writer(&mut out, e).context("cannot encode an entry")?;
                out.write_all(b"\n")?;
            } else {
                out.write_all(render::recording_entry(e).as_bytes())?;
            }
        }
        out.flush()?;
        match page.next {
            Some(n) if n > after && !page.entries.is_empty() => after = n,
            _ => break,
        }
    }
    Ok(Exit::Success)
}

/// What the caller may request, from the server's policy.
pub fn targets(ctx: &Ctx) -> anyhow::Result<Exit> {
    let list = ctx.client()?.targets()?;
    if ctx.json() {
        print_json(&list)?;
    } else {
        print_text(&render::targets(&list))?;
    }
    Ok(Exit::Success)
}

/// Prints completions for `shell` of the command line `cmd`.
pub fn completion(cmd: &mut clap::Command, shell: clap_complete::Shell) -> anyhow::Result<Exit> {
    let mut out = Vec::new();
    clap_complete::generate(shell, cmd, "breakglass", &mut out);
    let mut stdout = io::stdout().lock();
    stdout.write_all(&out)?;
    stdout.flush()?;
    Ok(Exit::Success)
}

pub fn whoami(ctx: &Ctx) -> anyhow::Result<Exit> {
    let w = ctx.client()?.whoami()?;
    if ctx.json() {
        print_json(&w)?;
    } else {
        print_text(&render::whoami(&w, Timestamp::now()))?;
    }
    Ok(Exit::Success)
}

/// `breakglass login`: gets tokens (device flow, browser flow, or the
/// GitHub Actions job's token), checks that the server accepts them
/// (`whoami`), then keeps them for this server. Instructions for the
/// person go to stderr; the result to stdout.
pub fn login(ctx: &Ctx, opts: &LoginOptions) -> anyhow::Result<Exit> {
    let (base, roots) = ctx.server()?;
    let store = credentials::Store::from_env()?;
    // Refuse a bad credentials file before anyone signs in.
    store.get(&base.url)?;
    let plain = Client::new(base.clone(), None, roots.clone());
    let (tokens, source, issuer, client_id) = if opts.github_actions {
        let audience = opts.audience.clone().unwrap_or_else(|| base.url.clone());
        let request_url = std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL").unwrap_or_default();
        let agent = crate::client::agent(ctx.idp_roots(&request_url)?);
        let tokens = login::github_actions_token(&agent, &audience)?;
        let issuer = login::issuer_of(&tokens.id_token.0);
        (
            tokens,
            credentials::Source::GithubActions,
            issuer,
            String::new(),
        )
    } else {
        let Some(oidc) = plain.auth_config()?.oidc else {
            return Err(Failure::new(
                Exit::Error,
                "no_identity_provider",
                format!(
                    "the server at {} has no identity provider configured: sign in with a \
                     breakglass token instead (BREAKGLASS_TOKEN)",
                    render::clean(&base.url)
                ),
            )
            .into());
        };
        let agent = crate::client::agent(ctx.idp_roots(&oidc.issuer)?);
        let provider =
            login::Provider::discover(agent, &oidc.issuer, &oidc.client_id, oidc.scopes)?;
        let mut err = io::stderr().lock();
        let tokens = if opts.browser {
            provider.browser_login(opts.fresh, &mut err)?
        } else {
            provider.device_login(opts.fresh, &mut err)?
        };
        (
            tokens,
            credentials::Source::Oidc,
            oidc.issuer,
            oidc.client_id,
        )
    };
    let token =
        Token::new(&tokens.id_token.0).context("the identity provider sent an empty token")?;
    let who = Client::new(base.clone(), Some(token), roots)
        .whoami()
        .context("the server did not accept the new login (nothing was stored)")?;
    let refreshable = tokens.refresh_token.is_some();
    let expires_at = tokens.expires_at;
    store.put(
        &base.url,
        credentials::Entry {
            source,
            issuer,
            client_id,
            id_token: tokens.id_token,
            refresh_token: tokens.refresh_token,
            expires_at,
            subject: who.name.clone(),
        },
    )?;
    let expires = Timestamp::from_millis(expires_at.saturating_mul(1000));
    if ctx.json() {
        print_json(&serde_json::json!({
            "server": base.url,
            "name": who.name,
            "kind": who.kind.as_str(),
            "auth_method": who.auth_method.as_str(),
            "expires_at": expires.to_rfc3339(),
            "refreshable": refreshable,
            "credentials_file": store.path(),
        }))?;
    } else {
        let renew = if refreshable {
            "renewed automatically"
        } else {
            "then run `breakglass login` again"
        };
        print_text(&format!(
            "Signed in to {} as {} ({}); the token expires {}, {renew}.\n",
            render::clean(&base.url),
            render::clean(&who.name),
            who.kind.as_str(),
            render::relative(Timestamp::now(), expires),
        ))?;
    }
    Ok(Exit::Success)
}

/// `breakglass logout`: removes the stored login for this server, then
/// asks the identity provider to revoke its refresh token (best effort:
/// the local entry is gone either way, and the outcome is said).
pub fn logout(ctx: &Ctx) -> anyhow::Result<Exit> {
    let (base, _) = ctx.server()?;
    let store = credentials::Store::from_env()?;
    let removed = store.remove(&base.url)?;
    let revoked = match &removed {
        Some(credentials::Entry {
            source: credentials::Source::Oidc,
            issuer,
            client_id,
            refresh_token: Some(refresh),
            ..
        }) => Some(
            ctx.idp_roots(issuer)
                .map(crate::client::agent)
                .and_then(|agent| login::Provider::discover(agent, issuer, client_id, Vec::new()))
                .and_then(|p| p.revoke(refresh)),
        ),
        _ => None,
    };
    if ctx.json() {
        print_json(&serde_json::json!({
            "server": base.url,
            "removed": removed.is_some(),
            "name": removed.as_ref().map(|e| e.subject.clone()),
            "refresh_token_revoked": matches!(revoked, Some(Ok(true))),
            "credentials_file": store.path(),
        }))?;
    } else {
        let mut text = match &removed {
            Some(e) => format!(
                "Removed the login of {} for {} from {}.\n",
                render::clean(&e.subject),
                render::clean(&base.url),
                store.path().display()
            ),
            None => format!(
                "No login stored for {} (in {}); nothing to remove.\n",
                render::clean(&base.url),
                store.path().display()
            ),
        };
        match &revoked {
            Some(Ok(true)) => text.push_str("The identity provider revoked its refresh token.\n"),
            Some(Ok(false)) => text.push_str(
                "The identity provider offers no revocation: its refresh token stays valid until it expires.\n",
            ),
            Some(Err(e)) => text.push_str(&format!(
                "warning: its refresh token may still be valid: {}\n",
                render::clean(&e.message)
            )),
            None => {}
        }
        print_text(&text)?;
    }
    Ok(Exit::Success)
}

/// Offline: reads the store named by the config.
pub fn audit_verify(
    ctx: &Ctx,
    config: &Path,
    keys: &[String],
    since: Option<&Path>,
) -> anyhow::Result<Exit> {
    let trusted = keys
        .iter()
        .map(|k| breakglass_server::keys::trusted_key_arg(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let since = since.map(offline::read_since).transpose()?;
    let report = offline::audit_verify(config, &trusted, since.as_ref())?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if ctx.json() {
        print_json(&report)?;
    } else {
        print_text(&render::verify_report(&report))?;
    }
    if report.ok {
        return Ok(Exit::Success);
    }
    let seq = report
        .first_bad_seq
        .map(|s| s.to_string())
        .unwrap_or_else(|| "?".to_string());
    let reason = report.reason.as_deref().unwrap_or("no reason given");
    Err(Failure::new(
        Exit::Error,
        "audit_broken",
        format!("the audit chain does not hold at seq {seq}: {reason}"),
    )
    .into())
}

/// `store copy`: the embedded store of `from` into the database whose URL
/// is in the environment variable `var` (never on the command line).
pub fn store_copy(ctx: &Ctx, from: &Path, var: &str) -> anyhow::Result<Exit> {
    let url = std::env::var(var).map_err(|_| {
        Failure::new(
            Exit::Usage,
            "bad_arguments",
            format!("--to-env {var}: environment variable {var} is not set (it must hold the PostgreSQL connection string)"),
        )
    })?;
    let report = offline::store_copy(from, &url)?;
    if ctx.json() {
        print_json(&report)?;
    } else {
        print_text(&format!(
            "copied {} requests, {} credentials, {} events and {} checkpoints; head seq {} hash {}\nnext: point every node at the database (server.database_url_env), then run `breakglass audit verify --config FILE`\n",
            report.requests,
            report.credentials,
            report.events,
            report.checkpoints,
            report.head_seq,
            report.head_hash
        ))?;
    }
    Ok(Exit::Success)
}

/// Every event after `after`, one JSON object a line, page by page until the
/// server says there is nothing more. Always JSON lines, whatever `--output`.
pub fn audit_export(ctx: &Ctx, mut after: Option<u64>) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    loop {
        let page = client.audit_page(after, AUDIT_PAGE_SIZE)?;
        for event in &page.events {
            serde_json::to_writer(&mut out, event).context("cannot encode an audit event")?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        match page.next {
            None => break,
            _ if page.events.is_empty() => break,
            Some(n) if after.is_some_and(|a| n <= a) => {
                return Err(Failure::new(
                    Exit::Error,
                    "bad_response",
                    format!("the audit cursor went from {after:?} to {n}; stopping"),
                )
                .into());
            }
            Some(n) => after = Some(n),
        }
    }
    Ok(Exit::Success)
}

/// Offline: validates the config and policies; with a sample, explains the
/// decision and exits 3 when the sample would be refused.
pub fn policy_check(ctx: &Ctx, config: &Path, sample: Option<&Sample>) -> anyhow::Result<Exit> {
    let report = offline::policy_check(config, sample)?;
    if ctx.json() {
        print_json(&report)?;
    } else {
        print_text(&render::policy_report(&report))?;
    }
    match &report.sample {
        Some(s) if !s.allowed => Ok(Exit::Refused),
        _ => Ok(Exit::Success),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_URL: &str = "http://127.0.0.1:8080";

    #[test]
    fn wait_outcomes_map_to_the_contract() {
        assert_eq!(exit_after_wait(State::Active), Exit::Success);
        assert_eq!(exit_after_wait(State::Denied).code(), 3);
        assert_eq!(exit_after_wait(State::Pending).code(), 4);
        assert_eq!(exit_after_wait(State::Cancelled).code(), 1);
        assert_eq!(exit_after_wait(State::TimedOut).code(), 1);
        assert_eq!(exit_after_wait(State::Expired).code(), 1);
        assert_eq!(exit_after_wait(State::Revoked).code(), 1);
    }

    #[test]
    fn errors_choose_their_exit_code() {
        let refused = anyhow::Error::new(ApiError::Status { status: 403 });
        assert_eq!(exit_for(&refused), Exit::Refused);
        let wrapped = anyhow::Error::new(ApiError::Status { status: 401 }).context("while waiting");
        assert_eq!(exit_for(&wrapped), Exit::Refused);
        let conflict = anyhow::Error::new(ApiError::Status { status: 409 });
        assert_eq!(exit_for(&conflict), Exit::Error);
        let timeout = anyhow::Error::new(Failure::new(Exit::WaitTimeout, "wait_timeout", "x"));
        assert_eq!(exit_for(&timeout), Exit::WaitTimeout);
        assert_eq!(exit_for(&anyhow::anyhow!("disk on fire")), Exit::Error);
        let pipe = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(exit_for(&pipe), Exit::Success);
    }

    fn ctx(url: &str, token: Option<&str>, from_env: bool) -> Ctx {
        Ctx::new(
            ServerConn {
                url: url.to_string(),
                token: token.map(str::to_string),
                token_from_env: from_env,
                ..ServerConn::default()
            },
            Output::Text,
        )
    }

    #[test]
    fn identity_refusals_have_their_own_hints() {
        let problem = |status, code: &str| {
            anyhow::Error::new(ApiError::Problem {
                status,
                problem: breakglass_server::dto::Problem {
                    type_: "about:blank".to_string(),
                    title: "Refused".to_string(),
                    status,
                    detail: "refused".to_string(),
                    code: code.to_string(),
                },
            })
        };
        let plain = ctx(DEFAULT_URL, Some("bgt_x"), true);
        let hint_of = |c: &Ctx, status, code| hint(c, &problem(status, code)).unwrap_or_default();
        assert!(hint_of(&plain, 401, "otp_required").contains("--otp CODE"));
        assert!(hint_of(&plain, 403, "step_up_required").contains("breakglass login --fresh"));
        let with_otp = Ctx::new(
            ServerConn {
                url: DEFAULT_URL.to_string(),
                token: Some("bgt_x".to_string()),
                otp: Some("123456".to_string()),
                ..ServerConn::default()
            },
            Output::Text,
        );
        assert!(hint_of(&with_otp, 401, "otp_required").contains("accepted once"));
        with_otp.used_stored.set(true);
        assert!(
            hint_of(&with_otp, 401, "unauthenticated").contains("stored login"),
            "a refused stored login says to log in again"
        );
    }

    #[test]
    fn error_text_has_the_code_and_a_hint_for_401() {
        let problem = |status| {
            anyhow::Error::new(ApiError::Problem {
                status,
                problem: breakglass_server::dto::Problem {
                    type_: "about:blank".to_string(),
                    title: "Unauthorized".to_string(),
                    status,
                    detail: "missing or invalid bearer token".to_string(),
                    code: "unauthenticated".to_string(),
                },
            })
        };
        let anonymous = ctx(DEFAULT_URL, None, false);
        assert_eq!(
            error_text(&anonymous, &problem(401)).as_deref(),
            Some(
                "error: missing or invalid bearer token (unauthenticated)\n\
                 hint: not signed in: run `breakglass login`, or set BREAKGLASS_TOKEN to your breakglass token (export BREAKGLASS_TOKEN=...)\n"
            )
        );
        // From the environment: never a suggestion to use --token.
        let with_token = ctx(DEFAULT_URL, Some("s3cret"), true);
        let text = error_text(&with_token, &problem(401)).expect("text");
        assert!(text.contains("check BREAKGLASS_TOKEN"), "{text}");
        assert!(!text.contains("--token"), "{text}");
        assert!(!text.contains("s3cret"));
        let flag = ctx(DEFAULT_URL, Some("s3cret"), false);
        let text = error_text(&flag, &problem(401)).expect("text");
        assert!(text.contains("given with --token"), "{text}");
        assert!(!text.contains("s3cret"));
        assert_eq!(
            error_text(&with_token, &problem(409)).as_deref(),
            Some("error: missing or invalid bearer token (unauthenticated)\n")
        );
        let pipe = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(error_text(&with_token, &pipe), None);
    }

    #[test]
    fn json_errors_keep_the_problem_document() {
        let err = anyhow::Error::new(ApiError::Problem {
            status: 403,
            problem: breakglass_server::dto::Problem {
                type_: "urn:breakglass:problem:self_approval".to_string(),
                title: "Forbidden".to_string(),
                status: 403,
                detail: "no".to_string(),
                code: "self_approval".to_string(),
            },
        });
        let c = ctx(DEFAULT_URL, Some("t"), true);
        let doc = error_json(&c, &err).expect("doc");
        assert_eq!(doc["code"], "self_approval");
        assert_eq!(doc["status"], 403);
        assert_eq!(doc["exit_code"], 3);
        let local = anyhow::Error::new(Failure::usage("bad_url", "invalid --url: x"));
        let doc = error_json(&c, &local).expect("doc");
        assert_eq!(doc["code"], "bad_url");
        assert_eq!(doc["exit_code"], 2);
        assert_eq!(doc["detail"], "invalid --url: x (bad_url)");
    }

    #[test]
    fn plain_http_off_loopback_is_a_usage_error() {
        let c = ctx("http://192.0.2.1:8080", Some("t"), true);
        let err = c.client().expect_err("refused");
        assert_eq!(exit_for(&err), Exit::Usage);
        assert!(err.to_string().contains("--insecure-http"), "{err}");
        let c = ctx("https://example.com/v1/", Some("t"), true);
        let err = c.client().expect_err("refused");
        assert!(err.to_string().contains("https://example.com)"), "{err}");
    }
}
