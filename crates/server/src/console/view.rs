//! What the console's pages show, computed without IO: durations, a
//! request's timeline from its audit events, the statement list of a
//! PostgreSQL session recording, and the inbox's order.

use breakglass_core::audit::AuditEvent;
use breakglass_core::{Principal, Request, State, Timestamp};

/// Statements a replay page lists at most (the rest are counted).
pub const STATEMENTS_SHOWN_MAX: usize = 5000;
/// Characters of a search query on the replay page.
pub const SEARCH_LEN_MAX: usize = 200;
/// Characters of one statement's text shown; the rest is cut with "…".
pub const STATEMENT_TEXT_SHOWN_MAX: usize = 4000;

/// Percent-encodes a query parameter's value.
pub fn query_value(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A duration in seconds as people write it: `15m`, `1h30m`, `45s`.
pub fn duration(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    let mut out = String::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m"), (sec, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() { "0s".into() } else { out }
}

/// A moment as `2026-11-22 02:16:05 UTC`.
pub fn moment(t: Timestamp) -> String {
    let s = t.to_rfc3339();
    let s = s.split('.').next().unwrap_or(&s).trim_end_matches('Z');
    format!("{} UTC", s.replacen('T', " ", 1))
}

/// What a request waits for and until when: the pending timeout, the
/// countersignature deadline, or the grant's end.
pub fn deadline(req: &Request) -> Option<(&'static str, Timestamp)> {
    match req.state {
        State::Pending => Some(("times out", req.pending_until)),
        State::Active => match (req.countersign_by, &req.countersignature, req.expires_at) {
            (Some(by), None, Some(exp)) if by < exp => Some(("revoked unless countersigned", by)),
            (_, _, Some(exp)) => Some(("expires", exp)),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `who` could approve (or countersign) `req` now, as far as the
/// request says: the lifecycle decides, this only fills the inbox.
pub fn awaits(who: &Principal, req: &Request) -> bool {
    if req.requester == who.name || !req.approver_groups.iter().any(|g| who.groups.contains(g)) {
        return false;
    }
    match req.state {
        State::Pending => !req.approvals.iter().any(|a| a.by == who.name),
        State::Active => req.countersign_by.is_some() && req.countersignature.is_none(),
        _ => false,
    }
}

/// The inbox's order: emergencies first, then newest first.
pub fn inbox_order(reqs: &mut [Request]) {
    reqs.sort_by(|a, b| {
        b.emergency
            .cmp(&a.emergency)
            .then(b.created_at.cmp(&a.created_at))
            .then(b.id.cmp(&a.id))
    });
}

/// One line of a request's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineEntry {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    pub action: String,
    /// The event's details people read (comment, reason, session, outcome).
    pub summary: String,
}

/// The event details shown in a timeline line, in this order.
const TIMELINE_DETAILS: &[&str] = &[
    "comment",
    "reason",
    "end_reason",
    "outcome",
    "notes",
    "session_id",
    "statements",
    "duration_s",
    "ticket",
    "auth_method",
];

/// A request's timeline from its audit events.
pub fn timeline(events: &[AuditEvent]) -> Vec<TimelineEntry> {
    events
        .iter()
        .map(|e| {
            let d: serde_json::Value = serde_json::from_str(&e.details).unwrap_or_default();
            let mut parts = Vec::new();
            for k in TIMELINE_DETAILS {
                let v = &d[*k];
                let text = match v {
                    serde_json::Value::String(s) if !s.is_empty() => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => continue,
                };
                parts.push(format!("{k}: {text}"));
            }
            TimelineEntry {
                seq: e.seq,
                time: moment(e.time),
                actor: e.actor.clone(),
                action: e.action.clone(),
                summary: parts.join("; "),
            }
        })
        .collect()
}

/// One statement of a PostgreSQL session: what ran, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub seq: u64,
    pub time: String,
    /// `query`, `parse`, `execute`, `refused`.
    pub kind: String,
    pub text: String,
    /// The command tag, or the error, or "no answer".
    pub outcome: String,
    pub ok: bool,
    /// Milliseconds from the statement to its outcome, when known.
    pub ms: Option<i64>,
}

/// The statements of a recording (its entries in order), each with its
/// outcome, keeping only those whose text contains `search` (ignoring
/// case). Returns the statements and how many matched in all.
pub fn statements(entries: &[serde_json::Value], search: &str) -> (Vec<Statement>, usize) {
    let needle = search.to_lowercase();
    let mut out: Vec<(Statement, i64)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for e in entries {
        let seq = e["seq"].as_u64().unwrap_or(0);
        let text = |k: &str| e[k].as_str().unwrap_or("").to_string();
        let time = Timestamp::parse_rfc3339(e["time"].as_str().unwrap_or("")).ok();
        let millis = time.map_or(0, |t| t.millis());
        match e["kind"].as_str().unwrap_or("") {
            kind @ ("query" | "parse" | "execute") => {
                index.insert(seq, out.len());
                out.push((
                    Statement {
                        seq,
                        time: time.map(moment).unwrap_or_default(),
                        kind: kind.to_string(),
                        text: cut(&text("text")),
                        outcome: "no answer".into(),
                        ok: false,
                        ms: None,
                    },
                    millis,
                ));
            }
            "refused" => out.push((
                Statement {
                    seq,
                    time: time.map(moment).unwrap_or_default(),
                    kind: "refused".into(),
                    text: cut(&text("type")),
                    outcome: format!("refused: {}", text("message")),
                    ok: false,
                    ms: None,
                },
                millis,
            )),
            kind @ ("result" | "error") => {
                let Some(&i) = e["statement"].as_u64().and_then(|s| index.get(&s)) else {
                    continue;
                };
                let (st, start) = &mut out[i];
                if kind == "result" {
                    st.outcome = text("tag");
                    st.ok = true;
                } else {
                    st.outcome = format!("ERROR {} {}", text("code"), text("message"));
                    st.ok = false;
                }
                st.ms = time.map(|t| (t.millis() - *start).max(0));
            }
            _ => {}
        }
    }
    let matched: Vec<Statement> = out
        .into_iter()
        .map(|(s, _)| s)
        .filter(|s| needle.is_empty() || s.text.to_lowercase().contains(&needle))
        .collect();
    let n = matched.len();
    (matched.into_iter().take(STATEMENTS_SHOWN_MAX).collect(), n)
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(STATEMENT_TEXT_SHOWN_MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(900), "15m");
        assert_eq!(duration(5400), "1h30m");
        assert_eq!(duration(90_061), "1d1h1m1s");
    }

    #[test]
    fn statements_pair_with_their_outcomes_and_filter() {
        let entries = vec![
            json!({"seq": 1, "kind": "session", "time": "2026-01-01T00:00:00.000Z"}),
            json!({"seq": 2, "kind": "query", "text": "SELECT 1", "time": "2026-01-01T00:00:01.000Z"}),
            json!({"seq": 3, "kind": "result", "statement": 2, "tag": "SELECT 1", "time": "2026-01-01T00:00:01.250Z"}),
            json!({"seq": 4, "kind": "query", "text": "DELETE FROM orders", "time": "2026-01-01T00:00:02.000Z"}),
            json!({"seq": 5, "kind": "error", "statement": 4, "code": "42501", "message": "permission denied", "time": "2026-01-01T00:00:02.010Z"}),
            json!({"seq": 6, "kind": "query", "text": "select pg_sleep(9)", "time": "2026-01-01T00:00:03.000Z"}),
        ];
        let (all, n) = statements(&entries, "");
        assert_eq!(n, 3);
        assert_eq!(
            (all[0].outcome.as_str(), all[0].ok, all[0].ms),
            ("SELECT 1", true, Some(250))
        );
        assert_eq!(all[1].outcome, "ERROR 42501 permission denied");
        assert!(!all[1].ok);
        assert_eq!((all[2].outcome.as_str(), all[2].ms), ("no answer", None));
        let (found, n) = statements(&entries, "delete");
        assert_eq!(n, 1);
        assert_eq!(found[0].seq, 4);
    }

    #[test]
    fn inbox_puts_emergencies_first_then_newest() {
        let mk = |id: &str, emergency: bool, at: i64| {
            let mut r: Request = serde_json::from_value(json!({
                "id": id, "requester": "alice", "target": "db", "role": "read",
                "reason": "r", "ticket": null, "emergency": emergency, "state": "pending",
                "policy": "p", "approvals_required": 1, "approver_groups": ["sre"],
                "approvals": [], "duration_s": 60, "max_duration_s": 60,
                "created_at": "2026-01-01T00:00:00Z", "pending_until": "2026-01-01T00:30:00Z",
                "activated_at": null, "expires_at": null, "countersign_by": null,
                "countersignature": null, "ended_at": null, "end_reason": null,
                "ended_by": null, "end_comment": null, "review_required": false,
                "review": null, "version": 1
            }))
            .expect("request");
            r.created_at = Timestamp(at);
            r
        };
        let mut v = vec![
            mk("a", false, 3),
            mk("b", true, 1),
            mk("c", true, 2),
            mk("d", false, 4),
        ];
        inbox_order(&mut v);
        let ids: Vec<&str> = v.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "d", "a"]);
    }
}
