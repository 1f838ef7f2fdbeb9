//! Notifications (DESIGN §13): every `[[notify]]` sink follows the audit
//! feed from its own durable cursor (`Store::notify_cursors`), decides what
//! each event means for it, and delivers it with retries; after
//! `give_up_after` it writes `notify.failed` and moves on. Also the
//! `request.countersign_due` reminder and the admin API behind `breakglass
//! notify status` and `notify test`.
//!
//! Delivery is at-least-once: the cursor is saved after delivery (at most
//! every [`CURSOR_SAVE_INTERVAL_MS`]), so a crash redelivers the events
//! after the saved cursor, with the same `webhook-id` (the event's `seq`).
//! Each sink has its own task and one delivery in flight (a webhook with
//! `max_in_flight`: several, the cursor passing only finished batches); a
//! slow or dead sink delays only itself, never a transition (the feed is a
//! broadcast that never waits for its readers) and never another sink. A
//! sink that has caught up follows the feed without reading the log, and
//! what an event means (its request, the notice) is worked out once for
//! all sinks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::bail;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use breakglass_core::audit::AuditEvent;
use breakglass_core::{EventDraft, Request, State as ReqState, Timestamp};
use breakglass_notify::config::SINKS_MAX;
use breakglass_notify::deliver::backoff;
use breakglass_notify::notice::{self, Links, Notice, RequestView};
use breakglass_notify::{Attempt, Payload, Sink, SinkKind};
use breakglass_store::{NotifyCursor, Store};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::OnceCell;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use utoipa::ToSchema;

use crate::app::{App, AppError, now};
use crate::config::Config;
use crate::http::{ApiError, Auth};

/// A sink's cursor is written to the store at most this often while events
/// flow (and whenever the sink goes idle): a crash redelivers at most this
/// much, and cursor writes never compete with transitions for the writer.
pub const CURSOR_SAVE_INTERVAL_MS: u64 = 200;
/// Events read from the store per page when a sink catches up.
pub const CATCH_UP_PAGE_LEN: u32 = 256;
/// A node delivers a sink for this long (at least; twice the sink's
/// `timeout` when that is longer, so one hanging attempt cannot outlast
/// it) after taking or renewing its lease. If the node stops, another
/// takes over after at most that long, from the stored cursor: what was
/// delivered after the last save is delivered again, with the same
/// `webhook-id`.
pub const LEASE_MS: u64 = 6000;
/// The holder renews its lease this long after taking or renewing it.
const LEASE_RENEW_MS: u64 = 2000;
/// A node without the lease asks for it again this often.
const LEASE_RETRY_MS: u64 = 1000;
/// Consecutive events handled together at most (a syslog sink sends
/// them with one write).
const BATCH_LEN_MAX: usize = 64;
/// An idle sink re-reads the log this often even without a feed wake-up.
const IDLE_POLL_MS: u64 = 1000;
/// The longest error text kept in a cursor and in `notify.failed`.
pub const ERROR_LEN_MAX: usize = 300;
/// A countersignature reminder is sent this long before the deadline at
/// most; for short windows, a third of the window before it.
pub const COUNTERSIGN_WARNING_MAX_S: u64 = 300;
/// Checks `[[notify]]`, `slack_user` and `[integrations.slack]` without
/// reading secrets (`server.public_url` is checked with the console).
pub fn validate(config: &Config) -> anyhow::Result<()> {
    if config.notify.len() > SINKS_MAX {
        bail!("notify: more than {SINKS_MAX} sinks");
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, s) in config.notify.iter().enumerate() {
        let at = format!("notify[{i}]");
        s.validate(&at).map_err(|e| anyhow::anyhow!("{e}"))?;
        if !names.insert(s.name.as_str()) {
            bail!("{at}.name: duplicate sink name {:?}", s.name);
        }
        if s.interactive && config.integrations.slack.is_none() {
            bail!(
                "{at}.interactive: buttons need [integrations.slack] (the signing secret that checks their calls)"
            );
        }
    }
    crate::slack::validate(config)
}

/// What `GET /v1/notify/status` reports for one sink.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SinkStatus {
    pub name: String,
    pub kind: String,
    /// Every event up to this `seq` has been delivered or given up.
    pub cursor: u64,
    /// Events committed after the cursor.
    pub lag: u64,
    /// The newest delivery error, cleared by a success.
    pub last_error: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_delivered_at: Option<Timestamp>,
    /// Events given up (each has a `notify.failed` audit event).
    pub failed: u64,
    /// An event is being retried right now.
    pub retrying: bool,
    /// This node holds the sink's delivery lease: with several nodes on
    /// one store, one node at a time delivers each sink.
    pub delivering: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SinkStatusList {
    /// The newest `seq` of the audit log.
    pub head: u64,
    pub sinks: Vec<SinkStatus>,
}

/// The answer of one test delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TestResult {
    pub sink: String,
    pub delivered: bool,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

struct Runtime {
    sink: Arc<Sink>,
    status: Mutex<SinkStatus>,
}

impl Runtime {
    fn status(&self) -> std::sync::MutexGuard<'_, SinkStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one event means, worked out once for all sinks: its request
/// (read once from the store) and the notice built from it.
struct EventContext {
    req: Option<Request>,
    notice: Option<Notice>,
}

/// An event's context, once the first sink that needs it has built it.
type ContextCell = Arc<OnceCell<Arc<EventContext>>>;

/// Contexts of this many recent events are kept for the sinks that have
/// not reached them yet; a sink further behind works its own out.
const CONTEXTS_KEPT: usize = 1024;

/// The configured sinks, opened (secrets read) at start.
pub struct Notifier {
    sinks: Vec<Arc<Runtime>>,
    links: Links,
    /// Recent events' contexts by `seq`, oldest first; the first sink to
    /// need one builds it while the others wait for it.
    contexts: Mutex<VecDeque<(u64, ContextCell)>>,
    approvers: Approvers,
}

/// The configured principals who may approve, by group, worked out once
/// at start rather than by a scan of every principal per event.
#[derive(Default)]
struct Approvers {
    /// People (not services), in config order.
    names: Vec<String>,
    /// Group → indices into `names`, ascending.
    by_group: BTreeMap<String, Vec<usize>>,
}

impl Approvers {
    fn new(config: &Config) -> Approvers {
        let mut out = Approvers::default();
        for p in &config.principals {
            if p.kind == crate::config::PrincipalKind::Service {
                continue;
            }
            let i = out.names.len();
            out.names.push(p.name.clone());
            for g in &p.groups {
                let list = out.by_group.entry(g.clone()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        out
    }

    /// Everyone configured in one of `groups` (a request's approver
    /// groups) but `requester`, in config order. People of the identity
    /// provider are not listed by name: the payload's `approver_groups`
    /// names their groups.
    fn eligible(&self, groups: &[String], requester: &str) -> Vec<String> {
        let mut picked: Vec<usize> = groups
            .iter()
            .filter_map(|g| self.by_group.get(g))
            .flatten()
            .copied()
            .collect();
        picked.sort_unstable();
        picked.dedup();
        picked
            .into_iter()
            .map(|i| &self.names[i])
            .filter(|n| n.as_str() != requester)
            .cloned()
            .collect()
    }
}

fn cut(text: &str) -> String {
    text.chars().take(ERROR_LEN_MAX).collect()
}

impl Notifier {
    /// Opens every sink; an unreadable secret or CA file stops start-up
    /// with the key at fault.
    pub fn open(config: &Config) -> anyhow::Result<Notifier> {
        let mut sinks = Vec::new();
        for (i, s) in config.notify.iter().enumerate() {
            let sink = Sink::open(s.clone(), &format!("notify[{i}]"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sinks.push(Arc::new(Runtime {
                status: Mutex::new(SinkStatus {
                    name: s.name.clone(),
                    kind: s.kind.as_str().into(),
                    cursor: 0,
                    lag: 0,
                    last_error: None,
                    last_delivered_at: None,
                    failed: 0,
                    retrying: false,
                    delivering: false,
                }),
                sink: Arc::new(sink),
            }));
        }
        Ok(Notifier {
            sinks,
            links: Links {
                public_url: config.server.public_url.clone(),
            },
            contexts: Mutex::default(),
            approvers: Approvers::new(config),
        })
    }

    /// The context of `ev`, built by the first sink that asks.
    async fn context(&self, app: &App, ev: &AuditEvent) -> Arc<EventContext> {
        let cell = {
            let mut kept = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
            match kept.iter().rev().find(|(seq, _)| *seq == ev.seq) {
                Some((_, cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    if kept.len() >= CONTEXTS_KEPT {
                        kept.pop_front();
                    }
                    kept.push_back((ev.seq, cell.clone()));
                    cell
                }
            }
        };
        cell.get_or_init(|| async {
            let req = match &ev.request_id {
                Some(id) => match app.store.get(id).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(seq = ev.seq, error = %e, "cannot read the request of an event; sending without it");
                        None
                    }
                },
                None => None,
            };
            let view = req.as_ref().map(|r| RequestView::new(r, drill_label(r)));
            let approvers = req
                .as_ref()
                .map(|r| self.approvers.eligible(&r.approver_groups, &r.requester))
                .unwrap_or_default();
            let notice = notice::build(ev, view, approvers, &self.links);
            Arc::new(EventContext { req, notice })
        })
        .await
        .clone()
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    pub fn links(&self) -> &Links {
        &self.links
    }

    /// Loads (or creates, at the head of the log: a new sink starts with
    /// what happens from now on) every sink's cursor, then starts one task
    /// per sink and the countersignature reminder.
    pub async fn spawn(
        self: &Arc<Self>,
        app: &Arc<App>,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut out = Vec::new();
        if self.sinks.is_empty() {
            return Ok(out);
        }
        let store = app.store.clone();
        let cursors: BTreeMap<String, NotifyCursor> = store
            .notify_cursors()
            .await?
            .into_iter()
            .map(|c| (c.sink.clone(), c))
            .collect();
        let head = store.head().0;
        for rt in &self.sinks {
            let start = match cursors.get(rt.sink.name()) {
                Some(c) => {
                    let mut st = rt.status();
                    st.last_error = c.last_error.clone();
                    st.failed = c.failed;
                    c.seq
                }
                None => {
                    store
                        .set_notify_cursor(NotifyCursor {
                            sink: rt.sink.name().into(),
                            seq: head,
                            updated_at: now(),
                            last_error: None,
                            failed: 0,
                        })
                        .await?;
                    head
                }
            };
            rt.status().cursor = start;
            let feed = store.subscribe();
            out.push(tokio::spawn(run_sink(
                Arc::downgrade(app),
                self.clone(),
                rt.clone(),
                feed,
                start,
            )));
        }
        out.push(tokio::spawn(countersign_reminders(
            Arc::downgrade(app),
            store.subscribe(),
        )));
        Ok(out)
    }

    pub fn status(&self, head: u64) -> SinkStatusList {
        SinkStatusList {
            head,
            sinks: self
                .sinks
                .iter()
                .map(|rt| {
                    let mut st = rt.status().clone();
                    st.lag = head.saturating_sub(st.cursor);
                    st
                })
                .collect(),
        }
    }

    fn find(&self, name: &str) -> Option<&Arc<Runtime>> {
        self.sinks.iter().find(|rt| rt.sink.name() == name)
    }
}

/// The label of a request made by a drill, read in this one place.
pub(crate) fn drill_label(req: &Request) -> Option<String> {
    req.drill.clone()
}

/// Whether the request passes a sink's `target_groups` and `emergency`
/// filters.
fn passes_filters(app: &App, sink: &Sink, req: Option<&Request>) -> bool {
    let cfg = &sink.config;
    if cfg.target_groups.is_empty() && cfg.emergency.is_none() {
        return true;
    }
    let Some(req) = req else {
        // Events about no request pass only unfiltered sinks.
        return false;
    };
    if let Some(e) = cfg.emergency
        && req.emergency != e
    {
        return false;
    }
    if cfg.target_groups.is_empty() {
        return true;
    }
    app.config
        .target(&req.target)
        .is_some_and(|t| t.groups.iter().any(|g| cfg.target_groups.contains(g)))
}

/// A sink's delivery lease as this node holds it.
#[derive(Clone)]
struct Lease {
    node: String,
    /// Until when this node may deliver (by its own clock), if it holds it.
    until: Option<Instant>,
}

impl Lease {
    /// Takes in what a copy learnt while delivering: a loss wins (no
    /// delivery after it), else the later renewal.
    fn merge(&mut self, copy: &Lease) {
        self.until = match (self.until, copy.until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }

    /// Whether this node may deliver now: renews the lease when it runs
    /// low. A store error counts as not holding it (nobody delivers
    /// rather than two nodes at once).
    async fn hold(&mut self, store: &dyn Store, rt: &Runtime) -> bool {
        let now_i = Instant::now();
        let length = Duration::from_millis(LEASE_MS).max(rt.sink.config.timeout() * 2);
        if self
            .until
            .is_some_and(|u| u + Duration::from_millis(LEASE_RENEW_MS) > now_i + length)
        {
            return true;
        }
        let t = now();
        let until = Timestamp(t.0 + i64::try_from(length.as_millis()).unwrap_or(i64::MAX));
        let held = match store
            .lease_notify_sink(rt.sink.name(), &self.node, t, until)
            .await
        {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(sink = rt.sink.name(), error = %e, "cannot renew the delivery lease; pausing the sink");
                false
            }
        };
        // Counted from before the call, so this node stops first.
        self.until = held.then(|| now_i + length);
        rt.status().delivering = held;
        held
    }
}

async fn run_sink(
    app: Weak<App>,
    notifier: Arc<Notifier>,
    rt: Arc<Runtime>,
    mut feed: tokio::sync::broadcast::Receiver<Arc<AuditEvent>>,
    cursor: u64,
) {
    let Some(node) = app.upgrade().map(|a| a.node_id()) else {
        return;
    };
    let mut lease = Lease { node, until: None };
    let mut at = Cursor::new(cursor);
    loop {
        let Some(a) = app.upgrade() else { return };
        let store = a.store.clone();
        drop(a);
        let had = lease.until.is_some();
        if !lease.hold(store.as_ref(), &rt).await {
            tokio::time::sleep(Duration::from_millis(LEASE_RETRY_MS)).await;
            continue;
        }
        if !had {
            // Taken (over): go on from where the last holder saved.
            match store.notify_cursors().await {
                Ok(all) => {
                    if let Some(c) = all.iter().find(|c| c.sink == rt.sink.name()) {
                        at = Cursor::new(c.seq);
                        rt.status().cursor = c.seq;
                    }
                }
                Err(e) => {
                    tracing::warn!(sink = rt.sink.name(), error = %e, "cannot read the notification cursor; retrying");
                    lease.until = None;
                    tokio::time::sleep(Duration::from_millis(LEASE_RETRY_MS)).await;
                    continue;
                }
            }
        }
        let page = match store.audit(at.seq, CATCH_UP_PAGE_LEN).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sink = rt.sink.name(), error = %e, "cannot read the audit log; retrying");
                tokio::time::sleep(Duration::from_millis(IDLE_POLL_MS)).await;
                continue;
            }
        };
        let idle = page.is_empty();
        let page: Vec<Arc<AuditEvent>> = page.into_iter().map(Arc::new).collect();
        for batch in page.chunks(BATCH_LEN_MAX) {
            if !lease.hold(store.as_ref(), &rt).await
                || !process(&app, &notifier, &rt, &mut lease, batch).await
            {
                break;
            }
            at.passed(store.as_ref(), &rt, batch).await;
        }
        at.save(store.as_ref(), &rt).await;
        if !idle || lease.until.is_none() {
            continue;
        }
        // Caught up: follow the feed while it brings the next events (no
        // read of the log per event), taking what it already holds as one
        // batch; a gap, a lag, a quiet second or a lost lease sends the
        // sink back to the log (other nodes' events are only there).
        'follow: loop {
            let first = match tokio::time::timeout(Duration::from_millis(IDLE_POLL_MS), feed.recv())
                .await
            {
                Ok(Ok(ev)) if ev.seq <= at.seq => continue,
                Ok(Ok(ev)) if ev.seq == at.seq + 1 => ev,
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) | Err(_) => break,
                Ok(Err(RecvError::Closed)) => return,
            };
            let mut batch = vec![first];
            let mut gap = false;
            while batch.len() < BATCH_LEN_MAX {
                let last = batch.last().map_or(at.seq, |ev| ev.seq);
                match feed.try_recv() {
                    Ok(ev) if ev.seq <= last => {}
                    Ok(ev) if ev.seq == last + 1 => batch.push(ev),
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {
                        gap = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return,
                }
            }
            if !lease.hold(store.as_ref(), &rt).await
                || !process(&app, &notifier, &rt, &mut lease, &batch).await
            {
                break 'follow;
            }
            at.passed(store.as_ref(), &rt, &batch).await;
            if gap {
                break 'follow;
            }
        }
    }
}

/// Delivers consecutive events: one by one (a webhook sink with
/// `max_in_flight` several at once), except that a syslog sink
/// sends the frames of all of them with one write (a stream takes them
/// as they come; a write and a thread hand-off per event cost the node
/// more than the event). False when the lease was lost before all were
/// delivered or given up: the cursor must not pass them.
async fn process(
    app: &Weak<App>,
    notifier: &Notifier,
    rt: &Runtime,
    lease: &mut Lease,
    batch: &[Arc<AuditEvent>],
) -> bool {
    if rt.sink.config.kind != SinkKind::Syslog {
        // Up to `in_flight` events at once (1, the default: in order),
        // each with its own retries and its own copy of the lease, whose
        // renewal or loss is merged back as each finishes. The batch counts
        // as passed only when every event of it is delivered or given up,
        // so the cursor never passes an unfinished one.
        use futures_util::StreamExt;
        let in_flight = rt.sink.config.in_flight();
        let mut events = batch.iter();
        let mut pending = futures_util::stream::FuturesOrdered::new();
        let mut all = true;
        loop {
            while all
                && pending.len() < in_flight
                && let Some(ev) = events.next()
            {
                pending.push_back(deliver_one(app, notifier, rt, lease.clone(), ev));
            }
            let Some((done, copy)) = pending.next().await else {
                return all;
            };
            lease.merge(&copy);
            all &= done;
        }
    }
    let mut frames = Vec::new();
    let mut carried = Vec::new();
    for ev in batch {
        if let Some(Payload::Syslog(f)) = prepare(app, notifier, rt, ev).await {
            frames.extend_from_slice(&f);
            carried.push(ev.clone());
        }
    }
    carried.is_empty() || deliver(app, rt, lease, &carried, Payload::Syslog(frames)).await
}

/// What `ev` means for the sink, delivered with its own copy of the
/// lease; returns whether it passed, and the copy as delivery left it.
async fn deliver_one(
    app: &Weak<App>,
    notifier: &Notifier,
    rt: &Runtime,
    mut lease: Lease,
    ev: &Arc<AuditEvent>,
) -> (bool, Lease) {
    let done = match prepare(app, notifier, rt, ev).await {
        Some(payload) => deliver(app, rt, &mut lease, std::slice::from_ref(ev), payload).await,
        None => true,
    };
    (done, lease)
}

/// Where a sink stands: the last event it passed (delivered, given up on or
/// not meant for it), saved at most every `CURSOR_SAVE_INTERVAL_MS` while
/// it moves and at once when it stops.
struct Cursor {
    seq: u64,
    saved: u64,
    saved_at: Instant,
}

impl Cursor {
    fn new(seq: u64) -> Cursor {
        Cursor {
            seq,
            saved: seq,
            saved_at: Instant::now(),
        }
    }

    /// The sink passed `batch`: moves on, and saves if the last save is old.
    async fn passed(&mut self, store: &dyn Store, rt: &Runtime, batch: &[Arc<AuditEvent>]) {
        self.seq = batch.last().map_or(self.seq, |ev| ev.seq);
        rt.status().cursor = self.seq;
        if self.saved_at.elapsed() >= Duration::from_millis(CURSOR_SAVE_INTERVAL_MS) {
            self.save(store, rt).await;
        }
    }

    /// Saves the cursor if it moved since the last save.
    async fn save(&mut self, store: &dyn Store, rt: &Runtime) {
        if self.saved != self.seq {
            save(store, rt, self.seq).await;
            (self.saved, self.saved_at) = (self.seq, Instant::now());
        }
    }
}

async fn save(store: &dyn Store, rt: &Runtime, seq: u64) {
    let (last_error, failed) = {
        let st = rt.status();
        (st.last_error.clone(), st.failed)
    };
    if let Err(e) = store
        .set_notify_cursor(NotifyCursor {
            sink: rt.sink.name().into(),
            seq,
            updated_at: now(),
            last_error,
            failed,
        })
        .await
    {
        // The next save writes it; meanwhile a crash only redelivers.
        tracing::warn!(sink = rt.sink.name(), error = %e, "cannot save the notification cursor");
    }
}

/// Decides what `ev` means for this sink: what to send it, if anything.
async fn prepare(
    app: &Weak<App>,
    notifier: &Notifier,
    rt: &Runtime,
    ev: &AuditEvent,
) -> Option<Payload> {
    let cfg = &rt.sink.config;
    // A sink is never told about its own failures: it could not take them.
    if ev.action == "notify.failed"
        && serde_json::from_str::<serde_json::Value>(&ev.details)
            .ok()
            .and_then(|d| d.get("sink").and_then(|s| s.as_str()).map(String::from))
            .as_deref()
            == Some(cfg.name.as_str())
    {
        return None;
    }
    let wants = cfg.wants_action(&ev.action);
    if !wants && !cfg.security {
        return None;
    }
    let a = app.upgrade()?;
    let filtered = !cfg.target_groups.is_empty() || cfg.emergency.is_some();
    // Syslog takes the event itself: it needs the request only to filter.
    let ctx = if cfg.kind != SinkKind::Syslog || filtered {
        Some(notifier.context(&a, ev).await)
    } else {
        None
    };
    let req = ctx.as_ref().and_then(|c| c.req.as_ref());
    let notice = ctx
        .as_ref()
        .filter(|_| cfg.kind != SinkKind::Syslog)
        .and_then(|c| c.notice.as_ref());
    let urgent = notice.is_some_and(|n| n.urgency == breakglass_notify::Urgency::High);
    // A security sink gets every urgent notice whatever its filters say.
    let pass = (wants && passes_filters(&a, &rt.sink, req)) || (cfg.security && urgent);
    if !pass {
        return None;
    }
    rt.sink.render(ev, notice)
}

/// Delivers `payload` (what `events` mean for the sink) with retries
/// until success, a refusal, or `give_up_after`; stops when the lease is
/// lost between attempts (the node that took it over delivers): false
/// then, true when delivered or given up.
async fn deliver(
    app: &Weak<App>,
    rt: &Runtime,
    lease: &mut Lease,
    events: &[Arc<AuditEvent>],
    payload: Payload,
) -> bool {
    let seq = events.last().map_or(0, |ev| ev.seq);
    let started = Instant::now();
    let give_up_after = rt.sink.config.give_up_after();
    let mut attempt: u32 = 0;
    let payload = Arc::new(payload);
    loop {
        let result = send_once(rt, &payload).await;
        match result {
            Attempt::Delivered { .. } => {
                let mut st = rt.status();
                st.last_error = None;
                st.last_delivered_at = Some(now());
                st.retrying = false;
                return true;
            }
            Attempt::Fail { why } => {
                give_up(app, rt, events, attempt + 1, &why).await;
                return true;
            }
            Attempt::Retry { why, after } => {
                let wait = backoff(attempt, rand::thread_rng().r#gen::<f64>(), after);
                {
                    let mut st = rt.status();
                    st.last_error = Some(cut(&why));
                    st.retrying = true;
                }
                tracing::info!(sink = rt.sink.name(), seq, attempt = attempt + 1, error = %why, "notification not delivered; retrying");
                if started.elapsed() + wait >= give_up_after {
                    give_up(app, rt, events, attempt + 1, &why).await;
                    return true;
                }
                // The wait keeps the lease, so a dead sink stays with one
                // node instead of moving between them.
                let resume = Instant::now() + wait;
                loop {
                    let left = resume.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    tokio::time::sleep(left.min(Duration::from_millis(LEASE_RENEW_MS))).await;
                    let Some(a) = app.upgrade() else {
                        return false;
                    };
                    let store = a.store.clone();
                    drop(a);
                    if !lease.hold(store.as_ref(), rt).await {
                        rt.status().retrying = false;
                        return false;
                    }
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// One attempt, stamped now.
async fn send_once(rt: &Runtime, payload: &Arc<Payload>) -> Attempt {
    rt.sink.send(payload, now().millis() / 1000).await
}

/// Writes one `notify.failed` per event the sink could not be given.
async fn give_up(
    app: &Weak<App>,
    rt: &Runtime,
    events: &[Arc<AuditEvent>],
    attempts: u32,
    why: &str,
) {
    {
        let mut st = rt.status();
        st.failed += events.len() as u64;
        st.retrying = false;
        st.last_error = Some(cut(why));
    }
    let seqs = events.first().map(|f| f.seq)..=events.last().map(|l| l.seq);
    tracing::error!(sink = rt.sink.name(), ?seqs, attempts, error = %why, "notification given up");
    let Some(a) = app.upgrade() else { return };
    let drafts = events
        .iter()
        .map(|ev| EventDraft {
            actor: "system".into(),
            action: "notify.failed".into(),
            request_id: None,
            details: json!({
                "sink": rt.sink.name(),
                "kind": rt.sink.config.kind.as_str(),
                "seq": ev.seq,
                "action": ev.action,
                "event_request_id": ev.request_id,
                "attempts": attempts,
                "error": cut(why),
            }),
        })
        .collect();
    if let Err(e) = a.store.append(drafts, now()).await {
        tracing::error!(sink = rt.sink.name(), ?seqs, error = %e, "cannot write notify.failed");
    }
}

/// Watches emergency grants that wait for a countersignature and writes
/// `request.countersign_due` before the deadline (see
/// [`countersign_warning_ms`]), once per grant.
async fn countersign_reminders(
    app: Weak<App>,
    mut feed: tokio::sync::broadcast::Receiver<Arc<AuditEvent>>,
) {
    let mut due: BTreeMap<String, Timestamp> = BTreeMap::new();
    let mut reseed = true;
    loop {
        let Some(a) = app.upgrade() else { return };
        if reseed {
            match a.store.open_requests().await {
                Ok(open) => {
                    due = open
                        .iter()
                        .filter_map(|r| reminder_at(r).map(|t| (r.id.clone(), t)))
                        .collect();
                    reseed = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read open requests for countersignature reminders")
                }
            }
        }
        let t = now();
        let ready: Vec<String> = due
            .iter()
            .filter(|(_, at)| **at <= t)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            due.remove(&id);
            remind(&a, &id).await;
        }
        let wait = due
            .values()
            .min()
            .map(|at| {
                Duration::from_millis(at.millis().saturating_sub(now().millis()).max(0) as u64)
            })
            .unwrap_or(Duration::from_secs(60))
            .min(Duration::from_secs(60));
        drop(a);
        match tokio::time::timeout(wait, feed.recv()).await {
            Ok(Ok(ev)) => {
                let Some(id) = &ev.request_id else { continue };
                match ev.action.as_str() {
                    "request.activated" => {
                        if let Some(a) = app.upgrade()
                            && let Ok(Some(r)) = a.store.get(id).await
                            && let Some(at) = reminder_at(&r)
                        {
                            due.insert(id.clone(), at);
                        }
                    }
                    "request.countersigned" | "request.revoked" | "request.expired" => {
                        due.remove(id);
                    }
                    _ => {}
                }
            }
            Ok(Err(RecvError::Lagged(_))) => reseed = true,
            Ok(Err(RecvError::Closed)) => return,
            Err(_) => {}
        }
    }
}

/// How long before its countersignature deadline a grant's approvers are
/// reminded, in milliseconds: [`COUNTERSIGN_WARNING_MAX_S`] (5 minutes),
/// or a third of the window for windows shorter than 15 minutes.
pub fn countersign_warning_ms(window_ms: u64) -> u64 {
    (COUNTERSIGN_WARNING_MAX_S * 1000).min(window_ms / 3)
}

fn reminder_at(r: &Request) -> Option<Timestamp> {
    if r.state != ReqState::Active || r.countersignature.is_some() {
        return None;
    }
    let by = r.countersign_by?;
    let from = r.activated_at?;
    let window_ms = (by.millis() - from.millis()).max(0) as u64;
    Some(Timestamp(
        by.millis() - countersign_warning_ms(window_ms) as i64,
    ))
}

async fn remind(app: &App, id: &str) {
    let Ok(Some(r)) = app.store.get(id).await else {
        return;
    };
    let t = now();
    let Some(by) = r.countersign_by else { return };
    if r.state != ReqState::Active || r.countersignature.is_some() || by <= t {
        return;
    }
    // Once per grant, across restarts.
    if let Ok(events) = app
        .store
        .request_events(id, breakglass_store::PAGE_LEN_MAX)
        .await
        && events.iter().any(|e| e.action == "request.countersign_due")
    {
        return;
    }
    let draft = EventDraft {
        actor: "system".into(),
        action: "request.countersign_due".into(),
        request_id: Some(id.into()),
        details: json!({
            "countersign_by": by.to_rfc3339(),
            "seconds_left": (by.millis() - t.millis()) / 1000,
        }),
    };
    if let Err(e) = app.store.append(vec![draft], t).await {
        tracing::warn!(request = id, error = %e, "cannot write request.countersign_due");
    }
}

fn require_admin(who: &breakglass_core::Principal) -> Result<(), ApiError> {
    if who.admin {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} is not an admin: notification sinks are for members of server.admin_groups",
                who.name
            ),
        ))
    }
}

fn notifier(app: &App) -> Result<&Arc<Notifier>, ApiError> {
    app.notifier.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "notifications are not running (the audit chain is broken or the service is starting)",
        )
    })
}

/// Each sink's cursor, lag and last error (admins only).
#[utoipa::path(get, path = "/v1/notify/status",
    responses((status = 200, body = SinkStatusList), (status = 401, body = crate::dto::Problem),
              (status = 403, body = crate::dto::Problem)),
    security(("bearer" = [])))]
pub async fn notify_status(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
) -> Result<Json<SinkStatusList>, ApiError> {
    require_admin(&who)?;
    let n = notifier(&app)?;
    Ok(Json(n.status(app.store.head().0)))
}

/// Sends one `notify.test` message to a sink now, once, and reports its
/// answer (admins only). Audited as `notify.tested`.
#[utoipa::path(post, path = "/v1/notify/{sink}/test",
    params(("sink" = String, Path, description = "The sink's name")),
    responses((status = 200, body = TestResult), (status = 401, body = crate::dto::Problem),
              (status = 403, body = crate::dto::Problem), (status = 404, body = crate::dto::Problem)),
    security(("bearer" = [])))]
pub async fn notify_test(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
    Path(sink): Path<String>,
) -> Result<Json<TestResult>, ApiError> {
    require_admin(&who)?;
    let n = notifier(&app)?;
    let Some(rt) = n.find(&sink) else {
        let names: Vec<&str> = n.sinks.iter().map(|r| r.sink.name()).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no sink named {sink:?} (configured: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ),
        ));
    };
    let t = now();
    let ev = AuditEvent {
        seq: 0,
        time: t,
        actor: who.name.clone(),
        action: "notify.test".into(),
        request_id: None,
        details: json!({"sink": sink}).to_string(),
        hash: [0; 32],
    };
    let notice = notice::build(&ev, None, Vec::new(), &n.links);
    let mut payload = rt.sink.render(&ev, notice.as_ref());
    if let Some(Payload::Http { id, .. }) = payload.as_mut() {
        *id = format!("test-{}", t.millis());
    }
    let started = Instant::now();
    let result = match &payload {
        Some(p) => send_once(rt, &Arc::new(p.clone())).await,
        None => Attempt::Fail {
            why: "this sink sends nothing for a test event".into(),
        },
    };
    let out = TestResult {
        sink: sink.clone(),
        delivered: matches!(result, Attempt::Delivered { .. }),
        status: match &result {
            Attempt::Delivered { status } if *status != 0 => Some(*status),
            Attempt::Retry { why, .. } | Attempt::Fail { why } => {
                why.strip_prefix("HTTP ").and_then(|s| s.parse().ok())
            }
            _ => None,
        },
        error: match &result {
            Attempt::Delivered { .. } => None,
            Attempt::Retry { why, .. } | Attempt::Fail { why } => Some(cut(why)),
        },
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    app.store
        .append(
            vec![EventDraft {
                actor: who.name.clone(),
                action: "notify.tested".into(),
                request_id: None,
                details: json!({
                    "sink": sink,
                    "delivered": out.delivered,
                    "error": out.error,
                    "auth_method": who.authn.method.as_str(),
                }),
            }],
            t,
        )
        .await
        .map_err(AppError::from)?;
    Ok(Json(out))
}

/// The routes of this module.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/notify/status", get(notify_status))
        .route("/v1/notify/{sink}/test", post(notify_test))
}

/// Checkpoints queued for one webhook witness at most; beyond that the
/// newest is dropped (logged): each checkpoint covers all before it, and
/// the file witness and the store keep every one.
pub const WITNESS_QUEUE_LEN_MAX: usize = 1024;

/// A `[[notify]]` webhook with `witness = true`: every signed checkpoint is
/// posted to it (`type` `audit.checkpoint`, `webhook-id`
/// `checkpoint-<seq>-<key>`), in order, from its own thread with the
/// sink's retries, so a slow receiver never holds the checkpoint timer. It
/// only receives, so verification does not read it back.
pub struct WebhookWitness {
    name: String,
    queue: std::sync::mpsc::SyncSender<breakglass_core::audit::Checkpoint>,
}

/// The webhook witnesses the config names. A sink whose secret cannot be
/// read is left out (start-up has refused such a config already; offline
/// verification never posts).
pub fn webhook_witnesses(config: &Config) -> Vec<Box<dyn crate::checkpoint::Witness>> {
    let mut out: Vec<Box<dyn crate::checkpoint::Witness>> = Vec::new();
    for (i, s) in config.notify.iter().enumerate() {
        if !s.witness || s.kind != SinkKind::Webhook {
            continue;
        }
        let Ok(sink) = Sink::open(s.clone(), &format!("notify[{i}]")) else {
            continue;
        };
        let (queue, rx) = std::sync::mpsc::sync_channel(WITNESS_QUEUE_LEN_MAX);
        let name = s.name.clone();
        let sink = Arc::new(sink);
        std::thread::spawn(move || post_checkpoints(&sink, &rx));
        out.push(Box::new(WebhookWitness { name, queue }));
    }
    out
}

/// The witness's own thread: posts each checkpoint in turn, with retries,
/// on a runtime of its own (checkpoints are written by the store's thread,
/// outside the server's runtime).
fn post_checkpoints(
    sink: &Arc<Sink>,
    rx: &std::sync::mpsc::Receiver<breakglass_core::audit::Checkpoint>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(sink = sink.name(), error = %e, "cannot start the checkpoint witness");
            return;
        }
    };
    while let Ok(cp) = rx.recv() {
        let body = json!({"type": "audit.checkpoint", "checkpoint": cp}).to_string();
        let payload = Arc::new(Payload::Http {
            id: format!(
                "checkpoint-{}-{}",
                cp.seq,
                cp.key
                    .as_deref()
                    .unwrap_or("")
                    .chars()
                    .take(16)
                    .collect::<String>()
            ),
            body: body.into_bytes(),
        });
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            match runtime.block_on(sink.send(&payload, now().millis() / 1000)) {
                Attempt::Delivered { .. } => break,
                Attempt::Fail { why } => {
                    tracing::error!(sink = sink.name(), seq = cp.seq, error = %why, "checkpoint witness refused a checkpoint");
                    break;
                }
                Attempt::Retry { why, after } => {
                    let wait = backoff(attempt, rand::thread_rng().r#gen::<f64>(), after);
                    if started.elapsed() + wait >= sink.config.give_up_after() {
                        tracing::error!(sink = sink.name(), seq = cp.seq, error = %why, "checkpoint witness given up");
                        break;
                    }
                    std::thread::sleep(wait);
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
}

impl crate::checkpoint::Witness for WebhookWitness {
    fn name(&self) -> String {
        format!("webhook witness {}", self.name)
    }

    fn record(&self, cp: &breakglass_core::audit::Checkpoint) -> Result<(), String> {
        self.queue
            .try_send(cp.clone())
            .map_err(|_| "its queue is full (the receiver is not keeping up)".to_string())
    }

    fn read(&self) -> Result<Option<Vec<breakglass_core::audit::Checkpoint>>, String> {
        Err("a webhook witness cannot be read back; its receiver keeps the checkpoints".into())
    }

    fn readable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligible_approvers_are_the_people_of_the_groups_but_the_requester() {
        let mut text = String::from("[server]\ndata_dir = \"d\"\n[policy]\nfile = \"p.cedar\"\n");
        for (i, (name, kind, groups)) in [
            ("ann", "human", "\"leads\", \"sre\""),
            ("bob", "human", "\"sre\""),
            ("ci", "service", "\"leads\""),
            ("cy", "human", "\"dba\", \"leads\""),
            ("dee", "human", ""),
        ]
        .into_iter()
        .enumerate()
        {
            text.push_str(&format!(
                "[[principals]]\nname = \"{name}\"\nkind = \"{kind}\"\ngroups = [{groups}]\ntoken_sha256 = \"{i:064x}\"\n"
            ));
        }
        let config =
            Config::parse(&text, "test.toml", std::path::Path::new("/etc/bg")).expect("config");
        let a = Approvers::new(&config);
        let groups = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Config order, once each, never a service, never the requester.
        assert_eq!(
            a.eligible(&groups(&["sre", "leads"]), "dee"),
            ["ann", "bob", "cy"]
        );
        assert_eq!(a.eligible(&groups(&["leads"]), "ann"), ["cy"]);
        assert_eq!(
            a.eligible(&groups(&["nobody"]), "ann"),
            Vec::<String>::new()
        );
        assert_eq!(a.eligible(&[], "ann"), Vec::<String>::new());
    }

    #[test]
    fn a_lease_copy_brings_back_its_loss_or_its_renewal() {
        let t = Instant::now();
        let held = |until: Option<Instant>| Lease {
            node: "n".into(),
            until,
        };
        let later = t + Duration::from_secs(6);
        let mut l = held(Some(t));
        l.merge(&held(Some(t)));
        assert_eq!(l.until, Some(t), "a copy that did nothing changes nothing");
        l.merge(&held(Some(later)));
        assert_eq!(l.until, Some(later), "a renewal is kept");
        l.merge(&held(Some(t)));
        assert_eq!(l.until, Some(later), "an older copy does not undo it");
        l.merge(&held(None));
        assert_eq!(l.until, None, "a loss wins");
        l.merge(&held(Some(later)));
        assert_eq!(l.until, None, "and stays lost until renewed by the sink");
    }
}
