//! Tampering with the store behind the server's back (DESIGN §5, §9): a
//! store with some dozens of events is made through the real server, then
//! copies of it are altered with SQLite directly. `breakglass audit verify`
//! must fail and name the first bad `seq` every time; an untouched copy
//! verifies. A server started on a tampered store refuses writes and says
//! why on `/readyz`, while reads go on working.

mod common;

use std::time::Duration;

use common::{Api, Server, Setup};
use rusqlite::{Connection, params};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A tamper case: its name, what it does to the store, the first bad seq
/// verification must name.
type Case = (&'static str, Box<dyn Fn(&Connection)>, u64);

/// The store every case starts from.
struct Base {
    setup: Setup,
    /// The last seq.
    head: u64,
    /// Seqs of the signed checkpoints, ascending.
    checkpoints: Vec<u64>,
    /// A request that exists in the store.
    request_id: String,
}

/// One full lifecycle through the API: create, approve, credentials,
/// revoke: five audit events.
fn lifecycle(api: &Api, i: usize) -> String {
    let (st, r) = api.post(
        "alice",
        "/v1/requests",
        Some(json!({"target": "prod-db", "role": "read", "duration": "10m", "reason": format!("tamper base {i}")})),
    );
    assert_eq!(st, 201, "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    let (st, r) = api.post("bob", &format!("/v1/requests/{id}/approve"), None);
    assert_eq!(st, 200, "{r}");
    let (st, r) = api.post("alice", &format!("/v1/requests/{id}/credentials"), None);
    assert_eq!(st, 200, "{r}");
    let (st, r) = api.post(
        "dave",
        &format!("/v1/requests/{id}/revoke"),
        Some(json!({"reason": "done"})),
    );
    assert_eq!(st, 200, "{r}");
    id
}

/// Builds the base store: two batches of lifecycles with a periodic
/// checkpoint between them, then a graceful stop (which signs the head).
fn base() -> Base {
    let setup = Setup::new();
    let mut server = Server::start(&setup);
    let api = Api::new(&setup.url());
    let mut request_id = String::new();
    for i in 0..6 {
        request_id = lifecycle(&api, i);
    }
    // Let the 1s checkpoint task sign a head in the middle of the log.
    std::thread::sleep(Duration::from_millis(1300));
    for i in 6..10 {
        lifecycle(&api, i);
    }
    let status = server
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit on SIGTERM; stderr:\n{}", server.stderr()));
    assert!(status.success(), "{status}");
    let conn = Connection::open(setup.db_path()).expect("open base store");
    let head: i64 = conn
        .query_row("SELECT max(seq) FROM audit", [], |r| r.get(0))
        .expect("head");
    let checkpoints: Vec<u64> = conn
        .prepare("SELECT seq FROM checkpoints ORDER BY seq")
        .expect("prepare")
        .query_map([], |r| r.get::<_, i64>(0))
        .expect("query")
        .map(|s| s.expect("seq") as u64)
        .collect();
    let head = head as u64;
    // The automated review may close some of the ended grants meanwhile.
    let reviewed: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit WHERE action IN ('request.reviewed', 'review.queued')",
            [],
            |r| r.get(0),
        )
        .expect("reviews");
    assert_eq!(
        head - reviewed as u64,
        51,
        "service.started + 10 lifecycles of 5 events"
    );
    assert_eq!(checkpoints.last(), Some(&head), "the stop signs the head");
    assert!(
        checkpoints.iter().any(|&c| c > 10 && c < head),
        "a checkpoint between seq 10 and the head: {checkpoints:?}"
    );
    Base {
        setup,
        head,
        checkpoints,
        request_id,
    }
}

/// The documented chain hash (DESIGN §5, `breakglass_core::audit` docs),
/// written again here so the test checks the documentation too:
/// `SHA-256(prev || seq u64 BE || time_ms i64 BE || str actor || str action
/// || str request_id || str details)`, `str` = u32 BE length + UTF-8.
fn chain_hash(prev: &[u8], row: &Row) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(row.seq.to_be_bytes());
    h.update(row.time.to_be_bytes());
    for s in [
        row.actor.as_str(),
        row.action.as_str(),
        row.request_id.as_deref().unwrap_or(""),
        row.details.as_str(),
    ] {
        h.update((s.len() as u32).to_be_bytes());
        h.update(s.as_bytes());
    }
    h.finalize().to_vec()
}

#[derive(Debug, Clone)]
struct Row {
    seq: i64,
    time: i64,
    actor: String,
    action: String,
    request_id: Option<String>,
    details: String,
    hash: Vec<u8>,
}

fn rows(conn: &Connection) -> Vec<Row> {
    conn.prepare(
        "SELECT seq, time, actor, action, request_id, details, hash FROM audit ORDER BY seq",
    )
    .expect("prepare")
    .query_map([], |r| {
        Ok(Row {
            seq: r.get(0)?,
            time: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            request_id: r.get(4)?,
            details: r.get(5)?,
            hash: r.get(6)?,
        })
    })
    .expect("query")
    .map(|r| r.expect("row"))
    .collect()
}

fn row(conn: &Connection, seq: i64) -> Row {
    rows(conn)
        .into_iter()
        .find(|r| r.seq == seq)
        .unwrap_or_else(|| panic!("no row {seq}"))
}

/// Overwrites everything but the seq of row `seq` with `content`.
fn put(conn: &Connection, seq: i64, content: &Row) {
    let n = conn
        .execute(
            "UPDATE audit SET time = ?1, actor = ?2, action = ?3, request_id = ?4, details = ?5, hash = ?6 WHERE seq = ?7",
            params![
                content.time,
                content.actor,
                content.action,
                content.request_id,
                content.details,
                content.hash,
                seq
            ],
        )
        .expect("update row");
    assert_eq!(n, 1);
}

/// Runs `audit verify` on `setup` (text and JSON); returns the first bad seq
/// it names, or `None` when it says the chain holds. Checks that text, JSON
/// and exit code agree.
#[track_caller]
fn verify(setup: &Setup) -> Option<u64> {
    let config = setup.config_path().display().to_string();
    let text = setup.cli(None, &["audit", "verify", "--config", &config]);
    let json = setup.cli(
        None,
        &["audit", "verify", "--config", &config, "--output", "json"],
    );
    assert_eq!(text.code, json.code, "{text:#?} {json:#?}");
    let report = json.json();
    if report["ok"] == true {
        text.expect_code(0);
        assert!(text.stdout.starts_with("Audit chain OK: "), "{text:#?}");
        assert!(report["first_bad_seq"].is_null(), "{report}");
        return None;
    }
    text.expect_code(1);
    let seq = report["first_bad_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("a broken chain names no seq: {report}"));
    assert!(
        text.stdout
            .starts_with(&format!("Audit chain BROKEN at seq {seq}: ")),
        "{text:#?}"
    );
    assert!(
        text.stderr
            .contains(&format!("the audit chain does not hold at seq {seq}")),
        "{text:#?}"
    );
    assert!(text.stderr.contains("(audit_broken)"), "{text:#?}");
    Some(seq)
}

/// A copy of a stopped server's setup and store, altered by `tamper`.
fn tampered(setup: &Setup, tamper: impl FnOnce(&Connection)) -> Setup {
    let copy = setup.copy();
    let conn = Connection::open(copy.db_path()).expect("open copy");
    tamper(&conn);
    drop(conn);
    copy
}

#[test]
fn every_single_tamper_is_detected_offline_at_its_seq() {
    let base = base();
    let head = base.head as i64;
    let mid_cp = *base
        .checkpoints
        .iter()
        .find(|&&c| c > 10 && (c as i64) < head)
        .expect("a middle checkpoint") as i64;

    // The untouched copy verifies, and the documented hash matches every row.
    let copy = base.setup.copy();
    assert_eq!(verify(&copy), None);
    let conn = Connection::open(copy.db_path()).expect("open copy");
    let all = rows(&conn);
    assert_eq!(all.len() as i64, head);
    let mut prev = vec![0u8; 32];
    for r in &all {
        assert_eq!(
            chain_hash(&prev, r),
            r.hash,
            "row {} does not follow the documented encoding",
            r.seq
        );
        prev = r.hash.clone();
    }
    drop(conn);

    let cases: Vec<Case> = vec![
        (
            "alter one row's details",
            Box::new(|c: &Connection| {
                let n = c
                    .execute(
                        "UPDATE audit SET details = replace(details, 'done', 'nothing to see') WHERE seq = 26",
                        [],
                    )
                    .expect("update");
                assert_eq!(n, 1);
                assert!(
                    row(c, 26).details.contains("nothing to see"),
                    "seq 26 is a revoke"
                );
            }),
            26,
        ),
        (
            "alter one row's actor",
            Box::new(|c: &Connection| {
                c.execute("UPDATE audit SET actor = 'carol' WHERE seq = 13", [])
                    .expect("update");
            }),
            13,
        ),
        (
            "alter one row's stored hash",
            Box::new(|c: &Connection| {
                c.execute("UPDATE audit SET hash = zeroblob(32) WHERE seq = 30", [])
                    .expect("update");
            }),
            30,
        ),
        (
            "delete one row",
            Box::new(|c: &Connection| {
                assert_eq!(
                    c.execute("DELETE FROM audit WHERE seq = 17", [])
                        .expect("delete"),
                    1
                );
            }),
            17,
        ),
        (
            "insert one row (later rows renumbered)",
            Box::new(|c: &Connection| {
                c.execute_batch(
                    "UPDATE audit SET seq = -seq WHERE seq >= 20;
                     UPDATE audit SET seq = -seq + 1 WHERE seq < 0;",
                )
                .expect("renumber");
                // A forged approval, shaped like its neighbour.
                let mut forged = row(c, 19);
                forged.action = "request.approved".into();
                c.execute(
                    "INSERT INTO audit (seq, time, actor, action, request_id, details, hash) VALUES (20, ?1, ?2, ?3, ?4, ?5, ?6)",
                    params![forged.time, forged.actor, forged.action, forged.request_id, forged.details, forged.hash],
                )
                .expect("insert");
            }),
            20,
        ),
        (
            "swap two rows' contents (reorder)",
            Box::new(|c: &Connection| {
                let (a, b) = (row(c, 33), row(c, 34));
                put(c, 33, &b);
                put(c, 34, &a);
            }),
            33,
        ),
        (
            "truncate the tail a signed checkpoint covers",
            Box::new(move |c: &Connection| {
                let n = c
                    .execute("DELETE FROM audit WHERE seq > ?1", params![head - 5])
                    .expect("delete tail");
                assert_eq!(n, 5);
            }),
            base.head - 4,
        ),
        (
            "alter a checkpoint's signature",
            Box::new(move |c: &Connection| {
                let n = c
                    .execute(
                        "UPDATE checkpoints SET signature = zeroblob(64) WHERE seq = ?1",
                        params![mid_cp],
                    )
                    .expect("update checkpoint");
                assert_eq!(n, 1);
            }),
            mid_cp as u64,
        ),
        (
            "move a checkpoint to another hash",
            Box::new(move |c: &Connection| {
                c.execute(
                    "UPDATE checkpoints SET hash = (SELECT hash FROM audit WHERE seq = 3) WHERE seq = ?1",
                    params![mid_cp],
                )
                .expect("update checkpoint");
            }),
            mid_cp as u64,
        ),
        (
            // The hash chain itself is not keyed: someone who rewrites a row
            // and recomputes every later hash is caught by the first signed
            // checkpoint after the change, which is the seq named.
            "alter a row and recompute every later hash",
            Box::new(|c: &Connection| {
                let mut all = rows(c);
                let mut prev = vec![0u8; 32];
                for r in &mut all {
                    if r.seq == 12 {
                        assert_eq!(r.actor, "alice");
                        r.actor = "mallory".into();
                    }
                    r.hash = chain_hash(&prev, r);
                    prev = r.hash.clone();
                    put(c, r.seq, r);
                }
            }),
            base.checkpoints
                .iter()
                .copied()
                .find(|&cp| cp >= 12)
                .expect("a checkpoint at or after seq 12"),
        ),
    ];
    for (name, tamper, first_bad) in &cases {
        let copy = tampered(&base.setup, tamper);
        assert_eq!(verify(&copy), Some(*first_bad), "case: {name}");
    }

    // Limits of what the store alone can prove, asserted as they are today:
    //
    // 1. A forged event appended after the last checkpoint with a correctly
    //    computed hash verifies: nothing signed covers it yet.
    let copy = tampered(&base.setup, |c| {
        let last = row(c, head);
        let mut forged = last.clone();
        forged.seq = head + 1;
        forged.action = "request.reviewed".into();
        forged.hash = chain_hash(&last.hash, &forged);
        c.execute(
            "INSERT INTO audit (seq, time, actor, action, request_id, details, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![forged.seq, forged.time, forged.actor, forged.action, forged.request_id, forged.details, forged.hash],
        )
        .expect("append");
    });
    assert_eq!(
        verify(&copy),
        None,
        "an unsigned tail cannot be told from a real one"
    );
    // 2. Truncating the tail AND deleting the checkpoints that cover it is
    //    caught by the default witness outside the data dir, which still
    //    holds the checkpoint of the head.
    let copy = tampered(&base.setup, move |c| {
        c.execute("DELETE FROM audit WHERE seq > ?1", params![head - 5])
            .expect("truncate");
        c.execute("DELETE FROM checkpoints WHERE seq > ?1", params![head - 5])
            .expect("drop checkpoints");
    });
    assert_eq!(verify(&copy), Some(head as u64 - 4));
}

/// Starts a server on `setup` and returns `/readyz`'s answer.
fn start_on(setup: &Setup) -> (Server, u16, Value) {
    let mut server = Server::spawn(setup);
    let (status, body) = server.wait_answer();
    (server, status, body)
}

#[test]
fn a_server_on_a_broken_chain_refuses_writes_but_serves_reads() {
    let base = base();
    let head = base.head as i64;
    let id = base.request_id.clone();

    // Start-up checks the newest checkpoint and the chain after it (not the
    // whole log, which could be long). These tampers are within its reach:
    let reach: Vec<Case> = vec![
        (
            "the newest checkpoint's signature",
            Box::new(move |c: &Connection| {
                c.execute(
                    "UPDATE checkpoints SET signature = zeroblob(64) WHERE seq = ?1",
                    params![head],
                )
                .expect("update");
            }),
            base.head,
        ),
        (
            "the tail under the newest checkpoint, truncated",
            Box::new(move |c: &Connection| {
                c.execute("DELETE FROM audit WHERE seq > ?1", params![head - 3])
                    .expect("truncate");
            }),
            base.head - 2,
        ),
        (
            "the stored hash of the checkpointed event",
            Box::new(move |c: &Connection| {
                c.execute(
                    "UPDATE audit SET hash = zeroblob(32) WHERE seq = ?1",
                    params![head],
                )
                .expect("update");
            }),
            base.head,
        ),
    ];
    for (name, tamper, first_bad) in &reach {
        let copy = tampered(&base.setup, tamper);
        let (server, status, body) = start_on(&copy);
        assert_eq!(status, 503, "case {name}: {body}");
        assert_eq!(body["code"], "audit_chain_broken", "case {name}: {body}");
        assert!(
            server.stderr().contains("AUDIT CHAIN BROKEN"),
            "case {name}: {}",
            server.stderr()
        );
        let api = Api::new(&copy.url());
        // Writes are refused with the same code...
        let (st, p) = api.post(
            "alice",
            "/v1/requests",
            Some(json!({"target": "drill-db", "role": "read", "duration": "5m", "reason": "x"})),
        );
        assert_eq!(
            (st, p["code"].as_str()),
            (503, Some("audit_chain_broken")),
            "{name}: {p}"
        );
        let (st, p) = api.post(
            "dave",
            &format!("/v1/requests/{id}/revoke"),
            Some(json!({"reason": "x"})),
        );
        assert_eq!(
            (st, p["code"].as_str()),
            (503, Some("audit_chain_broken")),
            "{name}: {p}"
        );
        // No grant is usable while the chain is broken: the introspection
        // says it cannot tell instead of answering "not active".
        let (st, p) = api.post(
            common::SERVICE,
            "/v1/credentials/verify",
            Some(
                json!({"token": format!("{}anything", breakglass_core::token::GRANT_TOKEN_PREFIX), "target": "prod-db"}),
            ),
        );
        assert_eq!(
            (st, p["code"].as_str()),
            (503, Some("store_unavailable")),
            "{name}: {p}"
        );
        // ...and through the CLI that is an error (1) naming the code.
        let out = copy.cli(
            Some("alice"),
            &[
                "request",
                "drill-db",
                "--role",
                "read",
                "--duration",
                "5m",
                "--reason",
                "x",
            ],
        );
        out.expect_code(1);
        assert!(out.stderr.contains("audit_chain_broken"), "{out:#?}");
        // Reads still work.
        let (st, r) = api.get("alice", &format!("/v1/requests/{id}"));
        assert_eq!(
            (st, r["state"].as_str()),
            (200, Some("revoked")),
            "{name}: {r}"
        );
        assert_eq!(api.all_requests("dave").len(), 10, "{name}");
        copy.cli(Some("alice"), &["whoami"]).expect_code(0);
        copy.cli(Some("alice"), &["list"]).expect_code(0);
        let (st, v) = api.get("dave", "/v1/audit/verify");
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["ok"], false, "{name}: {v}");
        assert_eq!(v["first_bad_seq"].as_u64(), Some(*first_bad), "{name}: {v}");
        // Nothing was written: the store still fails offline at the same seq.
        drop(server);
        assert_eq!(verify(&copy), Some(*first_bad), "{name}");
    }

    // Tampering before the newest checkpoint is out of the start-up check's
    // reach (it affords only the tail), but the full verification that runs
    // in the background right after start-up finds it and blocks writes.
    // A changed row AT the newest checkpoint is recomputed at start-up.
    let beyond: Vec<Case> = vec![
        (
            "a row in the middle",
            Box::new(|c: &Connection| {
                c.execute("UPDATE audit SET actor = 'carol' WHERE seq = 13", [])
                    .expect("update");
            }),
            13,
        ),
        (
            "the checkpointed row's details",
            Box::new(move |c: &Connection| {
                c.execute(
                    "UPDATE audit SET details = replace(details, 'done', 'nothing') WHERE seq = ?1",
                    params![head],
                )
                .expect("update");
            }),
            base.head,
        ),
    ];
    for (name, tamper, first_bad) in &beyond {
        let copy = tampered(&base.setup, tamper);
        let (server, _status, _body) = start_on(&copy);
        let api = Api::new(&copy.url());
        // Generous: the background verification shares two cores with the
        // whole suite in CI.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (st, p) = api.post(
                "alice",
                "/v1/requests",
                Some(
                    json!({"target": "drill-db", "role": "read", "duration": "5m", "reason": "x"}),
                ),
            );
            if st == 503 {
                assert_eq!(p["code"], "audit_chain_broken", "{name}: {p}");
                break;
            }
            // A write that slipped in before the background check finished
            // is committed properly; it does not hide the tampering.
            assert_eq!(st, 201, "{name}: {p}");
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: writes never blocked"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (st, v) = api.get("dave", "/v1/audit/verify");
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["ok"], false, "{name}: {v}");
        assert_eq!(v["first_bad_seq"].as_u64(), Some(*first_bad), "{name}: {v}");
        drop(server);
        assert_eq!(verify(&copy), Some(*first_bad), "{name}");
    }
}

#[test]
fn start_up_catches_tampering_after_the_newest_checkpoint() {
    // A server that crashed (kill -9) leaves events no checkpoint covers yet;
    // start-up verifies every link of that tail.
    let mut setup = Setup::new();
    setup.audit = "checkpoint_interval = \"1h\"\n".to_string();
    setup.write_config();
    let mut server = Server::start(&setup);
    let api = Api::new(&setup.url());
    let id = lifecycle(&api, 0);
    lifecycle(&api, 1);
    server.kill9();

    let conn = Connection::open(setup.db_path()).expect("open store");
    let last_cp: Option<i64> = conn
        .query_row("SELECT max(seq) FROM checkpoints", [], |r| r.get(0))
        .expect("checkpoints");
    let head: i64 = conn
        .query_row("SELECT max(seq) FROM audit", [], |r| r.get(0))
        .expect("head");
    drop(conn);
    let victim = last_cp.unwrap_or(0) + 3;
    assert!(
        victim < head,
        "events after the newest checkpoint: {last_cp:?} {head}"
    );
    // The crashed store itself is fine.
    assert_eq!(verify(&setup), None);

    let copy = tampered(&setup, |c| {
        c.execute(
            "UPDATE audit SET actor = 'mallory' WHERE seq = ?1",
            params![victim],
        )
        .expect("update");
    });
    assert_eq!(verify(&copy), Some(victim as u64));
    let (_server, status, body) = start_on(&copy);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "audit_chain_broken");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("seq {victim}"))),
        "{body}"
    );
    let api = Api::new(&copy.url());
    let (st, r) = api.get("alice", &format!("/v1/requests/{id}"));
    assert_eq!((st, r["state"].as_str()), (200, Some("revoked")), "{r}");
    let (st, p) = api.post(
        "alice",
        "/v1/requests",
        Some(json!({"target": "drill-db", "role": "read", "duration": "5m", "reason": "x"})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (503, Some("audit_chain_broken")),
        "{p}"
    );
}

#[test]
fn the_external_checkpoint_file_catches_a_truncation_the_store_hides() {
    // Deleting the tail of the log together with the checkpoints that
    // cover it leaves a consistent-looking store; the copy of every
    // checkpoint in `audit.checkpoint_file` still names what was signed.
    let mut setup = Setup::new();
    setup.audit =
        "checkpoint_interval = \"1s\"\ncheckpoint_file = \"checkpoints.jsonl\"\n".to_string();
    setup.write_config();
    let mut server = Server::start(&setup);
    let api = Api::new(&setup.url());
    lifecycle(&api, 0);
    lifecycle(&api, 1);
    assert!(
        server.terminate(Duration::from_secs(10)).is_some(),
        "server did not stop"
    );
    assert_eq!(verify(&setup), None);
    let conn = Connection::open(setup.db_path()).expect("open store");
    let head: i64 = conn
        .query_row("SELECT max(seq) FROM audit", [], |r| r.get(0))
        .expect("head");
    let keep = head - 3;
    conn.execute("DELETE FROM audit WHERE seq > ?1", params![keep])
        .expect("truncate");
    conn.execute("DELETE FROM checkpoints WHERE seq > ?1", params![keep])
        .expect("truncate checkpoints");
    drop(conn);
    assert_eq!(verify(&setup), Some(keep as u64 + 1));
    // A configured witness that is gone is a failure, not "no checkpoints".
    std::fs::remove_file(setup.path().join("checkpoints.jsonl")).expect("remove file");
    let out = verify_out(&setup, &[]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("holds no checkpoint"), "{out:#?}");
}

/// The default witness file (`<data_dir>.witness/checkpoints.jsonl`).
fn witness_file(setup: &Setup) -> std::path::PathBuf {
    setup.path().join("data.witness").join("checkpoints.jsonl")
}

/// Runs `audit verify` with extra arguments.
fn verify_out(setup: &Setup, extra: &[&str]) -> common::CliOutput {
    let config = setup.config_path().display().to_string();
    let mut args = vec!["audit", "verify", "--config", &config];
    args.extend_from_slice(extra);
    setup.cli(None, &args)
}

#[test]
fn the_default_witness_catches_truncation_and_its_own_loss() {
    // Default config: no checkpoint_file, no verify_keys.
    let base = base();
    let head = base.head as i64;
    let w = witness_file(&base.setup);
    let text = std::fs::read_to_string(&w).expect("the default witness exists");
    assert!(text.lines().count() >= 2, "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(w.parent().expect("dir"))
            .expect("witness dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "witness dir mode {mode:o}");
    }
    // Without a trusted key given, verify passes but says what it cannot
    // rule out.
    let out = verify_out(&base.setup, &[]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("no trusted key given"), "{out:#?}");

    // The last events and every checkpoint that covers them, deleted.
    let keep = head - 3;
    let truncated = tampered(&base.setup, move |c| {
        c.execute("DELETE FROM audit WHERE seq > ?1", params![keep])
            .expect("truncate");
        c.execute("DELETE FROM checkpoints WHERE seq > ?1", params![keep])
            .expect("drop checkpoints");
    });
    assert_eq!(verify(&truncated), Some(keep as u64 + 1));

    // The witness deleted, emptied, or replaced by an older copy.
    let store_last = *base.checkpoints.last().expect("checkpoints");
    let deleted = base.setup.copy();
    std::fs::remove_file(witness_file(&deleted)).expect("delete witness");
    assert_eq!(verify(&deleted), Some(store_last));
    let emptied = base.setup.copy();
    std::fs::write(witness_file(&emptied), "").expect("empty witness");
    assert_eq!(verify(&emptied), Some(store_last));
    let older = base.setup.copy();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(
        witness_file(&older),
        format!("{}\n", lines[..lines.len() - 1].join("\n")),
    )
    .expect("older witness");
    let out = verify_out(&older, &[]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("older than the store"), "{out:#?}");
    // Truncation plus the loss of the witness: still a failure.
    let both = tampered(&base.setup, move |c| {
        c.execute("DELETE FROM audit WHERE seq > ?1", params![keep])
            .expect("truncate");
        c.execute("DELETE FROM checkpoints WHERE seq > ?1", params![keep])
            .expect("drop checkpoints");
    });
    std::fs::remove_file(witness_file(&both)).expect("delete witness");
    assert!(verify(&both).is_some());
    // Truncation, then the witness deleted with its directory: the next
    // start creates a new witness from the truncated store, and the chain
    // says that it did.
    let gone = tampered(&base.setup, move |c| {
        c.execute("DELETE FROM audit WHERE seq > ?1", params![keep])
            .expect("truncate");
        c.execute("DELETE FROM checkpoints WHERE seq > ?1", params![keep])
            .expect("drop checkpoints");
    });
    std::fs::remove_dir_all(witness_file(&gone).parent().expect("witness dir"))
        .expect("delete witness dir");
    drop(start_on(&gone));
    let out = verify_out(&gone, &[]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("created again"), "{out:#?}");
    // A server started on a store whose witness is gone refuses writes.
    let (_server, status, body) = start_on(&deleted);
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("holds no checkpoint")),
        "{body}"
    );
}

#[test]
fn a_chain_re_signed_with_a_planted_key_fails_against_the_trusted_key() {
    use breakglass_core::Timestamp;
    use breakglass_core::audit::Checkpoint;
    let base = base();
    let original_pub = std::fs::read_to_string(base.setup.data_dir().join("audit-signing.pub"))
        .expect("public key");
    let original_pub = original_pub.trim().to_string();
    // The trusted key kept outside the data dir, as a file.
    let outside = tempfile::tempdir().expect("tempdir");
    let pub_file = outside.path().join("node.pub");
    std::fs::write(&pub_file, format!("{original_pub}\n")).expect("write pub");

    // Rewrite seq 13 and every hash after it, drop the checkpoints, and
    // re-sign the head with a new key planted in the data dir and in the
    // witness: everything an attacker with disk access can reach.
    let planted = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let forged = tampered(&base.setup, |c| {
        c.execute("UPDATE audit SET actor = 'carol' WHERE seq = 13", [])
            .expect("update");
        let all = rows(c);
        let mut prev = all[11].hash.clone();
        for r in &all[12..] {
            let h = chain_hash(&prev, r);
            c.execute(
                "UPDATE audit SET hash = ?1 WHERE seq = ?2",
                params![h, r.seq],
            )
            .expect("rehash");
            prev = h;
        }
        c.execute("DELETE FROM checkpoints", []).expect("drop");
        // The Merkle tree is rebuilt from the forged log at the next open.
        c.execute("DELETE FROM merkle_nodes", [])
            .expect("drop tree");
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&prev);
        let cp = Checkpoint::sign(&planted, all.len() as u64, hash, Timestamp::now());
        c.execute(
            "INSERT INTO checkpoints (seq, key, time, hash, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                cp.seq as i64,
                cp.key.clone().unwrap_or_default(),
                cp.time.millis(),
                cp.hash.to_vec(),
                cp.signature.to_vec()
            ],
        )
        .expect("insert checkpoint");
    });
    let cp = {
        let conn = Connection::open(forged.db_path()).expect("open");
        let (seq, hash): (i64, Vec<u8>) = conn
            .query_row("SELECT seq, hash FROM checkpoints", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("checkpoint");
        let mut h = [0u8; 32];
        h.copy_from_slice(&hash);
        Checkpoint::sign(&planted, seq as u64, h, Timestamp::now())
    };
    std::fs::write(
        witness_file(&forged),
        format!("{}\n", serde_json::to_string(&cp).expect("json")),
    )
    .expect("forge witness");
    let data = forged.data_dir();
    std::fs::write(
        data.join("audit-signing.key"),
        hex::encode(planted.to_bytes()),
    )
    .expect("plant key");
    std::fs::write(
        data.join("audit-signing.pub"),
        format!("{}\n", hex::encode(planted.verifying_key().to_bytes())),
    )
    .expect("plant pub");

    // With the key in the data dir the forgery passes (and says so)...
    let out = verify_out(&forged, &[]);
    assert_eq!(out.code, 0, "the forgery is complete: {out:#?}");
    assert!(out.stderr.contains("no trusted key given"), "{out:#?}");
    // ...and the key given from outside catches it, as text or as a file.
    for key in [original_pub.clone(), pub_file.display().to_string()] {
        let out = verify_out(&forged, &["--key", &key]);
        assert_eq!(out.code, 1, "{out:#?}");
        assert!(
            out.stderr.contains("does not verify with a trusted key"),
            "{out:#?}"
        );
    }
    // The untouched store verifies with the trusted key.
    verify_out(&base.setup, &["--key", &original_pub]).expect_code(0);
    // audit.verify_keys does the same from the config, and a server on the
    // forged data dir refuses to start.
    let mut cfg = forged;
    cfg.audit = format!("checkpoint_interval = \"1s\"\nverify_keys = [\"{original_pub}\"]\n");
    cfg.write_config();
    let out = verify_out(&cfg, &[]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(!out.stderr.contains("no trusted key given"), "{out:#?}");
    let mut server = Server::spawn(&cfg);
    let status = server
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("a server on a planted key started:\n{}", server.stderr()));
    assert!(!status.success());
    assert!(
        server
            .stderr()
            .contains("audit.verify_keys does not list this node's key"),
        "{}",
        server.stderr()
    );
}
