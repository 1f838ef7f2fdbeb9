//! Connection slots shared by every listener (the HTTP API, the PostgreSQL
//! gateway), so that nobody can lock everyone out by opening idle sockets.
//!
//! One mechanism, three rules:
//! - **Per source.** At most `per_source_max` connections from one address
//!   (IPv6 counted per /64, which one host can fill on its own).
//! - **Reserve.** A connection starts *unauthenticated*. Unauthenticated
//!   connections hold at most `total_max - reserved` slots; the `reserved`
//!   rest only ever serves connections that have shown a valid credential
//!   ([`Slot::authenticate`]).
//! - **Oldest unauthenticated goes first.** When a new connection finds no
//!   slot, the unauthenticated connection that has waited longest is
//!   evicted to make room ([`Slot::evicted`] resolves for it). A flood of
//!   idle sockets therefore only delays a real client by the few
//!   milliseconds it needs to authenticate: to push it out, an attacker
//!   must open `total_max - reserved` connections in that time. A new
//!   connection is refused only when every slot belongs to an
//!   authenticated client.
//!
//! The deadline of unauthenticated connections is the listener's (it owns
//! the clock); this type only counts. No IO, no clock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// Connections at once, authenticated or not.
    pub total_max: usize,
    /// Slots only authenticated connections may use (less than `total_max`).
    pub reserved: usize,
    /// Connections at once from one source address (or IPv6 /64).
    pub per_source_max: usize,
}

impl SlotLimits {
    /// The limits of a listener; without a configured reserve, one slot in
    /// 16 is kept for authenticated connections.
    pub fn new(total_max: usize, reserved: Option<usize>, per_source_max: usize) -> SlotLimits {
        SlotLimits {
            total_max,
            reserved: reserved.unwrap_or(total_max / 16),
            per_source_max,
        }
    }

    /// Unauthenticated connections held at most.
    pub fn unauthenticated_max(&self) -> usize {
        self.total_max.saturating_sub(self.reserved).max(1)
    }
}

/// Why a new connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// Its source already holds `per_source_max` connections.
    Source { max: usize },
    /// Every slot belongs to an authenticated connection.
    Full { max: usize },
}

impl fmt::Display for SlotRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotRefusal::Source { max } => {
                write!(f, "{max} connections from this address are open already")
            }
            SlotRefusal::Full { max } => {
                write!(f, "all {max} connections are in use by signed-in clients")
            }
        }
    }
}

/// The slot table of one listener.
pub struct Slots {
    limits: SlotLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    authenticated: usize,
    /// Unauthenticated connections, oldest first (ids only grow).
    unauthenticated: BTreeMap<u64, Weak<Inner>>,
    per_source: HashMap<IpAddr, usize>,
}

/// Counts of the slots in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCounts {
    pub authenticated: usize,
    pub unauthenticated: usize,
}

impl Slots {
    pub fn new(limits: SlotLimits) -> Arc<Slots> {
        Arc::new(Slots {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    pub fn limits(&self) -> SlotLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counts(&self) -> SlotCounts {
        let s = self.lock();
        SlotCounts {
            authenticated: s.authenticated,
            unauthenticated: s.unauthenticated.len(),
        }
    }

    /// A slot for a new connection from `source`, evicting the oldest
    /// unauthenticated connection when there is no free one.
    pub fn open(self: &Arc<Self>, source: IpAddr) -> Result<Slot, SlotRefusal> {
        let key = source_key(source);
        // Dropped after the lock is released: it may be the last reference,
        // and dropping a slot takes the lock.
        let mut evicted = None;
        let mut s = self.lock();
        let from_source = s.per_source.get(&key).copied().unwrap_or(0);
        if from_source >= self.limits.per_source_max {
            return Err(SlotRefusal::Source {
                max: self.limits.per_source_max,
            });
        }
        let in_use = s.authenticated + s.unauthenticated.len();
        if s.unauthenticated.len() >= self.limits.unauthenticated_max()
            || in_use >= self.limits.total_max
        {
            // INVARIANT: only unauthenticated connections are ever evicted.
            let Some((_, oldest)) = s.unauthenticated.pop_first() else {
                return Err(SlotRefusal::Full {
                    max: self.limits.total_max,
                });
            };
            evicted = oldest.upgrade();
            if let Some(inner) = &evicted {
                inner.evict();
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        *s.per_source.entry(key).or_insert(0) += 1;
        let inner = Arc::new(Inner {
            slots: self.clone(),
            id,
            source: key,
            authenticated: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        s.unauthenticated.insert(id, Arc::downgrade(&inner));
        drop(s);
        drop(evicted);
        Ok(Slot { inner })
    }
}

/// IPv4 addresses count one by one, IPv6 ones by /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

struct Inner {
    slots: Arc<Slots>,
    id: u64,
    source: IpAddr,
    authenticated: AtomicBool,
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Inner {
    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut s = self.slots.lock();
        if self.authenticated.load(Ordering::SeqCst) {
            s.authenticated = s.authenticated.saturating_sub(1);
        } else {
            s.unauthenticated.remove(&self.id);
        }
        if let Some(n) = s.per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_source.remove(&self.source);
            }
        }
    }
}

/// One connection's slot; released when the last clone is dropped.
#[derive(Clone)]
pub struct Slot {
    inner: Arc<Inner>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("id", &self.inner.id)
            .field("authenticated", &self.is_authenticated())
            .finish()
    }
}

impl Slot {
    /// The connection showed a valid credential: it can no longer be
    /// evicted and may use the reserve. `false` when it was evicted first
    /// (the listener is closing it).
    pub fn authenticate(&self) -> bool {
        let inner = &self.inner;
        if inner.authenticated.load(Ordering::SeqCst) {
            return true;
        }
        let mut s = inner.slots.lock();
        if s.unauthenticated.remove(&inner.id).is_none() {
            return false;
        }
        s.authenticated += 1;
        inner.authenticated.store(true, Ordering::SeqCst);
        true
    }

    pub fn is_authenticated(&self) -> bool {
        self.inner.authenticated.load(Ordering::SeqCst)
    }

    pub fn is_evicted(&self) -> bool {
        self.inner.evicted.load(Ordering::SeqCst)
    }

    /// Ready once the slot was taken for a newer connection. Only the last
    /// task to poll is woken.
    pub fn poll_evicted(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_evicted() {
            return Poll::Ready(());
        }
        *self.inner.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // Evicted between the check and the registration: the waker may
        // have been taken already.
        if self.is_evicted() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves once the slot was taken for a newer connection.
    pub fn evicted(&self) -> Evicted<'_> {
        Evicted { slot: self }
    }
}

/// The future of [`Slot::evicted`].
pub struct Evicted<'a> {
    slot: &'a Slot,
}

impl Future for Evicted<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.slot.poll_evicted(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn per_source_cap_and_release() {
        let slots = Slots::new(SlotLimits {
            total_max: 10,
            reserved: 2,
            per_source_max: 2,
        });
        let a = slots.open(ip("10.0.0.1")).expect("first");
        let _b = slots.open(ip("10.0.0.1")).expect("second");
        assert_eq!(
            slots.open(ip("10.0.0.1")).err(),
            Some(SlotRefusal::Source { max: 2 })
        );
        // Another /64 is another source; the same /64 is not.
        let _c = slots.open(ip("2001:db8::1")).expect("v6");
        let _d = slots.open(ip("2001:db8::2")).expect("v6 same /64");
        assert!(slots.open(ip("2001:db8::3")).is_err());
        drop(a);
        slots.open(ip("10.0.0.1")).expect("released");
    }

    #[test]
    fn the_oldest_unauthenticated_is_evicted_never_an_authenticated_one() {
        let slots = Slots::new(SlotLimits {
            total_max: 4,
            reserved: 1,
            per_source_max: 100,
        });
        let signed_in = slots.open(ip("10.0.0.9")).expect("user");
        assert!(signed_in.authenticate());
        let idle: Vec<Slot> = (1..=3)
            .map(|i| slots.open(ip(&format!("10.0.0.{i}"))).expect("idle"))
            .collect();
        assert_eq!(
            slots.counts(),
            SlotCounts {
                authenticated: 1,
                unauthenticated: 3
            }
        );
        // Full: the oldest idle one makes room, not the signed-in one.
        let newcomer = slots.open(ip("10.0.0.5")).expect("newcomer");
        assert!(idle[0].is_evicted() && !idle[1].is_evicted());
        assert!(!idle[0].authenticate(), "an evicted slot cannot sign in");
        assert!(newcomer.authenticate());
        // Unauthenticated ones never exceed total - reserved.
        assert!(idle[1].authenticate());
        assert!(idle[2].authenticate());
        drop(idle);
        // Every slot signed in: a newcomer is refused.
        let more: Vec<Slot> = (0..2)
            .map(|_| slots.open(ip("10.0.0.6")).expect("more"))
            .collect();
        assert!(more.iter().all(Slot::authenticate));
        assert_eq!(
            slots.open(ip("10.0.0.7")).err(),
            Some(SlotRefusal::Full { max: 4 })
        );
    }

    #[test]
    fn unauthenticated_connections_leave_the_reserve_free() {
        let slots = Slots::new(SlotLimits {
            total_max: 3,
            reserved: 2,
            per_source_max: 100,
        });
        let a = slots.open(ip("10.0.0.1")).expect("a");
        let b = slots.open(ip("10.0.0.2")).expect("b");
        assert!(a.is_evicted(), "only one unauthenticated slot");
        assert!(b.authenticate());
        let c = slots.open(ip("10.0.0.3")).expect("c");
        assert!(c.authenticate());
        assert_eq!(slots.counts().authenticated, 2);
    }
}
