//! The crash test of DESIGN §9: `kill -9` at random moments under load,
//! repeated, on one data directory. After every restart:
//!
//! - every acknowledged change (a 2xx answer) is still there: the request at
//!   least at the acknowledged version, in a state consistent with it, and
//!   the audit events of every acknowledged change present;
//! - every request's state has its audit event (transition and event commit
//!   together, or neither);
//! - no grant is `active` past `expires_at`, checked right after `/readyz`
//!   (overdue grants end before the server serves anything), and no
//!   credential of an ended grant works;
//! - the chain verifies (`GET /v1/audit/verify`, and `breakglass audit
//!   verify` offline between kill and restart and at the end).
//!
//! The kill moments and the client's choices come from a seed printed at the
//! start (set `BREAKGLASS_CRASH_SEED` to replay them; thread interleavings
//! are up to the OS).
//!
//! Live gateway sessions are anchored in the audit chain while they run
//! (`session.progress`): after a `kill -9`, a recording rewritten, shortened
//! or deleted on disk is refused at restart and `audit verify` names the
//! session.

mod common;
mod gateway_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Api, Server, Setup, now_ms, token};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const THREADS: usize = 16;
/// The server is killed this long after it is ready, at random.
const KILL_AFTER_MS: (u64, u64) = (300, 1500);
/// An active grant may show as active this long past `expires_at` in a
/// listing taken while the server runs (the scheduler's lateness, on a
/// loaded 2-core machine with a debug build). Grants overdue before the
/// server started get no slack at all.
const SCHEDULER_SLACK_MS: i64 = 1000;
/// Credentials checked per round.
const CREDENTIAL_SAMPLE: usize = 40;

/// splitmix64: small, seedable, good enough to pick test actions.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// What the server acknowledged about one request.
#[derive(Debug, Clone, Default)]
struct Ack {
    version: u64,
    state: String,
    expires_at: Option<i64>,
    /// Audit actions acknowledged for this request, with counts.
    actions: HashMap<String, u32>,
}

#[derive(Debug, Clone)]
struct Cred {
    request_id: String,
    target: String,
    token: String,
}

#[derive(Default)]
struct Record {
    acks: Mutex<HashMap<String, Ack>>,
    creds: Mutex<Vec<Cred>>,
    problems: Mutex<Vec<String>>,
    acked_changes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Record {
    /// Records an acknowledged request object and the audit actions the
    /// change that produced it must have written.
    fn ack(&self, r: &Value, actions: &[&str]) {
        let id = r["id"].as_str().expect("id").to_string();
        let version = r["version"].as_u64().expect("version");
        let state = r["state"].as_str().expect("state").to_string();
        let mut acks = lock(&self.acks);
        let a = acks.entry(id).or_default();
        if version >= a.version {
            a.version = version;
            a.state = state;
            a.expires_at = r["expires_at"]
                .as_str()
                .map(|_| common::ms(&r["expires_at"]));
        }
        for act in actions {
            *a.actions.entry((*act).to_string()).or_default() += 1;
        }
        self.acked_changes.fetch_add(1, Ordering::Relaxed);
    }

    fn ack_action(&self, id: &str, action: &str) {
        let mut acks = lock(&self.acks);
        let a = acks.entry(id.to_string()).or_default();
        *a.actions.entry(action.to_string()).or_default() += 1;
        self.acked_changes.fetch_add(1, Ordering::Relaxed);
    }

    fn problem(&self, p: String) {
        lock(&self.problems).push(p);
    }
}

/// Server gone (killed): stop this lifecycle.
struct Gone;

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn call(&self, who: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), Gone> {
        common::call(
            &self.agent,
            &self.base,
            Some(&token(who)),
            "POST",
            path,
            body.as_ref(),
        )
        .map_err(|_| Gone)
    }
}

/// One lifecycle with random choices; every 2xx is recorded.
fn lifecycle(c: &Client, rng: &mut Rng, rec: &Record) -> Result<(), Gone> {
    let requester = rng.pick(&["alice", "erin", "lead"]);
    let drill = rng.chance(50);
    let duration = if drill || rng.chance(60) {
        format!("{}s", 1 + rng.below(3))
    } else {
        "10m".to_string()
    };
    let target = if drill { "drill-db" } else { "prod-db" };
    let (st, r) = c.call(
        requester,
        "/v1/requests",
        Some(
            json!({"target": target, "role": "read", "duration": duration, "reason": "crash test"}),
        ),
    )?;
    if st != 201 {
        rec.problem(format!("create answered {st}: {r}"));
        return Ok(());
    }
    let id = r["id"].as_str().expect("id").to_string();
    let created: &[&str] = if drill {
        &["request.created", "request.activated"]
    } else {
        &["request.created"]
    };
    rec.ack(&r, created);
    let expect_state = if drill { "active" } else { "pending" };
    if r["state"] != expect_state {
        rec.problem(format!("new request is not {expect_state}: {r}"));
    }

    if !drill {
        let roll = rng.below(100);
        let approver = rng.pick(&["bob", "carol"]);
        if roll < 8 {
            return Ok(()); // left pending
        }
        if roll < 14 {
            let (st, r) = c.call(
                approver,
                &format!("/v1/requests/{id}/deny"),
                Some(json!({"reason": "no"})),
            )?;
            match st {
                200 => rec.ack(&r, &["request.denied"]),
                _ => rec.problem(format!("deny answered {st}: {r}")),
            }
            return Ok(());
        }
        if roll < 20 {
            let (st, r) = c.call(requester, &format!("/v1/requests/{id}/cancel"), None)?;
            match st {
                200 => rec.ack(&r, &["request.cancelled"]),
                _ => rec.problem(format!("cancel answered {st}: {r}")),
            }
            return Ok(());
        }
        let (st, r) = c.call(approver, &format!("/v1/requests/{id}/approve"), None)?;
        match st {
            200 => rec.ack(&r, &["request.approved", "request.activated"]),
            _ => {
                rec.problem(format!("approve answered {st}: {r}"));
                return Ok(());
            }
        }
    }

    if rng.chance(70) {
        let (st, r) = c.call(requester, &format!("/v1/requests/{id}/credentials"), None)?;
        match st {
            200 => {
                rec.ack_action(&id, "credentials.issued");
                lock(&rec.creds).push(Cred {
                    request_id: id.clone(),
                    target: r["target"].as_str().expect("target").to_string(),
                    token: r["token"].as_str().expect("token").to_string(),
                });
            }
            // A 1-3s grant may have ended already.
            409 if r["code"] == "wrong_state" => {}
            _ => rec.problem(format!("credentials answered {st}: {r}")),
        }
    }
    if rng.chance(40) {
        let who = if rng.chance(50) { requester } else { "dave" };
        let (st, r) = c.call(
            who,
            &format!("/v1/requests/{id}/revoke"),
            Some(json!({"reason": "crash test"})),
        )?;
        match st {
            200 => rec.ack(&r, &["request.revoked"]),
            409 if r["code"] == "wrong_state" => {}
            _ => rec.problem(format!("revoke answered {st}: {r}")),
        }
    }
    Ok(())
}

fn worker(base: String, mut rng: Rng, stop: Arc<AtomicBool>, rec: Arc<Record>) {
    let c = Client {
        agent: common::agent(Duration::from_secs(10)),
        base,
    };
    while !stop.load(Ordering::Relaxed) {
        if lifecycle(&c, &mut rng, &rec).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn seed() -> u64 {
    match std::env::var("BREAKGLASS_CRASH_SEED") {
        Ok(s) => s.trim().parse().expect("BREAKGLASS_CRASH_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    }
}

/// The checks after a restart. `spawned_ms` is when the server process was
/// started: anything that expired before it must have been ended before
/// `/readyz` said yes.
fn check_after_restart(api: &Api, rec: &Record, spawned_ms: i64, seed: u64) -> u64 {
    let listed_ms = now_ms();
    let requests = api.all_requests("dave");
    let by_id: HashMap<&str, &Value> = requests
        .iter()
        .map(|r| (r["id"].as_str().expect("id"), r))
        .collect();
    assert_eq!(
        by_id.len(),
        requests.len(),
        "seed {seed}: duplicate ids in the listing"
    );

    // No grant outlives its expiry.
    for r in &requests {
        if r["state"] == "active" {
            let exp = common::ms(&r["expires_at"]);
            assert!(
                exp > spawned_ms,
                "seed {seed}: active {} ms past expires_at although it expired before the restart: {r}",
                spawned_ms - exp
            );
            assert!(
                exp > listed_ms - SCHEDULER_SLACK_MS,
                "seed {seed}: active {} ms past expires_at: {r}",
                listed_ms - exp
            );
        }
        if r["state"] == "expired" {
            let (exp, ended) = (common::ms(&r["expires_at"]), common::ms(&r["ended_at"]));
            assert!(ended >= exp, "seed {seed}: expired early: {r}");
        }
    }

    // Every acknowledged change survived.
    let acks = lock(&rec.acks).clone();
    for (id, a) in &acks {
        let r = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("seed {seed}: acknowledged request {id} is lost ({a:?})"));
        let version = r["version"].as_u64().expect("version");
        let state = r["state"].as_str().expect("state");
        assert!(
            version >= a.version,
            "seed {seed}: {id} went back from acknowledged version {} to {version}: {r}",
            a.version
        );
        let final_state = matches!(
            a.state.as_str(),
            "denied" | "cancelled" | "timed_out" | "expired" | "revoked"
        );
        let consistent = match a.state.as_str() {
            _ if version == a.version => state == a.state,
            // A final state never changes; the automated review may close
            // an ended grant (a later version, same state).
            _ if final_state => state == a.state,
            "pending" => true,
            "active" => matches!(state, "active" | "expired" | "revoked"),
            _ => false,
        };
        assert!(
            consistent,
            "seed {seed}: {id} acknowledged {} at version {}, now {state} at {version}: {r}",
            a.state, a.version
        );
    }

    // The audit log: contiguous, and every state has its event.
    let events = api.all_audit("dave");
    let mut actions: HashMap<&str, HashMap<&str, u32>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "seed {seed}: audit seq not contiguous"
        );
        if let Some(rid) = e["request_id"].as_str() {
            *actions
                .entry(rid)
                .or_default()
                .entry(e["action"].as_str().expect("action"))
                .or_default() += 1;
        }
    }
    for (id, a) in &acks {
        let have = actions.get(id.as_str());
        for (action, n) in &a.actions {
            let got = have
                .and_then(|h| h.get(action.as_str()))
                .copied()
                .unwrap_or(0);
            assert!(
                got >= *n,
                "seed {seed}: {id}: {n} acknowledged {action} but {got} in the audit log"
            );
        }
    }
    for r in &requests {
        let id = r["id"].as_str().expect("id");
        let have = actions.get(id).cloned().unwrap_or_default();
        let count = |a: &str| have.get(a).copied().unwrap_or(0);
        assert_eq!(count("request.created"), 1, "seed {seed}: {r} / {have:?}");
        let needs = match r["state"].as_str().expect("state") {
            "pending" => None,
            "active" => Some("request.activated"),
            "denied" => Some("request.denied"),
            "cancelled" => Some("request.cancelled"),
            "timed_out" => Some("request.timed_out"),
            "expired" => Some("request.expired"),
            "revoked" => Some("request.revoked"),
            other => panic!("seed {seed}: unknown state {other}"),
        };
        if let Some(a) = needs {
            assert_eq!(
                count(a),
                1,
                "seed {seed}: {id} is {} without one {a}: {have:?}",
                r["state"]
            );
        }
        let ended = count("request.expired") + count("request.revoked");
        assert!(ended <= 1, "seed {seed}: {id} ended twice: {have:?}");
    }

    // Credentials of ended grants do not work; those of live ones do.
    let creds = lock(&rec.creds).clone();
    let step = (creds.len() / CREDENTIAL_SAMPLE).max(1);
    for c in creds.iter().step_by(step) {
        let before = now_ms();
        let (st, v) = api.post(
            common::SERVICE,
            "/v1/credentials/verify",
            Some(json!({"token": c.token, "target": c.target})),
        );
        assert_eq!(st, 200, "{v}");
        let (_, r) = api.get("dave", &format!("/v1/requests/{}", c.request_id));
        let exp = common::ms(&r["expires_at"]);
        let ended = r["ended_at"].as_str().map(|_| common::ms(&r["ended_at"]));
        if v["active"] == true {
            // The grant may end between the check and the read above, but
            // it must have been live when the check began.
            assert!(
                v["request_id"] == c.request_id.as_str()
                    && exp > before
                    && ended.is_none_or(|e| e >= before),
                "seed {seed}: a credential of {} worked, but the grant is {r}: {v}",
                c.request_id
            );
        } else if r["state"] == "active" && exp > now_ms() + 100 {
            panic!("seed {seed}: the credential of live grant {r} is refused: {v}");
        }
    }

    let (st, v) = api.get("dave", "/v1/audit/verify");
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["ok"], true,
        "seed {seed}: the chain does not verify after a crash: {v}"
    );
    events.len() as u64
}

#[test]
fn kill_9_under_load_loses_nothing() {
    let seed = seed();
    println!("crash test seed: {seed} (replay with BREAKGLASS_CRASH_SEED={seed})");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut setup = Setup::new();
    let config = setup.config_path().display().to_string();
    let rec = Arc::new(Record::default());
    let mut overdue_total = 0u64;

    for round in 0..ROUNDS {
        setup.new_port();
        let spawned_ms = now_ms();
        let mut server = Server::start(&setup);
        if round == 0 {
            // A second server on the same data dir is refused at once and
            // told which process holds it.
            let out = setup.cli(None, &["serve", "--config", &config]);
            assert_ne!(out.code, 0, "{out:#?}");
            assert!(
                out.stderr
                    .contains("held by a running `breakglass serve` (pid "),
                "{out:#?}"
            );
        }
        let api = Api::new(&setup.url());
        let events = check_after_restart(&api, &rec, spawned_ms, seed);
        let problems = lock(&rec.problems).clone();
        assert!(
            problems.is_empty(),
            "seed {seed}: unexpected answers: {problems:#?}"
        );
        println!(
            "round {round}: ready; {} requests acknowledged, {} changes, {events} audit events",
            lock(&rec.acks).len(),
            rec.acked_changes.load(Ordering::Relaxed)
        );

        // Load, then kill -9 at a random moment.
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..THREADS)
            .map(|i| {
                let (url, stop, rec) = (setup.url(), stop.clone(), rec.clone());
                let thread_rng = Rng(rng.next() ^ (i as u64));
                std::thread::spawn(move || worker(url, thread_rng, stop, rec))
            })
            .collect();
        let kill_after = KILL_AFTER_MS.0 + rng.below(KILL_AFTER_MS.1 - KILL_AFTER_MS.0);
        std::thread::sleep(Duration::from_millis(kill_after));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("worker thread");
        }

        // The crashed store verifies offline.
        let out = setup.cli(None, &["audit", "verify", "--config", &config]);
        assert_eq!(
            out.code, 0,
            "seed {seed}: offline verify after kill -9: {out:#?}"
        );

        // Let the soonest acknowledged grant still running at the kill
        // expire while the server is down, so the restart has one to end.
        let now = now_ms();
        let soonest = lock(&rec.acks)
            .values()
            .filter(|a| a.state == "active")
            .filter_map(|a| a.expires_at)
            .filter(|&e| e > now)
            .min();
        if let Some(e) = soonest.filter(|&e| e - now < 3500) {
            std::thread::sleep(Duration::from_millis((e - now + 50) as u64));
        }
    }

    // A last restart and its checks, then a graceful stop and offline verify.
    setup.new_port();
    let spawned_ms = now_ms();
    let mut server = Server::start(&setup);
    let api = Api::new(&setup.url());
    check_after_restart(&api, &rec, spawned_ms, seed);
    // The answers of the last load round are checked too.
    let problems = lock(&rec.problems).clone();
    assert!(
        problems.is_empty(),
        "seed {seed}: unexpected answers: {problems:#?}"
    );
    for e in api.all_audit("dave") {
        if e["action"] == "service.started" {
            overdue_total += e["details"]["overdue_ended"].as_u64().unwrap_or(0);
        }
    }
    let status = server
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit on SIGTERM; stderr:\n{}", server.stderr()));
    assert!(status.success(), "{status}");
    let out = setup.cli(None, &["audit", "verify", "--config", &config]);
    assert_eq!(out.code, 0, "seed {seed}: {out:#?}");

    let changes = rec.acked_changes.load(Ordering::Relaxed);
    println!(
        "{ROUNDS} crashes, {changes} acknowledged changes, {overdue_total} grants ended overdue at restart, {:?}",
        started.elapsed()
    );
    assert!(
        changes >= 100,
        "seed {seed}: too little load to mean anything: {changes}"
    );
    assert!(
        overdue_total > 0,
        "seed {seed}: no restart had an overdue grant to end; the test did not exercise recovery"
    );
}

/// The chain hash of a recording entry (the documented rule, written again
/// here): SHA-256 of the previous hash and the entry's canonical JSON
/// without its `hash` member.
fn rechain(lines: &[Value]) -> String {
    use sha2::{Digest, Sha256};
    let mut prev = [0u8; 32];
    let mut out = String::new();
    for v in lines {
        let mut v = v.clone();
        v.as_object_mut().expect("entry").remove("hash");
        let mut h = Sha256::new();
        h.update(prev);
        h.update(breakglass_core::audit::canonical_json(&v).as_bytes());
        prev = h.finalize().into();
        v["hash"] = Value::String(hex::encode(prev));
        out.push_str(&serde_json::to_string(&v).expect("json"));
        out.push('\n');
    }
    out
}

/// The live sessions of grant `g`, once each has a `session.progress`
/// anchoring at least `entries` recording entries.
fn anchored_sessions(
    bg: &gateway_support::Bg,
    request_id: &str,
    n: usize,
    entries: u64,
) -> Vec<(String, u64)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let audit = bg.audit();
        let started: Vec<String> = audit
            .iter()
            .filter(|e| e["action"] == "session.started" && e["request_id"] == request_id)
            .filter_map(|e| e["details"]["session_id"].as_str().map(str::to_string))
            .collect();
        let anchored: Vec<(String, u64)> = started
            .iter()
            .filter_map(|sid| {
                audit
                    .iter()
                    .filter(|e| {
                        e["action"] == "session.progress"
                            && e["details"]["session_id"] == sid.as_str()
                    })
                    .filter_map(|e| e["details"]["recording_entries"].as_u64())
                    .max()
                    .filter(|&a| a >= entries)
                    .map(|a| (sid.clone(), a))
            })
            .collect();
        if started.len() == n && anchored.len() == n {
            return anchored;
        }
        assert!(
            Instant::now() < deadline,
            "{n} sessions anchored at {entries} entries expected: {anchored:?} of {started:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Offline `audit verify` of a gateway setup: its exit code and stderr.
fn verify_gateway(bg: &gateway_support::Bg) -> (i32, String) {
    let out = bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &bg.config_path().display().to_string(),
        ],
    );
    (out.code, out.stderr)
}

/// Starts a server on `bg`'s config and data after a `kill -9`, without
/// requiring it to be ready (a broken chain makes `/readyz` answer 503).
fn restart_any(bg: &gateway_support::Bg) -> Server {
    let config = bg.config_path().display().to_string();
    let mut s = Server::spawn_args_env(
        &["serve", "--config", &config],
        bg.dir.path(),
        &bg.url(),
        &gateway_support::server_env(),
    );
    s.wait_answer();
    s
}

/// Opens `n` sessions of one grant, runs statements in each, and waits
/// until each is anchored past its statements; then `kill -9`.
fn live_sessions_then_kill9(
    n: usize,
) -> (
    Arc<gateway_support::Upstream>,
    gateway_support::Bg,
    Vec<(String, u64)>,
) {
    use gateway_support::{Bg, GwOptions, pg_config, pg_connect, runtime, upstream};
    let up = upstream();
    let mut bg = Bg::start(&up, GwOptions::default());
    let g = bg.grant("alice", "pg", "rw", "10m");
    let rt = runtime();
    let mut clients = Vec::new();
    for i in 0..n {
        let (c, _msgs) = rt
            .block_on(pg_connect(&pg_config(bg.gw_port, "alice", "pg", &g.token)))
            .expect("connect");
        for k in 0..3 {
            rt.block_on(c.simple_query(&format!("select {i}, {k}, 'anchor me'")))
                .expect("query");
        }
        clients.push(c);
    }
    // The header, three statements and (most of) their outcomes.
    let anchored = anchored_sessions(&bg, &g.id, n, 6);
    bg.kill9();
    drop(clients);
    (up, bg, anchored)
}

#[test]
fn a_recording_rewritten_or_shortened_after_kill_9_is_refused() {
    let (_up, bg, anchored) = live_sessions_then_kill9(2);
    let (rewritten, _) = &anchored[0];
    let (shortened, at) = &anchored[1];
    // Before any restart, offline verification reports both sessions as
    // started without an end.
    let (code, err) = verify_gateway(&bg);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has no session.ended"), "{err}");
    assert!(
        err.contains(rewritten.as_str()) || err.contains(shortened.as_str()),
        "{err}"
    );

    // Rewrite one recording's statement and its whole chain, so that the
    // recording verifies on its own.
    let dir = bg.recordings_dir();
    let mut lines = bg.recording(rewritten);
    let q = lines
        .iter_mut()
        .find(|e| e["kind"] == "query")
        .expect("a query entry");
    q["text"] = json!("select 'harmless'");
    std::fs::write(dir.join(format!("{rewritten}.jsonl")), rechain(&lines)).expect("rewrite");
    // Cut the other one below what was anchored (a valid, shorter chain).
    let lines = bg.recording(shortened);
    let keep = (*at as usize - 1).min(lines.len());
    std::fs::write(
        dir.join(format!("{shortened}.jsonl")),
        rechain(&lines[..keep]),
    )
    .expect("shorten");

    let mut server = restart_any(&bg);
    // Recovery refused both, with a reason of its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let audit = bg.audit();
        let ended: Vec<Value> = audit
            .iter()
            .filter(|e| e["action"] == "session.ended")
            .cloned()
            .collect();
        if ended.len() >= 2 || Instant::now() > deadline {
            break ended;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for sid in [rewritten, shortened] {
        let e = ended
            .iter()
            .find(|e| e["details"]["session_id"] == sid.as_str())
            .unwrap_or_else(|| panic!("no session.ended for {sid}: {ended:#?}"));
        assert_eq!(e["details"]["end_reason"], "recording_mismatch", "{e}");
    }
    // The rewritten recording was left as it was found.
    assert!(
        !bg.recording(rewritten).iter().any(|e| e["kind"] == "end"),
        "the refused recording was appended to"
    );
    // Online verification names the first of them.
    let (st, v) = bg.get("carol", "/v1/audit/verify");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    let reason = v["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(rewritten.as_str()) && reason.contains("refused at recovery"),
        "{v}"
    );
    assert!(server.terminate(Duration::from_secs(10)).is_some());
    let (code, err) = verify_gateway(&bg);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(rewritten.as_str()), "{err}");
}

#[test]
fn a_recording_deleted_with_its_marker_after_kill_9_is_reported() {
    let (_up, bg, anchored) = live_sessions_then_kill9(1);
    let (sid, _) = &anchored[0];
    let dir = bg.recordings_dir();
    std::fs::remove_file(dir.join(format!("{sid}.jsonl"))).expect("delete recording");
    std::fs::remove_file(dir.join(format!("{sid}.open"))).expect("delete marker");
    let (code, err) = verify_gateway(&bg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(sid.as_str()) && err.contains("has no session.ended"),
        "{err}"
    );
    // A restart finds nothing to close; the session stays reported.
    let mut server = restart_any(&bg);
    let (st, v) = bg.get("carol", "/v1/audit/verify");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains(sid.as_str())),
        "{v}"
    );
    assert!(server.terminate(Duration::from_secs(10)).is_some());
    let (code, err) = verify_gateway(&bg);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(sid.as_str()), "{err}");
}
