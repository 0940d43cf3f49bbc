//! Passive health of one upstream (docs/upstreams.md, "Ejection"): its
//! record of consecutive failed attempts and whether it is resting
//! (ejected). Each replica keeps its own view; the record outlives
//! reloads for as long as the upstream stays configured.
//!
//! A healthy upstream costs a request two atomic loads (is it resting,
//! has it a record to clear); only failures and the answers that clear
//! them take the record's lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::StatusCode;
use prometheus::{IntCounterVec, IntGauge};

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
    /// `eject_after` and `eject_secs` (in ms), as last configured.
    eject_after: AtomicU32,
    eject_for_ms: AtomicU64,
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
            eject_after: AtomicU32::new(3),
            eject_for_ms: AtomicU64::new(10_000),
            available,
            ejections,
        }
    }

    /// Takes the configuration's `eject_after` and `eject_secs` (at start
    /// and at each reload).
    pub(crate) fn configure(&self, eject_after: u32, eject_for: Duration) {
        self.eject_after
            .store(eject_after.max(1), Ordering::Release);
        let ms = u64::try_from(eject_for.as_millis()).unwrap_or(u64::MAX);
        self.eject_for_ms.store(ms, Ordering::Release);
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
    pub(crate) fn observe(self: &Arc<Self>, verdict: Verdict) {
        self.observe_at(verdict, now_ms());
    }

    fn observe_at(self: &Arc<Self>, verdict: Verdict, now: u64) {
        let resting = !self.available(now);
        match verdict {
            Verdict::Neither => {}
            Verdict::Healthy => {
                if self.troubled.load(Ordering::Acquire) {
                    let mut r = self.lock();
                    *r = Record {
                        generation: r.generation + 1,
                        ..Record::default()
                    };
                    self.troubled.store(false, Ordering::Release);
                    // It answered well: it takes requests again at once.
                    if self.until.swap(0, Ordering::AcqRel) != 0 {
                        self.available.set(1);
                    }
                }
            }
            // Failures of calls sent before or during a rest say nothing
            // new: only the answers after it decide.
            Verdict::Failed if resting => {}
            Verdict::Failed => {
                let mut r = self.lock();
                r.failures = r.failures.saturating_add(1);
                self.troubled.store(true, Ordering::Release);
                if r.on_probation || r.failures >= self.eject_after.load(Ordering::Acquire) {
                    let first = Duration::from_millis(self.eject_for_ms.load(Ordering::Acquire));
                    let rest = first.saturating_mul(1 << r.rests.min(16)).min(MAX_REST);
                    r.rests = r.rests.saturating_add(1);
                    self.eject(&mut r, now, rest, Reason::Errors);
                }
            }
            Verdict::RateLimited(rest) => {
                let mut r = self.lock();
                self.troubled.store(true, Ordering::Release);
                self.eject(&mut r, now, rest.min(MAX_REST), Reason::RateLimited);
            }
            Verdict::Auth => {
                let mut r = self.lock();
                self.troubled.store(true, Ordering::Release);
                self.eject(&mut r, now, MAX_REST, Reason::Auth);
            }
        }
    }

    /// Rests it until `now + rest`, unless it already rests longer.
    fn eject(self: &Arc<Self>, r: &mut Record, now: u64, rest: Duration, reason: Reason) {
        let until = now + u64::try_from(rest.as_millis()).unwrap_or(u64::MAX / 2);
        if until <= self.until.load(Ordering::Acquire) {
            return;
        }
        r.failures = 0;
        r.on_probation = true;
        r.generation += 1;
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
        // it was ejected anew, or cleared, meanwhile).
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

    fn health(after: u32, secs: u64) -> (Arc<Health>, IntGauge, IntCounterVec) {
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
        h.configure(after, Duration::from_secs(secs));
        (h, gauge, ejections)
    }

    /// The length of the rest that began at `now`, in whole seconds.
    fn rest_secs(h: &Health, now: u64) -> u64 {
        (h.rest_ends().saturating_sub(now) + 500) / 1000
    }

    #[test]
    fn consecutive_failures_eject_and_rests_double() {
        let (h, gauge, ejections) = health(3, 10);
        let mut now = 1_000;
        h.observe_at(Verdict::Failed, now);
        h.observe_at(Verdict::Failed, now);
        h.observe_at(Verdict::Healthy, now);
        h.observe_at(Verdict::Failed, now);
        h.observe_at(Verdict::Failed, now);
        assert!(h.available(now), "a success in between resets the count");
        h.observe_at(Verdict::Failed, now);
        assert!(!h.available(now));
        assert_eq!(gauge.get(), 0);
        assert_eq!(rest_secs(&h, now), 10);
        // Calls still in flight that fail meanwhile change nothing.
        for _ in 0..20 {
            h.observe_at(Verdict::Failed, now + 1);
        }
        assert_eq!(rest_secs(&h, now), 10);
        assert_eq!(ejections.with_label_values(&["a", "errors"]).get(), 1);
        // Back, and its first answer fails: out again, for twice as long.
        let mut rest = 10;
        for _ in 0..8 {
            now = h.rest_ends();
            assert!(h.available(now));
            h.observe_at(Verdict::Failed, now);
            rest = (rest * 2).min(300);
            assert_eq!(rest_secs(&h, now), rest);
        }
        assert_eq!(rest, 300, "at most 300 s");
        assert_eq!(ejections.with_label_values(&["a", "errors"]).get(), 9);
        // A success clears the record: the next rest is the first again.
        now = h.rest_ends();
        h.observe_at(Verdict::Healthy, now);
        for _ in 0..3 {
            h.observe_at(Verdict::Failed, now);
        }
        assert_eq!(rest_secs(&h, now), 10);
    }

    #[test]
    fn a_success_while_resting_ends_the_rest() {
        let (h, gauge, _) = health(1, 10);
        h.observe_at(Verdict::Failed, 1_000);
        assert!(!h.available(2_000));
        h.observe_at(Verdict::Healthy, 2_000);
        assert!(h.available(2_000));
        assert_eq!(gauge.get(), 1);
    }

    #[test]
    fn rate_limits_and_auth_rest_for_their_own_time() {
        let (h, _, ejections) = health(3, 10);
        let now = 1_000;
        h.observe_at(Verdict::Neither, now);
        assert!(h.available(now), "a 429 without retry-after says nothing");
        h.observe_at(Verdict::RateLimited(Duration::from_secs(7)), now);
        assert_eq!(rest_secs(&h, now), 7);
        h.observe_at(Verdict::Auth, now);
        assert_eq!(rest_secs(&h, now), 300);
        // A shorter rest never cuts a longer one short.
        h.observe_at(Verdict::RateLimited(Duration::from_secs(1)), now);
        assert_eq!(rest_secs(&h, now), 300);
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
