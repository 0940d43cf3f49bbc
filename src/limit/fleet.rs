//! The Redis backend of the limiter (docs/redis.md): every replica that uses the
//! same Redis and `key_prefix` shares each tenant's request bucket, token
//! bucket and concurrency count.
//!
//! - One script decides a request (`ADMIT`): the request bucket (GCRA on a
//!   theoretical arrival time), a concurrency slot, and the token balance,
//!   returned with the standings for the headers. One round trip.
//! - One script settles it after the answer (`SETTLE`): the token debit and
//!   this replica's new in-flight count. Sent by a task fed through a
//!   bounded queue, so nothing on the response path waits for it.
//! - Concurrency is a hash of in-flight counts per replica: +1 when Redis
//!   admits, -1 when settled, and every few seconds an absolute report that
//!   repairs what an outage lost. Each change carries a version that only
//!   grows on its replica, so a report never undoes a newer change and a
//!   change already in a report is not applied twice. A replica's entry
//!   lives as long as its lease in a sorted set, renewed by those reports;
//!   one that dies stops renewing and its count is dropped within
//!   `LEASE_TTL`.
//! - Time is Redis's (`TIME`), so replicas with skewed clocks agree.
//! - Every key carries the tenant as a cluster hash tag (`prefix:{tenant}:…`)
//!   and every key expires. The request and token keys name the limits they
//!   hold, so a reload that changes a tenant's limits starts it afresh, as
//!   in memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{
    concurrency_refused, token_standing, Admission, Count, Decided, Denied, Lease, Limit, Refused,
    Slot, Standing, Standings, TenantLimits, UpstreamCheck,
};
use crate::config::{LimitSpec, OnError};
use crate::shared::{Lua, Op, Redis, Unavailable};

/// How long a replica's concurrency count outlives its last report.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a running replica renews its counts.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Settlements waiting for Redis; past this they are dropped (the local
/// state already changed, and the next report of a count supersedes it).
const QUEUE: usize = 8192;

/// ADMIT's reply, decoded (admit.lua says what each item is).
struct AdmitReply {
    /// 0 admitted, 1 refused for requests, 2 for concurrency.
    verdict: i64,
    wait_us: i64,
    remaining: i64,
    reset_us: i64,
    /// The token balance; "" without a token limit.
    tokens: String,
    /// The period's spend; "" without a budget.
    spent: String,
}

impl redis::FromRedisValue for AdmitReply {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let (verdict, wait_us, remaining, reset_us, tokens, spent) =
            <(i64, i64, i64, i64, String, String)>::from_redis_value(v)?;
        Ok(AdmitReply {
            verdict,
            wait_us,
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

/// One settlement on its way to Redis.
struct Settle {
    tenant: Arc<TenantLimits>,
    tokens: u64,
    count: CountChange,
    spend: Option<SpendCharge>,
}

/// A tenant's Redis keys, and the queue its settlements go through.
pub(crate) struct Keys {
    req: String,
    tok: String,
    conc: String,
    live: String,
    /// `prefix:{tenant}:spend:`, followed by the period.
    spend_prefix: String,
    queue: mpsc::Sender<Settle>,
    /// The version of the count last renewed, so an idle tenant is not
    /// reported again.
    renewed: AtomicU64,
}

impl Keys {
    /// Queues the Redis side of a settlement; never waits.
    pub(super) fn settle(
        &self,
        tenant: &Arc<TenantLimits>,
        tokens: u64,
        count: CountChange,
        spend: Option<SpendCharge>,
    ) {
        let debit = tokens > 0 && tenant.spec.tokens_per_minute > 0;
        if !debit && matches!(count, CountChange::None) && spend.is_none() {
            return;
        }
        let msg = Settle {
            tenant: Arc::clone(tenant),
            tokens: if debit { tokens } else { 0 },
            count,
            spend,
        };
        if let Err(e) = self.queue.try_send(msg) {
            // Spend is never dropped: it waits for the next flush.
            let msg = e.into_inner();
            if let (Some(s), Some(b)) = (&msg.spend, &tenant.budget) {
                b.spend.defer(&s.period, s.usd);
            }
            tracing::debug!("settlement queue full; the next count report supersedes it");
        }
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
    /// Tenants with a concurrency cap, for renewal; touched at config load
    /// and by the renewal tick, never per request.
    tracked: Arc<Mutex<Vec<Weak<TenantLimits>>>>,
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
        }
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
            spend_prefix: r.tenant_key(tenant, "spend:"),
            queue: self.queue.clone(),
            renewed: AtomicU64::new(0),
        }
    }

    pub(crate) fn track(&self, tenant: &Arc<TenantLimits>) {
        if tenant.spec.max_concurrent == 0 && tenant.budget.is_none() {
            return;
        }
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.retain(|w| w.strong_count() > 0);
        tracked.push(Arc::downgrade(tenant));
    }

    /// One round trip decides the request. `Err(Unavailable)`: Redis did
    /// not answer (or is known down), and nothing was taken.
    pub(crate) async fn admit(
        &self,
        t: &Arc<TenantLimits>,
        keys: &Keys,
        standings: &mut Standings,
    ) -> Result<Result<Admission, Denied>, Unavailable> {
        if !self.redis.is_up() {
            return Err(Unavailable);
        }
        let spec = t.spec;
        let slot = Slot::for_cap(spec.max_concurrent);
        // Counted here first, so a renewal report made while this request
        // waits for Redis includes it (the script then knows it is counted).
        let count = if slot == Slot::Held {
            t.in_flight.acquire()
        } else {
            t.in_flight.now()
        };
        // The spend key names the period, so it is made per request (only
        // for a budgeted tenant).
        let budget = t.budget.as_ref().map(|b| {
            let (span, _, now) = b.now();
            (b, keys.spend_key(&span.key), span, now)
        });
        let mut inv = self.scripts.admit.call(
            &[
                &keys.req,
                &keys.tok,
                &keys.conc,
                &keys.live,
                budget.as_ref().map_or(&keys.tok, |b| &b.1),
            ],
            96,
        );
        inv.arg(spec.requests_per_minute)
            .arg(spec.request_burst)
            .arg(spec.tokens_per_minute)
            .arg(spec.max_concurrent)
            .arg(self.redis.replica())
            .arg(count.version)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(if budget.is_some() { "1" } else { "0" });
        let reply: Result<AdmitReply, _> = self
            .redis
            .invoke(Op::Limits, &self.scripts.admit, &inv)
            .await;
        let AdmitReply {
            verdict,
            wait_us,
            remaining,
            reset_us,
            tokens,
            spent,
        } = match reply {
            Ok(r) => r,
            Err(e) => {
                if slot == Slot::Held {
                    t.in_flight.release();
                }
                return Err(e);
            }
        };
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        let balance = tokens.parse::<f64>().ok();
        if let (Some((b, _, span, now)), Ok(fleet)) = (&budget, spent.parse::<f64>()) {
            // The fleet's spend, plus what this replica spent that Redis
            // has not taken yet.
            b.spend.observe(&span.key, fleet);
            let spent = b.spend.spent(&span.key);
            standings.budget = Some(b.standing(spent, span, *now));
        }
        standings.tokens = balance.map(|b| token_standing(spec.tokens_per_minute, b));
        standings.requests = (spec.requests_per_minute > 0).then(|| Standing {
            limit: u64::from(spec.requests_per_minute),
            remaining: remaining.max(0) as u64,
            reset: us(reset_us),
        });
        let refused = match verdict {
            0 => {
                return Ok(Ok(Admission {
                    lease: Some(Lease::new(t, slot, Decided::InRedis)),
                    check: UpstreamCheck { balance },
                }))
            }
            1 => Refused {
                limit: Limit::Requests,
                wait: us(wait_us),
                standing: standings.requests,
            },
            _ => concurrency_refused(),
        };
        if slot == Slot::Held {
            // Redis holds nothing of a refused request.
            t.in_flight.release();
        }
        Ok(Err(Denied::Limit(refused)))
    }
}

/// Sends settlements as they come (all that are waiting at once, so they
/// share the connection's pipeline), and every `RENEW_EVERY` reports the
/// count of each tenant with requests in flight, keeping its lease alive.
async fn settler(
    redis: Arc<Redis>,
    scripts: Arc<Scripts>,
    mut rx: mpsc::Receiver<Settle>,
    tracked: Arc<Mutex<Vec<Weak<TenantLimits>>>>,
) {
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(64);
    loop {
        tokio::select! {
            got = rx.recv_many(&mut batch, 64) => {
                if got == 0 {
                    return;
                }
            }
            _ = renew.tick() => {
                let tenants: Vec<Arc<TenantLimits>> = tracked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter_map(Weak::upgrade)
                    .collect();
                for t in tenants {
                    let Some(keys) = &t.keys else { continue };
                    if t.spec.max_concurrent > 0 {
                        let count = t.in_flight.now();
                        let last = keys.renewed.swap(count.version, Ordering::AcqRel);
                        if count.count > 0 || count.version != last {
                            batch.push(Settle { tenant: Arc::clone(&t), tokens: 0, count: CountChange::Report(count), spend: None });
                        }
                    }
                    // Spend Redis missed while it was away.
                    if let Some(b) = t.budget.as_ref().filter(|b| redis.is_up() && b.spend.has_unsent()) {
                        for (period, usd) in b.spend.take_unsent() {
                            let end = b.now().0.end.max(0);
                            batch.push(Settle { tenant: Arc::clone(&t), tokens: 0, count: CountChange::None, spend: Some(SpendCharge { period, end, usd }) });
                        }
                    }
                }
            }
        }
        let sends = batch.drain(..).map(|s| {
            let redis = &redis;
            let scripts = &scripts;
            async move {
                let Some(keys) = &s.tenant.keys else { return };
                let (what, c) = match s.count {
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
                let spend_key = s.spend.as_ref().map(|c| keys.spend_key(&c.period));
                let (usd, expire_ms) = s
                    .spend
                    .as_ref()
                    .map_or((0.0, 0), |c| (c.usd, (c.end + SPEND_KEPT_AFTER) * 1000));
                let mut inv = scripts.settle.call(
                    &[
                        &keys.tok,
                        &keys.conc,
                        &keys.live,
                        spend_key.as_ref().unwrap_or(&keys.tok),
                    ],
                    128,
                );
                inv.arg(s.tenant.spec.tokens_per_minute)
                    .arg(s.tokens)
                    .arg(redis.replica())
                    .arg(what)
                    .arg(c.version)
                    .arg(c.count)
                    .arg(LEASE_TTL.as_millis() as u64)
                    .arg(format!("{usd:.9}"))
                    .arg(expire_ms);
                let sent: Result<i64, Unavailable> =
                    redis.invoke(Op::Limits, &scripts.settle, &inv).await;
                if sent.is_err() {
                    // Added when Redis is back, never lost.
                    if let (Some(c), Some(b)) = (&s.spend, &s.tenant.budget) {
                        b.spend.defer(&c.period, c.usd);
                    }
                }
            }
        });
        futures_util::future::join_all(sends).await;
    }
}
