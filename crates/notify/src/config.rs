//! `[[notify]]` entries: one sink each. Secrets (signing secrets, Slack
//! webhook URLs, PagerDuty routing keys) come from the environment or a
//! file, never from the config text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use breakglass_core::time::parse_duration;
use serde::Deserialize;

use crate::NotifyError;

/// The most `[[notify]]` entries: each sink has one delivery in flight at a
/// time, so this also bounds concurrent deliveries.
pub const SINKS_MAX: usize = 32;
/// The longest sink name.
pub const SINK_NAME_LEN_MAX: usize = 64;
/// The most entries in one sink's `events` or `target_groups`.
pub const FILTER_LEN_MAX: usize = 64;
/// A secret or URL read from a file is at most this long.
pub const SECRET_FILE_LEN_MAX: u64 = 4096;
/// The longest allowed `timeout`.
pub const TIMEOUT_MAX_S: u64 = 60;
/// The longest allowed `give_up_after`: 7 days.
pub const GIVE_UP_AFTER_MAX_S: u64 = 7 * 24 * 3600;

/// The events a sink receives when its entry names none: the ones that
/// need a person (DESIGN §13).
pub const DEFAULT_EVENTS: &[&str] = &[
    "request.created",
    "request.activated",
    "request.denied",
    "request.timed_out",
    "request.revoked",
    "request.countersign_due",
    "request.countersigned",
    "request.reviewed",
    "review.overdue",
    "drill.completed",
    "notify.failed",
    "notify.test",
];

/// The most deliveries one webhook sink may have in flight.
pub const IN_FLIGHT_MAX: usize = 32;

/// PagerDuty's Events API v2 endpoint, the default `url` of a `pagerduty`
/// sink.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Webhook,
    Slack,
    Pagerduty,
    Syslog,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Slack => "slack",
            SinkKind::Pagerduty => "pagerduty",
            SinkKind::Syslog => "syslog",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Names the sink in `notify test`, `notify status` and `notify.failed`.
    pub name: String,
    pub kind: SinkKind,
    /// Audit actions this sink receives; `["*"]` for every event. Default:
    /// [`DEFAULT_EVENTS`] (syslog: every event).
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// Only requests on targets in one of these groups (empty: any).
    #[serde(default)]
    pub target_groups: Vec<String>,
    /// Only emergency requests (`true`) or only ordinary ones (`false`).
    #[serde(default)]
    pub emergency: Option<bool>,
    /// A security sink gets every emergency activation and every urgent
    /// notice, whatever its other filters say.
    #[serde(default)]
    pub security: bool,
    /// The endpoint (webhook, slack, pagerduty). A Slack incoming-webhook
    /// URL is itself a secret: give it with `url_env` or `url_file`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// The webhook signing secret (`whsec_<base64>` or raw text).
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The PagerDuty integration's routing key.
    #[serde(default)]
    pub routing_key_env: Option<String>,
    #[serde(default)]
    pub routing_key_file: Option<PathBuf>,
    /// Syslog: `host:port` of the collector's TCP (or TLS) input.
    #[serde(default)]
    pub address: Option<String>,
    /// Syslog over TLS (RFC 5425).
    #[serde(default)]
    pub tls: bool,
    /// Syslog TLS: PEM CA certificates to trust instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Slack: add Approve and Deny buttons (needs `[integrations.slack]`).
    #[serde(default)]
    pub interactive: bool,
    /// Webhook: also post every signed checkpoint of the audit chain (a
    /// checkpoint witness that only receives).
    #[serde(default)]
    pub witness: bool,
    /// One delivery attempt's deadline (connect, send, answer).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// After retrying this long, the event is given up and `notify.failed`
    /// is written to the audit log.
    #[serde(default = "default_give_up_after")]
    pub give_up_after: String,
    /// Deliveries in flight at once (webhook only): 1 delivers in order;
    /// more let a sink keep up with a busy node, out of order.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

fn default_timeout() -> String {
    "10s".into()
}

fn default_give_up_after() -> String {
    "1h".into()
}

/// Reads a secret from the environment variable or file a config names.
pub fn read_secret(
    what: &str,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<String>, NotifyError> {
    match (env, file) {
        (Some(_), Some(_)) => Err(NotifyError::Config(format!(
            "{what}_env, {what}_file: set one of them, not both"
        ))),
        (Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            _ => Err(NotifyError::Config(format!(
                "{what}_env: the environment variable {var} is not set or empty"
            ))),
        },
        (None, Some(path)) => {
            let meta = std::fs::metadata(path).map_err(|e| {
                NotifyError::Config(format!("{what}_file: cannot read {}: {e}", path.display()))
            })?;
            if meta.len() > SECRET_FILE_LEN_MAX {
                return Err(NotifyError::Config(format!(
                    "{what}_file: {} is larger than {SECRET_FILE_LEN_MAX} bytes",
                    path.display()
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| {
                NotifyError::Config(format!("{what}_file: cannot read {}: {e}", path.display()))
            })?;
            if text.trim().is_empty() {
                return Err(NotifyError::Config(format!(
                    "{what}_file: {} is empty",
                    path.display()
                )));
            }
            Ok(Some(text.trim().to_string()))
        }
        (None, None) => Ok(None),
    }
}

impl SinkConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(parse_duration(&self.timeout).unwrap_or(10))
    }

    /// Deliveries in flight at once: `max_in_flight` for a webhook, 1 for
    /// every other kind (Slack and PagerDuty keep their order; syslog is
    /// one stream).
    pub fn in_flight(&self) -> usize {
        match self.kind {
            SinkKind::Webhook => self.max_in_flight.unwrap_or(1),
            _ => 1,
        }
    }

    pub fn give_up_after(&self) -> Duration {
        Duration::from_secs(parse_duration(&self.give_up_after).unwrap_or(3600))
    }

    /// Whether this sink takes events with `action` at all (before the
    /// request filters).
    pub fn wants_action(&self, action: &str) -> bool {
        match &self.events {
            Some(list) => list.iter().any(|e| e == "*" || e == action),
            None if self.kind == SinkKind::Syslog => true,
            None => DEFAULT_EVENTS.contains(&action),
        }
    }

    /// Relative paths resolve against the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            self.url_file.as_mut(),
            self.secret_file.as_mut(),
            self.routing_key_file.as_mut(),
            self.ca_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks what can be checked without reading secrets; `at` names the
    /// entry in errors (`notify[2]`).
    pub fn validate(&self, at: &str) -> Result<(), NotifyError> {
        let bad = |key: &str, why: String| NotifyError::Config(format!("{at}.{key}: {why}"));
        if self.name.is_empty()
            || self.name.len() > SINK_NAME_LEN_MAX
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad(
                "name",
                format!(
                    "1 to {SINK_NAME_LEN_MAX} ASCII letters, digits and - _ . (got {:?})",
                    self.name
                ),
            ));
        }
        for (key, list) in [
            ("events", self.events.as_deref().unwrap_or_default()),
            ("target_groups", &self.target_groups[..]),
        ] {
            if list.len() > FILTER_LEN_MAX {
                return Err(bad(key, format!("more than {FILTER_LEN_MAX} entries")));
            }
        }
        if self.events.as_ref().is_some_and(|e| e.is_empty()) {
            return Err(bad(
                "events",
                "empty: the sink would receive nothing (leave it out for the default)".into(),
            ));
        }
        let timeout = parse_duration(&self.timeout).map_err(|e| bad("timeout", e.to_string()))?;
        if !(1..=TIMEOUT_MAX_S).contains(&timeout) {
            return Err(bad("timeout", format!("must be 1s to {TIMEOUT_MAX_S}s")));
        }
        let give_up =
            parse_duration(&self.give_up_after).map_err(|e| bad("give_up_after", e.to_string()))?;
        if !(1..=GIVE_UP_AFTER_MAX_S).contains(&give_up) {
            return Err(bad("give_up_after", "must be 1s to 7d".into()));
        }
        let urls = [
            self.url.is_some(),
            self.url_env.is_some(),
            self.url_file.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if urls > 1 {
            return Err(bad("url", "set one of url, url_env, url_file".into()));
        }
        let only = |key: &str, set: bool, kinds: &str| {
            if set {
                Err(bad(
                    key,
                    format!("only for kind = {kinds}, not {}", self.kind.as_str()),
                ))
            } else {
                Ok(())
            }
        };
        let k = self.kind;
        only(
            "secret_env",
            k != SinkKind::Webhook && (self.secret_env.is_some() || self.secret_file.is_some()),
            "\"webhook\"",
        )?;
        only(
            "routing_key_env",
            k != SinkKind::Pagerduty
                && (self.routing_key_env.is_some() || self.routing_key_file.is_some()),
            "\"pagerduty\"",
        )?;
        only(
            "address",
            k != SinkKind::Syslog && (self.address.is_some() || self.tls || self.ca_file.is_some()),
            "\"syslog\"",
        )?;
        only(
            "interactive",
            k != SinkKind::Slack && self.interactive,
            "\"slack\"",
        )?;
        only(
            "max_in_flight",
            k != SinkKind::Webhook && self.max_in_flight.is_some(),
            "\"webhook\"",
        )?;
        if self
            .max_in_flight
            .is_some_and(|n| !(1..=IN_FLIGHT_MAX).contains(&n))
        {
            return Err(bad(
                "max_in_flight",
                format!("must be 1 to {IN_FLIGHT_MAX}"),
            ));
        }
        only(
            "witness",
            k != SinkKind::Webhook && self.witness,
            "\"webhook\"",
        )?;
        match k {
            SinkKind::Webhook | SinkKind::Slack if urls == 0 => {
                return Err(bad("url", "required (or url_env, url_file)".into()));
            }
            SinkKind::Webhook if self.secret_env.is_none() && self.secret_file.is_none() => {
                return Err(bad(
                    "secret_env",
                    "a webhook is signed: set secret_env or secret_file".into(),
                ));
            }
            SinkKind::Slack if self.url.is_some() => {
                return Err(bad(
                    "url",
                    "a Slack incoming-webhook URL is a secret: use url_env or url_file".into(),
                ));
            }
            SinkKind::Pagerduty
                if self.routing_key_env.is_none() && self.routing_key_file.is_none() =>
            {
                return Err(bad(
                    "routing_key_env",
                    "required (or routing_key_file)".into(),
                ));
            }
            SinkKind::Syslog if self.address.is_none() => {
                return Err(bad("address", "required (host:port)".into()));
            }
            SinkKind::Syslog if urls > 0 => {
                return Err(bad("url", "a syslog sink takes address, not url".into()));
            }
            _ => {}
        }
        if let Some(url) = &self.url {
            check_url(url).map_err(|e| bad("url", e))?;
        }
        Ok(())
    }

    /// The endpoint URL, read from wherever the config says.
    pub fn endpoint(&self) -> Result<Option<String>, NotifyError> {
        if let Some(u) = &self.url {
            return Ok(Some(u.clone()));
        }
        let url = read_secret("url", self.url_env.as_deref(), self.url_file.as_deref())?;
        if let Some(u) = &url {
            check_url(u).map_err(|e| NotifyError::Config(format!("url: {e}")))?;
        }
        match (url, self.kind) {
            (None, SinkKind::Pagerduty) => Ok(Some(PAGERDUTY_EVENTS_URL.to_string())),
            (u, _) => Ok(u),
        }
    }
}

/// URLs are `http://` or `https://` and at most 2048 bytes.
pub const URL_LEN_MAX: usize = 2048;

fn check_url(url: &str) -> Result<(), String> {
    if url.len() > URL_LEN_MAX {
        return Err(format!("longer than {URL_LEN_MAX} bytes"));
    }
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err("must start with https:// (or http://)".into());
    }
    Ok(())
}

#[cfg(test)]
mod in_flight_tests {
    use super::*;

    fn sink(kind: &str, extra: serde_json::Value) -> SinkConfig {
        let mut v = serde_json::json!({"name": "s", "kind": kind});
        let need = match kind {
            "syslog" => serde_json::json!({"address": "127.0.0.1:514"}),
            "webhook" => {
                serde_json::json!({"url": "https://hooks.example.com/x", "secret_env": "S"})
            }
            _ => serde_json::json!({"url": "https://hooks.example.com/x"}),
        };
        if let (Some(o), Some(n)) = (v.as_object_mut(), need.as_object()) {
            o.extend(n.clone());
        }
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).expect("sink config")
    }

    #[test]
    fn max_in_flight_is_for_webhooks_and_bounded() {
        let s = sink("webhook", serde_json::json!({}));
        assert_eq!(s.in_flight(), 1, "in order by default");
        s.validate("notify[0]").expect("default");
        let s = sink("webhook", serde_json::json!({"max_in_flight": 8}));
        assert_eq!(s.in_flight(), 8);
        s.validate("notify[0]").expect("8");
        for (kind, n, says) in [
            ("webhook", 0, "must be 1 to 32"),
            ("webhook", 33, "must be 1 to 32"),
            ("slack", 2, "only for kind = \"webhook\", not slack"),
            ("syslog", 2, "only for kind = \"webhook\", not syslog"),
        ] {
            let err = sink(kind, serde_json::json!({"max_in_flight": n}))
                .validate("notify[0]")
                .expect_err("refused")
                .to_string();
            assert!(err.contains("notify[0].max_in_flight"), "{err}");
            assert!(err.contains(says), "{kind} {n}: {err}");
        }
    }
}
