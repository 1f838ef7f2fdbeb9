//! Bytes that crossed a gateway (terminal input and output), as a
//! recording entry carries them: `data`, the text, when the bytes are
//! UTF-8 and escaping them for JSON adds at most half their length;
//! otherwise `b64`, the exact bytes in standard base64 (a third more).
//! Typed keys and terminal output, escape sequences included, stay
//! readable in the file, and binary output (`head -c 1G /dev/zero`, a
//! compressed stream) costs a third more, not six times as much (`\u0000`
//! per zero byte).
//!
//! Recordings written before `b64` existed hold `data` with bad UTF-8
//! replaced and `hex` with the exact bytes; [`bytes_of`] reads both.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use crate::entry::Field;

/// The member that carries `bytes` in a recording entry.
pub enum Data<'a> {
    Text(&'a str),
    Base64(String),
}

impl<'a> Data<'a> {
    pub fn of(bytes: &'a [u8]) -> Data<'a> {
        if escapes_fit(bytes, bytes.len() / 2)
            && let Ok(text) = std::str::from_utf8(bytes)
        {
            return Data::Text(text);
        }
        // Every byte of binary output is encoded on the relay path, so the
        // SIMD encoder (several times faster); the same standard alphabet
        // with padding, as the test against `base64` checks.
        Data::Base64(base64_simd::STANDARD.encode_to_string(bytes))
    }

    /// The entry member: `("data", text)` or `("b64", base64)`.
    pub fn field(&self) -> (&'static str, Field<'_>) {
        match self {
            Data::Text(t) => ("data", Field::Str(t)),
            Data::Base64(b) => ("b64", Field::Plain(b)),
        }
    }
}

/// What escaping `b` for JSON adds (see [`crate::entry::write_str`]).
#[cfg(test)]
fn escape_cost(b: u8) -> usize {
    let control = usize::from(b < 0x20);
    let short = usize::from(matches!(b, b'\n' | b'\r' | b'\t' | 0x08 | 0x0c));
    let quoted = usize::from(b == b'"' || b == b'\\');
    control * 5 - short * 4 + quoted
}

/// Whether escaping `bytes` for JSON adds at most `max` bytes; stops at
/// the first chunk past it (binary output is told apart quickly). Each
/// count is a plain comparison over the chunk, which vectorises.
fn escapes_fit(bytes: &[u8], max: usize) -> bool {
    let mut added = 0;
    for chunk in bytes.chunks(64) {
        let control = chunk.iter().filter(|&&b| b < 0x20).count();
        let short = chunk
            .iter()
            .filter(|&&b| matches!(b, b'\n' | b'\r' | b'\t' | 0x08 | 0x0c))
            .count();
        let quoted = chunk.iter().filter(|&&b| b == b'"' || b == b'\\').count();
        added += control * 5 - short * 4 + quoted;
        if added > max {
            return false;
        }
    }
    true
}

/// The exact bytes an `i` or `o` entry carries (`b64`, then the older
/// `hex`, then `data`); `None` when `b64` or `hex` is not valid.
pub fn bytes_of(entry: &Value) -> Option<Vec<u8>> {
    if let Some(b) = entry["b64"].as_str() {
        return STANDARD.decode(b).ok();
    }
    if let Some(h) = entry["hex"].as_str() {
        return hex::decode(h).ok();
    }
    Some(entry["data"].as_str().unwrap_or("").as_bytes().to_vec())
}

/// How many bytes an `i` or `o` entry carries, without decoding them.
pub fn len_of(entry: &Value) -> u64 {
    if let Some(b) = entry["b64"].as_str() {
        let pad = b.bytes().rev().take_while(|&c| c == b'=').count();
        return (b.len() / 4 * 3).saturating_sub(pad) as u64;
    }
    if let Some(h) = entry["hex"].as_str() {
        return h.len() as u64 / 2;
    }
    entry["data"].as_str().map_or(0, |d| d.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::write_str;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn entry_of(bytes: &[u8]) -> Value {
        let data = Data::of(bytes);
        let (key, Field::Str(s) | Field::Plain(s)) = data.field() else {
            unreachable!("data members are strings")
        };
        json!({ "kind": "o", key: s })
    }

    #[test]
    fn text_stays_text_and_binary_becomes_base64() {
        let e = entry_of(b"ls -l\r\n\x1b[0mtotal 0\r\n");
        assert_eq!(e["data"], "ls -l\r\n\u{1b}[0mtotal 0\r\n");
        assert!(e.get("b64").is_none());
        let e = entry_of(&[0u8; 64]);
        assert!(e.get("data").is_none());
        assert_eq!(e["b64"].as_str().map(str::len), Some(88));
        let e = entry_of(b"caf\xc3");
        assert_eq!(e["b64"], "Y2Fmww==");
        assert_eq!(entry_of(b"")["data"], "");
    }

    #[test]
    fn every_byte_string_reads_back_exactly_in_its_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let alphabet: &[u8] = b"ab \r\n\t\"\\\x00\x1b\x7f\xc3\xa9\xe2\x82\xac\xff";
        for _ in 0..5000 {
            let len = rng.gen_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let e = entry_of(&bytes);
            assert_eq!(bytes_of(&e).as_deref(), Some(&bytes[..]), "{bytes:?}");
            assert_eq!(len_of(&e), bytes.len() as u64, "{bytes:?}");
            let encoded = serde_json::to_string(&e["data"]).unwrap_or_default();
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let mut json = Vec::new();
                write_str(&mut json, text);
                let added: usize = bytes.iter().map(|&b| escape_cost(b)).sum();
                assert_eq!(json.len() - 2, bytes.len() + added);
                let text_max = bytes.len() + bytes.len() / 2;
                assert_eq!(
                    e.get("data").is_some(),
                    json.len() - 2 <= text_max,
                    "{encoded}"
                );
            } else {
                assert!(e.get("b64").is_some());
            }
        }
    }

    #[test]
    fn binary_is_encoded_as_the_base64_crate_encodes_it() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        // Every length around the SIMD block sizes, then large packets.
        let lens = (0..200).chain([4095, 4096, 32_768, 32_769, 262_144]);
        for len in lens {
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            if let Some(first) = bytes.first_mut() {
                *first = 0; // never text
            }
            let Data::Base64(b) = Data::of(&bytes) else {
                assert!(len == 0, "{len} bytes stayed text");
                continue;
            };
            assert_eq!(b, STANDARD.encode(&bytes), "{len} bytes");
        }
    }

    #[test]
    fn older_entries_with_hex_still_read() {
        let e = json!({"kind": "o", "data": "caf\u{fffd}", "hex": "636166c3"});
        assert_eq!(bytes_of(&e), Some(b"caf\xc3".to_vec()));
        assert_eq!(len_of(&e), 4);
        assert_eq!(bytes_of(&json!({"b64": "!!"})), None);
    }
}
