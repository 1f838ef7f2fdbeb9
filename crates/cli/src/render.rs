//! Text output for people: every function takes the data and `now` and returns
//! the text, so what the operator reads is tested without a server or a clock.
//!
//! The text says what happens next (who must act, with which command, by
//! when). Free text written by other people (reasons, comments, names) is
//! passed through [`clean`] so it cannot drive the terminal.

use std::fmt::Write as _;

use breakglass_core::time::format_duration;
use breakglass_core::{EndReason, Request, ReviewOutcome, State, Timestamp};
use breakglass_server::dto::{Credentials, RequestList, TargetList, VerifyReport, WhoAmI};
use breakglass_server::offline::PolicyReport;

/// Replaces control characters and bidirectional overrides with visible
/// escapes: text from the server must not move the cursor, change colours or
/// reorder what the operator reads.
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}');
        if c.is_control() {
            out.extend(c.escape_default());
        } else if bidi {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A coarse span the way people say it: `42s`, `14m`, `2h5m`, `3d4h`. Rounds
/// down, so a 15m grant that just started reads "14m" left.
pub fn span(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => {
            let (h, m) = (secs / 3600, (secs % 3600) / 60);
            if m == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
        _ => {
            let (d, h) = (secs / 86_400, (secs % 86_400) / 3600);
            if h == 0 {
                format!("{d}d")
            } else {
                format!("{d}d{h}h")
            }
        }
    }
}

/// `in 14m`, `3m ago`, or `now` within a second.
pub fn relative(now: Timestamp, t: Timestamp) -> String {
    let diff_ms = t.millis().saturating_sub(now.millis());
    let secs = diff_ms.unsigned_abs() / 1000;
    if secs == 0 {
        "now".to_string()
    } else if diff_ms > 0 {
        format!("in {}", span(secs))
    } else {
        format!("{} ago", span(secs))
    }
}

/// A time of day, `02:31:05Z`, with the date in front when it is not today
/// (UTC): `2026-11-22 02:31:05Z`.
pub fn clock(now: Timestamp, t: Timestamp) -> String {
    let s = t.to_rfc3339();
    let today = now.to_rfc3339();
    match (s.get(..10), s.get(11..19)) {
        (Some(date), Some(hms)) if today.get(..10) == Some(date) => format!("{hms}Z"),
        (Some(date), Some(hms)) => format!("{date} {hms}Z"),
        _ => s,
    }
}

/// Full RFC 3339 and relative: `2026-11-22T02:31:05.000Z (in 14m)`.
pub fn when(now: Timestamp, t: Timestamp) -> String {
    format!("{} ({})", t.to_rfc3339(), relative(now, t))
}

fn groups(list: &[String]) -> String {
    if list.is_empty() {
        "(no approver groups)".to_string()
    } else {
        clean(&list.join(", "))
    }
}

fn by(who: Option<&str>) -> String {
    match who {
        Some(w) => format!(" by {}", clean(w)),
        None => String::new(),
    }
}

fn outcome(o: ReviewOutcome) -> &'static str {
    match o {
        ReviewOutcome::Ok => "ok",
        ReviewOutcome::Misuse => "misuse",
        ReviewOutcome::AutoOk => "auto_ok",
    }
}

/// What the request's state means and what happens next, one sentence a line.
pub fn next_steps(r: &Request, now: Timestamp) -> String {
    let id = clean(&r.id);
    let mut out = String::new();
    let ended = r
        .ended_at
        .map(|t| format!("at {} ({})", clock(now, t), relative(now, t)))
        .unwrap_or_else(|| "at an unknown time".to_string());
    let comment = r
        .end_comment
        .as_deref()
        .filter(|c| !c.trim().is_empty())
        .map(|c| format!(": {}", clean(c)))
        .unwrap_or_default();
    match r.state {
        State::Pending => {
            let have = r.approvals.len();
            let _ = writeln!(
                out,
                "Request {id} is pending: needs {} approval(s) from {} ({have} so far).",
                r.approvals_required,
                groups(&r.approver_groups)
            );
            // INVARIANT: nothing here claims that anyone was told. This
            // server has no notification sinks, so the requester passes the
            // command on.
            let _ = writeln!(
                out,
                "Nobody is notified automatically: send an approver from {} this command: breakglass approve {id}",
                groups(&r.approver_groups)
            );
            let _ = writeln!(
                out,
                "It times out at {} ({}) unless decided.",
                clock(now, r.pending_until),
                relative(now, r.pending_until)
            );
        }
        State::Active => {
            if r.emergency {
                let _ = writeln!(
                    out,
                    "EMERGENCY ACCESS: {id} was self-activated. Nobody is notified automatically: tell an approver from {} now.",
                    groups(&r.approver_groups)
                );
            }
            match r.expires_at {
                Some(exp) => {
                    let _ = writeln!(
                        out,
                        "Request {id} is ACTIVE until {} ({}, granted for {}).",
                        clock(now, exp),
                        relative(now, exp),
                        format_duration(r.duration_s)
                    );
                }
                None => {
                    let _ = writeln!(out, "Request {id} is ACTIVE.");
                }
            }
            let _ = writeln!(out, "Get credentials: breakglass credentials {id}");
            match (&r.countersignature, r.countersign_by) {
                (Some(c), _) => {
                    let _ = writeln!(
                        out,
                        "Countersigned by {} at {}.",
                        clean(&c.by),
                        clock(now, c.at)
                    );
                }
                (None, Some(deadline)) => {
                    let _ = writeln!(
                        out,
                        "IT MUST BE COUNTERSIGNED by {} ({}) or it is revoked automatically: \
                         an approver from {} runs: breakglass approve {id}",
                        clock(now, deadline),
                        relative(now, deadline),
                        groups(&r.approver_groups)
                    );
                }
                (None, None) => {}
            }
            if r.review_required && r.review.is_none() {
                let _ = writeln!(
                    out,
                    "A POST-INCIDENT REVIEW IS REQUIRED once it ends: \
                     breakglass review {id} --outcome ok|misuse --notes TEXT"
                );
            }
        }
        State::Denied => {
            let _ = writeln!(
                out,
                "Request {id} was DENIED{} {ended}{comment}.",
                by(r.ended_by.as_deref())
            );
        }
        State::Cancelled => {
            let _ = writeln!(
                out,
                "Request {id} was cancelled{} {ended}.",
                by(r.ended_by.as_deref())
            );
        }
        State::TimedOut => {
            let _ = writeln!(
                out,
                "Request {id} timed out {ended}: nobody decided in time. Ask again with: breakglass request"
            );
        }
        State::Expired => {
            let _ = writeln!(out, "The grant {id} expired {ended}.");
        }
        State::Revoked => {
            let why = match r.end_reason {
                Some(EndReason::NotCountersigned) => {
                    " automatically: nobody countersigned it in time".to_string()
                }
                Some(EndReason::Released) => {
                    format!(", released{}", by(r.ended_by.as_deref()))
                }
                _ => by(r.ended_by.as_deref()),
            };
            let _ = writeln!(out, "The grant {id} was REVOKED {ended}{why}{comment}.");
            let _ = writeln!(
                out,
                "Its credentials no longer work and its live sessions are cut."
            );
        }
    }
    if r.state.is_final() && r.activated_at.is_some() {
        match &r.review {
            Some(rev) => {
                let _ = writeln!(
                    out,
                    "Reviewed by {} ({}): {}",
                    clean(&rev.by),
                    outcome(rev.outcome),
                    clean(&rev.notes)
                );
            }
            None if r.review_required => {
                let _ = writeln!(
                    out,
                    "A POST-INCIDENT REVIEW IS REQUIRED: an approver runs: \
                     breakglass review {id} --outcome ok|misuse --notes TEXT"
                );
            }
            None => {}
        }
    }
    out
}

/// Every field of a request as a readable block, then what happens next.
pub fn request_block(r: &Request, now: Timestamp) -> String {
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("{label}:")
        };
        let _ = writeln!(out, "{label:<16}{value}");
    };
    let opt_time =
        |t: Option<Timestamp>| t.map(|t| when(now, t)).unwrap_or_else(|| "-".to_string());
    // A deadline of a request that has ended: when it was due, and that it
    // no longer runs (never "in 9m" for a revoked grant).
    let deadline = |t: Option<Timestamp>| match (t, r.ended_at) {
        (Some(t), Some(end)) if r.state.is_final() && end < t => format!(
            "{} (not reached: the grant ended at {})",
            t.to_rfc3339(),
            clock(now, end)
        ),
        (Some(t), _) if r.state.is_final() => format!("{} (reached)", t.to_rfc3339()),
        (t, _) => opt_time(t),
    };
    field("id", clean(&r.id));
    field(
        "state",
        if r.emergency {
            format!("{} (EMERGENCY)", r.state)
        } else {
            r.state.to_string()
        },
    );
    field("requester", clean(&r.requester));
    if let Some(d) = &r.drill {
        field("drill", format!("{} (an exercise, not real use)", clean(d)));
    }
    field("target", clean(&r.target));
    field("role", clean(&r.role));
    field("duration", format_duration(r.duration_s));
    field("reason", clean(&r.reason));
    field(
        "ticket",
        r.ticket
            .as_deref()
            .map(clean)
            .unwrap_or_else(|| "-".to_string()),
    );
    field("policy", clean(&r.policy));
    field(
        "approvals",
        format!(
            "{} of {} required, from {}",
            r.approvals.len(),
            r.approvals_required,
            groups(&r.approver_groups)
        ),
    );
    for a in &r.approvals {
        let comment = a
            .comment
            .as_deref()
            .map(|c| format!(": {}", clean(c)))
            .unwrap_or_default();
        field(
            "",
            format!("- {} at {}{comment}", clean(&a.by), when(now, a.at)),
        );
    }
    field("created", when(now, r.created_at));
    if r.state == State::Pending {
        field("pending until", when(now, r.pending_until));
    }
    field("activated", opt_time(r.activated_at));
    field("expires", deadline(r.expires_at));
    if r.emergency || r.countersign_by.is_some() {
        field(
            "countersign by",
            if r.countersignature.is_some() {
                r.countersign_by
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".to_string())
            } else {
                deadline(r.countersign_by)
            },
        );
        field(
            "countersigned",
            r.countersignature
                .as_ref()
                .map(|c| format!("by {} at {}", clean(&c.by), when(now, c.at)))
                .unwrap_or_else(|| "no".to_string()),
        );
    }
    field("ended", opt_time(r.ended_at));
    field(
        "end reason",
        match (r.end_reason, &r.ended_by) {
            (Some(reason), Some(who)) => format!("{reason} by {}", clean(who)),
            (Some(reason), None) => reason.to_string(),
            (None, _) => "-".to_string(),
        },
    );
    if let Some(c) = r.end_comment.as_deref() {
        field("end comment", clean(c));
    }
    field(
        "review",
        match (&r.review, r.review_required) {
            (Some(rev), _) => format!(
                "{} by {} at {}: {}",
                outcome(rev.outcome),
                clean(&rev.by),
                when(now, rev.at),
                clean(&rev.notes)
            ),
            (None, true) => "required, not done yet".to_string(),
            (None, false) => "not required".to_string(),
        },
    );
    out.push('\n');
    out.push_str(&next_steps(r, now));
    out
}

/// The "when" column of the list: what matters for each state.
fn when_column(r: &Request, now: Timestamp) -> String {
    match (r.state, r.expires_at, r.ended_at) {
        (State::Active, Some(exp), _) => format!("expires {}", relative(now, exp)),
        (State::Pending, _, _) => format!("created {}", relative(now, r.created_at)),
        (_, _, Some(end)) => format!("ended {}", relative(now, end)),
        _ => format!("created {}", relative(now, r.created_at)),
    }
}

/// Requests as a table; a note when the list was cut short.
pub fn request_table(list: &RequestList, now: Timestamp) -> String {
    if list.requests.is_empty() {
        return "No requests.\n".to_string();
    }
    let header = ["ID", "STATE", "REQUESTER", "TARGET", "ROLE", "WHEN"].map(String::from);
    let mut rows = vec![header];
    for r in &list.requests {
        let mut state = if r.emergency {
            format!("{}!", r.state)
        } else {
            r.state.to_string()
        };
        if r.drill.is_some() {
            state.push('~');
        }
        rows.push([
            clean(&r.id),
            state,
            clean(&r.requester),
            clean(&r.target),
            clean(&r.role),
            when_column(r, now),
        ]);
    }
    let mut out = table(&rows);
    if list.requests.iter().any(|r| r.emergency) {
        out.push_str("(! = emergency grant)\n");
    }
    if list.requests.iter().any(|r| r.drill.is_some()) {
        out.push_str("(~ = drill: an exercise, not real use)\n");
    }
    if list.next.is_some() {
        out.push_str("There may be more: raise --limit to see them.\n");
    }
    out
}

/// The grant token, shown once, with its expiry and how to connect.
pub fn credentials(c: &Credentials, now: Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Credentials for {}: role {} on {} as {}.",
        clean(&c.request_id),
        clean(&c.role),
        clean(&c.target),
        clean(&c.requester)
    );
    let _ = writeln!(out, "Token (shown once; keep it secret):");
    let _ = writeln!(out, "{}", clean(&c.token));
    let _ = writeln!(
        out,
        "Expires at {}: it stops working then, or earlier if the grant is revoked.",
        when(now, c.expires_at)
    );
    if let Some(conn) = &c.connection {
        let (host, user) = (clean(&conn.host), clean(&conn.user));
        let port = conn.port;
        let line = match (conn.kind.as_str(), conn.database.as_deref()) {
            ("postgres", db) => {
                let db = db
                    .map(|d| format!(" dbname={}", clean(d)))
                    .unwrap_or_default();
                format!("psql \"host={host} port={port} user={user}{db}\"")
            }
            ("ssh", _) => format!("ssh -p {port} {user}@{host}"),
            (kind, db) => {
                let db = db
                    .map(|d| format!(", database {}", clean(d)))
                    .unwrap_or_default();
                format!("{} at {host}:{port} as {user}{db}", clean(kind))
            }
        };
        let _ = writeln!(out, "Connect: {line}");
        if let Some(fp) = &conn.host_key_fingerprint {
            let _ = writeln!(out, "The gateway's host key fingerprint is {}.", clean(fp));
        }
        let _ = writeln!(out, "Use the token above as the password.");
    }
    out
}

/// What the caller may request, one line per target, role and kind of
/// access, then how to ask.
pub fn targets(list: &TargetList) -> String {
    if list.targets.is_empty() {
        return "The policy permits you no request right now: ask an admin which targets and \
                roles you should have.\n"
            .to_string();
    }
    let header = ["TARGET", "ROLE", "ACCESS", "MAX", "APPROVALS", "TICKET"].map(String::from);
    let mut rows = vec![header];
    for t in &list.targets {
        let approvals = match (t.emergency, t.countersign_within_s) {
            (true, Some(w)) => format!(
                "none; countersigned within {} by {}",
                format_duration(w),
                groups(&t.approver_groups)
            ),
            _ if t.approvals_required == 0 => "none".to_string(),
            _ => format!(
                "{} from {}",
                t.approvals_required,
                groups(&t.approver_groups)
            ),
        };
        let ticket = if t.ticket_patterns.is_empty() {
            "-".to_string()
        } else {
            clean(&t.ticket_patterns.join(" and "))
        };
        rows.push([
            clean(&t.target),
            clean(&t.role),
            if t.emergency { "emergency" } else { "request" }.to_string(),
            format_duration(t.max_duration_s),
            approvals,
            ticket,
        ]);
    }
    let mut out = table(&rows);
    out.push_str(
        "Ask with: breakglass request TARGET --role ROLE --duration 15m --reason TEXT \
         [--ticket T] [--emergency for emergency access] [--wait]\n",
    );
    out
}

/// Rows as left-aligned columns two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn whoami(w: &WhoAmI, now: Timestamp) -> String {
    let when = |t: Option<Timestamp>, none: &str| match t {
        Some(t) => format!("{} ({})", t.to_rfc3339(), relative(now, t)),
        None => none.to_string(),
    };
    let groups = if w.groups.is_empty() {
        "-".to_string()
    } else {
        clean(&w.groups.join(", "))
    };
    let rows = [
        ("name", clean(&w.name)),
        ("groups", groups),
        ("admin", if w.admin { "yes" } else { "no" }.to_string()),
        ("kind", w.kind.as_str().to_string()),
        ("signed in", w.auth_method.as_str().to_string()),
        ("expires", when(w.expires_at, "never (a local token)")),
        ("auth time", when(w.auth_time, "-")),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<11}{v}\n", format!("{k}:")))
        .collect()
}

pub fn verify_report(r: &VerifyReport) -> String {
    if r.ok {
        let mut out = format!(
            "Audit chain OK: {} events, {} signed checkpoints, {} session recordings, head seq {} hash {}.\n",
            r.events,
            r.checkpoints,
            r.recordings,
            r.head_seq,
            clean(&r.head_hash)
        );
        if let Some(seq) = r.consistent_since {
            out.push_str(&format!(
                "The log only grew since the checkpoint at seq {seq} (Merkle consistency proof to the newest signed tree head).\n"
            ));
        }
        out
    } else {
        let seq = r
            .first_bad_seq
            .map(|s| s.to_string())
            .unwrap_or_else(|| "?".to_string());
        format!(
            "Audit chain BROKEN at seq {seq}: {}.\nChecked {} events and {} signed checkpoints before stopping.\n",
            clean(r.reason.as_deref().unwrap_or("no reason given")),
            r.events,
            r.checkpoints
        )
    }
}

pub fn policy_report(r: &PolicyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Policies OK ({}): {}",
        r.policies.len(),
        if r.policies.is_empty() {
            "none".to_string()
        } else {
            clean(&r.policies.join(", "))
        }
    );
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {}", clean(w));
    }
    if let Some(s) = &r.sample {
        if s.allowed {
            let _ = writeln!(
                out,
                "Sample: ALLOWED, governed by {}",
                clean(&s.governing.join(", "))
            );
            if let Some(n) = s.approvals_required {
                let _ = writeln!(
                    out,
                    "  approvals required: {n} from {}",
                    groups(&s.approver_groups)
                );
            }
            if let Some(m) = s.max_duration_s {
                let _ = writeln!(out, "  max duration: {}", format_duration(m));
            }
        } else {
            let _ = writeln!(out, "Sample: DENIED");
        }
        let _ = writeln!(out, "  why: {}", clean(&s.explanation));
    }
    out
}

/// One recording entry as a line of text.
pub fn recording_entry(e: &serde_json::Value) -> String {
    let seq = e["seq"].as_u64().unwrap_or(0);
    let time = e["time"].as_str().unwrap_or("");
    let text = |k: &str| clean(e[k].as_str().unwrap_or(""));
    let body = match e["kind"].as_str().unwrap_or("") {
        "session" => format!(
            "session of {} on {} as {} (request {}), from {}",
            text("principal"),
            text("target"),
            text("role"),
            text("request_id"),
            text("client")
        ),
        "query" => format!("query: {}", text("text")),
        "parse" => format!("parse {:?}: {}", text("name"), text("text")),
        "close" => format!("close {} {:?}", text("target"), text("name")),
        "refused" => format!("refused {}: {}", text("type"), text("message")),
        "execute" => {
            let params = &e["params"];
            if params.is_null() || params.as_array().is_some_and(Vec::is_empty) {
                format!("execute: {}", text("text"))
            } else {
                format!(
                    "execute: {}  params {}",
                    text("text"),
                    clean(&params.to_string())
                )
            }
        }
        "result" => format!("  -> {} (statement {})", text("tag"), e["statement"]),
        "error" => format!(
            "  -> ERROR {} {} (statement {})",
            text("code"),
            text("message"),
            e["statement"]
        ),
        "end" => format!("session ended: {}", text("reason")),
        other => format!("{}: {}", clean(other), clean(&e.to_string())),
    };
    format!("{seq:>6} {time}  {body}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakglass_core::{Approval, Review};

    const MIN_MS: i64 = 60_000;

    /// 2026-11-22T02:16:05Z.
    fn t0() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-22T02:16:05Z").expect("valid")
    }

    fn at(min: i64) -> Timestamp {
        Timestamp(t0().millis() + min * MIN_MS)
    }

    fn pending() -> Request {
        Request {
            id: "0190a1b2-c3d4".to_string(),
            requester: "alice".to_string(),
            target: "prod-db".to_string(),
            role: "admin".to_string(),
            reason: "disk full on primary".to_string(),
            ticket: Some("INC-42".to_string()),
            emergency: false,
            state: State::Pending,
            policy: "oncall-db-admin".to_string(),
            approvals_required: 2,
            approver_groups: vec!["sre-leads".to_string(), "security".to_string()],
            approvals: vec![],
            duration_s: 900,
            max_duration_s: 900,
            created_at: t0(),
            pending_until: at(30),
            activated_at: None,
            expires_at: None,
            countersign_by: None,
            countersignature: None,
            ended_at: None,
            end_reason: None,
            ended_by: None,
            end_comment: None,
            review_required: false,
            review: None,
            approver_fresh_auth_s: None,
            drill: None,
            review_due_at: None,
            review_overdue: false,
            review_findings: Default::default(),
            version: 1,
        }
    }

    #[test]
    fn spans_and_relative_times() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(59), "59s");
        assert_eq!(span(60), "1m");
        assert_eq!(span(899), "14m");
        assert_eq!(span(3600), "1h");
        assert_eq!(span(3600 + 5 * 60 + 7), "1h5m");
        assert_eq!(span(86_400), "1d");
        assert_eq!(span(3 * 86_400 + 4 * 3600), "3d4h");
        let now = t0();
        assert_eq!(relative(now, now), "now");
        assert_eq!(relative(now, Timestamp(now.millis() + 999)), "now");
        assert_eq!(relative(now, Timestamp(now.millis() + 899_900)), "in 14m");
        assert_eq!(relative(now, at(-3)), "3m ago");
        assert_eq!(relative(now, Timestamp(now.millis() - 42_000)), "42s ago");
        assert_eq!(relative(now, Timestamp(i64::MAX)).get(..3), Some("in "));
        assert!(relative(now, Timestamp(i64::MIN)).ends_with(" ago"));
    }

    #[test]
    fn clock_shows_the_date_only_when_not_today() {
        assert_eq!(clock(t0(), at(15)), "02:31:05Z");
        assert_eq!(clock(t0(), at(24 * 60)), "2026-11-23 02:16:05Z");
    }

    #[test]
    fn pending_request_says_who_must_approve() {
        let text = next_steps(&pending(), at(1));
        assert_eq!(
            text,
            "Request 0190a1b2-c3d4 is pending: needs 2 approval(s) from sre-leads, security (0 so far).\n\
             Nobody is notified automatically: send an approver from sre-leads, security this command: breakglass approve 0190a1b2-c3d4\n\
             It times out at 02:46:05Z (in 29m) unless decided.\n"
        );
    }

    #[test]
    fn active_request_says_until_when_and_how_to_get_credentials() {
        let mut r = pending();
        r.state = State::Active;
        r.approvals = vec![
            Approval {
                by: "bob".to_string(),
                at: at(0),
                comment: Some("go".to_string()),
            },
            Approval {
                by: "carol".to_string(),
                at: at(0),
                comment: None,
            },
        ];
        r.activated_at = Some(t0());
        r.expires_at = Some(at(15));
        let text = next_steps(&r, t0());
        assert_eq!(
            text,
            "Request 0190a1b2-c3d4 is ACTIVE until 02:31:05Z (in 15m, granted for 15m).\n\
             Get credentials: breakglass credentials 0190a1b2-c3d4\n"
        );
    }

    #[test]
    fn emergency_grant_is_loud() {
        let mut r = pending();
        r.state = State::Active;
        r.emergency = true;
        r.review_required = true;
        r.approvals_required = 0;
        r.approver_groups = vec!["sre-leads".to_string()];
        r.activated_at = Some(t0());
        r.expires_at = Some(at(10));
        r.duration_s = 600;
        r.countersign_by = Some(at(10));
        let text = next_steps(&r, t0());
        assert_eq!(
            text,
            "EMERGENCY ACCESS: 0190a1b2-c3d4 was self-activated. Nobody is notified automatically: tell an approver from sre-leads now.\n\
             Request 0190a1b2-c3d4 is ACTIVE until 02:26:05Z (in 10m, granted for 10m).\n\
             Get credentials: breakglass credentials 0190a1b2-c3d4\n\
             IT MUST BE COUNTERSIGNED by 02:26:05Z (in 10m) or it is revoked automatically: an approver from sre-leads runs: breakglass approve 0190a1b2-c3d4\n\
             A POST-INCIDENT REVIEW IS REQUIRED once it ends: breakglass review 0190a1b2-c3d4 --outcome ok|misuse --notes TEXT\n"
        );
    }

    #[test]
    fn ended_requests_say_why() {
        let mut r = pending();
        r.state = State::Denied;
        r.ended_at = Some(at(2));
        r.end_reason = Some(EndReason::Denied);
        r.ended_by = Some("bob".to_string());
        r.end_comment = Some("use the replica".to_string());
        assert_eq!(
            next_steps(&r, at(5)),
            "Request 0190a1b2-c3d4 was DENIED by bob at 02:18:05Z (3m ago): use the replica.\n"
        );

        let mut r = pending();
        r.state = State::Revoked;
        r.emergency = true;
        r.review_required = true;
        r.activated_at = Some(t0());
        r.ended_at = Some(at(10));
        r.end_reason = Some(EndReason::NotCountersigned);
        r.ended_by = Some("system".to_string());
        assert_eq!(
            next_steps(&r, at(10)),
            "The grant 0190a1b2-c3d4 was REVOKED at 02:26:05Z (now) automatically: nobody countersigned it in time.\n\
             Its credentials no longer work and its live sessions are cut.\n\
             A POST-INCIDENT REVIEW IS REQUIRED: an approver runs: breakglass review 0190a1b2-c3d4 --outcome ok|misuse --notes TEXT\n"
        );

        r.review = Some(Review {
            by: "carol".to_string(),
            at: at(20),
            outcome: ReviewOutcome::Ok,
            notes: "justified".to_string(),
        });
        assert!(next_steps(&r, at(30)).ends_with("Reviewed by carol (ok): justified\n"));
    }

    #[test]
    fn show_block_has_every_field() {
        let mut r = pending();
        r.approvals = vec![Approval {
            by: "bob".to_string(),
            at: at(1),
            comment: Some("ok\u{1b}[2J".to_string()),
        }];
        let text = request_block(&r, at(4));
        assert_eq!(
            text,
            "id:             0190a1b2-c3d4\n\
             state:          pending\n\
             requester:      alice\n\
             target:         prod-db\n\
             role:           admin\n\
             duration:       15m\n\
             reason:         disk full on primary\n\
             ticket:         INC-42\n\
             policy:         oncall-db-admin\n\
             approvals:      1 of 2 required, from sre-leads, security\n\
             \x20               - bob at 2026-11-22T02:17:05.000Z (3m ago): ok\\u{1b}[2J\n\
             created:        2026-11-22T02:16:05.000Z (4m ago)\n\
             pending until:  2026-11-22T02:46:05.000Z (in 26m)\n\
             activated:      -\n\
             expires:        -\n\
             ended:          -\n\
             end reason:     -\n\
             review:         not required\n\
             \n\
             Request 0190a1b2-c3d4 is pending: needs 2 approval(s) from sre-leads, security (1 so far).\n\
             Nobody is notified automatically: send an approver from sre-leads, security this command: breakglass approve 0190a1b2-c3d4\n\
             It times out at 02:46:05Z (in 26m) unless decided.\n"
        );
    }

    #[test]
    fn table_lines_up() {
        let mut active = pending();
        active.id = "0190ffff".to_string();
        active.state = State::Active;
        active.emergency = true;
        active.requester = "bob".to_string();
        active.activated_at = Some(t0());
        active.expires_at = Some(at(15));
        let list = RequestList {
            requests: vec![pending(), active],
            next: Some("cursor".to_string()),
        };
        assert_eq!(
            request_table(&list, at(1)),
            "ID             STATE    REQUESTER  TARGET   ROLE   WHEN\n\
             0190a1b2-c3d4  pending  alice      prod-db  admin  created 1m ago\n\
             0190ffff       active!  bob        prod-db  admin  expires in 14m\n\
             (! = emergency grant)\n\
             There may be more: raise --limit to see them.\n"
        );
        let empty = RequestList {
            requests: vec![],
            next: None,
        };
        assert_eq!(request_table(&empty, at(0)), "No requests.\n");
    }

    #[test]
    fn credentials_say_how_to_connect() {
        let c = Credentials {
            token: "bgt_abc".to_string(),
            request_id: "0190a1b2-c3d4".to_string(),
            requester: "alice".to_string(),
            target: "prod-db".to_string(),
            role: "read".to_string(),
            expires_at: at(15),
            connection: Some(breakglass_server::dto::Connection {
                kind: "postgres".to_string(),
                host: "127.0.0.1".to_string(),
                port: 6432,
                user: "alice".to_string(),
                database: Some("app".to_string()),
                host_key: None,
                host_key_fingerprint: None,
            }),
            ssh_certificate: None,
        };
        assert_eq!(
            credentials(&c, t0()),
            "Credentials for 0190a1b2-c3d4: role read on prod-db as alice.\n\
             Token (shown once; keep it secret):\n\
             bgt_abc\n\
             Expires at 2026-11-22T02:31:05.000Z (in 15m): it stops working then, or earlier if the grant is revoked.\n\
             Connect: psql \"host=127.0.0.1 port=6432 user=alice dbname=app\"\n\
             Use the token above as the password.\n"
        );
    }

    #[test]
    fn clean_escapes_terminal_controls() {
        assert_eq!(clean("plain text, ünïcode"), "plain text, ünïcode");
        assert_eq!(clean("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(clean("x\u{202E}y"), "x\\u{202e}y");
    }

    #[test]
    fn verify_report_names_the_first_bad_seq() {
        let broken = VerifyReport {
            ok: false,
            events: 41,
            checkpoints: 3,
            recordings: 0,
            head_seq: 100,
            head_hash: "ab".to_string(),
            first_bad_seq: Some(42),
            reason: Some("hash mismatch".to_string()),
            warnings: Vec::new(),
            tree_root: String::new(),
            consistent_since: None,
        };
        assert_eq!(
            verify_report(&broken),
            "Audit chain BROKEN at seq 42: hash mismatch.\n\
             Checked 41 events and 3 signed checkpoints before stopping.\n"
        );
    }
}
