//! Secrets: principal API tokens (stored as SHA-256 in the config) and grant
//! credentials (random, handed out once, stored only as SHA-256).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of grant credentials, so a leaked one is recognisable in logs and
/// secret scanners.
pub const GRANT_TOKEN_PREFIX: &str = "bgg_";
/// Tokens longer than this are refused before hashing.
pub const TOKEN_LEN_MAX: usize = 512;

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256(data))
}

/// Builds a grant token from 32 random bytes supplied by the caller.
pub fn grant_token(random: [u8; 32]) -> String {
    format!("{GRANT_TOKEN_PREFIX}{}", hex::encode(random))
}

/// The digest under which a grant token is stored and looked up.
pub fn token_hash(token: &str) -> [u8; 32] {
    sha256(token.as_bytes())
}

/// Constant-time equality of two digests.
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Finds which of `candidates` (SHA-256 digests) `token` hashes to. Every
/// candidate is compared, in constant time, whatever matches first.
pub fn match_token<'a, T>(
    token: &str,
    candidates: impl IntoIterator<Item = (&'a [u8; 32], T)>,
) -> Option<T> {
    if token.is_empty() || token.len() > TOKEN_LEN_MAX {
        return None;
    }
    let digest = token_hash(token);
    let mut found = None;
    for (c, value) in candidates {
        if digest_eq(&digest, c) && found.is_none() {
            found = Some(value);
        }
    }
    found
}

/// Parses a lowercase or uppercase hex SHA-256 from the config.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_their_digest() {
        let a = token_hash("alpha");
        let b = token_hash("beta");
        let list = [(&a, "a"), (&b, "b")];
        assert_eq!(match_token("beta", list), Some("b"));
        assert_eq!(match_token("gamma", list), None);
        assert_eq!(match_token("", list), None);
        assert_eq!(parse_sha256_hex(&sha256_hex(b"alpha")), Some(a));
        assert_eq!(parse_sha256_hex("zz"), None);
        assert!(grant_token([0xab; 32]).starts_with("bgg_abab"));
    }
}
