//! Tenant limits (SPEC §4): a request bucket (governor's GCRA, lock-free), a
//! token bucket on upstream tokens that may go into deficit (debited after
//! the response, when usage is known), and a concurrency cap released when
//! the response body ends. One `TenantLimits` per tenant: tenants never
//! contend with each other, and there is no global lock.
//!
//! The token bucket is written by hand because governor's buckets cannot go
//! negative: usage is only known after the fact, so a tenant must be able to
//! overdraw and then wait the overdraft off.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::LimitSpec;

/// What a limit says about a tenant right now, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// Request bucket: governor's GCRA over an atomic, generic over the clock so
/// tests drive time with `FakeRelativeClock`.
pub struct RequestBucket<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>,
    clock: C,
    per_minute: u32,
    burst: u32,
    interval: Duration,
}

impl<C: Clock + Clone> RequestBucket<C> {
    pub fn with_clock(per_minute: NonZeroU32, burst: NonZeroU32, clock: C) -> Self {
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
    pub fn check(&self) -> Result<Standing, (Duration, Standing)> {
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
    pub fn new(per_minute: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_clock(per_minute, burst, DefaultClock::default())
    }
}

/// Token bucket that can be overdrawn: full at `per_minute`, refilling at
/// `per_minute` a minute, debited with actual usage after each response.
pub struct TokenBucket {
    per_minute: u64,
    state: Mutex<TokenState>,
}

struct TokenState {
    balance: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(per_minute: u64, now: Instant) -> Self {
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

    fn standing(&self, balance: f64) -> Standing {
        let missing = (self.per_minute as f64 - balance).max(0.0);
        Standing {
            limit: self.per_minute,
            remaining: balance.max(0.0).floor() as u64,
            reset: secs(missing / self.rate_per_sec()),
        }
    }

    /// Refuses a tenant without a whole token left, saying when it will have one.
    pub fn check(&self, now: Instant) -> Result<Standing, (Duration, Standing)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut s, now);
        let standing = self.standing(s.balance);
        if s.balance >= 1.0 {
            Ok(standing)
        } else {
            Err((secs((1.0 - s.balance) / self.rate_per_sec()), standing))
        }
    }

    /// Where the tenant stands, without asking for anything.
    pub fn peek(&self, now: Instant) -> Standing {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut s, now);
        self.standing(s.balance)
    }

    /// Debits used tokens; the balance may go negative.
    pub fn debit(&self, tokens: u64, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut s, now);
        // Floor the deficit at a day's worth: absurd usage must not lock a
        // tenant out for years.
        s.balance = (s.balance - tokens as f64).max(-(self.per_minute as f64) * 1440.0);
    }
}

/// Which tenant limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    Concurrency,
}

impl Limit {
    /// The `limit` label of `sluice_rate_limited_total`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
            Limit::Concurrency => "concurrency",
        }
    }
}

/// A refused request: which limit, how long until it would pass, and where
/// the tenant stands on that limit (for the `x-ratelimit-*` headers).
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    pub limit: Limit,
    pub wait: Duration,
    pub standing: Option<Standing>,
}

/// All limits of one tenant. Shared (`Arc`) by the tenant table, in-flight
/// permits and, across a reload, by the new table when the spec is unchanged.
pub struct TenantLimits {
    pub spec: LimitSpec,
    requests: Option<RequestBucket>,
    tokens: Option<TokenBucket>,
    in_flight: AtomicU32,
}

/// A held concurrency slot; released on drop (when the response body ends or
/// the client goes away).
pub struct Permit {
    limits: Arc<TenantLimits>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where the tenant stands after this request: what the headers report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Standings {
    pub requests: Option<Standing>,
    pub tokens: Option<Standing>,
}

// Limit, remaining, reset; parsed once.
static REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
static TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

impl Standings {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    pub fn write_headers(&self, h: &mut HeaderMap) {
        for (names, standing) in [
            (&REQUEST_HEADERS, self.requests),
            (&TOKEN_HEADERS, self.tokens),
        ] {
            let Some(s) = standing else { continue };
            let [limit, remaining, reset] = names;
            h.insert(limit, HeaderValue::from(s.limit));
            h.insert(remaining, HeaderValue::from(s.remaining));
            if let Ok(v) = HeaderValue::from_str(&format_reset(s.reset)) {
                h.insert(reset, v);
            }
        }
    }
}

/// Seconds to a `Duration`, saturating: a hostile upstream can report
/// absurd usage, and that must not turn into a panic.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// Durations the way OpenAI writes them: `20ms`, `1s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let total = d.as_secs();
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

impl TenantLimits {
    pub fn new(spec: LimitSpec) -> Self {
        Self {
            spec,
            requests: NonZeroU32::new(spec.requests_per_minute).map(|rpm| {
                RequestBucket::new(
                    rpm,
                    NonZeroU32::new(spec.request_burst).unwrap_or(NonZeroU32::MIN),
                )
            }),
            tokens: (spec.tokens_per_minute > 0)
                .then(|| TokenBucket::new(spec.tokens_per_minute, Instant::now())),
            in_flight: AtomicU32::new(0),
        }
    }

    /// Takes one request from the request bucket.
    pub fn check_request(&self) -> Result<Option<Standing>, Refused> {
        match &self.requests {
            None => Ok(None),
            Some(b) => b.check().map(Some).map_err(|(wait, standing)| Refused {
                limit: Limit::Requests,
                wait,
                standing: Some(standing),
            }),
        }
    }

    /// Takes a concurrency slot.
    pub fn acquire(self: &Arc<Self>) -> Result<Option<Permit>, Refused> {
        let max = self.spec.max_concurrent;
        if max == 0 {
            return Ok(None);
        }
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            // No clock says when a slot frees; one second is the honest hint.
            return Err(Refused {
                limit: Limit::Concurrency,
                wait: Duration::from_secs(1),
                standing: None,
            });
        }
        Ok(Some(Permit {
            limits: Arc::clone(self),
        }))
    }

    /// Refuses a tenant in token deficit (only for requests going upstream).
    pub fn check_tokens(&self, now: Instant) -> Result<Option<Standing>, Refused> {
        match &self.tokens {
            None => Ok(None),
            Some(b) => b.check(now).map(Some).map_err(|(wait, standing)| Refused {
                limit: Limit::Tokens,
                wait,
                standing: Some(standing),
            }),
        }
    }

    pub fn peek_tokens(&self, now: Instant) -> Option<Standing> {
        self.tokens.as_ref().map(|b| b.peek(now))
    }

    pub fn debit_tokens(&self, tokens: u64, now: Instant) {
        if let Some(b) = &self.tokens {
            b.debit(tokens, now);
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
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

    #[test]
    fn concurrency_is_released_on_drop() {
        let l = Arc::new(TenantLimits::new(LimitSpec {
            requests_per_minute: 0,
            request_burst: 1,
            tokens_per_minute: 0,
            max_concurrent: 2,
        }));
        let a = l.acquire().expect("1");
        let _b = l.acquire().expect("2");
        assert_eq!(l.acquire().err().map(|e| e.limit), Some(Limit::Concurrency));
        drop(a);
        assert!(l.acquire().is_ok());
        assert_eq!(l.in_flight(), 1);
    }

    #[test]
    fn unlimited_means_no_headers() {
        let l = TenantLimits::new(LimitSpec {
            requests_per_minute: 0,
            request_burst: 1,
            tokens_per_minute: 0,
            max_concurrent: 0,
        });
        assert_eq!(l.check_request().expect("ok"), None);
        assert_eq!(l.check_tokens(Instant::now()).expect("ok"), None);
    }

    #[test]
    fn reset_formats() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3725)), "1h2m5s");
    }
}
