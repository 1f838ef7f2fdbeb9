//! An SSH session recording as an asciicast v2 file (what `asciinema play`,
//! `asciinema cat` and asciinema-player read): a header line with the
//! terminal size, then `[time, "o"|"i"|"r", data]` events.
//!
//! The recording's entries are read in order (see `session` for the
//! kinds): the first `pty` gives the size (80x24 without one), `exec`
//! gives the header's `command`, `o` and `i` become output and input
//! events, `r` resize events. Bytes are rebuilt exactly (`b64`, or `hex`
//! in older recordings), and a UTF-8 character split across two chunks is
//! joined again, so the cast's text is what the terminal showed.

use breakglass_core::Timestamp;
use breakglass_gateway_common::data;
use serde_json::{Value, json};

/// Columns and rows of a cast without a terminal.
const DEFAULT_SIZE: (u64, u64) = (80, 24);

/// Builds a cast from a recording's entries, in order.
#[derive(Debug, Default)]
pub struct CastBuilder {
    start_ms: Option<i64>,
    size: Option<(u64, u64)>,
    command: Option<String>,
    term: Option<String>,
    title: Option<String>,
    events: Vec<String>,
    /// Bytes of an unfinished UTF-8 character, per stream (`o`, `i`).
    carry: [Vec<u8>; 2],
    /// A recording of another protocol: no cast.
    foreign: bool,
    /// The time of the newest entry, for what is left in `carry` at the end.
    last_t: f64,
}

/// A recording that is not an SSH session's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recording of a {0} session; only SSH sessions have an asciicast")]
pub struct NotSsh(pub String);

/// How many bytes at the end of `b` begin a UTF-8 character that the next
/// chunk may complete (whatever came before them).
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let start = b.len() - back;
        // The last byte that is not a continuation starts the character.
        if b[start] & 0xC0 != 0x80 {
            return match std::str::from_utf8(&b[start..]) {
                Err(e) if e.valid_up_to() == 0 && e.error_len().is_none() => back,
                _ => 0,
            };
        }
    }
    0
}

/// Splits `bytes` after its last complete UTF-8 character; the rest waits
/// for the next chunk (bytes that can never be UTF-8 are replaced).
fn take_text(carry: &mut Vec<u8>, bytes: &[u8]) -> String {
    carry.extend_from_slice(bytes);
    let keep = incomplete_tail(carry);
    let tail = carry.split_off(carry.len() - keep);
    let text = String::from_utf8_lossy(carry).into_owned();
    *carry = tail;
    text
}

impl CastBuilder {
    pub fn new() -> CastBuilder {
        CastBuilder::default()
    }

    /// Takes in one entry.
    pub fn push(&mut self, entry: &Value) {
        let ms = entry["time"]
            .as_str()
            .and_then(|t| Timestamp::parse_rfc3339(t).ok())
            .map(Timestamp::millis);
        let kind = entry["kind"].as_str().unwrap_or("");
        if kind == "session" {
            let protocol = entry["protocol"].as_str().unwrap_or("postgres");
            if protocol != "ssh" {
                self.foreign = true;
            }
            self.start_ms = ms;
            self.title = Some(format!(
                "{} on {} ({})",
                entry["principal"].as_str().unwrap_or("?"),
                entry["target"].as_str().unwrap_or("?"),
                entry["session_id"].as_str().unwrap_or("?"),
            ));
            return;
        }
        let start = *self.start_ms.get_or_insert(ms.unwrap_or(0));
        let t = (ms.unwrap_or(start) - start).max(0) as f64 / 1000.0;
        self.last_t = self.last_t.max(t);
        match kind {
            "pty" if self.size.is_none() => {
                self.size = Some((
                    entry["cols"].as_u64().unwrap_or(DEFAULT_SIZE.0),
                    entry["rows"].as_u64().unwrap_or(DEFAULT_SIZE.1),
                ));
                self.term = entry["term"].as_str().map(str::to_string);
            }
            "exec" if self.command.is_none() => {
                self.command = entry["command"].as_str().map(str::to_string);
            }
            "o" | "i" => {
                let slot = usize::from(kind == "i");
                // The chain was verified before the cast is built, so only
                // a gateway that wrote bad base64 leaves nothing here.
                let bytes = data::bytes_of(entry).unwrap_or_default();
                let text = take_text(&mut self.carry[slot], &bytes);
                if !text.is_empty() {
                    self.events.push(json!([t, kind, text]).to_string());
                }
            }
            "r" => {
                let size = format!(
                    "{}x{}",
                    entry["cols"].as_u64().unwrap_or(DEFAULT_SIZE.0),
                    entry["rows"].as_u64().unwrap_or(DEFAULT_SIZE.1)
                );
                self.events.push(json!([t, "r", size]).to_string());
            }
            _ => {}
        }
    }

    /// The cast: header line, then one line per event.
    pub fn finish(self) -> Result<String, NotSsh> {
        if self.foreign {
            return Err(NotSsh("PostgreSQL".into()));
        }
        let (width, height) = self.size.unwrap_or(DEFAULT_SIZE);
        let mut header = json!({
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": self.start_ms.unwrap_or(0).div_euclid(1000),
        });
        if let Some(c) = self.command {
            header["command"] = json!(c);
        }
        if let Some(t) = self.title {
            header["title"] = json!(t);
        }
        if let Some(term) = self.term {
            header["env"] = json!({ "TERM": term });
        }
        let mut out = header.to_string();
        out.push('\n');
        // A stream that ended inside a character: those bytes are shown as
        // the replacement they are, not dropped.
        let mut events = self.events;
        for (slot, kind) in [(0, "o"), (1, "i")] {
            if !self.carry[slot].is_empty() {
                let text = String::from_utf8_lossy(&self.carry[slot]).into_owned();
                events.push(json!([self.last_t, kind, text]).to_string());
            }
        }
        for e in events {
            out.push_str(&e);
            out.push('\n');
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use expect_test::expect;

    fn cast(entries: &[Value]) -> Result<String, NotSsh> {
        let mut b = CastBuilder::new();
        for e in entries {
            b.push(e);
        }
        b.finish()
    }

    /// Output cut into chunks anywhere, valid UTF-8 or not: the cast's
    /// output text is the whole stream's text, whatever the cuts.
    #[test]
    fn any_chunking_of_any_bytes_gives_the_streams_text() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_ca57);
        for case in 0..2_000 {
            let len = rng.gen_range(0..64);
            // Mostly multi-byte UTF-8, with stray continuation and lead
            // bytes mixed in.
            let all: Vec<u8> = if case % 2 == 0 {
                (0..len).map(|_| rng.r#gen::<u8>()).collect()
            } else {
                let text: String = (0..len)
                    .map(|_| char::from_u32(rng.gen_range(0x20..0x1_0000)).unwrap_or('?'))
                    .collect();
                let mut b = text.into_bytes();
                if let Some(x) = b.get_mut(len / 2) {
                    *x = 0x80 | (*x & 0x3f);
                }
                b
            };
            let mut b = CastBuilder::new();
            b.push(&json!({"kind": "session", "protocol": "ssh"}));
            let mut at = 0;
            while at < all.len() {
                let n = rng.gen_range(1..=4).min(all.len() - at);
                let chunk = &all[at..at + n];
                // Recordings carry `b64` now, older ones `hex`.
                b.push(&if n % 2 == 0 {
                    json!({"kind": "o", "b64": STANDARD.encode(chunk)})
                } else {
                    json!({"kind": "o", "hex": hex::encode(chunk), "data": "ignored"})
                });
                at += n;
            }
            let text: String = b
                .finish()
                .expect("ssh")
                .lines()
                .skip(1)
                .map(|l| {
                    let v: Value = serde_json::from_str(l).expect("an event is JSON");
                    v[2].as_str().expect("text").to_string()
                })
                .collect();
            assert_eq!(
                text,
                String::from_utf8_lossy(&all),
                "case {case}: {all:02x?}"
            );
        }
    }

    #[test]
    fn an_interactive_session_becomes_a_cast() {
        let at = |ms: i64| Timestamp::from_millis(1_700_000_000_000 + ms).to_rfc3339();
        // "é" is split across two output chunks; one chunk is not UTF-8.
        let got = cast(&[
            json!({"kind": "session", "protocol": "ssh", "principal": "alice", "target": "web", "session_id": "s1", "time": at(0)}),
            json!({"kind": "channel", "channel": 0, "time": at(1)}),
            json!({"kind": "pty", "channel": 0, "cols": 100, "rows": 30, "term": "xterm", "time": at(2)}),
            json!({"kind": "shell", "channel": 0, "time": at(3)}),
            json!({"kind": "o", "channel": 0, "data": "$ ", "time": at(500)}),
            json!({"kind": "i", "channel": 0, "data": "l", "time": at(1250)}),
            json!({"kind": "o", "channel": 0, "data": "caf\u{fffd}", "hex": "636166c3", "time": at(1300)}),
            json!({"kind": "o", "channel": 0, "data": "\u{fffd}\r\n", "hex": "a90d0a", "time": at(1301)}),
            json!({"kind": "r", "channel": 0, "cols": 120, "rows": 40, "time": at(2000)}),
            json!({"kind": "exit", "channel": 0, "status": 0, "time": at(2500)}),
        ])
        .expect("ssh");
        // The header's key order depends on serde_json's features: compare
        // it as JSON.
        let (header, events) = got.split_once('\n').expect("header line");
        let header: Value = serde_json::from_str(header).expect("json");
        assert_eq!(
            header,
            json!({"version": 2, "width": 100, "height": 30, "timestamp": 1_700_000_000,
                   "title": "alice on web (s1)", "env": {"TERM": "xterm"}})
        );
        expect![[r#"
            [0.5,"o","$ "]
            [1.25,"i","l"]
            [1.3,"o","caf"]
            [1.301,"o","é\r\n"]
            [2.0,"r","120x40"]
        "#]]
        .assert_eq(events);
    }

    #[test]
    fn an_exec_session_names_its_command_and_postgres_has_no_cast() {
        let got = cast(&[
            json!({"kind": "session", "protocol": "ssh", "time": "2026-01-01T00:00:00.000Z"}),
            json!({"kind": "exec", "channel": 0, "command": "uname -a", "time": "2026-01-01T00:00:00.010Z"}),
            json!({"kind": "o", "channel": 0, "data": "Linux\n", "time": "2026-01-01T00:00:00.020Z"}),
        ])
        .expect("ssh");
        let header: Value =
            serde_json::from_str(got.lines().next().expect("header")).expect("json");
        assert_eq!(header["command"], "uname -a");
        assert_eq!(
            (&header["width"], &header["height"]),
            (&json!(80), &json!(24))
        );
        assert!(got.ends_with("[0.02,\"o\",\"Linux\\n\"]\n"), "{got}");
        let pg = cast(&[json!({"kind": "session", "time": "2026-01-01T00:00:00.000Z"})]);
        assert!(pg.is_err());
    }
}
