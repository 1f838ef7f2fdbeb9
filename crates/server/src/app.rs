//! The application layer: authenticates principals, evaluates policy, runs
//! lifecycle steps and commits them through the store, issues and checks
//! grant credentials. The HTTP API and (later) the gateways call only this.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use breakglass_core::lifecycle::{self, Command, LifecycleError, NewRequest, is_due};
use breakglass_core::policy::{Action, Decision, PolicyEngine, PolicyInput};
use breakglass_core::time::parse_duration;
use breakglass_core::token;
use breakglass_core::{Actor, Principal, Request, State, Timestamp, Transition};
use breakglass_gateway_common::recording::{Recorder, Resume, read_recording_from};
use breakglass_store::{CredentialRecord, ListQuery, PAGE_LEN_MAX, Store, StoreError};
use rand::RngCore;
use serde_json::json;
use thiserror::Error;

use crate::config::Config;
use crate::dto::{
    Connection, CreateRequest, Credentials, RecordingPage, SessionSummary, TargetOption,
};
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// How many times a transition is recomputed after losing a compare-and-set.
const CONFLICT_RETRIES_MAX: usize = 5;
/// The reason evaluated when listing what a principal may request: policies
/// that look at the reason's text are judged on this placeholder.
const PROBE_REASON: &str = "listing what may be requested";
/// Policy evaluations spent at most finding the longest allowed duration of
/// one target, role and action (a binary search over seconds).
const PROBE_STEPS_MAX: u32 = 40;
/// Close matches named at most for a mistyped target.
const CLOSE_MATCHES_MAX: usize = 5;
/// Request ids matching a prefix returned at most (`GET /v1/requests?id_prefix=`).
pub const ID_PREFIX_MATCHES_MAX: u32 = 20;

/// Wall-clock now, in milliseconds.
pub fn now() -> Timestamp {
    Timestamp::now()
}

/// Every way an application call can fail, each with a stable code.
#[derive(Debug, Error)]
pub enum AppError {
    #[error("{0}")]
    Unauthenticated(#[from] crate::identity::AuthError),
    #[error("{0}")]
    BadInput(String),
    /// A name (target, role) the caller got wrong, with a stable code.
    #[error("{1}")]
    UnknownName(&'static str, String),
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
            AppError::Unauthenticated(crate::identity::AuthError::OtpRequired(_)) => {
                (401, "otp_required")
            }
            AppError::Unauthenticated(_) => (401, "unauthenticated"),
            AppError::BadInput(_) => (400, "bad_request"),
            AppError::UnknownName(code, _) => (404, code),
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
                LifecycleError::EmergencyBlocked { .. } => (403, "emergency_blocked"),
                LifecycleError::WorkloadNotAllowed { .. } => (403, "workload_not_allowed"),
                LifecycleError::StepUpRequired { .. } | LifecycleError::MfaRequired { .. } => {
                    (403, "step_up_required")
                }
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

/// The result of checking a grant credential (what a gateway needs).
#[derive(Debug, Clone)]
pub struct GrantCheck {
    pub request: Request,
    pub credential: CredentialRecord,
}

impl GrantCheck {
    /// When a session on this grant must end: the grant's end or the
    /// credential's, whichever comes first.
    pub fn ends_at(&self) -> Timestamp {
        self.request
            .expires_at
            .unwrap_or(self.credential.expires_at)
            .min(self.credential.expires_at)
    }
}

/// How a gateway answers a [`GrantRefusal`]: the credential is not one,
/// it does not allow this, or nothing can be checked right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    BadCredential,
    NotAuthorized,
    Unavailable,
}

/// The longest SSH public key a certificate is signed for.
pub const SSH_PUBLIC_KEY_LEN_MAX: usize = 8 * 1024;

/// Reads the public key a client certificate is asked for: one OpenSSH
/// line, ed25519 or ECDSA.
fn parse_client_key(text: &str) -> Result<breakglass_gateway_ssh::keys::PublicKey, AppError> {
    let bad = |why: String| AppError::BadInput(format!("ssh_public_key: {why}"));
    if text.len() > SSH_PUBLIC_KEY_LEN_MAX {
        return Err(bad(format!("longer than {SSH_PUBLIC_KEY_LEN_MAX} bytes")));
    }
    let key = breakglass_gateway_ssh::keys::PublicKey::from_openssh(text.trim())
        .map_err(|e| bad(format!("not an OpenSSH public key line ({e})")))?;
    if !matches!(
        key.algorithm(),
        breakglass_gateway_ssh::keys::Algorithm::Ed25519
            | breakglass_gateway_ssh::keys::Algorithm::Ecdsa { .. }
    ) {
        return Err(bad(format!(
            "{} keys are not signed; use ed25519 or ECDSA",
            key.algorithm()
        )));
    }
    Ok(key)
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
    #[error("the grant's requester {0} is no longer a known principal")]
    RequesterRemoved(String),
    #[error("store unavailable")]
    Unavailable,
}

impl GrantRefusal {
    /// What a gateway tells a client signing in to `target` with a refused
    /// credential (`who`: the user the client named, when it names one).
    pub fn answer(&self, target: &str, who: Option<&str>) -> (RefusalKind, String) {
        match self {
            GrantRefusal::Unknown => (
                RefusalKind::BadCredential,
                "not a valid grant credential (get one with `breakglass credentials ID`)".into(),
            ),
            GrantRefusal::WrongPrincipal => (
                RefusalKind::NotAuthorized,
                match who {
                    Some(u) => format!("this grant credential does not belong to {u:?}"),
                    None => "this grant credential belongs to someone else".into(),
                },
            ),
            GrantRefusal::WrongTarget => (
                RefusalKind::NotAuthorized,
                format!("this grant credential is not for target {target:?}"),
            ),
            GrantRefusal::Ended(why) => (
                RefusalKind::NotAuthorized,
                format!("the grant has ended ({why})"),
            ),
            GrantRefusal::RequesterRemoved(r) => (
                RefusalKind::NotAuthorized,
                format!("the grant's requester {r:?} is no longer a known principal"),
            ),
            GrantRefusal::Unavailable => (
                RefusalKind::Unavailable,
                "cannot check the grant right now".into(),
            ),
        }
    }
}

pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub policy: PolicyEngine,
    pub metrics: Arc<Metrics>,
    pub scheduler: Scheduler,
    /// OIDC, workloads and local principals.
    pub identity: crate::identity::Identity,
    pending_timeout_s: u64,
    /// Set when the audit chain was found broken: every write is refused.
    writes_blocked: std::sync::RwLock<Option<String>>,
    signing_key: ed25519_dalek::SigningKey,
    recording_cursors: RecordingCursors,
    /// Where checkpoints are kept outside the data dir.
    pub witnesses: Vec<Box<dyn crate::checkpoint::Witness>>,
    /// The live sessions of every gateway of this node: a broken chain cuts
    /// them, and online verification asks which sessions are live.
    pub sessions: breakglass_gateway_common::Registry,
    /// The SSH gateway's host key (`ssh-ed25519 AAAA...`), once started.
    pub ssh_host_key: std::sync::OnceLock<String>,
    /// The CA that signs `connect`'s client certificates, once the SSH
    /// gateway started.
    pub ssh_client_ca: std::sync::OnceLock<breakglass_gateway_ssh::keys::PrivateKey>,
    /// The PostgreSQL gateway, once started: a broken chain cuts its
    /// sessions, and online verification asks it which sessions are live.
    pub gateway: std::sync::OnceLock<breakglass_gateway_postgres::Gateway>,
    /// Where drills reach this node, and the drills running now.
    pub drills: crate::drill::DrillState,
    /// The notification sinks, once started.
    pub notifier: std::sync::OnceLock<Arc<crate::notify::Notifier>>,
    /// The Slack integration (`None` when not configured), once started.
    pub slack: std::sync::OnceLock<Option<crate::slack::Slack>>,
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
        let identity = crate::identity::Identity::new(&config);
        let pending_timeout_s = config.pending_timeout_s();
        Arc::new_cyclic(|weak| App {
            scheduler: Scheduler::new(weak.clone()),
            store,
            policy,
            metrics,
            identity,
            pending_timeout_s,
            writes_blocked: std::sync::RwLock::new(writes_blocked),
            signing_key,
            recording_cursors: RecordingCursors::default(),
            witnesses: crate::checkpoint::witnesses(&config),
            sessions: breakglass_gateway_common::Registry::new(),
            ssh_host_key: std::sync::OnceLock::new(),
            ssh_client_ca: std::sync::OnceLock::new(),
            gateway: std::sync::OnceLock::new(),
            drills: crate::drill::DrillState::default(),
            notifier: std::sync::OnceLock::new(),
            slack: std::sync::OnceLock::new(),
            config,
        })
    }

    /// Finds the principal a bearer token (and, for a local principal with
    /// TOTP, the one-time code) belongs to (see [`crate::identity`]).
    pub async fn authenticate(
        &self,
        bearer: &str,
        otp: Option<&str>,
    ) -> Result<Principal, AppError> {
        match self
            .identity
            .authenticate(bearer, otp, now(), self.store.as_ref())
            .await
        {
            Ok(who) => Ok(who),
            Err(crate::identity::AuthError::StoreUnavailable(why)) => Err(AppError::from(
                breakglass_store::StoreError::Unavailable(why),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `name` is a principal the service knows now: a local
    /// principal of the config, a person when an identity provider is
    /// configured (it stops issuing tokens to people who leave), or a name
    /// a workload entry can produce. Grants of anyone else are not usable.
    pub fn knows_principal(&self, name: &str) -> bool {
        self.identity.may_know(name)
    }

    fn check_writable(&self) -> Result<(), AppError> {
        match self.writes_blocked() {
            Some(why) => Err(AppError::WritesBlocked(why)),
            None => Ok(()),
        }
    }

    /// Refuses every write from now on (fail closed on a broken chain), and
    /// cuts every live gateway session: nothing done in them could be
    /// vouched for. Credentials stop working at once (`check_grant`).
    pub fn block_writes(&self, why: String) {
        tracing::error!(reason = %why, "AUDIT CHAIN BROKEN: refusing all writes until it is investigated (run `breakglass audit verify`)");
        {
            let mut w = self
                .writes_blocked
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if w.is_none() {
                *w = Some(why);
            }
        }
        let n = self.sessions.cut_all("audit_chain_broken");
        if n > 0 {
            tracing::error!(
                sessions = n,
                "cutting every live gateway session: the audit chain is broken"
            );
        }
    }

    /// The keys verification trusts: `audit.verify_keys` when set (then
    /// the key in `data_dir` counts only if listed), else this node's own.
    pub fn trusted_keys(&self) -> Vec<ed25519_dalek::VerifyingKey> {
        let keys = self.config.verify_keys();
        if keys.is_empty() {
            vec![self.verifying_key()]
        } else {
            keys
        }
    }

    /// Ids of the gateway sessions live right now.
    pub fn live_sessions(&self) -> std::collections::HashSet<String> {
        self.sessions.live_session_ids().into_iter().collect()
    }

    /// Whether this node has been blind to the shared event feed for longer
    /// than `server.feed_loss_grace` (never for the embedded store).
    pub fn feed_lost(&self) -> bool {
        self.store.feed_blind_for() > self.config.feed_loss_grace()
    }

    /// This node's name in the audit log: its public key in hex, as its
    /// checkpoints name it (`session.started` and `service.started` carry
    /// it, so verification knows which node holds a recording).
    pub fn node_id(&self) -> String {
        breakglass_core::audit::key_id(&self.verifying_key())
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
        let Some(target) = self.config.target(&input.target) else {
            return Err(self.unknown_target(who, &input.target, now));
        };
        if !target.roles.contains_key(&input.role) {
            return Err(AppError::UnknownName(
                "unknown_role",
                format!(
                    "target {} has no role {:?} (roles: {})",
                    target.name,
                    input.role,
                    target.roles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let groups: Vec<String> = who.groups.iter().cloned().collect();
        Ok(self.policy.evaluate(&PolicyInput {
            principal: &who.name,
            principal_groups: &groups,
            kind: who.kind,
            authn: &who.authn,
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
            breakglass_core::time::DurationError::TooLong(..) => {
                AppError::Forbidden("duration_exceeds_policy", format!("duration: {e}"))
            }
            _ => AppError::BadInput(format!("duration: {e}")),
        })?;
        // INVARIANT: only a configured drill's requester labels a request
        // as that drill, so a label never hides real use.
        if let Some(drill) = &body.drill {
            crate::drill::check_label(&self.config, who, drill, &body.target)?;
        }
        let input = NewRequest {
            target: body.target,
            role: body.role,
            duration_s,
            reason: body.reason,
            ticket: body.ticket.filter(|t| !t.is_empty()),
            emergency: body.emergency,
            drill: body.drill,
        };
        lifecycle::check_name("target", &input.target)?;
        lifecycle::check_name("role", &input.role)?;
        let now = now();
        let decision = self.decide(who, &input, now)?;
        let id = uuid::Uuid::now_v7().to_string();
        let t = lifecycle::create(&input, who, &decision, id, now, self.pending_timeout_s)?;
        if input.emergency {
            return self.create_emergency(who, t).await;
        }
        self.commit(t, now, true).await
    }

    /// Commits a new emergency request if the requester's other emergency
    /// requests allow it (`lifecycle::check_emergency`). The store commits
    /// only if those requests are still what the check saw, so concurrent
    /// emergency requests of one principal are decided one after the other.
    async fn create_emergency(&self, who: &Principal, t: Transition) -> Result<Request, AppError> {
        let limits = self.config.emergency_limits();
        for _ in 0..CONFLICT_RETRIES_MAX {
            let others = self.store.emergency_requests(&who.name).await?;
            if others.len() >= breakglass_store::EMERGENCY_REQUESTS_MAX as usize {
                return Err(AppError::Forbidden(
                    "emergency_blocked",
                    format!(
                        "emergency access refused: {} has {} or more open or unreviewed emergency requests; they must be ended and reviewed first",
                        who.name,
                        breakglass_store::EMERGENCY_REQUESTS_MAX
                    ),
                ));
            }
            let now = now();
            lifecycle::check_emergency(&who.name, &others, &limits, now)?;
            let seen = others.iter().map(|r| (r.id.clone(), r.version)).collect();
            match self.store.create_emergency(t.clone(), seen, now).await {
                Ok(events) => {
                    self.committed(&t.request, &events);
                    return Ok(t.request);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::Conflict(
            "conflict",
            format!(
                "the emergency requests of {} keep changing; try again",
                who.name
            ),
        ))
    }

    fn committed(&self, request: &Request, events: &[breakglass_core::audit::AuditEvent]) {
        for e in events {
            self.metrics.observe_event(e);
        }
        self.scheduler.track(request);
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
        self.committed(&request, &events);
        Ok(request)
    }

    /// Commits a system step computed elsewhere (the automated review).
    pub(crate) async fn commit_step(
        &self,
        t: Transition,
        now: Timestamp,
    ) -> Result<Request, AppError> {
        self.check_writable()?;
        self.commit(t, now, false).await
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

    /// Ends request `id` because its requester is no longer a known
    /// principal: a pending request is cancelled, an active grant revoked,
    /// with end reason `principal_removed`. A request whose deadline passed
    /// first is ticked instead. Returns the request as it ends up.
    pub async fn offboard(&self, id: &str) -> Result<Option<Request>, AppError> {
        for _ in 0..CONFLICT_RETRIES_MAX {
            let Some(req) = self.store.get(id).await? else {
                return Ok(None);
            };
            if req.state.is_final() {
                return Ok(Some(req));
            }
            let now = now();
            if is_due(&req, now) {
                self.tick(id).await?;
                continue;
            }
            let t = lifecycle::step(&req, &Actor::System, &Command::Offboard, now)?;
            match self.commit(t, now, false).await {
                Err(AppError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
                Ok(r) => return Ok(Some(r)),
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
        ssh_public_key: Option<&str>,
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
            let state = match req.ended_because(now) {
                Some(why) if req.state == State::Active => format!("past its end ({why})"),
                _ => req.state.as_str().to_string(),
            };
            return Err(AppError::Conflict(
                "wrong_state",
                format!("request {id} is {state}; credentials exist only for an active grant"),
            ));
        }
        // Read only for the requester of a live grant: nobody else learns
        // how keys are judged.
        let ssh_key = ssh_public_key.map(parse_client_key).transpose()?;
        let expires_at = req.expires_at.unwrap_or(now);
        let mut random = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut random);
        let secret = token::grant_token(random);
        let hash = token::token_hash(&secret);
        // The certificate stands for this very credential: it names its
        // hash, and the gateway checks the grant by it.
        let ssh_certificate = match &ssh_key {
            Some(key) if self.is_ssh_target(&req.target) => {
                let ca = self.ssh_client_ca.get().ok_or_else(|| {
                    AppError::Conflict(
                        "no_gateway",
                        "this node runs no SSH gateway to sign a certificate for".into(),
                    )
                })?;
                let cert = breakglass_gateway_ssh::keys::sign_user_certificate(
                    ca,
                    key,
                    &breakglass_gateway_ssh::keys::CertRequest {
                        user: &req.target,
                        key_id: format!("breakglass:{}:{}", req.requester, req.id),
                        valid_after: now,
                        valid_before: expires_at,
                        // The gateway decides from the grant's role, not
                        // from the certificate's extensions: it reads
                        // only the credential's. None is granted here.
                        pty: false,
                        port_forwarding: false,
                        credential: Some(hash),
                    },
                )
                .map_err(|e| e.to_string())
                .and_then(|c| c.to_openssh().map_err(|e| e.to_string()))
                .map_err(|e| {
                    // The key was checked above: this is the node's fault,
                    // not the caller's.
                    tracing::error!(request = %req.id, error = %e, "cannot sign an SSH client certificate");
                    AppError::Conflict(
                        "no_gateway",
                        "this node could not sign the SSH certificate (its log says why); ask again without ssh_public_key, or on another node".into(),
                    )
                })?;
                Some(cert)
            }
            _ => None,
        };
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
                "auth_method": who.authn.method.as_str(),
                "ssh_certificate_key": ssh_certificate.as_ref().and(ssh_key.as_ref()).map(breakglass_gateway_ssh::keys::fingerprint),
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
            ssh_certificate,
        })
    }

    fn is_ssh_target(&self, name: &str) -> bool {
        self.config.target(name).is_some_and(|t| t.kind == "ssh")
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
    /// The path of a session's recording and its request id, when the
    /// caller may see the request (else not found, as for a session that
    /// does not exist).
    pub async fn visible_recording(
        &self,
        who: &Principal,
        session_id: &str,
    ) -> Result<(std::path::PathBuf, String), AppError> {
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
        Ok((path, request_id))
    }

    pub async fn recording(
        &self,
        who: &Principal,
        session_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<RecordingPage, AppError> {
        let (path, request_id) = self.visible_recording(who, session_id).await?;
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
        if target.kind == "ssh" {
            let ssh = self.config.gateway.ssh.as_ref()?;
            let host_key = self.ssh_host_key.get()?.clone();
            return Some(Connection {
                kind: "ssh".into(),
                host: ssh
                    .advertise_host
                    .clone()
                    .unwrap_or_else(|| ssh.listen.ip().to_string()),
                port: ssh.listen.port(),
                user: req.target.clone(),
                database: None,
                host_key_fingerprint: breakglass_gateway_ssh::keys::parse_public_key(&host_key)
                    .ok()
                    .map(|k| breakglass_gateway_ssh::keys::fingerprint(&k)),
                host_key: Some(host_key),
            });
        }
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
            host_key: None,
            host_key_fingerprint: None,
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
        self.check_grant_hash(token::token_hash(secret), principal, target)
            .await
    }

    /// [`App::check_grant`] of the credential whose SHA-256 is `hash` (a
    /// client certificate the service signed names it).
    pub async fn check_grant_hash(
        &self,
        hash: [u8; 32],
        principal: Option<&str>,
        target: Option<&str>,
    ) -> Result<GrantCheck, GrantRefusal> {
        // Fail closed: while the audit chain is broken no grant is used
        // (nothing done with it could be recorded).
        if self.check_writable().is_err() {
            return Err(GrantRefusal::Unavailable);
        }
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
        // `is_live` also ends an emergency grant at a passed countersignature
        // deadline, before the scheduler writes it.
        if !req.is_live(now) || now >= cred.expires_at {
            let why = req
                .ended_because(now)
                .map_or_else(|| req.state.to_string(), |r| r.to_string());
            let why = if req.is_live(now) {
                "expired".to_string()
            } else {
                why
            };
            return Err(GrantRefusal::Ended(why));
        }
        // INVARIANT: a grant is usable only while its requester is a known
        // principal, whatever the stored state says (offboarding at start
        // makes the state catch up).
        if !self.knows_principal(&req.requester) {
            return Err(GrantRefusal::RequesterRemoved(req.requester.clone()));
        }
        Ok(GrantCheck {
            request: req,
            credential: cred,
        })
    }
}

/// What a principal may request, and the help given when a name is wrong.
impl App {
    /// Every target, role and action (`request`, `emergency`) the policy
    /// permits `who` now, with the obligations that govern it.
    ///
    /// Each is evaluated for a one-second grant without a ticket and with a
    /// placeholder reason, at `now`: conditions on the reason's or ticket's
    /// text, or on the time of day, are judged for that. The maximum is the
    /// governing policies' `@max_duration`, lowered to the longest duration
    /// no `forbid` refuses.
    pub fn requestable(&self, who: &Principal, now: Timestamp) -> Vec<TargetOption> {
        let groups: Vec<String> = who.groups.iter().cloned().collect();
        let mut out = Vec::new();
        for target in &self.config.targets {
            for role in target.roles.keys() {
                for action in [Action::Request, Action::Emergency] {
                    let decide = |duration_s: u64| {
                        self.policy.evaluate(&PolicyInput {
                            principal: &who.name,
                            principal_groups: &groups,
                            kind: who.kind,
                            authn: &who.authn,
                            target: &target.name,
                            target_groups: &target.groups,
                            action,
                            role,
                            duration_s,
                            reason: PROBE_REASON,
                            ticket: None,
                            now,
                        })
                    };
                    let shortest = decide(1);
                    let Some(ob) = shortest.obligations.filter(|_| shortest.allowed) else {
                        continue;
                    };
                    let max_duration_s = longest_allowed(ob.max_duration_s, |d| decide(d).allowed);
                    out.push(TargetOption {
                        target: target.name.clone(),
                        kind: target.kind.clone(),
                        role: role.clone(),
                        emergency: action == Action::Emergency,
                        max_duration_s,
                        approvals_required: ob.approvals,
                        approver_groups: ob.approver_groups.iter().cloned().collect(),
                        ticket_patterns: ob
                            .tickets
                            .iter()
                            .map(|t| t.pattern.as_str().to_string())
                            .collect(),
                        countersign_within_s: ob.countersign_within_s,
                        policies: shortest.governing.clone(),
                    });
                }
            }
        }
        out
    }

    /// The refusal of a target that is not configured, naming the close
    /// matches among the targets `who` may request (never the others, so a
    /// typo does not reveal what exists).
    fn unknown_target(&self, who: &Principal, name: &str, now: Timestamp) -> AppError {
        let mut names: Vec<String> = self
            .requestable(who, now)
            .into_iter()
            .map(|o| o.target)
            .collect();
        names.dedup();
        let matches = close_matches(name, &names);
        let detail = if matches.is_empty() {
            format!("unknown target {name:?}")
        } else {
            format!(
                "unknown target {name:?}; close matches: {}",
                matches.join(", ")
            )
        };
        AppError::UnknownName("unknown_target", detail)
    }

    /// Requests visible to `who` whose id starts with `prefix`, newest
    /// first, at most `limit`.
    pub async fn find_by_prefix(
        &self,
        who: &Principal,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<Request>, AppError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(AppError::BadInput(
                "id_prefix: expected 1 to 64 letters, digits, '-' or '_'".into(),
            ));
        }
        // Ids sort bytewise and the list walks them downwards from `after`
        // (exclusive): every id starting with `prefix` sorts below
        // `prefix` + '~' (above every id character) and above any id that
        // does not start with it but comes after them. The store reads one
        // index range, whatever the number of requests.
        let q = ListQuery {
            after: Some(format!("{prefix}~")),
            limit: limit.clamp(1, ID_PREFIX_MATCHES_MAX),
            ..ListQuery::default()
        };
        let mut found = self.list(who, q, false).await?;
        // INVARIANT: only ids that really start with the prefix are returned,
        // whatever order the store used.
        found.retain(|r| r.id.starts_with(prefix));
        Ok(found)
    }
}

/// The longest duration in `1..=cap` for which `allowed` holds, assuming
/// it holds for 1 and, like a `forbid` on `context.duration_s > N`, stops
/// holding past some point.
fn longest_allowed(cap: u64, allowed: impl Fn(u64) -> bool) -> u64 {
    if cap <= 1 || allowed(cap) {
        return cap.max(1);
    }
    // INVARIANT: allowed(lo) and !allowed(hi).
    let (mut lo, mut hi) = (1u64, cap);
    for _ in 0..PROBE_STEPS_MAX {
        if hi - lo <= 1 {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if allowed(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The candidates within a small edit distance of `word` (or that contain
/// it, or that it contains), closest first.
pub fn close_matches(word: &str, candidates: &[String]) -> Vec<String> {
    let word_lc = word.to_lowercase();
    let budget = (word.chars().count() / 3).clamp(1, 3);
    let mut scored: Vec<(usize, &String)> = candidates
        .iter()
        .filter_map(|c| {
            let c_lc = c.to_lowercase();
            let d = edit_distance(&word_lc, &c_lc);
            let contains =
                word_lc.len() >= 3 && (c_lc.contains(&word_lc) || word_lc.contains(&c_lc));
            (d <= budget || contains).then_some((d, c))
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored
        .into_iter()
        .take(CLOSE_MATCHES_MAX)
        .map(|(_, c)| c.clone())
        .collect()
}

/// Levenshtein distance over characters, with adjacent transpositions
/// counted as one edit ("prod-bd" is one edit from "prod-db").
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev2 = vec![0usize; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(prev2[j - 2] + 1);
            }
            cur[j] = d;
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn close_matches_find_typos_and_nothing_else() {
        let names: Vec<String> = ["prod-db", "staging-db", "pay-db", "analytics"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(close_matches("prod-bd", &names), vec!["prod-db"]);
        assert_eq!(close_matches("prod", &names), vec!["prod-db"]);
        assert_eq!(close_matches("stagingdb", &names), vec!["staging-db"]);
        assert!(close_matches("zzz", &names).is_empty());
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("ab", "ba"), 1);
    }

    #[test]
    fn longest_allowed_finds_the_edge() {
        assert_eq!(longest_allowed(1800, |d| d <= 3600), 1800);
        assert_eq!(longest_allowed(7200, |d| d <= 3600), 3600);
        assert_eq!(longest_allowed(1, |_| true), 1);
    }
}
