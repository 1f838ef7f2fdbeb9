//! Evidence bundles: everything an auditor needs about one request, and a
//! verifier that needs nothing else.
//!
//! A bundle (`GET /v1/requests/{id}/evidence`, `breakglass evidence ID`)
//! holds the request's audit events with their exact canonical fields, an
//! inclusion proof of each event in the Merkle tree of a signed
//! checkpoint, that checkpoint (tree size = its `seq`, tree root, chain
//! hash, signature, key), and the recordings of the request's sessions as
//! their files, each bound by its `session.ended` event (the recording's
//! final hash and statement count).
//!
//! [`verify`] checks a bundle with the trusted public keys only (no store,
//! no server) and names every failure: the signature, an event (its
//! content does not give its stated leaf hash), a proof (it does not lead
//! from the event to the signed root), a recording line (its chain breaks
//! there), a recording (its end does not match its `session.ended`).
//!
//! What a bundle cannot prove: that no event of the request was left out.
//! Each event it holds is proven to be in the signed log at its `seq`; an
//! auditor who needs completeness reads the whole log up to the
//! checkpoint (`audit export`) or asks for the events between.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use breakglass_core::Timestamp;
use breakglass_core::audit::{Checkpoint, Hash, canonical_bytes};
use breakglass_core::merkle::{self, ProofError};
use breakglass_gateway_postgres::recording::{Recorder, read_recording_bytes};
use breakglass_store::{PAGE_LEN_MAX, Store, StoreError};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::{App, AppError, now};
use crate::http::{ApiError, Auth};

/// The format a bundle names; a verifier refuses any other.
pub const BUNDLE_FORMAT: &str = "breakglass-evidence/1";
/// The gateways' recordings (PostgreSQL and SSH alike): JSON lines with
/// their own hash chain (`breakglass_gateway_common::recording`).
pub const RECORDING_FORMAT: &str = "breakglass-recording-jsonl/1";
/// The largest bundle `evidence verify` reads.
pub const BUNDLE_LEN_MAX: u64 = 1 << 30;
/// The most events one bundle holds (one page of a request's events).
pub const BUNDLE_EVENTS_MAX: usize = PAGE_LEN_MAX as usize;
/// The most recordings one bundle holds.
pub const BUNDLE_RECORDINGS_MAX: usize = 4_096;
/// The largest recording a bundle carries.
pub const RECORDING_LEN_MAX: u64 = 256 << 20;

/// One audit event with the exact fields its leaf hashes, and its proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BundleEvent {
    pub seq: u64,
    #[schema(value_type = String, format = DateTime)]
    pub time: Timestamp,
    pub actor: String,
    pub action: String,
    pub request_id: Option<String>,
    /// The details as the canonical JSON text the chain and the tree hash.
    pub details: String,
    /// The event's link in the hash chain (hex): informative, the proof
    /// does not need it.
    pub hash: String,
    /// `SHA-256(0x00 || canonical bytes)` (hex): tells an altered event
    /// (its content no longer gives this) from an altered proof.
    pub leaf_hash: String,
    /// The audit path (hex), nearest the leaf first (RFC 9162 §2.1.3).
    pub proof: Vec<String>,
}

/// One session recording: the file's bytes, and what binds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BundleRecording {
    pub session_id: String,
    /// How to read `content` ([`RECORDING_FORMAT`]).
    pub format: String,
    /// The file's name where the gateway keeps it.
    pub file: String,
    /// The file's content (complete entries only).
    pub content: String,
}

/// A session whose recording this bundle does not carry, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Unavailable {
    pub session_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Bundle {
    /// [`BUNDLE_FORMAT`].
    pub format: String,
    pub request_id: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// The signed checkpoint every proof leads to: tree size `seq`, tree
    /// head `root`.
    #[schema(value_type = Object)]
    pub checkpoint: Checkpoint,
    pub events: Vec<BundleEvent>,
    pub recordings: Vec<BundleRecording>,
    #[serde(default)]
    pub unavailable: Vec<Unavailable>,
}

fn hex32(s: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok().map(|()| out)
}

fn leaf_of(e: &BundleEvent) -> Vec<u8> {
    canonical_bytes(
        e.seq,
        e.time,
        &e.actor,
        &e.action,
        e.request_id.as_deref(),
        &e.details,
    )
}

/// Builds the bundle of request `id` (already checked visible), up to a
/// checkpoint of this node's key that covers its last event: the newest
/// stored one, or one signed now.
pub async fn build(app: &App, id: &str) -> Result<Bundle, AppError> {
    let store = app.store.as_ref();
    let events = store.request_events(id, PAGE_LEN_MAX).await?;
    if events.len() >= BUNDLE_EVENTS_MAX {
        return Err(AppError::Conflict(
            "evidence_too_large",
            format!(
                "request {id} has {BUNDLE_EVENTS_MAX} events or more, more than one bundle holds"
            ),
        ));
    }
    let Some(last) = events.last().map(|e| e.seq) else {
        return Err(AppError::NotFound(format!("no events of request {id}")));
    };
    let checkpoint = covering_checkpoint(app, last).await?;
    let mut out = Vec::with_capacity(events.len());
    for e in &events {
        let proof = breakglass_store::tree::inclusion_proof(store, e.seq, checkpoint.seq).await?;
        out.push(BundleEvent {
            seq: e.seq,
            time: e.time,
            actor: e.actor.clone(),
            action: e.action.clone(),
            request_id: e.request_id.clone(),
            details: e.details.clone(),
            hash: hex::encode(e.hash),
            leaf_hash: hex::encode(merkle::leaf_hash(&breakglass_store::tree::leaf_of(e))),
            proof: proof.iter().map(hex::encode).collect(),
        });
    }
    let (recordings, unavailable) = recordings_of(app, &out).await?;
    Ok(Bundle {
        format: BUNDLE_FORMAT.into(),
        request_id: id.to_string(),
        created_at: now(),
        checkpoint,
        events: out,
        recordings,
        unavailable,
    })
}

async fn covering_checkpoint(app: &App, last: u64) -> Result<Checkpoint, AppError> {
    let node = app.node_id();
    let newest = |cps: Vec<Checkpoint>| {
        cps.into_iter()
            .filter(|c| c.root.is_some() && c.seq >= last && c.key.as_deref() == Some(&node))
            .max_by_key(|c| c.seq)
    };
    if let Some(cp) = newest(app.store.checkpoints().await?) {
        return Ok(cp);
    }
    // INVARIANT: nothing is signed while the chain is known broken.
    if let Some(why) = app.writes_blocked() {
        return Err(AppError::WritesBlocked(why));
    }
    crate::checkpoint::checkpoint_once(app.store.as_ref(), app.signing_key(), &app.witnesses, 0)
        .await?;
    newest(app.store.checkpoints().await?).ok_or_else(|| {
        AppError::Store(StoreError::Unavailable(format!(
            "no checkpoint covers seq {last} yet (this node has not seen it); try again in a few seconds"
        )))
    })
}

/// The recordings of the sessions the events end, read from this node's
/// recordings directory (a session another node carried is held there).
async fn recordings_of(
    app: &App,
    events: &[BundleEvent],
) -> Result<(Vec<BundleRecording>, Vec<Unavailable>), AppError> {
    let node = app.node_id();
    let dir = app.config.recordings_dir();
    let mut out = Vec::new();
    let mut missing = Vec::new();
    let mut carried_by: std::collections::HashMap<String, String> = Default::default();
    for e in events {
        let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details) else {
            continue;
        };
        let Some(sid) = d["session_id"].as_str() else {
            continue;
        };
        if e.action == "session.started"
            && let Some(n) = d["node"].as_str()
        {
            carried_by.insert(sid.to_string(), n.to_string());
        }
        if e.action != "session.ended" {
            continue;
        }
        if out.len() >= BUNDLE_RECORDINGS_MAX {
            return Err(AppError::Conflict(
                "evidence_too_large",
                format!("more than {BUNDLE_RECORDINGS_MAX} recordings"),
            ));
        }
        let sid = sid.to_string();
        if let Some(other) = carried_by.get(&sid).filter(|n| **n != node) {
            missing.push(Unavailable {
                reason: format!(
                    "the recording is held by node {other}; fetch this bundle from that node"
                ),
                session_id: sid,
            });
            continue;
        }
        if !crate::verify::is_session_id(&sid) {
            missing.push(Unavailable {
                session_id: sid,
                reason: "not a session id".into(),
            });
            continue;
        }
        let path = Recorder::path_of(&dir, &sid);
        let read = tokio::task::spawn_blocking(move || read_bounded(&path))
            .await
            .map_err(|e| AppError::BadInput(format!("cannot read recording: {e}")))?;
        match read {
            Ok((file, content)) => out.push(BundleRecording {
                session_id: sid,
                format: RECORDING_FORMAT.into(),
                file,
                content,
            }),
            Err(reason) => missing.push(Unavailable {
                session_id: sid,
                reason,
            }),
        }
    }
    Ok((out, missing))
}

/// A recording file's name and text, up to [`RECORDING_LEN_MAX`]; a torn
/// last line (not part of the chain) is left out.
fn read_bounded(path: &std::path::Path) -> Result<(String, String), String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("recording not found on this node: {e}"))?;
    let mut bytes = Vec::new();
    file.take(RECORDING_LEN_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the recording: {e}"))?;
    if bytes.len() as u64 > RECORDING_LEN_MAX {
        return Err(format!(
            "the recording is larger than {RECORDING_LEN_MAX} bytes, more than a bundle carries"
        ));
    }
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(whole);
    let content =
        String::from_utf8(bytes).map_err(|_| "the recording is not UTF-8 text".to_string())?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((name, content))
}

#[utoipa::path(get, path = "/v1/requests/{id}/evidence", params(("id" = String, Path)),
    responses((status = 200, body = Bundle), (status = 404, body = crate::dto::Problem)),
    security(("bearer" = [])))]
pub async fn evidence(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Bundle>, ApiError> {
    // Visible exactly when the request (and so its recordings) is.
    let req = app.get_visible(&who, &id).await?;
    Ok(Json(build(&app, &req.id).await?))
}

/// What failed, precisely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum Finding {
    /// The bundle itself (format, request, order of events).
    Bundle { reason: String },
    /// The checkpoint's signature or tree head.
    Signature { reason: String },
    /// An event's content does not give its stated leaf hash.
    Event { seq: u64, reason: String },
    /// An event's proof does not lead to the signed root.
    Proof { seq: u64, reason: String },
    /// A recording's chain breaks at `line` (1-based: entry `line`).
    RecordingLine {
        session_id: String,
        line: u64,
        reason: String,
    },
    /// A recording as a whole: its end is not what `session.ended` binds,
    /// or it is missing.
    Recording { session_id: String, reason: String },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Bundle { reason } => write!(f, "bundle: {reason}"),
            Finding::Signature { reason } => write!(f, "checkpoint signature: {reason}"),
            Finding::Event { seq, reason } => write!(f, "event seq {seq}: {reason}"),
            Finding::Proof { seq, reason } => write!(f, "proof of event seq {seq}: {reason}"),
            Finding::RecordingLine {
                session_id,
                line,
                reason,
            } => write!(
                f,
                "recording of session {session_id}, line {line}: {reason}"
            ),
            Finding::Recording { session_id, reason } => {
                write!(f, "recording of session {session_id}: {reason}")
            }
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EvidenceReport {
    pub ok: bool,
    pub request_id: String,
    /// The checkpoint's seq (the tree size) and root.
    pub checkpoint_seq: u64,
    pub tree_root: String,
    pub events: u64,
    pub recordings: u64,
    pub findings: Vec<Finding>,
    /// Sessions still running when the bundle was made (no recording is
    /// bound yet).
    pub warnings: Vec<String>,
}

/// Verifies a bundle offline against the trusted keys. Every failure is a
/// [`Finding`]; `ok` only when there is none.
pub fn verify(bytes: &[u8], keys: &[VerifyingKey]) -> EvidenceReport {
    let mut r = EvidenceReport {
        ok: false,
        request_id: String::new(),
        checkpoint_seq: 0,
        tree_root: String::new(),
        events: 0,
        recordings: 0,
        findings: Vec::new(),
        warnings: Vec::new(),
    };
    if bytes.len() as u64 > BUNDLE_LEN_MAX {
        r.findings.push(Finding::Bundle {
            reason: format!("larger than {BUNDLE_LEN_MAX} bytes"),
        });
        return r;
    }
    let b: Bundle = match serde_json::from_slice(bytes) {
        Ok(b) => b,
        Err(e) => {
            r.findings.push(Finding::Bundle {
                reason: format!("not an evidence bundle: {e}"),
            });
            return r;
        }
    };
    check(&b, keys, &mut r);
    r.ok = r.findings.is_empty();
    r
}

fn check(b: &Bundle, keys: &[VerifyingKey], r: &mut EvidenceReport) {
    r.request_id = b.request_id.clone();
    r.checkpoint_seq = b.checkpoint.seq;
    let bundle = |reason: String| Finding::Bundle { reason };
    if b.format != BUNDLE_FORMAT {
        r.findings.push(bundle(format!(
            "format {:?}, this verifier reads {BUNDLE_FORMAT:?}",
            b.format
        )));
        return;
    }
    if b.events.len() > BUNDLE_EVENTS_MAX || b.recordings.len() > BUNDLE_RECORDINGS_MAX {
        r.findings.push(bundle(format!(
            "more than {BUNDLE_EVENTS_MAX} events or {BUNDLE_RECORDINGS_MAX} recordings"
        )));
        return;
    }
    // The signature first: without it nothing below vouches for anything.
    let cp = &b.checkpoint;
    let Some(root) = cp.root else {
        r.findings.push(Finding::Signature {
            reason: "the checkpoint carries no tree head (written before the Merkle tree existed)"
                .into(),
        });
        return;
    };
    r.tree_root = hex::encode(root);
    if keys.is_empty() {
        r.findings.push(Finding::Signature {
            reason: "no trusted key given".into(),
        });
    } else if !keys.iter().any(|k| cp.verify(k)) {
        r.findings.push(Finding::Signature {
            reason: format!(
                "the checkpoint at seq {} is not signed by a trusted key{}",
                cp.seq,
                cp.key
                    .as_deref()
                    .map(|k| format!(" (it names key {k})"))
                    .unwrap_or_default()
            ),
        });
    }
    let mut prev = 0;
    for e in &b.events {
        r.events += 1;
        if e.seq <= prev {
            r.findings.push(bundle(format!(
                "event seq {} is out of order or repeated",
                e.seq
            )));
        }
        prev = e.seq;
        if e.request_id.as_deref() != Some(b.request_id.as_str()) {
            r.findings.push(Finding::Event {
                seq: e.seq,
                reason: format!(
                    "it belongs to request {:?}, not {}",
                    e.request_id, b.request_id
                ),
            });
        }
        let leaf = merkle::leaf_hash(&leaf_of(e));
        if hex32(&e.leaf_hash) != Some(leaf) {
            r.findings.push(Finding::Event {
                seq: e.seq,
                reason: "its content does not give its leaf hash (altered)".into(),
            });
            continue;
        }
        let proof: Option<Vec<Hash>> = e.proof.iter().map(|h| hex32(h)).collect();
        let Some(proof) = proof else {
            r.findings.push(Finding::Proof {
                seq: e.seq,
                reason: "a proof hash is not 32 bytes of hex".into(),
            });
            continue;
        };
        if e.seq == 0 {
            r.findings.push(Finding::Event {
                seq: 0,
                reason: "seq 0 is no event".into(),
            });
            continue;
        }
        if let Err(err) = merkle::verify_inclusion(e.seq - 1, cp.seq, &leaf, &proof, &root) {
            let reason = match err {
                ProofError::OutOfRange { .. } => {
                    format!("the event is past the checkpoint (tree size {})", cp.seq)
                }
                other => other.to_string(),
            };
            r.findings.push(Finding::Proof { seq: e.seq, reason });
        }
    }
    check_recordings(b, r);
}

struct Binding {
    seq: u64,
    hash: String,
    statements: u64,
}

fn check_recordings(b: &Bundle, r: &mut EvidenceReport) {
    let mut ended: std::collections::BTreeMap<String, Binding> = Default::default();
    let mut started: Vec<String> = Vec::new();
    for e in &b.events {
        let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details) else {
            continue;
        };
        let Some(sid) = d["session_id"].as_str() else {
            continue;
        };
        match e.action.as_str() {
            "session.started" => started.push(sid.to_string()),
            "session.ended" => {
                ended.insert(
                    sid.to_string(),
                    Binding {
                        seq: e.seq,
                        hash: d["recording_sha256"].as_str().unwrap_or("").to_string(),
                        statements: d["statements"].as_u64().unwrap_or(0),
                    },
                );
            }
            _ => {}
        }
    }
    for sid in &started {
        if !ended.contains_key(sid) {
            r.warnings.push(format!(
                "session {sid} had not ended when the bundle was made: no recording is bound yet"
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for rec in &b.recordings {
        let sid = &rec.session_id;
        let finding = |reason: String| Finding::Recording {
            session_id: sid.clone(),
            reason,
        };
        if !seen.insert(sid.clone()) {
            r.findings
                .push(finding("the bundle carries it twice".into()));
            continue;
        }
        let Some(bind) = ended.get(sid) else {
            r.findings.push(finding(
                "no session.ended event in the bundle binds it".into(),
            ));
            continue;
        };
        if rec.format != RECORDING_FORMAT {
            r.findings.push(finding(format!(
                "format {:?} is not one this verifier reads",
                rec.format
            )));
            continue;
        }
        if rec.content.len() as u64 > RECORDING_LEN_MAX {
            r.findings
                .push(finding(format!("larger than {RECORDING_LEN_MAX} bytes")));
            continue;
        }
        if !rec.content.is_empty() && !rec.content.ends_with('\n') {
            r.findings
                .push(finding("its last line is incomplete".into()));
            continue;
        }
        match read_recording_bytes(rec.content.as_bytes(), sid, |_| {}) {
            Err(breakglass_gateway_postgres::recording::RecordingError::Broken {
                seq, reason, ..
            }) => r.findings.push(Finding::RecordingLine {
                session_id: sid.clone(),
                line: seq,
                reason,
            }),
            Err(e) => r.findings.push(finding(e.to_string())),
            Ok(sum) if hex::encode(sum.final_hash) != bind.hash => r.findings.push(finding(
                format!(
                    "its final hash differs from the one session.ended (seq {}) binds: entries were removed, added or replaced",
                    bind.seq
                ),
            )),
            Ok(sum) if sum.statements != bind.statements => r.findings.push(finding(format!(
                "{} statements recorded, session.ended (seq {}) says {}",
                sum.statements, bind.seq, bind.statements
            ))),
            Ok(_) => r.recordings += 1,
        }
    }
    for (sid, bind) in &ended {
        if seen.contains(sid) {
            continue;
        }
        let why = b
            .unavailable
            .iter()
            .find(|u| &u.session_id == sid)
            .map(|u| format!(": {}", u.reason))
            .unwrap_or_default();
        r.findings.push(Finding::Recording {
            session_id: sid.clone(),
            reason: format!(
                "ended at seq {} but the bundle does not carry its recording{why}",
                bind.seq
            ),
        });
    }
}

/// Text for people: one line per finding, or what holds.
pub fn render(r: &EvidenceReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if r.ok {
        let _ = writeln!(
            out,
            "Evidence OK: request {}, {} events proven in the log of {} events (tree root {}), {} recordings bound.",
            r.request_id, r.events, r.checkpoint_seq, r.tree_root, r.recordings
        );
    } else {
        let _ = writeln!(
            out,
            "Evidence does NOT verify ({} findings):",
            r.findings.len()
        );
        for f in &r.findings {
            let _ = writeln!(out, "  {f}");
        }
    }
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// Consistency of the log since an earlier checkpoint (a witness's): the
/// newest signed tree head of `store` extends it. Returns the newer
/// checkpoint's seq, or why not.
pub async fn consistent_since(
    store: &dyn Store,
    since: &Checkpoint,
    keys: &[VerifyingKey],
) -> Result<Result<u64, String>, StoreError> {
    let Some(old_root) = since.root else {
        return Ok(Err(format!(
            "the checkpoint at seq {} carries no tree head (written before the Merkle tree existed)",
            since.seq
        )));
    };
    if !keys.iter().any(|k| since.verify(k)) {
        return Ok(Err(format!(
            "the checkpoint at seq {} is not signed by a trusted key",
            since.seq
        )));
    }
    let newest = store
        .checkpoints()
        .await?
        .into_iter()
        .filter(|c| c.root.is_some() && c.seq >= since.seq && keys.iter().any(|k| c.verify(k)))
        .max_by_key(|c| c.seq);
    let Some(newer) = newest else {
        return Ok(Err(format!(
            "the store holds no signed tree head at or after seq {}: the log was truncated or its checkpoints removed",
            since.seq
        )));
    };
    let Some(new_root) = newer.root else {
        return Ok(Err("the newest checkpoint carries no tree head".into()));
    };
    let proof = match breakglass_store::tree::consistency_proof(store, since.seq, newer.seq).await {
        Ok(p) => p,
        Err(StoreError::Corrupt(e)) => return Ok(Err(format!("the stored Merkle tree: {e}"))),
        Err(e) => return Err(e),
    };
    Ok(
        merkle::verify_consistency(since.seq, newer.seq, &old_root, &new_root, &proof)
            .map(|()| newer.seq)
            .map_err(|e| {
                format!(
                    "the log at seq {} does not extend the checkpoint at seq {}: {e}",
                    newer.seq, since.seq
                )
            }),
    )
}
