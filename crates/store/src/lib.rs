//! Durable state of breakglass behind one [`Store`] trait, in domain terms:
//! create a request, apply a transition, issue a credential, append audit
//! events, read them back. Every write commits its audit events in the same
//! transaction, assigning `seq` and chaining hashes.
//!
//! [`SqliteStore`] is the embedded default; [`PgStore`] is shared by several
//! nodes on one PostgreSQL database. Nothing above the trait knows which.

pub mod postgres;
mod sqlite;
pub mod tree;
pub mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use breakglass_core::audit::{AuditEvent, Checkpoint, Hash};
use breakglass_core::merkle::Subtree;
use breakglass_core::{EventDraft, Request, State, Timestamp, Transition};
use thiserror::Error;
use tokio::sync::broadcast;

pub use postgres::PgStore;
pub use sqlite::{SqliteOptions, SqliteStore};

/// The most rows one list or audit page returns.
pub const PAGE_LEN_MAX: u32 = 10_000;
/// Requests one `requests_since` page returns at most.
pub const SINCE_PAGE_LEN_MAX: u32 = 20_000;

/// The most requests [`Store::emergency_requests`] returns. A principal with
/// this many open or unreviewed emergency requests is refused a new one.
pub const EMERGENCY_REQUESTS_MAX: u32 = 64;

#[derive(Debug, Error)]
pub enum StoreError {
    /// Compare-and-set lost: the request changed since it was read.
    #[error("request {id} was changed concurrently (expected version {expected})")]
    Conflict { id: String, expected: u64 },
    #[error("request {0} already exists")]
    Duplicate(String),
    /// A per-request cap was reached; the message says which.
    #[error("{0}")]
    Limit(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// A grant credential as stored: only the SHA-256 of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub hash: Hash,
    pub request_id: String,
    pub principal: String,
    pub target: String,
    pub role: String,
    pub expires_at: Timestamp,
    pub issued_at: Timestamp,
}

/// A notification sink's place in the audit feed: every event up to `seq`
/// has been delivered (or given up with a `notify.failed` event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyCursor {
    pub sink: String,
    pub seq: u64,
    pub updated_at: Timestamp,
    /// The newest delivery error, `None` after a success.
    pub last_error: Option<String>,
    /// Events given up so far.
    pub failed: u64,
}

/// Which requests `list` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub state: Option<State>,
    /// Only requests by this principal.
    pub requester: Option<String>,
    /// `None`: everything (admins). `Some`: requests by this principal or that
    /// one of these groups may approve.
    pub visible_to: Option<(String, Vec<String>)>,
    /// `Some(true)`: only drill requests (`Request::drill` set);
    /// `Some(false)`: only real use; `None`: both.
    pub drill: Option<bool>,
    /// Continue after this id (exclusive).
    pub after: Option<String>,
    pub limit: u32,
}

/// What the store committed: the events with their `seq` and hash.
pub type Committed = Vec<AuditEvent>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new request (`t.expected_version == 0`) with its events.
    async fn create(&self, t: Transition, now: Timestamp) -> Result<Committed, StoreError>;

    /// Inserts a new emergency request like [`Store::create`], but only if
    /// [`Store::emergency_requests`] of its requester, read inside the same
    /// transaction, still returns exactly `seen` (ids and versions, in
    /// order); `Conflict` otherwise. The caller decides on what it read and
    /// retries after a conflict, so two concurrent emergency requests of one
    /// principal cannot both pass a check that each made without the other.
    async fn create_emergency(
        &self,
        t: Transition,
        seen: Vec<(String, u64)>,
        now: Timestamp,
    ) -> Result<Committed, StoreError>;

    /// Applies a transition as compare-and-set on the request's version,
    /// together with its events; `Conflict` if the version moved.
    async fn apply(&self, t: Transition, now: Timestamp) -> Result<Committed, StoreError>;

    /// Stores a credential with its audit event; `Limit` when the request
    /// already has `limit` credentials (checked in the same transaction, so
    /// concurrent calls cannot pass it).
    async fn issue_credential(
        &self,
        cred: CredentialRecord,
        event: EventDraft,
        limit: u64,
        now: Timestamp,
    ) -> Result<Committed, StoreError>;

    /// Appends events that belong to no request transition (sessions, service
    /// start). Committed in one transaction.
    async fn append(
        &self,
        events: Vec<EventDraft>,
        now: Timestamp,
    ) -> Result<Committed, StoreError>;

    async fn get(&self, id: &str) -> Result<Option<Request>, StoreError>;

    async fn list(&self, q: ListQuery) -> Result<Vec<Request>, StoreError>;

    /// The emergency requests of `requester` that bear on a new one: pending
    /// or active, or ended (expired, revoked) with a review required and not
    /// given. Oldest first, at most [`EMERGENCY_REQUESTS_MAX`].
    async fn emergency_requests(&self, requester: &str) -> Result<Vec<Request>, StoreError>;

    /// Ended grants (expired or revoked) without a review: those the
    /// automated review has not looked at yet and those queued for a
    /// person. By id, after `after`, at most `limit` (up to `PAGE_LEN_MAX`).
    async fn unreviewed_grants(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError>;

    /// Requests created at or after `since`, by `(created_at, id)`, after
    /// the key `after`, at most `limit` (up to `SINCE_PAGE_LEN_MAX`): the
    /// pages a report reads.
    async fn requests_since(
        &self,
        since: Timestamp,
        after: Option<(Timestamp, String)>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError>;

    /// Every request with a deadline (pending or active), for the scheduler.
    async fn open_requests(&self) -> Result<Vec<Request>, StoreError>;

    async fn credential(&self, hash: Hash) -> Result<Option<CredentialRecord>, StoreError>;

    /// Events with `seq > after`, ascending, at most `limit`.
    async fn audit(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError>;

    /// Every event of one request, ascending, at most `limit`.
    async fn request_events(
        &self,
        request_id: &str,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    /// Stores a signed checkpoint. One at a `seq` the same key already
    /// checkpointed is ignored: a stored checkpoint is never replaced.
    /// Several nodes (keys) may checkpoint the same `seq`.
    async fn add_checkpoint(&self, cp: Checkpoint) -> Result<(), StoreError>;

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;

    /// The hashes of complete subtrees of the Merkle tree over the log
    /// ([`tree`]), in the order asked; `Corrupt` naming the first one
    /// missing, `Limit` beyond [`tree::TREE_READ_LEN_MAX`]. The nodes of an
    /// event commit in its transaction.
    async fn tree_nodes(&self, nodes: &[Subtree]) -> Result<Vec<Hash>, StoreError>;
    /// Every notification sink's cursor, by sink name.
    async fn notify_cursors(&self) -> Result<Vec<NotifyCursor>, StoreError>;

    /// Creates or updates a sink's cursor. `seq` never moves back: a lower
    /// one keeps the stored `seq` (and still updates the rest), so a late
    /// or concurrent writer cannot make events be delivered twice as often.
    async fn set_notify_cursor(&self, cursor: NotifyCursor) -> Result<(), StoreError>;

    /// Takes or renews the lease on delivering sink `sink` for node
    /// `holder` until `until`: true if the sink's cursor exists and the
    /// lease was free, expired before `now`, or already `holder`'s (taken
    /// now), false if another node holds it. Atomic across every node of a
    /// shared store, so one node at a time delivers each sink.
    async fn lease_notify_sink(
        &self,
        sink: &str,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Records that `principal` used its one-time code of time step `step`:
    /// true if `step` is newer than every step recorded for it before
    /// (recorded now), false if not (a replay, or an older code). Atomic
    /// across every node of a shared store, and durable, so a code is
    /// accepted once even across restarts.
    async fn use_one_time_code(&self, principal: &str, step: u64) -> Result<bool, StoreError>;

    /// Claims the scheduled run `slot` of drill `drill` for this node: true
    /// if `slot` is newer than every slot claimed for it before (claimed
    /// now), false if another node (or an earlier call) claimed it. Atomic
    /// across every node of a shared store, so one node runs each slot.
    async fn claim_drill_run(&self, drill: &str, slot: u64) -> Result<bool, StoreError>;

    /// The `drill.completed` events with `time >= since`, ascending by
    /// `seq`, at most `limit` (drill results for reports and metrics). Only
    /// these events are indexed by action: an index entry for every event
    /// cost every commit pages for a query that reads one action.
    async fn drill_results(
        &self,
        since: Timestamp,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    /// The newest `(seq, hash)` of the chain this node knows: what it
    /// committed or what its feed has delivered.
    fn head(&self) -> (u64, Hash);

    /// Committed events, in `seq` order, as they commit. A subscriber that
    /// lags catches up with [`Store::audit`] from its last `seq`.
    fn subscribe(&self) -> broadcast::Receiver<Arc<AuditEvent>>;

    /// How long since the feed last read the log. Zero for a store whose
    /// feed cannot lose sight of its writers (the embedded store is its own
    /// only writer); for a shared store, a value well past its poll interval
    /// means events committed by other nodes may be waiting unseen.
    fn feed_blind_for(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Whether other nodes may write to this store too (then everything
    /// that keeps state in memory must follow the feed).
    fn is_shared(&self) -> bool {
        false
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError>;
}

/// Calls `f` for every event with `seq > after`, in order, a page at a time,
/// until the log ends or `f` returns false.
pub async fn for_each_event(
    store: &dyn Store,
    mut after: u64,
    mut f: impl FnMut(&AuditEvent) -> bool,
) -> Result<(), StoreError> {
    loop {
        let page = store.audit(after, PAGE_LEN_MAX).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.seq;
        if !page.iter().all(&mut f) || page.len() < PAGE_LEN_MAX as usize {
            return Ok(());
        }
    }
}
