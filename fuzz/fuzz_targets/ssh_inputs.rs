//! What the SSH side parses itself: `ssh://` upstream addresses, pinned
//! host keys, and recordings turned into asciicasts (any JSON lines give a
//! cast or an error, never a panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = breakglass_server::ssh::parse_upstream(text);
    let _ = breakglass_gateway_ssh::keys::parse_public_key(text);
    let mut cast = breakglass_gateway_ssh::cast::CastBuilder::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            cast.push(&v);
        }
    }
    let _ = cast.finish();
});
