//! Verification of everything the audit log vouches for: the chain and its
//! checkpoints (see `breakglass_store::verify`) and every session recording
//! whose final hash a `session.ended` event holds.

use std::path::Path;

use breakglass_core::audit::{AuditEvent, Checkpoint};
use breakglass_gateway_postgres::recording::{Recorder, read_recording};
use breakglass_store::verify::Verifier;
use breakglass_store::{Store, StoreError};
use ed25519_dalek::VerifyingKey;

use crate::dto::VerifyReport;

struct Ended {
    seq: u64,
    session_id: String,
    hash: String,
    statements: u64,
}

/// Feeds events in order, then checks the recordings.
pub struct FullVerifier {
    chain: Verifier,
    ended: Vec<Ended>,
}

/// Session ids are UUIDs; anything else never names a file.
pub fn is_session_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl FullVerifier {
    pub fn new(checkpoints: Vec<Checkpoint>, key: Option<&VerifyingKey>) -> FullVerifier {
        FullVerifier {
            chain: Verifier::new(checkpoints, key),
            ended: Vec::new(),
        }
    }

    pub fn push(&mut self, e: &AuditEvent) -> bool {
        if e.action == "session.ended"
            && let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details)
        {
            self.ended.push(Ended {
                seq: e.seq,
                session_id: d["session_id"].as_str().unwrap_or("").to_string(),
                hash: d["recording_sha256"].as_str().unwrap_or("").to_string(),
                statements: d["statements"].as_u64().unwrap_or(0),
            });
        }
        self.chain.push(e)
    }

    pub fn finish(self, recordings: &Path) -> VerifyReport {
        let v = self.chain.finish();
        let mut report = VerifyReport::from(v);
        for s in &self.ended {
            if report.first_bad_seq.is_some_and(|bad| bad <= s.seq) {
                break;
            }
            let problem = if !is_session_id(&s.session_id) {
                Some("invalid session id".to_string())
            } else {
                match read_recording(&Recorder::path_of(recordings, &s.session_id), |_| {}) {
                    Err(e) => Some(e.to_string()),
                    Ok(sum) if hex::encode(sum.final_hash) != s.hash => {
                        Some("final hash differs from the one in session.ended".into())
                    }
                    Ok(sum) if sum.statements != s.statements => Some(format!(
                        "{} statements recorded, session.ended says {}",
                        sum.statements, s.statements
                    )),
                    Ok(_) => None,
                }
            };
            match problem {
                Some(p) => {
                    report.ok = false;
                    report.first_bad_seq = Some(s.seq);
                    report.reason = Some(format!("recording of session {}: {p}", s.session_id));
                    break;
                }
                None => report.recordings += 1,
            }
        }
        report
    }
}

/// Verifies a store page by page.
pub async fn verify_store(
    store: &dyn Store,
    key: Option<&VerifyingKey>,
    recordings: &Path,
    checkpoint_file: Option<&Path>,
) -> Result<VerifyReport, StoreError> {
    let checkpoints = crate::checkpoint::all_checkpoints(store, checkpoint_file)
        .await
        .map_err(StoreError::Corrupt)?;
    let mut v = FullVerifier::new(checkpoints, key);
    breakglass_store::for_each_event(store, 0, |e| v.push(e)).await?;
    Ok(v.finish(recordings))
}
