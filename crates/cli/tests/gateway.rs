//! The PostgreSQL gateway against a real PostgreSQL, with the real `psql`,
//! `tokio-postgres` and the real `breakglass` binary over loopback:
//! refusals and their SQLSTATEs, upstream logins, a transparent relay that
//! records every statement, cancel, cuts at expiry and on revoke, the CLI
//! verbs of the gateway, limits and bad input, `kill -9`, and tampering.
//!
//! Each test runs its own `breakglass serve`; the PostgreSQL cluster is
//! shared by the tests running at the same time (see `gateway_support`).

mod gateway_support;

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use gateway_support::{
    Bg, GwOptions, Raw, cstring, first_error, frame, messages, now_ms, pg_config, pg_connect,
    pg_refused, psql, psql_cmd, runtime, sqlstate, startup_packet, up_role, upstream,
};
use serde_json::{Value, json};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

/// Every recording entry of every session of a grant, after they ended.
fn entries_of(bg: &Bg, sessions: &[Value]) -> Vec<Value> {
    sessions
        .iter()
        .flat_map(|s| bg.recording(s["session_id"].as_str().expect("session id")))
        .collect()
}

/// The first column of the first row of a simple query.
fn first_value(msgs: &[SimpleQueryMessage]) -> Option<&str> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0),
        _ => None,
    })
}

/// The entry recording the outcome of statement `seq` in `rec`.
fn outcome(rec: &[Value], seq: u64) -> Option<&Value> {
    rec.iter().find(|e| {
        e["statement"] == json!(seq) && matches!(e["kind"].as_str(), Some("result" | "error"))
    })
}

/// The recording (one session's entries) holding a statement with `text`.
fn recording_with<'a>(recs: &'a [Vec<Value>], text: &str) -> &'a [Value] {
    recs.iter()
        .find(|r| r.iter().any(|e| e["text"] == text))
        .unwrap_or_else(|| panic!("no recording has the statement {text:?}: {recs:#?}"))
}

/// The statement entry (`query` or `execute`, not the `parse` of its text)
/// with `text`.
fn statement<'a>(rec: &'a [Value], text: &str) -> &'a Value {
    rec.iter()
        .find(|e| e["text"] == text && e["kind"] != "parse")
        .unwrap_or_else(|| panic!("no statement {text:?}"))
}

#[test]
fn refusals_get_an_error_response_with_their_sqlstate() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    // Ends while the other cases run.
    let short = bg.grant("alice", "pg", "scram", "1s");
    let g = bg.grant("alice", "pg", "scram", "10m");
    let revoked = bg.grant("alice", "pg", "scram", "10m");
    let (st, r) = bg.post(
        "carol",
        &format!("/v1/requests/{}/revoke", revoked.id),
        json!({"reason": "gateway test"}),
    );
    assert_eq!(st, 200, "revoke: {r}");
    let other_target = bg.grant("alice", "pg-redact", "rw", "10m");
    let forged = format!("bgg_{}", "0".repeat(64));

    let mut cases: Vec<(&str, &str, &str, String, &str, String)> = vec![
        (
            "a token nobody issued",
            "alice",
            "pg",
            forged,
            "28P01",
            "not a valid grant credential".into(),
        ),
        (
            "not a grant token at all",
            "alice",
            "pg",
            "hunter2".into(),
            "28P01",
            "password authentication failed for user \"alice\"".into(),
        ),
        (
            "someone else's token",
            "bob",
            "pg",
            g.token.clone(),
            "28000",
            "does not belong to \"bob\"".into(),
        ),
        (
            "a revoked grant's token",
            "alice",
            "pg",
            revoked.token.clone(),
            "28000",
            "the grant has ended (revoked)".into(),
        ),
        (
            "another target's token",
            "alice",
            "pg",
            other_target.token.clone(),
            "28000",
            "not for target \"pg\"".into(),
        ),
        (
            "an unknown target",
            "alice",
            "nope",
            g.token.clone(),
            "3D000",
            "no target named \"nope\"".into(),
        ),
        (
            "a target of another kind",
            "alice",
            "notes",
            g.token.clone(),
            "3D000",
            "not a PostgreSQL target (kind generic)".into(),
        ),
    ];
    // The short grant has ended by now (the cases above took some time;
    // wait out the rest).
    let left = short.expires_at_ms + 50 - now_ms();
    if left > 0 {
        std::thread::sleep(Duration::from_millis(left as u64));
    }
    cases.push((
        "an expired grant's token",
        "alice",
        "pg",
        short.token.clone(),
        "28000",
        "the grant has ended (expired)".into(),
    ));

    let rt = runtime();
    for (what, user, db, password, code, fragment) in &cases {
        let out = psql(bg.gw_port, user, password, db, &["-c", "select 1"]);
        assert_eq!(out.code, 2, "{what}: psql should fail to connect: {out:#?}");
        assert!(
            out.stderr.contains("FATAL:") && out.stderr.contains(fragment.as_str()),
            "{what}: psql stderr lacks {fragment:?}: {}",
            out.stderr
        );
        assert!(
            out.elapsed < Duration::from_secs(5),
            "{what}: took {:?}",
            out.elapsed
        );
        let err = pg_refused(&rt, &pg_config(bg.gw_port, user, db, password));
        assert_eq!(sqlstate(&err).as_deref(), Some(*code), "{what}: {err:?}");
        let msg = err.as_db_error().map(|d| d.message().to_string());
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.contains(fragment.as_str())),
            "{what}: message {msg:?} lacks {fragment:?}"
        );
        eprintln!("{what}: {code} {}", msg.unwrap_or_default());
    }
    // Replication connections are refused before the password is asked.
    let mut raw = Raw::connect(bg.gw_port);
    raw.send(&startup_packet(&[
        ("user", "alice"),
        ("database", "pg"),
        ("replication", "database"),
    ]));
    let (bytes, closed) = raw.read_to_close(Duration::from_secs(3));
    assert!(closed);
    let (code, msg) = first_error(&bytes).expect("an ErrorResponse");
    assert_eq!(code, "28000", "{msg}");
    assert!(
        msg.contains("replication connections are not allowed"),
        "{msg}"
    );
    // None of them became a session.
    for grant in [&g, &revoked, &other_target, &short] {
        assert!(bg.sessions("alice", &grant.id).is_empty());
    }
    assert!(bg.open_markers().is_empty(), "{:?}", bg.open_markers());
    // The valid credential works.
    let out = psql(bg.gw_port, "alice", &g.token, "pg", &["-c", "select 'in'"]);
    assert_eq!(out.ok().stdout.trim(), "in");
}

#[test]
fn upstream_login_with_scram_md5_and_trust() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    for role in ["scram", "md5", "trust"] {
        let g = bg.grant("alice", "pg", role, "10m");
        let out = psql(
            bg.gw_port,
            "alice",
            &g.token,
            "pg",
            &["-c", "select current_user || ' ' || current_database()"],
        );
        assert_eq!(
            out.ok().stdout.trim(),
            format!("{} app", up_role(role).user),
            "role {role}"
        );
        let s = bg.ended_sessions(&g, 1, Duration::from_secs(5));
        assert_eq!(s[0]["upstream_user"], up_role(role).user);
        assert_eq!(s[0]["end_reason"], "client_terminated");
    }
    // A wrong upstream password: the gateway's login is refused, and the
    // client hears so.
    let g = bg.grant("alice", "pg", "badpw", "10m");
    let out = psql(bg.gw_port, "alice", &g.token, "pg", &["-c", "select 1"]);
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(
        out.stderr
            .contains("the upstream database refused the gateway's login"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("not the password"),
        "the upstream password leaked: {}",
        out.stderr
    );
    let err = pg_refused(&runtime(), &pg_config(bg.gw_port, "alice", "pg", &g.token));
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err:?}");
    assert!(bg.sessions("alice", &g.id).is_empty());
}

#[test]
fn psql_relay_records_simple_queries_copy_notices_errors_and_large_results() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "rw", "10m");
    let gw = bg.gw_port;
    let t = &g.token;

    let out = psql(gw, "alice", t, "pg", &["-c", "select 41 + 1"]);
    assert_eq!(out.ok().stdout.trim(), "42");

    // COPY FROM STDIN inline in a script (the protocol's CopyIn), and \copy.
    let script = bg.dir.path().join("copy.sql");
    std::fs::write(
        &script,
        "create table copy_t (id int, name text);\n\
         copy copy_t from stdin;\n1\tone\n2\ttwo\n3\tthree\n\\.\n\
         \\copy copy_t from stdin\n4\tfour\n\\.\n\
         select count(*) from copy_t;\n",
    )
    .expect("write script");
    let out = psql(gw, "alice", t, "pg", &["-f", &script.display().to_string()]);
    assert_eq!(
        out.ok().stdout,
        "CREATE TABLE\nCOPY 3\nCOPY 1\n4\n",
        "{out:#?}"
    );
    // COPY TO STDOUT (CopyOut).
    let out = psql(
        gw,
        "alice",
        t,
        "pg",
        &["-c", "copy (select * from copy_t order by id) to stdout"],
    );
    assert_eq!(
        out.ok().stdout,
        "1\tone\n2\ttwo\n3\tthree\n4\tfour\n",
        "{out:#?}"
    );

    let out = psql(
        gw,
        "alice",
        t,
        "pg",
        &[
            "-c",
            "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql %', 7; END $$",
        ],
    );
    assert!(
        out.ok().stderr.contains("NOTICE:  hello from plpgsql 7"),
        "{out:#?}"
    );

    let out = psql(gw, "alice", t, "pg", &["-c", "select 1/0"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("ERROR:  division by zero"), "{out:#?}");

    let started = Instant::now();
    let out = psql(
        gw,
        "alice",
        t,
        "pg",
        &["-c", "select g from generate_series(1, 200000) g"],
    );
    let lines: Vec<&str> = out.ok().stdout.lines().collect();
    assert_eq!(lines.len(), 200_000);
    assert_eq!((lines[0], lines[199_999]), ("1", "200000"));
    eprintln!("200000 rows through the gateway in {:?}", started.elapsed());

    let sessions = bg.ended_sessions(&g, 6, Duration::from_secs(10));
    let recs: Vec<Vec<Value>> = sessions
        .iter()
        .map(|s| bg.recording(s["session_id"].as_str().expect("id")))
        .collect();
    for (s, rec) in sessions.iter().zip(&recs) {
        assert_eq!(s["end_reason"], "client_terminated", "{s}");
        let head = &rec[0];
        assert_eq!(head["kind"], "session");
        assert_eq!(head["session_id"], s["session_id"]);
        assert_eq!(head["request_id"], g.id.as_str());
        assert_eq!(
            (&head["principal"], &head["role"], &head["upstream_user"]),
            (&json!("alice"), &json!("rw"), &json!("bg_rw"))
        );
        assert_eq!(head["application_name"], "psql");
        let last = rec.last().expect("entries");
        assert_eq!(
            (&last["kind"], &last["reason"]),
            (&json!("end"), &json!("client_terminated"))
        );
        assert_eq!(
            s["statements"].as_u64(),
            Some(
                rec.iter()
                    .filter(|e| e["kind"] == "query" || e["kind"] == "execute")
                    .count() as u64
            )
        );
    }
    let rec = recording_with(&recs, "select 41 + 1");
    let q = statement(rec, "select 41 + 1");
    assert_eq!(q["kind"], "query");
    assert_eq!(
        outcome(rec, q["seq"].as_u64().expect("seq")).map(|o| &o["tag"]),
        Some(&json!("SELECT 1"))
    );
    let rec = recording_with(&recs, "copy copy_t from stdin;");
    let q = statement(rec, "copy copy_t from stdin;");
    assert_eq!(
        outcome(rec, q["seq"].as_u64().expect("seq")).map(|o| &o["tag"]),
        Some(&json!("COPY 3"))
    );
    assert!(
        rec.iter().any(|e| e["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("COPY  copy_t FROM STDIN"))),
        "\\copy is recorded as the COPY psql sends: {rec:#?}"
    );
    let rec = recording_with(&recs, "select 1/0");
    let q = statement(rec, "select 1/0");
    let o = outcome(rec, q["seq"].as_u64().expect("seq")).expect("outcome");
    assert_eq!(
        (&o["kind"], &o["code"], &o["message"]),
        (&json!("error"), &json!("22012"), &json!("division by zero"))
    );
    let rec = recording_with(&recs, "select g from generate_series(1, 200000) g");
    let q = statement(rec, "select g from generate_series(1, 200000) g");
    assert_eq!(
        outcome(rec, q["seq"].as_u64().expect("seq")).map(|o| &o["tag"]),
        Some(&json!("SELECT 200000"))
    );
    // session.started and session.ended are in the audit chain.
    let audit = bg.audit();
    for s in &sessions {
        let sid = &s["session_id"];
        for action in ["session.started", "session.ended"] {
            assert!(
                audit
                    .iter()
                    .any(|e| e["action"] == action && e["details"]["session_id"] == *sid),
                "{action} of {sid} missing"
            );
        }
    }
    let out = bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &bg.config_path().display().to_string(),
        ],
    );
    out.ok();
}

#[test]
fn driver_extended_protocol_records_statements_and_parameters() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "rw", "10m");
    let redacted = bg.grant("alice", "pg-redact", "rw", "10m");
    const SQL: &str = "select $1::int4 + $2::int4, $3::text, $4::text is null";
    let rt = runtime();
    for (grant, db) in [(&g, "pg"), (&redacted, "pg-redact")] {
        rt.block_on(async {
            let (c, _rx) = pg_connect(&pg_config(bg.gw_port, "alice", db, &grant.token))
                .await
                .expect("connect");
            let stmt = c.prepare(SQL).await.expect("prepare");
            for _ in 0..2 {
                let row = c
                    .query_one(&stmt, &[&40i32, &2i32, &"p-secret-1", &None::<&str>])
                    .await
                    .expect("query");
                assert_eq!(row.get::<_, i32>(0), 42);
                assert_eq!(row.get::<_, &str>(1), "p-secret-1");
                assert!(row.get::<_, bool>(2));
            }
            let err = c
                .query_one("select 1 / $1::int4", &[&0i32])
                .await
                .expect_err("division by zero");
            assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
            // The session goes on after an error.
            let n: i64 = c
                .query_one(
                    "select count(*) from generate_series(1, $1::int8)",
                    &[&1000i64],
                )
                .await
                .expect("count")
                .get(0);
            assert_eq!(n, 1000);
        });
    }
    // Text-format parameters, as other drivers send them.
    let mut raw = Raw::connect(bg.gw_port);
    raw.login("alice", "pg", &g.token).expect("login");
    let mut b = Vec::new();
    b.extend(frame(
        b'P',
        &[cstring("s1"), cstring("select $1::text"), vec![0, 0]].concat(),
    ));
    b.extend(frame(
        b'B',
        &[
            cstring(""),
            cstring("s1"),
            vec![0, 0, 0, 1],
            16i32.to_be_bytes().to_vec(),
            b"plain-text-value".to_vec(),
            vec![0, 0],
        ]
        .concat(),
    ));
    b.extend(frame(b'E', &[cstring(""), vec![0, 0, 0, 0]].concat()));
    b.extend(frame(b'S', &[]));
    raw.send(&b);
    let mut got = Vec::new();
    while let Some(m) = raw.read_msg() {
        got.push(m.tag);
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(
        got, b"12DCZ",
        "ParseComplete BindComplete DataRow CommandComplete Ready"
    );
    raw.send(&frame(b'X', &[]));
    drop(raw);

    let sessions = bg.ended_sessions(&g, 2, Duration::from_secs(10));
    let recs: Vec<Vec<Value>> = sessions
        .iter()
        .map(|s| bg.recording(s["session_id"].as_str().expect("id")))
        .collect();
    let rec = recording_with(&recs, SQL);
    let execs: Vec<&Value> = rec
        .iter()
        .filter(|e| e["kind"] == "execute" && e["text"] == SQL)
        .collect();
    assert_eq!(execs.len(), 2, "{rec:#?}");
    // tokio-postgres sends binary parameters: recorded as hex.
    let want = json!([
        "\\x00000028",
        "\\x00000002",
        format!("\\x{}", hex::encode("p-secret-1")),
        null
    ]);
    for e in &execs {
        assert_eq!(e["params"], want, "{e}");
        assert!(
            e["statement"].as_str().is_some_and(|s| !s.is_empty()),
            "{e}"
        );
        assert_eq!(
            outcome(rec, e["seq"].as_u64().expect("seq")).map(|o| &o["tag"]),
            Some(&json!("SELECT 1"))
        );
    }
    let failed = statement(rec, "select 1 / $1::int4");
    assert_eq!(failed["params"], json!(["\\x00000000"]));
    let o = outcome(rec, failed["seq"].as_u64().expect("seq")).expect("outcome");
    assert_eq!((&o["kind"], &o["code"]), (&json!("error"), &json!("22012")));
    let rec = recording_with(&recs, "select $1::text");
    let e = statement(rec, "select $1::text");
    assert_eq!(
        (&e["kind"], &e["statement"], &e["params"]),
        (
            &json!("execute"),
            &json!("s1"),
            &json!(["plain-text-value"])
        )
    );

    // With redact_parameters the statements are there, the values are not.
    let sessions = bg.ended_sessions(&redacted, 1, Duration::from_secs(10));
    let sid = sessions[0]["session_id"].as_str().expect("id");
    let rec = bg.recording(sid);
    let execs: Vec<&Value> = rec
        .iter()
        .filter(|e| e["kind"] == "execute" && e["text"] == SQL)
        .collect();
    assert_eq!(execs.len(), 2, "{rec:#?}");
    for e in execs {
        assert_eq!(e["params"], json!({"redacted": 4}), "{e}");
    }
    let text = std::fs::read_to_string(bg.recordings_dir().join(format!("{sid}.jsonl")))
        .expect("read recording");
    for secret in [
        "p-secret-1".to_string(),
        hex::encode("p-secret-1"),
        "\\x00000028".to_string(),
    ] {
        assert!(!text.contains(&secret), "{secret} in a redacted recording");
    }
}

#[test]
fn notices_and_listen_notify_between_two_sessions() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "rw", "10m");
    let cfg = pg_config(bg.gw_port, "alice", "pg", &g.token);
    runtime().block_on(async {
        let (a, mut a_msgs) = pg_connect(&cfg).await.expect("connect a");
        let (b, _b_msgs) = pg_connect(&cfg).await.expect("connect b");
        a.batch_execute("LISTEN bg_chan").await.expect("listen");
        b.batch_execute("NOTIFY bg_chan, 'hello from b'")
            .await
            .expect("notify");
        b.batch_execute("select pg_notify('bg_chan', 'and again')")
            .await
            .expect("pg_notify");
        let mut payloads = Vec::new();
        while payloads.len() < 2 {
            match tokio::time::timeout(Duration::from_secs(5), a_msgs.recv()).await {
                Ok(Some(AsyncMessage::Notification(n))) => {
                    assert_eq!(n.channel(), "bg_chan");
                    payloads.push(n.payload().to_string());
                }
                Ok(Some(_)) => {}
                other => panic!("no notification: {other:?} (got {payloads:?})"),
            }
        }
        assert_eq!(payloads, ["hello from b", "and again"]);
        a.batch_execute("DO $$ BEGIN RAISE NOTICE 'notice % for a', 1; END $$")
            .await
            .expect("do");
        match tokio::time::timeout(Duration::from_secs(5), a_msgs.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => {
                assert_eq!((n.severity(), n.message()), ("NOTICE", "notice 1 for a"));
            }
            other => panic!("no notice: {other:?}"),
        }
    });
    let sessions = bg.ended_sessions(&g, 2, Duration::from_secs(10));
    let all = entries_of(&bg, &sessions);
    for text in ["LISTEN bg_chan", "NOTIFY bg_chan, 'hello from b'"] {
        assert!(all.iter().any(|e| e["text"] == text), "{text} not recorded");
    }
}

#[test]
fn cancel_request_is_mapped_to_the_real_backend() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "rw", "10m");
    let rt = runtime();
    let (c, _msgs) = rt
        .block_on(pg_connect(&pg_config(bg.gw_port, "alice", "pg", &g.token)))
        .expect("connect");
    let token = c.cancel_token();
    let sleeper = rt.spawn(async move {
        let r = c.simple_query("select pg_sleep(30) /* cancel me */").await;
        (r, Instant::now(), c)
    });
    // Wait until the upstream runs it.
    let active = "SELECT pid FROM pg_stat_activity WHERE usename = 'bg_rw' \
                  AND state = 'active' AND query LIKE '%cancel me%' AND pid <> pg_backend_pid()";
    let real_pid: i32 = gateway_support::poll(Duration::from_secs(10), || {
        up.pg.psql("postgres", active).ok()?.trim().parse().ok()
    })
    .expect("the query never ran upstream");
    // The real pid with a guessed secret cancels nothing: the gateway only
    // knows the keys it handed out.
    let mut guess = Vec::new();
    guess.extend_from_slice(&16i32.to_be_bytes());
    guess.extend_from_slice(&80_877_102i32.to_be_bytes());
    guess.extend_from_slice(&real_pid.to_be_bytes());
    guess.extend_from_slice(&12345i32.to_be_bytes());
    let mut raw = Raw::connect(bg.gw_port);
    raw.send(&guess);
    let (_, closed) = raw.read_to_close(Duration::from_secs(3));
    assert!(closed, "the gateway closes a cancel connection");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!sleeper.is_finished(), "a guessed key cancelled the query");

    let sent = Instant::now();
    rt.block_on(token.cancel_query(NoTls)).expect("cancel");
    let (r, done, c) = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), sleeper).await })
        .expect("the cancel did not stop the query")
        .expect("join");
    let latency = done.duration_since(sent);
    eprintln!("cancel through the gateway took {latency:?}");
    let err = r.expect_err("cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    // The session goes on.
    let rows = rt
        .block_on(c.simple_query("select 'still here'"))
        .expect("query");
    assert_eq!(first_value(&rows), Some("still here"));
}

#[test]
fn expiry_cuts_running_sessions_and_their_backends() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let user = up_role("exp").user;
    let g = bg.grant("alice", "pg", "exp", "4s");
    let rt = runtime();
    // One session through tokio-postgres, one through psql.
    let (c, _msgs) = rt
        .block_on(pg_connect(&pg_config(bg.gw_port, "alice", "pg", &g.token)))
        .expect("connect");
    let sleeper = rt.spawn(async move {
        let r = c.simple_query("select pg_sleep(60)").await;
        (r, now_ms())
    });
    let psql_child = gateway_support::Spawned::spawn(&mut psql_cmd(
        bg.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "select pg_sleep(60)"],
    ));
    up.pg
        .wait_for_backends(user, 2, Duration::from_secs(3))
        .expect("two sessions upstream");
    assert!(now_ms() < g.expires_at_ms, "the setup took too long");

    let wait = Duration::from_millis((g.expires_at_ms - now_ms()).max(0) as u64 + 5000);
    let (r, cut_at) = rt
        .block_on(async { tokio::time::timeout(wait, sleeper).await })
        .expect("the session outlived its grant")
        .expect("join");
    let lateness = cut_at - g.expires_at_ms;
    let err = r.expect_err("cut");
    eprintln!("expiry cut {lateness} ms after expires_at: {err}");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    assert!(
        err.as_db_error()
            .is_some_and(|d| d.message().contains("the grant expired")),
        "{err:?}"
    );
    assert!(
        (-100..1000).contains(&lateness),
        "cut {lateness} ms from expires_at"
    );
    let out = psql_child.wait(Duration::from_secs(5));
    let psql_lateness = now_ms() - g.expires_at_ms;
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(
        out.stderr.contains("FATAL:  breakglass: the grant expired"),
        "{out:#?}"
    );
    eprintln!("psql exited {psql_lateness} ms after expires_at");
    let started = Instant::now();
    up.pg
        .wait_for_backends(user, 0, Duration::from_secs(1))
        .expect("upstream backends gone within a second");
    eprintln!(
        "upstream backends gone {:?} after the cut",
        started.elapsed()
    );

    let sessions = bg.ended_sessions(&g, 2, Duration::from_secs(5));
    for s in &sessions {
        assert_eq!(s["end_reason"], "expired", "{s}");
    }
    let audit = bg.audit();
    let ended: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "session.ended" && e["request_id"] == g.id.as_str())
        .collect();
    assert_eq!(ended.len(), 2);
    assert!(
        ended
            .iter()
            .all(|e| e["details"]["end_reason"] == "expired")
    );
    // The token is refused now.
    let out = psql(bg.gw_port, "alice", &g.token, "pg", &["-c", "select 1"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("the grant has ended (expired)"),
        "{out:#?}"
    );
}

#[test]
fn revoke_cuts_a_streaming_session() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let user = up_role("rev").user;
    let g = bg.grant("alice", "pg", "rev", "10m");
    let rt = runtime();
    let (c, _msgs) = rt
        .block_on(pg_connect(&pg_config(bg.gw_port, "alice", "pg", &g.token)))
        .expect("connect");
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let streamer = rt.spawn(async move {
        let params: [&(dyn ToSql + Sync); 0] = [];
        let stream = c
            .query_raw(
                "select * from generate_series(1, 50000000)",
                params.iter().copied(),
            )
            .await
            .expect("query");
        let mut stream = std::pin::pin!(stream);
        let mut rows = 0u64;
        let mut first = Some(first_tx);
        loop {
            match stream.next().await {
                Some(Ok(_)) => {
                    rows += 1;
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }
                Some(Err(e)) => return (rows, Some(e), Instant::now(), now_ms()),
                None => return (rows, None, Instant::now(), now_ms()),
            }
        }
    });
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), first_rx).await })
        .expect("no rows within 10 s")
        .expect("first row");
    // A second session whose client asks for the same and stops reading:
    // the gateway is stuck writing to it when the revoke comes.
    let mut stuck = Raw::connect(bg.gw_port);
    stuck.login("alice", "pg", &g.token).expect("login");
    stuck.send(&frame(
        b'Q',
        &cstring("select * from generate_series(1, 50000000) /* stuck */"),
    ));
    // Let the stream run at full speed for a moment.
    std::thread::sleep(Duration::from_millis(500));
    let before = Instant::now();
    let out = bg.cli(
        Some("carol"),
        &["revoke", &g.id, "--reason", "incident over"],
    );
    let cli_done = Instant::now();
    out.ok();
    let (rows, err, cut, cut_ms) = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), streamer).await })
        .expect("the stream outlived the revoke")
        .expect("join");
    let revoked_at = bg
        .audit()
        .iter()
        .find(|e| e["action"] == "request.revoked" && e["request_id"] == g.id.as_str())
        .map(|e| gateway_support::ms(&e["time"]))
        .expect("request.revoked event");
    let since_event = cut_ms - revoked_at;
    let since_cli_start = cut.duration_since(before);
    eprintln!(
        "revoke cut the stream after {rows} rows: {since_event} ms after the request.revoked \
         event, {since_cli_start:?} after the CLI started ({:?} CLI run); error: {err:?}",
        cli_done.duration_since(before)
    );
    assert!(rows < 50_000_000, "the whole result went through");
    let err = err.expect("the stream ended with an error");
    if let Some(code) = sqlstate(&err) {
        assert_eq!(code, "57P01", "{err:?}");
    }
    assert!(since_event < 1000, "cut {since_event} ms after the revoke");
    assert!(
        since_cli_start < Duration::from_secs(2),
        "{since_cli_start:?}"
    );
    let started = Instant::now();
    up.pg
        .wait_for_backends(user, 0, Duration::from_secs(1))
        .expect("upstream backends gone within a second");
    eprintln!(
        "upstream backends gone {:?} after the cut",
        started.elapsed()
    );
    // The client that stopped reading finds the connection closed once it
    // reads what was buffered.
    let (_, closed) = stuck.read_to_close(Duration::from_secs(5));
    assert!(closed, "the stuck session is still open");
    let sessions = bg.ended_sessions(&g, 2, Duration::from_secs(5));
    for s in &sessions {
        assert_eq!(s["end_reason"], "revoked", "{s:#?}");
        let rec = bg.recording(s["session_id"].as_str().expect("id"));
        assert_eq!(
            rec.last().map(|e| (&e["kind"], &e["reason"])),
            Some((&json!("end"), &json!("revoked")))
        );
    }
}

#[test]
fn connect_sessions_and_recording_verbs() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "rw", "10m");
    // What `connect` hands its client: the credential in the environment,
    // nothing on the command line.
    let out = bg.cli(
        Some("alice"),
        &["connect", &g.id, "--client", "/usr/bin/env"],
    );
    let env = &out.ok().stdout;
    let pw = env
        .lines()
        .find_map(|l| l.strip_prefix("PGPASSWORD="))
        .expect("PGPASSWORD set");
    assert!(pw.starts_with("bgg_"), "{pw}");
    for want in [
        "PGHOST=127.0.0.1".to_string(),
        format!("PGPORT={}", bg.gw_port),
        "PGUSER=alice".to_string(),
        "PGDATABASE=pg".to_string(),
        format!("PGAPPNAME=breakglass:{}", g.id),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} missing:\n{env}");
    }

    let out = bg.cli(
        Some("alice"),
        &[
            "connect",
            &g.id,
            "--",
            "-X",
            "-A",
            "-t",
            "-c",
            "select 'via connect'",
        ],
    );
    assert_eq!(out.ok().stdout.trim(), "via connect", "{out:#?}");
    assert!(
        out.stderr.contains("every statement is recorded"),
        "{out:#?}"
    );

    let s = bg.ended_sessions(&g, 1, Duration::from_secs(5));
    let sid = s[0]["session_id"].as_str().expect("id").to_string();
    assert_eq!(s[0]["end_reason"], "client_terminated");

    let out = bg.cli(Some("alice"), &["sessions", &g.id]);
    let text = &out.ok().stdout;
    assert!(
        text.contains(&sid)
            && text.contains("(client_terminated)")
            && text.contains("statements 1"),
        "{text}"
    );
    let out = bg.cli(Some("alice"), &["sessions", &g.id, "--output", "json"]);
    let list: Value = serde_json::from_str(&out.ok().stdout).expect("json");
    assert_eq!(list["sessions"][0]["session_id"], sid.as_str());
    assert_eq!(list["sessions"][0]["statements"], 1);

    let out = bg.cli(Some("alice"), &["recording", &sid, "--output", "json"]);
    let lines: Vec<Value> = out
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines[0]["kind"], "session");
    assert_eq!(lines[0]["application_name"], format!("breakglass:{}", g.id));
    assert!(
        lines
            .iter()
            .any(|e| e["kind"] == "query" && e["text"] == "select 'via connect'"),
        "{lines:#?}"
    );
    assert_eq!(lines.last().map(|e| &e["kind"]), Some(&json!("end")));
    assert_eq!(lines, bg.recording(&sid), "the CLI prints the whole file");
    // Small pages, twice (the second walk resumes from remembered page
    // ends), give the same entries; past the end there is nothing more.
    for walk in 0..2 {
        let mut paged: Vec<Value> = Vec::new();
        let mut after = 0;
        loop {
            let (st, page) = bg.get(
                "alice",
                &format!("/v1/sessions/{sid}/recording?after={after}&limit=2"),
            );
            assert_eq!(st, 200, "{page}");
            assert_eq!(page["complete"], true, "{page}");
            let entries = page["entries"].as_array().expect("entries");
            assert!(entries.len() <= 2, "{page}");
            paged.extend(entries.iter().cloned());
            match page["next"].as_u64() {
                Some(n) => {
                    assert_eq!(Some(n), entries.last().and_then(|e| e["seq"].as_u64()));
                    after = n;
                }
                None => break,
            }
        }
        assert_eq!(paged, lines, "walk {walk}");
    }
    let (st, page) = bg.get(
        "alice",
        &format!("/v1/sessions/{sid}/recording?after={}", lines.len()),
    );
    assert_eq!(
        (st, page["entries"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    assert!(page["next"].is_null(), "{page}");
    let out = bg.cli(Some("alice"), &["recording", &sid]);
    assert!(out.ok().stdout.contains("select 'via connect'"), "{out:#?}");
    // Another principal does not see it; an admin does.
    let out = bg.cli(Some("bob"), &["recording", &sid]);
    assert_ne!(out.code, 0, "{out:#?}");
    bg.cli(Some("carol"), &["recording", &sid, "--output", "json"])
        .ok();
}

#[test]
fn bad_input_and_limits_leave_other_sessions_alone() {
    let up = upstream();
    let bg = Bg::start(
        &up,
        GwOptions {
            startup_timeout: "1s",
            message_len_max: 4096,
            max_connections_per_grant: 2,
            ..GwOptions::default()
        },
    );
    let gw = bg.gw_port;
    let g = bg.grant("alice", "pg", "rw", "10m");
    let bad = bg.grant("alice", "pg", "rw", "10m");
    let rt = runtime();
    let cfg = pg_config(gw, "alice", "pg", &g.token);
    let (a, _a_msgs) = rt.block_on(pg_connect(&cfg)).expect("session a");
    let check_a = |what: &str| {
        let rows = rt
            .block_on(a.simple_query("select 'a ok'"))
            .unwrap_or_else(|e| panic!("session a broke after {what}: {e}"));
        assert_eq!(first_value(&rows), Some("a ok"));
    };

    // Garbage instead of a start-up packet: an HTTP request, a TLS hello.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        &b"\x00\x00\x00\x08\x00\x02\x00\x00"[..],
    ] {
        let mut r = Raw::connect(gw);
        r.send(garbage);
        let (bytes, closed) = r.read_to_close(Duration::from_secs(3));
        assert!(closed, "not closed after {garbage:?}");
        let (code, msg) = first_error(&bytes).expect("an ErrorResponse");
        assert_eq!(code, "08P01", "{msg}");
        eprintln!("garbage {garbage:?}: {code} {msg}");
    }
    check_a("garbage");

    // Start-ups that never finish, at the same time: nothing at all, a
    // truncated packet, no password. Each is cut at startup_timeout (1s).
    let stalled: Vec<std::thread::JoinHandle<(Vec<u8>, bool, Duration)>> = [
        Vec::new(),
        startup_packet(&[("user", "alice"), ("database", "pg")])[..10].to_vec(),
        startup_packet(&[("user", "alice"), ("database", "pg")]),
    ]
    .into_iter()
    .map(|first| {
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut r = Raw::connect(gw);
            if !first.is_empty() {
                r.send(&first);
            }
            let (bytes, closed) = r.read_to_close(Duration::from_secs(5));
            (bytes, closed, started.elapsed())
        })
    })
    .collect();
    for (i, h) in stalled.into_iter().enumerate() {
        let (bytes, closed, took) = h.join().expect("join");
        assert!(closed, "stalled start-up {i} not closed");
        let (code, msg) = first_error(&bytes).expect("an ErrorResponse");
        assert_eq!(
            (code.as_str(), msg.as_str()),
            (
                "08P01",
                "breakglass gateway: start-up not completed in time"
            ),
            "start-up {i}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "start-up {i} cut after {took:?}"
        );
    }
    check_a("stalled start-ups");

    // A truncated start-up packet, then the client leaves: closed at once.
    let mut r = Raw::connect(gw);
    r.send(&startup_packet(&[("user", "alice")])[..7]);
    r.half_close();
    let started = Instant::now();
    let (_, closed) = r.read_to_close(Duration::from_secs(3));
    assert!(closed && started.elapsed() < Duration::from_millis(900));

    // In a session: a message over message_len_max ends it with 08P01.
    let bad_cfg = pg_config(gw, "alice", "pg", &bad.token);
    rt.block_on(async {
        let (b, _m) = pg_connect(&bad_cfg).await.expect("session b");
        let fits = format!("select '{}'", "y".repeat(3000));
        b.simple_query(&fits)
            .await
            .expect("a query under the limit");
        let big = format!("select '{}' /* big */", "x".repeat(5000));
        let err = b.simple_query(&big).await.expect_err("too large");
        assert_eq!(sqlstate(&err).as_deref(), Some("08P01"), "{err:?}");
        let msg = err.as_db_error().map(|d| d.message().to_string());
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.contains("larger than the limit of 4096")),
            "{msg:?}"
        );
        assert!(b.is_closed() || b.simple_query("select 1").await.is_err());
    });
    check_a("an oversized message");

    // In a session: a frame with a negative length.
    let mut r = Raw::connect(gw);
    r.login("alice", "pg", &bad.token).expect("login");
    r.send(&[b'Q', 0xff, 0xff, 0xff, 0xf0]);
    let (bytes, closed) = r.read_to_close(Duration::from_secs(3));
    assert!(closed);
    let (code, msg) = first_error(&bytes).expect("an ErrorResponse");
    assert_eq!(code, "08P01", "{msg}");
    check_a("a negative length");

    // In a session: a truncated query, then the client leaves. Nothing of
    // it reaches the database or the recording.
    let mut r = Raw::connect(gw);
    r.login("alice", "pg", &bad.token).expect("login");
    let whole = frame(b'Q', &cstring("select 'never sent whole'"));
    r.send(&whole[..whole.len() - 6]);
    r.half_close();
    let (bytes, closed) = r.read_to_close(Duration::from_secs(3));
    assert!(closed && messages(&bytes).is_empty(), "{bytes:?}");
    check_a("a truncated message");

    let s = bg.ended_sessions(&bad, 3, Duration::from_secs(5));
    let mut reasons: Vec<&str> = s.iter().filter_map(|s| s["end_reason"].as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        ["client_closed", "protocol_violation", "protocol_violation"]
    );
    let all = entries_of(&bg, &s);
    assert!(
        !all.iter().any(|e| e["text"]
            .as_str()
            .is_some_and(|t| t.contains("never sent whole") || t.contains("/* big */"))),
        "a statement that was not forwarded is recorded"
    );

    // max_connections_per_grant = 2: a is one, b the second, c is refused.
    let (b, _b_msgs) = rt.block_on(pg_connect(&cfg)).expect("second session");
    let err = pg_refused(&rt, &cfg);
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
    let out = psql(gw, "alice", &g.token, "pg", &["-c", "select 1"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("too many sessions for this grant"),
        "{out:#?}"
    );
    check_a("refused sessions");
    drop(b);
    bg.ended_sessions(&g, 1, Duration::from_secs(5));
    let out = psql(gw, "alice", &g.token, "pg", &["-c", "select 'room again'"]);
    assert_eq!(out.ok().stdout.trim(), "room again");
    // Refused sessions never started: no session events, no recording left
    // open.
    drop(a);
    let s = bg.ended_sessions(&g, 3, Duration::from_secs(5));
    assert_eq!(s.len(), 3, "{s:#?}");
    let clean = gateway_support::poll(Duration::from_secs(5), || {
        bg.open_markers().is_empty().then_some(())
    });
    assert!(clean.is_some(), "left open: {:?}", bg.open_markers());
    let files = std::fs::read_dir(bg.recordings_dir())
        .expect("recordings")
        .count();
    assert_eq!(files, 6, "one recording per session that started");
    // The service is fine.
    let out = bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &bg.config_path().display().to_string(),
        ],
    );
    out.ok();
}

#[test]
fn idle_sessions_are_closed_and_max_connections_holds() {
    let up = upstream();
    let bg = Bg::start(
        &up,
        GwOptions {
            idle_timeout: "1s",
            max_connections: 2,
            ..GwOptions::default()
        },
    );
    let g = bg.grant("alice", "pg", "rw", "10m");
    let cfg = pg_config(bg.gw_port, "alice", "pg", &g.token);
    let rt = runtime();
    let (a, _a_msgs) = rt.block_on(pg_connect(&cfg)).expect("first");
    let (b, _b_msgs) = rt.block_on(pg_connect(&cfg)).expect("second");
    // A third connection is refused before start-up.
    let mut raw = Raw::connect(bg.gw_port);
    let (bytes, closed) = raw.read_to_close(Duration::from_secs(3));
    assert!(closed);
    assert_eq!(
        first_error(&bytes),
        Some((
            "53300".to_string(),
            "breakglass gateway: too many connections".to_string()
        ))
    );
    let err = pg_refused(&rt, &cfg);
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
    drop(b);
    // Traffic keeps a session alive past idle_timeout...
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        let rows = rt
            .block_on(a.simple_query("select 'busy'"))
            .unwrap_or_else(|e| panic!("busy session cut after {i} rounds: {e}"));
        assert_eq!(first_value(&rows), Some("busy"));
    }
    // ...silence does not.
    std::thread::sleep(Duration::from_millis(1600));
    let err = rt
        .block_on(a.simple_query("select 'late'"))
        .expect_err("idle session closed");
    assert!(a.is_closed(), "{err:?}");
    let sessions = bg.ended_sessions(&g, 2, Duration::from_secs(5));
    let mut reasons: Vec<&str> = sessions
        .iter()
        .filter_map(|s| s["end_reason"].as_str())
        .collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["client_terminated", "idle_timeout"]);
    let idle = sessions
        .iter()
        .find(|s| s["end_reason"] == "idle_timeout")
        .expect("idle session");
    let rec = bg.recording(idle["session_id"].as_str().expect("id"));
    assert!(!rec.iter().any(|e| e["text"] == "select 'late'"));
}

#[test]
fn kill9_keeps_forwarded_statements_in_the_recording() {
    let up = upstream();
    let mut bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "rw", "10m");
    let rt = runtime();
    let (c, _msgs) = rt
        .block_on(pg_connect(&pg_config(bg.gw_port, "alice", "pg", &g.token)))
        .expect("connect");
    rt.block_on(c.batch_execute("create table crash_t (x int)"))
        .expect("create");
    rt.block_on(c.simple_query("insert into crash_t values (424242)"))
        .expect("insert");
    bg.kill9();
    // The statement reached the database...
    let n = up
        .pg
        .psql("app", "select count(*) from crash_t where x = 424242")
        .expect("count");
    assert_eq!(n.trim(), "1");
    // ...and to the recording, which the dead process left open.
    let open = bg.open_markers();
    assert_eq!(open.len(), 1, "{open:?}");
    let sid = open[0].trim_end_matches(".open").to_string();
    assert!(
        bg.recording(&sid)
            .iter()
            .any(|e| e["text"] == "insert into crash_t values (424242)")
    );
    bg.restart_after_kill9(1);
    let s = bg.ended_sessions(&g, 1, Duration::from_secs(10))[0].clone();
    assert_eq!(s["session_id"], sid.as_str());
    assert_eq!(s["end_reason"], "service_restart", "{s}");
    // The restart closed the recording.
    let rec = bg.recording(&sid);
    let q = statement(&rec, "insert into crash_t values (424242)");
    assert_eq!(q["kind"], "query");
    assert_eq!(
        rec.last().map(|e| (&e["kind"], &e["reason"])),
        Some((&json!("end"), &json!("service_restart")))
    );
    assert_eq!(s["statements"], 2);
    assert!(bg.open_markers().is_empty());
    let out = bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &bg.config_path().display().to_string(),
        ],
    );
    assert!(out.ok().stdout.contains("recording"), "{out:#?}");
    // The client noticed.
    assert!(rt.block_on(c.simple_query("select 1")).is_err());
}

#[test]
fn audit_verify_names_a_tampered_recording() {
    let up = upstream();
    let bg = Bg::start(
        &up,
        GwOptions {
            strict_recording: true,
            ..GwOptions::default()
        },
    );
    let g = bg.grant("alice", "pg", "rw", "10m");
    let out = psql(
        bg.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "select 'tamper me'"],
    );
    assert_eq!(out.ok().stdout.trim(), "tamper me");
    let s = bg.ended_sessions(&g, 1, Duration::from_secs(5));
    let sid = s[0]["session_id"].as_str().expect("id").to_string();
    let config = bg.config_path().display().to_string();
    bg.cli(None, &["audit", "verify", "--config", &config]).ok();
    let ended_seq = bg
        .audit()
        .iter()
        .find(|e| e["action"] == "session.ended" && e["details"]["session_id"] == sid.as_str())
        .and_then(|e| e["seq"].as_u64())
        .expect("session.ended");

    let path = bg.recordings_dir().join(format!("{sid}.jsonl"));
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("select 'tamper me'"));
    std::fs::write(
        &path,
        text.replace("select 'tamper me'", "select 'harmless'"),
    )
    .expect("tamper");
    let out = bg.cli(None, &["audit", "verify", "--config", &config]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.contains(&format!("seq {ended_seq}")) && out.stderr.contains(&sid),
        "{out:#?}"
    );
    eprintln!("audit verify: {}", out.stderr.trim());
    // The API refuses to serve it as if it were fine.
    let (st, body) = bg.get("alice", &format!("/v1/sessions/{sid}/recording"));
    assert_eq!(st, 409, "{body}");
}

#[test]
fn tls_is_offered_with_a_certificate_and_refused_without() {
    let up = upstream();
    let bg = Bg::start(
        &up,
        GwOptions {
            tls: true,
            ..GwOptions::default()
        },
    );
    let g = bg.grant("alice", "pg", "scram", "10m");
    let out = gateway_support::run(
        psql_cmd(bg.gw_port, "alice", &g.token, "pg", &["-c", "\\conninfo"])
            .env("PGSSLMODE", "require"),
    );
    let out = out.ok();
    assert!(
        out.stdout.contains("SSL connection (protocol: TLSv1."),
        "{out:#?}"
    );
    // Without a certificate the gateway answers N to SSLRequest, so a
    // client that insists on TLS gives up instead of sending its token.
    let plain = Bg::start(&up, GwOptions::default());
    let g = plain.grant("alice", "pg", "scram", "10m");
    let out = gateway_support::run(
        psql_cmd(plain.gw_port, "alice", &g.token, "pg", &["-c", "select 1"])
            .env("PGSSLMODE", "require"),
    );
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(
        out.stderr.contains("does not support SSL"),
        "{}",
        out.stderr
    );
    assert!(plain.sessions("alice", &g.id).is_empty());
}

#[test]
fn upstream_tls_as_the_url_asks() {
    let up = upstream();
    let certs = tempfile::tempdir().expect("tempdir");
    breakglass_testkit::make_test_ca(certs.path(), "DNS:localhost");
    up.pg
        .enable_tls(&certs.path().join("srv.pem"), &certs.path().join("srv.key"))
        .expect("TLS on the upstream");
    let ca = certs.path().join("ca.pem").display().to_string();
    let ssl_of = |opts: GwOptions| {
        let bg = Bg::start(&up, opts);
        let g = bg.grant("alice", "pg", "scram", "10m");
        psql(
            bg.gw_port,
            "alice",
            &g.token,
            "pg",
            &[
                "-c",
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            ],
        )
    };
    // Encrypted without verification, like libpq's sslmode=require.
    let out = ssl_of(GwOptions {
        upstream_query: "?sslmode=require".into(),
        ..GwOptions::default()
    });
    assert_eq!(out.ok().stdout.trim(), "t");
    // Verified against the CA and the host name.
    let out = ssl_of(GwOptions {
        upstream_host: "localhost",
        upstream_query: format!("?sslmode=verify-full&sslrootcert={ca}"),
        ..GwOptions::default()
    });
    assert_eq!(out.ok().stdout.trim(), "t");
    // The certificate names localhost, not 127.0.0.1: refused, fail closed.
    let out = ssl_of(GwOptions {
        upstream_query: format!("?sslmode=verify-full&sslrootcert={ca}"),
        ..GwOptions::default()
    });
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(out.stderr.contains("upstream TLS failed"), "{}", out.stderr);
    // Plaintext still works where the URL does not ask for TLS.
    let out = ssl_of(GwOptions::default());
    assert_eq!(out.ok().stdout.trim(), "f");
}

/// Bytes that are not UTF-8 are recorded (replaced), not dropped; both
/// batches of a pipelining client get their outcomes; a client that opens
/// more prepared statements than the gateway tracks is told so and
/// disconnected instead of running statements the recording cannot name.
#[test]
fn recordings_hold_non_utf8_text_pipelined_outcomes_and_tracking_limits() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "scram", "10m");
    let mut raw = Raw::connect(bg.gw_port);
    raw.login("alice", "pg", &g.token).expect("login");
    let until_ready = |raw: &mut Raw| {
        let mut seen = Vec::new();
        loop {
            let m = raw.read_msg().expect("a message");
            let done = m.tag == b'Z';
            seen.push(m);
            if done {
                return seen;
            }
        }
    };
    raw.send(&frame(b'Q', &cstring("set client_encoding to 'LATIN1'")));
    until_ready(&mut raw);
    // 'café' in LATIN1: 0xE9 is not UTF-8.
    let mut latin = b"select 'caf\xe9' as hidden".to_vec();
    latin.push(0);
    raw.send(&frame(b'Q', &latin));
    let answer = until_ready(&mut raw);
    assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");
    // Two extended-protocol batches in one write.
    let mut batch = Vec::new();
    for n in [1, 2] {
        let mut parse = cstring("");
        parse.extend(cstring(&format!("select {n} as pipelined")));
        parse.extend(0i16.to_be_bytes());
        batch.extend(frame(b'P', &parse));
        let mut bind = cstring("");
        bind.extend(cstring(""));
        bind.extend([0u8; 4]);
        bind.extend(0i16.to_be_bytes());
        batch.extend(frame(b'B', &bind));
        let mut exec = cstring("");
        exec.extend(0i32.to_be_bytes());
        batch.extend(frame(b'E', &exec));
        batch.extend(frame(b'S', &[]));
    }
    raw.send(&batch);
    until_ready(&mut raw);
    until_ready(&mut raw);
    // More named prepared statements than the gateway tracks.
    let mut many = Vec::new();
    for n in 0..=10_000 {
        let mut parse = cstring(&format!("s{n}"));
        parse.extend(cstring("select 1"));
        parse.extend(0i16.to_be_bytes());
        many.extend(frame(b'P', &parse));
    }
    raw.try_send(&many);
    let (bytes, closed) = raw.read_to_close(Duration::from_secs(10));
    assert!(closed, "the gateway closes the session");
    let (code, msg) = first_error(&bytes).expect("an ErrorResponse");
    assert_eq!(code, "08P01", "{msg}");
    assert!(
        msg.contains("more than 10000 open prepared statements"),
        "{msg}"
    );

    let s = bg.ended_sessions(&g, 1, Duration::from_secs(5));
    let sid = s[0]["session_id"].as_str().expect("id");
    let rec = bg.recording(sid);
    let hidden = rec
        .iter()
        .find(|e| e["kind"] == "query" && e["text"] == "select 'caf\u{fffd}' as hidden")
        .unwrap_or_else(|| panic!("the LATIN1 query is recorded: {rec:#?}"));
    let result_of = |seq: &Value| {
        rec.iter()
            .find(|e| e["kind"] == "result" && &e["statement"] == seq)
            .map(|e| e["tag"].clone())
    };
    assert_eq!(result_of(&hidden["seq"]), Some(json!("SELECT 1")));
    for n in [1, 2] {
        let text = format!("select {n} as pipelined");
        let exec = rec
            .iter()
            .find(|e| e["kind"] == "execute" && e["text"] == text.as_str())
            .unwrap_or_else(|| panic!("{text} is recorded: {rec:#?}"));
        assert_eq!(
            result_of(&exec["seq"]),
            Some(json!("SELECT 1")),
            "the outcome of {text} is recorded"
        );
    }
    assert_eq!(s[0]["end_reason"], "protocol_violation");
}
