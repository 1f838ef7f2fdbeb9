//! Syslog for the SIEM: every audit event as an RFC 5424 message, framed by
//! octet counting (RFC 6587 §3.4.1, RFC 5425) for TCP or TLS, and a strict
//! decoder of such frames (for tests and fuzzing). Pure.

use breakglass_core::Timestamp;
use breakglass_core::audit::AuditEvent;

/// Our private enterprise number placeholder for structured data: RFC 5424
/// reserves 32473 for documentation and examples.
pub const SD_ID: &str = "breakglass@32473";
/// The largest message we send or accept (RFC 5425 receivers must take
/// 2048 octets and should take 8192; audit events are small).
pub const MESSAGE_LEN_MAX: usize = 64 * 1024;
/// The most digits of a frame's length prefix.
const LEN_DIGITS_MAX: usize = 6;
/// Facility `auth` (4): security and authorization messages.
pub const FACILITY_AUTH: u8 = 4;
/// RFC 5424 field limits.
pub const HOSTNAME_LEN_MAX: usize = 255;
pub const APP_NAME_LEN_MAX: usize = 48;
pub const MSGID_LEN_MAX: usize = 32;

/// Severity by action: refusals and failures warn, the rest is a notice.
pub fn severity(action: &str) -> u8 {
    match action {
        "notify.failed" | "slack.refused" | "review.overdue" | "request.countersign_due" => 4,
        a if a.ends_with(".refused") || a.ends_with(".failed") => 4,
        _ => 5,
    }
}

/// Appends `text` keeping printable US-ASCII (33..=126), as RFC 5424
/// header fields require; `-` when nothing is left.
fn push_header_field(out: &mut String, text: &str, max: usize) {
    let start = out.len();
    out.extend(text.chars().filter(char::is_ascii_graphic).take(max));
    if out.len() == start {
        out.push('-');
    }
}

/// Appends a structured-data parameter value, escaped (`"`, `\` and `]`).
fn push_sd_value(out: &mut String, text: &str) {
    for c in text.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The event as `audit export` prints it, with its details exactly as
/// stored and hashed (a SIEM can recompute the chain from them).
#[derive(serde::Serialize)]
struct EventJson<'a> {
    seq: u64,
    time: Timestamp,
    actor: &'a str,
    action: &'a str,
    request_id: Option<&'a str>,
    details: Option<&'a serde_json::value::RawValue>,
    hash: String,
}

/// The RFC 5424 message for one audit event: `<PRI>1 TIMESTAMP HOST
/// breakglass - ACTION [breakglass@32473 seq=.. actor=.. request=..] BOM
/// JSON`, the JSON being the event as `audit export` prints it.
pub fn format_event(event: &AuditEvent, hostname: &str) -> String {
    use std::fmt::Write as _;
    let pri = u16::from(FACILITY_AUTH) * 8 + u16::from(severity(&event.action));
    let mut msg = String::with_capacity(320 + event.details.len());
    let _ = write!(msg, "<{pri}>1 {} ", event.time.to_rfc3339());
    push_header_field(&mut msg, hostname, HOSTNAME_LEN_MAX);
    msg.push_str(" breakglass - ");
    push_header_field(&mut msg, &event.action, MSGID_LEN_MAX);
    let _ = write!(msg, " [{SD_ID} seq=\"{}\" actor=\"", event.seq);
    push_sd_value(&mut msg, &event.actor);
    msg.push('"');
    if let Some(r) = &event.request_id {
        msg.push_str(" request=\"");
        push_sd_value(&mut msg, r);
        msg.push('"');
    }
    msg.push_str("] \u{FEFF}");
    let json = EventJson {
        seq: event.seq,
        time: event.time,
        actor: &event.actor,
        action: &event.action,
        request_id: event.request_id.as_deref(),
        // Details that are not JSON (never written so) print as null.
        details: serde_json::from_str(&event.details).ok(),
        hash: hex::encode(event.hash),
    };
    if let Ok(body) = serde_json::to_string(&json) {
        msg.push_str(&body);
    }
    if msg.len() > MESSAGE_LEN_MAX {
        // Details are bounded by the API's limits; this cannot happen in
        // practice, but a frame must never exceed what receivers accept.
        let mut end = MESSAGE_LEN_MAX;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    msg
}

/// Octet-counting framing: `LEN SP MSG`.
pub fn frame(msg: &str) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

/// Why a frame or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyslogError {
    #[error("frame length is not a number: {0}")]
    BadLength(String),
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("message is malformed: {0}")]
    Malformed(&'static str),
}

/// Decodes one octet-counted frame from the front of `buf`: `Ok(None)` when
/// more bytes are needed, else the message and the bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(String, usize)>, SyslogError> {
    let Some(sp) = buf.iter().take(LEN_DIGITS_MAX + 1).position(|b| *b == b' ') else {
        if buf.len() > LEN_DIGITS_MAX {
            return Err(SyslogError::BadLength(
                String::from_utf8_lossy(&buf[..LEN_DIGITS_MAX + 1]).into(),
            ));
        }
        return Ok(None);
    };
    let digits = &buf[..sp];
    if digits.is_empty() || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
        return Err(SyslogError::BadLength(
            String::from_utf8_lossy(digits).into(),
        ));
    }
    let len: usize = std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| SyslogError::BadLength(String::from_utf8_lossy(digits).into()))?;
    if len > MESSAGE_LEN_MAX {
        return Err(SyslogError::TooLong(len));
    }
    let start = sp + 1;
    if buf.len() < start + len {
        return Ok(None);
    }
    let msg = std::str::from_utf8(&buf[start..start + len])
        .map_err(|_| SyslogError::Malformed("not UTF-8"))?;
    Ok(Some((msg.to_string(), start + len)))
}

/// The parts of an RFC 5424 message this service writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub pri: u8,
    pub timestamp: Timestamp,
    pub hostname: String,
    pub app_name: String,
    pub msgid: String,
    /// The structured data element, as written (`[id k="v" ...]`).
    pub structured_data: String,
    /// The MSG after its BOM.
    pub msg: String,
}

/// Parses a message strictly: version 1, every header field printable
/// ASCII within its limit, one structured-data element (or `-`), and a
/// UTF-8 MSG that starts with a BOM.
pub fn parse_message(text: &str) -> Result<Message, SyslogError> {
    let rest = text
        .strip_prefix('<')
        .ok_or(SyslogError::Malformed("no <PRI>"))?;
    let close = rest
        .find('>')
        .filter(|i| (1..=3).contains(i))
        .ok_or(SyslogError::Malformed("bad PRI"))?;
    let pri: u8 = rest[..close]
        .parse()
        .ok()
        .filter(|p| *p <= 191)
        .ok_or(SyslogError::Malformed("bad PRI"))?;
    let rest = rest[close + 1..]
        .strip_prefix("1 ")
        .ok_or(SyslogError::Malformed("version is not 1"))?;
    let mut fields = rest.splitn(6, ' ');
    let ts = field(&mut fields, 64, "bad TIMESTAMP")?;
    let timestamp =
        Timestamp::parse_rfc3339(ts).map_err(|_| SyslogError::Malformed("bad TIMESTAMP"))?;
    let hostname = field(&mut fields, HOSTNAME_LEN_MAX, "bad HOSTNAME")?.to_string();
    let app_name = field(&mut fields, APP_NAME_LEN_MAX, "bad APP-NAME")?.to_string();
    let _procid = field(&mut fields, 128, "bad PROCID")?;
    let msgid = field(&mut fields, MSGID_LEN_MAX, "bad MSGID")?.to_string();
    let rest = fields
        .next()
        .ok_or(SyslogError::Malformed("no STRUCTURED-DATA"))?;
    let (sd, msg) = if let Some(after) = rest.strip_prefix("- ") {
        ("-".to_string(), after)
    } else if rest.starts_with('[') {
        let end = sd_end(rest).ok_or(SyslogError::Malformed("unterminated STRUCTURED-DATA"))?;
        let msg = rest[end..]
            .strip_prefix(' ')
            .ok_or(SyslogError::Malformed("no MSG"))?;
        (rest[..end].to_string(), msg)
    } else {
        return Err(SyslogError::Malformed("bad STRUCTURED-DATA"));
    };
    let msg = msg
        .strip_prefix('\u{FEFF}')
        .ok_or(SyslogError::Malformed("MSG has no BOM"))?;
    Ok(Message {
        pri,
        timestamp,
        hostname,
        app_name,
        msgid,
        structured_data: sd,
        msg: msg.to_string(),
    })
}

/// The next header field: printable ASCII, 1 to `max` bytes.
fn field<'a>(
    it: &mut impl Iterator<Item = &'a str>,
    max: usize,
    what: &'static str,
) -> Result<&'a str, SyslogError> {
    let f = it.next().ok_or(SyslogError::Malformed(what))?;
    if f.is_empty() || f.len() > max || !f.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SyslogError::Malformed(what));
    }
    Ok(f)
}

/// The end (exclusive) of one SD-ELEMENT at the start of `s`, honouring
/// backslash escapes inside quoted values.
fn sd_end(s: &str) -> Option<usize> {
    let mut in_value = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match (in_value, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_value = !in_value,
            (false, _, ']') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(actor: &str) -> AuditEvent {
        AuditEvent {
            seq: 7,
            time: Timestamp(1_764_000_000_123),
            actor: actor.into(),
            action: "request.created".into(),
            request_id: Some("r1".into()),
            details: r#"{"reason":"db \"down\" ]"}"#.into(),
            hash: [1; 32],
        }
    }

    #[test]
    fn the_body_is_the_event_as_exported_with_its_details_as_hashed() {
        let mut ev = event("alice");
        ev.details = r#"{"reason":"x","n":[1,2.5,{"z":null,"a":true}],"u":"é\u0001"}"#.into();
        let msg = format_event(&ev, "node1");
        let body = msg.split_once('\u{FEFF}').expect("BOM").1;
        assert_eq!(body, serde_json::to_string(&ev.to_json()).expect("json"));
        assert!(body.contains(&ev.details), "{body}");
        // Details that are not JSON print as null, as in an export.
        ev.details = "{not json".into();
        let msg = format_event(&ev, "node1");
        let body = msg.split_once('\u{FEFF}').expect("BOM").1;
        assert_eq!(body, serde_json::to_string(&ev.to_json()).expect("json"));
        assert!(body.contains(r#""details":null"#), "{body}");
        // Header fields keep printable ASCII, or are "-".
        assert!(format_event(&ev, " \t").contains(" - breakglass - request.created "));
    }

    #[test]
    fn roundtrip_through_frame_and_parser() {
        let ev = event("al\"ice]");
        let msg = format_event(&ev, "node 1");
        let framed = frame(&msg);
        let (back, used) = decode_frame(&framed).expect("frame").expect("whole");
        assert_eq!(used, framed.len());
        let m = parse_message(&back).expect("parse");
        assert_eq!(m.pri, 4 * 8 + 5);
        assert_eq!(m.timestamp, ev.time);
        assert_eq!(m.hostname, "node1");
        assert_eq!(m.app_name, "breakglass");
        assert_eq!(m.msgid, "request.created");
        assert_eq!(
            m.structured_data,
            r#"[breakglass@32473 seq="7" actor="al\"ice\]" request="r1"]"#
        );
        let json: serde_json::Value = serde_json::from_str(&m.msg).expect("json");
        assert_eq!(json["details"]["reason"], "db \"down\" ]");
        assert_eq!(json["seq"], 7);
    }

    #[test]
    fn partial_and_bad_frames() {
        let framed = frame(&format_event(&event("a"), "h"));
        for cut in [0, 1, 3, framed.len() - 1] {
            assert_eq!(decode_frame(&framed[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(matches!(
            decode_frame(b"012 x"),
            Err(SyslogError::BadLength(_))
        ));
        assert!(matches!(
            decode_frame(b"1234567 x"),
            Err(SyslogError::BadLength(_))
        ));
        assert!(matches!(
            decode_frame(b"999999 x"),
            Err(SyslogError::TooLong(_))
        ));
        assert!(matches!(
            decode_frame(b"<13>1 x"),
            Err(SyslogError::BadLength(_))
        ));
        assert!(
            parse_message("<13>1 - h a - - - \u{FEFF}x").is_err(),
            "bad timestamp"
        );
        assert!(parse_message("<13>2 2026-01-01T00:00:00.000Z h a - - - x").is_err());
        assert!(
            parse_message("<13>1 2026-01-01T00:00:00.000Z h a - - - x").is_err(),
            "no BOM"
        );
        assert!(parse_message("<13>1 2026-01-01T00:00:00.000Z h a - - [x a=\"]").is_err());
    }
}
