//! The Redis backend of the limiter (docs/redis.md): every replica that
//! uses the same Redis and `key_prefix` shares each tenant's request bucket, token
//! bucket, concurrency count and spend.
//!
//! - A tenant is decided from this replica's share (`lease::Share`):
//!   requests leased from the fleet's request bucket and spent here, for a
//!   capped tenant slots held in Redis (`lease::Slots`), and a view of the
//!   token balance and spend no older than `lease::VIEW_TTL`. ADMIT runs on
//!   the request path only when the share or the spare slots are spent,
//!   the view is too old, or the tenant is too sparse here to be worth a
//!   share; it takes the request with a new share (at most what the bucket
//!   holds over the lessees and `lease::K`, so one request near the limit)
//!   and, for a capped tenant, the slot with spare ones (at most what is
//!   free over the live replicas and `lease::K`). RENEW, every
//!   `lease::TICK` while the tenant is busy here, settles the ledger, tops
//!   the share up and reads the view again; it gives the share back once
//!   the tenant is idle, and `Fleet::drain` at shutdown, and spare slots go
//!   back the same way (by SETTLE's report). A replica that dies leaves its
//!   share taken (stricter, never looser) and its slots until its lease in
//!   the live set lapses.
//! - SETTLE sends a count change (spare slots given back, a report) with
//!   the ledger's totals, through a task fed by a bounded queue, so nothing
//!   on the response path waits for it.
//! - Charges are exactly once (`Ledger`): a replica's ledger of a tenant
//!   holds cumulative totals, and Redis applies a total only past the last
//!   one it applied from that ledger (SETTLE and RENEW alike). A settlement
//!   that times out, fails or never fits the queue is not lost (the next
//!   totals carry it) and one sent twice is not charged twice; unconfirmed
//!   totals are sent again every `RETRY_EVERY`, and at shutdown
//!   (`Fleet::drain`). A count that may be wrong on Redis (an admission or
//!   release whose round trip failed) is reported again at once rather
//!   than at the next renewal.
//! - Concurrency is a hash of the slots each replica holds. Every change a
//!   replica sends (an ask, spare slots given back, a report every few
//!   seconds) carries the replica's whole count after it and a version that
//!   only grows on that replica, and Redis keeps the newest: a change lost
//!   or timed out (an ask Redis ran though Sluice gave up on it) is made
//!   good by the next one, and a late one never undoes a newer one. A
//!   replica's entry lives as long as its lease in a sorted set, renewed by
//!   its reports; one that dies stops renewing and its count is dropped
//!   within `LEASE_TTL`.
//! - Time is Redis's (`TIME`), so replicas with skewed clocks agree.
//! - Every key carries the tenant as a cluster hash tag (`prefix:{tenant}:…`)
//!   and every key expires. The request and token keys name the limits they
//!   hold, so a reload that changes a tenant's limits starts it afresh, as
//!   in memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::lease::{us, Share, SlotChange, Slots, K, LESSEE_TTL, TICK};
use super::{
    concurrency_refused, token_standing, Admission, Count, Decided, Denied, Lease, Limit, Refused,
    Slot, Standings, TenantLimits, UpstreamCheck,
};
use crate::config::{LimitSpec, OnError};
use crate::shared::{Lua, Op, Redis, Unavailable};

/// How long a replica's concurrency count outlives its last report.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a running replica renews its counts.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Settlements waiting for the settler; past this one is not queued (its
/// charge is in the ledger all the same, and its count is reported again).
const QUEUE: usize = 8192;

/// ADMIT's reply, decoded (admit.lua says what each item is).
struct AdmitReply {
    /// 0 admitted, 1 refused for requests.
    verdict: i64,
    /// Requests leased, the one admitted included.
    granted: i64,
    wait_us: i64,
    remaining: i64,
    reset_us: i64,
    /// The token balance; "" without a token limit.
    tokens: String,
    /// The period's spend; "" without a budget.
    spent: String,
    /// The version of the replica's count below (-1: no slot asked).
    slot_version: i64,
    /// The replica's count in the concurrency hash: the slots it holds.
    slots: i64,
    /// Spare slots it may keep idle.
    spare: i64,
}

impl redis::FromRedisValue for AdmitReply {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let (
            verdict,
            granted,
            wait_us,
            remaining,
            reset_us,
            tokens,
            spent,
            slot_version,
            slots,
            spare,
        ) = <(i64, i64, i64, i64, i64, String, String, i64, i64, i64)>::from_redis_value(v)?;
        Ok(AdmitReply {
            verdict,
            granted,
            wait_us,
            remaining,
            reset_us,
            tokens,
            spent,
            slot_version,
            slots,
            spare,
        })
    }
}

/// RENEW's reply, decoded (renew.lua says what each item is).
struct RenewReply {
    granted: i64,
    remaining: i64,
    reset_us: i64,
    /// The token balance; "" without a token limit.
    tokens: String,
    /// The period's spend; "" without a budget.
    spent: String,
}

impl redis::FromRedisValue for RenewReply {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let (granted, remaining, reset_us, tokens, spent) =
            <(i64, i64, i64, String, String)>::from_redis_value(v)?;
        Ok(RenewReply {
            granted,
            remaining,
            reset_us,
            tokens,
            spent,
        })
    }
}

struct Scripts {
    admit: Lua,
    settle: Lua,
    renew: Lua,
}

/// What a settlement says of this replica's in-flight count.
#[derive(Debug, Clone, Copy)]
pub(super) enum CountChange {
    None,
    /// One request fewer (this is the count after it).
    Release(Count),
    /// The whole count, for renewal and after Redis lost it.
    Report(Count),
}

/// Spend to add to a period's total.
#[derive(Debug, Clone)]
pub(super) struct SpendCharge {
    pub(crate) period: String,
    /// When the period ends (Unix seconds): its key expires a week later.
    pub(crate) end: i64,
    pub(crate) usd: f64,
}

/// How long a period's spend outlives the period in Redis.
const SPEND_KEPT_AFTER: i64 = 7 * 86_400;

/// One settlement on its way to Redis: a tenant whose ledger has charges
/// to send, and what happened to this replica's count of its requests.
struct Settle {
    tenant: Arc<TenantLimits>,
    count: CountChange,
}

/// What one tenant's limits charged on this replica, as cumulative totals,
/// and how much of each Redis confirmed. SETTLE applies a total past the
/// last one it applied, so sending the same totals again, out of order, or
/// after a round trip that timed out but ran on Redis, charges nothing
/// twice; and a charge that could not be sent (queue full, Redis slow or
/// away) rides the next totals sent: nothing is lost either.
pub(super) struct Ledger {
    /// `prefix:{tenant}:charged:<replica>.<n>`: one per `TenantLimits`, so a
    /// reload that makes new limits starts a ledger of its own.
    key: String,
    /// The tenant's name, for the log line of what shutdown could not send.
    tenant: String,
    state: Mutex<LedgerState>,
}

#[derive(Default)]
struct LedgerState {
    tokens: u64,
    tokens_confirmed: u64,
    /// By period.
    spend: std::collections::BTreeMap<String, PeriodSpend>,
    /// The count on Redis may be wrong (a release or an admission whose
    /// outcome is unknown): an absolute report is due.
    report_due: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct PeriodSpend {
    usd: f64,
    confirmed: f64,
    /// When the period ends (Unix seconds).
    end: i64,
}

/// A ledger's totals as sent in one SETTLE.
#[derive(Debug, Clone, Default)]
struct Totals {
    tokens: u64,
    tokens_confirmed: u64,
    /// The periods not confirmed whole (at most a few: the current one, and
    /// one that ended while Redis was away).
    spend: Vec<(String, PeriodSpend)>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn charge(&self, tokens: u64, spend: Option<&SpendCharge>) {
        let mut s = self.lock();
        s.tokens = s.tokens.saturating_add(tokens);
        if let Some(c) = spend {
            let p = s.spend.entry(c.period.clone()).or_default();
            p.usd += c.usd;
            p.end = c.end;
        }
    }

    fn report_due(&self) {
        self.lock().report_due = true;
    }

    /// Takes the due report, if any.
    fn take_report(&self) -> bool {
        std::mem::take(&mut self.lock().report_due)
    }

    fn totals(&self) -> Totals {
        let s = self.lock();
        Totals {
            tokens: s.tokens,
            tokens_confirmed: s.tokens_confirmed,
            spend: s
                .spend
                .iter()
                .filter(|(_, p)| p.usd > p.confirmed)
                .map(|(k, p)| (k.clone(), *p))
                .collect(),
        }
    }

    /// Tokens charged in all.
    fn tokens(&self) -> u64 {
        self.lock().tokens
    }

    /// Tokens Redis confirmed.
    fn confirmed_tokens(&self) -> u64 {
        self.lock().tokens_confirmed
    }

    /// Whether Redis has not confirmed everything charged.
    fn unconfirmed(&self) -> bool {
        let s = self.lock();
        s.tokens > s.tokens_confirmed || s.spend.values().any(|p| p.usd > p.confirmed)
    }

    /// Redis applied `sent` (tokens, and the spend of `period` if any).
    fn confirm(&self, sent: &Totals, period: Option<&(String, PeriodSpend)>) {
        let mut s = self.lock();
        s.tokens_confirmed = s.tokens_confirmed.max(sent.tokens);
        if let Some((key, p)) = period {
            if let Some(mine) = s.spend.get_mut(key) {
                mine.confirmed = mine.confirmed.max(p.usd);
            }
        }
        // A period confirmed whole and over for a day is not sent again.
        let day_ago = unix_now() - 86_400;
        s.spend
            .retain(|_, p| p.usd > p.confirmed || p.end > day_ago);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A tenant's Redis keys, its ledger, and the queue its settlements go
/// through.
pub(crate) struct Keys {
    req: String,
    tok: String,
    conc: String,
    live: String,
    lessees: String,
    /// This replica's share of the request bucket and its view of the
    /// fleet, from which its requests are decided here.
    share: Share,
    /// A capped tenant's slots held by this replica.
    pub(super) slots: Option<Slots>,
    /// `prefix:{tenant}:spend:`, followed by the period.
    spend_prefix: String,
    ledger: Ledger,
    queue: mpsc::Sender<Settle>,
}

impl Keys {
    /// Charges the ledger at once and queues the Redis side; never waits.
    pub(super) fn settle(
        &self,
        tenant: &Arc<TenantLimits>,
        tokens: u64,
        count: CountChange,
        spend: Option<SpendCharge>,
    ) {
        let debit = tokens > 0 && tenant.spec.tokens_per_minute > 0;
        if debit || spend.is_some() {
            self.ledger
                .charge(if debit { tokens } else { 0 }, spend.as_ref());
        } else if matches!(count, CountChange::None) {
            return;
        }
        // Busy traffic is settled in batches (RENEW carries the ledger's
        // totals at the next tick); the first charge after a quiet tick goes
        // at once, and so does a count change.
        if matches!(count, CountChange::None) && !self.share.flush_now(Instant::now()) {
            return;
        }
        let msg = Settle {
            tenant: Arc::clone(tenant),
            count,
        };
        if self.queue.try_send(msg).is_err() {
            // Nothing is lost: the charge is in the ledger, sent with the
            // next totals, and the count is reported again.
            self.ledger.report_due();
            tracing::debug!("settlement queue full; the ledger keeps the charge");
        }
    }

    /// This replica's count of a capped tenant to report: the slots it
    /// holds (a tenant without a cap has none).
    fn count_now(&self) -> Option<Count> {
        let (version, count) = self.slots.as_ref()?.report();
        Some(Count { version, count })
    }

    /// Admission's outcome on Redis is unknown (its round trip failed):
    /// the count there may hold a slot for nothing until reported.
    pub(super) fn count_unsure(&self) {
        self.ledger.report_due();
    }

    /// The Redis key of a period's spend.
    fn spend_key(&self, period: &str) -> String {
        format!("{}{period}", self.spend_prefix)
    }
}

/// The Redis backend, as the limiter holds it.
pub(crate) struct Fleet {
    redis: Arc<Redis>,
    pub(crate) on_error: OnError,
    scripts: Arc<Scripts>,
    queue: mpsc::Sender<Settle>,
    /// Tenants with limits shared here, for renewal and for charges to
    /// send again; touched at config load and by the settler's ticks, never
    /// per request.
    tracked: Arc<Mutex<Vec<Weak<TenantLimits>>>>,
    /// Ledgers made, so each has a name of its own.
    ledgers: AtomicU64,
}

impl Fleet {
    pub(crate) fn start(redis: Arc<Redis>, on_error: OnError) -> Fleet {
        let scripts = Arc::new(Scripts {
            admit: redis.lua(
                "admit",
                concat!(
                    include_str!("lua/prelude.lua"),
                    include_str!("lua/admit.lua")
                ),
            ),
            renew: redis.lua(
                "renew",
                concat!(
                    include_str!("lua/prelude.lua"),
                    include_str!("lua/renew.lua")
                ),
            ),
            settle: redis.lua(
                "settle",
                concat!(
                    include_str!("lua/prelude.lua"),
                    include_str!("lua/settle.lua")
                ),
            ),
        });
        let (queue, rx) = mpsc::channel(QUEUE);
        let tracked = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(settler(
            Arc::clone(&redis),
            Arc::clone(&scripts),
            rx,
            Arc::clone(&tracked),
        ));
        Fleet {
            redis,
            on_error,
            scripts,
            queue,
            tracked,
            ledgers: AtomicU64::new(0),
        }
    }

    pub(crate) fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    pub(crate) fn keys(&self, tenant: &str, spec: LimitSpec) -> Keys {
        let r = &self.redis;
        Keys {
            req: r.tenant_key(
                tenant,
                &format!("req:{}:{}", spec.requests_per_minute, spec.request_burst),
            ),
            tok: r.tenant_key(tenant, &format!("tok:{}", spec.tokens_per_minute)),
            conc: r.tenant_key(tenant, "conc"),
            live: r.tenant_key(tenant, "live"),
            lessees: r.tenant_key(tenant, "lessees"),
            share: Share::new(),
            slots: (spec.max_concurrent > 0).then(Slots::new),
            spend_prefix: r.tenant_key(tenant, "spend:"),
            ledger: Ledger {
                key: r.tenant_key(
                    tenant,
                    &format!(
                        "charged:{}.{}",
                        r.replica(),
                        self.ledgers.fetch_add(1, Ordering::Relaxed)
                    ),
                ),
                tenant: tenant.to_string(),
                state: Mutex::default(),
            },
            queue: self.queue.clone(),
        }
    }

    pub(crate) fn track(&self, tenant: &Arc<TenantLimits>) {
        if tenant.keys.is_none() {
            return;
        }
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.retain(|w| w.strong_count() > 0);
        tracked.push(Arc::downgrade(tenant));
    }

    /// At shutdown: sends what Redis has not confirmed until it has, or
    /// until `within` runs out; what is left is logged at error with its
    /// totals per tenant, so an operator can reconcile.
    pub(crate) async fn drain(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        // Unused shares go back to the fleet, with the charges they carry.
        let shares: Vec<(Arc<TenantLimits>, Renewal)> = live(&self.tracked)
            .into_iter()
            .filter_map(|t| {
                let keys = t.keys.as_ref()?;
                let back = keys.share.take_all();
                let slots = keys.slots.as_ref().and_then(Slots::shrink);
                Some((
                    t,
                    Renewal {
                        want: 0,
                        back,
                        slots,
                    },
                ))
            })
            .filter(|(t, r)| {
                r.back > 0
                    || r.slots.is_some()
                    || t.keys.as_ref().is_some_and(|k| k.ledger.unconfirmed())
            })
            .collect();
        let gives = shares
            .iter()
            .map(|(t, r)| renew_share(&self.redis, &self.scripts, t, *r));
        let _ = tokio::time::timeout_at(deadline, futures_util::future::join_all(gives)).await;
        loop {
            let owing: Vec<Arc<TenantLimits>> = live(&self.tracked)
                .into_iter()
                .filter(|t| t.keys.as_ref().is_some_and(|k| k.ledger.unconfirmed()))
                .collect();
            if owing.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                for keys in owing.iter().filter_map(|t| t.keys.as_ref()) {
                    let totals = keys.ledger.totals();
                    let usd: Vec<String> = totals
                        .spend
                        .iter()
                        .map(|(period, p)| format!("{period}={:.9}", p.usd - p.confirmed))
                        .collect();
                    tracing::error!(
                        tenant = %keys.ledger.tenant,
                        tokens = totals.tokens - totals.tokens_confirmed.min(totals.tokens),
                        usd = %usd.join(","),
                        "charges not in Redis at shutdown: add them to the tenant's totals by hand"
                    );
                }
                return;
            }
            let sends = owing
                .iter()
                .map(|t| send(&self.redis, &self.scripts, t, CountChange::None));
            let sent = futures_util::future::join_all(sends).await;
            if sent.iter().any(Result::is_err) {
                let next = tokio::time::Instant::now() + Duration::from_millis(200);
                tokio::time::sleep_until(next.min(deadline)).await;
            }
        }
    }

    /// Decides a request from this replica's share, without a round trip,
    /// when it can: a busy tenant whose share lasts, whose view is fresh and
    /// (capped) who holds a spare slot, or one the fleet's bucket is known
    /// to refuse. `Err`: `admit` must ask Redis (with the request taken
    /// from the share, if one was).
    pub(crate) fn decide_here(
        &self,
        t: &Arc<TenantLimits>,
        keys: &Keys,
        standings: &mut Standings,
    ) -> Result<Result<Admission, Denied>, Took> {
        let share = &keys.share;
        if !self.redis.is_up() {
            return Err(Took(None));
        }
        let spec = t.spec;
        let now = Instant::now();
        let view = share.view();
        let rpm = spec.requests_per_minute > 0;
        if rpm {
            if let Some(wait) = view.refused(now) {
                // The fleet's bucket is known empty until then: refused
                // without asking again.
                let standing = view.requests(spec.requests_per_minute, 0, now);
                standings.requests = Some(standing);
                return Ok(Err(Denied::Limit(Refused {
                    limit: Limit::Requests,
                    wait,
                    standing: Some(standing),
                })));
            }
        }
        // `Some(left)`: one request taken from the share (a tenant without
        // a request limit needs none, and takes none).
        let took = if rpm { share.take() } else { Some(0) };
        let needs_view = spec.tokens_per_minute > 0 || t.budget.is_some();
        let Some(left) = took else {
            return Err(Took(None));
        };
        if !(share.busy() && (!needs_view || view.fresh(now))) {
            return Err(Took(rpm.then_some(left)));
        }
        // A capped tenant needs a spare slot of those this replica holds.
        let slot = match &keys.slots {
            Some(slots) if slots.take() => Slot::Held,
            Some(_) => return Err(Took(rpm.then_some(left))),
            None => Slot::Uncapped,
        };
        share.admitted(now);
        let balance = view.balance(spec.tokens_per_minute, keys.ledger.tokens(), now);
        standings.requests = rpm.then(|| view.requests(spec.requests_per_minute, left, now));
        standings.tokens = balance.map(|b| token_standing(spec.tokens_per_minute, b));
        if let Some(b) = &t.budget {
            let (span, spent, unix) = b.now();
            standings.budget = Some(b.standing(spent, &span, unix));
        }
        Ok(Ok(Admission {
            lease: Some(Lease::new(t, slot, Decided::InRedis)),
            check: UpstreamCheck { balance },
        }))
    }

    /// Decides a request for the fleet with one round trip: ADMIT takes the
    /// request (unless `took` holds one of the share already) with a new
    /// share, a slot with spare ones for a capped tenant, and reads the
    /// view again. `Err(Unavailable)`: Redis did not answer (or is known
    /// down), and nothing was taken.
    pub(crate) async fn admit(
        &self,
        t: &Arc<TenantLimits>,
        keys: &Keys,
        took: Took,
        standings: &mut Standings,
    ) -> Result<Result<Admission, Denied>, Unavailable> {
        if !self.redis.is_up() {
            if let Took(Some(_)) = took {
                keys.share.add(1);
            }
            return Err(Unavailable);
        }
        self.admit_leased(t, keys, &keys.share, took, standings)
            .await
    }

    /// ADMIT.
    async fn admit_leased(
        &self,
        t: &Arc<TenantLimits>,
        keys: &Keys,
        share: &Share,
        Took(took): Took,
        standings: &mut Standings,
    ) -> Result<Result<Admission, Denied>, Unavailable> {
        let spec = t.spec;
        let now = Instant::now();
        let rpm = spec.requests_per_minute > 0;
        let took = if rpm { took } else { Some(0) };
        let budget = t.budget.as_ref().map(|b| {
            let (span, _, unix) = b.now();
            (b, span, unix)
        });
        let need: u64 = if took.is_some() { 0 } else { 1 };
        let want = if rpm {
            need + share.target().saturating_sub(share.left())
        } else {
            0
        };
        let spend_key = budget
            .as_ref()
            .map(|(_, span, _)| keys.spend_key(&span.key));
        // A capped tenant asks for its slot, and for spare ones as it asks
        // for a share of requests: none while it is sparse here.
        let ask = keys.slots.as_ref().map(|slots| slots.ask(share.target()));
        let mut inv = self.scripts.admit.call(
            &[
                &keys.req,
                &keys.tok,
                &keys.lessees,
                spend_key.as_ref().unwrap_or(&keys.tok),
                &keys.conc,
                &keys.live,
            ],
            160,
        );
        inv.arg(spec.requests_per_minute)
            .arg(spec.request_burst)
            .arg(spec.tokens_per_minute)
            .arg(self.redis.replica())
            .arg(LESSEE_TTL.as_millis() as u64)
            .arg(if budget.is_some() { "1" } else { "0" })
            .arg(need)
            .arg(want)
            .arg(K)
            .arg(spec.max_concurrent)
            .arg(ask.map_or(0, |a| a.version))
            .arg(ask.map_or(0, |a| a.needed))
            .arg(ask.map_or(0, |a| a.wanted))
            .arg(ask.map_or(0, |a| a.if_refused))
            .arg(LEASE_TTL.as_millis() as u64);
        // The balance read includes what Redis had confirmed of this
        // replica's ledger when it was sent (or more: stricter, not looser).
        let included = keys.ledger.confirmed_tokens();
        let reply: Result<AdmitReply, _> = self
            .redis
            .invoke(Op::Limits, &self.scripts.admit, &inv)
            .await;
        let AdmitReply {
            verdict,
            granted,
            wait_us,
            remaining,
            reset_us,
            tokens,
            spent,
            slot_version,
            slots: held,
            spare,
        } = match reply {
            Ok(r) => r,
            Err(e) => {
                if rpm && took.is_some() {
                    // Taken from this replica's own share: it is still there.
                    share.add(1);
                }
                if let Some(slots) = &keys.slots {
                    slots.unasked();
                    // Redis may have counted the ask all the same.
                    keys.count_unsure();
                }
                return Err(e);
            }
        };
        let slot = match &keys.slots {
            Some(slots) => {
                let admitted = verdict == 0;
                slots.answered(
                    slot_version,
                    held.max(0) as u64,
                    spare.max(0) as u64,
                    admitted,
                );
                if verdict == 2 {
                    // Its count on Redis may hold a request still waiting
                    // that is refused in turn: reported again soon.
                    keys.count_unsure();
                }
                Slot::Held
            }
            None => Slot::Uncapped,
        };
        let answered = Instant::now();
        let balance = tokens.parse::<f64>().ok();
        share.update(|v| {
            v.at = Some(answered);
            v.remaining = remaining.max(0) as u64;
            v.reset = us(reset_us);
            v.balance = balance;
            v.included = included;
            v.refused_until = (verdict == 1).then(|| answered + us(wait_us));
        });
        if let (Some((b, span, unix)), Ok(fleet)) = (&budget, spent.parse::<f64>()) {
            // The fleet's spend, plus what this replica spent that Redis
            // has not taken yet.
            b.spend.observe(&span.key, fleet);
            standings.budget = Some(b.standing(b.spend.spent(&span.key), span, *unix));
        }
        standings.tokens = balance.map(|b| token_standing(spec.tokens_per_minute, b));
        if verdict == 2 {
            if rpm && took.is_some() {
                share.add(1);
            }
            standings.requests = rpm.then(|| {
                share
                    .view()
                    .requests(spec.requests_per_minute, share.left(), answered)
            });
            return Ok(Err(Denied::Limit(concurrency_refused())));
        }
        if verdict != 0 {
            let standing = share.view().requests(spec.requests_per_minute, 0, answered);
            standings.requests = Some(standing);
            return Ok(Err(Denied::Limit(Refused {
                limit: Limit::Requests,
                wait: us(wait_us),
                standing: Some(standing),
            })));
        }
        share.add((granted.max(0) as u64).saturating_sub(need));
        share.admitted(now);
        let view = share.view();
        standings.requests =
            rpm.then(|| view.requests(spec.requests_per_minute, share.left(), answered));
        let balance = view.balance(spec.tokens_per_minute, keys.ledger.tokens(), answered);
        Ok(Ok(Admission {
            lease: Some(Lease::new(t, slot, Decided::InRedis)),
            check: UpstreamCheck { balance },
        }))
    }
}

/// How often charges Redis has not confirmed, and due count reports, are
/// sent again.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// How long a ledger outlives its last charge in Redis (a replica retries
/// a charge within seconds; an idle ledger's totals are all confirmed).
const LEDGER_TTL: Duration = Duration::from_secs(3600);

/// Sends settlements as they come (all that are waiting at once, so they
/// share the connection's pipeline); every `RETRY_EVERY`, the charges Redis
/// has not confirmed and the counts that may be wrong there; and every
/// `RENEW_EVERY` the count of each tenant with requests in flight, keeping
/// its lease alive.
async fn settler(
    redis: Arc<Redis>,
    scripts: Arc<Scripts>,
    mut rx: mpsc::Receiver<Settle>,
    tracked: Arc<Mutex<Vec<Weak<TenantLimits>>>>,
) {
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = tokio::time::interval(RETRY_EVERY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shares = tokio::time::interval(TICK);
    shares.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(64);
    // Tenants whose charges failed to reach Redis, held until confirmed
    // even if a reload dropped them meanwhile.
    let mut owing: Vec<Arc<TenantLimits>> = Vec::new();
    loop {
        tokio::select! {
            got = rx.recv_many(&mut batch, 64) => {
                if got == 0 {
                    return;
                }
            }
            _ = retry.tick() => {
                owing.retain(|t| t.keys.as_ref().is_some_and(|k| k.ledger.unconfirmed()));
                // Charges of a tenant with a share go at its own ticks
                // (below), unless a reload dropped it while it still owed;
                // a count that may be wrong is reported here.
                for t in live(&tracked).into_iter().chain(owing.iter().cloned()) {
                    let Some(keys) = &t.keys else { continue };
                    if let Some(count) = keys.ledger.take_report().then(|| keys.count_now()).flatten() {
                        batch.push(Settle { tenant: Arc::clone(&t), count: CountChange::Report(count) });
                    } else if keys.ledger.unconfirmed()
                        && owing.iter().any(|o| Arc::ptr_eq(o, &t))
                    {
                        batch.push(Settle { tenant: Arc::clone(&t), count: CountChange::None });
                    }
                }
            }
            _ = shares.tick(), if redis.is_up() => {
                // While Redis is down nothing is due: a share would be
                // taken out to be given back and lost with the round trip.
                let due: Vec<(Arc<TenantLimits>, Renewal)> = live(&tracked)
                    .into_iter()
                    .filter_map(|t| Renewal::due(&t).map(|r| (t, r)))
                    .collect();
                let sends = due.iter().map(|(t, r)| renew_share(&redis, &scripts, t, *r));
                let sent = futures_util::future::join_all(sends).await;
                for ((t, _), sent) in due.into_iter().zip(sent) {
                    if sent.is_err() && !owing.iter().any(|o| Arc::ptr_eq(o, &t)) {
                        owing.push(t);
                    }
                }
            }
            _ = renew.tick() => {
                for t in live(&tracked) {
                    let Some(keys) = &t.keys else { continue };
                    if let Some(slots) = &keys.slots {
                        // Held slots keep the replica's lease alive.
                        if !slots.is_empty() {
                            let (version, count) = slots.report();
                            let count = Count { version, count };
                            batch.push(Settle { tenant: Arc::clone(&t), count: CountChange::Report(count) });
                        }
                    }
                }
            }
        }
        let sends = batch.drain(..).map(|s| {
            let (redis, scripts) = (&redis, &scripts);
            async move {
                let sent = send(redis, scripts, &s.tenant, s.count).await;
                (s, sent)
            }
        });
        for (s, sent) in futures_util::future::join_all(sends).await {
            if sent.is_err() && !owing.iter().any(|t| Arc::ptr_eq(t, &s.tenant)) {
                owing.push(s.tenant);
            }
        }
    }
}

/// A request `Fleet::decide_here` took from the share before it found it
/// must ask Redis: how many are left after it (`None`: none was taken).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Took(Option<u64>);

/// What a tick sends for a tenant with a share.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    /// Requests to add to the share.
    want: u64,
    /// Requests given back (taken out of the share already).
    back: u64,
    /// Spare slots given back: the count to report.
    slots: Option<SlotChange>,
}

impl Renewal {
    /// What a tick owes the tenant, if anything: its charges, a fresh view
    /// while it is busy (so the token and budget checks stay within
    /// `VIEW_TTL`), a top-up of its share while it is in use, and the
    /// share back once it is idle.
    fn due(t: &TenantLimits) -> Option<Renewal> {
        let keys = t.keys.as_ref()?;
        let share = &keys.share;
        let busy = share.rotate();
        let now = Instant::now();
        let idle = share.idle(now);
        let rpm = t.spec.requests_per_minute > 0;
        let back = if idle { share.take_all() } else { 0 };
        let slots = keys.slots.as_ref().filter(|_| idle).and_then(Slots::shrink);
        // Topped up when it would not last another tick at the last tick's
        // pace, to two ticks' worth: a steady tenant asks every other tick.
        let (target, left) = (share.target(), share.left());
        let want = if rpm && !idle && left < target {
            2 * target - left
        } else {
            0
        };
        let needs_view = t.spec.tokens_per_minute > 0 || t.budget.is_some();
        let refresh = busy && needs_view;
        let owes = keys.ledger.unconfirmed();
        (back > 0 || want > 0 || refresh || owes || slots.is_some()).then_some(Renewal {
            want,
            back,
            slots,
        })
    }
}

/// One RENEW: settles the ledger's totals (spend of an earlier period goes
/// by SETTLE), tops the share up or gives it back, and reads the view
/// again. A share given back whose round trip failed is not put back: it
/// may have reached Redis, and a share lost is only stricter.
async fn renew_share(
    redis: &Redis,
    scripts: &Scripts,
    t: &Arc<TenantLimits>,
    r: Renewal,
) -> Result<(), Unavailable> {
    let (Some(keys), spec) = (&t.keys, t.spec) else {
        return Ok(());
    };
    let share = &keys.share;
    if let Some((version, count)) = r.slots {
        send(
            redis,
            scripts,
            t,
            CountChange::Report(Count { version, count }),
        )
        .await?;
    }
    let totals = keys.ledger.totals();
    let budget = t.budget.as_ref().map(|b| {
        let (span, _, unix) = b.now();
        (b, span, unix)
    });
    let current = budget.as_ref().map(|(_, span, _)| span.key.as_str());
    if totals
        .spend
        .iter()
        .any(|(k, _)| Some(k.as_str()) != current)
    {
        send(redis, scripts, t, CountChange::None).await?;
    }
    let period = totals
        .spend
        .iter()
        .find(|(k, _)| Some(k.as_str()) == current);
    let spend_key = budget
        .as_ref()
        .map(|(_, span, _)| keys.spend_key(&span.key));
    let mut inv = scripts.renew.call(
        &[
            &keys.req,
            &keys.tok,
            &keys.lessees,
            spend_key.as_ref().unwrap_or(&keys.tok),
            &keys.ledger.key,
        ],
        224,
    );
    inv.arg(spec.requests_per_minute)
        .arg(spec.request_burst)
        .arg(spec.tokens_per_minute)
        .arg(redis.replica())
        .arg(LESSEE_TTL.as_millis() as u64)
        .arg(if budget.is_some() { "1" } else { "0" })
        .arg(r.want)
        .arg(r.back)
        .arg(K);
    ledger_args(&mut inv, &totals, period);
    let RenewReply {
        granted,
        remaining,
        reset_us,
        tokens,
        spent,
    } = redis.invoke(Op::Limits, &scripts.renew, &inv).await?;
    keys.ledger.confirm(&totals, period);
    share.add(granted.max(0) as u64);
    let answered = Instant::now();
    share.update(|v| {
        v.at = Some(answered);
        v.flushed = Some(answered);
        if spec.requests_per_minute > 0 {
            v.remaining = remaining.max(0) as u64;
            v.reset = us(reset_us);
            if remaining > 0 || granted > 0 {
                v.refused_until = None;
            }
        }
        v.balance = tokens.parse::<f64>().ok();
        v.included = totals.tokens;
    });
    if let (Some((b, span, _)), Ok(fleet)) = (&budget, spent.parse::<f64>()) {
        b.spend.observe(&span.key, fleet);
    }
    Ok(())
}

/// The ledger's part of a SETTLE or RENEW call, its last seven
/// arguments: the token totals, a period's spend totals (or none) with the
/// spend key's expiry, and the ledger's time to live.
fn ledger_args(inv: &mut redis::Cmd, totals: &Totals, period: Option<&(String, PeriodSpend)>) {
    let (key, usd, confirmed, expire_ms) = period.map_or(("", 0.0, 0.0, 0), |(key, p)| {
        (
            key.as_str(),
            p.usd,
            p.confirmed,
            (p.end + SPEND_KEPT_AFTER) * 1000,
        )
    });
    inv.arg(totals.tokens)
        .arg(totals.tokens_confirmed)
        .arg(key)
        .arg(format!("{usd:.9}"))
        .arg(format!("{confirmed:.9}"))
        .arg(expire_ms)
        .arg(LEDGER_TTL.as_millis() as u64);
}

/// The tracked tenants still in use.
fn live(tracked: &Mutex<Vec<Weak<TenantLimits>>>) -> Vec<Arc<TenantLimits>> {
    tracked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect()
}

/// Sends one settlement: the count change with the ledger's totals (one
/// SETTLE a period whose spend is not confirmed, or one without spend).
/// A failure leaves the charges unconfirmed and a report of the count due.
async fn send(
    redis: &Redis,
    scripts: &Scripts,
    tenant: &Arc<TenantLimits>,
    count: CountChange,
) -> Result<(), Unavailable> {
    let Some(keys) = &tenant.keys else {
        return Ok(());
    };
    let totals = keys.ledger.totals();
    let periods: Vec<Option<&(String, PeriodSpend)>> = if totals.spend.is_empty() {
        vec![None]
    } else {
        totals.spend.iter().map(Some).collect()
    };
    let mut result = Ok(());
    for (i, period) in periods.into_iter().enumerate() {
        // The count changes once, with the first call.
        let count = if i == 0 { count } else { CountChange::None };
        let (what, c) = match count {
            CountChange::None => (
                "",
                Count {
                    version: 0,
                    count: 0,
                },
            ),
            CountChange::Release(c) => ("release", c),
            CountChange::Report(c) => ("report", c),
        };
        let spend_key = period.map(|(key, _)| keys.spend_key(key));
        let mut inv = scripts.settle.call(
            &[
                &keys.tok,
                &keys.conc,
                &keys.live,
                spend_key.as_ref().unwrap_or(&keys.tok),
                &keys.ledger.key,
            ],
            192,
        );
        inv.arg(tenant.spec.tokens_per_minute)
            .arg(redis.replica())
            .arg(what)
            .arg(c.version)
            .arg(c.count)
            .arg(LEASE_TTL.as_millis() as u64);
        ledger_args(&mut inv, &totals, period);
        match redis.invoke::<i64>(Op::Limits, &scripts.settle, &inv).await {
            Ok(_) => keys.ledger.confirm(&totals, period),
            Err(e) => {
                if !matches!(count, CountChange::None) {
                    keys.ledger.report_due();
                }
                result = Err(e);
            }
        }
    }
    result
}
