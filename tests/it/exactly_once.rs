//! Every charge reaches the fleet's state exactly once, whatever Redis does
//! (the spec's §8 "Exactly once", "Limits", "When Redis is unavailable",
//! and §9): three real `sluice` replicas share one `redis-server` through
//! the fault proxy (`fault_proxy`), with `timeout_ms = 25` (250 for the
//! control run without faults, which checks the harness itself: a loaded
//! machine misses 25 ms now and then, a fault of its own). Three budgeted
//! tenants, each with a token limit, a request limit and a concurrency cap
//! far above what the test drives, send requests whose usage the simulator
//! scripts (`x-sim-usage`), so every answer's cost and tokens are known
//! exactly. Once the faults stop, Redis must hold every charge of every
//! answer the clients got, once:
//!
//! - spend: the tenant's spend key equals the sum of the answers' costs
//!   (within 1e-6 USD), and every replica's `sluice_budget_spent_usd`
//!   agrees with it;
//! - tokens: the token bucket's balance is what its start, its refill and
//!   the answers' tokens make it (`expected_balance` says why that is
//!   exact);
//! - concurrency: no request is refused for a slot (a cap of 16, at most 4
//!   of a tenant's requests in flight), and once Redis answers in time
//!   again the fleet's count goes back to the requests in flight (none);
//! - every key under the test's `key_prefix` expires.
//!
//! The variants: no faults; latency alone (round trips of 10–60 ms for most
//! of the run); latency, connection resets, a pause and a 2.5 s partition;
//! the same with one replica stopped (SIGTERM) as soon as Redis is
//! reachable again, whose unsent charges must reach Redis within its
//! shutdown grace (2 s); and the key test, with cached and coalesced
//! traffic too and Redis restarting empty under a request in flight.
//!
//! Waits are on events and on polling with deadlines; the only timed
//! things are the fault schedule and the pace of the clients.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use sluice::simulator::Simulator;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::fault_proxy::{FaultProxy, ProxyHandle};
use crate::support::*;

/// A budgeted tenant and the usage the simulator reports for each of its
/// answers.
struct Tenant {
    name: &'static str,
    key: &'static str,
    prompt: u64,
    completion: u64,
}

/// USD per million tokens. Cache hits and misses cost the same, so the
/// simulator's split of the prompt does not matter.
const PRICE_IN: f64 = 0.25;
const PRICE_OUT: f64 = 0.5;

impl Tenant {
    /// One answer's cost: 0.0005, 0.0008 and 0.00025 USD.
    fn usd(&self) -> f64 {
        (self.prompt as f64 * PRICE_IN + self.completion as f64 * PRICE_OUT) / 1e6
    }
    /// One answer's tokens: 1500, 2600 and 800.
    fn tokens(&self) -> u64 {
        self.prompt + self.completion
    }
    fn usage(&self) -> String {
        format!("{},{}", self.prompt, self.completion)
    }
}

const TENANTS: [Tenant; 3] = [
    Tenant {
        name: "eo-a",
        key: "sk-eo-a-0123456789",
        prompt: 1000,
        completion: 500,
    },
    Tenant {
        name: "eo-b",
        key: "sk-eo-b-0123456789",
        prompt: 2000,
        completion: 600,
    },
    Tenant {
        name: "eo-c",
        key: "sk-eo-c-0123456789",
        prompt: 600,
        completion: 200,
    },
];

/// Limits that never refuse at the rates driven here, but are there: the
/// request bucket, token bucket and concurrency count are all kept in Redis.
const RPM: u32 = 6_000_000;
const BURST: u32 = 100_000;
/// A million tokens a second: see `expected_balance` for why so many.
const TPM: u64 = 60_000_000;
const MAX_CONCURRENT: u32 = 16;
const BUDGET_USD: f64 = 1000.0;
/// Clients per tenant, each with one request at a time: at most 4 of a
/// tenant's requests are in flight, against a cap of 16.
const WORKERS: usize = 4;
/// Each client sends at most one request per `PACE`.
const PACE: Duration = Duration::from_millis(50);
const REPLICAS: usize = 3;
/// `[redis] timeout_ms` under faults: Redis's default.
const TIMEOUT_MS: u64 = 25;
/// How long the state may take to settle once the load is over.
const SETTLE: Duration = Duration::from_secs(12);
/// A state unchanged this long (longer than any periodic task of a
/// replica) has settled, right or wrong.
const STABLE: Duration = Duration::from_secs(6);

/// `upstream_cap`: the upstream's `max_concurrent` (0: none).
fn config(sim: &str, redis_url: &str, prefix: &str, timeout_ms: u64, upstream_cap: u32) -> String {
    let mut extra = String::new();
    for t in &TENANTS {
        extra += &tenant_with_limits(t.name, t.key, RPM, BURST, TPM, MAX_CONCURRENT);
        extra += &format!(
            "models = [\"deepseek-chat\"]\nbudget_usd = {BUDGET_USD:.1}\nbudget_period = \"month\"\n"
        );
    }
    extra += &format!(
        "[redis]\nurl = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\ntimeout_ms = {timeout_ms}\nlimits = true\n"
    );
    let text = config_text(sim, &extra).replace(
        "max_retries = 2\n",
        &format!("max_retries = 2\nmax_concurrent = {upstream_cap}\n"),
    );
    let prices = "input_cache_hit = 0.1\ninput_cache_miss = 1.0\noutput = 2.0";
    assert!(text.contains(prices), "the default test pricing moved");
    text.replace(
        prices,
        &format!(
            "input_cache_hit = {PRICE_IN}\ninput_cache_miss = {PRICE_IN}\noutput = {PRICE_OUT}"
        ),
    )
}

// ---- the fleet ---------------------------------------------------------------

/// One `redis-server`, the proxy in front of it, three replicas that know
/// Redis only through the proxy, and the token buckets as the test set them.
struct Fleet {
    redis: RedisServer,
    proxy: FaultProxy,
    sim: Simulator,
    replicas: Vec<Replica>,
    prefix: String,
    /// Per tenant: the bucket's balance and Redis time (µs) as the test
    /// wrote them before any traffic.
    buckets: Vec<(f64, u64)>,
}

impl Fleet {
    async fn start(test: &str, timeout_ms: u64) -> Option<Fleet> {
        Self::start_capped(test, timeout_ms, 0).await
    }

    /// With the upstream's `max_concurrent` at `upstream_cap`.
    async fn start_capped(test: &str, timeout_ms: u64, upstream_cap: u32) -> Option<Fleet> {
        let redis = RedisServer::start(test)?;
        let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into());
        let sim = simulator().await;
        let prefix = format!("eo{:08x}", rand::random::<u32>());
        let text = config(
            &sim.base_url(),
            &format!("redis://{}/0", proxy.addr),
            &prefix,
            timeout_ms,
            upstream_cap,
        );
        let replicas = Replica::fleet(REPLICAS, &text).await;
        for r in &replicas {
            r.wait_metric("sluice_redis_up", 1.0, Duration::from_secs(10))
                .await;
        }
        let mut fleet = Fleet {
            redis,
            proxy,
            sim,
            replicas,
            prefix,
            buckets: Vec::new(),
        };
        fleet.buckets = TENANTS.iter().map(|t| fleet.set_bucket(t)).collect();
        Some(fleet)
    }

    fn key(&self, t: &Tenant, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.prefix, t.name)
    }

    /// Writes the tenant's token bucket before any traffic: a quarter full,
    /// at Redis's time now (the same fields the limiter writes, docs/redis.md
    /// "Key layout"), expiring as the limiter's would.
    fn set_bucket(&self, t: &Tenant) -> (f64, u64) {
        let b0 = (TPM / 4) as f64;
        let script = "local t = redis.call('TIME') \
             local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
             redis.call('HSET', KEYS[1], 'b', ARGV[1], 't', string.format('%.0f', now)) \
             redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
             return string.format('%.0f', now)";
        let out = self.redis.cli(&[
            "EVAL",
            script,
            "1",
            &self.key(t, &format!("tok:{TPM}")),
            &format!("{b0:.0}"),
            "60000",
        ]);
        let t0 = out
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("setting the bucket: {out}"));
        (b0, t0)
    }

    /// The bucket's balance and time (µs), as Redis has them.
    fn bucket(&self, t: &Tenant) -> (f64, u64) {
        let out = self
            .redis
            .cli(&["HMGET", &self.key(t, &format!("tok:{TPM}")), "b", "t"]);
        let mut lines = out.lines();
        let b = lines.next().and_then(|l| l.trim().parse::<f64>().ok());
        let at = lines.next().and_then(|l| l.trim().parse::<u64>().ok());
        (b.unwrap_or(f64::NAN), at.unwrap_or(0))
    }

    /// The tenant's spend in Redis: every period's key (one, unless the
    /// month turned during the test).
    fn spend(&self, t: &Tenant) -> f64 {
        let keys = self
            .redis
            .cli(&["--scan", "--pattern", &self.key(t, "spend:*")]);
        keys.lines()
            .filter(|k| !k.trim().is_empty())
            .map(|k| {
                let v = self.redis.cli(&["GET", k.trim()]);
                v.trim()
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("spend {k}: {v}"))
            })
            .sum()
    }

    /// The fleet's concurrency count for the tenant: the sum of every
    /// replica's count in the `conc` hash (fields without a `:`).
    fn slots_held(&self, t: &Tenant) -> i64 {
        let out = self.redis.cli(&["HGETALL", &self.key(t, "conc")]);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        lines
            .chunks(2)
            .filter(|kv| kv.len() == 2 && !kv[0].contains(':'))
            .map(|kv| kv[1].parse::<i64>().unwrap_or(0))
            .sum()
    }

    /// Every key under the prefix with its TTL (seconds; -1 = none).
    fn ttls(&self) -> Vec<(String, i64)> {
        let keys = self
            .redis
            .cli(&["--scan", "--pattern", &format!("{}:*", self.prefix)]);
        keys.lines()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                let ttl = self.redis.cli(&["TTL", k]);
                let ttl = ttl
                    .trim()
                    .parse::<i64>()
                    .unwrap_or_else(|_| panic!("TTL {k}: {ttl}"));
                (k.to_string(), ttl)
            })
            .collect()
    }
}

// ---- the load ------------------------------------------------------------------

/// Which replicas clients may use: the first `live`. A replica taken out of
/// the rotation is stopped once its requests in flight are done.
struct Route {
    live: AtomicUsize,
    in_flight: [AtomicUsize; REPLICAS],
}

impl Route {
    fn new() -> Route {
        Route {
            live: AtomicUsize::new(REPLICAS),
            in_flight: Default::default(),
        }
    }

    /// The replica for request `n`, counted in flight (counted first, then
    /// checked still live, so `retire_last` never misses one).
    fn enter(&self, n: usize) -> usize {
        loop {
            let i = n % self.live.load(SeqCst);
            self.in_flight[i].fetch_add(1, SeqCst);
            if i < self.live.load(SeqCst) {
                return i;
            }
            self.in_flight[i].fetch_sub(1, SeqCst);
        }
    }

    fn leave(&self, i: usize) {
        self.in_flight[i].fetch_sub(1, SeqCst);
    }

    /// Takes the last live replica out of the rotation and waits until none
    /// of its requests is in flight.
    async fn retire_last(&self) -> usize {
        let i = self.live.fetch_sub(1, SeqCst) - 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.in_flight[i].load(SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "replica {i}'s requests never ended"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    }
}

/// What the clients of one tenant got.
#[derive(Default, Clone)]
struct Tally {
    /// Whole 200 answers, each with the tenant's usage.
    ok: u64,
    /// 429 `concurrency_limit_exceeded`: refused for a slot.
    refused_for_slots: u64,
    /// Anything else (at most a few kept, and how many).
    unexpected: Vec<String>,
    unexpected_count: u64,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.refused_for_slots += o.refused_for_slots;
        self.unexpected_count += o.unexpected_count;
        for u in o.unexpected {
            if self.unexpected.len() < 5 {
                self.unexpected.push(u);
            }
        }
    }

    fn odd(&mut self, what: String) {
        self.unexpected_count += 1;
        if self.unexpected.len() < 5 {
            self.unexpected.push(what);
        }
    }
}

/// One request: the whole answer, or why there is none.
async fn ask(
    url: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    let mut b = post(url, key);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        let (parts, body) = try_open(req).await.map_err(|e| e.to_string())?.into_parts();
        Ok(read_rest(parts, body, Vec::new()).await)
    })
    .await;
    answer.unwrap_or_else(|_| Err("no answer within 20 s".to_string()))
}

/// Counts one answer of `t` (asked with its usage) into `tally`.
fn count(t: &Tenant, r: Result<Resp, String>, stream: bool, tally: &mut Tally) {
    let r = match r {
        Ok(r) => r,
        Err(e) => return tally.odd(format!("no answer: {e}")),
    };
    match r.status.as_u16() {
        200 if stream => {
            let events = r.events();
            if r.aborted || events.last().map(String::as_str) != Some("[DONE]") {
                return tally.odd(format!("a stream cut short: {events:?}"));
            }
            let usage = events
                .iter()
                .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
                .find(|v| v["usage"].is_object());
            match usage {
                Some(u) if u["usage"]["total_tokens"] == t.tokens() => tally.ok += 1,
                other => tally.odd(format!("a stream without its usage: {other:?}")),
            }
        }
        200 => {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            if v["usage"]["total_tokens"] == t.tokens() {
                tally.ok += 1;
            } else {
                tally.odd(format!("200 without its usage: {}", r.text()));
            }
        }
        429 if r.error_code_or_empty() == "concurrency_limit_exceeded" => {
            tally.refused_for_slots += 1;
        }
        s => tally.odd(format!("{s} {}", r.error_code_or_empty())),
    }
}

/// One client of tenant `ti`: one request at a time, at most one per
/// `PACE`, until `until`, round-robin over the live replicas; every fourth
/// request streams (asking for its usage, so the client sees it). Each request bypasses the cache, so each goes upstream.
async fn client(
    urls: Arc<Vec<String>>,
    route: Arc<Route>,
    ti: usize,
    worker: usize,
    until: Instant,
) -> (usize, Tally) {
    let t = &TENANTS[ti];
    let usage = t.usage();
    let headers = [
        ("x-sim-usage", usage.as_str()),
        ("cache-control", "no-store"),
    ];
    let mut tally = Tally::default();
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = worker;
    while Instant::now() < until {
        tick.tick().await;
        let stream = n % 4 == 3;
        let text = format!("{} client {worker} request {n}", t.name);
        let body = if stream {
            let mut b = chat_stream(&text);
            b["stream_options"] = serde_json::json!({"include_usage": true});
            b
        } else {
            chat(&text)
        };
        let i = route.enter(n + ti);
        let r = ask(&urls[i], t.key, &body, &headers).await;
        route.leave(i);
        count(t, r, stream, &mut tally);
        n += WORKERS;
    }
    (ti, tally)
}

/// Cacheable traffic (for the key test): a few questions asked again and
/// again on every replica, streams paced so calls overlap and coalesce.
async fn cacheable_client(urls: Arc<Vec<String>>, worker: usize, until: Instant) -> Vec<u16> {
    let t = &TENANTS[0];
    let usage = t.usage();
    let mut statuses = Vec::new();
    let mut tick = tokio::time::interval(PACE);
    let mut n = worker;
    while Instant::now() < until {
        tick.tick().await;
        let question = format!("shared question {}", n % 5);
        let body = if n % 2 == 0 {
            chat_stream(&question)
        } else {
            chat(&question)
        };
        let headers = [
            ("x-sim-usage", usage.as_str()),
            ("x-sim-chunk-delay-ms", "20"),
        ];
        let r = ask(&urls[n % urls.len()], t.key, &body, &headers).await;
        statuses.push(r.map_or(0, |r| r.status.as_u16()));
        n += 1;
    }
    statuses
}

// ---- faults --------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Per chunk and direction, ms: a round trip of twice that.
    Latency(u64, u64),
    Reset,
    Pause,
    Resume,
    /// Every connection reset, new ones refused for this many ms.
    Partition(u64),
    /// No fault any more.
    Clear,
}

/// Runs `steps` (ms from `start`, in order) on the proxy.
async fn play(proxy: ProxyHandle, start: Instant, steps: &'static [(u64, Step)]) {
    for &(at, step) in steps {
        tokio::time::sleep_until(start + Duration::from_millis(at)).await;
        match step {
            Step::Latency(min, max) => {
                proxy.latency(Duration::from_millis(min), Duration::from_millis(max));
            }
            Step::Reset => proxy.reset_all(),
            Step::Pause => proxy.pause(),
            Step::Resume => proxy.resume(),
            Step::Partition(ms) => proxy.partition(Duration::from_millis(ms)),
            Step::Clear => proxy.clear(),
        }
    }
}

/// Round trips of 10–60 ms, around `timeout_ms = 25`: many time out on
/// Sluice's side after Redis ran them.
const SLOW: Step = Step::Latency(5, 30);

const LATENCY: &[(u64, Step)] = &[(500, SLOW), (7000, Step::Clear)];

/// Latency with resets, a 600 ms pause of the proxy (nothing forwarded:
/// what Redis runs then, it runs late), then a 2.5 s partition (every
/// connection reset, new ones refused), then nothing from 7 s on.
const MIXED: &[(u64, Step)] = &[
    (500, SLOW),
    (1500, Step::Reset),
    (2500, Step::Pause),
    (3100, Step::Resume),
    (3500, Step::Reset),
    (4500, Step::Partition(2500)),
    (7000, Step::Clear),
];

struct Plan {
    /// How long the clients send.
    load: Duration,
    steps: &'static [(u64, Step)],
    /// When the last fault ends (from the start of the load).
    faults_end: Duration,
    /// SIGTERM the last replica as soon as the faults end.
    sigterm: bool,
    /// `[redis] timeout_ms`.
    timeout_ms: u64,
}

// ---- the checks ----------------------------------------------------------------

/// The balance the token bucket must have at Redis time `t_end` (µs) if
/// exactly `tokens` were debited since the test set it to `b0` at `t0`.
///
/// The bucket refills, so its balance alone says nothing exact. But the
/// limiter's arithmetic is linear while the balance stays below the cap:
/// each debit sets `b := b + (now - t) * tpm / 60e6 - tokens` and
/// `t := now` (Redis's clock), so over every debit, whatever their order
/// and timing, `b_end = b0 + (t_end - t0) * tpm / 60e6 - Σ tokens`. The
/// test keeps the balance below the cap and above 0: it starts a quarter
/// full, the refill over less than 45 s is under three quarters of the
/// cap, and the tokens the tests drive are far under a quarter. `b` is
/// stored with three decimals, so the check allows 2 tokens plus 0.001 a
/// debit, against at least 800 tokens an answer.
fn expected_balance(b0: f64, t0: u64, t_end: u64, tokens: u64) -> f64 {
    b0 + (t_end.saturating_sub(t0)) as f64 * TPM as f64 / 60e6 - tokens as f64
}

fn balance_slack(answers: u64) -> f64 {
    2.0 + 0.001 * answers as f64
}

/// What the fleet's state says, per tenant.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    /// Spend in Redis.
    spend: Vec<f64>,
    /// `sluice_budget_spent_usd` of each live replica.
    gauges: Vec<Vec<f64>>,
    /// Token bucket: balance and time.
    bucket: Vec<(f64, u64)>,
}

impl Snapshot {
    async fn take(f: &Fleet, live: &[usize]) -> Snapshot {
        let mut gauges = Vec::new();
        for t in &TENANTS {
            let mut g = Vec::new();
            for &i in live {
                g.push(
                    f.replicas[i]
                        .metric("sluice_budget_spent_usd", &[("tenant", t.name)])
                        .await,
                );
            }
            gauges.push(g);
        }
        Snapshot {
            spend: TENANTS.iter().map(|t| f.spend(t)).collect(),
            gauges,
            bucket: TENANTS.iter().map(|t| f.bucket(t)).collect(),
        }
    }

    /// Every replica's gauge says what Redis says.
    fn agree(&self) -> bool {
        self.gauges
            .iter()
            .zip(&self.spend)
            .all(|(g, s)| g.iter().all(|v| (v - s).abs() < 1e-9))
    }

    fn spend_off(&self, ti: usize, tally: &[Tally]) -> f64 {
        self.spend[ti] - tally[ti].ok as f64 * TENANTS[ti].usd()
    }

    fn tokens_off(&self, f: &Fleet, ti: usize, tally: &[Tally]) -> f64 {
        let (b0, t0) = f.buckets[ti];
        let (b, t_end) = self.bucket[ti];
        b - expected_balance(b0, t0, t_end, tally[ti].ok * TENANTS[ti].tokens())
    }

    fn exact(&self, f: &Fleet, tally: &[Tally]) -> bool {
        self.agree()
            && (0..TENANTS.len()).all(|ti| {
                self.spend_off(ti, tally).abs() < 1e-6
                    && self.tokens_off(f, ti, tally).abs() <= balance_slack(tally[ti].ok)
            })
    }
}

/// One request of each tenant on each live replica that costs nothing
/// (usage 0,0): its admission reads the fleet's spend, which the replica's
/// gauge then shows. A refusal for a slot here is a slot no request holds.
async fn probe(f: &Fleet, live: &[usize], tally: &mut [Tally]) {
    for &i in live {
        for (ti, t) in TENANTS.iter().enumerate() {
            let r = ask(
                &f.replicas[i].url("/v1/chat/completions"),
                t.key,
                &chat(&format!("probe {}", rand::random::<u64>())),
                &[("x-sim-usage", "0,0"), ("cache-control", "no-store")],
            )
            .await;
            match r {
                Ok(r) if r.status == 200 => {}
                Ok(r) if r.error_code_or_empty() == "concurrency_limit_exceeded" => {
                    tally[ti].refused_for_slots += 1;
                }
                Ok(r) => tally[ti].odd(format!("probe: {} {}", r.status, r.text())),
                Err(e) => tally[ti].odd(format!("probe: {e}")),
            }
        }
    }
}

/// Polls (probing the replicas) until the state is exactly right, or has
/// not changed for `STABLE` with every replica agreeing, or `SETTLE` is up.
async fn settled(f: &Fleet, live: &[usize], tally: &mut [Tally]) -> (Snapshot, Duration) {
    let start = Instant::now();
    let mut last: Option<Snapshot> = None;
    let mut since = start;
    loop {
        probe(f, live, tally).await;
        let snap = Snapshot::take(f, live).await;
        if snap.exact(f, tally) || start.elapsed() >= SETTLE {
            return (snap, start.elapsed());
        }
        if last.as_ref() != Some(&snap) {
            last = Some(snap);
            since = Instant::now();
        } else if snap.agree() && since.elapsed() >= STABLE {
            return (snap, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Limit round trips that failed or timed out on the live replicas, and
/// requests decided locally.
async fn fault_counts(f: &Fleet, live: &[usize]) -> (f64, f64) {
    let (mut failed, mut local) = (0.0, 0.0);
    for &i in live {
        let r = &f.replicas[i];
        for result in ["error", "timeout"] {
            failed += r
                .metric(
                    "sluice_redis_operations_total",
                    &[("op", "limits"), ("result", result)],
                )
                .await;
        }
        local += r.metric("sluice_limits_local_fallback_total", &[]).await;
    }
    (failed, local)
}

/// Tokens replica `r` recorded for tenant `t` (prompt and completion).
async fn tokens_recorded(r: &Replica, t: &Tenant) -> f64 {
    let mut sum = 0.0;
    for kind in ["prompt", "completion"] {
        sum += r
            .metric("sluice_tokens_total", &[("tenant", t.name), ("type", kind)])
            .await;
    }
    sum
}

/// The whole test: the load and the faults, then every check; all the
/// numbers are printed, and every failed check is reported at once.
async fn exactly_once(test: &str, plan: Plan) {
    let Some(mut f) = Fleet::start(test, plan.timeout_ms).await else {
        return;
    };
    let urls = Arc::new(
        f.replicas
            .iter()
            .map(|r| r.url("/v1/chat/completions"))
            .collect::<Vec<_>>(),
    );
    let route = Arc::new(Route::new());
    let start = Instant::now();
    let until = start + plan.load;
    let mut load = JoinSet::new();
    for ti in 0..TENANTS.len() {
        for w in 0..WORKERS {
            load.spawn(client(Arc::clone(&urls), Arc::clone(&route), ti, w, until));
        }
    }
    let mut faults = Some(tokio::spawn(play(f.proxy.handle(), start, plan.steps)));
    let mut failures: Vec<String> = Vec::new();
    // Tokens each replica recorded, per tenant (the stopped one's read
    // before it stops).
    let mut recorded = vec![0.0; TENANTS.len()];
    let mut live: Vec<usize> = (0..REPLICAS).collect();

    if plan.sigterm {
        tokio::time::sleep_until(start + plan.faults_end).await;
        if let Some(faults) = faults.take() {
            faults.await.expect("fault schedule");
        }
        // Redis is reachable again; the replica may not know yet, and may
        // hold charges it could not send.
        let i = route.retire_last().await;
        for (ti, t) in TENANTS.iter().enumerate() {
            recorded[ti] += tokens_recorded(&f.replicas[i], t).await;
        }
        let stopping = Instant::now();
        f.replicas[i].stop().await;
        let took = stopping.elapsed();
        eprintln!("{test}: replica {i} stopped in {took:?}");
        if took > Duration::from_secs(5) {
            failures.push(format!("replica {i} took {took:?} to stop (grace 2 s)"));
        }
        let errors: Vec<String> = f.replicas[i]
            .logs()
            .iter()
            .filter(|l| l["level"] == "ERROR")
            .map(|l| l.to_string())
            .collect();
        if !errors.is_empty() {
            eprintln!("{test}: replica {i} logged at error: {errors:?}");
        }
        live.retain(|&r| r != i);
    }

    let mut tally = vec![Tally::default(); TENANTS.len()];
    while let Some(done) = load.join_next().await {
        let (ti, t) = done.expect("client task");
        tally[ti].merge(t);
    }
    if let Some(faults) = faults.take() {
        faults.await.expect("fault schedule");
    }
    let load_took = start.elapsed();

    // The fleet's concurrency count goes back to the requests in flight
    // (none now) within 5 s of Redis answering in time again; 8 s here.
    // Not with a stopped replica: its count lapses with its lease (30 s).
    if !plan.sigterm {
        let deadline = (start + plan.faults_end + Duration::from_secs(8))
            .max(Instant::now() + Duration::from_secs(2));
        for t in &TENANTS {
            let mut held = f.slots_held(t);
            while held != 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                held = f.slots_held(t);
            }
            if held != 0 {
                failures.push(format!(
                    "{}: the fleet counts {held} slots held with no request in flight, {:?} after the faults ended",
                    t.name,
                    Instant::now() - (start + plan.faults_end)
                ));
            }
        }
    }

    for &i in &live {
        for (ti, t) in TENANTS.iter().enumerate() {
            recorded[ti] += tokens_recorded(&f.replicas[i], t).await;
        }
    }
    let (failed_trips, decided_locally) = fault_counts(&f, &live).await;
    if !plan.steps.is_empty() && failed_trips == 0.0 {
        failures.push("the faults never reached Sluice (no limit round trip failed)".into());
    }

    let (snap, waited) = settled(&f, &live, &mut tally).await;
    eprintln!(
        "{test}: load {load_took:?}, then settled in {waited:?}; limit round trips failed or timed out: {failed_trips}, \
         decided locally: {decided_locally}; proxy: {} connections, {} refused",
        f.proxy.accepted(),
        f.proxy.refused()
    );
    for (ti, t) in TENANTS.iter().enumerate() {
        let ok = tally[ti].ok;
        let want_usd = ok as f64 * t.usd();
        let want_tokens = ok * t.tokens();
        let spend_off = snap.spend_off(ti, &tally);
        let tokens_off = snap.tokens_off(&f, ti, &tally);
        eprintln!(
            "{test}: {}: {ok} answers; spend in Redis {:.6} USD, want {want_usd:.6} (off by {spend_off:+.6} = {:+.2} answers); \
             gauges {:?}; bucket off by {tokens_off:+.1} tokens ({:+.2} answers; + = debits missing); \
             tokens recorded by the replicas {} of {want_tokens}; refused for slots {}; unexpected {}",
            t.name,
            snap.spend[ti],
            spend_off / t.usd(),
            snap.gauges[ti],
            tokens_off / t.tokens() as f64,
            recorded[ti],
            tally[ti].refused_for_slots,
            tally[ti].unexpected_count,
        );
        if ok == 0 {
            failures.push(format!("{}: no answer at all", t.name));
        }
        if tally[ti].unexpected_count > 0 {
            failures.push(format!(
                "{}: {} unexpected answers, e.g. {:?}",
                t.name, tally[ti].unexpected_count, tally[ti].unexpected
            ));
        }
        if tally[ti].refused_for_slots > 0 {
            failures.push(format!(
                "{}: {} requests refused for a slot (cap {MAX_CONCURRENT}, at most {WORKERS} in flight)",
                t.name, tally[ti].refused_for_slots
            ));
        }
        if recorded[ti] != want_tokens as f64 {
            failures.push(format!(
                "{}: the replicas recorded {} tokens, the clients got {want_tokens}",
                t.name, recorded[ti]
            ));
        }
        if spend_off.abs() >= 1e-6 {
            failures.push(format!(
                "{}: spend in Redis {:.6} USD, the answers cost {want_usd:.6} ({spend_off:+.6}, {:+.2} answers)",
                t.name,
                snap.spend[ti],
                spend_off / t.usd()
            ));
        }
        if tokens_off.abs() > balance_slack(ok) {
            failures.push(format!(
                "{}: the token bucket is off by {tokens_off:+.1} tokens ({:+.2} answers' worth; + means debits missing, - debits applied twice)",
                t.name,
                tokens_off / t.tokens() as f64
            ));
        }
        let (_, t_end) = snap.bucket[ti];
        let (_, t0) = f.buckets[ti];
        if t_end.saturating_sub(t0) > 45_000_000 {
            failures.push(format!(
                "{}: the run outlasted the bucket check's premise (45 s)",
                t.name
            ));
        }
    }
    if !snap.agree() {
        failures.push(format!(
            "the replicas' sluice_budget_spent_usd never agreed with Redis within {SETTLE:?}: Redis {:?}, gauges {:?}",
            snap.spend, snap.gauges
        ));
    }
    assert!(
        failures.is_empty(),
        "{test}: {} failed checks:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_without_faults() {
    let _one_at_a_time = heavy().await;
    exactly_once(
        "exactly_once_without_faults",
        Plan {
            load: Duration::from_secs(4),
            steps: &[],
            faults_end: Duration::ZERO,
            sigterm: false,
            // The harness itself, with Redis in time: a loaded machine can
            // miss 25 ms now and then, which is a fault of its own.
            timeout_ms: 250,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_under_latency() {
    let _one_at_a_time = heavy().await;
    exactly_once(
        "exactly_once_under_latency",
        Plan {
            load: Duration::from_millis(8000),
            steps: LATENCY,
            faults_end: Duration::from_millis(7000),
            sigterm: false,
            timeout_ms: TIMEOUT_MS,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_under_resets_partition_and_pause() {
    let _one_at_a_time = heavy().await;
    exactly_once(
        "exactly_once_under_resets_partition_and_pause",
        Plan {
            load: Duration::from_millis(8500),
            steps: MIXED,
            faults_end: Duration::from_millis(7000),
            sigterm: false,
            timeout_ms: TIMEOUT_MS,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_when_a_replica_stops_after_faults() {
    let _one_at_a_time = heavy().await;
    exactly_once(
        "exactly_once_when_a_replica_stops_after_faults",
        Plan {
            load: Duration::from_millis(8500),
            steps: MIXED,
            faults_end: Duration::from_millis(7000),
            sigterm: true,
            timeout_ms: TIMEOUT_MS,
        },
    )
    .await;
}

/// After a run with faults (limits, spend, and cacheable traffic that is
/// cached and coalesced across replicas), every key under the prefix has an
/// expiry: right after the run; after Redis restarts empty while a request
/// is in flight (its settlement then writes to keys Redis no longer has);
/// and once the replicas have settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_every_key_expires_after_faults() {
    let _one_at_a_time = heavy().await;
    let test = "exactly_once_every_key_expires_after_faults";
    // The upstream's cap too, well above the load, so its count is
    // written (and walked) without holding anyone up.
    let Some(mut f) = Fleet::start_capped(test, TIMEOUT_MS, 64).await else {
        return;
    };
    let urls = Arc::new(
        f.replicas
            .iter()
            .map(|r| r.url("/v1/chat/completions"))
            .collect::<Vec<_>>(),
    );
    let route = Arc::new(Route::new());
    let start = Instant::now();
    let until = start + Duration::from_millis(7500);
    let mut load = JoinSet::new();
    for ti in 0..TENANTS.len() {
        for w in 0..2 {
            load.spawn(client(Arc::clone(&urls), Arc::clone(&route), ti, w, until));
        }
    }
    let mut cacheable = JoinSet::new();
    for w in 0..REPLICAS * 2 {
        cacheable.spawn(cacheable_client(Arc::clone(&urls), w, until));
    }
    let faults = tokio::spawn(play(f.proxy.handle(), start, MIXED));
    while let Some(done) = load.join_next().await {
        done.expect("client task");
    }
    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
    while let Some(done) = cacheable.join_next().await {
        for s in done.expect("cacheable client") {
            *statuses.entry(s).or_default() += 1;
        }
    }
    faults.await.expect("fault schedule");
    let (failed_trips, _) = fault_counts(&f, &[0, 1, 2]).await;
    assert!(failed_trips > 0.0, "the faults never reached Sluice");
    eprintln!("{test}: cacheable answers by status {statuses:?}");

    let no_ttl = |f: &Fleet, when: &str| -> Vec<String> {
        let ttls = f.ttls();
        eprintln!(
            "{test}: {when}: {} keys, {} without expiry",
            ttls.len(),
            ttls.iter().filter(|(_, t)| *t == -1).count()
        );
        ttls.into_iter()
            .filter(|(_, t)| *t == -1)
            .map(|(k, _)| format!("{when}: {k}"))
            .collect()
    };
    let mut forever = no_ttl(&f, "right after the run");
    assert!(!f.ttls().is_empty(), "the run wrote no key");
    let slots = format!("{}:{{upstream:default}}:slots", f.prefix);
    assert!(
        f.ttls().iter().any(|(k, _)| *k == slots),
        "the upstream's slot count was not written"
    );

    // Redis restarts empty while a request of eo-c is in flight upstream;
    // nothing else of eo-c runs, so its settlement is the first write to
    // its keys in the new Redis.
    for r in &f.replicas {
        r.wait_metric("sluice_redis_up", 1.0, Duration::from_secs(10))
            .await;
    }
    let t = &TENANTS[2];
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.slots_held(t) != 0 {
        assert!(
            Instant::now() < deadline,
            "{}: the fleet still counts {} slots with no request in flight",
            t.name,
            f.slots_held(t)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = f.replicas[0].url("/v1/chat/completions");
    let calls = f.sim.calls();
    let long = tokio::spawn(async move {
        ask(
            &url,
            t.key,
            &chat("in flight while Redis restarts"),
            &[
                ("x-sim-usage", &t.usage()),
                ("x-sim-latency-ms", "1500"),
                ("cache-control", "no-store"),
            ],
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.sim.calls() == calls {
        if long.is_finished() {
            let r = long.await.expect("long request");
            panic!(
                "the long request ended before going upstream: {:?}",
                r.map(|r| r.text())
            );
        }
        assert!(
            Instant::now() < deadline,
            "the long request never went upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f.replicas[0].logs();
    tokio::task::block_in_place(|| f.redis.restart());
    f.replicas[0]
        .wait_log("Redis answers: state is shared")
        .await;
    let r = long.await.expect("long request").expect("an answer");
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(3);
    while f.spend(t) == 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    forever.extend(no_ttl(&f, "after Redis restarted empty"));

    for r in &f.replicas {
        r.wait_metric("sluice_redis_up", 1.0, Duration::from_secs(10))
            .await;
    }
    let mut tally = vec![Tally::default(); TENANTS.len()];
    probe(&f, &[0, 1, 2], &mut tally).await;
    let deadline = Instant::now() + Duration::from_secs(8);
    while TENANTS.iter().any(|t| f.slots_held(t) != 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    forever.extend(no_ttl(&f, "settled"));
    assert!(forever.is_empty(), "keys without an expiry: {forever:#?}");
}
