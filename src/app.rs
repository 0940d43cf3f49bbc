//! The gateway's shared state: the reloadable `Snapshot` (config, tenant
//! table keyed by key hash, model labels, upstream key) behind an `ArcSwap`
//! so every request reads it without a lock, plus what lives for the whole
//! process (metrics, cache, in-flight map, upstream client, shutdown state).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;
use tokio::sync::watch;

use crate::api::Format;
use crate::cache::tiered::CacheStore;
use crate::cache::Store;
use crate::config::{CacheScope, Config, Keys, Pricing, RedisConfig};
use crate::flight::fleet::FleetFlights;
use crate::flight::Flights;
use crate::limit::budget::{Budgets, SystemClock};
use crate::limit::Limiter;
use crate::metrics::{Metrics, ModelLabels};
use crate::shared::Redis;
use crate::tenant::{key_sha256, presented_key, Tenant};
use crate::upstream::pool::Pool;
use crate::upstream::Upstream;

/// Everything a reload replaces, swapped in atomically.
pub struct Snapshot {
    pub config: Config,
    /// Looked up on every request: foldhash (seeded per process), not
    /// SipHash, as in every table the request path reads.
    by_key: HashMap<[u8; 32], Arc<Tenant>, foldhash::fast::RandomState>,
    pub(crate) by_name: HashMap<String, Arc<Tenant>>,
    pub(crate) models: ModelLabels,
    /// The upstreams requests go to.
    pub(crate) upstreams: Pool,
}

impl Snapshot {
    /// Builds the tenant table. Tenants whose limits did not change keep the
    /// limiter state of `previous`, so a reload grants no free burst.
    pub fn build(
        config: Config,
        keys: &Keys,
        previous: Option<&Snapshot>,
        limiter: &Limiter,
        metrics: &Arc<Metrics>,
    ) -> Snapshot {
        let models = ModelLabels::new(config.known_models());
        let mut by_key = HashMap::default();
        let mut by_name = HashMap::new();
        for t in &config.tenants {
            let limits = previous
                .and_then(|p| p.by_name.get(&t.name))
                .filter(|old| old.limits.spec == t.limits && old.limits.budget_spec() == t.budget)
                .map(|old| Arc::clone(&old.limits))
                .unwrap_or_else(|| limiter.tenant(&t.name, t.limits, t.budget, metrics));
            let tenant = Arc::new(Tenant::new(t, limits, &models, metrics));
            for hash in &t.key_sha256 {
                by_key.insert(*hash, Arc::clone(&tenant));
            }
            by_name.insert(t.name.clone(), tenant);
        }
        let upstreams = Pool::new(
            &config,
            keys,
            metrics,
            previous.map(|p| &p.upstreams),
            limiter.shared_redis(),
        );
        Snapshot {
            upstreams,
            models,
            config,
            by_key,
            by_name,
        }
    }

    /// The key a request presents (`Authorization: Bearer <key>`, or
    /// Anthropic's `x-api-key`) → the tenant whose key hashes to it.
    pub fn authenticate(&self, headers: &HeaderMap, format: Format) -> Option<Arc<Tenant>> {
        let key = presented_key(headers, format)?;
        self.by_key.get(&key_sha256(key)).cloned()
    }

    /// The upstream a chat request for `model` would be sent to first (the
    /// choice each request makes), `None` when no upstream serves it.
    pub fn first_upstream(&self, model: &str) -> Option<&str> {
        let path = crate::api::Endpoint::Chat.upstream_path();
        let route = self.upstreams.route(Some(model), path)?;
        Some(self.upstreams.peer(route.current()).name())
    }

    /// The price of a model: its own, else `[pricing.default]`.
    pub(crate) fn price(&self, model: &str) -> Option<&Pricing> {
        self.config
            .pricing
            .get(model)
            .or_else(|| self.config.pricing.get("default"))
    }

    /// The cache scope of a tenant's requests: its name, or the shared pool.
    pub(crate) fn cache_scope<'a>(&self, tenant: &'a Tenant) -> Option<&'a str> {
        match self.config.cache.scope {
            CacheScope::Tenant => Some(&tenant.name),
            CacheScope::Shared => None,
        }
    }
}

/// Shutdown as the request path sees it.
pub(crate) struct Lifecycle {
    ready: AtomicBool,
    /// Flips to true when the shutdown grace is over: running streams end.
    grace_over: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(true),
            grace_over: watch::channel(false).0,
        }
    }
}

impl Lifecycle {
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    pub(crate) fn stop_accepting(&self) {
        self.ready.store(false, Ordering::Release);
    }
    pub(crate) fn end_grace(&self) {
        self.grace_over.send_replace(true);
    }
    pub(crate) fn grace_watch(&self) -> watch::Receiver<bool> {
        self.grace_over.subscribe()
    }
}

pub struct App {
    pub snapshot: ArcSwap<Snapshot>,
    pub(crate) metrics: Arc<Metrics>,
    /// Tenant limits: in memory, or shared through Redis (docs/redis.md).
    pub(crate) limiter: Limiter,
    /// The cache: memory, in front of Redis when it is shared.
    pub(crate) cache: Arc<CacheStore>,
    /// Coalescing across replicas, when `[redis] coalesce` is on.
    pub(crate) fleet_flights: Option<Arc<FleetFlights>>,
    pub(crate) flights: Arc<Flights>,
    pub(crate) upstream: Upstream,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) request_ids: crate::http::request_id::RequestIds,
}

impl App {
    /// The process-wide state. With `[redis]`, connects to Redis (a Redis
    /// that does not answer is logged and retried in the background, never
    /// a start-up failure).
    pub(crate) async fn new(config: Config, keys: &Keys) -> Result<App, std::io::Error> {
        let metrics = Arc::new(Metrics::new());
        // Each upstream's CA file makes a TLS setup, or Sluice does not start.
        for u in &config.upstreams {
            crate::upstream::connector(config.upstream.connect_timeout, u.ca_file.as_deref())?;
        }
        let upstream = Upstream::new(config.upstream.connect_timeout);
        let store = Store::new(config.cache.max_bytes, config.cache.ttl);
        let redis = match &config.redis {
            Some(cfg) => Some(Redis::start(cfg, metrics.registry()).await),
            None => None,
        };
        let budgets = Budgets::open(config.budgets.state_path.as_deref(), Arc::new(SystemClock))
            .map_err(std::io::Error::other)?;
        let limiter = Limiter::new(redis.as_ref().zip(config.redis.as_ref()), budgets);
        let cache = Arc::new(CacheStore::new(
            store,
            redis.as_ref().zip(config.redis.as_ref()),
            metrics.registry(),
        ));
        let fleet_flights = redis
            .as_ref()
            .zip(config.redis.as_ref())
            .filter(|(_, c)| c.coalesce)
            .map(|(r, _)| Arc::new(FleetFlights::new(Arc::clone(r), Arc::clone(&cache))));
        if config.tenants.iter().any(|t| t.budget.is_some()) && !limiter.spend_is_kept() {
            tracing::warn!(
                "tenants have budgets but neither [redis] nor budgets.state_path keeps their spend: a restart resets it"
            );
        }
        let snapshot = Snapshot::build(config, keys, None, &limiter, &metrics);
        Ok(App {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            limiter,
            cache,
            fleet_flights,
            flights: Arc::new(Flights::default()),
            upstream,
            lifecycle: Lifecycle::default(),
            request_ids: crate::http::request_id::RequestIds::default(),
        })
    }

    /// Swaps in a new config. What cannot change in a running process
    /// (listen addresses, the cache's size and TTL, the upstream connect
    /// timeout, concurrency cap and CA file, `[redis]`, the spend state
    /// file) keeps its running value; a
    /// change to it is logged at warn naming each key, and the keys are
    /// returned so the caller never reports them applied. Everything else
    /// applies to new connections and requests.
    pub(crate) fn reload(&self, mut config: Config, keys: &Keys) -> Vec<String> {
        let current = self.snapshot.load();
        let old = &current.config;
        let mut ignored = Vec::new();
        macro_rules! fixed {
            ($name:literal, $($field:tt).+) => {
                if config.$($field).+ != old.$($field).+ {
                    ignored.push($name.to_string());
                    config.$($field).+ = old.$($field).+.clone();
                }
            };
        }
        fixed!("server.listen", server.listen);
        fixed!("server.admin_listen", server.admin_listen);
        fixed!("cache.max_bytes", cache.max_bytes);
        fixed!("cache.ttl_secs", cache.ttl);
        fixed!("upstream.connect_timeout_secs", upstream.connect_timeout);
        // An upstream that stays keeps its slots and TLS setup.
        for u in &mut config.upstreams {
            let Some(running) = current
                .upstreams
                .peers()
                .iter()
                .find(|p| **p.name() == *u.name)
            else {
                continue;
            };
            let at = config_path(old, &u.name);
            if u.max_concurrent != running.state.max_concurrent {
                ignored.push(format!("{at}.max_concurrent"));
                u.max_concurrent = running.state.max_concurrent;
            }
            if u.ca_file != running.state.ca_file {
                ignored.push(format!("{at}.ca_file"));
                u.ca_file.clone_from(&running.state.ca_file);
            }
        }
        // The spend state file is opened once, at start.
        fixed!("budgets.state_path", budgets.state_path);
        if config.redis != old.redis {
            ignored.extend(
                redis_changes(old.redis.as_ref(), config.redis.as_ref())
                    .into_iter()
                    .map(String::from),
            );
            config.redis = old.redis.clone();
        }
        if !ignored.is_empty() {
            tracing::warn!(
                keys = %ignored.join(", "),
                "these settings cannot change in a running process; the change is ignored until a restart"
            );
        }
        let next = Snapshot::build(config, keys, Some(&current), &self.limiter, &self.metrics);
        self.snapshot.store(Arc::new(next));
        ignored
    }
}

/// Where an upstream's keys were written in the running config: `upstream`
/// for the one `[upstream]`, `upstreams.<name>` otherwise.
fn config_path(running: &Config, name: &str) -> String {
    running
        .upstreams
        .iter()
        .find(|u| u.name == name)
        .map_or_else(
            || format!("upstreams.{name}"),
            |u| running.upstream_key_path(u),
        )
}

/// The `[redis]` keys a reload would change (the URL by name only: it may
/// hold a password).
fn redis_changes(old: Option<&RedisConfig>, new: Option<&RedisConfig>) -> Vec<&'static str> {
    let (old, new) = match (old, new) {
        (Some(o), Some(n)) => (o, n),
        _ => return vec!["redis.url"],
    };
    [
        ("redis.url", old.url != new.url),
        ("redis.cluster", old.cluster != new.cluster),
        ("redis.key_prefix", old.key_prefix != new.key_prefix),
        ("redis.timeout_ms", old.timeout != new.timeout),
        ("redis.on_error", old.on_error != new.on_error),
        ("redis.limits", old.limits != new.limits),
        ("redis.cache", old.cache != new.cache),
        ("redis.coalesce", old.coalesce != new.coalesce),
        (
            "redis.cache_max_entry_bytes",
            old.cache_max_entry_bytes != new.cache_max_entry_bytes,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_changes_name_each_key() {
        let text = |extra: &str| {
            format!(
                "[redis]\nurl = \"redis://h:1\"\n{extra}\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{}\"]\n",
                "ab".repeat(32)
            )
        };
        let parse = |t: &str| Config::parse(t, |_| None).expect("valid").redis;
        let a = parse(&text(""));
        let b = parse(&text("timeout_ms = 50\non_error = \"deny\""));
        assert_eq!(
            redis_changes(a.as_ref(), b.as_ref()),
            vec!["redis.timeout_ms", "redis.on_error"]
        );
        assert_eq!(redis_changes(a.as_ref(), None), vec!["redis.url"]);
    }
}
