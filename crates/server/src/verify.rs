//! Verification of everything the audit log vouches for: the chain and its
//! checkpoints (see `breakglass_store::verify`), the checkpoint witnesses,
//! every session recording against its `session.ended` event and the
//! newest point `session.progress` anchored, and that every
//! `session.started` has its end (unless the session is live right now).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use breakglass_core::audit::{AuditEvent, Checkpoint};
use breakglass_gateway_common::recording::{Point, Recorder, read_recording, read_through};
use breakglass_store::verify::Verifier;
use breakglass_store::{PAGE_LEN_MAX, Store, StoreError};
use ed25519_dalek::VerifyingKey;

use crate::checkpoint::Witness;
use crate::dto::VerifyReport;
use crate::gateway::{RECORDING_MISMATCH, anchor_of};

struct Ended {
    seq: u64,
    hash: String,
    statements: u64,
    reason: String,
    problem: Option<String>,
}

#[derive(Default)]
struct Session {
    started: Option<(u64, Option<String>)>,
    ended: Option<Ended>,
    anchor: Option<Point>,
}

/// Feeds events in order, then checks the sessions and their recordings.
pub struct FullVerifier {
    chain: Verifier,
    sessions: HashMap<String, Session>,
    /// A witness that went missing: `(seq, reason)`.
    witness_failure: Option<(u64, String)>,
    /// The `service.started` events that created a checkpoint witness.
    witness_starts: Vec<u64>,
    /// Sessions another node carried.
    others: HashSet<String>,
    /// The node whose recordings and witness this verification can read
    /// (its key id). Sessions and witness creations another node named are
    /// that node's to check; events that name no node count as this one's.
    node: Option<String>,
}

/// Session ids are UUIDs; anything else never names a file.
pub fn is_session_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl FullVerifier {
    pub fn new(checkpoints: Vec<Checkpoint>, key: Option<&VerifyingKey>) -> FullVerifier {
        FullVerifier::with_keys(checkpoints, key.as_slice().iter().copied())
    }

    /// Checkpoints hold if any of `keys` verifies them.
    pub fn with_keys<'a>(
        checkpoints: Vec<Checkpoint>,
        keys: impl IntoIterator<Item = &'a VerifyingKey>,
    ) -> FullVerifier {
        FullVerifier {
            chain: Verifier::with_keys(checkpoints, keys),
            sessions: HashMap::new(),
            witness_failure: None,
            witness_starts: Vec::new(),
            others: HashSet::new(),
            node: None,
        }
    }

    fn is_other_node(&self, details: &serde_json::Value) -> bool {
        match (&self.node, details["node"].as_str()) {
            (Some(own), Some(named)) => own != named,
            _ => false,
        }
    }

    /// Checks the chain against the store's and the witnesses' checkpoints;
    /// a witness that went missing fails verification.
    /// `node`: the key id of the node whose witnesses and recordings these
    /// are.
    pub async fn for_store<'a>(
        store: &dyn Store,
        witnesses: &[Box<dyn Witness>],
        keys: impl IntoIterator<Item = &'a VerifyingKey>,
        node: &str,
    ) -> Result<FullVerifier, StoreError> {
        let (checkpoints, failure) =
            match crate::checkpoint::all_checkpoints(store, witnesses, node).await? {
                Ok(cps) => (cps, None),
                Err(f) => (store.checkpoints().await?, Some(f)),
            };
        let mut v = FullVerifier::with_keys(checkpoints, keys);
        v.witness_failure = failure;
        v.node = Some(node.to_string());
        Ok(v)
    }

    pub fn push(&mut self, e: &AuditEvent) -> bool {
        // INVARIANT: a witness is created once per store. A second creation
        // means the first one went missing with its directory (and the
        // store may have been truncated before the new one started).
        if e.action == "service.started"
            && e.details.contains("\"witness_started\"")
            && let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details)
            && d["witness_started"].is_object()
            && !self.is_other_node(&d)
        {
            self.witness_starts.push(e.seq);
        }
        if e.action.starts_with("session.")
            && let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details)
            && let Some(id) = d["session_id"].as_str()
        {
            // A session carried by another node: its recording is on that
            // node, which verifies it.
            if e.action == "session.started" && self.is_other_node(&d) {
                self.others.insert(id.to_string());
            }
            if self.others.contains(id) {
                return self.chain.push(e);
            }
            let s = self.sessions.entry(id.to_string()).or_default();
            match e.action.as_str() {
                "session.started" if s.started.is_none() => {
                    s.started = Some((e.seq, e.request_id.clone()));
                }
                "session.ended" => {
                    s.ended = Some(Ended {
                        seq: e.seq,
                        hash: d["recording_sha256"].as_str().unwrap_or("").to_string(),
                        statements: d["statements"].as_u64().unwrap_or(0),
                        reason: d["end_reason"].as_str().unwrap_or("").to_string(),
                        problem: d["problem"].as_str().map(str::to_string),
                    })
                }
                "session.progress" => {
                    if let Some(p) = anchor_of(&d)
                        && s.anchor.is_none_or(|a| p.0 > a.0)
                    {
                        s.anchor = Some(p);
                    }
                }
                _ => {}
            }
        }
        self.chain.push(e)
    }

    /// Sessions started without an end that are not in `live`, with the
    /// request id their start names.
    pub fn unended(&self, live: &HashSet<String>) -> Vec<(String, Option<String>)> {
        self.sessions
            .iter()
            .filter(|(id, s)| s.ended.is_none() && !live.contains(*id))
            .filter_map(|(id, s)| s.started.as_ref().map(|(_, r)| (id.clone(), r.clone())))
            .collect()
    }

    /// `live`: sessions running right now (online verification); offline,
    /// none are, and a session without an end is reported. The store's
    /// Merkle tree is checked against the log too.
    pub async fn finish(
        self,
        store: &dyn Store,
        recordings: &Path,
        live: &HashSet<String>,
    ) -> Result<VerifyReport, StoreError> {
        let v = self.chain.finish();
        let tree_problem = if v.ok {
            breakglass_store::verify::check_stored_tree(store, &v).await?
        } else {
            None
        };
        let mut report = VerifyReport::from(v);
        let mut problems: Vec<(u64, String)> = Vec::new();
        problems.extend(tree_problem);
        if let Some(f) = self.witness_failure {
            problems.push(f);
        }
        if let Some(&again) = self.witness_starts.get(1) {
            problems.push((
                again,
                "the checkpoint witness was created again at this start: the one before went missing with its directory, so a truncation before it would pass; restore the witness from a backup".into(),
            ));
        }
        let chain_bad = report.first_bad_seq;
        let mut sessions: Vec<(&String, &Session)> = self.sessions.iter().collect();
        sessions.sort_by_key(|(_, s)| s.ended.as_ref().map_or(0, |e| e.seq));
        for (id, s) in sessions {
            let Some(e) = &s.ended else {
                let Some((seq, _)) = s.started else { continue };
                if live.contains(id) || chain_bad.is_some_and(|bad| bad <= seq) {
                    continue;
                }
                let how = if is_session_id(id) && Recorder::is_open(recordings, id) {
                    "it was interrupted and not closed yet (start the service to close its recording)"
                } else {
                    "its recording and marker are gone, or its end was never written"
                };
                problems.push((
                    seq,
                    format!("session {id} started but has no session.ended: {how}"),
                ));
                continue;
            };
            if chain_bad.is_some_and(|bad| bad <= e.seq) {
                continue;
            }
            let problem = if !is_session_id(id) {
                Some("invalid session id".to_string())
            } else if e.reason == RECORDING_MISMATCH {
                Some(format!(
                    "refused at recovery: {}",
                    e.problem
                        .as_deref()
                        .unwrap_or("it does not hold what was anchored")
                ))
            } else {
                let path = Recorder::path_of(recordings, id);
                let read = match s.anchor {
                    Some(point) => read_through(&path, point),
                    None => read_recording(&path, |_| {}),
                };
                match read {
                    Err(err) => Some(err.to_string()),
                    Ok(sum) if hex::encode(sum.final_hash) != e.hash => {
                        Some("final hash differs from the one in session.ended".into())
                    }
                    Ok(sum) if sum.statements != e.statements => Some(format!(
                        "{} statements recorded, session.ended says {}",
                        sum.statements, e.statements
                    )),
                    Ok(_) => None,
                }
            };
            match problem {
                Some(p) => problems.push((e.seq, format!("recording of session {id}: {p}"))),
                None => report.recordings += 1,
            }
        }
        if let Some((seq, reason)) = problems
            .into_iter()
            .filter(|(seq, _)| chain_bad.is_none_or(|bad| *seq < bad))
            .min_by_key(|(seq, _)| *seq)
        {
            report.ok = false;
            report.first_bad_seq = Some(seq);
            report.reason = Some(reason);
        }
        Ok(report)
    }
}

/// Verifies a store page by page. `live` names the sessions running now
/// (online); a session that ends while verification runs is not reported.
pub async fn verify_store(
    store: &dyn Store,
    keys: &[VerifyingKey],
    recordings: &Path,
    witnesses: &[Box<dyn Witness>],
    node: &str,
    live: Option<&(dyn Fn() -> HashSet<String> + Sync)>,
) -> Result<VerifyReport, StoreError> {
    let mut live_set = live.map(|f| f()).unwrap_or_default();
    let mut v = FullVerifier::for_store(store, witnesses, keys, node).await?;
    breakglass_store::for_each_event(store, 0, |e| v.push(e)).await?;
    if let Some(f) = live {
        // Sessions that started or ended while the log was read.
        live_set.extend(f());
        for (id, request) in v.unended(&live_set) {
            let Some(request) = request else { continue };
            let later = store.request_events(&request, PAGE_LEN_MAX).await?;
            let ended = later.iter().any(|e| {
                e.action == "session.ended"
                    && serde_json::from_str::<serde_json::Value>(&e.details)
                        .is_ok_and(|d| d["session_id"].as_str() == Some(id.as_str()))
            });
            if ended {
                live_set.insert(id);
            }
        }
    }
    v.finish(store, recordings, &live_set).await
}
