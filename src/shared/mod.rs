//! The connection to Redis through which replicas share state (docs/redis.md):
//! one multiplexed connection (or a cluster connection), its health, and
//! the metrics of every round trip. It keeps no state of its own; the
//! limiter's Redis backend (`limit::fleet`) calls `Redis::invoke`.
//!
//! Health is a circuit. While Redis answers, requests use it; a round trip
//! that fails or exceeds `timeout_ms` sends its request to the local
//! limits. An error, or a few timeouts in a row, mark Redis down (one warn
//! line), and from then on no request touches Redis, so nothing waits or
//! queues behind it: a prober pings (reconnecting if the connection is
//! gone) every 500 ms, and the first answer marks it up again (one info
//! line). While up, the prober pings once a second, so `sluice_redis_up`
//! is true without traffic too.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Value};
use tokio::sync::Notify;

mod script;

pub(crate) use script::Lua;

use crate::config::RedisConfig;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// What a round trip was for: the `op` label of the Redis metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Limits,
    CacheGet,
    CachePut,
    Coalesce,
}

impl Op {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Op::Limits => "limits",
            Op::CacheGet => "cache_get",
            Op::CachePut => "cache_put",
            Op::Coalesce => "coalesce",
        }
    }
}

/// Redis did not answer in time, answered with an error, or is known to be
/// down: the caller falls back (docs/redis.md, "When Redis is unavailable").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unavailable;

/// A single server or a cluster, behind one `ConnectionLike`.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis metrics (docs/metrics.md), registered only when `[redis]` is set (so
/// `sluice_redis_up` is absent without it). Handles per op and result are
/// resolved once.
pub(crate) struct RedisMetrics {
    pub(crate) up: IntGauge,
    results: [[IntCounter; 3]; 4],
    durations: [Histogram; 4],
}

const REDIS_OPS: [&str; 4] = ["limits", "cache_get", "cache_put", "coalesce"];
const REDIS_RESULTS: [&str; 3] = ["ok", "error", "timeout"];

impl RedisMetrics {
    fn op_index(op: Op) -> usize {
        match op {
            Op::Limits => 0,
            Op::CacheGet => 1,
            Op::CachePut => 2,
            Op::Coalesce => 3,
        }
    }

    pub(crate) fn result(&self, op: Op, result: &str) -> &IntCounter {
        let r = REDIS_RESULTS.iter().position(|x| *x == result).unwrap_or(1);
        &self.results[Self::op_index(op)][r]
    }

    pub(crate) fn duration(&self, op: Op) -> &Histogram {
        &self.durations[Self::op_index(op)]
    }
}

/// Round-trip buckets for Redis: tens of microseconds on a LAN to the
/// timeout.
const REDIS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

impl RedisMetrics {
    #[expect(
        clippy::expect_used,
        reason = "metric definitions are static; a bad one is a bug caught by every test"
    )]
    fn register(r: &Registry) -> RedisMetrics {
        let up = IntGauge::new("sluice_redis_up", "1 while Redis answers, else 0.")
            .expect("valid metric");
        r.register(Box::new(up.clone())).expect("unique metric");
        let ops = IntCounterVec::new(
            Opts::new(
                "sluice_redis_operations_total",
                "Redis round trips, by what they were for and how they ended.",
            ),
            &["op", "result"],
        )
        .expect("valid metric");
        r.register(Box::new(ops.clone())).expect("unique metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_redis_duration_seconds",
                "Time of one Redis round trip, timeouts included.",
            )
            .buckets(REDIS_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("valid metric");
        r.register(Box::new(duration.clone()))
            .expect("unique metric");
        RedisMetrics {
            up,
            results: REDIS_OPS.map(|op| REDIS_RESULTS.map(|res| ops.with_label_values(&[op, res]))),
            durations: REDIS_OPS.map(|op| duration.with_label_values(&[op])),
        }
    }
}

/// A connection of one task's own (see `Redis::dedicated`).
pub(crate) struct Dedicated(Conn);

impl Dedicated {
    /// Runs `cmd`, which may block up to `block`, within `block` plus
    /// `timeout_ms`.
    pub(crate) async fn query<T: FromRedisValue>(
        &mut self,
        redis: &Redis,
        op: Op,
        cmd: &Cmd,
        block: Duration,
    ) -> Result<T, Unavailable> {
        let start = Instant::now();
        // The read itself may take `block`; a busy host gets some slack
        // beyond it before the read counts as failed.
        let slack = redis.cfg.timeout.max(Duration::from_millis(250));
        let result = tokio::time::timeout(block + slack, cmd.query_async(&mut self.0)).await;
        redis
            .metrics
            .duration(op)
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(Ok(v)) => {
                redis.metrics.result(op, "ok").inc();
                Ok(v)
            }
            Ok(Err(_)) => {
                redis.metrics.result(op, "error").inc();
                Err(Unavailable)
            }
            Err(_) => {
                redis.metrics.result(op, "timeout").inc();
                Err(Unavailable)
            }
        }
    }
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// The shared connection and its health.
pub(crate) struct Redis {
    cfg: RedisConfig,
    conn: ArcSwapOption<Conn>,
    health: AtomicU8,
    /// Wakes the prober as soon as a request sees Redis fail.
    wake: Arc<Notify>,
    metrics: RedisMetrics,
    /// This process's id in shared state (its concurrency leases).
    replica: String,
    /// Round trips over `timeout_ms` in a row; a few mark Redis down.
    slow: AtomicU32,
    /// Every script made with `lua`, loaded on each new connection.
    /// Touched when a script is made and on connecting only.
    scripts: std::sync::Mutex<Vec<Lua>>,
}

/// Timeouts in a row that mark Redis down. One slow round trip (a busy
/// host, a GC pause) only sends its own request to the local limits; a
/// Redis that stays slow stops being asked after this many.
const SLOW_IN_A_ROW: u32 = 3;
/// The longest a round trip no request waits on may take.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(1);

impl Redis {
    /// Connects (waiting at most a second, so a replica whose Redis is down
    /// still starts at once) and starts the prober.
    pub(crate) async fn start(cfg: &RedisConfig, registry: &Registry) -> Arc<Redis> {
        let redis = Arc::new(Redis {
            cfg: cfg.clone(),
            conn: ArcSwapOption::empty(),
            health: AtomicU8::new(UNKNOWN),
            wake: Arc::new(Notify::new()),
            metrics: RedisMetrics::register(registry),
            replica: format!("{:016x}", rand::random::<u64>()),
            slow: AtomicU32::new(0),
            scripts: std::sync::Mutex::new(Vec::new()),
        });
        redis.probe().await;
        tokio::spawn(prober(Arc::downgrade(&redis), Arc::clone(&redis.wake)));
        redis
    }

    pub(crate) fn is_up(&self) -> bool {
        self.health.load(Ordering::Acquire) == UP
    }

    pub(crate) fn replica(&self) -> &str {
        &self.replica
    }

    /// A key of one tenant: `prefix:{tenant}:suffix`. The braces are a
    /// cluster hash tag, so every key of a tenant lives in one slot and a
    /// script may touch them all.
    pub(crate) fn tenant_key(&self, tenant: &str, suffix: &str) -> String {
        format!("{}:{{{tenant}}}:{suffix}", self.cfg.key_prefix)
    }

    /// Runs a call of `script` (loaded again transparently if the server
    /// forgot it) within `timeout_ms`. While Redis is down this returns at
    /// once.
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        op: Op,
        script: &Lua,
        call: &Cmd,
    ) -> Result<T, Unavailable> {
        self.invoke_within(op, script, call, self.cfg.timeout).await
    }

    /// `invoke` for work no request waits on (a flight's publisher): it
    /// may take up to `BACKGROUND_TIMEOUT` (or `timeout_ms`, if longer),
    /// so a large batch on a busy Redis is not taken for a failure.
    pub(crate) async fn invoke_in_background<T: FromRedisValue>(
        &self,
        op: Op,
        script: &Lua,
        call: &Cmd,
    ) -> Result<T, Unavailable> {
        let within = self.cfg.timeout.max(BACKGROUND_TIMEOUT);
        self.invoke_within(op, script, call, within).await
    }

    async fn invoke_within<T: FromRedisValue>(
        &self,
        op: Op,
        script: &Lua,
        call: &Cmd,
        within: Duration,
    ) -> Result<T, Unavailable> {
        self.run(op, Some(script.name), within, |mut conn| async move {
            match call.query_async(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    load(&mut conn, script.code).await?;
                    call.query_async(&mut conn).await
                }
                result => result,
            }
        })
        .await
    }

    /// Runs one command within `timeout_ms`. While Redis is down this
    /// returns at once.
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        op: Op,
        cmd: &Cmd,
    ) -> Result<T, Unavailable> {
        self.run(op, None, self.cfg.timeout, |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    /// A connection of its own, for a command that blocks (a blocking read
    /// on the shared connection would hold up every request behind it).
    pub(crate) async fn dedicated(&self) -> Result<Dedicated, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let wait = Duration::from_secs(1).max(self.cfg.timeout);
        match tokio::time::timeout(wait, self.connect(wait)).await {
            Ok(Ok(conn)) => Ok(Dedicated(conn)),
            _ => Err(Unavailable),
        }
    }

    /// One round trip with its timeout, metrics and effect on health.
    async fn run<T, F, Fut>(
        &self,
        op: Op,
        script: Option<&'static str>,
        within: Duration,
        call: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let Some(conn) = self.conn.load_full() else {
            return Err(Unavailable);
        };
        let start = Instant::now();
        let result = tokio::time::timeout(within, call(Conn::clone(&conn))).await;
        self.metrics
            .duration(op)
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(Ok(v)) => {
                self.metrics.result(op, "ok").inc();
                self.slow.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) if is_an_answer(&e) => {
                // Redis answered: it is up. A script that fails, or a reply
                // that does not decode, is a fault of its own, logged with
                // what ran (never its data), and this request decides
                // without Redis.
                self.metrics.result(op, "error").inc();
                self.slow.store(0, Ordering::Relaxed);
                tracing::warn!(
                    op = op.label(),
                    script = script.unwrap_or("-"),
                    kind = ?e.kind(),
                    "a Redis command failed"
                );
                Err(Unavailable)
            }
            Ok(Err(e)) => {
                self.metrics.result(op, "error").inc();
                self.mark_down(&format!("{:?}", e.kind()));
                Err(Unavailable)
            }
            Err(_) => {
                self.metrics.result(op, "timeout").inc();
                if self.slow.fetch_add(1, Ordering::Relaxed) + 1 >= SLOW_IN_A_ROW {
                    self.mark_down("round trips exceeded redis.timeout_ms");
                }
                Err(Unavailable)
            }
        }
    }

    /// A script to call with `invoke`. It is loaded into Redis now (if
    /// connected) and on every new connection; a server that forgot it
    /// anyway (`SCRIPT FLUSH`) gets it again at the next call.
    pub(crate) fn lua(&self, name: &'static str, code: &'static str) -> Lua {
        let lua = Lua::new(name, code);
        {
            let mut scripts = self.scripts.lock().unwrap_or_else(|e| e.into_inner());
            if scripts.iter().any(|s| s.sha == lua.sha) {
                return lua;
            }
            scripts.push(lua.clone());
        }
        if let (Ok(rt), Some(conn)) = (tokio::runtime::Handle::try_current(), self.conn.load_full())
        {
            let wait = self.cfg.timeout.max(Duration::from_millis(250));
            let code = lua.code;
            rt.spawn(async move {
                let mut conn = Conn::clone(&conn);
                let _ = tokio::time::timeout(wait, load(&mut conn, code)).await;
            });
        }
        lua
    }

    fn scripts(&self) -> Vec<Lua> {
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The prefix of every key Sluice writes.
    pub(crate) fn key_prefix(&self) -> &str {
        &self.cfg.key_prefix
    }

    fn mark_down(&self, why: &str) {
        if self.health.swap(DOWN, Ordering::AcqRel) != DOWN {
            self.metrics.up.set(0);
            tracing::warn!(
                url = %self.cfg.redacted_url(),
                reason = why,
                "Redis unavailable: shared state falls back to this replica's own until it answers again"
            );
            self.wake.notify_one();
        }
    }

    fn mark_up(&self) {
        if self.health.swap(UP, Ordering::AcqRel) != UP {
            self.metrics.up.set(1);
            tracing::info!(url = %self.cfg.redacted_url(), "Redis answers: state is shared");
        }
    }

    /// One health check: ping on the current connection while up; while
    /// down, a fresh connection, used only once it answers.
    async fn probe(&self) {
        let wait = self.cfg.timeout.max(Duration::from_millis(250));
        if self.is_up() {
            if let Some(conn) = self.conn.load_full() {
                let mut conn = Conn::clone(&conn);
                let pong =
                    tokio::time::timeout(wait, redis::cmd("PING").query_async::<String>(&mut conn))
                        .await;
                match pong {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => self.mark_down(&format!("{:?}", e.kind())),
                    Err(_) => self.mark_down("ping timed out"),
                }
            }
            return;
        }
        // A connection that only timed out may still be good: try it first,
        // so a slow spell costs no reconnect.
        if let Some(conn) = self.conn.load_full() {
            let mut conn = Conn::clone(&conn);
            let pong =
                tokio::time::timeout(wait, redis::cmd("PING").query_async::<String>(&mut conn))
                    .await;
            if let Ok(Ok(_)) = pong {
                self.slow.store(0, Ordering::Relaxed);
                self.mark_up();
                return;
            }
        }
        let connect = Duration::from_secs(1).max(wait);
        let attempt = tokio::time::timeout(connect, async {
            let mut conn = self.connect(connect).await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await?;
            Ok::<Conn, redis::RedisError>(conn)
        })
        .await;
        match attempt {
            Ok(Ok(mut conn)) => {
                // Scripts loaded before any request runs one, so a start or
                // a restarted (empty) Redis costs no `NOSCRIPT` round trips.
                for script in self.scripts() {
                    let _ = tokio::time::timeout(wait, load(&mut conn, script.code)).await;
                }
                self.conn.store(Some(Arc::new(conn)));
                self.slow.store(0, Ordering::Relaxed);
                self.mark_up();
            }
            Ok(Err(e)) => self.mark_down(&format!("{:?}", e.kind())),
            Err(_) => self.mark_down("connecting timed out"),
        }
    }

    async fn connect(&self, timeout: Duration) -> redis::RedisResult<Conn> {
        if self.cfg.cluster {
            let client = redis::cluster::ClusterClient::builder(vec![self.cfg.url.as_str()])
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(self.cfg.url.as_str())?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(None);
            Ok(Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ))
        }
    }
}

/// `SCRIPT LOAD` (on a cluster, routed to every primary).
/// Whether an error is Redis's answer to a command (a script that failed,
/// a wrong type, a reply that does not decode), not Redis being
/// unavailable: an answer never trips the health circuit.
fn is_an_answer(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        // A reply that does not decode, or an error reply of a code the
        // client does not know (a script's `WRONGTYPE`, say).
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType | ErrorKind::Extension => true,
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NoScript
        ),
        _ => false,
    }
}

async fn load(conn: &mut Conn, code: &str) -> redis::RedisResult<String> {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(code)
        .query_async(conn)
        .await
}

/// Keeps the health fresh: every second while up, every 500 ms (or at
/// once, when a request saw a failure) while down. Ends with the gateway.
async fn prober(redis: Weak<Redis>, wake: Arc<Notify>) {
    loop {
        let Some(r) = redis.upgrade() else { return };
        let pause = if r.is_up() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(500)
        };
        // Wait without holding the gateway alive.
        drop(r);
        let woken = tokio::time::timeout(pause, wake.notified()).await.is_ok();
        let Some(r) = redis.upgrade() else { return };
        if woken {
            // A request just marked it down; give the server a moment
            // before the first reconnect.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r.probe().await;
    }
}
