//! A weighted fair share of an upstream's concurrency slots
//! (`max_concurrent`) between tenants. While a slot is free and nobody
//! waits, a request takes one at once (two atomics, no lock). When the
//! upstream is full, requests wait; the next slot that frees goes to the
//! waiting tenant that has had the least of the slots relative to its
//! `weight` since it began waiting (start-time fair queueing: each waiting
//! request gets a start tag `max(now, its tenant's previous finish tag)`,
//! a finish tag `start + 1/weight`, and the smallest start tag is served
//! next; virtual time is the start tag last served). No credit for time
//! spent idle, no debt for slots used before a tenant began waiting; first
//! come, first served within a tenant. So a tenant with a hundred requests
//! waiting delays another tenant's one request by about one slot's
//! turnover, and two tenants that both keep requests waiting get slots in
//! the ratio of their weights.
//!
//! A shared gate (`FairGate::shared`) counts `max_concurrent` once for the
//! fleet: its slots are the fleet's slots this replica holds, which
//! `fleet_cap.rs` gets from and gives back to Redis; the fair order stays
//! this replica's own.
//!
//! Written by hand: tokio's semaphore is FIFO across all waiters, and no
//! maintained crate offers weighted fair queueing of permits.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, Notify};

use crate::http::error::GatewayError;
use crate::metrics::Metrics;
use crate::shared::Redis;

/// A fair share of one upstream's slots.
pub(crate) struct FairGate {
    capacity: usize,
    /// Slots in use (low 32 bits) and, for a shared gate, the fleet's
    /// slots this replica holds (high 32 bits): one atomic, so a slot is
    /// taken only within what is held, whatever the agent gives back at
    /// the same moment.
    counts: AtomicU64,
    /// Requests waiting (read without the lock by the fast paths).
    waiting: AtomicUsize,
    /// Waiting requests served, ever (the fleet's line reads it).
    served: AtomicU64,
    queue: Mutex<Queue>,
    /// The fleet's count, for a shared gate.
    fleet: Option<Arc<FleetLink>>,
}

/// What a shared gate reads of the fleet's count on its own paths, and how
/// it wakes the task that talks to Redis (`fleet_cap.rs`, which makes it).
pub(super) struct FleetLink {
    pub(super) redis: Arc<Redis>,
    /// Something for the agent: a request waits, or a slot is spare.
    pub(super) wake: Notify,
    /// The last answer said another replica waits for a slot.
    pub(super) contended: AtomicBool,
}

impl FleetLink {
    /// Whether the fleet's count is in use (else the gate decides alone).
    fn is_up(&self) -> bool {
        self.redis.is_up()
    }

    fn contended(&self) -> bool {
        self.contended.load(Ordering::Acquire)
    }

    fn wake(&self) {
        self.wake.notify_one();
    }
}

const IN_USE: u64 = 1;
const HELD: u64 = 1 << 32;

fn in_use(counts: u64) -> usize {
    (counts & (HELD - 1)) as usize
}

fn held(counts: u64) -> usize {
    (counts >> 32) as usize
}

/// What a slot may be taken within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rule {
    /// `capacity`, for a gate of this replica alone.
    Local,
    /// `capacity`, for a shared gate that decides alone (Redis
    /// unavailable): the slot is counted as held, so Redis learns of it
    /// once it answers.
    Capacity,
    /// The fleet's slots this replica holds.
    Held,
}

#[derive(Default)]
struct Queue {
    /// The start tag last served.
    now: f64,
    next_id: u64,
    flows: HashMap<Arc<str>, Flow>,
}

/// One tenant's waiting requests.
struct Flow {
    /// Finish tag of the last request queued.
    finish: f64,
    weight: f64,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    start: f64,
    grant: oneshot::Sender<Slot>,
}

/// One of an upstream's slots, freed when dropped.
pub(crate) struct Slot {
    gate: Arc<FairGate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.release();
    }
}

/// Who asks for a slot: a tenant's name and weight.
#[derive(Debug, Clone)]
pub(crate) struct Claimant {
    pub(crate) tenant: Arc<str>,
    pub(crate) weight: u32,
}

impl FairGate {
    /// A gate of this replica alone: `capacity` slots.
    pub(crate) fn new(capacity: usize) -> Arc<FairGate> {
        Self::build(capacity, None)
    }

    /// A gate; a shared one (`fleet`) is made by `FairGate::shared`
    /// (`fleet_cap.rs`).
    pub(super) fn build(capacity: usize, fleet: Option<Arc<FleetLink>>) -> Arc<FairGate> {
        Arc::new(FairGate {
            capacity,
            counts: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            queue: Mutex::new(Queue::default()),
            fleet,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a slot is free here and nobody waits for one (a hint for
    /// choosing between upstreams; taking one may still wait).
    pub(crate) fn has_free(&self) -> bool {
        if self.waiting.load(Ordering::Acquire) > 0 {
            return false;
        }
        let c = self.counts.load(Ordering::Acquire);
        match &self.fleet {
            // Counted for the fleet: free only within what this replica
            // holds, and while no other replica waits.
            Some(fleet) if fleet.is_up() => !fleet.contended() && held(c) > in_use(c),
            _ => in_use(c) < self.capacity,
        }
    }

    /// A slot for `who` (`None`: Sluice's own request, which waits as a
    /// tenant of its own, `-`): at once when one is free and nobody waits,
    /// else in the fair order, until `deadline` (then 504). A wait is
    /// observed per tenant, whichever way it ends.
    pub(crate) async fn take(
        self: &Arc<Self>,
        who: Option<&Claimant>,
        metrics: &Metrics,
        deadline: tokio::time::Instant,
    ) -> Result<Slot, GatewayError> {
        if let Some(slot) = self.try_take() {
            return Ok(slot);
        }
        let own;
        let who = match who {
            Some(who) => who,
            None => {
                own = Claimant {
                    tenant: Arc::from("-"),
                    weight: 1,
                };
                &own
            }
        };
        let tenant: &str = &who.tenant;
        let waiting = metrics.upstream_waiting.with_label_values(&[tenant]);
        waiting.inc();
        let started = Instant::now();
        let got = tokio::time::timeout_at(deadline, self.acquire(who)).await;
        waiting.dec();
        metrics
            .upstream_queue
            .with_label_values(&[tenant])
            .observe(started.elapsed().as_secs_f64());
        got.map_err(|_| GatewayError::UpstreamTimeout)
    }

    /// How a request or a freed slot may take a slot without the agent:
    /// `None` while another replica waits for the fleet's slots (a spare
    /// one goes back to the fleet's line then).
    fn own_rule(&self) -> Option<Rule> {
        match &self.fleet {
            None => Some(Rule::Local),
            Some(fleet) if !fleet.is_up() => Some(Rule::Capacity),
            Some(fleet) if fleet.contended() => None,
            Some(_) => Some(Rule::Held),
        }
    }

    /// Takes a free slot when nobody waits for one.
    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        if self.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        let rule = self.own_rule()?;
        self.take_free(rule).then(|| Slot {
            gate: Arc::clone(self),
        })
    }

    /// Counts one more slot in use, if `rule` leaves one free.
    fn take_free(&self, rule: Rule) -> bool {
        self.counts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                let (used, held) = (in_use(c), held(c));
                if used >= self.capacity {
                    return None;
                }
                match rule {
                    Rule::Local => Some(c + IN_USE),
                    Rule::Capacity if used < held => Some(c + IN_USE),
                    Rule::Capacity => Some(c + IN_USE + HELD),
                    Rule::Held => (used < held).then_some(c + IN_USE),
                }
            })
            .is_ok()
    }

    /// A slot for `who`: at once when one is free and nobody waits, else
    /// after the requests the fair order puts first. The caller bounds the
    /// wait (dropping the future gives the place up).
    async fn acquire(self: &Arc<Self>, who: &Claimant) -> Slot {
        if let Some(slot) = self.try_take() {
            return slot;
        }
        let (grant, granted) = oneshot::channel();
        let id = {
            let mut q = self.lock();
            q.next_id += 1;
            let id = q.next_id;
            let now = q.now;
            let weight = f64::from(who.weight.max(1));
            let flow = q.flows.entry(Arc::clone(&who.tenant)).or_insert(Flow {
                finish: now,
                weight,
                waiters: VecDeque::new(),
            });
            // A tenant that was not waiting starts at the present: no
            // credit for idle time, no debt from before.
            if flow.waiters.is_empty() {
                flow.finish = now;
            }
            flow.weight = weight;
            let start = flow.finish.max(now);
            flow.finish = start + 1.0 / weight;
            flow.waiters.push_back(Waiter { id, start, grant });
            self.waiting.fetch_add(1, Ordering::AcqRel);
            // A slot may have freed between the fast path and the queue.
            if let Some(rule) = self.own_rule() {
                self.dispatch(&mut q, rule);
            }
            id
        };
        if let Some(fleet) = &self.fleet {
            // The fleet's slots are the agent's to ask for.
            fleet.wake();
        }
        let mut cancel = Cancel {
            gate: self,
            tenant: &who.tenant,
            id,
            armed: true,
        };
        let slot = granted.await;
        cancel.armed = false;
        match slot {
            Ok(slot) => slot,
            // The gate never drops a waiter's sender without a slot while
            // the waiter waits; a closed channel cannot happen, but is no
            // reason to go without one.
            Err(_) => Box::pin(self.acquire(who)).await,
        }
    }

    /// Hands free slots to the waiters the fair order puts first.
    fn dispatch(self: &Arc<Self>, q: &mut Queue, rule: Rule) {
        while self.waiting.load(Ordering::Acquire) > 0 {
            let Some(tenant) = q
                .flows
                .iter()
                .filter_map(|(t, f)| f.waiters.front().map(|w| (t, w.start)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(t, _)| Arc::clone(t))
            else {
                return;
            };
            if !self.take_free(rule) {
                return;
            }
            let Some(flow) = q.flows.get_mut(&tenant) else {
                self.freed();
                return;
            };
            let Some(waiter) = flow.waiters.pop_front() else {
                self.freed();
                return;
            };
            if flow.waiters.is_empty() {
                q.flows.remove(&tenant);
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            q.now = q.now.max(waiter.start);
            let slot = Slot {
                gate: Arc::clone(self),
            };
            // A waiter that has just gone away gives the slot back (its
            // drop runs `release`, which needs the lock: not while held).
            match waiter.grant.send(slot) {
                Ok(()) => {
                    self.served.fetch_add(1, Ordering::Relaxed);
                }
                Err(slot) => {
                    std::mem::forget(slot);
                    self.freed();
                }
            }
        }
    }

    fn release(self: &Arc<Self>) {
        self.counts.fetch_sub(IN_USE, Ordering::AcqRel);
        if self.waiting.load(Ordering::Acquire) > 0 {
            if let Some(rule) = self.own_rule() {
                let mut q = self.lock();
                self.dispatch(&mut q, rule);
            }
        }
        if let Some(fleet) = &self.fleet {
            if self.spare() {
                fleet.wake();
            }
        }
    }

    /// One slot fewer in use, taken back before anyone had it.
    fn freed(&self) {
        self.counts.fetch_sub(IN_USE, Ordering::AcqRel);
        if let Some(fleet) = &self.fleet {
            fleet.wake();
        }
    }

    /// Requests waiting now.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Waiting requests served so far.
    pub(super) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Hands slots to waiters in the fair order, within `rule` (the agent:
    /// after Redis granted slots, or deciding alone).
    pub(super) fn hand_out(self: &Arc<Self>, rule: Rule) {
        let mut q = self.lock();
        self.dispatch(&mut q, rule);
    }

    /// Whether this replica holds a fleet slot that no request uses.
    pub(super) fn spare(&self) -> bool {
        let c = self.counts.load(Ordering::Acquire);
        held(c) > in_use(c)
    }

    /// Gives up the held slots no request uses; the slots held after.
    pub(super) fn shrink(&self) -> usize {
        let before = self
            .counts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                let used = in_use(c) as u64;
                (held(c) as u64 != used).then_some(used * HELD + used)
            })
            .unwrap_or_else(|c| c);
        in_use(before)
    }

    /// Redis granted `n` more slots.
    pub(super) fn add_held(&self, n: usize) {
        self.counts.fetch_add(n as u64 * HELD, Ordering::AcqRel);
    }
}

impl Drop for FairGate {
    fn drop(&mut self) {
        if let Some(fleet) = &self.fleet {
            // The agent ends, telling Redis this gate holds nothing.
            fleet.wake();
        }
    }
}

/// Takes a waiter out of the queue when its wait is given up (a timeout,
/// the client gone).
struct Cancel<'a> {
    gate: &'a Arc<FairGate>,
    tenant: &'a Arc<str>,
    id: u64,
    armed: bool,
}

impl Drop for Cancel<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut q = self.gate.lock();
        let Some(flow) = q.flows.get_mut(self.tenant) else {
            return;
        };
        let before = flow.waiters.len();
        flow.waiters.retain(|w| w.id != self.id);
        if flow.waiters.len() < before {
            self.gate.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        if flow.waiters.is_empty() {
            q.flows.remove(self.tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(tenant: &str, weight: u32) -> Claimant {
        Claimant {
            tenant: Arc::from(tenant),
            weight,
        }
    }

    /// The order in which requests queued in `arrivals` order (tenant,
    /// weight) are served, one slot, for the first `served` of them.
    async fn order(arrivals: &[(&str, u32)], served: usize) -> Vec<String> {
        let gate = FairGate::new(1);
        let held = gate.acquire(&who("holder", 1)).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, (tenant, weight)) in arrivals.iter().enumerate() {
            let (gate2, tx, c) = (Arc::clone(&gate), tx.clone(), who(tenant, *weight));
            tokio::spawn(async move {
                let slot = gate2.acquire(&c).await;
                let _ = tx.send((c.tenant.to_string(), slot));
            });
            // Queued in this order.
            while gate.waiting() <= i {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        let mut out = Vec::new();
        while out.len() < served {
            let (tenant, slot) = rx.recv().await.expect("served");
            out.push(tenant);
            drop(slot);
        }
        out
    }

    #[tokio::test]
    async fn one_request_waits_one_turn_behind_a_hundred() {
        let mut arrivals = vec![("batch", 1); 100];
        arrivals.push(("interactive", 1));
        let served = order(&arrivals, 5).await;
        let at = served.iter().position(|t| t == "interactive");
        assert!(at.is_some_and(|i| i <= 1), "{served:?}");
    }

    #[tokio::test]
    async fn backlogged_tenants_share_by_weight() {
        // Interleaved arrivals: FIFO would serve them 1:1.
        let arrivals: Vec<(&str, u32)> = (0..120)
            .map(|i| if i % 2 == 0 { ("a", 3) } else { ("b", 1) })
            .collect();
        let served = order(&arrivals, 40).await;
        let a = served.iter().filter(|t| *t == "a").count();
        assert!((28..=32).contains(&a), "{a} of 40: {served:?}");
    }

    #[test]
    fn a_shared_gate_takes_only_the_slots_it_holds() {
        let gate = FairGate::new(3);
        assert!(!gate.take_free(Rule::Held));
        gate.add_held(2);
        assert!(gate.take_free(Rule::Held));
        assert!(gate.spare());
        assert_eq!(gate.shrink(), 1, "the spare slot goes back");
        assert!(!gate.spare());
        assert!(!gate.take_free(Rule::Held));
        // Deciding alone, within capacity, a slot taken is counted as
        // held, so Redis learns of it.
        assert!(gate.take_free(Rule::Capacity));
        assert!(gate.take_free(Rule::Capacity));
        assert!(!gate.take_free(Rule::Capacity), "capacity");
        assert!(!gate.spare());
        assert_eq!(gate.shrink(), 3);
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_the_queue() {
        let gate = FairGate::new(1);
        let held = gate.acquire(&who("a", 1)).await;
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            gate.acquire(&who("b", 1)),
        )
        .await;
        assert!(gave_up.is_err());
        assert_eq!(gate.waiting(), 0);
        drop(held);
        let again = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            gate.acquire(&who("c", 1)),
        )
        .await;
        assert!(again.is_ok(), "the slot came back");
    }
}
