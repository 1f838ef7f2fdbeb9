//! Several `breakglass serve` processes sharing one PostgreSQL database, end
//! to end: a revoke through one node cuts a `psql` session held through
//! another; `kill -9` of a node under load loses no acknowledged change and
//! its grants still end on time on the other; a PostgreSQL restart under
//! load answers 503 while down and recovers without restarting the nodes;
//! nodes starting at once on an empty database; `store copy` from an
//! embedded store keeps `seq`, hashes and checkpoints; one node at a time
//! delivers a notification sink, and another takes over after a `kill -9`.
//!
//! The store database lives on the upstream cluster the gateway tests share
//! (a fresh database per test), except for the restart test, which stops
//! and starts a cluster of its own.

mod gateway_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gateway_support::{BIN, Bg, GwOptions, Upstream, now_ms, poll, psql_cmd, run, upstream};
use serde_json::{Value, json};

/// Data dirs with their node keys made, and the `[audit]` line trusting
/// all of them.
fn node_dirs(n: usize) -> (Vec<tempfile::TempDir>, String) {
    let dirs: Vec<tempfile::TempDir> = (0..n)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let keys: Vec<String> = dirs
        .iter()
        .map(|d| {
            let key =
                breakglass_server::keys::load_or_create(&d.path().join("data")).expect("node key");
            format!(
                "\"{}\"",
                breakglass_core::audit::key_id(&key.verifying_key())
            )
        })
        .collect();
    (dirs, format!("verify_keys = [{}]\n", keys.join(", ")))
}

/// Starts `n` nodes on the database at `url`, all at the same moment.
fn start_nodes(up: &Upstream, url: &str, n: usize) -> Vec<Bg> {
    start_nodes_with(up, url, n, "")
}

/// Like [`start_nodes`], with `extra_server` lines in every `[server]`.
fn start_nodes_with(up: &Upstream, url: &str, n: usize, extra_server: &str) -> Vec<Bg> {
    let (dirs, audit) = node_dirs(n);
    std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .into_iter()
            .map(|dir| {
                std::fs::write(dir.path().join("database.url"), url).expect("write url");
                let audit = audit.clone();
                let server = format!("database_url_file = \"database.url\"\n{extra_server}");
                scope.spawn(move || Bg::start_in(dir, up, GwOptions::default(), &server, &audit))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("node start"))
            .collect()
    })
}

#[track_caller]
fn verify_offline(bg: &Bg) -> Value {
    let out = run(std::process::Command::new(BIN)
        .args(["--output", "json", "audit", "verify", "--config"])
        .arg(bg.config_path())
        .envs(gateway_support::server_env()));
    let report: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("verify output {out:#?}: {e}"));
    assert_eq!(
        out.code,
        0,
        "audit verify --config {:?}: {out:#?}",
        bg.config_path()
    );
    report
}

#[track_caller]
fn verify_online(bg: &Bg) {
    let (st, v) = bg.get("carol", "/v1/audit/verify");
    assert_eq!((st, v["ok"].as_bool()), (200, Some(true)), "{v}");
}

#[test]
fn two_nodes_start_together_and_a_revoke_on_one_cuts_a_session_on_the_other() {
    let up = upstream();
    let url = breakglass_testkit::fresh_database(&up.pg).expect("store database");
    let nodes = start_nodes(&up, &url, 2);
    let (a, b) = (&nodes[0], &nodes[1]);

    // A grant made on node A, used through node B's gateway.
    let g = a.grant("alice", "pg", "scram", "10m");
    let session = gateway_support::Spawned::spawn(&mut psql_cmd(
        b.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "select pg_sleep(60)"],
    ));
    poll(Duration::from_secs(10), || {
        b.sessions("alice", &g.id)
            .iter()
            .any(|s| s["ended_at"].is_null())
            .then_some(())
    })
    .expect("the session through node B is live");

    let (st, r) = a.post(
        "carol",
        &format!("/v1/requests/{}/revoke", g.id),
        json!({"reason": "incident over"}),
    );
    assert_eq!(st, 200, "revoke on node A: {r}");
    let revoked_at = now_ms();
    let out = session.wait(Duration::from_secs(10));
    let cut_ms = now_ms() - revoked_at;
    eprintln!("node B cut the session {cut_ms} ms after node A answered the revoke");
    assert_ne!(out.code, 0, "psql was cut: {out:#?}");
    assert!(
        out.stderr.contains("revoked") || out.stderr.contains("terminat"),
        "{out:#?}"
    );
    // The test's bound is loose (shared machine); the benchmark measures it.
    assert!(cut_ms < 2_000, "cut {cut_ms} ms after the revoke");
    let ended = b.ended_sessions(&g, 1, Duration::from_secs(10));
    assert_eq!(ended[0]["end_reason"], "revoked", "{ended:#?}");

    // Both nodes wrote one chain; each verifies it, online and offline,
    // with its own witness and recordings.
    let events = a.audit();
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(b.audit(), events, "both nodes read the same chain");
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "service.started")
        .collect();
    assert_eq!(starts.len(), 2, "one start per node");
    assert_ne!(starts[0]["details"]["node"], starts[1]["details"]["node"]);
    for n in &nodes {
        verify_online(n);
    }
}

/// Whether each node says it delivers the sink `hook`.
fn delivering(nodes: &[Bg]) -> Vec<bool> {
    nodes
        .iter()
        .map(|n| {
            let (st, v) = n.get("carol", "/v1/notify/status");
            assert_eq!(st, 200, "{v}");
            v["sinks"][0]["delivering"].as_bool().expect("delivering")
        })
        .collect()
}

/// Activates a self-served grant through `node`; its request id.
fn activate(node: &Bg, i: usize) -> String {
    let body = json!({"target": "notes", "role": "read", "duration": "1m", "reason": format!("lease {i}")});
    let (st, r) = node.post("alice", "/v1/requests", body);
    assert_eq!((st, &r["state"]), (201, &json!("active")), "{r}");
    r["id"].as_str().expect("id").to_string()
}

#[test]
fn one_node_at_a_time_delivers_a_sink_and_another_takes_over_after_a_kill9() {
    let up = upstream();
    let url = breakglass_testkit::fresh_database(&up.pg).expect("store database");
    let secrets = tempfile::tempdir().expect("tempdir");
    let secret = secrets.path().join("hook.secret");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
    let r = breakglass_testkit::receiver::Receiver::start(|_| true);
    let sink = format!(
        "\n[[notify]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n\
         secret_file = \"{}\"\nevents = [\"request.activated\"]\ntimeout = \"2s\"\n",
        r.url("/hook"),
        secret.display()
    );
    let mut nodes = start_nodes_with(&up, &url, 2, &sink);
    let activated = |r: &breakglass_testkit::receiver::Receiver| -> BTreeMap<String, usize> {
        let mut by_request = BTreeMap::new();
        for d in r.deliveries() {
            let v = d.json();
            if v["type"] == "request.activated" {
                let id = v["request"]["id"].as_str().unwrap_or_default().to_string();
                *by_request.entry(id).or_insert(0) += 1;
            }
        }
        by_request
    };
    let mut ids: Vec<String> = (0..6).map(|i| activate(&nodes[i % 2], i)).collect();
    let all = poll(Duration::from_secs(20), || {
        let got = activated(&r);
        ids.iter().all(|id| got.contains_key(id)).then_some(got)
    })
    .expect("every activation is delivered");
    // Both nodes ran the sink all along; each event still came once.
    std::thread::sleep(Duration::from_millis(1500));
    let again = activated(&r);
    assert_eq!(again, all, "nothing more arrived");
    assert!(all.values().all(|&n| n == 1), "one delivery each: {all:?}");
    let here = delivering(&nodes);
    assert_eq!(here.iter().filter(|&&h| h).count(), 1, "{here:?}");
    let holder = here.iter().position(|&h| h).expect("one holder");
    let other = 1 - holder;

    // The node that delivers dies; the other takes the lease once it has
    // run out (6 s) and delivers what happened meanwhile.
    nodes[holder].kill9();
    let t0 = Instant::now();
    let later: Vec<String> = (6..9).map(|i| activate(&nodes[other], i)).collect();
    let got = poll(Duration::from_secs(30), || {
        let got = activated(&r);
        later.iter().all(|id| got.contains_key(id)).then_some(got)
    })
    .unwrap_or_else(|| panic!("the other node never took over:\n{}", nodes[other].stderr()));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "taken over after {took:?}: before the lease could have run out"
    );
    eprintln!("the sink was taken over and delivered {took:?} after the kill");
    ids.extend(later);
    assert!(ids.iter().all(|id| got[id] >= 1));
    let (st, v) = nodes[other].get("carol", "/v1/notify/status");
    assert_eq!(st, 200);
    assert_eq!(v["sinks"][0]["delivering"], true, "{v}");
    assert_eq!(v["sinks"][0]["lag"], 0, "{v}");
}

#[test]
fn kill9_of_one_node_under_load_loses_no_acknowledged_change_and_grants_still_expire() {
    const REQUESTS: usize = 80;
    let up = upstream();
    let url = breakglass_testkit::fresh_database(&up.pg).expect("store database");
    let mut nodes = start_nodes(&up, &url, 2);
    let mut acked: Vec<(String, i64)> = Vec::new();
    for i in 0..REQUESTS {
        if i == REQUESTS / 2 {
            nodes[1].kill9();
        }
        let node = &nodes[i % 2];
        let body = json!({"target": "notes", "role": "read", "duration": "2s", "reason": format!("load {i}")});
        let Ok((201, r)) = node.call("POST", Some("alice"), "/v1/requests", Some(&body)) else {
            assert!(
                i >= REQUESTS / 2 && i % 2 == 1,
                "only the killed node fails (call {i})"
            );
            continue;
        };
        assert_eq!(r["state"], "active", "{r}");
        let expires = gateway_support::ms(&r["expires_at"]);
        acked.push((r["id"].as_str().expect("id").to_string(), expires));
    }
    assert!(
        acked.len() >= REQUESTS * 3 / 4,
        "{} acknowledged",
        acked.len()
    );
    let a = &nodes[0];
    // Every acknowledged request is there, and every grant, including those
    // only node B knew of in memory, ends on time on node A.
    let last_expiry = acked.iter().map(|(_, e)| *e).max().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(
        (last_expiry - now_ms()).max(0) as u64 + 500,
    ));
    let mut worst = 0;
    for (id, expires) in &acked {
        let (st, r) = a.get("alice", &format!("/v1/requests/{id}"));
        assert_eq!(st, 200, "acknowledged request {id} is lost: {r}");
        assert_eq!(r["state"], "expired", "{r}");
        let late = gateway_support::ms(&r["ended_at"]) - expires;
        worst = worst.max(late);
    }
    eprintln!("worst expiry lateness with one node killed: {worst} ms");
    assert!(worst < 1_000, "a grant ended {worst} ms late");
    verify_online(a);
    verify_offline(a);
}

#[test]
fn a_postgres_restart_under_load_answers_503_then_recovers_without_restarting_nodes() {
    let up = upstream();
    // The store's own cluster: this test stops and starts it.
    let mut store_pg = breakglass_testkit::PgCluster::start().expect("store cluster");
    let url = breakglass_testkit::fresh_database(&store_pg).expect("store database");
    let nodes = Arc::new(start_nodes(&up, &url, 2));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let nodes = nodes.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            let mut codes = std::collections::BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let node = &nodes[i % 2];
                i += 1;
                let body = json!({"target": "notes", "role": "read", "duration": "10m", "reason": "restart load"});
                match node.call("POST", Some("alice"), "/v1/requests", Some(&body)) {
                    Ok((st, r)) => {
                        *statuses.entry(st).or_default() += 1;
                        if st == 201 {
                            acked.push(r["id"].as_str().expect("id").to_string());
                        } else if let Some(c) = r["code"].as_str() {
                            codes.insert(c.to_string());
                        }
                    }
                    Err(e) => panic!("the node itself must keep answering: {e}"),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (acked, statuses, codes)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    store_pg.stop_server().expect("stop the store's PostgreSQL");
    let down_since = Instant::now();
    // While it is down: 503 store_unavailable, and /readyz says so.
    let (st, p) = poll(Duration::from_secs(10), || {
        match nodes[0].call("GET", Some("alice"), "/v1/requests", None) {
            Ok((503, p)) => Some((503, p)),
            _ => None,
        }
    })
    .expect("503 while the database is down");
    assert_eq!(
        (st, p["code"].as_str()),
        (503, Some("store_unavailable")),
        "{p}"
    );
    assert!(
        !p.to_string().contains("postgres://"),
        "no connection string leaks: {p}"
    );
    for n in nodes.iter() {
        let (st, _) = n
            .call("GET", None, "/readyz", None)
            .expect("readyz answers");
        assert_eq!(st, 503, "readyz while the database is down");
    }
    std::thread::sleep(Duration::from_millis(1_000));
    store_pg
        .start_again()
        .expect("start the store's PostgreSQL again");
    eprintln!("the database was down {:?}", down_since.elapsed());
    for n in nodes.iter() {
        poll(Duration::from_secs(20), || {
            matches!(n.call("GET", None, "/readyz", None), Ok((200, _))).then_some(())
        })
        .expect("the node is ready again without a restart");
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (acked, statuses, codes) = load.join().expect("load thread");
    eprintln!("statuses under restart: {statuses:?}, refusal codes {codes:?}");
    assert!(statuses.get(&503).copied().unwrap_or(0) > 0, "{statuses:?}");
    assert!(
        statuses.keys().all(|s| *s == 201 || *s == 503),
        "only successes and 503s: {statuses:?}"
    );
    assert!(codes.iter().all(|c| c == "store_unavailable"), "{codes:?}");
    // Nothing acknowledged is lost, the feed caught up on both nodes (each
    // lists every request), and the chain verifies.
    let a = &nodes[0];
    let b = &nodes[1];
    for id in &acked {
        for n in [a, b] {
            let (st, r) = n.get("alice", &format!("/v1/requests/{id}"));
            assert_eq!(st, 200, "acknowledged request {id} is lost: {r}");
        }
    }
    let body = json!({"target": "notes", "role": "read", "duration": "10m", "reason": "after"});
    for n in [a, b] {
        let (st, r) = n.post("alice", "/v1/requests", body.clone());
        assert_eq!(st, 201, "writes work again: {r}");
    }
    let events = a.audit();
    let created = events
        .iter()
        .filter(|e| e["action"] == "request.created")
        .count();
    assert_eq!(created, acked.len() + 2, "no half-written request");
    verify_online(a);
    verify_online(b);
    drop(nodes);
    drop(store_pg);
}

#[test]
fn a_node_blind_to_the_feed_cuts_its_sessions_after_the_grace_and_recovers() {
    let up = upstream();
    let mut store_pg = breakglass_testkit::PgCluster::start().expect("store cluster");
    let url = breakglass_testkit::fresh_database(&store_pg).expect("store database");
    let nodes = start_nodes_with(&up, &url, 1, "feed_loss_grace = \"1s\"\n");
    let bg = &nodes[0];
    let g = bg.grant("alice", "pg", "scram", "10m");
    let session = gateway_support::Spawned::spawn(&mut psql_cmd(
        bg.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "select pg_sleep(60)"],
    ));
    poll(Duration::from_secs(10), || {
        bg.sessions("alice", &g.id)
            .iter()
            .any(|s| s["ended_at"].is_null())
            .then_some(())
    })
    .expect("the session is live");
    // The store goes away; the upstream the session uses does not.
    // Timed from before the stop: the feed fails while PostgreSQL shuts
    // down, before `pg_ctl stop` returns.
    let down = Instant::now();
    store_pg.stop_server().expect("stop the store's PostgreSQL");
    let out = session.wait(Duration::from_secs(15));
    let blind = down.elapsed();
    eprintln!("the session was cut {blind:?} after the store went down");
    assert_ne!(out.code, 0, "psql was cut: {out:#?}");
    // The grace (1 s) runs from the feed's last read, at most one poll
    // (200 ms) before the store went away.
    assert!(
        blind >= Duration::from_millis(700),
        "not before the grace: {blind:?}"
    );
    assert!(
        blind < Duration::from_secs(5),
        "cut {blind:?} after the store went down"
    );
    // No new session while blind.
    let refused = run(&mut psql_cmd(
        bg.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "select 1"],
    ));
    assert_ne!(refused.code, 0, "{refused:#?}");
    store_pg
        .start_again()
        .expect("start the store's PostgreSQL again");
    poll(Duration::from_secs(20), || {
        matches!(bg.call("GET", None, "/readyz", None), Ok((200, _))).then_some(())
    })
    .expect("ready again without a restart");
    // The session's end reaches the log once the store is back.
    let ended = bg.ended_sessions(&g, 1, Duration::from_secs(10));
    assert_eq!(ended[0]["end_reason"], "feed_lost", "{ended:#?}");
    let again = run(&mut psql_cmd(
        bg.gw_port,
        "alice",
        &g.token,
        "pg",
        &["-c", "select 'back'"],
    ));
    assert_eq!(again.code, 0, "{again:#?}");
    verify_online(bg);
    drop(nodes);
    drop(store_pg);
}

#[test]
fn store_copy_keeps_seq_hashes_and_checkpoints() {
    let up = upstream();
    // An embedded store with some history and at least one checkpoint.
    let mut single = Bg::start(&up, GwOptions::default());
    let g = single.grant("alice", "notes", "read", "10m");
    let (st, _) = single.post(
        "carol",
        &format!("/v1/requests/{}/revoke", g.id),
        json!({"reason": "done"}),
    );
    assert_eq!(st, 200);
    single.grant("bob", "notes", "read", "10m");
    poll(Duration::from_secs(10), || {
        let (_, v) = single.get("carol", "/v1/audit/verify");
        (v["checkpoints"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .expect("a checkpoint");
    single.kill9();
    let before = verify_offline(&single);
    assert_eq!(before["ok"], true, "{before}");

    let url = breakglass_testkit::fresh_database(&up.pg).expect("target database");
    let copy = |url: &str| {
        run(std::process::Command::new(BIN)
            .args(["--output", "json", "store", "copy", "--from"])
            .arg(single.dir.path().join("data"))
            .args(["--to-env", "BG_TEST_STORE_URL"])
            .env("BG_TEST_STORE_URL", url))
    };
    let out = copy(&url);
    assert_eq!(out.code, 0, "{out:#?}");
    let report: Value = serde_json::from_str(&out.stdout).expect("copy report");
    assert_eq!(report["head_seq"], before["head_seq"], "{report}");
    assert_eq!(report["head_hash"], before["head_hash"], "{report}");
    assert!(
        !out.stdout.contains(&url) && !out.stderr.contains(&url),
        "the URL is never printed"
    );
    // A second copy into the same (no longer empty) database is refused.
    let again = copy(&url);
    assert_ne!(again.code, 0, "{again:#?}");
    assert!(again.stderr.contains("empty database"), "{again:#?}");

    // The same node, now on PostgreSQL: the offline verification of the
    // copy agrees with the original, head, events and checkpoints alike.
    let config = std::fs::read_to_string(single.config_path()).expect("config");
    let key = breakglass_server::keys::load_public(&single.dir.path().join("data")).expect("key");
    let config = config
        .replacen(
            "data_dir = \"data\"\n",
            "data_dir = \"data\"\ndatabase_url_file = \"database.url\"\n",
            1,
        )
        .replacen(
            "[audit]\n",
            &format!(
                "[audit]\nverify_keys = [\"{}\"]\n",
                breakglass_core::audit::key_id(&key)
            ),
            1,
        );
    std::fs::write(single.dir.path().join("database.url"), &url).expect("url file");
    std::fs::write(single.config_path(), config).expect("config");
    let after = verify_offline(&single);
    for field in ["ok", "events", "checkpoints", "head_seq", "head_hash"] {
        assert_eq!(after[field], before[field], "{field}: {after} vs {before}");
    }
}

/// `serve` with `server_lines` in `[server]` must stop on its own; returns
/// its stderr.
fn serve_refuses(server_lines: &str, url: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("policy.cedar"),
        "@id(\"p\")\n@approvals(\"0\")\n@max_duration(\"1h\")\npermit (principal, action == Action::\"request\", resource);\n",
    )
    .expect("policy");
    std::fs::write(dir.path().join("database.url"), url).expect("url");
    let port = gateway_support::free_port();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n{server_lines}\n[policy]\nfile = \"policy.cedar\"\n"
        ),
    )
    .expect("config");
    let out = run(std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.path().join("config.toml")));
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        !out.stderr.contains(url),
        "the URL is never printed: {out:#?}"
    );
    out.stderr
}

#[test]
fn a_shared_store_needs_every_nodes_key_and_the_url_stays_out_of_the_config() {
    let up = upstream();
    let url = breakglass_testkit::fresh_database(&up.pg).expect("store database");
    let err = serve_refuses("database_url_file = \"database.url\"\n", &url);
    assert!(
        err.contains("audit.verify_keys") && err.contains("audit-signing.pub"),
        "{err}"
    );
    let err = serve_refuses(&format!("database_url = \"{url}\"\n"), "unused");
    assert!(err.contains("server.database_url_env"), "{err}");
    assert!(
        !err.contains(&url),
        "the URL in the config is not echoed: {err}"
    );
    let err = serve_refuses("database_url_env = \"BG_TEST_NO_SUCH_VAR\"\n", &url);
    assert!(err.contains("BG_TEST_NO_SUCH_VAR is not set"), "{err}");
}
