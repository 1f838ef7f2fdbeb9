//! Verification of the whole audit log: every hash link, every checkpoint
//! signature, that no checkpoint points past the end of the log (which
//! would mean the log was truncated), that every signed tree head is the
//! root of the Merkle tree of the events it covers, and (with
//! [`check_stored_tree`]) that the store's tree is the tree of its log.

use std::collections::BTreeMap;

use breakglass_core::audit::{AuditEvent, ChainVerifier, Checkpoint, GENESIS, Hash};
use breakglass_core::merkle::Frontier;
use ed25519_dalek::VerifyingKey;

use crate::tree::{leaf_of, tree_root};
use crate::{Store, StoreError};

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
    /// The Merkle tree root over the verified events (the tree of
    /// `head_seq` events).
    pub tree_root: Hash,
    /// The root at every checkpointed seq, and at the head: what the
    /// store's tree must answer there ([`check_stored_tree`]).
    pub roots: Vec<(u64, Hash)>,
}

/// Feeds events in order; keeps the first failure.
pub struct Verifier {
    chain: ChainVerifier,
    /// Several checkpoints may cover one seq (the store and an external copy).
    checkpoints: BTreeMap<u64, Vec<Checkpoint>>,
    checked: u64,
    events: u64,
    failure: Option<(u64, String)>,
    tree: Frontier,
    roots: Vec<(u64, Hash)>,
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
            tree: Frontier::new(),
            roots: Vec::new(),
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
        self.tree.push(&leaf_of(e));
        if let Some(cps) = self.checkpoints.get(&e.seq) {
            self.checked += cps.len() as u64;
            if cps.iter().any(|cp| cp.hash != e.hash) {
                let seq = e.seq;
                self.fail(seq, "event hash differs from the signed checkpoint".into());
                return false;
            }
            let root = self.tree.root();
            self.roots.push((e.seq, root));
            if cps.iter().any(|cp| cp.root.is_some_and(|r| r != root)) {
                let seq = e.seq;
                self.fail(
                    seq,
                    "the Merkle tree root of the events differs from the signed checkpoint's"
                        .into(),
                );
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
        let tree_root = self.tree.root();
        if self.roots.last().is_none_or(|(s, _)| *s != head_seq) {
            self.roots.push((head_seq, tree_root));
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
            tree_root,
            roots: self.roots,
        }
    }
}

/// Checks the store's Merkle tree against the roots a verification
/// computed from the log: at every checkpointed size and at the head, the
/// root the stored nodes give must be the log's. Returns the first size
/// where it is not, with the reason. (Each check reads the O(log n) nodes
/// of that root; a wrong node elsewhere makes every proof through it fail
/// against a signed root, so it cannot vouch for anything either.)
pub async fn check_stored_tree(
    store: &dyn Store,
    v: &Verification,
) -> Result<Option<(u64, String)>, StoreError> {
    for (size, want) in &v.roots {
        let got = match tree_root(store, *size).await {
            Ok(r) => r,
            Err(StoreError::Corrupt(e)) => {
                return Ok(Some((*size, format!("the stored Merkle tree: {e}"))));
            }
            Err(e) => return Err(e),
        };
        if got != *want {
            return Ok(Some((
                *size,
                format!(
                    "the stored Merkle tree of the first {size} events differs from the tree of the log"
                ),
            )));
        }
    }
    Ok(None)
}
