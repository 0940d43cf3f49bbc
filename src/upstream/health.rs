//! Passive health of one upstream (docs/upstreams.md, "Ejection"): its
//! record of consecutive failed attempts and whether it is resting
//! (ejected). Each replica keeps its own view; the record outlives
//! reloads for as long as the upstream stays configured.
//!
//! A healthy upstream costs a request two atomic loads (is it resting,
//! has it a record to clear); only failures and the answers that clear
//! them take the record's lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::StatusCode;
use prometheus::{IntCounterVec, IntGauge};

use crate::config::UpstreamConfig;

/// The longest rest, however often an upstream fails.
pub(crate) const MAX_REST: Duration = Duration::from_secs(300);

/// Milliseconds on the process's own clock (never 0, so 0 can mean
/// "not resting").
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// What one attempt's answer says of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It answered: its record is cleared.
    Healthy,
    /// Connect failure, broken before headers, first-byte timeout, 5xx.
    Failed,
    /// 429 with `retry-after`: resting for that long.
    RateLimited(Duration),
    /// 401 or 402: its key or account is broken.
    Auth,
    /// Says nothing either way (a 429 without `retry-after`).
    Neither,
}

impl Verdict {
    /// The verdict of an answer with `status` (and `retry_after`, read
    /// from its headers).
    pub(crate) fn of(status: StatusCode, retry_after: Option<Duration>) -> Verdict {
        match status.as_u16() {
            401 | 402 => Verdict::Auth,
            429 => retry_after.map_or(Verdict::Neither, Verdict::RateLimited),
            500..=599 => Verdict::Failed,
            _ => Verdict::Healthy,
        }
    }
}

/// Why an upstream was ejected (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Errors,
    RateLimited,
    Auth,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Errors => "errors",
            Reason::RateLimited => "rate_limited",
            Reason::Auth => "auth",
        }
    }
}

/// One upstream's health.
pub(crate) struct Health {
    name: Arc<str>,
    /// When the current rest ends (`now_ms`), 0 when not resting.
    until: AtomicU64,
    /// Whether an answer has something to clear (failures counted, or the
    /// first answer after a rest still to come).
    troubled: AtomicBool,
    record: Mutex<Record>,
    available: IntGauge,
    ejections: IntCounterVec,
}

#[derive(Default)]
struct Record {
    /// Consecutive failed attempts.
    failures: u32,
    /// Rests for errors since its last success: each one doubles the next.
    rests: u32,
    /// Rested since its last success: its next answer decides.
    on_probation: bool,
    /// Bumped by each ejection, so a stale timer restores nothing.
    generation: u64,
}

impl Health {
    pub(crate) fn new(name: &Arc<str>, available: IntGauge, ejections: IntCounterVec) -> Health {
        available.set(1);
        Health {
            name: Arc::clone(name),
            until: AtomicU64::new(0),
            troubled: AtomicBool::new(false),
            record: Mutex::new(Record::default()),
            available,
            ejections,
        }
    }

    /// Whether it takes new requests at `now` (`now_ms`).
    pub(crate) fn available(&self, now: u64) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == 0 || now >= until
    }

    /// When its rest ends (0: not resting).
    pub(crate) fn rest_ends(&self) -> u64 {
        self.until.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an attempt's verdict into its record, ejecting it when the
    /// record says so.
    pub(crate) fn observe(self: &Arc<Self>, verdict: Verdict, cfg: &UpstreamConfig) {
        match verdict {
            Verdict::Neither => {}
            Verdict::Healthy => {
                if self.troubled.load(Ordering::Acquire) {
                    let mut r = self.lock();
                    *r = Record {
                        generation: r.generation,
                        ..Record::default()
                    };
                    self.troubled.store(false, Ordering::Release);
                }
            }
            Verdict::Failed => {
                let mut r = self.lock();
                r.failures = r.failures.saturating_add(1);
                self.troubled.store(true, Ordering::Release);
                if r.on_probation || r.failures >= cfg.eject_after {
                    let rest = cfg
                        .eject_for
                        .saturating_mul(1 << r.rests.min(16))
                        .min(MAX_REST);
                    r.rests = r.rests.saturating_add(1);
                    self.eject(&mut r, rest, Reason::Errors);
                }
            }
            Verdict::RateLimited(rest) => {
                let mut r = self.lock();
                self.troubled.store(true, Ordering::Release);
                self.eject(&mut r, rest.min(MAX_REST), Reason::RateLimited);
            }
            Verdict::Auth => {
                let mut r = self.lock();
                self.troubled.store(true, Ordering::Release);
                self.eject(&mut r, MAX_REST, Reason::Auth);
            }
        }
    }

    fn eject(self: &Arc<Self>, r: &mut Record, rest: Duration, reason: Reason) {
        r.failures = 0;
        r.on_probation = true;
        r.generation += 1;
        let until = now_ms() + u64::try_from(rest.as_millis()).unwrap_or(u64::MAX / 2);
        self.until.store(until, Ordering::Release);
        self.available.set(0);
        self.ejections
            .with_label_values(&[&*self.name, reason.label()])
            .inc();
        tracing::warn!(
            upstream = %self.name,
            reason = reason.label(),
            secs = rest.as_secs_f64(),
            "upstream ejected"
        );
        // The gauge says "available" again when the rest is over (unless
        // it was ejected anew meanwhile).
        let generation = r.generation;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = Arc::downgrade(self);
            rt.spawn(async move {
                tokio::time::sleep(rest).await;
                if let Some(me) = me.upgrade() {
                    if me.lock().generation == generation {
                        me.available.set(1);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(after: u32, secs: u64) -> UpstreamConfig {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_retries: 2,
            eject_after: after,
            eject_for: Duration::from_secs(secs),
        }
    }

    fn health() -> (Arc<Health>, IntGauge, IntCounterVec) {
        let gauge = IntGauge::new("available", "h").expect("gauge");
        let ejections = IntCounterVec::new(
            prometheus::Opts::new("ejections", "h"),
            &["upstream", "reason"],
        )
        .expect("counter");
        let h = Arc::new(Health::new(
            &Arc::from("a"),
            gauge.clone(),
            ejections.clone(),
        ));
        (h, gauge, ejections)
    }

    /// The length of the current rest, in whole seconds.
    fn rest_secs(h: &Health) -> u64 {
        (h.rest_ends().saturating_sub(now_ms()) + 500) / 1000
    }

    #[test]
    fn consecutive_failures_eject_and_rests_double() {
        let (h, gauge, ejections) = health();
        let c = cfg(3, 10);
        h.observe(Verdict::Failed, &c);
        h.observe(Verdict::Failed, &c);
        h.observe(Verdict::Healthy, &c);
        h.observe(Verdict::Failed, &c);
        h.observe(Verdict::Failed, &c);
        assert!(
            h.available(now_ms()),
            "a success in between resets the count"
        );
        h.observe(Verdict::Failed, &c);
        assert!(!h.available(now_ms()));
        assert_eq!(gauge.get(), 0);
        assert_eq!(rest_secs(&h), 10);
        // Back, and its first answer fails: out again, for twice as long.
        h.observe(Verdict::Failed, &c);
        assert_eq!(rest_secs(&h), 20);
        h.observe(Verdict::Failed, &c);
        assert_eq!(rest_secs(&h), 40);
        for _ in 0..10 {
            h.observe(Verdict::Failed, &c);
        }
        assert_eq!(rest_secs(&h), 300, "at most 300 s");
        assert_eq!(ejections.with_label_values(&["a", "errors"]).get(), 13);
        // A success clears the record: the next rest is the first again.
        h.observe(Verdict::Healthy, &c);
        for _ in 0..3 {
            h.observe(Verdict::Failed, &c);
        }
        assert_eq!(rest_secs(&h), 10);
    }

    #[test]
    fn rate_limits_and_auth_rest_for_their_own_time() {
        let (h, _, ejections) = health();
        let c = cfg(3, 10);
        h.observe(Verdict::Neither, &c);
        assert!(
            h.available(now_ms()),
            "a 429 without retry-after says nothing"
        );
        h.observe(Verdict::RateLimited(Duration::from_secs(7)), &c);
        assert_eq!(rest_secs(&h), 7);
        h.observe(Verdict::Auth, &c);
        assert_eq!(rest_secs(&h), 300);
        assert_eq!(ejections.with_label_values(&["a", "rate_limited"]).get(), 1);
        assert_eq!(ejections.with_label_values(&["a", "auth"]).get(), 1);
    }

    #[test]
    fn verdicts_of_statuses() {
        let s = |n| StatusCode::from_u16(n).expect("status");
        assert_eq!(Verdict::of(s(200), None), Verdict::Healthy);
        assert_eq!(Verdict::of(s(400), None), Verdict::Healthy);
        assert_eq!(Verdict::of(s(401), None), Verdict::Auth);
        assert_eq!(Verdict::of(s(402), None), Verdict::Auth);
        assert_eq!(Verdict::of(s(429), None), Verdict::Neither);
        let wait = Some(Duration::from_secs(2));
        assert_eq!(
            Verdict::of(s(429), wait),
            Verdict::RateLimited(Duration::from_secs(2))
        );
        assert_eq!(Verdict::of(s(503), None), Verdict::Failed);
        assert_eq!(Verdict::of(s(529), None), Verdict::Failed);
    }
}
