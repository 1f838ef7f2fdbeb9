//! The application layer: authenticates principals, evaluates policy, runs
//! lifecycle steps and commits them through the store, issues and checks
//! grant credentials. The HTTP API and (later) the gateways call only this.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use breakglass_core::lifecycle::{self, Command, LifecycleError, NewRequest, is_due};
use breakglass_core::policy::{Action, Decision, PolicyEngine, PolicyInput};
use breakglass_core::time::parse_duration;
use breakglass_core::token::{self, match_token};
use breakglass_core::{Actor, Principal, Request, State, Timestamp, Transition};
use breakglass_gateway_postgres::recording::{Recorder, Resume, read_recording_from};
use breakglass_store::{CredentialRecord, ListQuery, PAGE_LEN_MAX, Store, StoreError};
use rand::RngCore;
use serde_json::json;
use thiserror::Error;

use crate::config::Config;
use crate::dto::{Connection, CreateRequest, Credentials, RecordingPage, SessionSummary};
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// How many times a transition is recomputed after losing a compare-and-set.
const CONFLICT_RETRIES_MAX: usize = 5;

/// Wall-clock now, in milliseconds.
pub fn now() -> Timestamp {
    Timestamp::now()
}

/// Every way an application call can fail, each with a stable code.
#[derive(Debug, Error)]
pub enum AppError {
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{1}")]
    Forbidden(&'static str, String),
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("{0}")]
    Lifecycle(#[from] LifecycleError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("writes are refused: {0}")]
    WritesBlocked(String),
}

impl AppError {
    /// HTTP status and stable code (DESIGN §7).
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            AppError::Unauthenticated => (401, "unauthenticated"),
            AppError::BadInput(_) => (400, "bad_request"),
            AppError::NotFound(_) => (404, "not_found"),
            AppError::Forbidden(code, _) => (403, code),
            AppError::Conflict(code, _) => (409, code),
            AppError::Lifecycle(e) => match e {
                LifecycleError::Invalid(_) => (400, "invalid_request"),
                LifecycleError::PolicyDenied(_) => (403, "policy_denied"),
                LifecycleError::DurationExceedsPolicy { .. } => (403, "duration_exceeds_policy"),
                LifecycleError::Ticket(_) => (403, "ticket_required"),
                LifecycleError::SelfApproval => (403, "self_approval"),
                LifecycleError::NotEligible { .. } => (403, "not_eligible"),
                LifecycleError::NotRequester(_) => (403, "not_requester"),
                LifecycleError::NotAllowedToRevoke { .. } => (403, "not_allowed"),
                LifecycleError::AlreadyApproved(_) => (409, "already_approved"),
                LifecycleError::AlreadyReviewed => (409, "already_reviewed"),
                LifecycleError::WrongState { .. } => (409, "wrong_state"),
                LifecycleError::NotDue => (409, "not_due"),
            },
            AppError::Store(StoreError::Conflict { .. }) => (409, "conflict"),
            AppError::Store(StoreError::Duplicate(_)) => (409, "conflict"),
            AppError::Store(StoreError::Limit(_)) => (409, "credential_limit"),
            AppError::Store(StoreError::Unavailable(_)) => (503, "store_unavailable"),
            AppError::Store(StoreError::Corrupt(_)) => (500, "internal"),
            AppError::WritesBlocked(_) => (503, "audit_chain_broken"),
        }
    }

    /// Whether the message may be shown to the caller. Store failures are
    /// logged, never returned.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            AppError::Store(StoreError::Unavailable(_) | StoreError::Corrupt(_))
        )
    }
}

struct LocalPrincipal {
    digest: [u8; 32],
    principal: Principal,
}

/// The result of checking a grant credential (what a gateway needs).
#[derive(Debug, Clone)]
pub struct GrantCheck {
    pub request: Request,
    pub credential: CredentialRecord,
}

/// Why a grant credential is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GrantRefusal {
    #[error("unknown credential")]
    Unknown,
    #[error("credential belongs to another principal")]
    WrongPrincipal,
    #[error("credential is for another target")]
    WrongTarget,
    #[error("the grant has ended ({0})")]
    Ended(String),
    #[error("store unavailable")]
    Unavailable,
}

pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub policy: PolicyEngine,
    pub metrics: Arc<Metrics>,
    pub scheduler: Scheduler,
    principals: Vec<LocalPrincipal>,
    pending_timeout_s: u64,
    /// Set when the audit chain was found broken: every write is refused.
    writes_blocked: std::sync::RwLock<Option<String>>,
    signing_key: ed25519_dalek::SigningKey,
    recording_cursors: RecordingCursors,
}

/// Credentials one grant may be issued in all. Each is valid for the whole
/// grant (`connect` fetches one per run), so this only keeps a requester
/// from growing the store and the audit log without bound.
pub const CREDENTIALS_PER_GRANT_MAX: u64 = 1024;

/// Recording page cursors kept at most.
const RECORDING_CURSORS_MAX: usize = 4096;

/// Where recently served recording pages ended, so the page after one
/// resumes there instead of re-reading the file from its start. Bounded:
/// the oldest are forgotten first, and a forgotten one only costs a read
/// from the start.
#[derive(Default)]
struct RecordingCursors {
    inner: Mutex<CursorMap>,
}

/// (session id, seq of the entry a page ended with) -> where to resume,
/// and the keys oldest first.
type CursorMap = (HashMap<(String, u64), Resume>, VecDeque<(String, u64)>);

impl RecordingCursors {
    fn get(&self, session_id: &str, after: u64) -> Option<Resume> {
        if after == 0 {
            return None;
        }
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0.get(&(session_id.to_string(), after)).copied()
    }

    fn put(&self, session_id: &str, at: Resume) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *inner;
        let key = (session_id.to_string(), at.seq);
        if map.insert(key.clone(), at).is_none() {
            order.push_back(key);
            while order.len() > RECORDING_CURSORS_MAX {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }
}

impl App {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        policy: PolicyEngine,
        metrics: Arc<Metrics>,
        signing_key: ed25519_dalek::SigningKey,
        writes_blocked: Option<String>,
    ) -> Arc<App> {
        let admin_groups: BTreeSet<String> = config.server.admin_groups.iter().cloned().collect();
        let principals = config
            .principals
            .iter()
            .filter_map(|p| {
                let groups: BTreeSet<String> = p.groups.iter().cloned().collect();
                Some(LocalPrincipal {
                    digest: token::parse_sha256_hex(&p.token_sha256)?,
                    principal: Principal {
                        name: p.name.clone(),
                        admin: groups.iter().any(|g| admin_groups.contains(g)),
                        groups,
                    },
                })
            })
            .collect();
        let pending_timeout_s = config.pending_timeout_s();
        Arc::new_cyclic(|weak| App {
            scheduler: Scheduler::new(weak.clone()),
            config,
            store,
            policy,
            metrics,
            principals,
            pending_timeout_s,
            writes_blocked: std::sync::RwLock::new(writes_blocked),
            signing_key,
            recording_cursors: RecordingCursors::default(),
        })
    }

    /// Finds the principal a bearer token belongs to, comparing against every
    /// configured digest in constant time.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal, AppError> {
        match_token(
            bearer,
            self.principals.iter().map(|p| (&p.digest, &p.principal)),
        )
        .cloned()
        .ok_or(AppError::Unauthenticated)
    }

    fn check_writable(&self) -> Result<(), AppError> {
        match self.writes_blocked() {
            Some(why) => Err(AppError::WritesBlocked(why)),
            None => Ok(()),
        }
    }

    /// Refuses every write from now on (fail closed on a broken chain).
    pub fn block_writes(&self, why: String) {
        tracing::error!(reason = %why, "AUDIT CHAIN BROKEN: refusing all writes until it is investigated (run `breakglass audit verify`)");
        let mut w = self
            .writes_blocked
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if w.is_none() {
            *w = Some(why);
        }
    }

    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.signing_key.verifying_key()
    }

    pub fn signing_key(&self) -> &ed25519_dalek::SigningKey {
        &self.signing_key
    }

    pub fn writes_blocked(&self) -> Option<String> {
        self.writes_blocked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Evaluates policy for a would-be request without creating it.
    pub fn decide(
        &self,
        who: &Principal,
        input: &NewRequest,
        now: Timestamp,
    ) -> Result<Decision, AppError> {
        let target = self
            .config
            .target(&input.target)
            .ok_or_else(|| AppError::BadInput(format!("unknown target {:?}", input.target)))?;
        if !target.roles.contains_key(&input.role) {
            return Err(AppError::BadInput(format!(
                "target {} has no role {:?} (roles: {})",
                target.name,
                input.role,
                target.roles.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let groups: Vec<String> = who.groups.iter().cloned().collect();
        Ok(self.policy.evaluate(&PolicyInput {
            principal: &who.name,
            principal_groups: &groups,
            target: &target.name,
            target_groups: &target.groups,
            action: if input.emergency {
                Action::Emergency
            } else {
                Action::Request
            },
            role: &input.role,
            duration_s: input.duration_s,
            reason: &input.reason,
            ticket: input.ticket.as_deref(),
            now,
        }))
    }

    pub async fn create_request(
        &self,
        who: &Principal,
        body: CreateRequest,
    ) -> Result<Request, AppError> {
        self.check_writable()?;
        let duration_s = parse_duration(&body.duration).map_err(|e| match e {
            // Over the hard cap is a refusal like a policy's cap, not a typo.
            breakglass_core::time::DurationError::TooLong(_) => {
                AppError::Forbidden("duration_exceeds_policy", format!("duration: {e}"))
            }
            _ => AppError::BadInput(format!("duration: {e}")),
        })?;
        let input = NewRequest {
            target: body.target,
            role: body.role,
            duration_s,
            reason: body.reason,
            ticket: body.ticket.filter(|t| !t.is_empty()),
            emergency: body.emergency,
        };
        lifecycle::check_name("target", &input.target)?;
        lifecycle::check_name("role", &input.role)?;
        let now = now();
        let decision = self.decide(who, &input, now)?;
        let id = uuid::Uuid::now_v7().to_string();
        let t = lifecycle::create(&input, who, &decision, id, now, self.pending_timeout_s)?;
        self.commit(t, now, true).await
    }

    /// Commits a transition and tells the scheduler and metrics about it.
    async fn commit(
        &self,
        t: Transition,
        now: Timestamp,
        create: bool,
    ) -> Result<Request, AppError> {
        let request = t.request.clone();
        let events = if create {
            self.store.create(t, now).await?
        } else {
            self.store.apply(t, now).await?
        };
        for e in &events {
            self.metrics.observe_event(e);
        }
        self.scheduler.track(&request);
        Ok(request)
    }

    /// Reads a request the principal may see; others get `NotFound`, so ids
    /// of requests one may not see are not confirmed to exist.
    pub async fn get_visible(&self, who: &Principal, id: &str) -> Result<Request, AppError> {
        let not_found = || AppError::NotFound(format!("no request {id}"));
        if id.len() > 64 {
            return Err(not_found());
        }
        let req = self.store.get(id).await?.ok_or_else(not_found)?;
        if self.can_see(who, &req) {
            Ok(req)
        } else {
            Err(not_found())
        }
    }

    pub fn can_see(&self, who: &Principal, req: &Request) -> bool {
        who.admin
            || who.name == req.requester
            || req.approver_groups.iter().any(|g| who.groups.contains(g))
    }

    /// Applies a command of a principal, recomputing after a lost race.
    pub async fn act(&self, who: &Principal, id: &str, cmd: Command) -> Result<Request, AppError> {
        self.check_writable()?;
        let actor = Actor::Principal(who.clone());
        for _ in 0..CONFLICT_RETRIES_MAX {
            let req = self.get_visible(who, id).await?;
            let now = now();
            if is_due(&req, now) {
                // The deadline passed and the scheduler has not caught up yet:
                // end it now, then answer on the final state.
                self.tick(&req.id).await?;
                continue;
            }
            let t = lifecycle::step(&req, &actor, &cmd, now)?;
            match self.commit(t, now, false).await {
                Err(AppError::Store(StoreError::Conflict { .. })) => continue,
                other => return other,
            }
        }
        Err(AppError::Conflict(
            "conflict",
            format!("request {id} keeps changing; try again"),
        ))
    }

    /// Applies whatever deadline of request `id` has passed. Returns the
    /// request as it ends up, or `None` if it does not exist.
    pub async fn tick(&self, id: &str) -> Result<Option<Request>, AppError> {
        for _ in 0..CONFLICT_RETRIES_MAX {
            let Some(req) = self.store.get(id).await? else {
                return Ok(None);
            };
            let now = now();
            match lifecycle::step(&req, &Actor::System, &Command::Tick, now) {
                Ok(t) => match self.commit(t, now, false).await {
                    Err(AppError::Store(StoreError::Conflict { .. })) => continue,
                    Err(e) => return Err(e),
                    Ok(r) => return Ok(Some(r)),
                },
                Err(LifecycleError::NotDue | LifecycleError::WrongState { .. }) => {
                    self.scheduler.track(&req);
                    return Ok(Some(req));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::Conflict(
            "conflict",
            format!("request {id} keeps changing"),
        ))
    }

    pub async fn list(
        &self,
        who: &Principal,
        mut q: ListQuery,
        mine: bool,
    ) -> Result<Vec<Request>, AppError> {
        if mine {
            q.requester = Some(who.name.clone());
        }
        if !who.admin {
            q.visible_to = Some((who.name.clone(), who.groups.iter().cloned().collect()));
        }
        Ok(self.store.list(q).await?)
    }

    /// Issues a credential for the requester's live grant. The token is
    /// returned once; only its SHA-256 is stored.
    pub async fn issue_credentials(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<Credentials, AppError> {
        self.check_writable()?;
        let req = self.get_visible(who, id).await?;
        if req.requester != who.name {
            return Err(AppError::Forbidden(
                "not_requester",
                "only the requester of a grant can get its credentials".into(),
            ));
        }
        let now = now();
        if !req.is_live(now) {
            let state = if req.state == State::Active {
                "past its expiry"
            } else {
                req.state.as_str()
            };
            return Err(AppError::Conflict(
                "wrong_state",
                format!("request {id} is {state}; credentials exist only for an active grant"),
            ));
        }
        let expires_at = req.expires_at.unwrap_or(now);
        let mut random = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut random);
        let secret = token::grant_token(random);
        let hash = token::token_hash(&secret);
        let record = CredentialRecord {
            hash,
            request_id: req.id.clone(),
            principal: req.requester.clone(),
            target: req.target.clone(),
            role: req.role.clone(),
            expires_at,
            issued_at: now,
        };
        let event = breakglass_core::EventDraft {
            actor: who.name.clone(),
            action: "credentials.issued".into(),
            request_id: Some(req.id.clone()),
            details: json!({
                "target": req.target,
                "role": req.role,
                "expires_at": expires_at.to_rfc3339(),
                // Enough to correlate with gateway logs; useless to an attacker.
                "token_sha256_prefix": hex::encode(&hash[..6]),
            }),
        };
        self.store
            .issue_credential(record, event, CREDENTIALS_PER_GRANT_MAX, now)
            .await?;
        Ok(Credentials {
            token: secret,
            request_id: req.id.clone(),
            requester: req.requester.clone(),
            target: req.target.clone(),
            role: req.role.clone(),
            expires_at,
            connection: self.connection_for(&req),
        })
    }

    /// The gateway sessions of a request the principal may see, from the
    /// audit events `session.started` and `session.ended`.
    pub async fn sessions(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<Vec<SessionSummary>, AppError> {
        let req = self.get_visible(who, id).await?;
        let events = self.store.request_events(&req.id, PAGE_LEN_MAX).await?;
        let mut out: Vec<SessionSummary> = Vec::new();
        for e in events {
            let Ok(d) = serde_json::from_str::<serde_json::Value>(&e.details) else {
                continue;
            };
            let sid = d["session_id"].as_str().unwrap_or("").to_string();
            let text = |k: &str| d[k].as_str().map(str::to_string);
            match e.action.as_str() {
                "session.started" => out.push(SessionSummary {
                    session_id: sid,
                    request_id: req.id.clone(),
                    principal: e.actor.clone(),
                    target: text("target"),
                    role: text("role"),
                    upstream_user: text("upstream_user"),
                    client: text("client"),
                    started_at: e.time,
                    ended_at: None,
                    end_reason: None,
                    statements: None,
                    recording_sha256: None,
                }),
                "session.ended" => {
                    if let Some(s) = out.iter_mut().find(|s| s.session_id == sid) {
                        s.ended_at = Some(e.time);
                        s.end_reason = text("end_reason");
                        s.statements = d["statements"].as_u64();
                        s.recording_sha256 = text("recording_sha256");
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// A page of a session recording, its chain checked while reading.
    pub async fn recording(
        &self,
        who: &Principal,
        session_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<RecordingPage, AppError> {
        let not_found = || AppError::NotFound(format!("no session {session_id}"));
        if !crate::verify::is_session_id(session_id) {
            return Err(not_found());
        }
        let path = Recorder::path_of(&self.config.recordings_dir(), session_id);
        if !path.exists() {
            return Err(not_found());
        }
        // The header first: a caller who may not see the session learns
        // nothing, and costs one line, not the whole file.
        let header_path = path.clone();
        let header = tokio::task::spawn_blocking(move || {
            read_recording_from(&header_path, None, |_, _| ControlFlow::Break(()))
        })
        .await
        .map_err(|e| AppError::BadInput(format!("cannot read recording: {e}")))?
        .map_err(|e| {
            tracing::error!(session = %session_id, error = %e, "recording does not verify");
            // Without a readable header nobody's visibility can be
            // checked: only admins learn that the recording is broken.
            if who.admin {
                AppError::Conflict("recording_broken", e.to_string())
            } else {
                not_found()
            }
        })?
        .header;
        let request_id = header["request_id"].as_str().unwrap_or("").to_string();
        // Visible exactly when its request is.
        self.get_visible(who, &request_id)
            .await
            .map_err(|_| not_found())?;
        // Every entry served is verified against the chain from the start.
        // A page that follows one served earlier resumes where that one
        // ended instead of re-reading the file from the start.
        let from = self.recording_cursors.get(session_id, after);
        let complete = !Recorder::is_open(&self.config.recordings_dir(), session_id);
        let (read, entries, last, more) = tokio::task::spawn_blocking(move || {
            let mut entries = Vec::new();
            let mut last = None;
            let mut more = false;
            let read = read_recording_from(&path, from, |v, here| {
                if here.seq <= after {
                    return ControlFlow::Continue(());
                }
                if entries.len() == limit as usize {
                    more = true;
                    return ControlFlow::Break(());
                }
                entries.push(v.clone());
                last = Some(here);
                ControlFlow::Continue(())
            });
            (read, entries, last, more)
        })
        .await
        .map_err(|e| AppError::BadInput(format!("cannot read recording: {e}")))?;
        read.map_err(|e| {
            tracing::error!(session = %session_id, error = %e, "recording does not verify");
            AppError::Conflict("recording_broken", e.to_string())
        })?;
        let next = match last {
            Some(here) if more => {
                self.recording_cursors.put(session_id, here);
                Some(here.seq)
            }
            _ => None,
        };
        Ok(RecordingPage {
            session_id: session_id.to_string(),
            request_id,
            entries,
            next,
            complete,
        })
    }

    /// How to reach a grant's target through its gateway, if one serves it.
    pub fn connection_for(&self, req: &Request) -> Option<Connection> {
        let target = self.config.target(&req.target)?;
        let pg = self.config.gateway.postgres.as_ref()?;
        if target.kind != "postgres" {
            return None;
        }
        Some(Connection {
            kind: "postgres".into(),
            host: pg
                .advertise_host
                .clone()
                .unwrap_or_else(|| pg.listen.ip().to_string()),
            port: pg.listen.port(),
            user: req.requester.clone(),
            database: Some(req.target.clone()),
        })
    }

    /// Checks a grant credential for use against `target` by `principal` at
    /// `now`. Every check reads the grant's current state: a revoked or
    /// expired grant is refused even before the scheduler has run.
    pub async fn check_grant(
        &self,
        secret: &str,
        principal: Option<&str>,
        target: Option<&str>,
    ) -> Result<GrantCheck, GrantRefusal> {
        if !secret.starts_with(token::GRANT_TOKEN_PREFIX) || secret.len() > token::TOKEN_LEN_MAX {
            return Err(GrantRefusal::Unknown);
        }
        // Fail closed: while the audit chain is broken no grant is used
        // (nothing done with it could be recorded).
        if self.check_writable().is_err() {
            return Err(GrantRefusal::Unavailable);
        }
        let hash = token::token_hash(secret);
        let cred = self
            .store
            .credential(hash)
            .await
            .map_err(|_| GrantRefusal::Unavailable)?
            .ok_or(GrantRefusal::Unknown)?;
        if principal.is_some_and(|p| p != cred.principal) {
            return Err(GrantRefusal::WrongPrincipal);
        }
        if target.is_some_and(|t| t != cred.target) {
            return Err(GrantRefusal::WrongTarget);
        }
        let req = self
            .store
            .get(&cred.request_id)
            .await
            .map_err(|_| GrantRefusal::Unavailable)?
            .ok_or(GrantRefusal::Unknown)?;
        let now = now();
        if !req.is_live(now) || now >= cred.expires_at {
            let why = match req.state {
                State::Active => "expired".to_string(),
                s => req.end_reason.map_or(s.to_string(), |r| r.to_string()),
            };
            return Err(GrantRefusal::Ended(why));
        }
        Ok(GrantCheck {
            request: req,
            credential: cred,
        })
    }
}
