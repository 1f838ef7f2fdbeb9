//! Console sign-in sessions: who signed in, until when, and the CSRF token
//! every form of the session carries.
//!
//! A session lives in this node's memory, keyed by the SHA-256 of the
//! random id in its cookie (the id itself is never stored). It ends with
//! the token it was made from, after `SESSION_LIFETIME_S` at most, at
//! sign-out, and at a restart of the node.

use std::collections::HashMap;
use std::sync::Mutex;

use breakglass_core::{Principal, Timestamp};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Sessions held at once; past it (after dropping the ended ones) a new
/// sign-in is refused.
pub const SESSIONS_MAX: usize = 10_000;
/// A session ends this long after signing in, whatever the token says.
pub const SESSION_LIFETIME_S: u64 = 12 * 3600;
/// Bytes of a session id or CSRF token as sent (64 hex digits).
pub const SESSION_ID_LEN: usize = 64;

/// A signed-in person as the console knows them.
#[derive(Clone)]
pub struct SignedIn {
    pub principal: Principal,
    /// Every form of this session carries it.
    pub csrf: String,
    pub expires_at: Timestamp,
}

impl SignedIn {
    /// Whether a form's CSRF token is this session's (constant time).
    pub fn csrf_ok(&self, sent: &str) -> bool {
        same_secret(sent, &self.csrf)
    }
}

/// Whether `sent` is the non-empty secret `kept` (a CSRF token, a
/// sign-in's state or nonce), compared in constant time.
pub fn same_secret(sent: &str, kept: &str) -> bool {
    !kept.is_empty()
        && sent.len() == kept.len()
        && bool::from(sent.as_bytes().ct_eq(kept.as_bytes()))
}

/// The sessions of this node.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<[u8; 32], SignedIn>>,
}

/// 32 random bytes in hex.
pub fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for `who` until `expires_at`; returns its id (for
    /// the cookie) and the session, or `None` when the table is full.
    pub fn start(
        &self,
        who: Principal,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Option<(String, SignedIn)> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SESSIONS_MAX {
            map.retain(|_, s| s.expires_at > now);
            if map.len() >= SESSIONS_MAX {
                return None;
            }
        }
        let id = random_hex();
        let s = SignedIn {
            principal: who,
            csrf: random_hex(),
            expires_at,
        };
        map.insert(key(&id), s.clone());
        Some((id, s))
    }

    /// The live session with this id.
    pub fn get(&self, id: &str, now: Timestamp) -> Option<SignedIn> {
        if id.len() != SESSION_ID_LEN {
            return None;
        }
        let k = key(id);
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&k) {
            Some(s) if s.expires_at > now => Some(s.clone()),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends a session (sign-out).
    pub fn remove(&self, id: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&key(id));
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Principal {
        Principal::local("alice", ["oncall".to_string()].into(), false)
    }

    #[test]
    fn a_session_ends_at_its_expiry_and_at_sign_out() {
        let s = Sessions::default();
        let now = Timestamp(1_000_000);
        let (id, signed) = s.start(who(), Timestamp(2_000_000), now).expect("room");
        assert!(s.get(&id, now).is_some());
        assert!(signed.csrf_ok(&signed.csrf));
        assert!(!signed.csrf_ok(&random_hex()));
        assert!(!signed.csrf_ok(""));
        assert!(
            s.get(&id, Timestamp(2_000_000)).is_none(),
            "ended at expiry"
        );
        let (id, _) = s.start(who(), Timestamp(2_000_000), now).expect("room");
        s.remove(&id);
        assert!(s.get(&id, now).is_none(), "ended at sign-out");
        assert!(s.get("short", now).is_none());
    }
}
