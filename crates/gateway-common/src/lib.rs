//! What every gateway of breakglass shares: the per-session recordings with
//! their own hash chain (`recording`, `entry`) and how they carry bytes
//! (`data`), the [`SessionAuthority`]
//! every gateway asks about grants and sessions, the [`Registry`] of live
//! sessions per grant that a cut reaches, and the anchoring of live
//! recordings in the audit chain. The protocol gateways
//! (`breakglass-gateway-postgres`, `breakglass-gateway-ssh`) add their wire
//! protocol on top; the server implements the authority once for both.

pub mod data;
mod entry;
pub mod recording;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::recording::Recorder;
pub use crate::recording::SessionProgress;

/// While a session's recording grows, its durable point is anchored in the
/// audit chain (`session.progress`) at most this long after it became
/// durable; an idle session costs nothing. All sessions that moved share
/// one append.
pub const ANCHOR_INTERVAL_MS: u64 = 2000;

/// Identity of a live session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session_id: String,
    pub request_id: String,
    pub principal: String,
    pub target: String,
    pub role: String,
    pub upstream_user: String,
    pub client: SocketAddr,
    /// `"postgres"` or `"ssh"`: which gateway holds the session.
    pub protocol: &'static str,
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub reason: String,
    pub statements: u64,
    pub entries: u64,
    pub final_hash: [u8; 32],
}

/// Why a live session is being cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The session's end reason (`expired`, `revoked`, `not_countersigned`,
    /// `service_shutdown`, ...).
    pub reason: String,
    /// Who ended the grant, when a person did (a revoke).
    pub by: Option<String>,
}

impl Cut {
    pub fn new(reason: &str) -> Cut {
        Cut {
            reason: reason.to_string(),
            by: None,
        }
    }

    /// The one line a client is told when its session is cut.
    pub fn message(&self) -> String {
        match self.reason.as_str() {
            "expired" => "breakglass: the grant expired; session closed".to_string(),
            "idle_timeout" => "breakglass: session idle for too long; closed".to_string(),
            "service_shutdown" => {
                "breakglass: the gateway is shutting down; session closed (the grant itself is unchanged)"
                    .to_string()
            }
            "audit_chain_broken" => "breakglass: the audit log does not verify; every session is closed and no grant is usable until an operator investigates (`breakglass audit verify`)".to_string(),
            other => match &self.by {
                Some(by) => format!("breakglass: the grant has ended ({other} by {by}); session closed"),
                None => format!("breakglass: the grant has ended ({other}); session closed"),
            },
        }
    }
}

/// What every gateway needs from breakglass about grants and sessions.
/// Each gateway's own trait adds how a client signs in.
#[async_trait]
pub trait SessionAuthority: Send + Sync + 'static {
    /// `Ok` while the grant is live, else why it ended. Asked again once a
    /// session is registered: a grant that ended between the sign-in and
    /// the registration was cut before the session could be.
    async fn grant_live(&self, request_id: &str) -> Result<(), String>;
    /// Records the start of a session (in the audit chain); an error refuses
    /// the session.
    async fn session_started(&self, info: &SessionInfo) -> Result<(), String>;
    /// Records the end of a session.
    async fn session_ended(&self, info: &SessionInfo, end: &SessionEnd);
    /// Anchors the durable points of live recordings in the audit chain,
    /// all in one commit.
    async fn sessions_progress(&self, progress: &[SessionProgress]) -> Result<(), String>;
}

struct SessionHandle {
    session_id: String,
    cut: watch::Sender<Option<Cut>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live sessions of every gateway of this node, per grant: what a cut
/// reaches. One registry is shared by all gateways, so the server cuts,
/// counts and skips (in online verification) every session the same way.
/// Cloning shares it.
#[derive(Clone, Default)]
pub struct Registry {
    sessions: Arc<Mutex<HashMap<String, Vec<SessionHandle>>>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers a session of a grant, unless the grant already has
    /// `per_grant_max` live sessions. The receiver sees the cut.
    pub fn register(
        &self,
        request_id: &str,
        session_id: &str,
        per_grant_max: usize,
    ) -> Option<watch::Receiver<Option<Cut>>> {
        let mut sessions = lock(&self.sessions);
        let list = sessions.entry(request_id.to_string()).or_default();
        if list.len() >= per_grant_max {
            if list.is_empty() {
                sessions.remove(request_id);
            }
            return None;
        }
        let (tx, rx) = watch::channel(None);
        list.push(SessionHandle {
            session_id: session_id.to_string(),
            cut: tx,
        });
        Some(rx)
    }

    pub fn unregister(&self, request_id: &str, session_id: &str) {
        let mut sessions = lock(&self.sessions);
        if let Some(list) = sessions.get_mut(request_id) {
            list.retain(|h| h.session_id != session_id);
            if list.is_empty() {
                sessions.remove(request_id);
            }
        }
    }

    /// Live sessions of one grant.
    pub fn grant_sessions(&self, request_id: &str) -> usize {
        lock(&self.sessions).get(request_id).map_or(0, Vec::len)
    }

    /// Cuts every live session of a grant; returns how many were signalled.
    pub fn cut(&self, request_id: &str, cut: &Cut) -> usize {
        let sessions = lock(&self.sessions);
        let Some(list) = sessions.get(request_id) else {
            return 0;
        };
        for h in list {
            let _ = h.cut.send(Some(cut.clone()));
        }
        list.len()
    }

    /// Cuts every live session (service shutdown, broken chain, blind feed).
    pub fn cut_all(&self, reason: &str) -> usize {
        let sessions = lock(&self.sessions);
        let cut = Cut::new(reason);
        for h in sessions.values().flatten() {
            let _ = h.cut.send(Some(cut.clone()));
        }
        sessions.values().map(Vec::len).sum()
    }

    /// Live sessions, in all.
    pub fn live_sessions(&self) -> usize {
        lock(&self.sessions).values().map(Vec::len).sum()
    }

    /// Ids of the live sessions.
    pub fn live_session_ids(&self) -> Vec<String> {
        lock(&self.sessions)
            .values()
            .flatten()
            .map(|h| h.session_id.clone())
            .collect()
    }

    /// Request ids of grants with live sessions.
    pub fn live_grants(&self) -> Vec<String> {
        lock(&self.sessions).keys().cloned().collect()
    }
}

/// The cut a receiver saw (a dropped sender counts as a revoke: fail closed).
pub fn cut_of(rx: &watch::Receiver<Option<Cut>>) -> Cut {
    rx.borrow().clone().unwrap_or_else(|| Cut::new("revoked"))
}

/// Anchors every live recording of `recorder` that moved, in one commit.
pub async fn anchor_once(recorder: &Recorder, authority: &dyn SessionAuthority) {
    let moved = recorder.moved();
    if moved.is_empty() {
        return;
    }
    match authority.sessions_progress(&moved).await {
        Ok(()) => recorder.anchored(&moved),
        Err(e) => {
            tracing::error!(sessions = moved.len(), error = %e, "cannot anchor live session recordings in the audit chain")
        }
    }
}

/// Every [`ANCHOR_INTERVAL_MS`], anchors the recordings that moved; not on
/// a relay's path. Ends when `recorder` is dropped.
pub async fn anchor_loop(
    recorder: std::sync::Weak<Recorder>,
    authority: Arc<dyn SessionAuthority>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(ANCHOR_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(recorder) = recorder.upgrade() else {
            return;
        };
        anchor_once(&recorder, authority.as_ref()).await;
    }
}

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_cuts_every_session_of_a_grant_and_holds_the_limit() {
        let r = Registry::new();
        let mut a = r.register("g1", "s1", 2).expect("first");
        let b = r.register("g1", "s2", 2).expect("second");
        assert!(r.register("g1", "s3", 2).is_none(), "limit per grant");
        let c = r.register("g2", "s4", 2).expect("other grant");
        let cut = Cut {
            reason: "revoked".into(),
            by: Some("carol".into()),
        };
        assert_eq!(r.cut("g1", &cut), 2);
        assert!(a.has_changed().expect("open"));
        assert_eq!(cut_of(&a), cut);
        assert_eq!(cut_of(&b), cut);
        assert!(c.borrow().is_none(), "another grant's session is untouched");
        a.mark_unchanged();
        r.unregister("g1", "s1");
        r.unregister("g1", "s2");
        assert_eq!(r.live_grants(), vec!["g2".to_string()]);
        assert_eq!(r.cut_all("service_shutdown"), 1);
        assert_eq!(cut_of(&c).reason, "service_shutdown");
    }

    #[test]
    fn cut_messages_name_the_reason_and_who() {
        let by = Cut {
            reason: "revoked".into(),
            by: Some("carol".into()),
        };
        assert_eq!(
            by.message(),
            "breakglass: the grant has ended (revoked by carol); session closed"
        );
        assert_eq!(
            Cut::new("not_countersigned").message(),
            "breakglass: the grant has ended (not_countersigned); session closed"
        );
        assert_eq!(
            Cut::new("expired").message(),
            "breakglass: the grant expired; session closed"
        );
    }
}
