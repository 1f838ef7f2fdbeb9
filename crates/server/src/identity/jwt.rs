//! JSON Web Tokens as the identity provider and workloads issue them:
//! splitting a compact JWS under size limits, JWK parsing, signature
//! verification with ring (RS256, ES256 and EdDSA only, the key's type
//! matching the algorithm), and the registered claims (`iss`, `aud`, `azp`,
//! `exp`, `nbf`, `iat`) with at most [`LEEWAY_MAX_S`] of clock leeway.
//!
//! Nothing here does IO or reads a clock: keys and `now` are arguments.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};
use thiserror::Error;

use breakglass_core::Timestamp;

/// A bearer token longer than this is refused before it is decoded.
pub const TOKEN_LEN_MAX: usize = 16 * 1024;
/// Decoded JOSE header bytes accepted at most.
pub const HEADER_LEN_MAX: usize = 1024;
/// Decoded claims bytes accepted at most (enough for a few hundred
/// groups; the whole token stays under [`TOKEN_LEN_MAX`]).
pub const CLAIMS_LEN_MAX: usize = 8 * 1024;
/// Decoded signature bytes accepted at most (an RSA-8192 signature is 1024).
pub const SIGNATURE_LEN_MAX: usize = 1024;
/// The most clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_MAX_S: i64 = 60;
/// Keys of one JWKS used at most; further keys are ignored.
pub const JWKS_KEYS_MAX: usize = 32;
/// Groups taken from one token at most.
pub const GROUPS_MAX: usize = 256;

/// Why a token is refused. Messages say what was wrong, never key material.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unsigned token (alg \"none\") refused")]
    Unsigned,
    #[error("signature algorithm {0:?} is not allowed (allowed: RS256, ES256, EdDSA)")]
    AlgNotAllowed(String),
    #[error("signing key {0:?} is unknown to the issuer's published keys (JWKS)")]
    UnknownKid(String),
    #[error("no published key of the issuer fits this token's algorithm {0}")]
    NoKey(&'static str),
    #[error("key {kid:?} is a {kty} key and cannot verify {alg}")]
    KeyTypeMismatch {
        kid: String,
        kty: &'static str,
        alg: &'static str,
    },
    #[error("bad signature")]
    BadSignature,
    #[error("token expired at {0}")]
    Expired(String),
    #[error("token not valid before {0}")]
    NotYetValid(String),
    #[error("token issued in the future ({0})")]
    IssuedInFuture(String),
    #[error("wrong issuer {got:?} (expected {want:?})")]
    WrongIssuer { got: String, want: String },
    #[error("wrong audience {got} (expected {want:?})")]
    WrongAudience { got: String, want: String },
    #[error(
        "token has several audiences and its authorized party (azp) is {got} (expected {want:?})"
    )]
    BadAzp { got: String, want: String },
    #[error("claim {0:?} is missing")]
    MissingClaim(String),
    #[error("claim {0:?} is invalid: {1}")]
    BadClaim(String, String),
}

/// The signature algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }

    /// Reads a JOSE `alg`; `none` and every other algorithm (HMAC
    /// included) are refused.
    pub fn parse(s: &str) -> Result<Alg, JwtError> {
        match s {
            "RS256" => Ok(Alg::Rs256),
            "ES256" => Ok(Alg::Es256),
            "EdDSA" => Ok(Alg::EdDsa),
            "none" | "None" | "NONE" | "" => Err(JwtError::Unsigned),
            other => Err(JwtError::AlgNotAllowed(truncate(other))),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// A public key from a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// Modulus and exponent, big-endian.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point `04 || x || y`.
    P256 {
        point: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

impl KeyMaterial {
    fn kty(&self) -> &'static str {
        match self {
            KeyMaterial::Rsa { .. } => "RSA",
            KeyMaterial::P256 { .. } => "EC P-256",
            KeyMaterial::Ed25519 { .. } => "OKP Ed25519",
        }
    }

    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self {
            KeyMaterial::Rsa { .. } => Alg::Rs256,
            KeyMaterial::P256 { .. } => Alg::Es256,
            KeyMaterial::Ed25519 { .. } => Alg::EdDsa,
        }
    }
}

/// One signing key of an issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    pub key: KeyMaterial,
}

fn b64(field: &str, v: &Value) -> Result<Vec<u8>, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("{field} is not a string"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("{field} is not base64url"))
}

/// Parses a JWKS document (`{"keys": [...]}`). Keys that are not for
/// signatures, or of a type or curve not accepted, are skipped; a key
/// whose `alg` names another algorithm than its type verifies is skipped
/// too. At most [`JWKS_KEYS_MAX`] keys are kept.
pub fn parse_jwks(doc: &Value) -> Result<Vec<Jwk>, String> {
    let keys = doc["keys"].as_array().ok_or("JWKS has no \"keys\" array")?;
    let mut out = Vec::new();
    for k in keys {
        if out.len() == JWKS_KEYS_MAX {
            break;
        }
        if k["use"].as_str().is_some_and(|u| u != "sig") {
            continue;
        }
        let key = match (k["kty"].as_str(), k["crv"].as_str()) {
            (Some("RSA"), _) => {
                let (Ok(n), Ok(e)) = (b64("n", &k["n"]), b64("e", &k["e"])) else {
                    continue;
                };
                KeyMaterial::Rsa { n, e }
            }
            (Some("EC"), Some("P-256")) => {
                let (Ok(x), Ok(y)) = (b64("x", &k["x"]), b64("y", &k["y"])) else {
                    continue;
                };
                if x.len() != 32 || y.len() != 32 {
                    continue;
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                KeyMaterial::P256 { point }
            }
            (Some("OKP"), Some("Ed25519")) => {
                let Ok(x) = b64("x", &k["x"]) else {
                    continue;
                };
                if x.len() != 32 {
                    continue;
                }
                KeyMaterial::Ed25519 { x }
            }
            _ => continue,
        };
        // INVARIANT: a key verifies exactly one algorithm, the one of its
        // type; a JWKS that labels it otherwise does not widen that.
        if let Some(alg) = k["alg"].as_str()
            && alg != key.alg().as_str()
        {
            continue;
        }
        out.push(Jwk {
            kid: k["kid"].as_str().map(str::to_string),
            key,
        });
    }
    Ok(out)
}

/// A compact JWS split and decoded, not yet verified.
#[derive(Debug)]
pub struct Jws<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    signing_input: &'a [u8],
    signature: Vec<u8>,
}

/// Whether a bearer token has the shape of a JWT (three base64url
/// segments). Such a token is only ever verified as a JWT, never as a
/// local principal's token.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

fn decode_segment(name: &str, seg: &str, max: usize) -> Result<Vec<u8>, JwtError> {
    // base64 grows data by 4/3: refuse before decoding.
    if seg.len() > max.div_ceil(3) * 4 + 4 {
        return Err(JwtError::Malformed(format!(
            "{name} is larger than {max} bytes"
        )));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(seg.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed(format!("{name} is not base64url")))?;
    if bytes.len() > max {
        return Err(JwtError::Malformed(format!(
            "{name} is larger than {max} bytes"
        )));
    }
    Ok(bytes)
}

fn json_object(name: &str, bytes: &[u8]) -> Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(JwtError::Malformed(format!("{name} is not a JSON object"))),
        Err(_) => Err(JwtError::Malformed(format!("{name} is not JSON"))),
    }
}

/// Splits and decodes a compact JWS, under the size limits. The header
/// must name an accepted algorithm and no critical extension.
pub fn decode(token: &str) -> Result<Jws<'_>, JwtError> {
    if token.len() > TOKEN_LEN_MAX {
        return Err(JwtError::Malformed(format!(
            "token is longer than {TOKEN_LEN_MAX} bytes"
        )));
    }
    let mut parts = token.splitn(3, '.');
    let (Some(h), Some(c), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("expected three segments".into()));
    };
    let header = json_object("header", &decode_segment("header", h, HEADER_LEN_MAX)?)?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => Alg::parse(a)?,
        _ => return Err(JwtError::Malformed("header has no alg".into())),
    };
    if header.contains_key("crit") {
        return Err(JwtError::Malformed(
            "header names critical extensions (crit), none are supported".into(),
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if k.len() <= 256 => Some(k.clone()),
        Some(_) => {
            return Err(JwtError::Malformed(
                "header kid is not a short string".into(),
            ));
        }
    };
    let claims = json_object("claims", &decode_segment("claims", c, CLAIMS_LEN_MAX)?)?;
    let signature = decode_segment("signature", s, SIGNATURE_LEN_MAX)?;
    if signature.is_empty() {
        return Err(JwtError::Unsigned);
    }
    Ok(Jws {
        alg,
        kid,
        claims,
        signing_input: &token.as_bytes()[..h.len() + 1 + c.len()],
        signature,
    })
}

impl Jws<'_> {
    /// Verifies the signature with `key`. The key's type must be the
    /// algorithm's: an RSA key never verifies ES256 or an HMAC.
    pub fn verify_with(&self, key: &Jwk) -> Result<(), JwtError> {
        if key.key.alg() != self.alg {
            return Err(JwtError::KeyTypeMismatch {
                kid: key.kid.clone().unwrap_or_default(),
                kty: key.key.kty(),
                alg: self.alg.as_str(),
            });
        }
        let msg = self.signing_input;
        let sig = &self.signature;
        let ok = match &key.key {
            KeyMaterial::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
                .is_ok(),
            KeyMaterial::P256 { point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            KeyMaterial::Ed25519 { x } => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(msg, sig)
                .is_ok(),
        };
        if ok {
            Ok(())
        } else {
            Err(JwtError::BadSignature)
        }
    }

    /// Verifies the signature against an issuer's keys: the key named by
    /// `kid`, or without a `kid` every key of the algorithm's type.
    pub fn verify(&self, keys: &[Jwk]) -> Result<(), JwtError> {
        match &self.kid {
            Some(kid) => {
                let key = keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid))
                    .ok_or_else(|| JwtError::UnknownKid(truncate(kid)))?;
                self.verify_with(key)
            }
            None => {
                let mut fitting = keys.iter().filter(|k| k.key.alg() == self.alg).peekable();
                if fitting.peek().is_none() {
                    return Err(JwtError::NoKey(self.alg.as_str()));
                }
                if fitting.any(|k| self.verify_with(k).is_ok()) {
                    Ok(())
                } else {
                    Err(JwtError::BadSignature)
                }
            }
        }
    }
}

/// What the registered claims must say.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    /// The authorized party required when `aud` has several values.
    pub azp: &'a str,
    pub leeway_s: i64,
    pub now: Timestamp,
}

/// The registered claims after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub expires_at: Timestamp,
    pub issued_at: Timestamp,
    pub auth_time: Option<Timestamp>,
}

/// A NumericDate claim in seconds (integers; a fraction is cut).
fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .filter(|s| (0..=253_402_300_799).contains(s))
            .map(Some)
            .ok_or_else(|| JwtError::BadClaim(name.into(), "not a date in seconds".into())),
    }
}

fn at(s: i64) -> Timestamp {
    Timestamp(s.saturating_mul(1000))
}

/// Checks `iss`, `aud` (and `azp` when `aud` has several values), `exp`
/// (required), `nbf`, `iat` (required) against `want`.
pub fn validate(claims: &Map<String, Value>, want: &Expect<'_>) -> Result<Registered, JwtError> {
    let leeway_ms = want.leeway_s.clamp(0, LEEWAY_MAX_S) * 1000;
    let now = want.now.millis();
    match claims.get("iss").and_then(Value::as_str) {
        Some(iss) if iss == want.issuer => {}
        Some(iss) => {
            return Err(JwtError::WrongIssuer {
                got: truncate(iss),
                want: want.issuer.into(),
            });
        }
        None => return Err(JwtError::MissingClaim("iss".into())),
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).take(16).collect(),
        _ => return Err(JwtError::MissingClaim("aud".into())),
    };
    if !auds.contains(&want.audience) {
        return Err(JwtError::WrongAudience {
            got: format!("{:?}", auds.iter().map(|a| truncate(a)).collect::<Vec<_>>()),
            want: want.audience.into(),
        });
    }
    if auds.len() > 1 {
        match claims.get("azp").and_then(Value::as_str) {
            Some(azp) if azp == want.azp => {}
            other => {
                return Err(JwtError::BadAzp {
                    got: other.map_or("missing".to_string(), |a| format!("{:?}", truncate(a))),
                    want: want.azp.into(),
                });
            }
        }
    }
    let exp = numeric(claims, "exp")?.ok_or_else(|| JwtError::MissingClaim("exp".into()))?;
    if now >= at(exp).millis().saturating_add(leeway_ms) {
        return Err(JwtError::Expired(at(exp).to_rfc3339()));
    }
    if let Some(nbf) = numeric(claims, "nbf")?
        && now < at(nbf).millis().saturating_sub(leeway_ms)
    {
        return Err(JwtError::NotYetValid(at(nbf).to_rfc3339()));
    }
    let iat = numeric(claims, "iat")?.ok_or_else(|| JwtError::MissingClaim("iat".into()))?;
    if at(iat).millis() > now.saturating_add(leeway_ms) {
        return Err(JwtError::IssuedInFuture(at(iat).to_rfc3339()));
    }
    let auth_time = numeric(claims, "auth_time")?;
    Ok(Registered {
        expires_at: at(exp),
        issued_at: at(iat),
        auth_time: auth_time.map(at),
    })
}

/// A claim as text, for names and matching: strings as they are, numbers
/// and booleans written out; anything else is not text.
pub fn claim_text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seg(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn refusal(token: &str) -> String {
        decode(token)
            .map(|_| "decoded".to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn decoding_has_limits_and_refuses_what_it_cannot_check() {
        let claims = seg(&json!({"iss": "x"}));
        let header = seg(&json!({"alg": "ES256", "kid": "k"}));
        assert_eq!(refusal(&format!("{header}.{claims}.c2ln")), "decoded");
        assert!(looks_like_jwt(&format!("{header}.{claims}.c2ln")));
        assert!(!looks_like_jwt("bgp_0123abcd"));
        assert!(!looks_like_jwt("a.b"));
        let big = "a".repeat(TOKEN_LEN_MAX);
        assert!(refusal(&format!("{header}.{big}.c2ln")).contains("longer than"));
        let big_header = seg(&json!({"alg": "ES256", "x": "y".repeat(HEADER_LEN_MAX)}));
        assert!(refusal(&format!("{big_header}.{claims}.c2ln")).contains("header is larger"));
        let big_claims = seg(&json!({"x": "y".repeat(CLAIMS_LEN_MAX)}));
        assert!(refusal(&format!("{header}.{big_claims}.c2ln")).contains("claims is larger"));
        let crit = seg(&json!({"alg": "ES256", "crit": ["b64"]}));
        assert!(refusal(&format!("{crit}.{claims}.c2ln")).contains("crit"));
        let none = seg(&json!({"alg": "none"}));
        assert_eq!(
            refusal(&format!("{none}.{claims}.")),
            JwtError::Unsigned.to_string()
        );
        let hs = seg(&json!({"alg": "HS256"}));
        assert!(refusal(&format!("{hs}.{claims}.c2ln")).contains("not allowed"));
        assert_eq!(
            refusal(&format!("{header}.{claims}.")),
            JwtError::Unsigned.to_string()
        );
        let list = seg(&json!([1, 2]));
        assert!(refusal(&format!("{header}.{list}.c2ln")).contains("not a JSON object"));
        assert!(refusal(&format!("{header}.%%%.c2ln")).contains("not base64url"));
    }

    #[test]
    fn jwks_keys_verify_only_their_own_algorithm() {
        let x = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": x},
            {"kty": "OKP", "crv": "Ed25519", "kid": "labelled-rs", "alg": "RS256", "x": x},
            {"kty": "oct", "kid": "hmac", "k": x},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": x, "y": x},
            {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": x},
        ]});
        let keys = parse_jwks(&doc).expect("parses");
        let kids: Vec<_> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["ed"]);
        assert_eq!(keys[0].key.alg(), Alg::EdDsa);
        assert!(parse_jwks(&json!({"nokeys": []})).is_err());
    }

    #[test]
    fn registered_claims_are_checked_with_bounded_leeway() {
        let now = Timestamp(1_800_000_000_000);
        let s = 1_800_000_000i64;
        let want = Expect {
            issuer: "https://idp",
            audience: "bg",
            azp: "bg",
            // More than the maximum is cut to 60 s.
            leeway_s: 3600,
            now,
        };
        let check = |v: Value| {
            validate(v.as_object().expect("object"), &want)
                .map(|_| "ok".to_string())
                .unwrap_or_else(|e| e.to_string())
        };
        let base = json!({"iss": "https://idp", "aud": "bg", "iat": s, "exp": s + 60});
        assert_eq!(check(base.clone()), "ok");
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        assert_eq!(check(with("exp", json!(s - 59))), "ok", "within the leeway");
        assert!(check(with("exp", json!(s - 61))).contains("expired"));
        assert_eq!(check(with("nbf", json!(s + 59))), "ok");
        assert!(check(with("nbf", json!(s + 61))).contains("not valid before"));
        assert!(check(with("iat", json!(s + 61))).contains("issued in the future"));
        assert!(check(with("exp", json!("soon"))).contains("not a date"));
        assert!(check(with("aud", json!(["bg", "x"]))).contains("azp"));
        assert_eq!(
            check({
                let mut b = with("aud", json!(["bg", "x"]));
                b["azp"] = json!("bg");
                b
            }),
            "ok"
        );
        let mut no_exp = base.clone();
        no_exp.as_object_mut().expect("object").remove("exp");
        assert!(check(no_exp).contains("\"exp\" is missing"));
    }
}
