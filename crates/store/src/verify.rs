//! Verification of the whole audit log: every hash link, every checkpoint
//! signature, and that no checkpoint points past the end of the log (which
//! would mean the log was truncated).

use std::collections::BTreeMap;

use breakglass_core::audit::{AuditEvent, ChainVerifier, Checkpoint, GENESIS};
use ed25519_dalek::VerifyingKey;

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    pub events: u64,
    pub checkpoints: u64,
    pub head_seq: u64,
    pub head_hash: String,
    pub first_bad_seq: Option<u64>,
    pub reason: Option<String>,
}

/// Feeds events in order; keeps the first failure.
pub struct Verifier {
    chain: ChainVerifier,
    /// Several checkpoints may cover one seq (the store and an external copy).
    checkpoints: BTreeMap<u64, Vec<Checkpoint>>,
    checked: u64,
    events: u64,
    failure: Option<(u64, String)>,
}

impl Verifier {
    /// `key` is the server's public key; without it, signatures cannot be
    /// checked and verification fails closed if any checkpoint exists.
    pub fn new(checkpoints: Vec<Checkpoint>, key: Option<&VerifyingKey>) -> Verifier {
        Verifier::with_keys(checkpoints, key.as_slice().iter().copied())
    }

    /// Like [`Verifier::new`] with several trusted keys (one per node): a
    /// checkpoint holds if any of them verifies its signature.
    pub fn with_keys<'a>(
        checkpoints: Vec<Checkpoint>,
        keys: impl IntoIterator<Item = &'a VerifyingKey>,
    ) -> Verifier {
        let keys: Vec<&VerifyingKey> = keys.into_iter().collect();
        let mut v = Verifier {
            chain: ChainVerifier::new(),
            checkpoints: BTreeMap::new(),
            checked: 0,
            events: 0,
            failure: None,
        };
        for cp in checkpoints {
            let valid = keys.iter().any(|k| cp.verify(k));
            if !valid {
                v.fail(
                    cp.seq,
                    "checkpoint signature does not verify with a trusted key".into(),
                );
            }
            v.checkpoints.entry(cp.seq).or_default().push(cp);
        }
        v
    }

    fn fail(&mut self, seq: u64, reason: String) {
        if self.failure.as_ref().is_none_or(|(s, _)| seq < *s) {
            self.failure = Some((seq, reason));
        }
    }

    /// Returns false once a failure is known that no later event can precede.
    pub fn push(&mut self, e: &AuditEvent) -> bool {
        if let Some((s, _)) = &self.failure
            && *s <= e.seq
        {
            return false;
        }
        if let Err(err) = self.chain.push(e) {
            self.fail(err.seq, err.reason);
            return false;
        }
        self.events += 1;
        if let Some(cps) = self.checkpoints.get(&e.seq) {
            self.checked += cps.len() as u64;
            if cps.iter().any(|cp| cp.hash != e.hash) {
                let seq = e.seq;
                self.fail(seq, "event hash differs from the signed checkpoint".into());
                return false;
            }
        }
        true
    }

    pub fn finish(mut self) -> Verification {
        let (head_seq, head_hash) = self.chain.head();
        if self.failure.is_none()
            && let Some((&last_cp, _)) = self.checkpoints.iter().next_back()
            && last_cp > head_seq
        {
            self.fail(
                head_seq + 1,
                format!("log ends at seq {head_seq} but a signed checkpoint covers seq {last_cp} (truncated)"),
            );
        }
        let (first_bad_seq, reason) = match self.failure {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        Verification {
            ok: first_bad_seq.is_none(),
            events: self.events,
            checkpoints: self.checked,
            head_seq,
            head_hash: hex::encode(if head_seq == 0 { GENESIS } else { head_hash }),
            first_bad_seq,
            reason,
        }
    }
}
