//! The shared store: PostgreSQL, for several identical nodes.
//!
//! Every node runs the same code against one database; PostgreSQL
//! serialises what must be serialised, there is no consensus of our own:
//!
//! - **One chain.** The single `chain_head` row holds the newest `(seq,
//!   hash)`. Each commit locks it (`SELECT ... FOR UPDATE`), appends its
//!   events after it and moves it, so commits from all nodes form one chain
//!   with contiguous `seq`.
//! - **Group commit.** Like the embedded store, each node has one writer task
//!   that takes every job waiting in its queue into one transaction, each
//!   job inside a savepoint (a failing job rolls back alone), so a busy node
//!   pays one commit (and one wait on the head lock) per batch, not per
//!   event.
//! - **One feed.** A commit calls `pg_notify` in its own transaction. A
//!   follower task `LISTEN`s on a dedicated connection and, on every
//!   notification and on a short poll as a safety net, reads `audit WHERE
//!   seq > last` in order and broadcasts it; a dropped connection only delays
//!   events, never loses them. [`Store::head`] follows the feed (and this
//!   node's own commits).
//! - **Migrations** are versioned and run at open under an advisory lock, so
//!   nodes starting together on an empty database are safe; a database with
//!   a newer schema version than this binary knows is refused.
//!
//! Connections come from a pool (`deadpool-postgres`) that drops closed
//! connections, so the store recovers by itself after a database restart.
//! TLS to the database: `sslmode=verify-full&sslrootcert=PATH` in the URL
//! encrypts every connection and verifies the server's certificate against
//! that CA and the host name (rustls, ring). `sslmode=require` and
//! `verify-ca`, which would accept a certificate without checking who it
//! names, are refused rather than weakly honoured.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use breakglass_core::audit::{AuditEvent, Checkpoint, Hash, canonical_json, chain_hash};
use breakglass_core::merkle::{self, Subtree};
use breakglass_core::{EventDraft, Request, State, Timestamp, Transition};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{
    Committed, CredentialRecord, EMERGENCY_REQUESTS_MAX, ListQuery, NotifyCursor, PAGE_LEN_MAX,
    SINCE_PAGE_LEN_MAX, Store, StoreError,
};

/// Jobs the writer takes into one transaction at most.
const BATCH_LEN_MAX: usize = 512;
/// Jobs waiting for the writer at most; beyond that writers are refused.
const QUEUE_DEPTH_MAX: usize = 16_384;
/// Pooled connections per node.
const POOL_SIZE_MAX: usize = 16;
/// How long opening a connection may take.
const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// How long a call waits for a pooled connection.
const POOL_WAIT_MS: u64 = 2_000;
/// The feed reads the log at least this often, notification or not.
const FEED_POLL_MS: u64 = 200;
/// Back-off between attempts to re-open the `LISTEN` connection.
const LISTEN_RETRY_MS: u64 = 250;
/// Events one feed read takes at most.
const FEED_PAGE_LEN_MAX: u32 = 1_000;
/// The channel commits notify and followers listen on.
pub const FEED_CHANNEL: &str = "breakglass_audit";
/// The advisory lock that serialises migrations (any constant unlikely to
/// clash with an application's own: "breakgls" in ASCII).
const MIGRATION_LOCK: i64 = 0x627265616b676c73;

/// Schema migrations, applied in order; `schema_version.version` counts
/// them.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    requester TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    deadline BIGINT,
    body TEXT NOT NULL
);
CREATE INDEX requests_deadline ON requests(deadline) WHERE deadline IS NOT NULL;
CREATE INDEX requests_state ON requests(state, id);
CREATE INDEX requests_requester ON requests(requester, id);
CREATE TABLE request_groups (
    request_id TEXT NOT NULL,
    grp TEXT NOT NULL,
    PRIMARY KEY (grp, request_id)
);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    request_id TEXT,
    details TEXT NOT NULL,
    hash BYTEA NOT NULL
);
CREATE INDEX audit_request ON audit(request_id, seq) WHERE request_id IS NOT NULL;
CREATE TABLE chain_head (
    id INT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
CREATE TABLE checkpoints (
    seq BIGINT NOT NULL,
    key TEXT NOT NULL,
    time BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    PRIMARY KEY (seq, key)
);
CREATE TABLE credentials (
    hash BYTEA PRIMARY KEY,
    request_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    target TEXT NOT NULL,
    role TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    issued_at BIGINT NOT NULL
);
CREATE INDEX credentials_request ON credentials(request_id);
"#,
    // The newest one-time code (TOTP time step) each principal used.
    r#"
CREATE TABLE one_time_codes (
    principal TEXT PRIMARY KEY,
    step BIGINT NOT NULL
);
"#,
    // The Merkle tree over the log (complete subtrees), its right edge
    // beside the chain head (built at open for the events already there:
    // size 0 until then), and the tree head that checkpoints sign.
    r#"
CREATE TABLE merkle_nodes (
    level SMALLINT NOT NULL,
    idx BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);
ALTER TABLE chain_head ADD COLUMN tree BYTEA NOT NULL DEFAULT decode('0000000000000000', 'hex');
ALTER TABLE checkpoints ADD COLUMN root BYTEA;
"#,
    // Drills: the label of drill requests as a column (so lists and reports
    // can keep drills apart from real use), their results by action, and
    // the newest scheduled slot each drill was claimed for.
    r#"
ALTER TABLE requests ADD COLUMN drill TEXT;
UPDATE requests SET drill = body::jsonb->>'drill' WHERE body::jsonb->>'drill' IS NOT NULL;
CREATE INDEX requests_drill ON requests(drill, id) WHERE drill IS NOT NULL;
CREATE INDEX audit_action ON audit(action, time);
CREATE TABLE drill_runs (
    drill TEXT PRIMARY KEY,
    slot BIGINT NOT NULL
);
"#,
    // Reviews: ended grants nobody reviewed yet (the review queue), and
    // requests by creation time (reports).
    r#"
CREATE INDEX requests_unreviewed ON requests(id)
    WHERE state IN ('expired', 'revoked') AND (body::jsonb ->> 'review') IS NULL;
CREATE INDEX requests_created ON requests(created_at, id);
"#,
    // Each notification sink's place in the audit feed.
    r#"
CREATE TABLE notify_cursors (
    sink TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_error TEXT,
    failed BIGINT NOT NULL DEFAULT 0
);
"#,
    // The node that delivers each sink, and until when.
    r#"
ALTER TABLE notify_cursors ADD COLUMN holder TEXT;
ALTER TABLE notify_cursors ADD COLUMN held_until BIGINT;
"#,
    // Only drill results are read by action: the index on every event's
    // action becomes a partial one on `drill.completed`.
    r#"
DROP INDEX audit_action;
CREATE INDEX audit_drill_results ON audit(time) WHERE action = 'drill.completed';
"#,
];

/// The schema version this binary writes.
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // The driver's text names the failing statement's error, never a
    // parameter value; callers log it and answer 503.
    // The cause (a TLS or socket error) is in the source chain.
    let mut text = format!("database: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    StoreError::Unavailable(text)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("database connection: {e}"))
}

enum Op {
    Create(Transition),
    CreateEmergency(Transition, Vec<(String, u64)>),
    Apply(Transition),
    Credential(CredentialRecord, EventDraft, u64),
    Append(Vec<EventDraft>),
    Checkpoint(Checkpoint),
}

struct Job {
    op: Op,
    now: Timestamp,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

struct Shared {
    pool: Pool,
    /// The newest `(seq, hash)` broadcast by the feed or committed here.
    head: Mutex<(u64, Hash)>,
    /// The last seq the feed broadcast.
    fed: Mutex<u64>,
    events: broadcast::Sender<Arc<AuditEvent>>,
    /// Wakes the follower (a notification arrived, or this node committed).
    poke: Notify,
    /// When the feed last read the log successfully.
    fed_at: Mutex<Instant>,
}

/// The PostgreSQL store. Cloning shares the same writer, pool and feed.
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    _tasks: Arc<Tasks>,
}

/// Aborts the writer and the follower when the last clone is dropped.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hash_of(bytes: Vec<u8>) -> Result<Hash, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("hash is not 32 bytes".into()))
}

pub(crate) fn row_to_event(r: &Row) -> Result<AuditEvent, StoreError> {
    Ok(AuditEvent {
        seq: r.get::<_, i64>(0) as u64,
        time: Timestamp(r.get(1)),
        actor: r.get(2),
        action: r.get(3),
        request_id: r.get(4),
        details: r.get(5),
        hash: hash_of(r.get(6))?,
    })
}

fn parse_request(body: &str) -> Result<Request, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("request row: {e}")))
}

fn body_of(r: &Request) -> Result<String, StoreError> {
    serde_json::to_string(r).map_err(|e| StoreError::Corrupt(format!("cannot encode request: {e}")))
}

/// How this store reaches the database: the parsed connection string, and
/// the TLS connector when the URL asks for `sslmode=verify-full`.
#[derive(Clone)]
pub struct DbUrl {
    cfg: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

/// Parses a connection string and refuses what this store cannot honour.
/// `sslmode` and `sslrootcert` are taken out of a URL's query here
/// (tokio-postgres knows neither `verify-full` nor `sslrootcert`).
pub fn parse_url(url: &str) -> Result<DbUrl, StoreError> {
    let bad = |why: String| StoreError::Unavailable(format!("the database URL: {why}"));
    let (mut verify_full, mut root_cert) = (false, None);
    let mut rest = url.to_string();
    if let Some((base, query)) = url.split_once('?') {
        let mut kept = Vec::new();
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("sslmode", "verify-full")) => verify_full = true,
                Some(("sslmode", mode @ ("require" | "verify-ca"))) => {
                    return Err(bad(format!(
                        "sslmode={mode} would accept a certificate without checking the name it carries; use sslmode=verify-full&sslrootcert=PATH (or sslmode=disable on a trusted network)"
                    )));
                }
                Some(("sslrootcert", path)) => root_cert = Some(path.to_string()),
                _ => kept.push(kv),
            }
        }
        rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
    }
    let mut cfg: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| bad(format!("it does not parse: {e}")))?;
    if cfg.get_ssl_mode() == SslMode::Require {
        return Err(bad(
            "sslmode=require would accept any certificate; use sslmode=verify-full&sslrootcert=PATH"
                .into(),
        ));
    }
    let tls = match (verify_full, root_cert) {
        (true, Some(path)) => {
            cfg.ssl_mode(SslMode::Require);
            Some(MakeRustlsConnect::new(tls_config(&path).map_err(bad)?))
        }
        (true, None) => {
            return Err(bad(
                "sslmode=verify-full needs sslrootcert=PATH (the PEM file of the CA that signed the database's certificate)".into(),
            ));
        }
        (false, Some(_)) => {
            return Err(bad(
                "sslrootcert is only used with sslmode=verify-full".into()
            ));
        }
        (false, None) => {
            // `prefer` (the default) would try TLS without a connector:
            // say plainly that the connection is not encrypted.
            cfg.ssl_mode(SslMode::Disable);
            None
        }
    };
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
    }
    cfg.application_name("breakglass");
    Ok(DbUrl { cfg, tls })
}

/// A rustls client configuration that trusts only the CA in `root_cert`.
fn tls_config(root_cert: &str) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(root_cert)
        .map_err(|e| format!("sslrootcert {root_cert}: {e}"))?;
    for c in certs {
        let c = c.map_err(|e| format!("sslrootcert {root_cert}: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("sslrootcert {root_cert}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert {root_cert}: no certificate in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Spawns the task that drives a connection; notifications (from `LISTEN`)
/// come out of the returned channel.
fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
) -> (mpsc::UnboundedReceiver<()>, tokio::task::JoinHandle<()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(AsyncMessage::Notification(_)) => {
                    // Nobody listens (the connection is not a LISTEN one,
                    // or the store is gone): keep driving it regardless.
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (rx, driver)
}

/// Opens a connection outside the pool, with its driving task.
async fn connect(
    db: &DbUrl,
) -> Result<
    (
        tokio_postgres::Client,
        mpsc::UnboundedReceiver<()>,
        tokio::task::JoinHandle<()>,
    ),
    StoreError,
> {
    match &db.tls {
        None => {
            let (client, conn) = db.cfg.connect(NoTls).await.map_err(pg_err)?;
            let (rx, driver) = drive(conn);
            Ok((client, rx, driver))
        }
        Some(tls) => {
            let (client, conn) = db.cfg.connect(tls.clone()).await.map_err(pg_err)?;
            let (rx, driver) = drive(conn);
            Ok((client, rx, driver))
        }
    }
}

/// Runs the migrations this database lacks, under the advisory lock.
async fn migrate(db: &DbUrl) -> Result<(), StoreError> {
    let (client, _notifications, driver) = connect(db).await?;
    let result = async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_err)?;
        let out = migrate_locked(&client).await;
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        out
    }
    .await;
    drop(client);
    let _ = driver.await;
    result
}

async fn migrate_locked(client: &tokio_postgres::Client) -> Result<(), StoreError> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await
        .map_err(pg_err)?;
    let version: i64 = client
        .query_opt("SELECT version FROM schema_version", &[])
        .await
        .map_err(pg_err)?
        .map_or(0, |r| r.get(0));
    if version > PG_SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {version}, newer than this binary knows ({PG_SCHEMA_VERSION}); refusing to touch it (run a newer breakglass)"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let next = (i + 1) as i64;
        let tx = format!(
            "BEGIN; {sql}; DELETE FROM schema_version; INSERT INTO schema_version (version) VALUES ({next}); COMMIT;"
        );
        if let Err(e) = client.batch_execute(&tx).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(pg_err(e));
        }
        tracing::info!(version = next, "database schema migrated");
    }
    Ok(())
}

/// Builds the Merkle tree over the events it does not hold yet (a log
/// written before the tree existed), under the chain head lock: nodes
/// starting together build it once.
async fn build_tree(db: &DbUrl) -> Result<(), StoreError> {
    let (mut client, _notifications, driver) = connect(db).await?;
    let result = async {
        let row = client
            .query_one("SELECT seq, tree FROM chain_head WHERE id = 1", &[])
            .await
            .map_err(pg_err)?;
        if crate::tree::pg::frontier(row.get(1))?.size() >= row.get::<_, i64>(0) as u64 {
            return Ok(());
        }
        let tx = client.transaction().await.map_err(pg_err)?;
        let row = tx
            .query_one(
                "SELECT seq, tree FROM chain_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg_err)?;
        let mut frontier = crate::tree::pg::frontier(row.get(1))?;
        let added =
            crate::tree::pg::catch_up(&tx, &mut frontier, row.get::<_, i64>(0) as u64).await?;
        tx.execute(
            "UPDATE chain_head SET tree = $1 WHERE id = 1",
            &[&frontier.to_bytes()],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        if added > 0 {
            tracing::info!(
                events = added,
                "Merkle tree built over the existing audit log"
            );
        }
        Ok(())
    }
    .await;
    drop(client);
    let _ = driver.await;
    result
}

impl PgStore {
    /// Connects, migrates, and starts the writer and the feed follower.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let db = parse_url(url)?;
        migrate(&db).await?;
        build_tree(&db).await?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &db.tls {
            None => Manager::from_config(db.cfg.clone(), NoTls, manager_config),
            Some(tls) => Manager::from_config(db.cfg.clone(), tls.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE_MAX)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_millis(POOL_WAIT_MS)))
            .create_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS)))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("database pool: {e}")))?;
        let head = {
            let client = pool.get().await.map_err(pool_err)?;
            let row = client
                .query_one("SELECT seq, hash FROM chain_head WHERE id = 1", &[])
                .await
                .map_err(pg_err)?;
            (row.get::<_, i64>(0) as u64, hash_of(row.get(1))?)
        };
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            pool,
            head: Mutex::new(head),
            fed: Mutex::new(head.0),
            events,
            poke: Notify::new(),
            fed_at: Mutex::new(Instant::now()),
        });
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let writer = tokio::spawn(writer_loop(rx, shared.clone()));
        let listener = tokio::spawn(listen_loop(db, Arc::downgrade(&shared)));
        let follower = tokio::spawn(follow_loop(shared.clone()));
        Ok(PgStore {
            shared,
            jobs,
            _tasks: Arc::new(Tasks(vec![writer, listener, follower])),
        })
    }

    async fn submit(&self, op: Op, now: Timestamp) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        match self.jobs.try_send(Job { op, now, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(StoreError::Unavailable("write queue is full".into()));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(StoreError::Unavailable("writer has stopped".into()));
            }
        }
        rx.await
            .map_err(|_| StoreError::Unavailable("writer has stopped".into()))?
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.shared.pool.get().await.map_err(pool_err)
    }

    async fn query(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_err)?;
        client.query(&stmt, args).await.map_err(pg_err)
    }

    /// Copies a whole store into this one, which must be empty: the
    /// requests and credentials given (the state the events describe), then
    /// every event of `from` with `seq`, time, hash and details unchanged,
    /// then every checkpoint of `from` with its signature. One transaction:
    /// a copy that fails leaves nothing behind. Each event must continue the
    /// chain exactly; a source chain that does not hold is refused at its
    /// first bad `seq`. Returns the number of events copied.
    pub async fn copy_from(
        &self,
        from: &dyn Store,
        requests: &[Request],
        credentials: &[CredentialRecord],
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let row = tx
            .query_one(
                "SELECT seq, hash FROM chain_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg_err)?;
        let mut head = (row.get::<_, i64>(0) as u64, hash_of(row.get(1))?);
        let held: i64 = tx
            .query_one("SELECT count(*) FROM requests", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        if head.0 != 0 || held != 0 {
            return Err(StoreError::Limit(format!(
                "the database already holds {held} requests and {} audit events; copy only into an empty database",
                head.0
            )));
        }
        for r in requests {
            if !insert_request(&tx, r).await? {
                return Err(StoreError::Duplicate(r.id.clone()));
            }
        }
        for c in credentials {
            insert_credential(&tx, c).await?;
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO audit (seq, time, actor, action, request_id, details, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await
            .map_err(pg_err)?;
        loop {
            let page = from.audit(head.0, PAGE_LEN_MAX).await?;
            let n = page.len();
            for e in page {
                // INVARIANT: a copied event continues the chain exactly: the
                // copy never re-links or renumbers anything.
                let expect = chain_hash(
                    &head.1,
                    head.0 + 1,
                    e.time,
                    &e.actor,
                    &e.action,
                    e.request_id.as_deref(),
                    &e.details,
                );
                if e.seq != head.0 + 1 || expect != e.hash {
                    return Err(StoreError::Corrupt(format!(
                        "the source chain does not hold at seq {}: run `breakglass audit verify` on it first",
                        head.0 + 1
                    )));
                }
                tx.execute(
                    &stmt,
                    &[
                        &(e.seq as i64),
                        &e.time.millis(),
                        &e.actor,
                        &e.action,
                        &e.request_id,
                        &e.details,
                        &&e.hash[..],
                    ],
                )
                .await
                .map_err(pg_err)?;
                head = (e.seq, e.hash);
            }
            if n < PAGE_LEN_MAX as usize {
                break;
            }
        }
        for cp in from.checkpoints().await? {
            apply_op(&tx, &Op::Checkpoint(cp), Timestamp(0), &mut head).await?;
        }
        let mut tree = merkle::Frontier::new();
        crate::tree::pg::catch_up(&*tx, &mut tree, head.0).await?;
        tx.execute(
            "UPDATE chain_head SET seq = $1, hash = $2, tree = $3 WHERE id = 1",
            &[&(head.0 as i64), &&head.1[..], &tree.to_bytes()],
        )
        .await
        .map_err(pg_err)?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&FEED_CHANNEL, &head.0.to_string()],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        self.shared.poke.notify_one();
        Ok(head.0)
    }
}

impl Shared {
    fn head(&self) -> (u64, Hash) {
        *lock(&self.head)
    }

    fn advance_head(&self, to: (u64, Hash)) {
        let mut h = lock(&self.head);
        if to.0 > h.0 {
            *h = to;
        }
    }
}

/// Drives the `LISTEN` connection: every notification pokes the follower.
/// Re-opens the connection after it drops; the follower's poll covers the
/// gap, and its reads by `seq` lose nothing.
async fn listen_loop(db: DbUrl, shared: std::sync::Weak<Shared>) {
    loop {
        match connect(&db).await {
            Ok((client, mut rx, driver)) => {
                if client
                    .batch_execute(&format!("LISTEN {FEED_CHANNEL}"))
                    .await
                    .is_ok()
                {
                    if let Some(s) = shared.upgrade() {
                        // Events committed before LISTEN took effect are read
                        // now.
                        s.poke.notify_one();
                    }
                    while rx.recv().await.is_some() {
                        let Some(s) = shared.upgrade() else { return };
                        s.poke.notify_one();
                    }
                }
                driver.abort();
                tracing::warn!("the database feed connection dropped; reconnecting");
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot open the database feed connection");
            }
        }
        if shared.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(LISTEN_RETRY_MS)).await;
    }
}

/// Reads the log after the last broadcast event, in order, and broadcasts
/// it: on every poke and at least every `FEED_POLL_MS`.
async fn follow_loop(shared: Arc<Shared>) {
    loop {
        match catch_up(&shared).await {
            Ok(more) => {
                *lock(&shared.fed_at) = Instant::now();
                if more {
                    continue;
                }
            }
            Err(e) => tracing::debug!(error = %e, "the feed cannot read the database"),
        }
        let poke = shared.poke.notified();
        let _ = tokio::time::timeout(Duration::from_millis(FEED_POLL_MS), poke).await;
    }
}

/// One read of the feed; true when a full page came back (read again).
async fn catch_up(shared: &Shared) -> Result<bool, StoreError> {
    let after = *lock(&shared.fed);
    let client = shared.pool.get().await.map_err(pool_err)?;
    let stmt = client
        .prepare_cached(
            "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .await
        .map_err(pg_err)?;
    let rows = client
        .query(&stmt, &[&(after as i64), &i64::from(FEED_PAGE_LEN_MAX)])
        .await
        .map_err(pg_err)?;
    drop(client);
    let n = rows.len();
    for (expect, r) in (after + 1..).zip(rows.iter()) {
        let e = row_to_event(r)?;
        // INVARIANT: the feed is contiguous. Commits assign seq under the
        // chain head lock, so a gap is never visible; if one were, stop
        // before it and read again.
        if e.seq != expect {
            return Ok(false);
        }
        *lock(&shared.fed) = e.seq;
        shared.advance_head((e.seq, e.hash));
        let _ = shared.events.send(Arc::new(e));
    }
    Ok(n == FEED_PAGE_LEN_MAX as usize)
}

async fn writer_loop(mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH_LEN_MAX {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let outcome = run_batch(&shared, &batch).await;
        match outcome {
            Ok((results, head)) => {
                shared.advance_head(head);
                shared.poke.notify_one();
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = batch.len(), "database commit failed; the batch is rolled back");
                let msg = match &e {
                    StoreError::Unavailable(m) => m.clone(),
                    other => other.to_string(),
                };
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
            }
        }
    }
}

type BatchOutcome = (Vec<Result<Committed, StoreError>>, (u64, Hash));

/// One transaction for the whole batch. `Err` means nothing of it committed
/// (or, for a connection lost during COMMIT, that the outcome is unknown:
/// the callers were not told it succeeded).
async fn run_batch(shared: &Shared, batch: &[Job]) -> Result<BatchOutcome, StoreError> {
    let mut client = shared.pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(pg_err)?;
    // INVARIANT: the chain head row is locked until COMMIT: seq and the hash
    // link are assigned by one transaction at a time across every node.
    // Statements are prepared once per connection (cached), so the lock is
    // held for executions only, not for parsing.
    let lock_head = tx
        .prepare_cached("SELECT seq, hash, tree FROM chain_head WHERE id = 1 FOR UPDATE")
        .await
        .map_err(pg_err)?;
    let move_head = tx
        .prepare_cached("UPDATE chain_head SET seq = $1, hash = $2, tree = $3 WHERE id = 1")
        .await
        .map_err(pg_err)?;
    let insert_nodes = tx
        .prepare_cached(crate::tree::pg::INSERT)
        .await
        .map_err(pg_err)?;
    let notify = tx
        .prepare_cached("SELECT pg_notify($1, $2)")
        .await
        .map_err(pg_err)?;
    let row = tx.query_one(&lock_head, &[]).await.map_err(pg_err)?;
    let start = (row.get::<_, i64>(0) as u64, hash_of(row.get(1))?);
    // INVARIANT: the tree grows in the transaction of its events, under the
    // same lock. A node of an older release may have moved the head
    // without it: catch up first (reads only then).
    let mut tree = crate::tree::pg::frontier(row.get(2))?;
    let tree_start = tree.size();
    if tree.size() < start.0 {
        crate::tree::pg::catch_up(&*tx, &mut tree, start.0).await?;
    }
    let mut head = start;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let before = head;
        // The savepoint travels in the same round trip as the job's first
        // statements (tokio-postgres pipelines futures polled together).
        // It is never released: the next job's `SAVEPOINT job` shadows it,
        // and `ROLLBACK TO SAVEPOINT job` returns to the newest one.
        let (savepoint, applied) = futures_util::future::join(
            tx.batch_execute("SAVEPOINT job"),
            apply_op(&tx, &job.op, job.now, &mut head),
        )
        .await;
        savepoint.map_err(pg_err)?;
        match applied {
            Ok(events) => results.push(Ok(events)),
            Err(e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT job")
                    .await
                    .map_err(pg_err)?;
                head = before;
                results.push(Err(e));
            }
        }
    }
    if head != start || tree.size() != tree_start {
        let committed = results.iter().filter_map(|r| r.as_ref().ok()).flatten();
        let (levels, idxs, hashes) =
            crate::tree::pg::columns(&crate::tree::grow(&mut tree, committed)?);
        let seq = head.0 as i64;
        let seq_text = head.0.to_string();
        let edge = tree.to_bytes();
        let (moved, notified, treed) = futures_util::future::join3(
            tx.execute(&move_head, &[&seq, &&head.1[..], &edge]),
            tx.execute(&notify, &[&FEED_CHANNEL, &seq_text]),
            tx.execute(&insert_nodes, &[&levels, &idxs, &hashes]),
        )
        .await;
        moved.map_err(pg_err)?;
        notified.map_err(pg_err)?;
        treed.map_err(pg_err)?;
    }
    tx.commit().await.map_err(pg_err)?;
    Ok((results, head))
}

async fn insert_events(
    tx: &deadpool_postgres::Transaction<'_>,
    drafts: &[EventDraft],
    now: Timestamp,
    head: &mut (u64, Hash),
) -> Result<Committed, StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO audit (seq, time, actor, action, request_id, details, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .map_err(pg_err)?;
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
    // Every insert in one round trip: the hashes are computed here, so no
    // statement waits for another's answer.
    let rows: Vec<_> = out
        .iter()
        .map(|e| {
            (
                e.seq as i64,
                e.time.millis(),
                &e.actor,
                &e.action,
                &e.request_id,
                &e.details,
                &e.hash[..],
            )
        })
        .collect();
    let params: Vec<[&(dyn ToSql + Sync); 7]> = rows
        .iter()
        .map(|r| -> [&(dyn ToSql + Sync); 7] { [&r.0, &r.1, r.2, r.3, r.4, r.5, &r.6] })
        .collect();
    futures_util::future::try_join_all(params.iter().map(|p| tx.execute(&stmt, p)))
        .await
        .map_err(pg_err)?;
    Ok(out)
}

async fn insert_request(
    tx: &deadpool_postgres::Transaction<'_>,
    r: &Request,
) -> Result<bool, StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO requests (id, version, state, requester, created_at, deadline, body, drill) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
        )
        .await
        .map_err(pg_err)?;
    let groups = tx
        .prepare_cached(
            "INSERT INTO request_groups (request_id, grp) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(pg_err)?;
    let (version, created_at) = (r.version as i64, r.created_at.millis());
    let (deadline, body) = (r.deadline().map(Timestamp::millis), body_of(r)?);
    let group_params: Vec<[&(dyn ToSql + Sync); 2]> = r
        .approver_groups
        .iter()
        .map(|g| -> [&(dyn ToSql + Sync); 2] { [&r.id, g] })
        .collect();
    // One round trip. When the id exists (nothing inserted), the caller
    // rolls the group rows back with the job's savepoint.
    let (inserted, grouped) = futures_util::future::join(
        tx.execute(
            &stmt,
            &[
                &r.id,
                &version,
                &r.state.as_str(),
                &r.requester,
                &created_at,
                &deadline,
                &body,
                &r.drill,
            ],
        ),
        futures_util::future::try_join_all(group_params.iter().map(|p| tx.execute(&groups, p))),
    )
    .await;
    let inserted = inserted.map_err(pg_err)?;
    grouped.map_err(pg_err)?;
    Ok(inserted == 1)
}

async fn insert_credential(
    tx: &deadpool_postgres::Transaction<'_>,
    c: &CredentialRecord,
) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO credentials (hash, request_id, principal, target, role, expires_at, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .map_err(pg_err)?;
    tx.execute(
        &stmt,
        &[
            &&c.hash[..],
            &c.request_id,
            &c.principal,
            &c.target,
            &c.role,
            &c.expires_at.millis(),
            &c.issued_at.millis(),
        ],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

async fn create_op(
    tx: &deadpool_postgres::Transaction<'_>,
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
    // One round trip: a duplicate id is found when both are answered, and
    // the events are rolled back with the job's savepoint.
    let (inserted, events) = futures_util::future::join(
        insert_request(tx, r),
        insert_events(tx, &t.events, now, head),
    )
    .await;
    if !inserted? {
        return Err(StoreError::Duplicate(r.id.clone()));
    }
    events
}

/// The query behind [`Store::emergency_requests`]: (id, version, body).
const EMERGENCY_ROWS: &str = "SELECT id, version, body FROM requests WHERE requester = $1 \
     AND (body::jsonb -> 'emergency') = 'true'::jsonb \
     AND (state IN ('pending', 'active') \
          OR (state IN ('expired', 'revoked') \
              AND (body::jsonb -> 'review_required') = 'true'::jsonb \
              AND COALESCE(body::jsonb -> 'review', 'null'::jsonb) = 'null'::jsonb)) \
     ORDER BY created_at, id LIMIT $2";

async fn apply_op(
    tx: &deadpool_postgres::Transaction<'_>,
    op: &Op,
    now: Timestamp,
    head: &mut (u64, Hash),
) -> Result<Committed, StoreError> {
    match op {
        Op::Create(t) => create_op(tx, t, now, head).await,
        Op::CreateEmergency(t, seen) => {
            // INVARIANT: the requester's emergency requests are read under
            // the chain head lock this transaction holds, so no other
            // commit (on any node) changes them before this one commits.
            let rows = tx
                .query(
                    EMERGENCY_ROWS,
                    &[&t.request.requester, &i64::from(EMERGENCY_REQUESTS_MAX)],
                )
                .await
                .map_err(pg_err)?;
            let same = rows.len() == seen.len()
                && rows.iter().zip(seen).all(|(r, (sid, sv))| {
                    r.get::<_, String>(0) == *sid && r.get::<_, i64>(1) as u64 == *sv
                });
            if !same {
                return Err(StoreError::Conflict {
                    id: t.request.id.clone(),
                    expected: 0,
                });
            }
            create_op(tx, t, now, head).await
        }
        Op::Apply(t) => {
            let r = &t.request;
            // INVARIANT: compare-and-set on version; every transition moves
            // the version on by one.
            if r.version != t.expected_version + 1 {
                return Err(StoreError::Corrupt(format!(
                    "transition of request {} from version {} to {} does not advance it by one",
                    r.id, t.expected_version, r.version
                )));
            }
            let stmt = tx
                .prepare_cached(
                    "UPDATE requests SET version = $1, state = $2, deadline = $3, body = $4 WHERE id = $5 AND version = $6",
                )
                .await
                .map_err(pg_err)?;
            let body = body_of(r)?;
            let (version, expected) = (r.version as i64, t.expected_version as i64);
            let deadline = r.deadline().map(Timestamp::millis);
            // One round trip: the events are sent with the compare-and-set
            // and rolled back with the job's savepoint if it lost.
            let (updated, events) = futures_util::future::join(
                tx.execute(
                    &stmt,
                    &[
                        &version,
                        &r.state.as_str(),
                        &deadline,
                        &body,
                        &r.id,
                        &expected,
                    ],
                ),
                insert_events(tx, &t.events, now, head),
            )
            .await;
            if updated.map_err(pg_err)? == 0 {
                return Err(StoreError::Conflict {
                    id: r.id.clone(),
                    expected: t.expected_version,
                });
            }
            events
        }
        Op::Credential(c, event, limit) => {
            let count = tx
                .prepare_cached("SELECT COUNT(*) FROM credentials WHERE request_id = $1")
                .await
                .map_err(pg_err)?;
            let issued: i64 = tx
                .query_one(&count, &[&c.request_id])
                .await
                .map_err(pg_err)?
                .get(0);
            if issued as u64 >= *limit {
                return Err(StoreError::Limit(format!(
                    "request {} already has {limit} credentials, the most one grant may have; reuse one of them",
                    c.request_id
                )));
            }
            let (stored, events) = futures_util::future::join(
                insert_credential(tx, c),
                insert_events(tx, std::slice::from_ref(event), now, head),
            )
            .await;
            stored?;
            events
        }
        Op::Append(events) => insert_events(tx, events, now, head).await,
        Op::Checkpoint(cp) => {
            tx.execute(
                "INSERT INTO checkpoints (seq, key, time, hash, signature, root) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    &(cp.seq as i64),
                    &cp.key.as_deref().unwrap_or(""),
                    &cp.time.millis(),
                    &&cp.hash[..],
                    &&cp.signature[..],
                    &cp.root.as_ref().map(|r| &r[..]),
                ],
            )
            .await
            .map_err(pg_err)?;
            Ok(Vec::new())
        }
    }
}

#[async_trait]
impl Store for PgStore {
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
        let rows = self
            .query("SELECT body FROM requests WHERE id = $1", &[&id])
            .await?;
        rows.first()
            .map(|r| parse_request(&r.get::<_, String>(0)))
            .transpose()
    }

    async fn list(&self, q: ListQuery) -> Result<Vec<Request>, StoreError> {
        let mut sql = String::from("SELECT body FROM requests WHERE TRUE");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |sql: &mut String, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&format!("${}", args.len()));
        };
        if let Some(s) = q.state {
            sql.push_str(" AND state = ");
            arg(&mut sql, Box::new(s.as_str().to_string()));
        }
        if let Some(r) = &q.requester {
            sql.push_str(" AND requester = ");
            arg(&mut sql, Box::new(r.clone()));
        }
        if let Some((name, groups)) = &q.visible_to {
            sql.push_str(" AND (requester = ");
            arg(&mut sql, Box::new(name.clone()));
            if !groups.is_empty() {
                sql.push_str(
                    " OR EXISTS (SELECT 1 FROM request_groups g WHERE g.request_id = requests.id AND g.grp = ANY(",
                );
                arg(&mut sql, Box::new(groups.clone()));
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
            sql.push_str(" AND id < ");
            arg(&mut sql, Box::new(a.clone()));
        }
        sql.push_str(" ORDER BY id DESC LIMIT ");
        arg(
            &mut sql,
            Box::new(i64::from(q.limit.clamp(1, PAGE_LEN_MAX))),
        );
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = self.query(&sql, &refs).await?;
        rows.iter()
            .map(|r| parse_request(&r.get::<_, String>(0)))
            .collect()
    }

    async fn emergency_requests(&self, requester: &str) -> Result<Vec<Request>, StoreError> {
        let rows = self
            .query(
                EMERGENCY_ROWS,
                &[&requester, &i64::from(EMERGENCY_REQUESTS_MAX)],
            )
            .await?;
        rows.iter()
            .map(|r| parse_request(&r.get::<_, String>(2)))
            .collect()
    }

    async fn unreviewed_grants(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError> {
        // The WHERE terms are the partial index's, so the index serves it.
        let rows = self
            .query(
                "SELECT body FROM requests WHERE state IN ('expired', 'revoked') AND (body::jsonb ->> 'review') IS NULL AND id > $1 ORDER BY id LIMIT $2",
                &[
                    &after.unwrap_or_default(),
                    &i64::from(limit.clamp(1, PAGE_LEN_MAX)),
                ],
            )
            .await?;
        rows.iter()
            .map(|r| parse_request(&r.get::<_, String>(0)))
            .collect()
    }

    async fn requests_since(
        &self,
        since: Timestamp,
        after: Option<(Timestamp, String)>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError> {
        let (at, id) = after.unwrap_or((Timestamp(since.millis() - 1), String::new()));
        let rows = self
            .query(
                "SELECT body FROM requests WHERE created_at >= $1 AND (created_at, id) > ($2, $3) ORDER BY created_at, id LIMIT $4",
                &[
                    &since.millis(),
                    &at.millis(),
                    &id,
                    &i64::from(limit.clamp(1, SINCE_PAGE_LEN_MAX)),
                ],
            )
            .await?;
        rows.iter()
            .map(|r| parse_request(&r.get::<_, String>(0)))
            .collect()
    }

    async fn open_requests(&self) -> Result<Vec<Request>, StoreError> {
        let rows = self
            .query(
                "SELECT body FROM requests WHERE deadline IS NOT NULL ORDER BY deadline",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| parse_request(&r.get::<_, String>(0)))
            .collect()
    }

    async fn credential(&self, hash: Hash) -> Result<Option<CredentialRecord>, StoreError> {
        let rows = self
            .query(
                "SELECT hash, request_id, principal, target, role, expires_at, issued_at FROM credentials WHERE hash = $1",
                &[&&hash[..]],
            )
            .await?;
        rows.first()
            .map(|r| {
                Ok(CredentialRecord {
                    hash: hash_of(r.get(0))?,
                    request_id: r.get(1),
                    principal: r.get(2),
                    target: r.get(3),
                    role: r.get(4),
                    expires_at: Timestamp(r.get(5)),
                    issued_at: Timestamp(r.get(6)),
                })
            })
            .transpose()
    }

    async fn audit(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = self
            .query(
                "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&(after.min(i64::MAX as u64) as i64), &i64::from(limit.clamp(1, PAGE_LEN_MAX))],
            )
            .await?;
        rows.iter().map(row_to_event).collect()
    }

    async fn request_events(
        &self,
        request_id: &str,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = self
            .query(
                "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE request_id = $1 ORDER BY seq LIMIT $2",
                &[&request_id, &i64::from(limit.clamp(1, PAGE_LEN_MAX))],
            )
            .await?;
        rows.iter().map(row_to_event).collect()
    }

    async fn use_one_time_code(&self, principal: &str, step: u64) -> Result<bool, StoreError> {
        // One statement, atomic across nodes; it needs no chain head lock.
        let changed = self
            .client()
            .await?
            .execute(
                "INSERT INTO one_time_codes (principal, step) VALUES ($1, $2) \
                 ON CONFLICT (principal) DO UPDATE SET step = excluded.step \
                 WHERE one_time_codes.step < excluded.step",
                &[&principal, &(step as i64)],
            )
            .await
            .map_err(pg_err)?;
        Ok(changed == 1)
    }

    async fn claim_drill_run(&self, drill: &str, slot: u64) -> Result<bool, StoreError> {
        // One statement, atomic across nodes: the node whose row change
        // lands runs the slot, every other node sees 0 rows changed.
        let changed = self
            .client()
            .await?
            .execute(
                "INSERT INTO drill_runs (drill, slot) VALUES ($1, $2) \
                 ON CONFLICT (drill) DO UPDATE SET slot = excluded.slot \
                 WHERE drill_runs.slot < excluded.slot",
                &[&drill, &(slot as i64)],
            )
            .await
            .map_err(pg_err)?;
        Ok(changed == 1)
    }

    async fn drill_results(
        &self,
        since: Timestamp,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = self
            .query(
                "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE action = 'drill.completed' AND time >= $1 ORDER BY seq LIMIT $2",
                &[
                    &since.millis(),
                    &i64::from(limit.clamp(1, PAGE_LEN_MAX)),
                ],
            )
            .await?;
        rows.iter().map(row_to_event).collect()
    }

    async fn notify_cursors(&self) -> Result<Vec<NotifyCursor>, StoreError> {
        let rows = self
            .query(
                "SELECT sink, seq, updated_at, last_error, failed FROM notify_cursors ORDER BY sink",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| NotifyCursor {
                sink: r.get(0),
                seq: r.get::<_, i64>(1) as u64,
                updated_at: Timestamp(r.get(2)),
                last_error: r.get(3),
                failed: r.get::<_, i64>(4) as u64,
            })
            .collect())
    }

    async fn lease_notify_sink(
        &self,
        sink: &str,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        // One statement, atomic across nodes: the node whose update lands
        // holds the lease; the others see 0 rows changed.
        let changed = self
            .client()
            .await?
            .execute(
                "UPDATE notify_cursors SET holder = $2, held_until = $4 WHERE sink = $1 \
                 AND (holder IS NULL OR holder = $2 OR held_until IS NULL OR held_until < $3)",
                &[&sink, &holder, &now.millis(), &until.millis()],
            )
            .await
            .map_err(pg_err)?;
        Ok(changed == 1)
    }

    async fn set_notify_cursor(&self, c: NotifyCursor) -> Result<(), StoreError> {
        // One statement, atomic across nodes; it needs no chain head lock.
        // GREATEST: a node that delivered less never moves the cursor back.
        self.client()
            .await?
            .execute(
                "INSERT INTO notify_cursors (sink, seq, updated_at, last_error, failed) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sink) DO UPDATE SET \
                 seq = GREATEST(notify_cursors.seq, excluded.seq), \
                 updated_at = excluded.updated_at, last_error = excluded.last_error, \
                 failed = excluded.failed",
                &[
                    &c.sink,
                    &(c.seq as i64),
                    &c.updated_at.millis(),
                    &c.last_error,
                    &(c.failed as i64),
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn add_checkpoint(&self, cp: Checkpoint) -> Result<(), StoreError> {
        let time = cp.time;
        self.submit(Op::Checkpoint(cp), time).await.map(|_| ())
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = self
            .query(
                "SELECT seq, time, hash, signature, key, root FROM checkpoints ORDER BY seq, key",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let signature: [u8; 64] = r
                    .get::<_, Vec<u8>>(3)
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("signature is not 64 bytes".into()))?;
                let key: String = r.get(4);
                Ok(Checkpoint {
                    seq: r.get::<_, i64>(0) as u64,
                    time: Timestamp(r.get(1)),
                    hash: hash_of(r.get(2))?,
                    signature,
                    key: Some(key).filter(|k| !k.is_empty()),
                    root: r.get::<_, Option<Vec<u8>>>(5).map(hash_of).transpose()?,
                })
            })
            .collect()
    }

    async fn tree_nodes(&self, nodes: &[Subtree]) -> Result<Vec<Hash>, StoreError> {
        let client = self.client().await?;
        crate::tree::pg::read(&**client, nodes).await
    }

    fn head(&self) -> (u64, Hash) {
        self.shared.head()
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<AuditEvent>> {
        self.shared.events.subscribe()
    }

    fn feed_blind_for(&self) -> Duration {
        lock(&self.shared.fed_at).elapsed()
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        let rows = self
            .query("SELECT state, count(*) FROM requests GROUP BY state", &[])
            .await?;
        rows.iter()
            .map(|r| {
                let s: String = r.get(0);
                let n: i64 = r.get(1);
                let state = State::parse(&s)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown state {s:?}")))?;
                Ok((state, n as u64))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(url: &str) -> String {
        match parse_url(url) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tls_is_verified_or_not_asked_for() {
        let base = "postgres://u@127.0.0.1:5432/db";
        assert!(refusal(&format!("{base}?sslmode=require")).contains("verify-full"));
        assert!(refusal(&format!("{base}?sslmode=verify-ca")).contains("verify-full"));
        assert!(refusal("host=db sslmode=require").contains("verify-full"));
        assert!(refusal(&format!("{base}?sslmode=verify-full")).contains("needs sslrootcert"));
        assert!(refusal(&format!("{base}?sslrootcert=/ca.pem")).contains("only used with"));
        assert!(
            refusal(&format!(
                "{base}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
            ))
            .contains("/nonexistent/ca.pem")
        );
        let plain = parse_url(&format!("{base}?sslmode=disable&connect_timeout=3")).expect("plain");
        assert!(plain.tls.is_none());
        assert_eq!(
            plain.cfg.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        assert!(parse_url(base).expect("no sslmode").tls.is_none());
        assert!(parse_url("not a url").is_err());
    }
}
