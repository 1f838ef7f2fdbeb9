//! Signatures on both sides of a chat or webhook call: Standard Webhooks
//! (what we send) and Slack's request signatures (what we receive). Pure:
//! the caller passes the clock.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;
use subtle::ConstantTimeEq;

use crate::NotifyError;

/// Standard Webhooks secrets are written `whsec_<base64>`; the key is the
/// decoded bytes.
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";
/// A signing secret shorter than this is refused (Standard Webhooks asks
/// for 24 to 64 bytes).
pub const SECRET_LEN_MIN: usize = 16;
/// A signing secret longer than this is refused.
pub const SECRET_LEN_MAX: usize = 256;
/// Slack refuses nothing older; neither do we accept anything older (or
/// further in the future).
pub const SLACK_TIMESTAMP_SKEW_MAX_S: i64 = 5 * 60;
/// The most signatures one `webhook-signature` header may list.
pub const SIGNATURES_PER_HEADER_MAX: usize = 8;

/// Parses a webhook signing secret: `whsec_` + base64, or any other text
/// taken as raw bytes. Both within [`SECRET_LEN_MIN`]..=[`SECRET_LEN_MAX`].
pub fn webhook_key(secret: &str) -> Result<Vec<u8>, NotifyError> {
    let secret = secret.trim();
    let key = match secret.strip_prefix(WEBHOOK_SECRET_PREFIX) {
        Some(b64) => STANDARD.decode(b64).map_err(|_| {
            NotifyError::Config("a whsec_ secret must be base64 after the prefix".into())
        })?,
        None => secret.as_bytes().to_vec(),
    };
    if !(SECRET_LEN_MIN..=SECRET_LEN_MAX).contains(&key.len()) {
        return Err(NotifyError::Config(format!(
            "a signing secret must be {SECRET_LEN_MIN} to {SECRET_LEN_MAX} bytes (this one is {})",
            key.len()
        )));
    }
    Ok(key)
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The `webhook-signature` value for one message:
/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
pub fn webhook_signature(key: &[u8], id: &str, timestamp_s: i64, body: &[u8]) -> String {
    let ts = timestamp_s.to_string();
    let mac = hmac_sha256(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", STANDARD.encode(mac))
}

/// Checks a `webhook-signature` header (space-separated `v1,<base64>`
/// entries, any one of which may match) in constant time per entry. For
/// receivers (tests, the CLI's examples); the service only signs.
pub fn verify_webhook(key: &[u8], id: &str, timestamp_s: i64, body: &[u8], header: &str) -> bool {
    let want = webhook_signature(key, id, timestamp_s, body);
    header
        .split(' ')
        .take(SIGNATURES_PER_HEADER_MAX)
        .any(|sig| sig.as_bytes().ct_eq(want.as_bytes()).into())
}

/// Why a Slack request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlackAuthError {
    #[error("no X-Slack-Signature or X-Slack-Request-Timestamp header")]
    Unsigned,
    #[error("the X-Slack-Request-Timestamp header is not a number of seconds")]
    BadTimestamp,
    #[error("the request timestamp is more than 5 minutes from now")]
    Stale,
    #[error("the signature does not match the body")]
    Forged,
}

/// Slack's request signature: `v0=` + hex HMAC-SHA256 of
/// `v0:{timestamp}:{body}` with the app's signing secret.
pub fn slack_signature(signing_secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mac = hmac_sha256(signing_secret, &[b"v0:", timestamp.as_bytes(), b":", body]);
    format!("v0={}", hex::encode(mac))
}

/// Verifies a Slack request: the timestamp within
/// [`SLACK_TIMESTAMP_SKEW_MAX_S`] of `now_s`, then the signature, compared
/// in constant time. Returns the timestamp (for replay tracking).
pub fn verify_slack(
    signing_secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_s: i64,
) -> Result<i64, SlackAuthError> {
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err(SlackAuthError::Unsigned);
    };
    let ts_s: i64 = ts
        .trim()
        .parse()
        .ok()
        .filter(|_| ts.len() <= 12)
        .ok_or(SlackAuthError::BadTimestamp)?;
    if (now_s - ts_s).abs() > SLACK_TIMESTAMP_SKEW_MAX_S {
        return Err(SlackAuthError::Stale);
    }
    let want = slack_signature(signing_secret, ts, body);
    if bool::from(sig.as_bytes().ct_eq(want.as_bytes())) {
        Ok(ts_s)
    } else {
        Err(SlackAuthError::Forged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slack's published example ("Verifying requests from Slack").
    const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const SLACK_TS: &str = "1531420618";
    const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SLACK_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slack_published_example_vector() {
        assert_eq!(
            slack_signature(SLACK_SECRET.as_bytes(), SLACK_TS, SLACK_BODY.as_bytes()),
            SLACK_SIG
        );
        let now = 1531420618 + 60;
        assert_eq!(
            verify_slack(
                SLACK_SECRET.as_bytes(),
                Some(SLACK_TS),
                Some(SLACK_SIG),
                SLACK_BODY.as_bytes(),
                now
            ),
            Ok(1531420618)
        );
    }

    #[test]
    fn slack_forged_stale_unsigned() {
        let secret = SLACK_SECRET.as_bytes();
        let now = 1531420618;
        let mut body = SLACK_BODY.to_string();
        body.push('x');
        assert_eq!(
            verify_slack(
                secret,
                Some(SLACK_TS),
                Some(SLACK_SIG),
                body.as_bytes(),
                now
            ),
            Err(SlackAuthError::Forged)
        );
        assert_eq!(
            verify_slack(
                b"another secret",
                Some(SLACK_TS),
                Some(SLACK_SIG),
                SLACK_BODY.as_bytes(),
                now
            ),
            Err(SlackAuthError::Forged)
        );
        assert_eq!(
            verify_slack(
                secret,
                Some(SLACK_TS),
                Some(SLACK_SIG),
                SLACK_BODY.as_bytes(),
                now + 301
            ),
            Err(SlackAuthError::Stale)
        );
        assert_eq!(
            verify_slack(
                secret,
                Some(SLACK_TS),
                Some(SLACK_SIG),
                SLACK_BODY.as_bytes(),
                now - 301
            ),
            Err(SlackAuthError::Stale)
        );
        assert_eq!(
            verify_slack(secret, None, Some(SLACK_SIG), SLACK_BODY.as_bytes(), now),
            Err(SlackAuthError::Unsigned)
        );
        assert_eq!(
            verify_slack(secret, Some("soon"), Some(SLACK_SIG), b"", now),
            Err(SlackAuthError::BadTimestamp)
        );
    }

    /// The Standard Webhooks reference test vector (from its
    /// specification's libraries).
    #[test]
    fn standard_webhooks_reference_vector() {
        let key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        let sig = webhook_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify_webhook(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            &format!("v1,bm90IGl0 {sig}")
        ));
        assert!(!verify_webhook(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265331,
            br#"{"test": 2432232314}"#,
            &sig
        ));
    }

    #[test]
    fn secrets_have_limits() {
        assert!(webhook_key("short").is_err());
        assert!(webhook_key("whsec_!!!").is_err());
        assert!(webhook_key(&"x".repeat(SECRET_LEN_MAX + 1)).is_err());
        assert_eq!(
            webhook_key("a-long-enough-raw-secret").expect("raw").len(),
            24
        );
    }
}
