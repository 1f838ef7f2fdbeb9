//! Glue between the application and the protocol gateways: the
//! [`SessionAuthority`] every gateway asks (session events in the audit
//! chain), the PostgreSQL gateway's [`Authority`] (the SSH gateway's is in
//! `ssh.rs`), recovery of interrupted sessions, and the follower that cuts
//! the live sessions of every gateway when a grant ends.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use breakglass_core::EventDraft;
use breakglass_gateway_common::recording::Recorder;
use breakglass_gateway_common::recording::{Point, RecordingError, read_recording};
use breakglass_gateway_common::{
    Cut, Registry, SessionAuthority, SessionEnd, SessionInfo, SessionProgress,
};
use breakglass_gateway_postgres::upstream::parse_url;
use breakglass_gateway_postgres::{Authority, Authorized, Refusal, UpstreamTarget};
use breakglass_store::{PAGE_LEN_MAX, Store, StoreError, for_each_event};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::app::{App, RefusalKind, now};
use crate::config::RoleConfig;

/// Back-off between attempts to audit a session end the store refused.
const SESSION_END_RETRY_MS: u64 = 500;

/// How often the gateway checks that the shared feed is still seen.
const FEED_WATCH_MS: u64 = 250;

/// Fails closed when the node is blind to the shared feed: once it has not
/// read the log for `server.feed_loss_grace`, a revoke made on another node
/// could be waiting unseen, so every live session is cut (and new ones are
/// refused by `GatewayAuthority` until the feed is back).
async fn watch_feed(app: Weak<App>, gateway: Registry) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(FEED_WATCH_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut blind = false;
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        let now_blind = app.feed_lost();
        if now_blind {
            let n = gateway.cut_all("feed_lost");
            if n > 0 || !blind {
                tracing::error!(
                    sessions = n,
                    blind_for_ms = app.store.feed_blind_for().as_millis() as u64,
                    "this node cannot see the shared event feed: cutting live gateway sessions and admitting none until it is back"
                );
            }
        } else if blind {
            tracing::info!("the shared event feed is back");
        }
        blind = now_blind;
    }
}

/// Secrets read from files are at most this long.
const SECRET_FILE_LEN_MAX: u64 = 4096;

/// The upstream password of a role, from its environment variable or file.
pub fn role_password(role: &RoleConfig) -> Result<Option<String>, String> {
    if let Some(var) = &role.password_env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("environment variable {var} is not set"));
    }
    if let Some(path) = &role.password_file {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > SECRET_FILE_LEN_MAX {
            return Err(format!(
                "{}: longer than {SECRET_FILE_LEN_MAX} bytes",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(None)
}

/// Answers the gateways' questions from the application.
pub struct GatewayAuthority {
    pub app: Weak<App>,
}

impl GatewayAuthority {
    /// The application, unless the service is going away or is blind to
    /// the shared feed (then no session may start).
    pub(crate) fn admitting(&self) -> Result<Arc<App>, String> {
        let app = self.app.upgrade().ok_or("the service is shutting down")?;
        if app.feed_lost() {
            return Err("this node cannot see the shared event feed; try another node".into());
        }
        Ok(app)
    }
}

#[async_trait]
impl Authority for GatewayAuthority {
    async fn authorize(
        &self,
        user: &str,
        database: &str,
        password: &str,
    ) -> Result<Authorized, Refusal> {
        let app = self
            .app
            .upgrade()
            .ok_or_else(|| Refusal::Unavailable("the service is shutting down".into()))?;
        if app.feed_lost() {
            return Err(Refusal::Unavailable(
                "this node cannot see the shared event feed; try another node".into(),
            ));
        }
        let target = app
            .config
            .target(database)
            .ok_or_else(|| Refusal::UnknownDatabase(format!("no target named {database:?}")))?;
        if target.kind != "postgres" {
            return Err(Refusal::UnknownDatabase(format!(
                "target {database:?} is not a PostgreSQL target (kind {})",
                target.kind
            )));
        }
        let grant = app
            .check_grant(password, Some(user), Some(database))
            .await
            .map_err(|r| match r.answer(database, Some(user)) {
                (RefusalKind::BadCredential, why) => Refusal::BadCredential(format!(
                    "password authentication failed for user {user:?}: {why}"
                )),
                (RefusalKind::NotAuthorized, why) => Refusal::NotAuthorized(why),
                (RefusalKind::Unavailable, why) => Refusal::Unavailable(why),
            })?;
        let role = target.roles.get(&grant.request.role).ok_or_else(|| {
            Refusal::NotAuthorized(format!(
                "role {:?} is no longer configured on {database:?}",
                grant.request.role
            ))
        })?;
        let url = target.upstream.as_deref().unwrap_or("");
        let parsed = parse_url(url).map_err(Refusal::Unavailable)?;
        let password = role_password(role).map_err(|e| {
            tracing::error!(target_name = %target.name, error = %e, "upstream password unavailable");
            Refusal::Unavailable("the upstream credentials are not available; see the server log".into())
        })?;
        let expires_at = grant.ends_at();
        Ok(Authorized {
            request_id: grant.request.id.clone(),
            principal: grant.request.requester.clone(),
            target: target.name.clone(),
            role: grant.request.role.clone(),
            expires_at,
            upstream: UpstreamTarget {
                host: parsed.host,
                port: parsed.port,
                database: parsed.database,
                user: role.user.clone().unwrap_or_default(),
                password,
                tls: parsed.tls,
            },
            redact_parameters: target.redact_parameters,
        })
    }
}

#[async_trait]
impl SessionAuthority for GatewayAuthority {
    async fn grant_live(&self, request_id: &str) -> Result<(), String> {
        let app = self.app.upgrade().ok_or("service_shutdown")?;
        // Fail closed: nothing done in a session could be vouched for.
        if app.writes_blocked().is_some() {
            return Err("audit_chain_broken".into());
        }
        match app.store.get(request_id).await {
            Ok(Some(r)) if r.is_live(now()) => Ok(()),
            Ok(Some(r)) => Err(r
                .end_reason
                .map_or_else(|| "expired".to_string(), |e| e.to_string())),
            Ok(None) => Err("unknown grant".into()),
            // Fail closed: a grant that cannot be checked is not used.
            Err(e) => {
                tracing::error!(error = %e, "cannot re-check a grant for a new session");
                Err("grant_unverifiable".into())
            }
        }
    }

    async fn session_started(&self, info: &SessionInfo) -> Result<(), String> {
        let app = self.app.upgrade().ok_or("shutting down")?;
        let event = EventDraft {
            actor: info.principal.clone(),
            action: "session.started".into(),
            request_id: Some(info.request_id.clone()),
            details: json!({
                "session_id": info.session_id,
                "target": info.target,
                "role": info.role,
                "upstream_user": info.upstream_user,
                "client": info.client.to_string(),
                "gateway": info.protocol,
                "protocol": info.protocol,
                "node": app.node_id(),
            }),
        };
        app.store
            .append(vec![event], now())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn session_ended(&self, info: &SessionInfo, end: &SessionEnd) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        let event = session_ended_event(
            &info.principal,
            &info.request_id,
            &info.session_id,
            &end.reason,
            end.statements,
            end.entries,
            &end.final_hash,
        );
        if let Err(e) = app.store.append(vec![event.clone()], now()).await {
            // The store may be down (a session cut because the node went
            // blind to the feed): keep trying in the background, so the end
            // is written as soon as the store is back, without a restart.
            tracing::error!(session = %info.session_id, error = %e, "cannot audit session end yet; retrying until the store answers");
            let weak = self.app.clone();
            let session = info.session_id.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(SESSION_END_RETRY_MS))
                        .await;
                    let Some(app) = weak.upgrade() else { return };
                    match app.store.append(vec![event.clone()], now()).await {
                        Ok(_) => {
                            tracing::info!(session = %session, "session end audited after a retry");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(session = %session, error = %e, "session end still not audited")
                        }
                    }
                }
            });
        }
    }

    async fn sessions_progress(&self, progress: &[SessionProgress]) -> Result<(), String> {
        let app = self.app.upgrade().ok_or("shutting down")?;
        if let Some(why) = app.writes_blocked() {
            return Err(format!("the audit chain is broken: {why}"));
        }
        let events = progress
            .iter()
            .map(|p| EventDraft {
                actor: p.principal.clone(),
                action: "session.progress".into(),
                request_id: Some(p.request_id.clone()),
                details: json!({
                    "session_id": p.session_id,
                    "recording_entries": p.entries,
                    "recording_sha256": hex::encode(p.hash),
                }),
            })
            .collect();
        app.store
            .append(events, now())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn session_ended_event(
    actor: &str,
    request_id: &str,
    session_id: &str,
    reason: &str,
    statements: u64,
    entries: u64,
    hash: &[u8; 32],
) -> EventDraft {
    EventDraft {
        actor: actor.to_string(),
        action: "session.ended".into(),
        request_id: Some(request_id.to_string()),
        details: json!({
            "session_id": session_id,
            "end_reason": reason,
            "statements": statements,
            "recording_entries": entries,
            "recording_sha256": hex::encode(hash),
        }),
    }
}

/// The end reason of an interrupted session whose recording is missing,
/// unreadable or differs from what the audit chain anchored.
pub const RECORDING_MISMATCH: &str = "recording_mismatch";

/// What the audit chain says about one session.
#[derive(Debug, Default, Clone)]
pub struct SessionTrail {
    pub request_id: Option<String>,
    pub principal: Option<String>,
    pub started: bool,
    pub ended: bool,
    /// The newest anchored point.
    pub anchor: Option<Point>,
}

impl SessionTrail {
    /// Takes in one event if it concerns `session_id`.
    pub fn push(&mut self, session_id: &str, e: &breakglass_core::audit::AuditEvent) {
        if !e.action.starts_with("session.") {
            return;
        }
        let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details) else {
            return;
        };
        if d["session_id"].as_str() != Some(session_id) {
            return;
        }
        match e.action.as_str() {
            "session.started" => {
                self.started = true;
                self.request_id = e.request_id.clone();
                self.principal = Some(e.actor.clone());
            }
            "session.ended" => self.ended = true,
            "session.progress" => {
                if let Some(p) = anchor_of(&d)
                    && self.anchor.is_none_or(|a| p.0 > a.0)
                {
                    self.anchor = Some(p);
                }
            }
            _ => {}
        }
    }
}

/// The `(recording_entries, recording_sha256)` of a `session.progress`.
pub fn anchor_of(details: &serde_json::Value) -> Option<Point> {
    let entries = details["recording_entries"].as_u64()?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(details["recording_sha256"].as_str()?, &mut hash).ok()?;
    Some((entries, hash))
}

/// Reads what the chain says about one session: the events of its grant
/// when it is known (a page, then the rest of the log from there), else
/// the whole log.
async fn trail_of(
    store: &dyn Store,
    session_id: &str,
    request_id: Option<&str>,
) -> Result<SessionTrail, StoreError> {
    let mut trail = SessionTrail::default();
    let mut after = 0;
    if let Some(r) = request_id {
        let events = store.request_events(r, PAGE_LEN_MAX).await?;
        for e in &events {
            trail.push(session_id, e);
        }
        if events.len() < PAGE_LEN_MAX as usize {
            return Ok(trail);
        }
        after = events.last().map_or(0, |e| e.seq);
    }
    for_each_event(store, after, |e| {
        trail.push(session_id, e);
        true
    })
    .await?;
    Ok(trail)
}

/// Ends the recordings of sessions that were live when the process died,
/// and records their end in the audit chain. A recording shorter than, or
/// different from, what the chain anchored (or gone) is left as it is and
/// its session ends with [`RECORDING_MISMATCH`], which `audit verify`
/// reports.
pub async fn recover_sessions(app: &App) -> anyhow::Result<usize> {
    let dir = app.config.recordings_dir();
    let mut events = Vec::new();
    for id in Recorder::interrupted(&dir) {
        if !crate::verify::is_session_id(&id) {
            tracing::error!(marker = %id, "ignoring a recording marker that names no session");
            continue;
        }
        let path = Recorder::path_of(&dir, &id);
        let header = read_recording(&path, |_| {}).ok().map(|s| s.header);
        let request_id = header
            .as_ref()
            .and_then(|h| h["request_id"].as_str().map(str::to_string));
        let mut trail = trail_of(app.store.as_ref(), &id, request_id.as_deref()).await?;
        if !trail.started && request_id.is_some() {
            // The header may lie about its grant: look everywhere.
            trail = trail_of(app.store.as_ref(), &id, None).await?;
        }
        if !trail.started || trail.ended {
            // No session.started: the session was refused before it began
            // (its recording is a leftover); already ended: nothing to add.
            let _ = Recorder::forget_marker(&dir, &id);
            continue;
        }
        let request_id = trail.request_id.clone().unwrap_or_default();
        let principal = trail.principal.clone().unwrap_or_else(|| "system".into());
        match Recorder::close_interrupted(&dir, &id, "service_restart", now(), trail.anchor) {
            Ok(s) => {
                let _ = Recorder::forget_marker(&dir, &id);
                events.push(session_ended_event(
                    &principal,
                    &request_id,
                    &id,
                    "service_restart",
                    s.statements,
                    s.entries,
                    &s.final_hash,
                ));
            }
            Err(e) => {
                let problem = match &e {
                    RecordingError::Io { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        "the recording is missing".to_string()
                    }
                    other => other.to_string(),
                };
                tracing::error!(session = %id, problem = %problem, "REFUSING an interrupted session's recording: it does not hold what the audit chain anchored; `audit verify` will report it");
                let _ = Recorder::forget_marker(&dir, &id);
                let mut event = session_ended_event(
                    &principal,
                    &request_id,
                    &id,
                    RECORDING_MISMATCH,
                    0,
                    0,
                    &[0; 32],
                );
                event.details["problem"] = json!(problem);
                events.push(event);
            }
        }
    }
    let n = events.len();
    if n > 0 {
        app.store.append(events, now()).await?;
    }
    Ok(n)
}

/// Follows the event feed and cuts the sessions of every grant that ends,
/// whichever gateway holds them.
pub fn spawn_cutter(app: &Arc<App>) -> tokio::task::JoinHandle<()> {
    let gateway = app.sessions.clone();
    let mut feed = app.store.subscribe();
    if app.store.is_shared() {
        tokio::spawn(watch_feed(Arc::downgrade(app), gateway.clone()));
    }
    let app = Arc::downgrade(app);
    tokio::spawn(async move {
        loop {
            match feed.recv().await {
                Ok(e) => {
                    let cut = match e.action.as_str() {
                        "request.expired" => Cut::new("expired"),
                        "request.revoked" => {
                            let reason = serde_json::from_str::<serde_json::Value>(&e.details)
                                .ok()
                                .and_then(|d| d["end_reason"].as_str().map(str::to_string))
                                .unwrap_or_else(|| "revoked".into());
                            // A person's revoke or release names them; the
                            // system's ends (not countersigned in time,
                            // requester removed) do not.
                            let by = (e.actor != "system").then(|| e.actor.clone());
                            Cut { reason, by }
                        }
                        _ => continue,
                    };
                    let reason = cut.reason.clone();
                    if let Some(id) = &e.request_id {
                        let n = gateway.cut(id, &cut);
                        if n > 0 {
                            tracing::info!(request = %id, sessions = n, reason, "cutting live sessions");
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    // Missed events: check every grant with live sessions.
                    let Some(app) = app.upgrade() else { return };
                    for id in gateway.live_grants() {
                        let live =
                            matches!(app.store.get(&id).await, Ok(Some(r)) if r.is_live(now()));
                        if !live {
                            gateway.cut(&id, &Cut::new("ended"));
                        }
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}
