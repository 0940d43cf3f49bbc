//! Tenant limits (docs/api.md "Limits", docs/redis.md) behind one interface. The request path asks
//! a `Limiter` to `admit` a request (request bucket, concurrency, and where
//! the token bucket stands, in one decision), asks the `Admission` whether
//! the tenant may spend tokens upstream, and `settle`s its `Lease` with the
//! tokens the answer used. Nothing outside this module knows which backend
//! decided:
//!
//! - `local`: in-memory buckets and counters, one set per replica (the
//!   default, and the fallback while Redis is unavailable);
//! - `fleet`: the same limits kept in Redis for every replica: a busy
//!   tenant is decided from this replica's share of them (`lease`), with no
//!   round trip on the request path; a sparse one makes one round trip.
//!
//! Settling never waits: the local state changes at once and the Redis side
//! goes to a task through a bounded queue, so a `Drop` or a body's `poll`
//! can settle without holding a response back.

pub(crate) mod budget;
mod fleet;
mod headers;
mod lease;
mod local;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::config::{BudgetSpec, LimitSpec, OnError, RedisConfig};
use crate::http::error::GatewayError;
pub(crate) use crate::http::error::Limit;
use crate::metrics::Metrics;
use crate::shared::Redis;
use budget::{Budgets, Spend};

pub(crate) use local::{token_standing, token_verdict, RequestBucket, TokenBucket};

/// What a limit says about a tenant right now, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

/// A refused request: which limit, how long until it would pass, and where
/// the tenant stands on that limit (for the `x-ratelimit-*` headers).
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    pub(crate) limit: Limit,
    pub(crate) wait: Duration,
    pub(crate) standing: Option<Standing>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy)]
pub enum Denied {
    Limit(Refused),
    /// Redis is unavailable and `on_error = "deny"`.
    Unavailable,
}

/// Where a budgeted tenant stands: what the `x-sluice-budget-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BudgetStanding {
    pub(crate) limit_usd: f64,
    /// Never below 0.
    pub(crate) remaining_usd: f64,
    /// Until the period ends.
    pub(crate) reset: Duration,
}

/// Where the tenant stands after this request: what the headers report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Standings {
    pub(crate) requests: Option<Standing>,
    pub(crate) tokens: Option<Standing>,
    pub(crate) budget: Option<BudgetStanding>,
}

/// Seconds to a `Duration`, saturating: a hostile upstream can report
/// absurd usage, and that must not turn into a panic.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// A tenant's requests in flight on this replica that it decided alone
/// (without Redis, or while Redis is unavailable), with a version that
/// grows with every change: `version << 24 | count`. With shared limits, the
/// slots a replica holds in Redis are `lease::Slots`.
#[derive(Default)]
struct InFlight(AtomicU64);

const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const ACQUIRE: u64 = (1 << COUNT_BITS) + 1;
const RELEASE: u64 = (1 << COUNT_BITS) - 1;

/// One report of `InFlight`: (version, count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Count {
    version: u64,
    count: u64,
}

impl Count {
    fn of(packed: u64) -> Count {
        Count {
            version: packed >> COUNT_BITS,
            count: packed & COUNT_MASK,
        }
    }
}

impl InFlight {
    fn acquire(&self) -> Count {
        Count::of(
            self.0
                .fetch_add(ACQUIRE, Ordering::AcqRel)
                .wrapping_add(ACQUIRE),
        )
    }
    fn release(&self) -> Count {
        Count::of(
            self.0
                .fetch_add(RELEASE, Ordering::AcqRel)
                .wrapping_add(RELEASE),
        )
    }
    #[cfg(test)]
    fn now(&self) -> Count {
        Count::of(self.0.load(Ordering::Acquire))
    }
}

/// All limits of one tenant: the local buckets and counter, and the names
/// of its Redis keys when limits are shared. Shared (`Arc`) by the tenant
/// table, leases and, across a reload, by the new table when the spec is
/// unchanged.
pub struct TenantLimits {
    pub(crate) spec: LimitSpec,
    requests: Option<RequestBucket>,
    tokens: Option<TokenBucket>,
    in_flight: InFlight,
    /// `Some` when this tenant's limits are shared through Redis.
    keys: Option<fleet::Keys>,
    fallback: IntCounter,
    budget: Option<TenantBudget>,
}

/// A budgeted tenant's cap, its spend (kept by name across reloads) and
/// its gauges.
struct TenantBudget {
    spec: BudgetSpec,
    spend: Arc<Spend>,
    budgets: Arc<Budgets>,
    spent_gauge: prometheus::Gauge,
}

impl TenantBudget {
    /// The current period and what was spent in it (this replica's view).
    fn now(&self) -> (budget::Span, f64, i64) {
        let now = self.budgets.clock.now();
        let span = budget::span(self.spec.period, now);
        let spent = self.spend.spent(&span.key);
        (span, spent, now)
    }

    fn standing(&self, spent: f64, span: &budget::Span, now: i64) -> BudgetStanding {
        BudgetStanding {
            limit_usd: self.spec.usd,
            remaining_usd: (self.spec.usd - spent).max(0.0),
            reset: Duration::from_secs((span.end - now).max(0) as u64),
        }
    }

    /// Records spend locally (and for the state file and the gauge).
    fn charge(&self, key: &str, usd: f64) {
        self.spend.add(key, usd);
        self.budgets.mark_dirty();
        self.spent_gauge.set(self.spend.spent(key));
    }

    fn refresh_gauge(&self) {
        let (_, spent, _) = self.now();
        self.spent_gauge.set(spent);
    }
}

impl TenantLimits {
    fn is_unlimited(&self) -> bool {
        self.spec.requests_per_minute == 0
            && self.spec.tokens_per_minute == 0
            && self.spec.max_concurrent == 0
            && self.budget.is_none()
    }

    /// The budget this state was made for (a reload keeps the state only
    /// when this and the limits are unchanged).
    pub(crate) fn budget_spec(&self) -> Option<BudgetSpec> {
        self.budget.as_ref().map(|b| b.spec)
    }

    /// Requests in flight on this replica.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.now().count
    }

    /// Refuses a tenant without a whole token left, saying when it will
    /// have one (the local bucket).
    fn local_tokens(&self, now: Instant) -> Result<Option<Standing>, Refused> {
        match &self.tokens {
            None => Ok(None),
            Some(b) => b.check(now).map(Some).map_err(|(wait, standing)| Refused {
                limit: Limit::Tokens,
                wait,
                standing: Some(standing),
            }),
        }
    }

    /// Request bucket and concurrency, decided on this replica alone.
    fn admit_local(self: &Arc<Self>, standings: &mut Standings) -> Result<Admission, Denied> {
        standings.tokens = self.tokens.as_ref().map(|b| b.peek(Instant::now()));
        if let Some(b) = &self.budget {
            let (span, spent, now) = b.now();
            standings.budget = Some(b.standing(spent, &span, now));
        }
        if let Some(b) = &self.requests {
            match b.check() {
                Ok(s) => standings.requests = Some(s),
                Err((wait, standing)) => {
                    standings.requests = Some(standing);
                    return Err(Denied::Limit(Refused {
                        limit: Limit::Requests,
                        wait,
                        standing: Some(standing),
                    }));
                }
            }
        }
        let max = u64::from(self.spec.max_concurrent);
        let slot = Slot::for_cap(self.spec.max_concurrent);
        if slot == Slot::Held && self.in_flight.acquire().count > max {
            self.in_flight.release();
            return Err(Denied::Limit(concurrency_refused()));
        }
        Ok(Admission {
            lease: Some(Lease::new(self, slot, Decided::Locally)),
            check: UpstreamCheck::default(),
        })
    }
}

/// No clock says when a slot frees; one second is the honest hint.
fn concurrency_refused() -> Refused {
    Refused {
        limit: Limit::Concurrency,
        wait: Duration::from_secs(1),
        standing: None,
    }
}

/// The limiter the request path talks to. Chosen at start from config:
/// in memory, or shared through Redis with the in-memory limits as the
/// fallback.
pub struct Limiter {
    fleet: Option<fleet::Fleet>,
    budgets: Arc<Budgets>,
    /// Budgeted tenants, for the gauges and the state file's ticker;
    /// touched at config load and by the ticker, never per request.
    budgeted: Arc<std::sync::Mutex<Vec<std::sync::Weak<TenantLimits>>>>,
}

impl Limiter {
    /// The Redis through which limits are shared, if they are (an
    /// upstream's `max_concurrent` is then counted for the fleet too).
    pub(crate) fn shared_redis(&self) -> Option<&Arc<Redis>> {
        self.fleet.as_ref().map(fleet::Fleet::redis)
    }

    /// The in-memory limiter: every replica on its own, spend in memory.
    pub fn local() -> Limiter {
        Self::build(None, Budgets::memory(Arc::new(budget::SystemClock)))
    }

    /// Limits shared through `redis` when `[redis] limits` is on; spend in
    /// Redis then, else in `budgets` (its state file, if any). Starts the
    /// ticker that keeps budget gauges current and writes the state file.
    pub(crate) fn new(redis: Option<(&Arc<Redis>, &RedisConfig)>, budgets: Budgets) -> Limiter {
        let limiter = Self::build(redis, budgets);
        tokio::spawn(tick(
            Arc::clone(&limiter.budgets),
            Arc::downgrade(&limiter.budgeted),
        ));
        limiter
    }

    fn build(redis: Option<(&Arc<Redis>, &RedisConfig)>, budgets: Budgets) -> Limiter {
        let fleet = redis
            .filter(|(_, cfg)| cfg.limits)
            .map(|(redis, cfg)| fleet::Fleet::start(Arc::clone(redis), cfg.on_error));
        Limiter {
            fleet,
            budgets: Arc::new(budgets),
            budgeted: Arc::default(),
        }
    }

    /// At shutdown: sends the charges Redis has not confirmed, within
    /// `within` (see `fleet::Fleet::drain`).
    pub(crate) async fn drain(&self, within: Duration) {
        if let Some(fleet) = &self.fleet {
            fleet.drain(within).await;
        }
    }

    /// Writes the spend state file now (at shutdown).
    pub(crate) fn flush(&self) {
        if let Err(e) = self.budgets.persist() {
            tracing::error!(error = %e, "cannot write the budget state file");
        }
    }

    /// Whether spend survives a restart (Redis or a state file).
    pub(crate) fn spend_is_kept(&self) -> bool {
        self.fleet.is_some() || self.budgets.has_file()
    }

    /// The limiter state of one tenant. A reload calls this only for a
    /// tenant whose limits changed (or is new); the others keep theirs.
    pub fn tenant(
        &self,
        name: &str,
        spec: LimitSpec,
        budget: Option<BudgetSpec>,
        metrics: &Metrics,
    ) -> Arc<TenantLimits> {
        let budget = budget.map(|b| {
            metrics.budget_usd.with_label_values(&[name]).set(b.usd);
            let tb = TenantBudget {
                spec: b,
                spend: self.budgets.spend(name),
                budgets: Arc::clone(&self.budgets),
                spent_gauge: metrics.budget_spent_usd.with_label_values(&[name]),
            };
            tb.refresh_gauge();
            tb
        });
        let limits = Arc::new(TenantLimits {
            spec,
            requests: std::num::NonZeroU32::new(spec.requests_per_minute).map(|rpm| {
                RequestBucket::new(
                    rpm,
                    std::num::NonZeroU32::new(spec.request_burst)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                )
            }),
            tokens: (spec.tokens_per_minute > 0)
                .then(|| TokenBucket::new(spec.tokens_per_minute, Instant::now())),
            in_flight: InFlight::default(),
            keys: self.fleet.as_ref().map(|f| f.keys(name, spec)),
            fallback: metrics.limits_local_fallback.with_label_values(&[name]),
            budget,
        });
        if let Some(f) = &self.fleet {
            f.track(&limits);
        }
        if limits.budget.is_some() {
            let mut b = self.budgeted.lock().unwrap_or_else(|e| e.into_inner());
            b.retain(|w| w.strong_count() > 0);
            b.push(Arc::downgrade(&limits));
        }
        limits
    }

    /// Takes one request from the request bucket and a concurrency slot,
    /// and learns where the token bucket stands: one decision. With shared
    /// limits it takes at most one Redis round trip, and none while this
    /// replica's share lasts. `standings` is filled
    /// in for the headers whatever the outcome.
    pub async fn admit(
        &self,
        tenant: &Arc<TenantLimits>,
        standings: &mut Standings,
    ) -> Result<Admission, Denied> {
        if tenant.is_unlimited() {
            return Ok(Admission {
                lease: None,
                check: UpstreamCheck::default(),
            });
        }
        if let (Some(fleet), Some(keys)) = (&self.fleet, &tenant.keys) {
            // The share decides most requests of a busy tenant, with no
            // round trip and nothing to await.
            let took = match fleet.decide_here(tenant, keys, standings) {
                Ok(decision) => return decision,
                Err(took) => took,
            };
            match fleet.admit(tenant, keys, took, standings).await {
                Ok(decision) => return decision,
                Err(crate::shared::Unavailable) => {
                    if fleet.on_error == OnError::Deny {
                        return Err(Denied::Unavailable);
                    }
                    tenant.fallback.inc();
                }
            }
        }
        tenant.admit_local(standings)
    }
}

/// An admitted request: its lease (what it holds until settled) and the
/// checks it will face if it goes upstream.
pub struct Admission {
    pub lease: Option<Lease>,
    pub check: UpstreamCheck,
}

/// The token balance and spend admission saw when Redis decided; otherwise
/// the local bucket and spend are asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamCheck {
    balance: Option<f64>,
}

impl UpstreamCheck {
    /// Refuses a tenant whose budget is spent or whose token bucket is in
    /// deficit; only requests that go upstream ask (hits and coalesced
    /// answers are served). Decided from what admission saw, without
    /// another round trip.
    pub fn check(self, t: &TenantLimits, standings: &mut Standings) -> Result<(), Refused> {
        if let (Some(_), Some(standing)) = (&t.budget, standings.budget) {
            if standing.remaining_usd <= 0.0 {
                return Err(Refused {
                    limit: Limit::Budget,
                    wait: standing.reset.max(Duration::from_secs(1)),
                    standing: None,
                });
            }
        }
        let verdict = match (self.balance, &t.tokens) {
            (_, None) => Ok(None),
            (Some(balance), Some(_)) => token_verdict(t.spec.tokens_per_minute, balance)
                .map(Some)
                .map_err(|(wait, standing)| Refused {
                    limit: Limit::Tokens,
                    wait,
                    standing: Some(standing),
                }),
            (None, Some(_)) => t.local_tokens(Instant::now()),
        };
        match verdict {
            Ok(s) => {
                standings.tokens = s;
                Ok(())
            }
            Err(refused) => {
                standings.tokens = refused.standing;
                Err(refused)
            }
        }
    }
}

/// What an admitted request holds until it is settled: a concurrency slot
/// (if the tenant has a cap) and the duty to debit its tokens. Settled once,
/// by `settle` with the answer's tokens, or on drop with none.
pub struct Lease {
    tenant: Arc<TenantLimits>,
    slot: Slot,
    decided: Decided,
    settled: bool,
}

/// Whether a lease holds one of its tenant's concurrency slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Held,
    /// The tenant has no concurrency cap.
    Uncapped,
}

impl Slot {
    /// The slot a request of a tenant capped at `max_concurrent` takes.
    pub(crate) fn for_cap(max_concurrent: u32) -> Slot {
        if max_concurrent > 0 {
            Slot::Held
        } else {
            Slot::Uncapped
        }
    }
}

/// Where a request's admission was decided, and so where it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decided {
    /// By Redis's script: settled there too.
    InRedis,
    /// By this replica alone (no Redis, or Redis unavailable).
    Locally,
}

impl Lease {
    fn new(tenant: &Arc<TenantLimits>, slot: Slot, decided: Decided) -> Lease {
        Lease {
            tenant: Arc::clone(tenant),
            slot,
            decided,
            settled: false,
        }
    }

    /// Debits the tokens the answer used (the bucket may go into deficit),
    /// charges its cost to the budget and frees the concurrency slot.
    /// Never waits.
    pub fn settle(mut self, tokens: u64, usd: f64) {
        self.finish(tokens, usd);
    }

    fn finish(&mut self, tokens: u64, usd: f64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let t = &self.tenant;
        // Always charged locally too: while Redis is away, the local bucket
        // knows what this replica spent.
        if let Some(b) = &t.tokens {
            if tokens > 0 {
                b.debit(tokens, Instant::now());
            }
        }
        let spend = t.budget.as_ref().filter(|_| usd > 0.0).map(|b| {
            let (span, _, _) = b.now();
            b.charge(&span.key, usd);
            fleet::SpendCharge {
                period: span.key,
                end: span.end,
                usd,
            }
        });
        let slots = t.keys.as_ref().and_then(|k| k.slots.as_ref());
        let count = match (self.slot, self.decided, slots) {
            // A slot of those this replica holds in Redis: the count there
            // changes only when spare ones go back.
            (Slot::Held, Decided::InRedis, Some(slots)) => slots
                .release()
                .map_or(fleet::CountChange::None, |(version, count)| {
                    fleet::CountChange::Release(Count { version, count })
                }),
            (Slot::Held, _, _) => fleet::CountChange::Release(t.in_flight.release()),
            (Slot::Uncapped, _, _) => fleet::CountChange::None,
        };
        if let Some(keys) = &t.keys {
            // Charges reach Redis whoever decided the admission: what was
            // charged while Redis was away is added when it is back. The
            // count there changes only for a request Redis counted.
            let count = match self.decided {
                Decided::InRedis => count,
                Decided::Locally => fleet::CountChange::None,
            };
            keys.settle(t, tokens, count, spend);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.finish(0, 0.0);
    }
}

/// Keeps budget gauges current (a period that rolls over shows 0 at once)
/// and writes the spend state file when it changed: every second, so at
/// most the last seconds are lost to a crash.
async fn tick(
    budgets: Arc<Budgets>,
    tenants: std::sync::Weak<std::sync::Mutex<Vec<std::sync::Weak<TenantLimits>>>>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(tenants) = tenants.upgrade() else {
            return;
        };
        let live: Vec<Arc<TenantLimits>> = tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        drop(tenants);
        for t in live {
            if let Some(b) = &t.budget {
                b.refresh_gauge();
            }
        }
        if let Err(e) = budgets.persist() {
            tracing::error!(error = %e, "cannot write the budget state file");
        }
    }
}

impl From<Denied> for GatewayError {
    fn from(d: Denied) -> GatewayError {
        match d {
            Denied::Limit(r) => r.into(),
            Denied::Unavailable => GatewayError::SharedStateUnavailable,
        }
    }
}

impl From<Refused> for GatewayError {
    fn from(r: Refused) -> GatewayError {
        match r.limit {
            Limit::Budget => GatewayError::BudgetExceeded {
                retry_after: r.wait,
            },
            Limit::Requests | Limit::Tokens | Limit::Concurrency => GatewayError::RateLimited {
                limit: r.limit,
                retry_after: r.wait,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rpm: u32, burst: u32, tpm: u64, concurrent: u32) -> LimitSpec {
        LimitSpec {
            requests_per_minute: rpm,
            request_burst: burst,
            tokens_per_minute: tpm,
            max_concurrent: concurrent,
        }
    }

    fn admit(l: &Limiter, t: &Arc<TenantLimits>) -> Result<Admission, Denied> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(l.admit(t, &mut Standings::default()))
    }

    #[test]
    fn concurrency_is_released_when_settled_or_dropped() {
        let m = Metrics::new();
        let l = Limiter::local();
        let t = l.tenant("a", spec(0, 1, 0, 2), None, &m);
        let a = admit(&l, &t).expect("1");
        let b = admit(&l, &t).expect("2");
        match admit(&l, &t) {
            Err(Denied::Limit(r)) => assert_eq!(r.limit, Limit::Concurrency),
            _ => panic!("third is over the cap"),
        }
        assert_eq!(t.in_flight(), 2, "a refusal holds nothing");
        drop(a);
        assert_eq!(t.in_flight(), 1);
        b.lease.expect("lease").settle(0, 0.0);
        assert_eq!(t.in_flight(), 0);
        assert!(admit(&l, &t).is_ok());
    }

    #[test]
    fn settling_debits_the_token_bucket() {
        let m = Metrics::new();
        let l = Limiter::local();
        let t = l.tenant("a", spec(0, 1, 600, 0), None, &m);
        let mut s = Standings::default();
        let a = admit(&l, &t).expect("admitted");
        a.check.check(&t, &mut s).expect("full bucket");
        assert_eq!(s.tokens.map(|s| s.remaining), Some(600));
        a.lease.expect("lease").settle(700, 0.0);
        let a = admit(&l, &t).expect("the request bucket is unlimited");
        let r = a.check.check(&t, &mut s).expect_err("in deficit");
        assert_eq!(r.limit, Limit::Tokens);
        assert!(r.wait > Duration::from_secs(10));
    }

    #[test]
    fn unlimited_means_no_headers_and_no_lease() {
        let m = Metrics::new();
        let l = Limiter::local();
        let t = l.tenant("a", spec(0, 1, 0, 0), None, &m);
        let mut s = Standings::default();
        let a = admit(&l, &t).expect("ok");
        assert!(a.lease.is_none());
        a.check.check(&t, &mut s).expect("ok");
        assert!(s.requests.is_none() && s.tokens.is_none());
    }

    #[test]
    fn a_spent_budget_refuses_until_the_period_rolls_over() {
        use crate::config::BudgetPeriod;
        use std::sync::atomic::AtomicI64;
        struct Fake(AtomicI64);
        impl budget::Clock for Fake {
            fn now(&self) -> i64 {
                self.0.load(Ordering::Acquire)
            }
        }
        // Sunday 2026-11-29, 23:00 UTC.
        let clock = Arc::new(Fake(AtomicI64::new(1_795_993_200)));
        let m = Metrics::new();
        let l = Limiter::build(None, Budgets::memory(clock.clone()));
        let budget = BudgetSpec {
            usd: 1.0,
            period: BudgetPeriod::Week,
        };
        let t = l.tenant("a", spec(0, 1, 0, 0), Some(budget), &m);
        let mut s = Standings::default();
        let a = admit_with(&l, &t, &mut s).expect("admitted");
        a.check.check(&t, &mut s).expect("nothing spent yet");
        let b = s.budget.expect("budget standing");
        assert_eq!(b.remaining_usd, 1.0);
        assert_eq!(
            b.reset,
            Duration::from_secs(3600),
            "the week ends at Monday 00:00"
        );
        // One request under budget may overrun it; the next is refused.
        a.lease.expect("lease").settle(10, 1.25);
        let mut s = Standings::default();
        let a = admit_with(&l, &t, &mut s).expect("admission itself is not refused");
        let r = a.check.check(&t, &mut s).expect_err("spent");
        assert_eq!(r.limit, Limit::Budget);
        assert_eq!(r.wait, Duration::from_secs(3600));
        assert_eq!(
            s.budget.map(|b| b.remaining_usd),
            Some(0.0),
            "never below 0"
        );
        assert_eq!(m.budget_spent_usd.with_label_values(&["a"]).get(), 1.25);
        // Monday: a new period.
        clock.0.fetch_add(3600, Ordering::AcqRel);
        let mut s = Standings::default();
        let a = admit_with(&l, &t, &mut s).expect("admitted");
        a.check.check(&t, &mut s).expect("a new week");
        assert_eq!(s.budget.map(|b| b.remaining_usd), Some(1.0));
        // A reload that changes the cap keeps the period's spend.
        a.lease.expect("lease").settle(1, 0.5);
        let bigger = BudgetSpec { usd: 2.0, ..budget };
        let t2 = l.tenant("a", spec(0, 1, 0, 0), Some(bigger), &m);
        let mut s = Standings::default();
        admit_with(&l, &t2, &mut s).expect("admitted");
        assert_eq!(s.budget.map(|b| b.remaining_usd), Some(1.5));
    }

    fn admit_with(
        l: &Limiter,
        t: &Arc<TenantLimits>,
        s: &mut Standings,
    ) -> Result<Admission, Denied> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(l.admit(t, s))
    }

    #[test]
    fn in_flight_reports_grow_in_version() {
        let f = InFlight::default();
        let a = f.acquire();
        let b = f.acquire();
        let c = f.release();
        assert_eq!((a.count, b.count, c.count), (1, 2, 1));
        assert!(a.version < b.version && b.version < c.version);
        assert_eq!(f.now(), c);
    }
}
