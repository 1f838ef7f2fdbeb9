//! Sans-IO framing of the PostgreSQL frontend/backend protocol (v3).
//!
//! Two shapes of frame exist: the untyped start-up packets (`len: i32 |
//! code: i32 | ...`: StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest) and typed messages (`tag: u8 | len: i32 | payload`). The
//! decoders look at a buffer and say "need more", "here is a frame of N
//! bytes" or "this is not valid", with explicit size limits. They never
//! allocate beyond the frame they return.

use thiserror::Error;

pub const PROTOCOL_V3: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// PostgreSQL itself refuses start-up packets above this size.
pub const STARTUP_LEN_MAX: usize = 10_000;
/// Parameters in a StartupMessage at most.
pub const STARTUP_PARAMS_MAX: usize = 64;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error("invalid start-up packet length {0}")]
    StartupLength(i64),
    #[error("unsupported protocol version {0}.{1}")]
    Protocol(u16, u16),
    #[error("invalid message length {len} for message type {tag:?}")]
    Length { tag: char, len: i64 },
    #[error("message of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// A decoded start-up packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Message { params: Vec<(String, String)> },
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes a start-up packet from the front of `buf`: `Ok(None)` when more
/// bytes are needed, otherwise the packet and how many bytes it used.
pub fn decode_startup(buf: &[u8]) -> Result<Option<(Startup, usize)>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = be_i32(buf);
    if !(8..=STARTUP_LEN_MAX as i32).contains(&len) {
        return Err(CodecError::StartupLength(i64::from(len)));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let code = be_i32(&buf[4..8]);
    let body = &buf[8..len];
    let packet = match code {
        SSL_REQUEST if len == 8 => Startup::Ssl,
        GSSENC_REQUEST if len == 8 => Startup::GssEnc,
        CANCEL_REQUEST if len == 16 => Startup::Cancel {
            pid: be_i32(&body[0..4]),
            secret: be_i32(&body[4..8]),
        },
        PROTOCOL_V3 => Startup::Message {
            params: parse_params(body)?,
        },
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            return Err(CodecError::StartupLength(len as i64));
        }
        other => return Err(CodecError::Protocol((other >> 16) as u16, other as u16)),
    };
    Ok(Some((packet, len)))
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, CodecError> {
    let mut out = Vec::new();
    loop {
        let (key, rest) = cstr(body).ok_or(CodecError::Malformed("startup"))?;
        if key.is_empty() {
            if !rest.is_empty() {
                return Err(CodecError::Malformed("startup"));
            }
            return Ok(out);
        }
        let (value, rest) = cstr(rest).ok_or(CodecError::Malformed("startup"))?;
        if out.len() >= STARTUP_PARAMS_MAX {
            return Err(CodecError::Malformed("startup (too many parameters)"));
        }
        out.push((key.to_string(), value.to_string()));
        body = rest;
    }
}

/// Splits a NUL-terminated UTF-8 string off the front of `b`.
pub fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = std::str::from_utf8(&b[..end]).ok()?;
    Some((s, &b[end + 1..]))
}

/// A typed message located in a buffer: its tag and total size (tag and
/// length included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub len: usize,
}

impl Frame {
    /// The payload of this frame when it sits at the front of `buf`.
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[5..self.len]
    }
}

/// Locates the typed message at the front of `buf`; `Ok(None)` when more
/// bytes are needed. `max` bounds the whole frame.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<Option<Frame>, CodecError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = be_i32(&buf[1..5]);
    if len < 4 {
        return Err(CodecError::Length {
            tag: tag as char,
            len: i64::from(len),
        });
    }
    let total = len as usize + 1;
    if total > max {
        return Err(CodecError::TooLarge { len: total, max });
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame { tag, len: total }))
}

/// Appends a typed message.
pub fn put_frame(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((payload.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn put_cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A StartupMessage with the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_V3.to_be_bytes());
    for (k, v) in params {
        put_cstr(&mut body, k);
        put_cstr(&mut body, v);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub fn cancel_request(pid: i32, secret: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&16i32.to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
    out
}

/// Severity of an error we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// An ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: Severity, code: &str, message: &str) -> Vec<u8> {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let mut p = Vec::new();
    p.push(b'S');
    put_cstr(&mut p, sev);
    p.push(b'V');
    put_cstr(&mut p, sev);
    p.push(b'C');
    put_cstr(&mut p, code);
    p.push(b'M');
    put_cstr(&mut p, message);
    p.push(0);
    let mut out = Vec::new();
    put_frame(&mut out, b'E', &p);
    out
}

/// `AuthenticationRequest` with the given code and extra bytes.
pub fn authentication(code: i32, extra: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(extra);
    let mut out = Vec::new();
    put_frame(&mut out, b'R', &p);
    out
}

pub fn backend_key_data(pid: i32, secret: i32) -> Vec<u8> {
    let mut p = pid.to_be_bytes().to_vec();
    p.extend_from_slice(&secret.to_be_bytes());
    let mut out = Vec::new();
    put_frame(&mut out, b'K', &p);
    out
}

/// The fields of an ErrorResponse or NoticeResponse payload.
pub fn parse_error_fields(payload: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = payload;
    while let Some((&code, after)) = rest.split_first() {
        if code == 0 {
            break;
        }
        match cstr(after) {
            Some((v, r)) => {
                out.push((code, v.to_string()));
                rest = r;
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_roundtrip() {
        let msg = startup_message(&[("user", "alice"), ("database", "prod-db")]);
        let (s, n) = decode_startup(&msg).expect("valid").expect("complete");
        assert_eq!(n, msg.len());
        assert_eq!(
            s,
            Startup::Message {
                params: vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "prod-db".into())
                ]
            }
        );
        for cut in 0..msg.len() {
            assert_eq!(decode_startup(&msg[..cut]), Ok(None), "prefix {cut}");
        }
        let c = cancel_request(7, -9);
        assert_eq!(
            decode_startup(&c),
            Ok(Some((Startup::Cancel { pid: 7, secret: -9 }, 16)))
        );
        assert_eq!(
            decode_startup(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Ok(Some((Startup::Ssl, 8)))
        );
    }

    #[test]
    fn startup_garbage_is_refused() {
        assert!(decode_startup(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_startup(&[0, 0, 0, 3]).is_err());
        assert!(decode_startup(&[0, 1, 0, 0]).is_err());
        let mut v2 = startup_message(&[("user", "a")]);
        v2[4..8].copy_from_slice(&131_072i32.to_be_bytes());
        assert_eq!(decode_startup(&v2), Err(CodecError::Protocol(2, 0)));
        let mut unterminated = startup_message(&[("user", "a")]);
        let n = unterminated.len();
        unterminated[n - 1] = b'x';
        assert!(decode_startup(&unterminated).is_err());
    }

    #[test]
    fn frames_roundtrip_and_limits() {
        let mut buf = Vec::new();
        put_frame(&mut buf, b'Q', b"select 1\0");
        let f = decode_frame(&buf, 1024).expect("valid").expect("complete");
        assert_eq!((f.tag, f.len), (b'Q', buf.len()));
        assert_eq!(f.payload(&buf), b"select 1\0");
        for cut in 0..buf.len() {
            assert_eq!(decode_frame(&buf[..cut], 1024), Ok(None));
        }
        assert!(matches!(
            decode_frame(&buf, 8),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(decode_frame(&[b'Q', 0, 0, 0, 3], 1024).is_err());
        assert!(decode_frame(&[b'Q', 0x80, 0, 0, 0], 1024).is_err());
        let e = error_response(Severity::Fatal, "28P01", "no");
        let f = decode_frame(&e, 1024).expect("valid").expect("complete");
        let fields = parse_error_fields(f.payload(&e));
        assert!(fields.contains(&(b'C', "28P01".to_string())));
        assert!(fields.contains(&(b'M', "no".to_string())));
    }

    /// Random and mutated inputs never panic and never report a frame past
    /// the buffer (the `fuzz/` targets do the same, coverage-guided).
    #[test]
    fn random_input_is_refused_or_framed_safely() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = startup_message(&[("user", "alice"), ("database", "db")]);
        put_frame(&mut valid, b'Q', b"select 1\0");
        valid.extend_from_slice(&error_response(Severity::Error, "42P01", "nope"));
        for round in 0..20_000 {
            let mut buf = if round % 2 == 0 {
                valid.clone()
            } else {
                (0..(next() % 64)).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if !buf.is_empty() {
                    let i = (next() as usize) % buf.len();
                    buf[i] = next() as u8;
                }
            }
            if let Ok(Some((_, used))) = decode_startup(&buf) {
                assert!(used <= buf.len());
            }
            let mut at = 0;
            while let Ok(Some(f)) = decode_frame(&buf[at..], 4096) {
                assert!(f.len >= 5 && at + f.len <= buf.len());
                let _ = parse_error_fields(f.payload(&buf[at..]));
                at += f.len;
            }
        }
    }
}
