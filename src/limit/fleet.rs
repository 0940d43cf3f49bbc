//! The Redis backend of the limiter (SPEC §8): every replica that uses the
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
    concurrency_refused, token_standing, Admission, Count, Denied, Lease, Limit, Refused, Standing,
    Standings, TenantLimits, UpstreamCheck,
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

/// Shared by both scripts: Redis's time, a tenant's token balance, and the
/// bookkeeping of one replica's in-flight count in the concurrency hash.
/// Per replica R the hash holds `R` (the count), `R:m` (the newest version
/// of a +1/-1 applied) and `R:b` (the version of the last absolute report).
/// A change is applied only if it is newer than the last absolute report
/// (which already includes it); an absolute report only if no newer change
/// was applied. So the count is exact whatever order reports arrive in.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function marks(conc, replica)
  local v = redis.call('HMGET', conc, replica .. ':b', replica .. ':m')
  return tonumber(v[1]) or -1, tonumber(v[2]) or -1
end
local function change(conc, replica, version, by, base, newest)
  if version <= base then return end
  local n = redis.call('HINCRBY', conc, replica, by)
  if n < 0 then redis.call('HSET', conc, replica, 0) end
  if version > newest then
    redis.call('HSET', conc, replica .. ':m', string.format('%.0f', version))
  end
end
local function alive(conc, live, replica, ttl_ms)
  redis.call('ZADD', live, string.format('%.0f', now + ttl_ms * 1000), replica)
  redis.call('PEXPIRE', conc, ttl_ms * 2)
  redis.call('PEXPIRE', live, ttl_ms * 2)
end
local function balance(tok, tpm)
  local h = redis.call('HMGET', tok, 'b', 't')
  local b, at = tonumber(h[1]), tonumber(h[2])
  if b == nil or at == nil then return tpm end
  return math.min(tpm, b + math.max(0, now - at) * tpm / 60000000)
end
"#;

/// KEYS: request bucket, token bucket, concurrency hash, live set, spend
/// of the current period.
/// ARGV: rpm, burst, tpm, max_concurrent, replica, version, ttl_ms,
/// budgeted ("1"/"0").
/// Returns {verdict (0 admitted, 1 requests, 2 concurrency), wait_us,
/// requests remaining, requests reset_us, token balance ("" = no limit),
/// spend ("" = no budget)}.
const ADMIT: &str = r#"
local rpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm, maxc = tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens = ''
if tpm > 0 then tokens = string.format('%.3f', balance(KEYS[2], tpm)) end
local spent = ''
if ARGV[8] == '1' then spent = redis.call('GET', KEYS[5]) or '0' end
local remaining, reset = 0, 0
if rpm > 0 then
  local period = 60000000 / rpm
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  local next_tat = tat + period
  local allow_at = next_tat - burst * period
  if now < allow_at then
    return {1, math.ceil(allow_at - now), 0, math.ceil(tat - now), tokens, spent}
  end
  redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
  remaining = math.floor((now - allow_at) / period)
  reset = math.ceil(next_tat - now)
end
if maxc > 0 then
  local replica, version = ARGV[5], tonumber(ARGV[6])
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('%.0f', now))
  for _, r in ipairs(dead) do
    redis.call('HDEL', KEYS[3], r, r .. ':m', r .. ':b')
    redis.call('ZREM', KEYS[4], r)
  end
  -- One read gives every replica's count and this replica's marks.
  local all = redis.call('HGETALL', KEYS[3])
  local total, base, newest = 0, -1, -1
  local b_field, m_field = replica .. ':b', replica .. ':m'
  for i = 1, #all, 2 do
    local f = all[i]
    if f == b_field then base = tonumber(all[i + 1])
    elseif f == m_field then newest = tonumber(all[i + 1])
    elseif not string.find(f, ':', 1, true) then total = total + tonumber(all[i + 1]) end
  end
  -- An absolute report newer than this admission already counted it.
  local counted = version <= base
  if not counted then total = total + 1 end
  if total > maxc then
    if counted then redis.call('HINCRBY', KEYS[3], replica, -1) end
    return {2, 1000000, remaining, reset, tokens, spent}
  end
  if not counted then change(KEYS[3], replica, version, 1, base, newest) end
  -- Renewal keeps a reporting replica alive; one Redis has not heard a
  -- report from (new, or Redis restarted) registers here.
  if base < 0 then alive(KEYS[3], KEYS[4], replica, tonumber(ARGV[7])) end
end
return {0, 0, remaining, reset, tokens, spent}
"#;

/// KEYS: token bucket, concurrency hash, live set, spend of a period.
/// ARGV: tpm, tokens to debit, replica, what to do with the count
/// ("" nothing, "release": one fewer, "report": the count is ARGV[6]),
/// version, count, ttl_ms, USD to add to the spend, when the spend key
/// expires (Unix ms).
const SETTLE: &str = r#"
local usd = tonumber(ARGV[8])
if usd > 0 then
  redis.call('INCRBYFLOAT', KEYS[4], ARGV[8])
  redis.call('PEXPIREAT', KEYS[4], ARGV[9])
end
local tpm, used = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and used > 0 then
  local b = math.max(balance(KEYS[1], tpm) - used, -tpm * 1440)
  redis.call('HSET', KEYS[1], 'b', string.format('%.3f', b), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((tpm - b) * 60000 / tpm) + 1000)
end
local replica, what, version = ARGV[3], ARGV[4], tonumber(ARGV[5])
if what == 'release' then
  local base, newest = marks(KEYS[2], replica)
  change(KEYS[2], replica, version, -1, base, newest)
elseif what == 'report' then
  local base, newest = marks(KEYS[2], replica)
  if version > base and version >= newest then
    redis.call('HSET', KEYS[2], replica, ARGV[6], replica .. ':b', string.format('%.0f', version))
  end
  alive(KEYS[2], KEYS[3], replica, tonumber(ARGV[7]))
end
return 1
"#;

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
    pub period: String,
    /// When the period ends (Unix seconds): its key expires a week later.
    pub end: i64,
    pub usd: f64,
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
pub struct Keys {
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
pub struct Fleet {
    redis: Arc<Redis>,
    pub on_error: OnError,
    scripts: Arc<Scripts>,
    queue: mpsc::Sender<Settle>,
    /// Tenants with a concurrency cap, for renewal; touched at config load
    /// and by the renewal tick, never per request.
    tracked: Arc<Mutex<Vec<Weak<TenantLimits>>>>,
}

impl Fleet {
    pub fn start(redis: Arc<Redis>, on_error: OnError) -> Fleet {
        let scripts = Arc::new(Scripts {
            admit: redis.lua(&format!("{PRELUDE}{ADMIT}")),
            settle: redis.lua(&format!("{PRELUDE}{SETTLE}")),
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

    pub fn keys(&self, tenant: &str, spec: LimitSpec) -> Keys {
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

    pub fn track(&self, tenant: &Arc<TenantLimits>) {
        if tenant.spec.max_concurrent == 0 && tenant.budget.is_none() {
            return;
        }
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.retain(|w| w.strong_count() > 0);
        tracked.push(Arc::downgrade(tenant));
    }

    /// One round trip decides the request. `Err(Unavailable)`: Redis did
    /// not answer (or is known down), and nothing was taken.
    pub async fn admit(
        &self,
        t: &Arc<TenantLimits>,
        keys: &Keys,
        standings: &mut Standings,
    ) -> Result<Result<Admission, Denied>, Unavailable> {
        if !self.redis.is_up() {
            return Err(Unavailable);
        }
        let spec = t.spec;
        let slot = spec.max_concurrent > 0;
        // Counted here first, so a renewal report made while this request
        // waits for Redis includes it (the script then knows it is counted).
        let count = if slot {
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
        let reply: Result<(i64, i64, i64, i64, String, String), _> = self
            .redis
            .invoke(Op::Limits, &self.scripts.admit, &inv)
            .await;
        let (verdict, wait_us, remaining, reset_us, tokens, spent) = match reply {
            Ok(r) => r,
            Err(e) => {
                if slot {
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
                    lease: Some(Lease::new(t, slot, true)),
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
        if slot {
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
