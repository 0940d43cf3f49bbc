//! One count of an upstream's `max_concurrent` for the whole fleet
//! (docs/redis.md, "An upstream's concurrency"): the Redis side of a
//! shared `FairGate` (made here, by `FairGate::shared`). It owns the
//! upstream's slot hash in Redis and the one task per gate (`agent`) that
//! alone talks to it; the gate's fair order, its waiters and its counts
//! stay in `fair.rs`, which does not know this module.
//!
//! A replica holds fleet slots only for its calls in flight. A slot that
//! frees while the replica's own requests wait goes to the next of them in
//! fair order without a round trip (unless another replica waits: then it
//! goes back, so no replica keeps the account's slots while others wait);
//! otherwise the agent gives it back. Requests that find no held slot free
//! wait in the gate's queue while the agent asks Redis for as many slots as
//! wait, one round trip at a time, again every `POLL` (with jitter) until
//! they are served or leave. Between replicas a free slot goes round the
//! waiting ones in turn: a replica whose requests were served (by Redis or
//! by its own slots) goes to the back of the fleet's line. Every call
//! states the replica's slots as a whole and renews its lease, so a call
//! that failed or timed out is made good by the next, and a replica that
//! died stops renewing: its slots lapse within `LEASE` (30 s). While Redis
//! is unavailable (or one round trip fails) the gate decides alone, within
//! the per-replica cap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::fair::{FairGate, FleetLink, Rule};
use crate::shared::{Lua, Op, Redis, Unavailable};

/// A holder's slots outlive its last call by this long: a replica that
/// died frees them within it.
const LEASE: Duration = Duration::from_secs(30);
/// How often a replica holding slots renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How often a replica whose requests wait asks again (with jitter, half
/// to one and a half times this).
const POLL: Duration = Duration::from_millis(50);
/// A replica's place in the fleet's line lasts this long unless it asks
/// again (a replica that stopped asking is not waited for).
const WANT_LASTS: Duration = Duration::from_secs(1);
/// How often a report Redis may not have applied is sent again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

impl FairGate {
    /// A gate whose `capacity` is one count for every replica that shares
    /// `redis` (docs/redis.md): `upstream` names the count. While Redis is
    /// unavailable it decides alone, within `capacity`.
    pub(crate) fn shared(capacity: usize, redis: &Arc<Redis>, upstream: &str) -> Arc<FairGate> {
        let link = Arc::new(FleetLink {
            redis: Arc::clone(redis),
            wake: Notify::new(),
            contended: AtomicBool::new(false),
        });
        let cap = FleetCap {
            script: redis.lua("upstream_slots", include_str!("lua/slots.lua")),
            key: format!("{}:{{upstream:{upstream}}}:slots", redis.key_prefix()),
            holder: format!("{}.{:08x}", redis.replica(), rand::random::<u32>()),
            link: Arc::clone(&link),
        };
        let gate = FairGate::build(capacity, Some(link));
        tokio::spawn(agent(Arc::downgrade(&gate), cap, capacity));
        gate
    }
}

/// The agent's side of a shared gate: the script and the names it writes.
struct FleetCap {
    script: Lua,
    /// `prefix:{upstream:<name>}:slots`.
    key: String,
    /// `<replica>.<gate>`: this gate's name in the hash.
    holder: String,
    link: Arc<FleetLink>,
}

/// SLOTS's reply, decoded (slots.lua says what each item is).
struct SlotsReply {
    granted: usize,
    others_waiting: usize,
    applied: bool,
}

impl redis::FromRedisValue for SlotsReply {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let (granted, others_waiting, applied) = <(u32, u32, u8)>::from_redis_value(v)?;
        Ok(SlotsReply {
            granted: granted as usize,
            others_waiting: others_waiting as usize,
            applied: applied == 1,
        })
    }
}

/// What the agent knows of its holder's entry in Redis.
struct Entry {
    version: u64,
    /// The slots Redis counts for this gate, as last applied.
    counted: usize,
    /// Redis may count something else (a call failed or was not applied).
    unsure: bool,
    /// Redis holds a want of this gate's.
    wanting: bool,
    /// The gate's count of requests served, at the last call.
    served: u64,
    renewed: Instant,
}

/// The gate's one task that talks to Redis. Ends when the gate is
/// dropped, after telling Redis it holds nothing.
async fn agent(gate: Weak<FairGate>, cap: FleetCap, capacity: usize) {
    let mut entry = Entry {
        version: 0,
        counted: 0,
        unsure: false,
        wanting: false,
        served: 0,
        renewed: Instant::now(),
    };
    loop {
        let pause = match gate.upgrade() {
            Some(gate) => round(&gate, &cap, capacity, &mut entry).await,
            None => {
                if entry.counted > 0 || entry.unsure || entry.wanting {
                    entry.version += 1;
                    let _ = send(&cap, &entry, 0, 0, capacity, false).await;
                }
                return;
            }
        };
        // A wake-up that came during the round is kept by `Notify`, so
        // this returns at once for it.
        let _ = tokio::time::timeout(pause, cap.link.wake.notified()).await;
    }
}

/// One look at the gate: hands slots to its waiters, tells Redis what
/// changed, and says how long until the next look (unless woken).
async fn round(
    gate: &Arc<FairGate>,
    cap: &FleetCap,
    capacity: usize,
    entry: &mut Entry,
) -> Duration {
    if !cap.link.redis.is_up() {
        // Redis is unavailable: the replica keeps the per-replica cap, and
        // what Redis counts is made good once it answers.
        if gate.waiting() > 0 {
            gate.hand_out(Rule::Capacity);
        }
        gate.shrink();
        entry.unsure = true;
        return if gate.waiting() > 0 {
            poll()
        } else {
            RETRY_EVERY
        };
    }
    // A spare slot goes to this replica's own waiters first, unless
    // another replica waits: then it goes back to the fleet's line.
    if gate.waiting() > 0 && !cap.link.contended.load(Ordering::Acquire) {
        gate.hand_out(Rule::Held);
    }
    let have = gate.shrink();
    let want = gate.waiting().min(capacity);
    let renew = (have > 0 || entry.counted > 0) && entry.renewed.elapsed() >= RENEW_EVERY;
    if want == 0 && !entry.wanting && !entry.unsure && have == entry.counted && !renew {
        if have == 0 {
            // Nothing held, nothing to say: until woken (or the check for
            // a dropped gate).
            return RENEW_EVERY;
        }
        return RENEW_EVERY
            .saturating_sub(entry.renewed.elapsed())
            .max(POLL);
    }
    entry.version += 1;
    // Served since the last call (its own slots going round count too):
    // to the back of the fleet's line.
    let served = gate.served();
    let was_served = std::mem::replace(&mut entry.served, served) != served;
    match send(cap, entry, have, want, capacity, was_served).await {
        Ok(reply) => {
            cap.link
                .contended
                .store(reply.others_waiting > 0, Ordering::Release);
            entry.unsure = !reply.applied;
            entry.renewed = Instant::now();
            if reply.applied {
                entry.counted = have + reply.granted;
                entry.wanting = want > reply.granted;
            }
            if reply.granted > 0 {
                gate.add_held(reply.granted);
                gate.hand_out(Rule::Held);
            }
            if entry.wanting || entry.unsure {
                poll()
            } else if gate.spare() {
                // Granted for requests that left meanwhile: give it back.
                Duration::ZERO
            } else {
                RENEW_EVERY
            }
        }
        Err(Unavailable) => {
            // This round decides locally, as a request's limits do when
            // their round trip fails.
            entry.unsure = true;
            if gate.waiting() > 0 {
                gate.hand_out(Rule::Capacity);
                poll()
            } else {
                RETRY_EVERY
            }
        }
    }
}

/// One SLOTS call: the gate holds `have`, and wants `want` more.
async fn send(
    cap: &FleetCap,
    entry: &Entry,
    have: usize,
    want: usize,
    capacity: usize,
    served: bool,
) -> Result<SlotsReply, Unavailable> {
    let mut call = cap.script.call(&[&cap.key], 64 + cap.holder.len());
    call.arg(&cap.holder)
        .arg(entry.version)
        .arg(have)
        .arg(want)
        .arg(capacity)
        .arg(LEASE.as_millis() as u64)
        .arg(WANT_LASTS.as_millis() as u64)
        .arg(if served { "1" } else { "0" });
    // Within `timeout_ms` even when no request waits on this call: a
    // request that comes meanwhile waits for it to end before its own.
    // A report that times out is sent again, whole.
    cap.link.redis.invoke(Op::Limits, &cap.script, &call).await
}

/// `POLL`, with jitter so replicas that wait do not ask in step.
fn poll() -> Duration {
    POLL.mul_f64(rand::rng().random_range(0.5..=1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_replicas_slots_lapse_within_thirty_seconds() {
        // Renewed well within the lease, so one late renewal loses nothing.
        assert!(LEASE <= Duration::from_secs(30));
        assert!(RENEW_EVERY * 2 < LEASE);
        assert!(WANT_LASTS > POLL.mul_f64(1.5) * 4);
    }
}
