//! The in-memory limiter backend: a request bucket (governor's GCRA,
//! lock-free) and a token bucket that may go into deficit. One replica
//! with no Redis uses only these; with Redis they decide while it is
//! unavailable.
//!
//! The token bucket is written by hand because governor's buckets cannot go
//! negative: usage is only known after the fact, so a tenant must be able to
//! overdraw and then wait the overdraft off.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::{secs, Standing};

/// Request bucket: governor's GCRA over an atomic, generic over the clock so
/// tests drive time with `FakeRelativeClock`.
pub(crate) struct RequestBucket<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>,
    clock: C,
    per_minute: u32,
    burst: u32,
    interval: Duration,
}

impl<C: Clock + Clone> RequestBucket<C> {
    pub(crate) fn with_clock(per_minute: NonZeroU32, burst: NonZeroU32, clock: C) -> Self {
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            interval: quota.replenish_interval(),
            clock,
            per_minute: per_minute.get(),
            burst: burst.get(),
        }
    }

    /// Takes one request from the bucket, or says how long until one is
    /// there (and where the tenant stands: empty, full again after that
    /// wait plus the rest of the burst).
    pub(crate) fn check(&self) -> Result<Standing, (Duration, Standing)> {
        let standing = |remaining: u32, wait: Duration| Standing {
            limit: u64::from(self.per_minute),
            remaining: u64::from(remaining),
            reset: wait + self.interval * self.burst.saturating_sub(remaining.max(1)),
        };
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Ok(Standing {
                    reset: self.interval * self.burst.saturating_sub(remaining),
                    ..standing(remaining, Duration::ZERO)
                })
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err((wait, standing(0, wait)))
            }
        }
    }
}

impl RequestBucket {
    pub(crate) fn new(per_minute: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_clock(per_minute, burst, DefaultClock::default())
    }
}

/// Where a token bucket of `per_minute` with `balance` tokens stands: what
/// is left (never below 0) and the time until it is full.
pub(crate) fn token_standing(per_minute: u64, balance: f64) -> Standing {
    let missing = (per_minute as f64 - balance).max(0.0);
    Standing {
        limit: per_minute,
        remaining: balance.max(0.0).floor() as u64,
        reset: secs(missing / (per_minute as f64 / 60.0)),
    }
}

/// A request may spend tokens while a whole one is left; otherwise, how
/// long until one is.
pub(crate) fn token_verdict(
    per_minute: u64,
    balance: f64,
) -> Result<Standing, (Duration, Standing)> {
    let standing = token_standing(per_minute, balance);
    if balance >= 1.0 {
        Ok(standing)
    } else {
        Err((secs((1.0 - balance) / (per_minute as f64 / 60.0)), standing))
    }
}

/// Token bucket that can be overdrawn: full at `per_minute`, refilling at
/// `per_minute` a minute, debited with actual usage after each response.
pub(crate) struct TokenBucket {
    per_minute: u64,
    state: Mutex<TokenState>,
}

struct TokenState {
    balance: f64,
    at: Instant,
}

impl TokenBucket {
    pub(crate) fn new(per_minute: u64, now: Instant) -> Self {
        Self {
            per_minute,
            state: Mutex::new(TokenState {
                balance: per_minute as f64,
                at: now,
            }),
        }
    }

    fn rate_per_sec(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    fn refilled(&self, s: &mut TokenState, now: Instant) {
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.balance = (s.balance + elapsed * self.rate_per_sec()).min(self.per_minute as f64);
        s.at = now.max(s.at);
    }

    /// Refuses a tenant without a whole token left, saying when it will have one.
    pub(crate) fn check(&self, now: Instant) -> Result<Standing, (Duration, Standing)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut s, now);
        token_verdict(self.per_minute, s.balance)
    }

    /// Where the tenant stands, without asking for anything.
    pub(crate) fn peek(&self, now: Instant) -> Standing {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut s, now);
        token_standing(self.per_minute, s.balance)
    }

    /// Debits used tokens; the balance may go negative.
    pub(crate) fn debit(&self, tokens: u64, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut s, now);
        // Floor the deficit at a day's worth: absurd usage must not lock a
        // tenant out for years.
        s.balance = (s.balance - tokens as f64).max(-(self.per_minute as f64) * 1440.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[test]
    fn burst_passes_then_refuses_then_refills() {
        let clock = FakeRelativeClock::default();
        let b = RequestBucket::with_clock(nz(60), nz(3), clock.clone());
        let remaining: Vec<u64> = (0..3)
            .map(|_| b.check().expect("in burst").remaining)
            .collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        let (wait, standing) = b.check().expect_err("burst spent");
        assert_eq!(standing.remaining, 0);
        assert_eq!(
            standing.reset,
            wait + Duration::from_secs(2),
            "then two more to fill"
        );
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        clock.advance(Duration::from_secs(1));
        assert!(b.check().is_ok(), "one request back after 1s at 60/min");
        assert!(b.check().is_err());
    }

    #[test]
    fn reset_is_time_until_full() {
        let clock = FakeRelativeClock::default();
        let b = RequestBucket::with_clock(nz(60), nz(10), clock);
        let s = b.check().expect("ok");
        assert_eq!(s.limit, 60);
        assert_eq!(s.remaining, 9);
        assert_eq!(s.reset, Duration::from_secs(1));
    }

    #[test]
    fn token_bucket_goes_into_deficit_and_recovers() {
        let t0 = Instant::now();
        let b = TokenBucket::new(600, t0); // 10 tokens a second
        assert_eq!(b.check(t0).expect("full").remaining, 600);
        b.debit(700, t0);
        let (wait, standing) = b.check(t0).expect_err("deficit of 100");
        assert_eq!(standing.remaining, 0);
        assert_eq!(wait, Duration::from_secs_f64(10.1));
        assert!(b.check(t0 + Duration::from_secs(10)).is_err());
        let s = b.check(t0 + Duration::from_secs(11)).expect("refilled");
        assert_eq!(s.remaining, 10);
        assert_eq!(s.reset, Duration::from_secs(59));
        // Never more than full.
        assert_eq!(b.peek(t0 + Duration::from_secs(3600)).remaining, 600);
    }

    #[test]
    fn absurd_usage_neither_panics_nor_locks_out_forever() {
        let t0 = Instant::now();
        let b = TokenBucket::new(60, t0);
        b.debit(u64::MAX, t0);
        let (wait, _) = b.check(t0).expect_err("deficit");
        assert!(wait <= Duration::from_secs(86_401), "{wait:?}");
        assert_eq!(b.peek(t0).remaining, 0);
    }
}
