//! A replica's share of one tenant's fleet-wide limits (docs/redis.md
//! "Shared limits"): requests leased from the fleet's request bucket and
//! spent here with an atomic counter, a capped tenant's slots held in
//! Redis (`Slots`), and the last view Redis gave of the bucket, the token
//! balance and the spend. `fleet.rs` fills it (ADMIT on the request path
//! when it runs dry, RENEW every `TICK` while the tenant is busy here); the
//! request path only reads and spends it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{secs, Standing};

/// How often a busy tenant's share is renewed: its charges settled, its
/// view of the fleet read again and its requests topped up.
pub(super) const TICK: Duration = Duration::from_millis(250);
/// The oldest view a request may decide the token and budget checks by; an
/// older one is read again on the request path. With charges settled every
/// `TICK`, a charge made on one replica is seen by the others within
/// `TICK + VIEW_TTL` and two round trips: under a second.
pub(super) const VIEW_TTL: Duration = Duration::from_millis(500);
/// A share unused this long goes back to the fleet.
pub(super) const IDLE: Duration = Duration::from_secs(1);
/// The fewest admissions over a tick and a half that earn a share.
pub(super) const MIN_DEMAND: u64 = 3;
/// How long a replica counts as a lessee of a bucket after it last asked.
pub(super) const LESSEE_TTL: Duration = Duration::from_secs(2);
/// A share is at most what the bucket holds over (lessees × `K`): a
/// quarter of an equal split, so the fleet's last requests go one round
/// trip at a time while a busy bucket's replicas each hold a few.
pub(super) const K: u64 = 4;

/// Requests leased and what Redis last said.
pub(crate) struct Share {
    /// Requests leased from the fleet's bucket and not yet spent here.
    left: AtomicU64,
    /// Admissions since the last tick, and in the tick before: the demand
    /// the share is sized to.
    admitted: AtomicU64,
    admitted_before: AtomicU64,
    /// When this replica last admitted a request of the tenant: ms since
    /// `born`, plus one (0: never). An atomic, so admitting takes no lock.
    used: AtomicU64,
    born: Instant,
    view: Mutex<View>,
}

/// What Redis said last, and when.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct View {
    /// When Redis answered; `None` before it ever did.
    pub(super) at: Option<Instant>,
    /// Requests the fleet's bucket held after the grant (leases excluded).
    pub(super) remaining: u64,
    /// Until the fleet's bucket is full again, as of `at`.
    pub(super) reset: Duration,
    /// The fleet's token balance, with `included` tokens of this replica's
    /// ledger in it.
    pub(super) balance: Option<f64>,
    pub(super) included: u64,
    /// Refused for requests until then (no round trip to refuse again).
    pub(super) refused_until: Option<Instant>,
    /// When charges were last sent.
    pub(super) flushed: Option<Instant>,
}

impl Share {
    pub(super) fn new() -> Share {
        Share {
            left: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            admitted_before: AtomicU64::new(0),
            used: AtomicU64::new(0),
            born: Instant::now(),
            view: Mutex::new(View::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn view(&self) -> View {
        *self.lock()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.lock());
    }

    /// Takes one leased request, if any is left; returns how many are left
    /// after it.
    pub(super) fn take(&self) -> Option<u64> {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|n| n - 1)
    }

    pub(super) fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    pub(super) fn add(&self, n: u64) {
        if n > 0 {
            self.left.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Takes every leased request, to give them back.
    pub(super) fn take_all(&self) -> u64 {
        self.left.swap(0, Ordering::AcqRel)
    }

    /// Counts an admission (local or through Redis) toward the demand.
    pub(super) fn admitted(&self, now: Instant) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        let ms = now.saturating_duration_since(self.born).as_millis() as u64;
        self.used.store(ms + 1, Ordering::Relaxed);
    }

    /// Whether nothing was admitted here for `IDLE`.
    pub(super) fn idle(&self, now: Instant) -> bool {
        match self.used.load(Ordering::Relaxed) {
            0 => true,
            ms => {
                let used = self.born + Duration::from_millis(ms - 1);
                now.saturating_duration_since(used) >= IDLE
            }
        }
    }

    /// The requests worth holding beyond the one at hand: what the current
    /// and the last tick admitted, once that is at least `MIN_DEMAND`.
    /// Sparser traffic gains little from a share (its round trips are few)
    /// and would hold requests the fleet could use, so it goes one round
    /// trip a request, as without shares.
    pub(super) fn target(&self) -> u64 {
        let now = self.admitted.load(Ordering::Relaxed);
        let before = self.admitted_before.load(Ordering::Relaxed);
        let demand = now + before;
        if demand >= MIN_DEMAND {
            demand
        } else {
            0
        }
    }

    /// Whether the tenant is busy enough here to be decided from the share
    /// and the view; a sparse one asks Redis every request, as without
    /// shares, so it sees the fleet as it is.
    pub(super) fn busy(&self) -> bool {
        self.target() > 0
    }

    /// Whether a charge should be sent at once rather than at the next
    /// tick: the first after a quiet `TICK`, so sparse traffic is settled
    /// as it comes and busy traffic in batches. Counts it as sent.
    pub(super) fn flush_now(&self, now: Instant) -> bool {
        let mut v = self.lock();
        let due = v
            .flushed
            .is_none_or(|at| now.saturating_duration_since(at) >= TICK);
        if due {
            v.flushed = Some(now);
        }
        due
    }

    /// At a tick: starts a new demand window; whether anything was
    /// admitted in the one that ended.
    pub(super) fn rotate(&self) -> bool {
        let n = self.admitted.swap(0, Ordering::Relaxed);
        self.admitted_before.store(n, Ordering::Relaxed);
        n > 0
    }
}

impl View {
    /// Whether the token and budget checks may be decided by this view.
    pub(super) fn fresh(&self, now: Instant) -> bool {
        self.at
            .is_some_and(|at| now.saturating_duration_since(at) < VIEW_TTL)
    }

    /// The request bucket's standing: what the fleet held at the last
    /// answer plus what is left of this replica's share.
    pub(super) fn requests(&self, rpm: u32, left: u64, now: Instant) -> Standing {
        let since = self
            .at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        Standing {
            limit: u64::from(rpm),
            remaining: self.remaining + left,
            reset: self.reset.saturating_sub(since),
        }
    }

    /// The token balance as of now: the fleet's, refilled since it was
    /// read, less this replica's charges Redis had not applied then.
    pub(super) fn balance(&self, tpm: u64, charged: u64, now: Instant) -> Option<f64> {
        let (b, at) = (self.balance?, self.at?);
        let refill = now.saturating_duration_since(at).as_secs_f64() * tpm as f64 / 60.0;
        let unsettled = charged.saturating_sub(self.included) as f64;
        Some((b + refill).min(tpm as f64) - unsettled)
    }

    /// Refused locally while the fleet's bucket is known empty: the wait.
    pub(super) fn refused(&self, now: Instant) -> Option<Duration> {
        self.refused_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// A capped tenant's concurrency slots on this replica: what Redis holds
/// for the replica (`held`, its count in the concurrency hash: the fleet
/// never has more than `max_concurrent` held) and how many of them requests
/// use (`busy`). A request takes a spare held slot without a round trip;
/// releases give spare slots back past `keep`, the spare ones Redis last
/// allowed. Every change of `held` gets a new version, so Redis keeps the
/// newest whatever order changes arrive in (as for the counts of tenants
/// without shares); one lock, held for a few instructions, keeps `held`,
/// `busy` and the version in step.
pub(crate) struct Slots {
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    /// The newest version given to a change of `held`.
    version: u64,
    /// The version `held` was last set at (by this replica or by a reply).
    applied: u64,
    held: u64,
    /// Requests admitted through these slots and not yet released, and
    /// those waiting on Redis for one.
    busy: u64,
    keep: u64,
}

/// A change of the slots to send: (version, count held).
pub(super) type SlotChange = (u64, u64);

/// What a request asks Redis for when no spare slot is held.
#[derive(Debug, Clone, Copy)]
pub(super) struct SlotAsk {
    pub(super) version: u64,
    /// Slots in use with this request.
    pub(super) needed: u64,
    /// Needed and spare.
    pub(super) wanted: u64,
    /// What the replica holds if the request is refused.
    pub(super) if_refused: u64,
}

impl Slots {
    /// Versions start at the clock's microseconds, so a new `Slots` (a
    /// reload) is newer than any change the one before it made.
    pub(super) fn new() -> Slots {
        let version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Slots {
            state: Mutex::new(SlotState {
                version,
                applied: version,
                ..SlotState::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a spare held slot, if there is one.
    pub(super) fn take(&self) -> bool {
        let mut s = self.lock();
        if s.busy < s.held {
            s.busy += 1;
            true
        } else {
            false
        }
    }

    /// Counts a request that asks Redis for a slot (and `spare` more).
    pub(super) fn ask(&self, spare: u64) -> SlotAsk {
        let mut s = self.lock();
        s.busy += 1;
        s.version += 1;
        SlotAsk {
            version: s.version,
            needed: s.busy,
            wanted: s.busy + spare,
            if_refused: s.held.max(s.busy - 1),
        }
    }

    /// Redis's answer to an ask: the replica's count as of `version`
    /// (ignored if a newer one is known here), the spare slots it may keep,
    /// and whether the request got its slot.
    pub(super) fn answered(&self, version: i64, count: u64, keep: u64, admitted: bool) {
        let mut s = self.lock();
        if version >= 0 && version as u64 >= s.applied {
            s.held = count;
            s.applied = version as u64;
            s.keep = keep;
        }
        if !admitted {
            s.busy = s.busy.saturating_sub(1);
        }
    }

    /// An ask whose round trip failed: the request holds nothing.
    pub(super) fn unasked(&self) {
        let mut s = self.lock();
        s.busy = s.busy.saturating_sub(1);
    }

    /// A request ends: its slot is free again, and the spare ones past
    /// `keep` go back to the fleet (the change to send, if any).
    pub(super) fn release(&self) -> Option<SlotChange> {
        let mut s = self.lock();
        s.busy = s.busy.saturating_sub(1);
        let enough = s.busy + s.keep;
        if s.held > enough {
            Some(s.set_held(enough))
        } else {
            None
        }
    }

    /// Gives every spare slot back (idle, or at shutdown).
    pub(super) fn shrink(&self) -> Option<SlotChange> {
        let mut s = self.lock();
        s.keep = 0;
        let busy = s.busy;
        (s.held > busy).then(|| s.set_held(busy))
    }

    /// The count to report (renewal, or after a change whose outcome is
    /// unknown), as a change of its own: newer than every ask sent, and
    /// counting the requests still waiting on one.
    pub(super) fn report(&self) -> SlotChange {
        let mut s = self.lock();
        let held = s.held.max(s.busy);
        s.set_held(held)
    }

    /// Whether nothing is held (no report needed to renew).
    pub(super) fn is_empty(&self) -> bool {
        let s = self.lock();
        s.held == 0 && s.busy == 0
    }
}

impl SlotState {
    fn set_held(&mut self, held: u64) -> SlotChange {
        self.version += 1;
        self.held = held;
        self.applied = self.version;
        (self.version, held)
    }
}

/// Microseconds from a script to a `Duration`.
pub(super) fn us(v: i64) -> Duration {
    secs(v.max(0) as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_spent_once_and_given_back_whole() {
        let s = Share::new();
        assert_eq!(s.take(), None, "nothing leased yet");
        s.add(3);
        assert_eq!(s.take(), Some(2));
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take_all(), 1);
        assert_eq!(s.take(), None);
    }

    #[test]
    fn demand_covers_a_tick_and_a_half() {
        let s = Share::new();
        let now = Instant::now();
        assert_eq!(s.target(), 0, "nothing beyond the request at hand");
        s.admitted(now);
        s.admitted(now);
        assert_eq!(
            s.target(),
            0,
            "two requests a tick and a half earn no share"
        );
        for _ in 0..3 {
            s.admitted(now);
        }
        assert!(s.rotate());
        for _ in 0..3 {
            s.admitted(now);
        }
        assert_eq!(s.target(), 8);
        assert!(s.rotate());
        assert!(!s.rotate(), "an idle tick");
        assert_eq!(s.target(), 0);
        assert!(!s.idle(now + Duration::from_millis(10)));
        assert!(s.idle(now + IDLE + Duration::from_millis(2)));
    }

    #[test]
    fn slots_are_taken_here_while_spare_ones_are_held() {
        let s = Slots::new();
        assert!(!s.take(), "nothing held yet");
        let ask = s.ask(2);
        assert_eq!((ask.needed, ask.wanted, ask.if_refused), (1, 3, 0));
        s.answered(ask.version as i64, 3, 2, true);
        assert!(s.take() && s.take(), "two spare slots");
        assert!(!s.take());
        // Three busy, three held: a release keeps up to two spare.
        assert_eq!(s.release(), None);
        assert_eq!(s.release(), None);
        let (v, held) = s.release().expect("past keep");
        assert_eq!(held, 2);
        assert!(v > ask.version);
        // A late answer to an older change changes nothing held.
        s.answered(ask.version as i64, 9, 9, true);
        let (newer, held) = s.report();
        assert!(newer > v);
        assert_eq!(held, 2);
        assert_eq!(s.shrink().map(|c| c.1), Some(0));
    }

    #[test]
    fn a_refused_ask_keeps_the_requests_still_waiting() {
        let s = Slots::new();
        let a = s.ask(0);
        let b = s.ask(0);
        assert_eq!((b.needed, b.if_refused), (2, 1), "a's request waits too");
        s.answered(b.version as i64, 1, 0, false);
        // a's answer says it is counted by b's change (the newer one).
        s.answered(b.version as i64, 1, 0, true);
        assert_eq!(s.report().1, 1);
        assert!(a.version < b.version);
    }

    #[test]
    fn the_balance_counts_refill_and_unsettled_charges() {
        let now = Instant::now();
        let v = View {
            at: Some(now),
            balance: Some(100.0),
            included: 40,
            ..View::default()
        };
        // 600 a minute is 10 a second: 5 more after half a second, less the
        // 25 this replica charged since the view was read.
        let b = v
            .balance(600, 65, now + Duration::from_millis(500))
            .expect("balance");
        assert!((b - 80.0).abs() < 1e-9, "{b}");
        assert!(v.fresh(now + Duration::from_millis(100)));
        assert!(!v.fresh(now + VIEW_TTL));
        let r = View {
            refused_until: Some(now + Duration::from_secs(1)),
            ..v
        };
        assert_eq!(r.refused(now), Some(Duration::from_secs(1)));
        assert_eq!(r.refused(now + Duration::from_secs(2)), None);
    }
}
