//! The embedded store: SQLite in WAL mode with `synchronous=FULL`, so an
//! acknowledged change survives `kill -9` and power loss.
//!
//! One writer thread owns the write connection and commits in groups: it takes
//! every job waiting in its queue, applies each inside a savepoint (a failed
//! job rolls back alone), and commits them all with one fsync. Readers use a
//! small pool of their own connections; WAL lets them run beside the writer.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use breakglass_core::audit::{AuditEvent, Checkpoint, GENESIS, Hash, canonical_json, chain_hash};
use breakglass_core::merkle::{Frontier, Subtree};
use breakglass_core::{EventDraft, Request, State, Timestamp, Transition};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{broadcast, oneshot};

use crate::{
    Committed, CredentialRecord, EMERGENCY_REQUESTS_MAX, ListQuery, NotifyCursor, PAGE_LEN_MAX,
    SINCE_PAGE_LEN_MAX, Store, StoreError,
};

/// Jobs the writer takes into one transaction at most.
const BATCH_LEN_MAX: usize = 512;
/// Jobs waiting for the writer at most; beyond that writers are refused
/// (the API answers 503) rather than queueing without bound.
const QUEUE_DEPTH_MAX: usize = 16_384;
/// Idle read connections kept open.
const READERS_IDLE_MAX: usize = 8;
/// Requests the writer keeps as it last wrote them (see [`Recent`]).
const RECENT_MAX: usize = 1024;
/// How long a connection waits on a lock held by another process.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// The `drill.completed` events from a time on; the literal action lets
/// SQLite use the partial index `audit_drill_results`.
const DRILL_RESULTS_SQL: &str = "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE action = 'drill.completed' AND time >= ?1 ORDER BY seq LIMIT ?2";

/// Schema migrations, applied in order; `PRAGMA user_version` counts them.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    requester TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    deadline INTEGER,
    body TEXT NOT NULL
) STRICT;
CREATE INDEX requests_deadline ON requests(deadline) WHERE deadline IS NOT NULL;
CREATE INDEX requests_state ON requests(state, id);
CREATE INDEX requests_requester ON requests(requester, id);
CREATE TABLE request_groups (
    request_id TEXT NOT NULL,
    grp TEXT NOT NULL,
    PRIMARY KEY (grp, request_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    request_id TEXT,
    details TEXT NOT NULL,
    hash BLOB NOT NULL
) STRICT;
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL
) STRICT;
CREATE TABLE credentials (
    hash BLOB PRIMARY KEY,
    request_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    target TEXT NOT NULL,
    role TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    issued_at INTEGER NOT NULL
) STRICT;
"#,
    r#"
CREATE INDEX audit_request ON audit(request_id, seq) WHERE request_id IS NOT NULL;
"#,
    r#"
CREATE INDEX credentials_request ON credentials(request_id);
"#,
    // Checkpoints name their key; several nodes may sign the same seq.
    r#"
CREATE TABLE checkpoints_keyed (
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    time INTEGER NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (seq, key)
) STRICT, WITHOUT ROWID;
INSERT INTO checkpoints_keyed (seq, key, time, hash, signature)
    SELECT seq, '', time, hash, signature FROM checkpoints;
DROP TABLE checkpoints;
ALTER TABLE checkpoints_keyed RENAME TO checkpoints;
"#,
    // The newest one-time code (TOTP time step) each principal used.
    r#"
CREATE TABLE one_time_codes (
    principal TEXT PRIMARY KEY,
    step INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
"#,
    // The Merkle tree over the log (complete subtrees; built at open for
    // the events already there) and the tree head that checkpoints sign.
    r#"
CREATE TABLE merkle_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) STRICT, WITHOUT ROWID;
ALTER TABLE checkpoints ADD COLUMN root BLOB;
"#,
    // Drills: the label of drill requests as a column (so lists and reports
    // can keep drills apart from real use), their results by action, and
    // the newest scheduled slot each drill was claimed for.
    r#"
ALTER TABLE requests ADD COLUMN drill TEXT;
UPDATE requests SET drill = json_extract(body, '$.drill') WHERE json_extract(body, '$.drill') IS NOT NULL;
CREATE INDEX requests_drill ON requests(drill, id) WHERE drill IS NOT NULL;
CREATE INDEX audit_action ON audit(action, time);
CREATE TABLE drill_runs (
    drill TEXT PRIMARY KEY,
    slot INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
"#,
    // Reviews: ended grants nobody reviewed yet (the review queue), and
    // requests by creation time (reports).
    r#"
CREATE INDEX requests_unreviewed ON requests(id)
    WHERE state IN ('expired', 'revoked') AND json_extract(body, '$.review') IS NULL;
CREATE INDEX requests_created ON requests(created_at, id);
"#,
    // Each notification sink's place in the audit feed.
    r#"
CREATE TABLE notify_cursors (
    sink TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_error TEXT,
    failed INTEGER NOT NULL DEFAULT 0
) STRICT, WITHOUT ROWID;
"#,
    // The node that delivers each sink, and until when.
    r#"
ALTER TABLE notify_cursors ADD COLUMN holder TEXT;
ALTER TABLE notify_cursors ADD COLUMN held_until INTEGER;
"#,
    // Only drill results are read by action: the index on every event's
    // action becomes a partial one on `drill.completed`.
    r#"
DROP INDEX audit_action;
CREATE INDEX audit_drill_results ON audit(time) WHERE action = 'drill.completed';
"#,
];

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `synchronous=FULL` (durable) when true; `NORMAL` otherwise. Only
    /// tests that measure the difference turn it off.
    pub durable: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { durable: true }
    }
}

enum Op {
    Create(Transition),
    /// A new emergency request and the requester's emergency requests (id,
    /// version) its caller decided on.
    CreateEmergency(Transition, Vec<(String, u64)>),
    Apply(Transition),
    /// A credential, its event, and the most credentials its request may have.
    Credential(CredentialRecord, EventDraft, u64),
    Append(Vec<EventDraft>),
    Checkpoint(Checkpoint),
    /// A principal's one-time code step: `Conflict` if not newer.
    OneTimeCode(String, u64),
    /// A drill's scheduled slot: `Conflict` if not newer.
    DrillRun(String, u64),
    /// A notification sink's cursor (never moved back).
    NotifyCursor(NotifyCursor),
    /// A sink's delivery lease: (sink, holder, now, until); `Conflict` if
    /// another node holds it.
    NotifyLease(String, String, i64, i64),
}

struct Job {
    op: Op,
    now: Timestamp,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

struct Shared {
    path: PathBuf,
    head: Mutex<(u64, Hash)>,
    readers: Mutex<Vec<Connection>>,
    events: broadcast::Sender<Arc<AuditEvent>>,
    recent: Mutex<Recent<Arc<Request>>>,
}

/// The requests written last, as the writer committed them: a request in
/// the middle of its lifecycle (approve, credentials, revoke, the review
/// and the notifications that follow its events) is read from here, with
/// no row read and no JSON parsed.
///
/// INVARIANT: only the writer thread fills it, after its transaction
/// committed and before it replies or broadcasts the batch's events. The
/// writer is the only writer of `requests`: one serving process per
/// database file (the server holds `<data_dir>/serve.lock` while it
/// serves, see `breakglass_server::datadir::lock`), which the chain head
/// it keeps in memory assumes too. So an entry is always the newest
/// committed version. Readers never fill it: a row they read may already
/// be older than the entry.
struct Recent<T> {
    by_id: HashMap<String, T>,
    /// Ids in the order they first came; the oldest goes first.
    order: VecDeque<String>,
}

impl<T: Clone> Recent<T> {
    fn new() -> Recent<T> {
        Recent {
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, id: &str) -> Option<T> {
        self.by_id.get(id).cloned()
    }

    fn put(&mut self, id: &str, value: T) {
        if self.by_id.insert(id.to_string(), value).is_none() {
            self.order.push_back(id.to_string());
            if self.order.len() > RECENT_MAX
                && let Some(old) = self.order.pop_front()
            {
                self.by_id.remove(&old);
            }
        }
    }
}

/// The embedded SQLite store. Cloning shares the same writer and readers.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    jobs: SyncSender<Job>,
}

fn open_conn(path: &Path, durable: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Statement journals (each job of a batch runs in a savepoint) and
    // other temporary data stay in memory: on disk they were a temp file
    // written (about 25 writes per commit under load) on the writer's path.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {version}, newer than this binary knows ({known}); refusing to touch it"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent
    // (plain values and idle connections), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hash_from(blob: Vec<u8>) -> Result<Hash, rusqlite::Error> {
    blob.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            32,
            rusqlite::types::Type::Blob,
            "hash is not 32 bytes".into(),
        )
    })
}

pub(crate) fn row_to_event(r: &rusqlite::Row<'_>) -> Result<AuditEvent, rusqlite::Error> {
    Ok(AuditEvent {
        seq: r.get::<_, i64>(0)? as u64,
        time: Timestamp(r.get(1)?),
        actor: r.get(2)?,
        action: r.get(3)?,
        request_id: r.get(4)?,
        details: r.get(5)?,
        hash: hash_from(r.get(6)?)?,
    })
}

/// The rows behind [`Store::emergency_requests`]: (id, version, body). The
/// writer reads the same query to check what a caller decided on.
fn emergency_rows(
    c: &Connection,
    requester: &str,
) -> Result<Vec<(String, u64, String)>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT id, version, body FROM requests WHERE requester = ?1 \
         AND json_extract(body, '$.emergency') = 1 \
         AND (state IN ('pending', 'active') \
              OR (state IN ('expired', 'revoked') \
                  AND json_extract(body, '$.review_required') = 1 \
                  AND json_extract(body, '$.review') IS NULL)) \
         ORDER BY created_at, id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![requester, i64::from(EMERGENCY_REQUESTS_MAX)], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, String>(2)?,
        ))
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn parse_request(body: &str) -> Result<Request, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("request row: {e}")))
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let mut conn = open_conn(path, opts.durable)?;
        migrate(&mut conn)?;
        let frontier = crate::tree::sqlite::open(&mut conn)?;
        let head = conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, hash_from(r.get(1)?)?)),
            )
            .optional()?
            .unwrap_or((0, GENESIS));
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            head: Mutex::new(head),
            readers: Mutex::new(Vec::new()),
            events,
            recent: Mutex::new(Recent::new()),
        });
        let (jobs, rx) = sync_channel(QUEUE_DEPTH_MAX);
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_shared, frontier))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore { shared, jobs })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// A request as its row says (not from [`Recent`]).
    fn get_row(&self, id: &str) -> Result<Option<Request>, StoreError> {
        self.read(|c| {
            let body: Option<String> = c
                .prepare_cached("SELECT body FROM requests WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            body.map(|b| parse_request(&b)).transpose()
        })
    }

    async fn submit(&self, op: Op, now: Timestamp) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        match self.jobs.try_send(Job { op, now, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(StoreError::Unavailable("write queue is full".into()));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(StoreError::Unavailable("writer has stopped".into()));
            }
        }
        rx.await
            .map_err(|_| StoreError::Unavailable("writer has stopped".into()))?
    }

    /// Runs `f` on a pooled read connection.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = match lock(&self.shared.readers).pop() {
            Some(c) => c,
            None => {
                let c = open_conn(&self.shared.path, true)?;
                c.pragma_update(None, "query_only", "ON")?;
                c
            }
        };
        let out = f(&conn);
        let mut idle = lock(&self.shared.readers);
        if idle.len() < READERS_IDLE_MAX {
            idle.push(conn);
        }
        out
    }

    /// Like `read`, on the blocking pool: for scans that take milliseconds.
    async fn read_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }

    /// Every stored credential record (hashes only), for `store copy`.
    pub fn credentials_all(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT hash, request_id, principal, target, role, expires_at, issued_at FROM credentials ORDER BY issued_at, hash",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(CredentialRecord {
                    hash: hash_from(r.get(0)?)?,
                    request_id: r.get(1)?,
                    principal: r.get(2)?,
                    target: r.get(3)?,
                    role: r.get(4)?,
                    expires_at: Timestamp(r.get(5)?),
                    issued_at: Timestamp(r.get(6)?),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Synchronous audit scan for offline tools: calls `f` for every event
    /// with `seq > after` in order.
    pub fn scan_audit(
        &self,
        after: u64,
        mut f: impl FnMut(AuditEvent) -> bool,
    ) -> Result<(), StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE seq > ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query([after as i64])?;
            while let Some(r) = rows.next()? {
                if !f(row_to_event(r)?) {
                    break;
                }
            }
            Ok(())
        })
    }
}

fn writer_loop(conn: Connection, rx: Receiver<Job>, shared: Arc<Shared>, mut tree: Frontier) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH_LEN_MAX {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let start = *lock(&shared.head);
        let mut head = start;
        let mut results: Vec<Result<Committed, StoreError>> = Vec::with_capacity(batch.len());
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            for job in batch {
                let _ = job.reply.send(Err(StoreError::Unavailable(msg.clone())));
            }
            continue;
        }
        for job in &batch {
            let before = head;
            let r = conn
                .execute_batch("SAVEPOINT job")
                .map_err(StoreError::from)
                .and_then(|()| apply_op(&conn, &job.op, job.now, &mut head));
            match r {
                Ok(events) => {
                    let _ = conn.execute_batch("RELEASE job");
                    results.push(Ok(events));
                }
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
                    head = before;
                    results.push(Err(e));
                }
            }
        }
        // INVARIANT: the tree nodes of the batch's events commit with them.
        let mut grown = tree.clone();
        let events = results.iter().filter_map(|r| r.as_ref().ok()).flatten();
        let committed = crate::tree::grow(&mut grown, events)
            .and_then(|nodes| crate::tree::sqlite::insert(&conn, &nodes))
            .and_then(|()| conn.execute_batch("COMMIT").map_err(StoreError::from));
        match committed {
            Ok(()) => {
                tree = grown;
                *lock(&shared.head) = head;
                {
                    let mut recent = lock(&shared.recent);
                    for (job, result) in batch.iter().zip(&results) {
                        if let (Op::Create(t) | Op::CreateEmergency(t, _) | Op::Apply(t), Ok(_)) =
                            (&job.op, result)
                        {
                            recent.put(&t.request.id, Arc::new(t.request.clone()));
                        }
                    }
                }
                for (job, result) in batch.into_iter().zip(results) {
                    if let Ok(events) = &result {
                        for e in events {
                            let _ = shared.events.send(Arc::new(e.clone()));
                        }
                    }
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; rolling back the batch");
                let _ = conn.execute_batch("ROLLBACK");
                let msg = e.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
            }
        }
    }
}

fn insert_events(
    conn: &Connection,
    drafts: &[EventDraft],
    now: Timestamp,
    head: &mut (u64, Hash),
) -> Result<Committed, StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit (seq, time, actor, action, request_id, details, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut out = Vec::with_capacity(drafts.len());
    for d in drafts {
        let seq = head.0 + 1;
        let details = canonical_json(&d.details);
        let hash = chain_hash(
            &head.1,
            seq,
            now,
            &d.actor,
            &d.action,
            d.request_id.as_deref(),
            &details,
        );
        stmt.execute(params![
            seq as i64,
            now.millis(),
            d.actor,
            d.action,
            d.request_id,
            details,
            &hash[..]
        ])?;
        *head = (seq, hash);
        out.push(AuditEvent {
            seq,
            time: now,
            actor: d.actor.clone(),
            action: d.action.clone(),
            request_id: d.request_id.clone(),
            details,
            hash,
        });
    }
    Ok(out)
}

fn body_of(r: &Request) -> Result<String, StoreError> {
    serde_json::to_string(r).map_err(|e| StoreError::Corrupt(format!("cannot encode request: {e}")))
}

fn create_op(
    conn: &Connection,
    t: &Transition,
    now: Timestamp,
    head: &mut (u64, Hash),
) -> Result<Committed, StoreError> {
    let r = &t.request;
    if t.expected_version != 0 {
        return Err(StoreError::Corrupt(format!(
            "create of request {} expects version {}, not 0",
            r.id, t.expected_version
        )));
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO requests (id, version, state, requester, created_at, deadline, body, drill) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            r.id,
            r.version as i64,
            r.state.as_str(),
            r.requester,
            r.created_at.millis(),
            r.deadline().map(Timestamp::millis),
            body_of(r)?,
            r.drill
        ])?;
    if inserted == 0 {
        return Err(StoreError::Duplicate(r.id.clone()));
    }
    let mut groups = conn
        .prepare_cached("INSERT OR IGNORE INTO request_groups (request_id, grp) VALUES (?1, ?2)")?;
    for g in &r.approver_groups {
        groups.execute(params![r.id, g])?;
    }
    insert_events(conn, &t.events, now, head)
}

fn apply_op(
    conn: &Connection,
    op: &Op,
    now: Timestamp,
    head: &mut (u64, Hash),
) -> Result<Committed, StoreError> {
    match op {
        Op::Create(t) => create_op(conn, t, now, head),
        Op::CreateEmergency(t, seen) => {
            // INVARIANT: checked and inserted in one transaction by the one
            // writer: a concurrent emergency request of the same principal
            // either is in `seen` or makes this one conflict.
            let now_rows = emergency_rows(conn, &t.request.requester)?;
            let same = now_rows.len() == seen.len()
                && now_rows
                    .iter()
                    .zip(seen)
                    .all(|((id, v, _), (sid, sv))| id == sid && v == sv);
            if !same {
                return Err(StoreError::Conflict {
                    id: t.request.id.clone(),
                    expected: 0,
                });
            }
            create_op(conn, t, now, head)
        }
        Op::Apply(t) => {
            let r = &t.request;
            // INVARIANT: compare-and-set on version, and every transition
            // moves the version on by one; two writers racing on one
            // request cannot both win.
            if r.version != t.expected_version + 1 {
                return Err(StoreError::Corrupt(format!(
                    "transition of request {} from version {} to {} does not advance it by one",
                    r.id, t.expected_version, r.version
                )));
            }
            let updated = conn
                .prepare_cached(
                    "UPDATE requests SET version = ?1, state = ?2, deadline = ?3, body = ?4 WHERE id = ?5 AND version = ?6",
                )?
                .execute(params![
                    r.version as i64,
                    r.state.as_str(),
                    r.deadline().map(Timestamp::millis),
                    body_of(r)?,
                    r.id,
                    t.expected_version as i64
                ])?;
            if updated == 0 {
                return Err(StoreError::Conflict {
                    id: r.id.clone(),
                    expected: t.expected_version,
                });
            }
            insert_events(conn, &t.events, now, head)
        }
        Op::Credential(c, event, limit) => {
            let issued: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM credentials WHERE request_id = ?1")?
                .query_row([&c.request_id], |r| r.get(0))?;
            if issued as u64 >= *limit {
                return Err(StoreError::Limit(format!(
                    "request {} already has {limit} credentials, the most one grant may have; reuse one of them",
                    c.request_id
                )));
            }
            conn.prepare_cached(
                "INSERT INTO credentials (hash, request_id, principal, target, role, expires_at, issued_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                &c.hash[..],
                c.request_id,
                c.principal,
                c.target,
                c.role,
                c.expires_at.millis(),
                c.issued_at.millis()
            ])?;
            insert_events(conn, std::slice::from_ref(event), now, head)
        }
        Op::Append(events) => insert_events(conn, events, now, head),
        Op::OneTimeCode(principal, step) => {
            let changed = conn
                .prepare_cached(
                    "INSERT INTO one_time_codes (principal, step) VALUES (?1, ?2) \
                     ON CONFLICT (principal) DO UPDATE SET step = excluded.step \
                     WHERE one_time_codes.step < excluded.step",
                )?
                .execute(params![principal, *step as i64])?;
            if changed == 0 {
                return Err(StoreError::Conflict {
                    id: principal.clone(),
                    expected: *step,
                });
            }
            Ok(Vec::new())
        }
        Op::DrillRun(drill, slot) => {
            let changed = conn
                .prepare_cached(
                    "INSERT INTO drill_runs (drill, slot) VALUES (?1, ?2) \
                     ON CONFLICT (drill) DO UPDATE SET slot = excluded.slot \
                     WHERE drill_runs.slot < excluded.slot",
                )?
                .execute(params![drill, *slot as i64])?;
            if changed == 0 {
                return Err(StoreError::Conflict {
                    id: drill.clone(),
                    expected: *slot,
                });
            }
            Ok(Vec::new())
        }
        Op::NotifyCursor(c) => {
            conn.prepare_cached(
                "INSERT INTO notify_cursors (sink, seq, updated_at, last_error, failed) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (sink) DO UPDATE SET \
                 seq = max(notify_cursors.seq, excluded.seq), updated_at = excluded.updated_at, \
                 last_error = excluded.last_error, failed = excluded.failed",
            )?
            .execute(params![
                c.sink,
                c.seq as i64,
                c.updated_at.millis(),
                c.last_error,
                c.failed as i64
            ])?;
            Ok(Vec::new())
        }
        Op::NotifyLease(sink, holder, now, until) => {
            let changed = conn
                .prepare_cached(
                    "UPDATE notify_cursors SET holder = ?2, held_until = ?4 WHERE sink = ?1 \
                     AND (holder IS NULL OR holder = ?2 OR held_until IS NULL OR held_until < ?3)",
                )?
                .execute(params![sink, holder, now, until])?;
            if changed == 0 {
                return Err(StoreError::Conflict {
                    id: sink.clone(),
                    expected: 0,
                });
            }
            Ok(Vec::new())
        }
        Op::Checkpoint(cp) => {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO checkpoints (seq, key, time, hash, signature, root) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                cp.seq as i64,
                cp.key.as_deref().unwrap_or(""),
                cp.time.millis(),
                &cp.hash[..],
                &cp.signature[..],
                cp.root.as_ref().map(|r| &r[..])
            ])?;
            Ok(Vec::new())
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create(&self, t: Transition, now: Timestamp) -> Result<Committed, StoreError> {
        self.submit(Op::Create(t), now).await
    }

    async fn create_emergency(
        &self,
        t: Transition,
        seen: Vec<(String, u64)>,
        now: Timestamp,
    ) -> Result<Committed, StoreError> {
        self.submit(Op::CreateEmergency(t, seen), now).await
    }

    async fn apply(&self, t: Transition, now: Timestamp) -> Result<Committed, StoreError> {
        self.submit(Op::Apply(t), now).await
    }

    async fn issue_credential(
        &self,
        cred: CredentialRecord,
        event: EventDraft,
        limit: u64,
        now: Timestamp,
    ) -> Result<Committed, StoreError> {
        self.submit(Op::Credential(cred, event, limit), now).await
    }

    async fn append(
        &self,
        events: Vec<EventDraft>,
        now: Timestamp,
    ) -> Result<Committed, StoreError> {
        self.submit(Op::Append(events), now).await
    }

    async fn get(&self, id: &str) -> Result<Option<Request>, StoreError> {
        // The lock is held for an `Arc` clone only; the copy is made after.
        let kept = lock(&self.shared.recent).get(id);
        if let Some(r) = kept {
            return Ok(Some(Request::clone(&r)));
        }
        self.get_row(id)
    }

    async fn list(&self, q: ListQuery) -> Result<Vec<Request>, StoreError> {
        self.read_blocking(move |c| {
            let mut sql = String::from("SELECT body FROM requests WHERE 1=1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(s) = q.state {
                sql.push_str(" AND state = ?");
                args.push(s.as_str().to_string().into());
            }
            if let Some(r) = &q.requester {
                sql.push_str(" AND requester = ?");
                args.push(r.clone().into());
            }
            if let Some((name, groups)) = &q.visible_to {
                sql.push_str(" AND (requester = ?");
                args.push(name.clone().into());
                if !groups.is_empty() {
                    // EXISTS walks requests in id order and stops at the
                    // page limit; `id IN (SELECT ...)` would collect and sort
                    // every visible id first (300 ms at 100k requests).
                    sql.push_str(
                        " OR EXISTS (SELECT 1 FROM request_groups g WHERE g.request_id = requests.id AND g.grp IN (",
                    );
                    for (i, g) in groups.iter().enumerate() {
                        sql.push_str(if i == 0 { "?" } else { ",?" });
                        args.push(g.clone().into());
                    }
                    sql.push_str("))");
                }
                sql.push(')');
            }
            match q.drill {
                Some(true) => sql.push_str(" AND drill IS NOT NULL"),
                Some(false) => sql.push_str(" AND drill IS NULL"),
                None => {}
            }
            if let Some(a) = &q.after {
                sql.push_str(" AND id < ?");
                args.push(a.clone().into());
            }
            sql.push_str(" ORDER BY id DESC LIMIT ?");
            args.push(i64::from(q.limit.clamp(1, PAGE_LEN_MAX)).into());
            let mut stmt = c.prepare(&sql)?;
            let rows =
                stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for body in rows {
                out.push(parse_request(&body?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn unreviewed_grants(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError> {
        self.read_blocking(move |c| {
            // The WHERE terms are the partial index's, so the index serves it.
            let mut stmt = c.prepare_cached(
                "SELECT body FROM requests WHERE state IN ('expired', 'revoked') AND json_extract(body, '$.review') IS NULL AND id > ? ORDER BY id LIMIT ?",
            )?;
            let rows = stmt.query_map(
                rusqlite::params![after.unwrap_or_default(), i64::from(limit.clamp(1, PAGE_LEN_MAX))],
                |r| r.get::<_, String>(0),
            )?;
            let mut out = Vec::new();
            for body in rows {
                out.push(parse_request(&body?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn requests_since(
        &self,
        since: Timestamp,
        after: Option<(Timestamp, String)>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError> {
        self.read_blocking(move |c| {
            let (at, id) = after.unwrap_or((Timestamp(since.millis() - 1), String::new()));
            let mut stmt = c.prepare_cached(
                "SELECT body FROM requests WHERE created_at >= ? AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?",
            )?;
            let rows = stmt.query_map(
                rusqlite::params![
                    since.millis(),
                    at.millis(),
                    id,
                    i64::from(limit.clamp(1, SINCE_PAGE_LEN_MAX))
                ],
                |r| r.get::<_, String>(0),
            )?;
            let mut out = Vec::new();
            for body in rows {
                out.push(parse_request(&body?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn emergency_requests(&self, requester: &str) -> Result<Vec<Request>, StoreError> {
        let requester = requester.to_string();
        self.read_blocking(move |c| {
            emergency_rows(c, &requester)?
                .iter()
                .map(|(_, _, body)| parse_request(body))
                .collect()
        })
        .await
    }

    async fn open_requests(&self) -> Result<Vec<Request>, StoreError> {
        self.read_blocking(|c| {
            let mut stmt = c.prepare(
                "SELECT body FROM requests WHERE deadline IS NOT NULL ORDER BY deadline",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for body in rows {
                out.push(parse_request(&body?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn credential(&self, hash: Hash) -> Result<Option<CredentialRecord>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT hash, request_id, principal, target, role, expires_at, issued_at FROM credentials WHERE hash = ?1",
            )?
            .query_row([&hash[..]], |r| {
                Ok(CredentialRecord {
                    hash: hash_from(r.get(0)?)?,
                    request_id: r.get(1)?,
                    principal: r.get(2)?,
                    target: r.get(3)?,
                    role: r.get(4)?,
                    expires_at: Timestamp(r.get(5)?),
                    issued_at: Timestamp(r.get(6)?),
                })
            })
            .optional()?)
        })
    }

    async fn audit(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        self.read_blocking(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![after as i64, i64::from(limit.clamp(1, PAGE_LEN_MAX))],
                row_to_event,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn request_events(
        &self,
        request_id: &str,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let id = request_id.to_string();
        self.read_blocking(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE request_id = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![id, i64::from(limit.clamp(1, PAGE_LEN_MAX))],
                row_to_event,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn use_one_time_code(&self, principal: &str, step: u64) -> Result<bool, StoreError> {
        match self
            .submit(
                Op::OneTimeCode(principal.to_string(), step),
                Timestamp::from_millis(0),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn claim_drill_run(&self, drill: &str, slot: u64) -> Result<bool, StoreError> {
        match self
            .submit(
                Op::DrillRun(drill.to_string(), slot),
                Timestamp::from_millis(0),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn drill_results(
        &self,
        since: Timestamp,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.read_blocking(move |c| {
            let mut stmt = c.prepare_cached(DRILL_RESULTS_SQL)?;
            let rows = stmt.query_map(
                params![since.millis(), i64::from(limit.clamp(1, PAGE_LEN_MAX))],
                row_to_event,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn notify_cursors(&self) -> Result<Vec<NotifyCursor>, StoreError> {
        self.read_blocking(|c| {
            let mut stmt = c.prepare(
                "SELECT sink, seq, updated_at, last_error, failed FROM notify_cursors ORDER BY sink",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(NotifyCursor {
                    sink: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    updated_at: Timestamp(r.get(2)?),
                    last_error: r.get(3)?,
                    failed: r.get::<_, i64>(4)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn set_notify_cursor(&self, cursor: NotifyCursor) -> Result<(), StoreError> {
        let time = cursor.updated_at;
        self.submit(Op::NotifyCursor(cursor), time)
            .await
            .map(|_| ())
    }

    async fn lease_notify_sink(
        &self,
        sink: &str,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        let op = Op::NotifyLease(sink.into(), holder.into(), now.millis(), until.millis());
        match self.submit(op, now).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn add_checkpoint(&self, cp: Checkpoint) -> Result<(), StoreError> {
        let time = cp.time;
        self.submit(Op::Checkpoint(cp), time).await.map(|_| ())
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        self.read_blocking(|c| {
            let mut stmt = c.prepare(
                "SELECT seq, time, hash, signature, key, root FROM checkpoints ORDER BY seq, key",
            )?;
            let rows = stmt.query_map([], |r| {
                let sig: Vec<u8> = r.get(3)?;
                let signature: [u8; 64] = sig.try_into().map_err(|_| {
                    rusqlite::Error::FromSqlConversionFailure(
                        3,
                        rusqlite::types::Type::Blob,
                        "signature is not 64 bytes".into(),
                    )
                })?;
                Ok(Checkpoint {
                    seq: r.get::<_, i64>(0)? as u64,
                    time: Timestamp(r.get(1)?),
                    hash: hash_from(r.get(2)?)?,
                    signature,
                    key: Some(r.get::<_, String>(4)?).filter(|k| !k.is_empty()),
                    root: r.get::<_, Option<Vec<u8>>>(5)?.map(hash_from).transpose()?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn tree_nodes(&self, nodes: &[Subtree]) -> Result<Vec<Hash>, StoreError> {
        let nodes = nodes.to_vec();
        self.read_blocking(move |c| crate::tree::sqlite::read(c, &nodes))
            .await
    }

    fn head(&self) -> (u64, Hash) {
        *lock(&self.shared.head)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<AuditEvent>> {
        self.shared.events.subscribe()
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        self.read_blocking(|c| {
            let mut stmt = c.prepare("SELECT state, count(*) FROM requests GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (s, n) = row?;
                let state = State::parse(&s)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown state {s:?}")))?;
                out.push((state, n as u64));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drill_results_are_read_through_their_partial_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bg.db");
        drop(SqliteStore::open(&path, SqliteOptions::default()).expect("open"));
        let conn = Connection::open(&path).expect("conn");
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {DRILL_RESULTS_SQL}"))
            .expect("explain")
            .query_map(params![0, 10], |r| r.get::<_, String>(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(
            plan.iter().any(|p| p.contains("audit_drill_results")),
            "{plan:?}"
        );
        // Every other event leaves no index entry by action.
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit'")
            .expect("indexes")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("names");
        assert!(!indexes.iter().any(|n| n == "audit_action"), "{indexes:?}");
    }

    #[test]
    fn recent_keeps_the_newest_value_of_at_most_its_bound_of_ids() {
        let mut r: Recent<u32> = Recent::new();
        for i in 0..RECENT_MAX as u32 {
            r.put(&format!("id-{i}"), i);
        }
        // A new value of a kept id replaces it and takes no more room.
        r.put("id-0", 7);
        assert_eq!(r.get("id-0"), Some(7));
        assert_eq!(r.by_id.len(), RECENT_MAX);
        assert_eq!(r.order.len(), RECENT_MAX);
        // The next new id pushes out the one that came first.
        r.put("new", 1);
        assert_eq!(r.get("id-0"), None);
        assert_eq!(r.get("id-1"), Some(1));
        assert_eq!(r.get("new"), Some(1));
        assert_eq!(r.by_id.len(), RECENT_MAX);
        assert_eq!(r.order.len(), RECENT_MAX);
        assert_eq!(r.get("never"), None);
    }
}
