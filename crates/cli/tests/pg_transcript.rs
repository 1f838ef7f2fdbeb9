//! The PostgreSQL recording is a faithful transcript: adversarial,
//! black-box tests that speak the wire protocol byte by byte to the real
//! gateway in front of a real PostgreSQL (with `log_statement = all`), and
//! check what the recording says against what the server says it ran.
//!
//! Each test runs its own `breakglass serve`; the PostgreSQL cluster is
//! shared by the tests of this file running at the same time (see
//! `gateway_support`).

mod gateway_support;

use std::time::Duration;

use gateway_support::{
    Bg, GwOptions, Msg, Raw, UP_ROLES, Upstream, cstring, first_error, frame, psql, psql_cmd, run,
    startup_packet, upstream,
};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex, PoisonError};

/// The shared cluster, with every statement of the gateway's upstream users
/// in its log.
fn logged_upstream() -> Arc<Upstream> {
    // Concurrent ALTER ROLEs of one role fail ("tuple concurrently
    // updated"): one test at a time.
    static ALTERING: Mutex<()> = Mutex::new(());
    let up = upstream();
    let _one = ALTERING.lock().unwrap_or_else(PoisonError::into_inner);
    for r in &UP_ROLES {
        up.pg
            .psql(
                "postgres",
                &format!("ALTER ROLE {} SET log_statement = 'all'", r.user),
            )
            .expect("log every statement");
    }
    up
}

/// The server's log so far.
fn server_log(up: &Upstream) -> String {
    let path = up.pg.socket_dir().join("postgres.log");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// A tiny frame builder: the messages of the protocol, from raw bytes.

fn raw_cstring(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v.push(0);
    v
}

fn parse(name: &[u8], text: &str) -> Vec<u8> {
    frame(
        b'P',
        &[
            raw_cstring(name),
            cstring(text),
            0i16.to_be_bytes().to_vec(),
        ]
        .concat(),
    )
}

/// Bind with no parameters and text results.
fn bind(portal: &[u8], statement: &[u8]) -> Vec<u8> {
    frame(
        b'B',
        &[
            raw_cstring(portal),
            raw_cstring(statement),
            vec![0, 0, 0, 0, 0, 0],
        ]
        .concat(),
    )
}

fn execute(portal: &[u8]) -> Vec<u8> {
    frame(
        b'E',
        &[raw_cstring(portal), 0i32.to_be_bytes().to_vec()].concat(),
    )
}

fn sync() -> Vec<u8> {
    frame(b'S', &[])
}

fn query(text: &str) -> Vec<u8> {
    frame(b'Q', &cstring(text))
}

/// FunctionCall of `oid` with text arguments and a text result.
fn function_call(oid: u32, args: &[&str]) -> Vec<u8> {
    let mut p = oid.to_be_bytes().to_vec();
    p.extend(0i16.to_be_bytes());
    p.extend((args.len() as i16).to_be_bytes());
    for a in args {
        p.extend((a.len() as i32).to_be_bytes());
        p.extend(a.as_bytes());
    }
    p.extend(0i16.to_be_bytes());
    frame(b'F', &p)
}

/// Messages up to and including the next ReadyForQuery.
fn until_ready(raw: &mut Raw) -> Vec<Msg> {
    let mut seen = Vec::new();
    loop {
        let m = raw.read_msg().expect("a message before ReadyForQuery");
        let done = m.tag == b'Z';
        seen.push(m);
        if done {
            return seen;
        }
    }
}

/// The text of the first column of every DataRow.
fn values(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let len = i32::from_be_bytes([m.body[2], m.body[3], m.body[4], m.body[5]]) as usize;
            String::from_utf8_lossy(&m.body[6..6 + len]).into_owned()
        })
        .collect()
}

fn errors(msgs: &[Msg]) -> Vec<(String, String)> {
    msgs.iter().filter_map(Msg::error).collect()
}

/// Start-up with `params` (after user and database) and the password.
fn login_with(
    raw: &mut Raw,
    user: &str,
    db: &str,
    params: &[(&str, &str)],
    password: &str,
) -> Result<Vec<Msg>, Msg> {
    let mut all = vec![("user", user), ("database", db)];
    all.extend_from_slice(params);
    raw.send(&startup_packet(&all));
    let mut seen = Vec::new();
    loop {
        let m = raw.read_msg().expect("a message during login");
        match m.tag {
            b'R' if m.body[..4] == 3i32.to_be_bytes() => {
                raw.send(&frame(b'p', &cstring(password)));
            }
            b'E' => return Err(m),
            b'Z' => {
                seen.push(m);
                return Ok(seen);
            }
            _ => seen.push(m),
        }
    }
}

/// The recording of the only session of `g`, once it ended.
fn only_recording(bg: &Bg, g: &gateway_support::Grant) -> (Value, Vec<Value>) {
    let s = bg.ended_sessions(g, 1, Duration::from_secs(10));
    assert_eq!(s.len(), 1, "{s:#?}");
    let rec = bg.recording(s[0]["session_id"].as_str().expect("id"));
    (s[0].clone(), rec)
}

fn entries<'a>(rec: &'a [Value], kind: &str) -> Vec<&'a Value> {
    rec.iter().filter(|e| e["kind"] == kind).collect()
}

/// The outcome entry (`result` or `error`) naming entry `seq`.
fn outcome_of(rec: &[Value], seq: &Value) -> Option<Value> {
    rec.iter()
        .find(|e| &e["statement"] == seq && matches!(e["kind"].as_str(), Some("result" | "error")))
        .cloned()
}

fn terminate(mut raw: Raw) {
    raw.send(&frame(b'X', &[]));
    let _ = raw.read_to_close(Duration::from_secs(3));
}

#[test]
fn fastpath_function_calls_are_refused_and_never_reach_the_server() {
    let up = logged_upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    let oid: u32 = up
        .pg
        .psql(
            "postgres",
            "select 'set_config(text,text,boolean)'::regprocedure::oid",
        )
        .expect("oid")
        .trim()
        .parse()
        .expect("an oid");
    let mut raw = Raw::connect(bg.gw_port);
    raw.login("alice", "pg", &g.token).expect("login");
    // set_config would switch a setting without any statement text.
    raw.send(&function_call(oid, &["statement_timeout", "4321", "false"]));
    let answer = until_ready(&mut raw);
    let errs = errors(&answer);
    assert_eq!(errs.len(), 1, "{answer:?}");
    assert_eq!(errs[0].0, "0A000", "{errs:?}");
    assert!(
        errs[0].1.contains("fastpath function calls are refused"),
        "{errs:?}"
    );
    // Refused in the protocol's flow: the session goes on, unchanged.
    raw.send(&query("show statement_timeout"));
    let answer = until_ready(&mut raw);
    assert_eq!(values(&answer), ["0"], "the call did not run");
    // A call pipelined behind a query cannot be answered in order: the
    // session ends, and the call still never reaches the server.
    let mut both = query("select 'before the call'");
    both.extend(function_call(oid, &["lock_timeout", "9876", "false"]));
    raw.send(&both);
    let (bytes, closed) = raw.read_to_close(Duration::from_secs(5));
    assert!(closed, "the gateway ends the session");
    let (code, msg) = first_error(&bytes).expect("an ErrorResponse");
    assert_eq!(code, "0A000", "{msg}");

    let (session, rec) = only_recording(&bg, &g);
    assert_eq!(session["end_reason"], "message_refused", "{session}");
    let refused = entries(&rec, "refused");
    assert_eq!(refused.len(), 2, "{rec:#?}");
    for r in refused {
        assert_eq!(
            (&r["type"], &r["code"]),
            (&json!("'F'"), &json!("0A000")),
            "{r}"
        );
    }
    let log = server_log(&up);
    assert!(
        log.contains("statement: show statement_timeout"),
        "the log works"
    );
    assert!(
        !log.contains("fastpath function call"),
        "a fastpath call reached the server:\n{log}"
    );
}

#[test]
fn parsed_text_run_by_sql_execute_is_in_the_recording() {
    let up = logged_upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    let mut raw = Raw::connect(bg.gw_port);
    raw.login("alice", "pg", &g.token).expect("login");
    let text = "select 'hidden-by-parse-1' as t";
    raw.send(&[parse(b"stealth", text), sync()].concat());
    let answer = until_ready(&mut raw);
    assert!(errors(&answer).is_empty(), "{answer:?}");
    raw.send(&query("EXECUTE stealth"));
    let answer = until_ready(&mut raw);
    assert_eq!(values(&answer), ["hidden-by-parse-1"]);
    terminate(raw);

    let (_, rec) = only_recording(&bg, &g);
    let parses = entries(&rec, "parse");
    assert_eq!(parses.len(), 1, "{rec:#?}");
    let p = parses[0];
    assert_eq!(
        (&p["name"], &p["text"]),
        (&json!("stealth"), &json!(text)),
        "{p}"
    );
    let took = outcome_of(&rec, &p["seq"]).expect("the parse's outcome");
    assert_eq!(took["tag"], "parse complete", "{took}");
    let q = entries(&rec, "query");
    assert_eq!(q.len(), 1, "{rec:#?}");
    assert_eq!(q[0]["text"], "EXECUTE stealth");
    assert!(
        p["seq"].as_u64() < q[0]["seq"].as_u64(),
        "the parse comes first"
    );
    let log = server_log(&up);
    assert!(log.contains("statement: EXECUTE stealth"), "{log}");
    assert!(log.contains(text), "{log}");
}

#[test]
fn a_refused_second_parse_does_not_replace_the_statement() {
    let up = logged_upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    let mut raw = Raw::connect(bg.gw_port);
    raw.login("alice", "pg", &g.token).expect("login");
    let first = "select 'first-definition' as t";
    raw.send(&[parse(b"s2", first), sync()].concat());
    assert!(errors(&until_ready(&mut raw)).is_empty());
    // The same name again, then its use, in one batch: the server refuses
    // the Parse and skips the rest of the batch.
    raw.send(
        &[
            parse(b"s2", "select 'second-definition' as t"),
            bind(b"", b"s2"),
            execute(b""),
            sync(),
        ]
        .concat(),
    );
    let answer = until_ready(&mut raw);
    assert_eq!(
        errors(&answer).first().map(|e| e.0.as_str()),
        Some("42P05"),
        "{answer:?}"
    );
    // The same name again in one batch, its use in the next, both in one
    // write: the second batch runs the first definition.
    raw.send(
        &[
            parse(b"s2", "select 'third-definition' as t"),
            sync(),
            bind(b"", b"s2"),
            execute(b""),
            sync(),
        ]
        .concat(),
    );
    let answer = until_ready(&mut raw);
    assert_eq!(errors(&answer).len(), 1, "{answer:?}");
    let answer = until_ready(&mut raw);
    assert_eq!(values(&answer), ["first-definition"], "{answer:?}");
    terminate(raw);

    let (_, rec) = only_recording(&bg, &g);
    let parses = entries(&rec, "parse");
    assert_eq!(parses.len(), 3, "every Parse is recorded: {rec:#?}");
    assert_eq!(parses[0]["text"], first);
    for refused in &parses[1..] {
        let o = outcome_of(&rec, &refused["seq"]).expect("an outcome");
        assert_eq!(
            (&o["kind"], &o["code"]),
            (&json!("error"), &json!("42P05")),
            "{o}"
        );
    }
    let execs = entries(&rec, "execute");
    // The execute of the refused batch is recorded (it was sent), and
    // points at the Parse it would have run; the one that ran points at
    // the first definition.
    let ran = execs.last().expect("an execute");
    assert_eq!(ran["parse"], parses[0]["seq"], "{rec:#?}");
    assert_eq!(ran["text"], first);
    let o = outcome_of(&rec, &ran["seq"]).expect("its outcome");
    assert_eq!(o["tag"], "SELECT 1", "{o}");
    let log = server_log(&up);
    assert!(
        log.contains("execute s2: select 'first-definition'"),
        "{log}"
    );
    assert!(
        !log.contains("execute s2: select 'third-definition'"),
        "{log}"
    );
}

#[test]
fn names_that_differ_only_in_non_utf8_bytes_stay_distinct() {
    let up = logged_upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    let mut raw = Raw::connect(bg.gw_port);
    login_with(
        &mut raw,
        "alice",
        "pg",
        &[("client_encoding", "LATIN1")],
        &g.token,
    )
    .expect("login");
    // 'né' and 'nè' in LATIN1: neither is UTF-8, both decode to the same
    // replacement text.
    let (acute, grave) = (&b"n\xe9"[..], &b"n\xe8"[..]);
    raw.send(
        &[
            parse(acute, "select 'acute-text' as t"),
            parse(grave, "select 'grave-text' as t"),
            sync(),
        ]
        .concat(),
    );
    assert!(errors(&until_ready(&mut raw)).is_empty());
    raw.send(&[bind(b"", acute), execute(b""), sync()].concat());
    assert_eq!(values(&until_ready(&mut raw)), ["acute-text"]);
    raw.send(&[bind(b"", grave), execute(b""), sync()].concat());
    assert_eq!(values(&until_ready(&mut raw)), ["grave-text"]);
    terminate(raw);

    let (_, rec) = only_recording(&bg, &g);
    let parses = entries(&rec, "parse");
    assert_eq!(parses.len(), 2, "{rec:#?}");
    assert_eq!(parses[0]["name_hex"], hex::encode(acute));
    assert_eq!(parses[1]["name_hex"], hex::encode(grave));
    let execs = entries(&rec, "execute");
    assert_eq!(execs.len(), 2, "{rec:#?}");
    for (e, (p, want)) in execs
        .iter()
        .zip(parses.iter().zip(["acute-text", "grave-text"]))
    {
        assert_eq!(e["parse"], p["seq"], "{e}");
        assert_eq!(e["statement_hex"], p["name_hex"], "{e}");
        assert!(e["text"].as_str().is_some_and(|t| t.contains(want)), "{e}");
    }
}

#[test]
fn startup_parameters_pass_only_from_the_allowlist_and_are_recorded() {
    let up = logged_upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    // A safety setting switched off from the start-up packet: refused
    // before the password is asked, naming it.
    let mut raw = Raw::connect(bg.gw_port);
    raw.send(&startup_packet(&[
        ("user", "alice"),
        ("database", "pg"),
        ("application_name", "ok"),
        ("default_transaction_read_only", "off"),
    ]));
    let (bytes, closed) = raw.read_to_close(Duration::from_secs(3));
    assert!(closed);
    let (code, msg) = first_error(&bytes).expect("an ErrorResponse");
    assert_eq!(code, "42501", "{msg}");
    assert!(
        msg.contains("not allowed: default_transaction_read_only"),
        "{msg}"
    );
    assert!(bg.sessions("alice", &g.id).is_empty(), "no session started");

    let mut raw = Raw::connect(bg.gw_port);
    login_with(
        &mut raw,
        "alice",
        "pg",
        &[
            ("application_name", "transcript-test"),
            ("DateStyle", "SQL, DMY"),
            ("extra_float_digits", "2"),
        ],
        &g.token,
    )
    .expect("login");
    raw.send(&query("show DateStyle"));
    assert_eq!(values(&until_ready(&mut raw)), ["SQL, DMY"]);
    terminate(raw);
    let (_, rec) = only_recording(&bg, &g);
    let head = &rec[0];
    assert_eq!(
        head["settings"],
        json!([
            ["application_name", "transcript-test"],
            ["DateStyle", "SQL, DMY"],
            ["extra_float_digits", "2"]
        ]),
        "{head}"
    );
    assert_eq!(head["application_name"], "transcript-test");
}

#[test]
fn options_settings_are_applied_and_recorded_or_refused_by_name() {
    let up = logged_upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    // psql passes PGOPTIONS in the `options` start-up parameter.
    let out = run(psql_cmd(
        bg.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "show statement_timeout"],
    )
    .env("PGOPTIONS", "-c statement_timeout=5s"));
    assert_eq!(out.ok().stdout.trim(), "5s", "{out:#?}");
    let (_, rec) = only_recording(&bg, &g);
    let head = &rec[0];
    assert_eq!(head["options"], "-c statement_timeout=5s", "{head}");
    assert!(
        head["settings"]
            .as_array()
            .is_some_and(|s| s.contains(&json!(["statement_timeout", "5s"]))),
        "{head}"
    );

    for options in [
        "-c session_replication_role=replica",
        "--session-replication-role=replica",
        "-c statement_timeout=5s -c session_replication_role=replica",
    ] {
        let out = run(
            psql_cmd(bg.gw_port, "alice", &g.token, "pg", &["-c", "select 1"])
                .env("PGOPTIONS", options),
        );
        assert_eq!(out.code, 2, "{options}: {out:#?}");
        assert!(
            out.stderr.contains("refused: session_replication_role"),
            "{options}: {}",
            out.stderr
        );
    }
    // Only the accepted session started.
    assert_eq!(bg.sessions("alice", &g.id).len(), 1);
    let out = psql(
        bg.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "show statement_timeout"],
    );
    assert_eq!(out.ok().stdout.trim(), "0", "nothing else changed it");
}

#[test]
fn unknown_and_authentication_messages_are_refused() {
    let up = logged_upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    for (tag, code) in [(b'!', "08P01"), (b'p', "08P01"), (b'V', "08P01")] {
        let mut raw = Raw::connect(bg.gw_port);
        raw.login("alice", "pg", &g.token).expect("login");
        raw.send(&frame(tag, &cstring("select 'smuggled' as t")));
        let (bytes, closed) = raw.read_to_close(Duration::from_secs(5));
        assert!(closed, "{tag}");
        let (got, msg) = first_error(&bytes).expect("an ErrorResponse");
        assert_eq!(got, code, "{msg}");
    }
    let s = bg.ended_sessions(&g, 3, Duration::from_secs(10));
    for s in &s {
        assert_eq!(s["end_reason"], "message_refused", "{s}");
        let rec = bg.recording(s["session_id"].as_str().expect("id"));
        assert_eq!(entries(&rec, "refused").len(), 1, "{rec:#?}");
    }
    assert!(!server_log(&up).contains("smuggled"));
}
