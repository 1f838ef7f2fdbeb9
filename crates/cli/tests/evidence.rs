//! Evidence bundles and consistency proofs end to end: real sessions
//! through the PostgreSQL gateway with the real `psql`, the bundle fetched
//! with `breakglass evidence ID`, verified offline with `breakglass
//! evidence verify` (the bundle and the public key, nothing else), then
//! tampered with in every part: each tamper fails at the place it was
//! made. `audit verify --since` proves the log only grew since a witness's
//! checkpoint, and fails for a forked history and for a damaged tree.

mod gateway_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use breakglass_core::audit::Checkpoint;
use gateway_support::{Bg, GwOptions, Out, psql, upstream};
use serde_json::Value;

fn pubkey(bg: &Bg) -> String {
    bg.dir
        .path()
        .join("data/audit-signing.pub")
        .display()
        .to_string()
}

fn witness(bg: &Bg) -> PathBuf {
    bg.dir.path().join("data.witness/checkpoints.jsonl")
}

fn write(bg: &Bg, name: &str, v: &Value) -> String {
    let path = bg.dir.path().join(name);
    std::fs::write(&path, serde_json::to_vec(v).expect("json")).expect("write bundle");
    path.display().to_string()
}

fn verify(bg: &Bg, file: &str, key: &str) -> Out {
    bg.cli(None, &["evidence", "verify", file, "--key", key])
}

/// Verifies a tampered copy: exit 1 and `want` in what it says.
#[track_caller]
fn fails_at(bg: &Bg, name: &str, bundle: &Value, want: &str) {
    let file = write(bg, &format!("{name}.json"), bundle);
    let out = verify(bg, &file, &pubkey(bg));
    assert_eq!(out.code, 1, "{name}: {out:#?}");
    assert!(
        out.stdout.contains(want) && out.stderr.contains("does not verify"),
        "{name}: expected {want:?} in {out:#?}"
    );
    eprintln!("{name}: {}", out.stderr.trim());
}

fn event_index(bundle: &Value, action: &str) -> usize {
    bundle["events"]
        .as_array()
        .expect("events")
        .iter()
        .position(|e| e["action"] == action)
        .unwrap_or_else(|| panic!("no {action} event"))
}

#[test]
fn bundles_verify_offline_and_name_every_tamper() {
    let up = upstream();
    let bg = Bg::start(
        &up,
        GwOptions {
            strict_recording: true,
            ..GwOptions::default()
        },
    );
    let g = bg.grant("alice", "pg", "rw", "10m");
    for text in ["select 'first session'", "select 'second session'"] {
        let out = psql(bg.gw_port, "alice", &g.token, "pg", &["-c", text]);
        out.ok();
    }
    let sessions = bg.ended_sessions(&g, 2, Duration::from_secs(10));
    assert_eq!(sessions.len(), 2);

    // Who may fetch it: who may see the request (and so its recordings).
    let (st, _) = bg.get("bob", &format!("/v1/requests/{}/evidence", g.id));
    assert_eq!(st, 404, "bob may not see alice's request");
    let (st, by_admin) = bg.get("carol", &format!("/v1/requests/{}/evidence", g.id));
    assert_eq!(st, 200, "an admin may: {by_admin}");

    let out = bg.cli(Some("alice"), &["evidence", &g.id[..8]]);
    let bundle: Value = serde_json::from_str(&out.ok().stdout).expect("the bundle is JSON");
    assert_eq!(bundle["format"], "breakglass-evidence/1");
    assert_eq!(bundle["request_id"], g.id.as_str());
    assert_eq!(
        bundle["recordings"].as_array().expect("recordings").len(),
        2
    );
    let cp: Checkpoint =
        serde_json::from_value(bundle["checkpoint"].clone()).expect("a checkpoint");
    assert!(cp.root.is_some(), "the checkpoint signs a tree head");
    let events = bundle["events"].as_array().expect("events");
    // created, activated, credentials, 2 x (started, ended) at least.
    assert!(events.len() >= 7, "{events:#?}");
    assert!(events.iter().all(|e| e["request_id"] == g.id.as_str()));

    let file = write(&bg, "bundle.json", &bundle);
    let out = verify(&bg, &file, &pubkey(&bg));
    assert!(
        out.ok().stdout.contains("Evidence OK") && out.stdout.contains("2 recordings bound"),
        "{out:#?}"
    );
    // The verifier needs nothing of the service: the service is gone.
    let key = std::fs::read_to_string(pubkey(&bg)).expect("public key");
    let json = bg.cli(
        None,
        &[
            "--output",
            "json",
            "evidence",
            "verify",
            &file,
            "--key",
            key.trim(),
        ],
    );
    let report: Value = serde_json::from_str(&json.ok().stdout).expect("report");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["recordings"], 2);

    let ended = event_index(&bundle, "session.ended");
    let ended_seq = bundle["events"][ended]["seq"].as_u64().expect("seq");
    let created_seq = bundle["events"][0]["seq"].as_u64().expect("seq");

    // An event: its details altered.
    let mut b = bundle.clone();
    b["events"][0]["details"] = Value::String(
        b["events"][0]["details"]
            .as_str()
            .expect("details")
            .replace("gateway test", "nothing to see"),
    );
    fails_at(
        &bg,
        "event",
        &b,
        &format!("event seq {created_seq}: its content"),
    );

    // An event altered with its leaf hash recomputed: its proof fails.
    let mut b = bundle.clone();
    let e = &mut b["events"][0];
    e["actor"] = Value::String("mallory".into());
    let leaf = breakglass_core::audit::canonical_bytes(
        e["seq"].as_u64().expect("seq"),
        breakglass_core::Timestamp::parse_rfc3339(e["time"].as_str().expect("time")).expect("time"),
        "mallory",
        e["action"].as_str().expect("action"),
        e["request_id"].as_str(),
        e["details"].as_str().expect("details"),
    );
    e["leaf_hash"] = Value::String(hex::encode(breakglass_core::merkle::leaf_hash(&leaf)));
    fails_at(
        &bg,
        "event-and-leaf",
        &b,
        &format!("proof of event seq {created_seq}"),
    );

    // The proof: one hash flipped.
    let mut b = bundle.clone();
    let p = b["events"][ended]["proof"][0]
        .as_str()
        .expect("proof")
        .to_string();
    let flipped = format!("{}{}", if p.starts_with('0') { "1" } else { "0" }, &p[1..]);
    b["events"][ended]["proof"][0] = Value::String(flipped);
    fails_at(&bg, "proof", &b, &format!("proof of event seq {ended_seq}"));

    // A recording line: the query text of entry 2 changed.
    let mut b = bundle.clone();
    let rec = &mut b["recordings"][0];
    let sid = rec["session_id"].as_str().expect("sid").to_string();
    let content = rec["content"].as_str().expect("content").to_string();
    let line2 = content.lines().nth(1).expect("a second entry").to_string();
    let altered = line2.replace("select '", "select 'not ");
    assert_ne!(altered, line2, "entry 2 is the query: {line2}");
    rec["content"] = Value::String(content.replacen(&line2, &altered, 1));
    fails_at(
        &bg,
        "recording-line",
        &b,
        &format!("recording of session {sid}, line 2"),
    );

    // A recording cut short (its chain holds, its end does not).
    let mut b = bundle.clone();
    let rec = &mut b["recordings"][1];
    let sid1 = rec["session_id"].as_str().expect("sid").to_string();
    let content = rec["content"].as_str().expect("content").to_string();
    let kept: String = content
        .lines()
        .take(content.lines().count() - 1)
        .map(|l| format!("{l}\n"))
        .collect();
    rec["content"] = Value::String(kept);
    fails_at(
        &bg,
        "recording-cut",
        &b,
        &format!("recording of session {sid1}: its final hash differs"),
    );

    // A recording left out.
    let mut b = bundle.clone();
    b["recordings"]
        .as_array_mut()
        .expect("recordings")
        .remove(0);
    fails_at(
        &bg,
        "recording-missing",
        &b,
        "but the bundle does not carry its recording",
    );

    // The signature: flipped, or the tree head it signs changed.
    let mut b = bundle.clone();
    let sig = b["checkpoint"]["signature"]
        .as_str()
        .expect("sig")
        .to_string();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('0') { "1" } else { "0" },
        &sig[1..]
    );
    b["checkpoint"]["signature"] = Value::String(flipped);
    fails_at(&bg, "signature", &b, "checkpoint signature");
    let mut b = bundle.clone();
    b["checkpoint"]["root"] = Value::String("00".repeat(32));
    fails_at(&bg, "root", &b, "checkpoint signature");

    // Another key than the one that signed.
    let other = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[5; 32])
            .verifying_key()
            .to_bytes(),
    );
    let out = verify(&bg, &file, &other);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stdout.contains("not signed by a trusted key"),
        "{out:#?}"
    );

    // Not a bundle at all, and a bundle of another format.
    let junk = write(&bg, "junk.json", &serde_json::json!({"hello": 1}));
    let out = verify(&bg, &junk, &pubkey(&bg));
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stdout.contains("not an evidence bundle"), "{out:#?}");
    let mut b = bundle.clone();
    b["format"] = Value::String("breakglass-evidence/99".into());
    fails_at(&bg, "format", &b, "this verifier reads");
}

/// The seq of the newest checkpoint in a witness file, once it is at
/// least `min`.
fn witness_checkpoint(path: &Path, min: u64) -> Checkpoint {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(cp) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Checkpoint>(l).ok())
            .next_back()
            .filter(|c| c.seq >= min)
        {
            return cp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint at seq {min} or later in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn head(bg: &Bg) -> u64 {
    bg.audit()
        .last()
        .and_then(|e| e["seq"].as_u64())
        .expect("events")
}

#[test]
fn audit_verify_since_proves_the_log_only_grew() {
    let up = upstream();
    let bg = Bg::start(&up, GwOptions::default());
    bg.grant("alice", "pg", "rw", "10m");
    let early = witness_checkpoint(&witness(&bg), head(&bg));
    let early_file = bg.dir.path().join("early.json");
    std::fs::write(&early_file, serde_json::to_vec(&early).expect("json")).expect("write");
    for _ in 0..3 {
        bg.grant("bob", "pg", "rw", "10m");
    }
    witness_checkpoint(&witness(&bg), head(&bg));
    let config = bg.config_path().display().to_string();
    let early_arg = early_file.display().to_string();
    let out = bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &config,
            "--key",
            &pubkey(&bg),
            "--since",
            &early_arg,
        ],
    );
    assert!(
        out.ok().stdout.contains(&format!(
            "The log only grew since the checkpoint at seq {}",
            early.seq
        )),
        "{out:#?}"
    );
    // The whole witness file works too (its last checkpoint).
    let whole = witness(&bg).display().to_string();
    bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &config,
            "--key",
            &pubkey(&bg),
            "--since",
            &whole,
        ],
    )
    .ok();

    // A fork: a tree head of another history at the same size, signed with
    // the node's own key (a stolen key, or a server that lied then).
    let secret =
        std::fs::read_to_string(bg.dir.path().join("data/audit-signing.key")).expect("key");
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(secret.trim(), &mut bytes).expect("64 hex digits");
    let key = ed25519_dalek::SigningKey::from_bytes(&bytes);
    let forked = Checkpoint::sign_tree(&key, early.seq, early.hash, [7; 32], early.time);
    let forked_file = bg.dir.path().join("forked.json");
    std::fs::write(&forked_file, serde_json::to_vec(&forked).expect("json")).expect("write");
    let out = bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &config,
            "--key",
            &pubkey(&bg),
            "--since",
            &forked_file.display().to_string(),
        ],
    );
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.contains(&format!("seq {}", early.seq))
            && out.stderr.contains("does not extend"),
        "{out:#?}"
    );

    // The stored tree damaged: the node of the largest complete subtree
    // (part of every root from its size on) no longer matches the log.
    let conn = rusqlite::Connection::open(bg.dir.path().join("data/breakglass.db")).expect("db");
    conn.busy_timeout(Duration::from_secs(5)).expect("timeout");
    conn.execute(
        "UPDATE merkle_nodes SET hash = zeroblob(32) \
         WHERE level = (SELECT max(level) FROM merkle_nodes) AND idx = 0",
        [],
    )
    .expect("tree damaged");
    let out = bg.cli(
        None,
        &[
            "audit",
            "verify",
            "--config",
            &config,
            "--key",
            &pubkey(&bg),
        ],
    );
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("stored Merkle tree"), "{out:#?}");
}
