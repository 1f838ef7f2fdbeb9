//! Recording entries encoded straight into canonical JSON.
//!
//! The hot path of a busy session writes an entry per statement and per
//! outcome, so entries are not built as `serde_json::Value`s: the fields are
//! written in canonical order (keys sorted bytewise, no whitespace, strings
//! escaped exactly as `serde_json` escapes them) into the output buffer, and
//! those bytes are what the chain hashes. Readers still parse each line and
//! re-canonicalise it with [`breakglass_core::audit::canonical_json`]; the
//! tests below hold the two encodings byte-identical.

/// A member value of an entry.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Str(&'a str),
    /// A string that needs no escaping (base64, hex digits): written
    /// between quotes as it is.
    Plain(&'a str),
    U64(u64),
    /// Canonical JSON already (an array, an object, `null`).
    Json(&'a str),
}

/// Members every entry has; callers' fields must not use these keys.
pub const RESERVED: [&str; 4] = ["hash", "kind", "seq", "time"];

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// The index of the first byte at or after `from` that needs escaping
/// (`bytes.len()` when none does); whole chunks are checked without
/// branches, so long clean runs (base64, plain text) cost little.
fn clean_until(bytes: &[u8], from: usize) -> usize {
    const CHUNK: usize = 32;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + CHUNK) {
        if chunk
            .iter()
            .fold(false, |dirty, &b| dirty | needs_escape(b))
        {
            break;
        }
        i += CHUNK;
    }
    while i < bytes.len() && !needs_escape(bytes[i]) {
        i += 1;
    }
    i
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = clean_until(bytes, 0);
    while let Some(&b) = bytes.get(i) {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => &[],
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
        i = clean_until(bytes, start);
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn write_field(out: &mut Vec<u8>, key: &str, value: Field<'_>) {
    write_str(out, key);
    out.push(b':');
    match value {
        Field::Str(s) => write_str(out, s),
        Field::Plain(s) => {
            debug_assert!(!s.bytes().any(needs_escape), "Field::Plain needs escaping");
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Field::U64(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        Field::Json(j) => out.extend_from_slice(j.as_bytes()),
    }
}

/// Appends the canonical JSON object of an entry: `fields` merged with
/// `kind`, `seq` and `time`. `fields` must be sorted by key, unique, and
/// free of [`RESERVED`] keys.
pub fn write_entry(
    out: &mut Vec<u8>,
    fields: &[(&str, Field<'_>)],
    kind: &str,
    seq: u64,
    time: &str,
) {
    debug_assert!(
        fields.windows(2).all(|w| w[0].0 < w[1].0),
        "fields unsorted"
    );
    debug_assert!(fields.iter().all(|(k, _)| !RESERVED.contains(k)));
    let fixed = [
        ("kind", Field::Str(kind)),
        ("seq", Field::U64(seq)),
        ("time", Field::Str(time)),
    ];
    let (mut a, mut b) = (fields.iter().peekable(), fixed.iter().peekable());
    out.push(b'{');
    let mut first = true;
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 < y.0 => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => break,
        };
        let Some(&(key, value)) = next else { break };
        if !first {
            out.push(b',');
        }
        first = false;
        write_field(out, key, value);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakglass_core::audit::canonical_json;
    use rand::{Rng, SeedableRng};
    use serde_json::{Value, json};

    fn random_string(rng: &mut rand::rngs::StdRng) -> String {
        let len = rng.gen_range(0..24);
        (0..len)
            .map(|_| match rng.gen_range(0..4) {
                0 => char::from(rng.gen_range(0u8..0x80)),
                1 => ['"', '\\', '\n', '\u{7f}', '\u{1f}', '/'][rng.gen_range(0..6)],
                2 => ['é', '€', '𝄞', '\u{2028}', '\u{fffd}'][rng.gen_range(0..5)],
                _ => char::from(rng.gen_range(b'a'..=b'z')),
            })
            .collect()
    }

    #[test]
    fn strings_escape_like_serde_json() {
        for b in 0u8..0x80 {
            let s = format!("a{}b", char::from(b));
            let mut out = Vec::new();
            write_str(&mut out, &s);
            assert_eq!(
                String::from_utf8(out).expect("utf-8"),
                serde_json::to_string(&s).expect("json"),
                "byte {b:#x}"
            );
        }
    }

    #[test]
    fn long_strings_escape_like_serde_json() {
        // Long clean runs are skipped chunk by chunk: escapes at every
        // position relative to the chunks must still be found.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..2000 {
            let len = rng.gen_range(0..300);
            let s: String = (0..len)
                .map(|_| match rng.gen_range(0..40) {
                    0 => ['"', '\\', '\n', '\u{0}', '\u{1b}', 'é'][rng.gen_range(0..6)],
                    _ => char::from(rng.gen_range(b' '..=b'~')),
                })
                .collect();
            let mut out = Vec::new();
            write_str(&mut out, &s);
            assert_eq!(
                String::from_utf8(out).expect("utf-8"),
                serde_json::to_string(&s).expect("json")
            );
        }
    }

    #[test]
    fn entries_are_canonical_json() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let keys = [
            "code",
            "message",
            "params",
            "portal",
            "statement",
            "tag",
            "text",
            "z",
        ];
        for _ in 0..2000 {
            let mut chosen: Vec<&str> =
                keys.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
            chosen.sort_unstable();
            let strings: Vec<String> = chosen.iter().map(|_| random_string(&mut rng)).collect();
            let array = {
                let items: Vec<String> = (0..rng.gen_range(0..3))
                    .map(|_| random_string(&mut rng))
                    .collect();
                canonical_json(&json!(items))
            };
            let fields: Vec<(&str, Field<'_>)> = chosen
                .iter()
                .zip(&strings)
                .map(|(&k, s)| match k {
                    "statement" => (k, Field::U64(rng.r#gen())),
                    "params" => (k, Field::Json(&array)),
                    _ => (k, Field::Str(s)),
                })
                .collect();
            let kind = random_string(&mut rng);
            let seq = rng.r#gen::<u64>();
            let mut out = Vec::new();
            write_entry(&mut out, &fields, &kind, seq, "2026-11-29T04:05:06.789Z");
            let text = String::from_utf8(out).expect("utf-8");
            let parsed: Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(canonical_json(&parsed), text);
            assert_eq!(parsed["seq"], json!(seq));
            assert_eq!(parsed["kind"], json!(kind));
        }
    }
}
