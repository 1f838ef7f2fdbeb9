//! The glue of each verb: call the client or the offline functions, print the
//! result as text or JSON, and choose the exit code.

use std::io::{self, Write};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use breakglass_core::time::format_duration;
use breakglass_core::{Request, State, Timestamp};
use breakglass_server::dto::{ApproveBody, CreateRequest, ReasonBody, RequestList, ReviewBody};
use breakglass_server::offline::{self, Sample};
use serde::Serialize;

use crate::Output;
use crate::client::{ApiError, Client, Token, parse_base_url};
use crate::exit::{Exit, Failure};
use crate::render;

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

/// What every verb needs: where the server is, who we are, how to print.
pub struct Ctx {
    url: String,
    token: Option<Token>,
    pub output: Output,
}

impl Ctx {
    pub fn new(url: String, token: Option<&str>, output: Output) -> Ctx {
        Ctx {
            url,
            token: token.and_then(Token::new),
            output,
        }
    }

    /// The client, built only by verbs that talk to the server, so a bad
    /// `BREAKGLASS_URL` never breaks `serve` or the offline verbs.
    fn client(&self) -> Result<Client, Failure> {
        let base = parse_base_url(&self.url)
            .map_err(|m| Failure::usage("bad_url", format!("invalid --url: {m}")))?;
        Ok(Client::new(base, self.token.clone()))
    }

    fn json(&self) -> bool {
        self.output == Output::Json
    }
}

fn print_text(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// One JSON document, pretty-printed, then a newline.
fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
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
    let api = err.chain().find_map(|e| e.downcast_ref::<ApiError>());
    let hint = match api {
        Some(a) if a.status() == Some(401) && ctx.token.is_none() => {
            Some("no token given: set BREAKGLASS_TOKEN (or pass --token) to your breakglass token")
        }
        Some(a) if a.status() == Some(401) => {
            Some("the server did not accept your token: check BREAKGLASS_TOKEN (or --token)")
        }
        Some(ApiError::Unreachable { .. }) => Some(
            "is the server running? `breakglass serve --dev` starts one; \
             set BREAKGLASS_URL (or --url) to reach another",
        ),
        _ => None,
    };
    if let Some(h) = hint {
        text.push_str("hint: ");
        text.push_str(h);
        text.push('\n');
    }
    Some(text)
}

/// Prints the error to stderr and returns its exit code.
pub fn report_error(ctx: &Ctx, err: &anyhow::Error) -> Exit {
    if let Some(text) = error_text(ctx, err) {
        let _ = io::stderr().lock().write_all(text.as_bytes());
    }
    exit_for(err)
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
    let r = ctx.client()?.approve(id, &ApproveBody { comment })?;
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
    let r = ctx.client()?.deny(id, &ReasonBody { reason })?;
    print_request(ctx, None, &r)?;
    Ok(Exit::Success)
}

pub fn cancel(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let r = ctx.client()?.cancel(id)?;
    print_request(ctx, None, &r)?;
    Ok(Exit::Success)
}

pub fn revoke(ctx: &Ctx, id: &str, reason: String) -> anyhow::Result<Exit> {
    let r = ctx.client()?.revoke(id, &ReasonBody { reason })?;
    print_request(ctx, None, &r)?;
    Ok(Exit::Success)
}

pub fn review(ctx: &Ctx, id: &str, outcome: &str, notes: String) -> anyhow::Result<Exit> {
    let body = ReviewBody {
        outcome: outcome.to_string(),
        notes,
    };
    let r = ctx.client()?.review(id, &body)?;
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
    let r = ctx.client()?.get_request(id)?;
    if ctx.json() {
        print_json(&r)?;
    } else {
        print_text(&render::request_block(&r, Timestamp::now()))?;
    }
    Ok(Exit::Success)
}

pub fn credentials(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let c = ctx.client()?.credentials(id)?;
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
pub fn connect(ctx: &Ctx, id: &str, program: &str, args: &[String]) -> anyhow::Result<Exit> {
    let c = ctx.client()?.credentials(id)?;
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

pub fn sessions(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let list = ctx.client()?.sessions(id)?;
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
pub fn recording(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
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

pub fn whoami(ctx: &Ctx) -> anyhow::Result<Exit> {
    let w = ctx.client()?.whoami()?;
    if ctx.json() {
        print_json(&w)?;
    } else {
        print_text(&render::whoami(&w))?;
    }
    Ok(Exit::Success)
}

/// Offline: reads the store named by the config.
pub fn audit_verify(ctx: &Ctx, config: &Path, keys: &[String]) -> anyhow::Result<Exit> {
    let trusted = keys
        .iter()
        .map(|k| breakglass_server::keys::trusted_key_arg(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = offline::audit_verify(config, &trusted)?;
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
        let anonymous = Ctx::new(DEFAULT_URL.to_string(), None, Output::Text);
        assert_eq!(
            error_text(&anonymous, &problem(401)).as_deref(),
            Some(
                "error: missing or invalid bearer token (unauthenticated)\n\
                 hint: no token given: set BREAKGLASS_TOKEN (or pass --token) to your breakglass token\n"
            )
        );
        let with_token = Ctx::new(DEFAULT_URL.to_string(), Some("s3cret"), Output::Text);
        let text = error_text(&with_token, &problem(401)).expect("text");
        assert!(text.contains("did not accept your token"), "{text}");
        assert!(!text.contains("s3cret"));
        assert_eq!(
            error_text(&with_token, &problem(409)).as_deref(),
            Some("error: missing or invalid bearer token (unauthenticated)\n")
        );
        let pipe = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(error_text(&with_token, &pipe), None);
    }

    #[test]
    fn a_bad_url_is_a_usage_error() {
        let ctx = Ctx::new("https://example.com".to_string(), Some("t"), Output::Text);
        let err = anyhow::Error::new(ctx.client().expect_err("https is refused"));
        assert_eq!(exit_for(&err), Exit::Usage);
    }
}
