//! Bearer tokens shaped like JWTs: decoding (header, claims, signature
//! under their size limits), the registered-claims checks, JWKS parsing
//! and a signature check never panic; a token whose signature is not the
//! key's never verifies.
#![no_main]

use breakglass_core::Timestamp;
use breakglass_server::identity::jwt::{self, Expect, Jwk, KeyMaterial};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = jwt::parse_jwks(&v);
    }
    if !jwt::looks_like_jwt(text) {
        return;
    }
    let Ok(jws) = jwt::decode(text) else {
        return;
    };
    let _ = jwt::validate(
        &jws.claims,
        &Expect {
            issuer: "https://idp.example.com",
            audience: "breakglass",
            azp: "breakglass",
            leeway_s: 60,
            now: Timestamp(1_800_000_000_000),
        },
    );
    // A fixed Ed25519 public key nobody holds the secret of: nothing the
    // fuzzer makes may verify under it.
    let key = Jwk {
        kid: Some("k".into()),
        key: KeyMaterial::Ed25519 { x: vec![0x3b; 32] },
    };
    assert!(jws.verify(&[key]).is_err());
});
