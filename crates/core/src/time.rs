//! Time as the core sees it: a millisecond timestamp passed in by the caller, and
//! the human duration syntax (`90s`, `15m`, `1h`) used by the CLI, the API and
//! policy annotations.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// The longest duration anything in breakglass accepts (a week). Grants are
/// minutes; this only bounds arithmetic and parsing.
pub const DURATION_MAX_S: u64 = 7 * 24 * 3600;

/// A point in time: milliseconds since the Unix epoch, UTC. The core's logic
/// never reads a clock; callers pass `now` in (from [`Timestamp::now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The wall clock. For callers only: nothing in the core calls it.
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Timestamp(ms)
    }

    pub fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn plus_secs(self, s: u64) -> Self {
        // DURATION_MAX_S bounds every duration, so this cannot overflow for any
        // timestamp of this era; saturate anyway rather than wrap.
        Timestamp(self.0.saturating_add((s as i64).saturating_mul(1000)))
    }

    /// Hour of the day (0-23) in UTC.
    pub fn hour_utc(self) -> i64 {
        self.0.div_euclid(3_600_000).rem_euclid(24)
    }

    /// Day of the week, 0 = Monday (1970-01-01 was a Thursday).
    pub fn weekday(self) -> i64 {
        (self.0.div_euclid(86_400_000) + 3).rem_euclid(7)
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-29T01:41:50.123Z`.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            ),
            Err(_) => format!("@{}ms", self.0),
        }
    }

    pub fn parse_rfc3339(s: &str) -> Result<Self, DurationError> {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| DurationError::Timestamp(e.to_string()))?;
        Ok(Timestamp((t.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected a number and a unit, like 90s, 15m or 1h")]
    Syntax(String),
    #[error("duration {0:?} must be positive")]
    Zero(String),
    #[error("duration {0:?} is longer than the maximum of {1}s")]
    TooLong(String, u64),
    #[error("invalid timestamp: {0}")]
    Timestamp(String),
}

/// The longest window a report looks back over: a year, a leap day
/// included.
pub const REPORT_WINDOW_MAX_S: u64 = 366 * 86_400;
/// A report's window when none is given.
pub const REPORT_WINDOW_DEFAULT: &str = "30d";

/// Parses `90s`, `15m`, `1h`, `1h30m`, `2d` into seconds, at most
/// [`DURATION_MAX_S`] (a grant's hard cap). A bare number is refused: a unit
/// must be explicit so `15` never silently means seconds.
pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
    parse_duration_at_most(text, DURATION_MAX_S)
}

/// A report's `since` (default [`REPORT_WINDOW_DEFAULT`]): a duration of at
/// most [`REPORT_WINDOW_MAX_S`].
pub fn parse_report_window(text: Option<&str>) -> Result<u64, DurationError> {
    parse_duration_at_most(text.unwrap_or(REPORT_WINDOW_DEFAULT), REPORT_WINDOW_MAX_S)
}

/// [`parse_duration`] with another cap.
pub fn parse_duration_at_most(text: &str, max_s: u64) -> Result<u64, DurationError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    if t.len() > 32 {
        return Err(DurationError::Syntax(t.chars().take(32).collect()));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut saw_unit = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(DurationError::Syntax(t.to_string())),
        };
        if digits.is_empty() {
            return Err(DurationError::Syntax(t.to_string()));
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| DurationError::TooLong(t.to_string(), max_s))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| DurationError::TooLong(t.to_string(), max_s))?;
        digits.clear();
        saw_unit = true;
    }
    if !digits.is_empty() || !saw_unit {
        return Err(DurationError::Syntax(t.to_string()));
    }
    if total == 0 {
        return Err(DurationError::Zero(t.to_string()));
    }
    if total > max_s {
        return Err(DurationError::TooLong(t.to_string(), max_s));
    }
    Ok(total)
}

/// Formats seconds the way people write them: `90s` -> `1m30s`, `900` -> `15m`.
pub fn format_duration(s: u64) -> String {
    if s == 0 {
        return "0s".to_string();
    }
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 {
        out.push_str(&format!("{sec}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert!(matches!(
            parse_duration("15"),
            Err(DurationError::Syntax(_))
        ));
        assert!(matches!(parse_duration("m"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse_duration("0s"), Err(DurationError::Zero(_))));
        assert!(matches!(
            parse_duration("-5m"),
            Err(DurationError::Syntax(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(DurationError::TooLong(..))
        ));
        assert!(matches!(
            parse_duration("8d"),
            Err(DurationError::TooLong(..))
        ));
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(format_duration(90), "1m30s");
    }

    #[test]
    fn report_windows_reach_a_year_and_no_further() {
        assert_eq!(parse_report_window(None), Ok(30 * 86_400));
        assert_eq!(parse_report_window(Some("366d")), Ok(REPORT_WINDOW_MAX_S));
        assert_eq!(parse_report_window(Some("12h")), Ok(12 * 3600));
        let e = parse_report_window(Some("367d")).expect_err("over a year");
        assert_eq!(
            e.to_string(),
            "duration \"367d\" is longer than the maximum of 31622400s"
        );
        assert_eq!(parse_report_window(Some("")), Err(DurationError::Empty));
    }

    #[test]
    fn timestamps_roundtrip() {
        let t = Timestamp(1_795_225_310_123);
        let s = t.to_rfc3339();
        assert_eq!(s, "2026-11-21T01:41:50.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&s), Ok(t));
        // 2026-11-21 is a Saturday.
        assert_eq!(t.weekday(), 5);
        assert_eq!(t.hour_utc(), 1);
    }
}
