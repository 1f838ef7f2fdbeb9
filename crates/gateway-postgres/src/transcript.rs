//! The session's transcript: the entries each message adds to the
//! recording (as the table in `frontend` says), and the gateway's model of
//! the server's prepared statements and portals that lets an `execute`
//! entry point at the `parse` entry of the statement it runs.
//!
//! Names are tracked by their raw bytes. The model changes only when the
//! server confirms a change, in the order the server answers: ParseComplete,
//! BindComplete and CloseComplete apply the Parse, Bind and Close they
//! answer; an ErrorResponse to an extended-protocol message discards the
//! rest of its batch (up to the next Sync), exactly as the server skips it.
//!
//! A Bind or Execute is resolved when the client sends it, before the
//! server has answered what came before. Messages of its own batch either
//! all succeed or the server skips the rest of the batch, so a Parse or
//! Bind earlier in the same batch is the one it will use, if it runs at
//! all. A name defined before the batch is read from the confirmed model,
//! and only once no earlier batch awaits an answer: a Bind or Execute that
//! needs an older name while an earlier batch is unanswered waits (the
//! relay stops reading the client and asks the server to flush), since
//! that batch may fail and leave the name as it was.
//!
//! Reading a recording: `parse` entries carry the name and full text (and
//! `*_hex` with the exact bytes when they are not UTF-8); a Parse took
//! effect when a `result` entry with tag `parse complete` names its `seq`.
//! An `execute` entry's `parse` member is the `seq` of the Parse it ran.
//! A simple-query `EXECUTE name` runs the statement of the last `parse`
//! entry of that name that took effect (and was not closed: `close`
//! entries, `DEALLOCATE`), or of an SQL `PREPARE name` in a `query` entry.
//! SQL `PREPARE`, `DEALLOCATE` and `DECLARE`/`CLOSE` change names too: the
//! gateway forgets every named statement when it sees a `DEALLOCATE` or
//! `DISCARD ALL` complete, and every named portal on `CLOSE CURSOR`, so a
//! later Execute of them is recorded with `<unknown statement>` rather
//! than a wrong `parse`; the reader then looks for the SQL that defined it.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use breakglass_core::Timestamp;

use crate::codec::{Severity, error_response, parse_error_fields, put_frame};
use crate::frontend::{Action, Refusal, action};
use crate::recording::{Field, Recording};
use breakglass_gateway_common::recording::write_str;

/// Prepared statements, and portals, tracked per session at most; a client
/// over either limit is disconnected with a message that says so (an
/// untracked statement could not be recorded by its text).
pub const NAMES_TRACKED_MAX: usize = 10_000;
/// Bytes of statement texts and parameters tracked per session at most.
pub const TRACKED_BYTES_MAX: usize = 64 << 20;
/// Bytes of one parameter value kept in a recording.
const PARAM_LEN_RECORDED_MAX: usize = 4096;
/// Client messages awaiting the server's answer at most. A client past it
/// waits until answers come (backpressure, not a refusal): it bounds the
/// model and the scan that resolves a Bind or Execute.
const PENDING_OPS_MAX: usize = 16_384;
/// Entry members at most (an `execute` has 7).
const FIELDS_MAX: usize = 8;

/// A prepared statement: the `parse` entry that recorded it, and its text.
#[derive(Debug, Clone)]
struct Stmt {
    parse: u64,
    text: Arc<str>,
}

/// A portal: the statement it was bound to (`None`: not one the gateway
/// saw parsed) and its parameters as canonical JSON.
#[derive(Debug)]
struct Portal {
    statement: Vec<u8>,
    stmt: Option<Stmt>,
    params: String,
}

impl Portal {
    fn bytes(&self, name: &[u8]) -> usize {
        name.len()
            + self.statement.len()
            + self.params.len()
            + self.stmt.as_ref().map_or(0, |s| s.text.len())
    }
}

/// A client message awaiting the server's answer.
#[derive(Debug)]
enum Op {
    /// Answered by ParseComplete.
    Parse { name: Vec<u8>, stmt: Stmt },
    /// Answered by BindComplete.
    Bind { portal: Vec<u8>, def: Portal },
    /// Answered by CloseComplete.
    Close { kind: u8, name: Vec<u8>, seq: u64 },
    /// Answered by RowDescription or NoData.
    Describe,
    /// A recorded statement, answered by its outcome; a simple query stays
    /// until its ReadyForQuery, since one query string can run several.
    Statement { seq: u64, simple: bool },
    /// Answered by ReadyForQuery, which ends the batch before it.
    Sync,
}

/// What the relay does with a client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Client {
    /// Recorded (deferred entries: write them before forwarding); forward.
    Forward,
    /// Forward, then end the session.
    Terminate,
    /// Not now: earlier batches must be answered first. Nothing was
    /// recorded; the frame stays unread.
    Wait,
    /// Do not forward; send these bytes to the client instead.
    Reply(Vec<u8>),
}

/// Why the relay must stop on a client frame (nothing of it forwarded).
#[derive(Debug)]
pub enum Stop {
    /// A per-session tracking limit (the message says which).
    Limit(String),
    /// A refused message that cannot be answered in the protocol's flow.
    Refused(&'static str, String),
}

/// Entry members, sorted by key by construction, without allocating.
struct Fields<'a> {
    f: [(&'a str, Field<'a>); FIELDS_MAX],
    n: usize,
}

impl<'a> Fields<'a> {
    fn new() -> Self {
        Fields {
            f: [("", Field::U64(0)); FIELDS_MAX],
            n: 0,
        }
    }

    fn push(&mut self, key: &'a str, value: Field<'a>) -> &mut Self {
        self.f[self.n] = (key, value);
        self.n += 1;
        self
    }

    /// `key` with the lossy text, and `key_hex` with the exact bytes when
    /// they are not UTF-8.
    fn text(&mut self, key: &'a str, key_hex: &'a str, t: &'a Text<'a>) -> &mut Self {
        self.push(key, Field::Str(&t.lossy));
        if let Some(h) = &t.hex {
            self.push(key_hex, Field::Plain(h));
        }
        self
    }

    fn get(&self) -> &[(&'a str, Field<'a>)] {
        &self.f[..self.n]
    }
}

/// Bytes of a message as recorded: text with bad bytes replaced (never
/// dropped), plus the exact bytes in hex when they are not UTF-8.
struct Text<'a> {
    lossy: Cow<'a, str>,
    hex: Option<String>,
}

impl<'a> Text<'a> {
    fn of(b: &'a [u8]) -> Text<'a> {
        match std::str::from_utf8(b) {
            Ok(s) => Text {
                lossy: Cow::Borrowed(s),
                hex: None,
            },
            Err(_) => Text {
                lossy: String::from_utf8_lossy(b),
                hex: Some(hex::encode(b)),
            },
        }
    }
}

/// A NUL-terminated string off the front of `b` (all of `b` when the NUL
/// is missing: the server refuses such a message).
fn cstr_raw(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(end) => (&b[..end], &b[end + 1..]),
        None => (b, &[]),
    }
}

fn take_i16(b: &mut &[u8]) -> Option<i16> {
    let v = i16::from_be_bytes([*b.first()?, *b.get(1)?]);
    *b = &b[2..];
    Some(v)
}

/// A Bind's portal, statement and parameters (canonical JSON: an array of
/// strings and nulls, or `{"redacted":N}`); `None` for the parameters when
/// the message is malformed (the server refuses it).
fn bind_params(payload: &[u8], redact: bool) -> (&[u8], &[u8], Option<String>) {
    let (portal, rest) = cstr_raw(payload);
    let (stmt, rest) = cstr_raw(rest);
    (portal, stmt, params_json(rest, redact))
}

fn params_json(mut rest: &[u8], redact: bool) -> Option<String> {
    let nfmt = take_i16(&mut rest)?.max(0) as usize;
    let mut formats = Vec::with_capacity(nfmt.min(64));
    for _ in 0..nfmt {
        formats.push(take_i16(&mut rest)?);
    }
    let nparams = take_i16(&mut rest)?.max(0) as usize;
    if redact {
        return Some(format!("{{\"redacted\":{nparams}}}"));
    }
    let mut values = Vec::with_capacity(64);
    values.push(b'[');
    for i in 0..nparams {
        if rest.len() < 4 {
            return None;
        }
        if i > 0 {
            values.push(b',');
        }
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        if len < 0 {
            values.extend_from_slice(b"null");
            continue;
        }
        let len = len as usize;
        let bytes = rest.get(..len)?;
        rest = &rest[len..];
        let binary = match formats.len() {
            0 => false,
            1 => formats[0] == 1,
            _ => formats.get(i).copied() == Some(1),
        };
        let shown = &bytes[..bytes.len().min(PARAM_LEN_RECORDED_MAX)];
        if binary {
            write_str(&mut values, &format!("\\x{}", hex::encode(shown)));
        } else {
            write_str(&mut values, &String::from_utf8_lossy(shown));
        }
    }
    values.push(b']');
    // Only escaped strings, `null` and punctuation were written.
    String::from_utf8(values).ok()
}

/// A Parse's parameter type OIDs as a JSON array; `None` when there are
/// none.
fn param_types(mut rest: &[u8]) -> Option<String> {
    let n = take_i16(&mut rest)?.max(0) as usize;
    if n == 0 {
        return None;
    }
    let mut out = String::from("[");
    for i in 0..n {
        let Some(oid) = rest.get(i * 4..i * 4 + 4) else {
            break;
        };
        if i > 0 {
            out.push(',');
        }
        out.push_str(
            itoa::Buffer::new().format(u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]])),
        );
    }
    out.push(']');
    Some(out)
}

/// The session's model of the server's names, and what awaits an answer.
#[derive(Default)]
pub struct Tracker {
    redact: bool,
    /// Confirmed prepared statements, by raw name.
    statements: HashMap<Vec<u8>, Stmt>,
    /// Confirmed portals, by raw name.
    portals: HashMap<Vec<u8>, Portal>,
    /// Bytes held by the model, pending messages included.
    held_bytes: usize,
    /// What awaits an answer, in the order the server answers.
    pending: VecDeque<Op>,
    pending_parses: usize,
    pending_binds: usize,
    /// The server skips everything up to the next Sync (an extended-protocol
    /// message failed and its Sync was not sent yet).
    skip_until_sync: bool,
    /// The transaction status of the last ReadyForQuery, while nothing has
    /// been sent since.
    ready: Option<u8>,
    /// CopyData since the last CopyDone or CopyFail: bytes, messages.
    copy: (u64, u64),
}

impl Tracker {
    pub fn new(redact: bool) -> Tracker {
        Tracker {
            redact,
            ..Tracker::default()
        }
    }

    fn push(&mut self, op: Op) {
        self.ready = None;
        if self.skip_until_sync {
            if !matches!(op, Op::Sync) {
                // The server will skip it: it awaits no answer.
                return;
            }
            self.skip_until_sync = false;
        }
        match &op {
            Op::Parse { name, stmt } => {
                self.pending_parses += 1;
                self.held_bytes += name.len() + stmt.text.len();
            }
            Op::Bind { portal, def } => {
                self.pending_binds += 1;
                self.held_bytes += def.bytes(portal);
            }
            _ => {}
        }
        self.pending.push_back(op);
    }

    /// Takes the oldest pending message off the queue, unapplied.
    fn pop(&mut self) -> Option<Op> {
        let op = self.pending.pop_front()?;
        match &op {
            Op::Parse { name, stmt } => {
                self.pending_parses -= 1;
                self.held_bytes -= name.len() + stmt.text.len();
            }
            Op::Bind { portal, def } => {
                self.pending_binds -= 1;
                self.held_bytes -= def.bytes(portal);
            }
            _ => {}
        }
        Some(op)
    }

    fn limit(&self, statement: bool, name: &[u8], add: usize) -> Result<(), Stop> {
        let (known, count) = if statement {
            (
                self.statements.contains_key(name),
                self.statements.len() + self.pending_parses,
            )
        } else {
            (
                self.portals.contains_key(name),
                self.portals.len() + self.pending_binds,
            )
        };
        if !known && count >= NAMES_TRACKED_MAX {
            return Err(Stop::Limit(format!(
                "breakglass gateway: more than {NAMES_TRACKED_MAX} open {} in one session; close some first",
                if statement {
                    "prepared statements"
                } else {
                    "portals"
                }
            )));
        }
        if self.held_bytes + add > TRACKED_BYTES_MAX {
            return Err(Stop::Limit(format!(
                "breakglass gateway: open prepared statements and portals hold more than {} MiB in one session; close some first",
                TRACKED_BYTES_MAX >> 20
            )));
        }
        Ok(())
    }

    /// The statement `name` will stand for when a message sent now reaches
    /// the server: `None` to wait, `Some(None)` when it is not one the
    /// gateway saw parsed.
    fn resolve_statement(&self, name: &[u8]) -> Option<Option<&Stmt>> {
        for op in self.pending.iter().rev() {
            match op {
                Op::Parse { name: n, stmt } if n == name => return Some(Some(stmt)),
                Op::Close {
                    kind: b'S',
                    name: n,
                    ..
                } if n == name => return Some(None),
                Op::Sync | Op::Statement { simple: true, .. } => return None,
                _ => {}
            }
        }
        Some(self.statements.get(name))
    }

    /// As [`Tracker::resolve_statement`], for a portal.
    fn resolve_portal(&self, name: &[u8]) -> Option<Option<&Portal>> {
        for op in self.pending.iter().rev() {
            match op {
                Op::Bind { portal, def } if portal == name => return Some(Some(def)),
                Op::Close {
                    kind: b'P',
                    name: n,
                    ..
                } if n == name => return Some(None),
                Op::Sync | Op::Statement { simple: true, .. } => return None,
                _ => {}
            }
        }
        Some(self.portals.get(name))
    }

    /// Whether the session is between batches with every answer in: a
    /// reply of the gateway's own can go to the client in order.
    fn idle(&self) -> bool {
        self.pending.is_empty() && !self.skip_until_sync && self.ready.is_some()
    }

    /// Records what a client frame asks the database to do, as the table
    /// in `frontend` says. Entries are deferred: the caller writes them
    /// (`Recording::flush`) before forwarding the frame.
    pub fn client_frame(
        &mut self,
        tag: u8,
        payload: &[u8],
        rec: &mut Recording,
    ) -> Result<Client, Stop> {
        let act = action(tag);
        let answered = matches!(
            act,
            Action::Query
                | Action::Parse
                | Action::Bind
                | Action::Execute
                | Action::Close
                | Action::Describe
                | Action::Sync
        );
        if answered && self.pending.len() >= PENDING_OPS_MAX {
            return Ok(Client::Wait);
        }
        let now = Timestamp::now();
        match act {
            Action::Query => {
                let (text, _) = cstr_raw(payload);
                let text = Text::of(text);
                let mut f = Fields::new();
                f.text("text", "text_hex", &text);
                let seq = rec.append_deferred("query", f.get(), now);
                self.push(Op::Statement { seq, simple: true });
            }
            Action::Parse => {
                let (name, rest) = cstr_raw(payload);
                let (text, rest) = cstr_raw(rest);
                self.limit(true, name, name.len() + text.len())?;
                let types = param_types(rest);
                let (n, t) = (Text::of(name), Text::of(text));
                let mut f = Fields::new();
                f.text("name", "name_hex", &n);
                if let Some(types) = &types {
                    f.push("param_types", Field::Json(types));
                }
                f.text("text", "text_hex", &t);
                let seq = rec.append_deferred("parse", f.get(), now);
                let stmt = Stmt {
                    parse: seq,
                    text: Arc::from(t.lossy),
                };
                self.push(Op::Parse {
                    name: name.to_vec(),
                    stmt,
                });
            }
            Action::Bind => {
                let (portal, statement, params) = bind_params(payload, self.redact);
                let Some(stmt) = self.resolve_statement(statement) else {
                    return Ok(Client::Wait);
                };
                let def = Portal {
                    statement: statement.to_vec(),
                    stmt: stmt.cloned(),
                    params: params.unwrap_or_else(|| "null".to_string()),
                };
                self.limit(false, portal, def.bytes(portal))?;
                self.push(Op::Bind {
                    portal: portal.to_vec(),
                    def,
                });
            }
            Action::Execute => {
                let (portal, _) = cstr_raw(payload);
                let Some(def) = self.resolve_portal(portal) else {
                    return Ok(Client::Wait);
                };
                let p = Text::of(portal);
                let s = Text::of(def.map_or(&[][..], |d| &d.statement[..]));
                let mut f = Fields::new();
                f.push(
                    "params",
                    Field::Json(def.map_or("null", |d| d.params.as_str())),
                );
                let stmt = def.and_then(|d| d.stmt.as_ref());
                if let Some(stmt) = stmt {
                    f.push("parse", Field::U64(stmt.parse));
                }
                f.text("portal", "portal_hex", &p);
                f.text("statement", "statement_hex", &s);
                f.push(
                    "text",
                    Field::Str(match (def, stmt) {
                        (_, Some(stmt)) => stmt.text.as_ref(),
                        (Some(_), None) => "<unknown statement>",
                        (None, _) => "<unknown portal>",
                    }),
                );
                let seq = rec.append_deferred("execute", f.get(), now);
                self.push(Op::Statement { seq, simple: false });
            }
            Action::Close => {
                let (&kind, rest) = payload.split_first().unwrap_or((&0, &[]));
                let (name, _) = cstr_raw(rest);
                let n = Text::of(name);
                let mut f = Fields::new();
                f.text("name", "name_hex", &n);
                f.push(
                    "target",
                    Field::Str(match kind {
                        b'S' => "statement",
                        b'P' => "portal",
                        _ => "invalid",
                    }),
                );
                let seq = rec.append_deferred("close", f.get(), now);
                self.push(Op::Close {
                    kind,
                    name: name.to_vec(),
                    seq,
                });
            }
            Action::Describe => self.push(Op::Describe),
            Action::Sync => self.push(Op::Sync),
            Action::Flush => {}
            Action::CopyData => {
                self.copy.0 += payload.len() as u64;
                self.copy.1 += 1;
            }
            Action::CopyEnd => {
                let message = (tag == b'f').then(|| Text::of(cstr_raw(payload).0));
                let mut f = Fields::new();
                f.push("bytes", Field::U64(self.copy.0));
                if let Some(m) = &message {
                    f.push("message", Field::Str(&m.lossy));
                }
                f.push("messages", Field::U64(self.copy.1));
                f.push(
                    "outcome",
                    Field::Str(if tag == b'f' { "fail" } else { "done" }),
                );
                rec.append_deferred("copy_end", f.get(), now);
                self.copy = (0, 0);
            }
            Action::Terminate => return Ok(Client::Terminate),
            Action::Refuse(why) => {
                let (code, message) = why.error(tag);
                let t = format!("{:?}", char::from(tag));
                let mut f = Fields::new();
                f.push("code", Field::Str(code))
                    .push("message", Field::Str(&message))
                    .push("type", Field::Str(&t));
                rec.append_deferred("refused", f.get(), now);
                return match (why, self.ready) {
                    // Answered like the server answers a call: an error,
                    // then ready again, the transaction untouched.
                    (Refusal::FunctionCall, Some(status)) if self.idle() => {
                        let mut out = error_response(Severity::Error, code, &message);
                        put_frame(&mut out, b'Z', &[status]);
                        Ok(Client::Reply(out))
                    }
                    _ => Err(Stop::Refused(code, message)),
                };
            }
        }
        Ok(Client::Forward)
    }

    /// Applies a server frame to the model and records outcomes (deferred:
    /// written with the next statement or by the session's flush timer).
    /// An error means the model lost track of the server's answers.
    pub fn server_frame(
        &mut self,
        tag: u8,
        payload: &[u8],
        rec: &mut Recording,
    ) -> Result<(), String> {
        let now = Timestamp::now();
        let lost = |what: &str| {
            format!(
                "breakglass gateway: unexpected {what} from the server; the session is closed so that the recording stays exact"
            )
        };
        match tag {
            b'1' => match self.pop() {
                Some(Op::Parse { name, stmt }) => {
                    rec.append_deferred(
                        "result",
                        &[
                            ("statement", Field::U64(stmt.parse)),
                            ("tag", Field::Str("parse complete")),
                        ],
                        now,
                    );
                    let (name_len, add) = (name.len(), name.len() + stmt.text.len());
                    if let Some(old) = self.statements.insert(name, stmt) {
                        self.held_bytes -= name_len + old.text.len();
                    }
                    self.held_bytes += add;
                }
                _ => return Err(lost("ParseComplete")),
            },
            b'2' => match self.pop() {
                Some(Op::Bind { portal, def }) => {
                    self.held_bytes += def.bytes(&portal);
                    if let Some(old) = self.portals.remove(&portal) {
                        self.held_bytes -= old.bytes(&portal);
                    }
                    self.portals.insert(portal, def);
                }
                _ => return Err(lost("BindComplete")),
            },
            b'3' => match self.pop() {
                Some(Op::Close { kind, name, seq }) => {
                    rec.append_deferred(
                        "result",
                        &[
                            ("statement", Field::U64(seq)),
                            ("tag", Field::Str("close complete")),
                        ],
                        now,
                    );
                    match kind {
                        b'S' => {
                            if let Some(old) = self.statements.remove(&name) {
                                self.held_bytes -= name.len() + old.text.len();
                            }
                        }
                        _ => {
                            if let Some(old) = self.portals.remove(&name) {
                                self.held_bytes -= old.bytes(&name);
                            }
                        }
                    }
                }
                _ => return Err(lost("CloseComplete")),
            },
            b'T' | b'n' => {
                if matches!(self.pending.front(), Some(Op::Describe)) {
                    self.pop();
                }
            }
            b'C' | b'I' | b's' => {
                let Some(&Op::Statement { seq, simple }) = self.pending.front() else {
                    return Ok(());
                };
                if !simple {
                    self.pop();
                }
                let tag_text = match tag {
                    b'C' => Text::of(cstr_raw(payload).0).lossy,
                    b'I' => Cow::Borrowed(""),
                    _ => Cow::Borrowed("portal suspended"),
                };
                self.forget_after(&tag_text);
                rec.append_deferred(
                    "result",
                    &[
                        ("statement", Field::U64(seq)),
                        ("tag", Field::Str(&tag_text)),
                    ],
                    now,
                );
            }
            b'E' => {
                let fields = parse_error_fields(payload);
                let get = |c: u8| {
                    fields
                        .iter()
                        .find(|(k, _)| *k == c)
                        .map_or("", |(_, v)| v.as_str())
                };
                let (about, extended) = match self.pending.front() {
                    Some(Op::Statement { seq, simple }) => (Some(*seq), !simple),
                    Some(Op::Parse { stmt, .. }) => (Some(stmt.parse), true),
                    // An error at Bind (planning with the values) means
                    // the Execute after it in the batch never runs: the
                    // error is its outcome, or the statement's when none.
                    Some(Op::Bind { def, .. }) => (
                        self.pending
                            .iter()
                            .skip(1)
                            .take_while(|op| !matches!(op, Op::Sync))
                            .find_map(|op| match op {
                                Op::Statement { seq, .. } => Some(*seq),
                                _ => None,
                            })
                            .or(def.stmt.as_ref().map(|s| s.parse)),
                        true,
                    ),
                    Some(Op::Close { seq, .. }) => (Some(*seq), true),
                    Some(Op::Describe) => (None, true),
                    Some(Op::Sync) | None => (None, false),
                };
                let mut f = Fields::new();
                f.push("code", Field::Str(get(b'C')))
                    .push("message", Field::Str(get(b'M')));
                if let Some(seq) = about {
                    f.push("statement", Field::U64(seq));
                }
                rec.append_deferred("error", f.get(), now);
                if extended {
                    // The server skips the rest of the batch: nothing of it
                    // takes effect.
                    while self
                        .pending
                        .front()
                        .is_some_and(|op| !matches!(op, Op::Sync))
                    {
                        self.pop();
                    }
                    if self.pending.is_empty() {
                        self.skip_until_sync = true;
                    }
                }
            }
            b'Z' => {
                // This ReadyForQuery ends the oldest batch: everything up to
                // and including its Sync (or simple query). Later batches
                // of a pipelining client keep waiting for their answers.
                let mut simple = false;
                while let Some(op) = self.pop() {
                    if let Op::Statement { simple: true, .. } = op {
                        simple = true;
                        break;
                    }
                    if matches!(op, Op::Sync) {
                        break;
                    }
                }
                if simple {
                    // A simple query replaces the unnamed statement.
                    if let Some(old) = self.statements.remove(&b""[..]) {
                        self.held_bytes -= old.text.len();
                    }
                }
                // Outside a transaction no portal survives.
                if payload.first() == Some(&b'I') {
                    let freed: usize = self.portals.drain().map(|(n, p)| p.bytes(&n)).sum();
                    self.held_bytes -= freed;
                }
                if self.pending.is_empty() {
                    self.ready = payload.first().copied();
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// SQL that changes names the gateway cannot see: forget the names it
    /// may have changed, so no later Execute points at a wrong Parse.
    fn forget_after(&mut self, command_tag: &str) {
        let statements = matches!(command_tag, "DEALLOCATE" | "DEALLOCATE ALL" | "DISCARD ALL");
        let portals = matches!(
            command_tag,
            "CLOSE CURSOR" | "CLOSE CURSOR ALL" | "DISCARD ALL"
        );
        if statements {
            let mut freed = 0;
            self.statements.retain(|n, s| {
                let keep = n.is_empty();
                if !keep {
                    freed += n.len() + s.text.len();
                }
                keep
            });
            self.held_bytes -= freed;
        }
        if portals {
            let mut freed = 0;
            self.portals.retain(|n, p| {
                let keep = n.is_empty();
                if !keep {
                    freed += p.bytes(n);
                }
                keep
            });
            self.held_bytes -= freed;
        }
    }
}
