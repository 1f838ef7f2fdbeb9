//! Time-based one-time passwords (RFC 6238): HMAC-SHA-1, 6 digits, 30 s
//! steps, one step either side accepted, each step accepted once per
//! principal. Secrets are base32 without padding, as in `otpauth://` URIs.

use ring::hmac;
use subtle::ConstantTimeEq;

use breakglass_core::Timestamp;

/// Length of a step in seconds.
pub const STEP_S: i64 = 30;
/// Steps accepted either side of the current one.
pub const SKEW_STEPS: i64 = 1;
/// Digits of a code.
pub const DIGITS: usize = 6;
/// Shortest secret accepted, in bytes (RFC 4226 asks for 128 bits).
pub const SECRET_LEN_MIN: usize = 16;
/// Longest secret accepted, in bytes.
pub const SECRET_LEN_MAX: usize = 64;

/// Decodes an RFC 4648 base32 secret (case-insensitive, spaces and
/// trailing `=` ignored).
pub fn decode_base32(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .trim_end_matches('=')
        .chars()
        .filter(|c| !c.is_whitespace())
    {
        let v = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u32 - 'A' as u32,
            c @ '2'..='7' => c as u32 - '2' as u32 + 26,
            _ => return Err("is not base32 (letters A-Z and digits 2-7)".into()),
        };
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if out.len() < SECRET_LEN_MIN || out.len() > SECRET_LEN_MAX {
        return Err(format!(
            "is {} bytes, expected {SECRET_LEN_MIN} to {SECRET_LEN_MAX} (base32, e.g. 32 characters)",
            out.len()
        ));
    }
    Ok(out)
}

/// One principal's TOTP secret.
pub struct Totp {
    key: hmac::Key,
}

impl std::fmt::Debug for Totp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Totp(..)")
    }
}

/// Why a code is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TotpRefusal {
    Malformed,
    Wrong,
    /// The code of a step already used (or older than the newest used).
    Replayed,
}

impl Totp {
    pub fn new(secret: &[u8]) -> Totp {
        Totp {
            key: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret),
        }
    }

    /// The code of time step `step` (RFC 4226 dynamic truncation).
    pub fn code_at_step(&self, step: u64) -> u32 {
        let tag = hmac::sign(&self.key, &step.to_be_bytes());
        let h = tag.as_ref();
        let off = usize::from(h[h.len() - 1] & 0x0f);
        let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
        bin % 10u32.pow(DIGITS as u32)
    }

    /// The step `now` falls in.
    pub fn step_of(now: Timestamp) -> u64 {
        u64::try_from(now.millis().div_euclid(STEP_S * 1000)).unwrap_or(0)
    }

    /// Checks `code` at `now` against the steps around it, comparing every
    /// candidate in constant time. `last_used` is the newest step accepted
    /// before for this principal: that step and older ones are refused.
    /// Returns the step to remember.
    pub fn check(
        &self,
        code: &str,
        now: Timestamp,
        last_used: Option<u64>,
    ) -> Result<u64, TotpRefusal> {
        let code = code.trim();
        if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TotpRefusal::Malformed);
        }
        let current = Self::step_of(now) as i64;
        let mut matched = None;
        for delta in -SKEW_STEPS..=SKEW_STEPS {
            let Ok(step) = u64::try_from(current + delta) else {
                continue;
            };
            let want = format!("{:0width$}", self.code_at_step(step), width = DIGITS);
            if bool::from(want.as_bytes().ct_eq(code.as_bytes())) && matched.is_none() {
                matched = Some(step);
            }
        }
        let step = matched.ok_or(TotpRefusal::Wrong)?;
        if last_used.is_some_and(|l| step <= l) {
            return Err(TotpRefusal::Replayed);
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 (8-digit codes there; the last 6 digits
    /// are the 6-digit code).
    #[test]
    fn rfc6238_vectors() {
        let t = Totp::new(b"12345678901234567890");
        for (secs, code8) in [
            (59i64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
        ] {
            let step = Totp::step_of(Timestamp(secs * 1000));
            assert_eq!(t.code_at_step(step), code8 % 1_000_000, "at {secs}s");
        }
    }

    #[test]
    fn base32_round_trip_and_limits() {
        assert_eq!(
            decode_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").expect("decodes"),
            b"12345678901234567890"
        );
        assert_eq!(
            decode_base32("gezd gnbv gy3t qojq gezd gnbv gy3t qojq").expect("decodes"),
            b"12345678901234567890"
        );
        assert!(decode_base32("GEZDGNBV").is_err(), "too short");
        assert!(decode_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJ1").is_err());
    }

    #[test]
    fn a_code_is_accepted_once_within_one_step_either_side() {
        let t = Totp::new(b"12345678901234567890");
        let now = Timestamp(1_800_000_000_000);
        let step = Totp::step_of(now);
        let code = |s: u64| format!("{:06}", t.code_at_step(s));
        assert_eq!(t.check(&code(step), now, None), Ok(step));
        assert_eq!(
            t.check(&code(step), now, Some(step)),
            Err(TotpRefusal::Replayed)
        );
        assert_eq!(
            t.check(&code(step - 1), now, Some(step)),
            Err(TotpRefusal::Replayed),
            "an older step after a newer one"
        );
        assert_eq!(t.check(&code(step + 1), now, Some(step)), Ok(step + 1));
        assert_eq!(t.check(&code(step - 1), now, None), Ok(step - 1));
        assert_eq!(t.check(&code(step + 2), now, None), Err(TotpRefusal::Wrong));
        assert_eq!(t.check(&code(step - 2), now, None), Err(TotpRefusal::Wrong));
        assert_eq!(t.check("12345", now, None), Err(TotpRefusal::Malformed));
        assert_eq!(t.check("abcdef", now, None), Err(TotpRefusal::Malformed));
    }
}
