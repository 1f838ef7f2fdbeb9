//! The tamper-evident audit chain (DESIGN §5).
//!
//! Canonical encoding of event `n` (version 1), all integers big-endian:
//!
//! ```text
//! seq: u64 | time_ms: i64 | actor: str | action: str | request_id: str | details: str
//! str = u32 byte length, then UTF-8 bytes (request_id is empty when absent;
//!       details is canonical JSON: no whitespace, object keys sorted by bytes)
//! ```
//!
//! `hash(n) = SHA-256(hash(n-1) || canonical(n))`, `hash(0)` = 32 zero bytes.
//! A checkpoint names the key that signed it (`key`: the public key in hex,
//! as the node's `audit-signing.pub` holds it) and signs
//! `"breakglass-audit-checkpoint-v2\n" || seq: u64 || hash || time_ms: i64 ||
//! public_key: 32 bytes` with that Ed25519 key. Every field has a fixed
//! length, so the bytes are unambiguous. Checkpoints written before keys
//! were named (no `key`) sign the same fields without the public key under
//! the domain `"breakglass-audit-checkpoint-v1\n"`, and still verify.
//!
//! A checkpoint that carries the Merkle tree head ([`crate::merkle`]: the
//! root of the tree over events `1..=seq`, so the tree size is `seq`) signs
//! `"breakglass-audit-checkpoint-v3\n" || seq || hash || time_ms ||
//! public_key || root: 32 bytes`. Older checkpoints (v1, v2) carry no root
//! and verify as before; they cannot anchor an inclusion proof.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::time::Timestamp;

pub type Hash = [u8; 32];
pub const GENESIS: Hash = [0; 32];
const CHECKPOINT_DOMAIN_V1: &[u8] = b"breakglass-audit-checkpoint-v1\n";
const CHECKPOINT_DOMAIN_V2: &[u8] = b"breakglass-audit-checkpoint-v2\n";
const CHECKPOINT_DOMAIN_V3: &[u8] = b"breakglass-audit-checkpoint-v3\n";

/// One committed audit event. `details` holds canonical JSON text exactly as
/// hashed, so verification never depends on re-serialising it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub seq: u64,
    pub time: Timestamp,
    pub actor: String,
    pub action: String,
    pub request_id: Option<String>,
    pub details: String,
    pub hash: Hash,
}

/// The JSON form of an event (export, API): details as an object, hash in hex.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEventJson {
    pub seq: u64,
    #[schema(value_type = String, format = DateTime)]
    pub time: Timestamp,
    pub actor: String,
    pub action: String,
    pub request_id: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub hash: String,
}

impl AuditEvent {
    pub fn to_json(&self) -> AuditEventJson {
        AuditEventJson {
            seq: self.seq,
            time: self.time,
            actor: self.actor.clone(),
            action: self.action.clone(),
            request_id: self.request_id.clone(),
            details: serde_json::from_str(&self.details).unwrap_or(serde_json::Value::Null),
            hash: hex::encode(self.hash),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The canonical bytes of an event (everything but its hash).
pub fn canonical_bytes(
    seq: u64,
    time: Timestamp,
    actor: &str,
    action: &str,
    request_id: Option<&str>,
    details: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + actor.len() + action.len() + details.len() + 40);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&time.millis().to_be_bytes());
    put_str(&mut out, actor);
    put_str(&mut out, action);
    put_str(&mut out, request_id.unwrap_or(""));
    put_str(&mut out, details);
    out
}

/// `SHA-256(prev || canonical(event))`.
pub fn chain_hash(
    prev: &Hash,
    seq: u64,
    time: Timestamp,
    actor: &str,
    action: &str,
    request_id: Option<&str>,
    details: &str,
) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical_bytes(
        seq, time, actor, action, request_id, details,
    ));
    h.finalize().into()
}

/// Canonical JSON: compact, object keys sorted, independent of serde_json's
/// map ordering features.
pub fn canonical_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(val) = map.get(k) {
                    write_canonical(val, out);
                }
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The first place where the chain does not hold.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("audit chain broken at seq {seq}: {reason}")]
pub struct ChainError {
    pub seq: u64,
    pub reason: String,
}

/// Walks events in order and checks seq contiguity and every hash link.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    prev: Hash,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainVerifier {
    pub fn new() -> Self {
        ChainVerifier {
            next_seq: 1,
            prev: GENESIS,
        }
    }

    /// Continue a chain from a known-good head (for example a verified tail).
    pub fn resume(seq: u64, hash: Hash) -> Self {
        ChainVerifier {
            next_seq: seq + 1,
            prev: hash,
        }
    }

    pub fn push(&mut self, e: &AuditEvent) -> Result<(), ChainError> {
        if e.seq != self.next_seq {
            let reason = if e.seq > self.next_seq {
                format!(
                    "expected seq {}, found {} (events missing)",
                    self.next_seq, e.seq
                )
            } else {
                format!(
                    "expected seq {}, found {} (duplicate or reordered)",
                    self.next_seq, e.seq
                )
            };
            // INVARIANT: name the first bad row. A gap is bad at the first
            // missing seq; a duplicate or step back is bad at the row itself,
            // not at the seq that was expected there.
            return Err(ChainError {
                seq: self.next_seq.min(e.seq),
                reason,
            });
        }
        let expected = chain_hash(
            &self.prev,
            e.seq,
            e.time,
            &e.actor,
            &e.action,
            e.request_id.as_deref(),
            &e.details,
        );
        if expected != e.hash {
            return Err(ChainError {
                seq: e.seq,
                reason: "hash does not match the event and its predecessor (altered, inserted or reordered)".into(),
            });
        }
        self.prev = e.hash;
        self.next_seq += 1;
        Ok(())
    }

    /// The last verified `(seq, hash)`; seq 0 means no events yet.
    pub fn head(&self) -> (u64, Hash) {
        (self.next_seq - 1, self.prev)
    }
}

/// A signed statement that the chain had `hash` at `seq`, naming the key
/// that signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    #[serde(with = "hex_array")]
    pub hash: Hash,
    pub time: Timestamp,
    #[serde(with = "hex_sig")]
    pub signature: [u8; 64],
    /// The signer's public key in hex ([`key_id`]); `None` only for
    /// checkpoints written before keys were named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The Merkle tree head: the root of the tree of the first `seq`
    /// events. `None` for checkpoints written before the tree existed.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_opt")]
    pub root: Option<Hash>,
}

/// The name of a checkpoint key: its public key in lowercase hex, exactly
/// as the node's `audit-signing.pub` file holds it.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(key.to_bytes())
}

fn checkpoint_message(
    seq: u64,
    hash: &Hash,
    time: Timestamp,
    key: Option<&VerifyingKey>,
    root: Option<&Hash>,
) -> Vec<u8> {
    let mut m = match (key, root) {
        (Some(_), Some(_)) => CHECKPOINT_DOMAIN_V3.to_vec(),
        (Some(_), None) => CHECKPOINT_DOMAIN_V2.to_vec(),
        (None, _) => CHECKPOINT_DOMAIN_V1.to_vec(),
    };
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time.millis().to_be_bytes());
    if let Some(k) = key {
        m.extend_from_slice(k.as_bytes());
        if let Some(r) = root {
            m.extend_from_slice(r);
        }
    }
    m
}

impl Checkpoint {
    /// A checkpoint of the chain alone (v2, no tree head).
    pub fn sign(key: &SigningKey, seq: u64, hash: Hash, time: Timestamp) -> Checkpoint {
        Checkpoint::signed(key, seq, hash, None, time)
    }

    /// A checkpoint of the chain and of the Merkle tree head (`root`: the
    /// root of the tree of the first `seq` events).
    pub fn sign_tree(
        key: &SigningKey,
        seq: u64,
        hash: Hash,
        root: Hash,
        time: Timestamp,
    ) -> Checkpoint {
        Checkpoint::signed(key, seq, hash, Some(root), time)
    }

    fn signed(
        key: &SigningKey,
        seq: u64,
        hash: Hash,
        root: Option<Hash>,
        time: Timestamp,
    ) -> Checkpoint {
        let public = key.verifying_key();
        let msg = checkpoint_message(seq, &hash, time, Some(&public), root.as_ref());
        Checkpoint {
            seq,
            hash,
            time,
            signature: key.sign(&msg).to_bytes(),
            key: Some(key_id(&public)),
            root,
        }
    }

    /// Whether `key` signed this checkpoint. A checkpoint that names a key
    /// verifies only with that key.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let sig = Signature::from_bytes(&self.signature);
        let named = match &self.key {
            Some(id) if *id != key_id(key) => return false,
            Some(_) => Some(key),
            // A tree head was never signed without the key's name.
            None if self.root.is_some() => return false,
            None => None,
        };
        key.verify(
            &checkpoint_message(self.seq, &self.hash, self.time, named, self.root.as_ref()),
            &sig,
        )
        .is_ok()
    }

    /// Whether this checkpoint was signed by the key named `id` (a
    /// checkpoint without a name counts as every key's: it comes from a
    /// single node).
    pub fn signed_by(&self, id: &str) -> bool {
        self.key.as_deref().is_none_or(|k| k == id)
    }
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&hex::encode(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(Some(out))
    }
}

mod hex_sig {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 64];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(prev: &Hash, seq: u64, details: &str) -> AuditEvent {
        let t = Timestamp(1_000 * seq as i64);
        AuditEvent {
            seq,
            time: t,
            actor: "alice".into(),
            action: "request.created".into(),
            request_id: Some("r1".into()),
            details: details.into(),
            hash: chain_hash(
                prev,
                seq,
                t,
                "alice",
                "request.created",
                Some("r1"),
                details,
            ),
        }
    }

    fn chain(n: u64) -> Vec<AuditEvent> {
        let mut out: Vec<AuditEvent> = Vec::new();
        for seq in 1..=n {
            let prev = out.last().map_or(GENESIS, |e| e.hash);
            out.push(ev(&prev, seq, &format!("{{\"n\":{seq}}}")));
        }
        out
    }

    fn first_bad(events: &[AuditEvent]) -> Option<u64> {
        let mut v = ChainVerifier::new();
        events
            .iter()
            .find_map(|e| v.push(e).err().map(|err| err.seq))
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(first_bad(&chain(5)), None);
    }

    #[test]
    fn any_single_tamper_is_detected_at_its_seq() {
        let good = chain(5);
        let mut altered = good.clone();
        altered[2].details = "{\"n\":99}".into();
        assert_eq!(first_bad(&altered), Some(3));
        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(first_bad(&deleted), Some(2));
        let mut reordered = good.clone();
        reordered.swap(1, 2);
        assert_eq!(first_bad(&reordered), Some(2));
        let mut inserted = good.clone();
        let mut extra = ev(&good[1].hash, 3, "{}");
        extra.seq = 3;
        inserted.insert(2, extra);
        // The inserted row links correctly to its predecessor but the real
        // seq 3 that follows it no longer does.
        assert_eq!(first_bad(&inserted), Some(3));
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[1,"x"],"c":null}}"#).expect("valid json");
        assert_eq!(canonical_json(&v), r#"{"a":{"c":null,"d":[1,"x"]},"b":1}"#);
    }

    #[test]
    fn checkpoints_sign_and_verify() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let cp = Checkpoint::sign(&key, 5, [1; 32], Timestamp(9));
        assert!(cp.verify(&key.verifying_key()));
        let mut forged = cp.clone();
        forged.seq = 4;
        assert!(!forged.verify(&key.verifying_key()));
        let json = serde_json::to_string(&cp).expect("serialises");
        let back: Checkpoint = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, cp);
    }

    #[test]
    fn checkpoints_name_their_key_and_verify_with_it_only() {
        let a = SigningKey::from_bytes(&[7; 32]);
        let b = SigningKey::from_bytes(&[8; 32]);
        let cp = Checkpoint::sign(&a, 5, [1; 32], Timestamp(9));
        assert_eq!(cp.key.as_deref(), Some(key_id(&a.verifying_key()).as_str()));
        assert!(!cp.verify(&b.verifying_key()));
        // Renaming the key breaks the signature: the name is signed.
        let mut renamed = cp.clone();
        renamed.key = Some(key_id(&b.verifying_key()));
        assert!(!renamed.verify(&a.verifying_key()));
        assert!(!renamed.verify(&b.verifying_key()));
        // Dropping the name does not turn it into a valid unnamed one.
        let mut unnamed = cp.clone();
        unnamed.key = None;
        assert!(!unnamed.verify(&a.verifying_key()));
    }

    #[test]
    fn unnamed_checkpoints_of_earlier_releases_still_verify() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let msg = checkpoint_message(5, &[1; 32], Timestamp(9), None, None);
        let old = Checkpoint {
            seq: 5,
            hash: [1; 32],
            time: Timestamp(9),
            signature: key.sign(&msg).to_bytes(),
            key: None,
            root: None,
        };
        assert!(old.verify(&key.verifying_key()));
        let json = serde_json::to_string(&old).expect("serialises");
        assert!(!json.contains("\"key\""), "{json}");
    }

    #[test]
    fn tree_heads_are_signed() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let cp = Checkpoint::sign_tree(&key, 5, [1; 32], [2; 32], Timestamp(9));
        assert!(cp.verify(&key.verifying_key()));
        let json = serde_json::to_string(&cp).expect("serialises");
        let back: Checkpoint = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, cp);
        let mut moved = cp.clone();
        moved.root = Some([3; 32]);
        assert!(!moved.verify(&key.verifying_key()));
        // Dropping the root does not leave a valid v2 checkpoint behind.
        let mut dropped = cp.clone();
        dropped.root = None;
        assert!(!dropped.verify(&key.verifying_key()));
        // A v2 checkpoint given a root does not verify either.
        let mut v2 = Checkpoint::sign(&key, 5, [1; 32], Timestamp(9));
        assert!(v2.verify(&key.verifying_key()));
        v2.root = Some([2; 32]);
        assert!(!v2.verify(&key.verifying_key()));
    }
}
