//! Notification delivery for breakglass (DESIGN §13): the `[[notify]]`
//! sinks (signed webhooks, Slack, PagerDuty, syslog), what each one is
//! sent for an audit event, one delivery attempt with its timeout and the
//! backoff between attempts, and the signatures of both directions
//! (Standard Webhooks out, Slack requests in).
//!
//! This crate knows nothing of the store or the HTTP API: the server
//! follows the audit feed, keeps the per-sink cursors and decides when to
//! retry or give up (`crates/server/src/notify.rs`).

pub mod agent;
pub mod config;
pub mod deliver;
pub mod notice;
pub mod sign;
pub mod syslog;

use std::sync::Arc;

use breakglass_core::audit::AuditEvent;
use thiserror::Error;

pub use config::{SinkConfig, SinkKind};
pub use deliver::Attempt;
pub use notice::{Links, Notice, RequestView, Urgency};

#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("{0}")]
    Config(String),
}

/// What one sink is sent for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A JSON POST; `id` is the `webhook-id` (the event's `seq`).
    Http { id: String, body: Vec<u8> },
    /// Octet-counted syslog frames.
    Syslog(Vec<u8>),
}

/// A configured sink with its secrets read and its client built.
pub struct Sink {
    pub config: SinkConfig,
    endpoint: Option<String>,
    key: Option<Vec<u8>>,
    routing_key: Option<String>,
    http: deliver::HttpSender,
    tls: Option<Arc<rustls::ClientConfig>>,
    hostname: String,
    /// `syslog`: the connection kept between events.
    syslog: std::sync::Mutex<Option<deliver::SyslogConn>>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL, key or routing key: they are secrets.
        f.debug_struct("Sink")
            .field("name", &self.config.name)
            .field("kind", &self.config.kind)
            .finish()
    }
}

impl Sink {
    /// Reads the sink's secrets; errors name the key at fault (prefixed
    /// with `at`, e.g. `notify[1]`).
    pub fn open(config: SinkConfig, at: &str) -> Result<Sink, NotifyError> {
        let ctx = |e: NotifyError| NotifyError::Config(format!("{at}.{e}"));
        config
            .validate(at)
            .map_err(|e| NotifyError::Config(e.to_string()))?;
        let endpoint = config.endpoint().map_err(ctx)?;
        let key = match config::read_secret(
            "secret",
            config.secret_env.as_deref(),
            config.secret_file.as_deref(),
        )
        .map_err(ctx)?
        {
            Some(s) => Some(
                sign::webhook_key(&s)
                    .map_err(|e| NotifyError::Config(format!("{at}.secret_env: {e}")))?,
            ),
            None => None,
        };
        let routing_key = config::read_secret(
            "routing_key",
            config.routing_key_env.as_deref(),
            config.routing_key_file.as_deref(),
        )
        .map_err(ctx)?;
        let tls = if config.tls {
            Some(
                deliver::syslog_tls(config.ca_file.as_deref())
                    .map_err(|e| NotifyError::Config(format!("{at}.ca_file: {e}")))?,
            )
        } else {
            None
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "-".into());
        Ok(Sink {
            http: deliver::HttpSender::new(config.timeout()),
            config,
            endpoint,
            key,
            routing_key,
            tls,
            hostname,
            syslog: std::sync::Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// What to send this sink for `event`, whose notice is `notice` (built
    /// when the event tells someone something); `None` when the sink has
    /// nothing to send for it. The request filters (`target_groups`,
    /// `emergency`) are the caller's: they need the configuration.
    pub fn render(&self, event: &AuditEvent, notice: Option<&Notice>) -> Option<Payload> {
        let id = event.seq.to_string();
        match self.config.kind {
            SinkKind::Syslog => Some(Payload::Syslog(syslog::frame(&syslog::format_event(
                event,
                &self.hostname,
            )))),
            SinkKind::Webhook => notice.map(|n| Payload::Http {
                id,
                body: notice::webhook_body(n),
            }),
            SinkKind::Slack => notice.map(|n| Payload::Http {
                id,
                body: notice::slack_message(n, self.config.interactive)
                    .to_string()
                    .into_bytes(),
            }),
            SinkKind::Pagerduty => {
                let n = notice?;
                let ev = notice::pagerduty_event(n, self.routing_key.as_deref().unwrap_or(""))?;
                Some(Payload::Http {
                    id,
                    body: ev.to_string().into_bytes(),
                })
            }
        }
    }

    /// One attempt. `now_s` is the `webhook-timestamp`. HTTP runs on the
    /// caller's runtime; a syslog write (blocking) on its blocking threads.
    pub async fn send(self: &Arc<Sink>, payload: &Arc<Payload>, now_s: i64) -> Attempt {
        match payload.as_ref() {
            Payload::Syslog(_) => {
                let (sink, payload) = (self.clone(), payload.clone());
                tokio::task::spawn_blocking(move || {
                    let frames = match payload.as_ref() {
                        Payload::Syslog(f) => f.as_slice(),
                        Payload::Http { .. } => &[],
                    };
                    deliver::send_syslog(
                        sink.config.address.as_deref().unwrap_or(""),
                        sink.tls.as_ref(),
                        frames,
                        sink.config.timeout(),
                        &sink.syslog,
                    )
                })
                .await
                .unwrap_or_else(|_| Attempt::Retry {
                    why: "delivery task failed".into(),
                    after: None,
                })
            }
            Payload::Http { id, body } => {
                let Some(url) = &self.endpoint else {
                    return Attempt::Fail {
                        why: "no url".into(),
                    };
                };
                let mut headers = Vec::new();
                if let Some(key) = &self.key {
                    headers.push(("webhook-id", id.clone()));
                    headers.push(("webhook-timestamp", now_s.to_string()));
                    headers.push((
                        "webhook-signature",
                        sign::webhook_signature(key, id, now_s, body),
                    ));
                }
                self.http.post(url, &headers, body).await
            }
        }
    }
}
