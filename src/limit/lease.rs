//! A replica's share of one tenant's fleet-wide limits (docs/redis.md
//! "Shares"), for a tenant without a concurrency cap: requests leased from
//! the fleet's request bucket, spent here with an atomic counter, and the
//! last view Redis gave of the bucket, the token balance and the spend.
//! `fleet.rs` fills it (ADMIT on the request path when it runs dry, RENEW
//! every `TICK` while the tenant is busy here); the request path only
//! reads it.

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
pub(super) const MIN_DEMAND: u64 = 2;
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
        assert_eq!(s.target(), 0, "one request a tick earns no share");
        for _ in 0..4 {
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
