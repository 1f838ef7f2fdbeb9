//! The deadline scheduler: ends grants at `expires_at`, revokes emergency
//! grants nobody countersigned, times out pending requests.
//!
//! It keeps one timer on the earliest deadline (not a periodic sweep), so a
//! grant ends within milliseconds of `expires_at`. Everything due at once is
//! ticked concurrently, so the store commits them in one group.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use breakglass_core::Request;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::app::{App, AppError, now};

/// Due requests ticked concurrently at most; the rest wait for the next round.
const TICKS_IN_FLIGHT_MAX: usize = 2048;

/// What [`Scheduler::recover`] ended at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Requests past a deadline.
    pub overdue_ended: usize,
    /// Open requests of principals that are no longer known.
    pub offboarded: usize,
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<(i64, String)>>,
    /// The current deadline of each tracked request; heap entries that do
    /// not match are stale and skipped.
    deadlines: HashMap<String, i64>,
}

struct Inner {
    app: Weak<App>,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    pub(crate) fn new(app: Weak<App>) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                app,
                queue: Mutex::new(Queue::default()),
                wake: Notify::new(),
            }),
        }
    }

    /// Follows a request's deadline after any change to it.
    pub fn track(&self, req: &Request) {
        let mut q = lock(&self.inner.queue);
        match req.deadline() {
            Some(d) => {
                let d = d.millis();
                if q.deadlines.get(&req.id) == Some(&d) {
                    return;
                }
                let earliest = q.heap.peek().map(|Reverse((t, _))| *t);
                q.deadlines.insert(req.id.clone(), d);
                q.heap.push(Reverse((d, req.id.clone())));
                if earliest.is_none_or(|e| d < e) {
                    self.inner.wake.notify_one();
                }
            }
            None => {
                q.deadlines.remove(&req.id);
            }
        }
    }

    /// Number of requests with a pending deadline.
    pub fn tracked(&self) -> usize {
        lock(&self.inner.queue).deadlines.len()
    }

    /// Loads every open request, ends the overdue ones, then ends the open
    /// requests of principals the service no longer knows (`revoked` or
    /// `cancelled`, reason `principal_removed`). Called before the API
    /// serves anything, so no grant is active past `expires_at`, or in the
    /// hands of a removed principal, after a crash or restart.
    pub async fn recover(&self) -> Result<Recovered, AppError> {
        let Some(app) = self.inner.app.upgrade() else {
            return Ok(Recovered::default());
        };
        for req in app.store.open_requests().await? {
            self.track(&req);
        }
        let mut ended = 0;
        loop {
            let n = self.run_due().await?;
            if n == 0 {
                break;
            }
            ended += n;
        }
        let mut offboarded = 0;
        for req in app.store.open_requests().await? {
            if app.knows_principal(&req.requester) {
                continue;
            }
            if let Some(r) = app.offboard(&req.id).await? {
                tracing::warn!(
                    request = %r.id,
                    requester = %r.requester,
                    state = %r.state,
                    "ended a request of a principal that is no longer configured"
                );
                offboarded += 1;
            }
        }
        Ok(Recovered {
            overdue_ended: ended,
            offboarded,
        })
    }

    fn take_due(&self, now_ms: i64) -> Vec<String> {
        let mut q = lock(&self.inner.queue);
        let mut due = Vec::new();
        while due.len() < TICKS_IN_FLIGHT_MAX {
            let Some(Reverse((t, _))) = q.heap.peek() else {
                break;
            };
            if *t > now_ms {
                break;
            }
            let Some(Reverse((t, id))) = q.heap.pop() else {
                break;
            };
            if q.deadlines.get(&id) == Some(&t) {
                q.deadlines.remove(&id);
                due.push(id);
            }
        }
        due
    }

    /// Ticks every request due now; returns how many were ticked.
    async fn run_due(&self) -> Result<usize, AppError> {
        let Some(app) = self.inner.app.upgrade() else {
            return Ok(0);
        };
        let due = self.take_due(now().millis());
        let n = due.len();
        let mut set = JoinSet::new();
        for id in due {
            let app = app.clone();
            set.spawn(async move { (app.tick(&id).await, id) });
        }
        let mut first_err = None;
        while let Some(res) = set.join_next().await {
            match res {
                Ok((Ok(_), _)) => {}
                Ok((Err(e), id)) => {
                    tracing::error!(request = %id, error = %e, "could not apply deadline; retrying");
                    // Put it back so it is retried rather than forgotten.
                    if let Ok(Some(req)) = app.store.get(&id).await {
                        self.track(&req);
                    }
                    first_err.get_or_insert(e);
                }
                Err(e) => tracing::error!(error = %e, "deadline task failed"),
            }
        }
        // Any failure is retried after the caller's back-off: the failed
        // requests are tracked again with their (past) deadline, so
        // answering Ok here would spin on a store that keeps failing.
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// With a store other nodes write to: follows the event feed `feed`
    /// (subscribed before [`Scheduler::recover`] read the open requests, so
    /// nothing falls between them) and tracks every request another node
    /// created or changed. Every node's scheduler then holds every
    /// deadline; whichever ticks first ends the request and the others'
    /// ticks lose the compare-and-set harmlessly, so a grant still ends on
    /// time when the node that created it is gone.
    pub fn spawn_follower(
        &self,
        mut feed: tokio::sync::broadcast::Receiver<Arc<breakglass_core::audit::AuditEvent>>,
    ) -> tokio::task::JoinHandle<()> {
        use tokio::sync::broadcast::error::RecvError;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let event = feed.recv().await;
                let Some(app) = this.inner.app.upgrade() else {
                    return;
                };
                match event {
                    Ok(e) => {
                        let Some(id) = e.request_id.as_deref() else {
                            continue;
                        };
                        match FeedEffect::of(&e.action) {
                            FeedEffect::None => continue,
                            FeedEffect::Ended => {
                                lock(&this.inner.queue).deadlines.remove(id);
                                continue;
                            }
                            FeedEffect::Deadline => {}
                        }
                        match app.store.get(id).await {
                            Ok(Some(req)) => this.track(&req),
                            Ok(None) => {}
                            Err(err) => {
                                tracing::warn!(request = %id, error = %err, "cannot read a request the feed announced; reloading every open request");
                                this.reload(&app).await;
                            }
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "the scheduler fell behind the event feed; reloading every open request"
                        );
                        this.reload(&app).await;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        })
    }

    /// Tracks every open request again, retrying until the store answers.
    async fn reload(&self, app: &App) {
        loop {
            match app.store.open_requests().await {
                Ok(reqs) => {
                    for r in &reqs {
                        self.track(r);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload open requests; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Runs the timer loop until the process ends.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let next = {
                    let q = lock(&this.inner.queue);
                    q.heap.peek().map(|Reverse((t, _))| *t)
                };
                let now_ms = now().millis();
                match next {
                    Some(t) if t <= now_ms => {
                        if let Err(e) = this.run_due().await {
                            tracing::error!(error = %e, "deadline processing failed; backing off");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    Some(t) => {
                        let wait = Duration::from_millis((t - now_ms) as u64);
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = this.inner.wake.notified() => {}
                        }
                    }
                    None => this.inner.wake.notified().await,
                }
                if this.inner.app.strong_count() == 0 {
                    return;
                }
            }
        })
    }
}

/// What a request event on the shared feed means for the scheduler.
#[derive(Debug, PartialEq, Eq)]
enum FeedEffect {
    /// The request may have a new deadline: read it and track it.
    Deadline,
    /// The request ended: it has no deadline any more.
    Ended,
    /// Nothing the scheduler holds changes (an approval that did not
    /// activate, a review, events of no request).
    None,
}

impl FeedEffect {
    fn of(action: &str) -> FeedEffect {
        match action {
            "request.created" | "request.activated" | "request.countersigned" => {
                FeedEffect::Deadline
            }
            "request.cancelled" | "request.denied" | "request.expired" | "request.revoked"
            | "request.timed_out" => FeedEffect::Ended,
            _ => FeedEffect::None,
        }
    }
}
