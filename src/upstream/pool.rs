//! The upstream pool (docs/upstreams.md): the upstreams of one
//! configuration, each with its targets, key, tier, weight, models and
//! model map, and the choice of one for a request: by model, then the
//! lowest tier with an available upstream, then by weight, preferring one
//! with a free slot; and on a failed attempt, the next (the same tier
//! first, then the next; the same one when no other is left).
//!
//! What outlives a reload (its connector, its fair gate, its health
//! record, its metric handles) is the upstream's `PeerState`, handed from
//! one pool to the next for as long as the upstream stays configured.
//!
//! A choice is a few bit operations over at most 64 upstreams, one hash
//! lookup of the model and one random number; it allocates nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rand::Rng;

use super::fair::FairGate;
use super::health::{now_ms, Health};
use crate::api::{Endpoint, Format};
use crate::config::{Config, Keys, PeerConfig};
use crate::metrics::Metrics;
use crate::shared::Redis;

/// The most upstreams one configuration may list (a choice is a bit set).
const MAX_PEERS: usize = crate::config::MAX_UPSTREAMS;

/// One upstream: its name, where each path of it is, the shared key it is
/// sent, and how requests are shared out to it.
pub(crate) struct Peer {
    name: Arc<str>,
    /// Its name as `x-sluice-upstream` says it, made once.
    header: HeaderValue,
    /// Targets per upstream path, parsed once (a handful: looked up by a
    /// scan, cheaper than hashing the path).
    targets: Vec<(&'static str, Target)>,
    /// `Bearer <upstream key>`; `None` for a keyless upstream.
    auth: Option<HeaderValue>,
    /// The key as Anthropic's `x-api-key` sends it; `None` for a keyless
    /// upstream.
    api_key: Option<HeaderValue>,
    tier: u32,
    weight: u32,
    /// Client model name → the JSON string this upstream gets instead.
    model_map: HashMap<String, Bytes>,
    pub(crate) balance_poll: Option<Duration>,
    pub(crate) state: Arc<PeerState>,
}

impl Peer {
    /// The name of this upstream (`default` for the one `[upstream]`).
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its name as a header value (`x-sluice-upstream`, a flight's log).
    pub(crate) fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// Where `path` (an endpoint's upstream path, or `/user/balance`) is.
    pub(crate) fn target(&self, path: &str) -> Option<&Target> {
        self.targets
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, t)| t)
    }

    /// The `Authorization` this upstream gets.
    pub(crate) fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// The `x-api-key` this upstream gets on Anthropic's API.
    pub(crate) fn api_key(&self) -> Option<&HeaderValue> {
        self.api_key.as_ref()
    }

    /// Whether its `model_map` renames any model.
    pub(crate) fn has_model_map(&self) -> bool {
        !self.model_map.is_empty()
    }

    /// The client's name of a model this upstream calls `upstream_name`
    /// (its `model_map` read backwards).
    pub(crate) fn client_name(&self, upstream_name: &str) -> Option<&str> {
        self.model_map.iter().find_map(|(client, json)| {
            (serde_json::from_slice::<&str>(json).ok()? == upstream_name).then_some(client.as_str())
        })
    }

    /// The model name (a JSON string) this upstream gets for `model`, when
    /// its `model_map` renames it.
    pub(crate) fn mapped(&self, model: &str) -> Option<&Bytes> {
        if self.model_map.is_empty() {
            return None;
        }
        self.model_map.get(model)
    }
}

/// What an upstream keeps across reloads while it stays configured.
pub(crate) struct PeerState {
    /// Its TLS setup (`ca_file`), fixed at start.
    pub(super) connector: HttpsConnector<HttpConnector>,
    /// Its `max_concurrent`, shared fairly between tenants; fixed at start.
    pub(super) gate: Option<Arc<FairGate>>,
    pub(crate) health: Arc<Health>,
    pub(super) stats: Arc<PeerStats>,
    /// What it was started with, so a reload can say it ignored a change.
    pub(crate) max_concurrent: usize,
    pub(crate) ca_file: Option<std::path::PathBuf>,
}

impl PeerState {
    fn new(
        cfg: &PeerConfig,
        name: &Arc<str>,
        connect_timeout: Duration,
        metrics: &Metrics,
        shared: Option<&Arc<Redis>>,
    ) -> PeerState {
        let connector = super::connector(connect_timeout, cfg.ca_file.as_deref())
            .or_else(|e| {
                // Start-up refuses such a CA file (`App::new`); a reload
                // that adds one gets an upstream that trusts the web roots
                // only, and says so.
                tracing::error!(upstream = %name, error = %e, "upstream ca_file not usable");
                super::connector(connect_timeout, None)
            })
            .expect("the web roots always make a connector");
        PeerState {
            connector,
            // With shared limits, the account's cap is one count for the
            // fleet.
            gate: (cfg.max_concurrent > 0).then(|| match shared {
                Some(redis) => FairGate::shared(cfg.max_concurrent, redis, name),
                None => FairGate::new(cfg.max_concurrent),
            }),
            health: Arc::new(Health::new(
                name,
                metrics.upstream_available.with_label_values(&[&**name]),
                metrics.upstream_ejections.clone(),
            )),
            stats: Arc::new(PeerStats::new(name, metrics)),
            max_concurrent: cfg.max_concurrent,
            ca_file: cfg.ca_file.clone(),
        }
    }

    /// Whether a request would get one of its slots at once.
    fn has_free_slot(&self) -> bool {
        self.gate.as_ref().is_none_or(|g| g.has_free())
    }
}

/// An upstream's metric handles: its name, its attempts' duration and its
/// calls in flight, made once so an attempt looks no label up but its
/// status's.
pub(crate) struct PeerStats {
    pub(super) name: Arc<str>,
    pub(super) requests: Option<prometheus::IntCounterVec>,
    pub(super) duration: Option<prometheus::Histogram>,
    pub(super) inflight: Option<prometheus::IntGauge>,
    pub(super) failovers: Option<prometheus::IntCounter>,
}

impl PeerStats {
    fn new(name: &Arc<str>, metrics: &Metrics) -> PeerStats {
        PeerStats {
            name: Arc::clone(name),
            requests: Some(metrics.upstream_requests.clone()),
            duration: Some(metrics.upstream_duration.with_label_values(&[&**name])),
            inflight: Some(metrics.upstream_inflight.with_label_values(&[&**name])),
            failovers: Some(metrics.upstream_failovers.with_label_values(&[&**name])),
        }
    }

    /// A target parsed on its own, counted nowhere.
    fn unnamed() -> PeerStats {
        PeerStats {
            name: Arc::from(""),
            requests: None,
            duration: None,
            inflight: None,
            failovers: None,
        }
    }

    /// Counts an attempt's outcome (an HTTP status, `error` or `timeout`).
    pub(super) fn attempt(&self, status: &str, took: f64) {
        if let Some(d) = &self.duration {
            d.observe(took);
        }
        if let Some(r) = &self.requests {
            r.with_label_values(&[&*self.name, status]).inc();
        }
    }

    /// A call in flight until the guard is dropped.
    pub(super) fn in_flight(&self) -> Option<InFlight> {
        self.inflight.as_ref().map(|g| {
            g.inc();
            InFlight(g.clone())
        })
    }

    /// Counts an attempt moved off this upstream to another.
    pub(super) fn failed_over(&self) {
        if let Some(f) = &self.failovers {
            f.inc();
        }
    }
}

/// One call in flight on an upstream.
pub(crate) struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The upstreams of one configuration, lowest tier first.
pub(crate) struct Pool {
    peers: Vec<Peer>,
    /// Upstreams that serve any model.
    any_model: u64,
    /// Per model named in some upstream's `models`: the upstreams that
    /// list it.
    by_model: HashMap<String, u64>,
    /// Per upstream path: the upstreams that have it.
    by_path: Vec<(&'static str, u64)>,
}

/// The path the balance poller asks.
pub(crate) const BALANCE_PATH: &str = "/user/balance";

/// The upstreams one request may use and those it tried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    allowed: u64,
    tried: u64,
    /// Those that answered 401 or 402.
    refused: u64,
    /// The upstream of the current attempt (an index into the pool).
    current: usize,
}

impl Route {
    /// Whether the request may use two or more upstreams.
    pub(crate) fn has_alternatives(&self) -> bool {
        self.allowed.count_ones() > 1
    }

    /// The upstream of the current attempt.
    pub(crate) fn current(&self) -> usize {
        self.current
    }
}

/// The upstreams that serve a request (chosen among when it is sent).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serving(u64);

/// Why the next attempt goes where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// To an upstream this request has not tried: at once.
    Other,
    /// To the same one again (no other is left): after its wait.
    Same,
    /// Nowhere (only for an auth failure: every upstream answered one).
    Done,
}

impl Pool {
    /// The pool of a configuration, with each upstream's key. An upstream
    /// that `previous` has too keeps its state (connector, gate, health).
    pub(crate) fn new(
        config: &Config,
        keys: &Keys,
        metrics: &Metrics,
        previous: Option<&Pool>,
        shared: Option<&Arc<Redis>>,
    ) -> Pool {
        let mut order: Vec<&PeerConfig> = config.upstreams.iter().take(MAX_PEERS).collect();
        // Lowest tier first; the config's order within a tier.
        order.sort_by_key(|u| u.tier);
        let mut pool = Pool {
            peers: Vec::with_capacity(order.len()),
            any_model: 0,
            by_model: HashMap::new(),
            by_path: Vec::new(),
        };
        for (i, cfg) in order.into_iter().enumerate() {
            let bit = 1u64 << i;
            let name: Arc<str> = Arc::from(cfg.name.as_str());
            let state = match previous.and_then(|p| p.peer_named(&cfg.name)) {
                Some(old) => Arc::clone(&old.state),
                None => Arc::new(PeerState::new(
                    cfg,
                    &name,
                    config.upstream.connect_timeout,
                    metrics,
                    shared,
                )),
            };
            state
                .health
                .configure(config.upstream.eject_after, config.upstream.eject_for);
            if cfg.models.is_empty() {
                pool.any_model |= bit;
            }
            for m in &cfg.models {
                *pool.by_model.entry(m.clone()).or_default() |= bit;
            }
            // Each endpoint's path at the base URL of its format:
            // Anthropic's Messages API at `anthropic_base_url` (none when
            // it is "").
            let mut targets = Vec::new();
            let paths = Endpoint::ALL
                .into_iter()
                .filter_map(|e| {
                    let base = match e.format() {
                        Format::OpenAi => Some(cfg.base_url.as_str()),
                        Format::Anthropic => cfg.anthropic_base_url.as_deref(),
                    };
                    Some((e.upstream_path(), base?))
                })
                .chain([(BALANCE_PATH, cfg.base_url.as_str())]);
            for (path, base) in paths {
                if let Some(mut target) = Target::parse(&format!("{base}{path}")) {
                    target.stats = Arc::clone(&state.stats);
                    targets.push((path, target));
                    match pool.by_path.iter_mut().find(|(p, _)| *p == path) {
                        Some((_, set)) => *set |= bit,
                        None => pool.by_path.push((path, bit)),
                    }
                }
            }
            let key = keys.get(&cfg.name);
            let secret = |value: String| {
                (!key.is_empty())
                    .then(|| HeaderValue::from_str(&value).ok())
                    .flatten()
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
            };
            let auth = secret(format!("Bearer {}", key.expose()));
            let api_key = secret(key.expose().to_string());
            let model_map = cfg
                .model_map
                .iter()
                .map(|(from, to)| {
                    let json = serde_json::to_vec(to).unwrap_or_default();
                    (from.clone(), Bytes::from(json))
                })
                .collect();
            pool.peers.push(Peer {
                // `default` without an allocation (cloned per request).
                header: if cfg.name == "default" {
                    HeaderValue::from_static("default")
                } else {
                    HeaderValue::from_str(&cfg.name)
                        .unwrap_or_else(|_| HeaderValue::from_static("default"))
                },
                name,
                targets,
                auth,
                api_key,
                tier: cfg.tier,
                weight: cfg.weight.max(1),
                model_map,
                balance_poll: cfg.balance_poll,
                state,
            });
        }
        // An upstream no longer configured leaves the availability gauge
        // (it would read 0 forever if it went while resting).
        for gone in previous
            .into_iter()
            .flat_map(|p| p.peers.iter())
            .filter(|old| pool.peer_named(old.name()).is_none())
        {
            let _ = metrics
                .upstream_available
                .remove_label_values(&[&**gone.name()]);
        }
        pool
    }

    fn peer_named(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| &*p.name == name)
    }

    /// Whether some upstream serves any model (its `models` is empty).
    pub(crate) fn serves_every_model(&self) -> bool {
        self.any_model != 0
    }

    /// Every upstream, lowest tier first.
    pub(crate) fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// The upstream at `index` (a `Route`'s).
    pub(crate) fn peer(&self, index: usize) -> &Peer {
        &self.peers[index]
    }

    /// The upstreams a request for `model` (`None`: no model, as `GET
    /// /models`) on `path` may use; `None` when none serves it.
    pub(crate) fn serving(&self, model: Option<&str>, path: &str) -> Option<Serving> {
        let serving = match model {
            None => u64::MAX,
            Some(_) if self.by_model.is_empty() => self.any_model,
            Some(m) => self.any_model | self.by_model.get(m).copied().unwrap_or(0),
        };
        let on_path = self
            .by_path
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(0, |(_, set)| *set);
        Some(Serving(serving & on_path)).filter(|s| s.0 != 0)
    }

    /// A request's route among `serving`, with its first upstream chosen
    /// now (just before the call: availability changes meanwhile).
    pub(crate) fn start(&self, serving: Serving) -> Route {
        let current = self.first(serving.0);
        Route {
            allowed: serving.0,
            tried: 1 << current,
            refused: 0,
            current,
        }
    }

    /// `serving` and `start` in one.
    pub(crate) fn route(&self, model: Option<&str>, path: &str) -> Option<Route> {
        self.serving(model, path).map(|s| self.start(s))
    }

    /// A route to the one upstream at `index` (the balance poll's).
    pub(crate) fn only(index: usize) -> Route {
        Route {
            allowed: 1 << index,
            tried: 1 << index,
            refused: 0,
            current: index,
        }
    }

    /// The upstreams of `among` that take requests now.
    fn available(&self, among: u64) -> u64 {
        let now = now_ms();
        bits(among)
            .filter(|&i| self.peers[i].state.health.available(now))
            .fold(0, |acc, i| acc | 1 << i)
    }

    /// The lowest tier of `among` (not empty).
    fn lowest_tier(&self, among: u64) -> u64 {
        let tier = self.peers[among.trailing_zeros() as usize].tier;
        bits(among)
            .filter(|&i| self.peers[i].tier == tier)
            .fold(0, |acc, i| acc | 1 << i)
    }

    /// The first upstream for a request: the lowest tier with an available
    /// one, preferring those with a free slot, by weight; when every one is
    /// resting, the one whose rest ends first.
    fn first(&self, allowed: u64) -> usize {
        if allowed.count_ones() == 1 {
            // The only one, resting or not.
            return allowed.trailing_zeros() as usize;
        }
        let available = self.available(allowed);
        if available == 0 {
            return self.rest_ends_first(allowed);
        }
        let tier = self.lowest_tier(available);
        let free = bits(tier)
            .filter(|&i| self.peers[i].state.has_free_slot())
            .fold(0, |acc, i| acc | 1 << i);
        self.by_weight(if free != 0 { free } else { tier })
    }

    fn rest_ends_first(&self, among: u64) -> usize {
        bits(among)
            .min_by_key(|&i| self.peers[i].state.health.rest_ends())
            .unwrap_or(0)
    }

    /// One of `among` (not empty), each in proportion to its weight.
    fn by_weight(&self, among: u64) -> usize {
        if among.count_ones() == 1 {
            return among.trailing_zeros() as usize;
        }
        let total: u64 = bits(among).map(|i| u64::from(self.peers[i].weight)).sum();
        let mut pick = rand::rng().random_range(0..total);
        for i in bits(among) {
            let w = u64::from(self.peers[i].weight);
            if pick < w {
                return i;
            }
            pick -= w;
        }
        among.trailing_zeros() as usize
    }

    /// Where a request goes after its current attempt failed: an available
    /// upstream it has not tried (the same tier first, then the lowest
    /// other); otherwise the same one again. After an `auth` failure (401,
    /// 402): also a resting one it has not tried, then one it tried that
    /// did not answer 401 or 402; `Done` when every one did.
    pub(crate) fn next(&self, route: &mut Route, auth: bool) -> Next {
        if auth {
            route.refused |= 1 << route.current;
        }
        let untried = route.allowed & !route.tried;
        let available = self.available(untried);
        let tier = self.peers[route.current].tier;
        let same_tier = bits(available)
            .filter(|&i| self.peers[i].tier == tier)
            .fold(0, |acc, i| acc | 1 << i);
        let not_refused = route.allowed & !route.refused;
        let pick = if same_tier != 0 {
            Some(self.by_weight(same_tier))
        } else if available != 0 {
            Some(self.by_weight(self.lowest_tier(available)))
        } else if auth && untried != 0 {
            Some(self.rest_ends_first(untried))
        } else if auth && not_refused != 0 {
            Some(self.first(not_refused))
        } else {
            None
        };
        match pick {
            Some(i) => {
                self.peers[route.current].state.stats.failed_over();
                route.current = i;
                route.tried |= 1 << i;
                Next::Other
            }
            None if auth => Next::Done,
            None => Next::Same,
        }
    }
}

/// The indexes of the set bits of `set`, lowest first.
fn bits(mut set: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if set == 0 {
            return None;
        }
        let i = set.trailing_zeros() as usize;
        set &= set - 1;
        Some(i)
    })
}

/// Where one upstream URL is, parsed once per config: the scheme and
/// authority pick and open the connection, the origin-form target goes on
/// the request line, and `Host` names the authority.
pub(crate) struct Target {
    /// The upstream's metric handles, made once per configuration.
    pub(super) stats: Arc<PeerStats>,
    pub(super) origin: Origin,
    pub(super) connect: Uri,
    pub(super) path: Uri,
    pub(super) host: HeaderValue,
}

#[derive(Clone, PartialEq, Eq)]
pub(super) struct Origin {
    pub(super) scheme: Scheme,
    pub(super) authority: Authority,
}

impl Target {
    /// `None` unless `url` is absolute (`http://` or `https://` and a host).
    pub(crate) fn parse(url: &str) -> Option<Target> {
        let connect: Uri = url.parse().ok()?;
        let scheme = connect.scheme()?.clone();
        let authority = connect.authority()?.clone();
        let path = Uri::from(
            connect
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_string(),
        };
        Some(Target {
            stats: Arc::new(PeerStats::unnamed()),
            host: HeaderValue::from_str(&host).ok()?,
            origin: Origin { scheme, authority },
            connect,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::health::Verdict;

    /// A pool of `upstreams` (TOML), each keyed by its own env var.
    fn pool(upstreams: &str) -> (Pool, Config) {
        let text = format!(
            "[upstream]\neject_after = 1\n{upstreams}\n[[tenants]]\nname = \"t\"\nkey_sha256 = [\"{}\"]\n",
            "ab".repeat(32)
        );
        let config = Config::parse(&text, |_| None).expect("valid");
        let keys = config
            .upstream_keys(|name| Some(format!("sk-{name}")))
            .expect("keys");
        let pool = Pool::new(&config, &keys, &Metrics::new(), None, None);
        (pool, config)
    }

    fn peer(name: &str, extra: &str) -> String {
        format!(
            "[[upstreams]]\nname = \"{name}\"\nbase_url = \"http://{name}.test\"\napi_key_env = \"{}\"\n{extra}\n",
            name.to_uppercase()
        )
    }

    const CHAT: &str = "/chat/completions";

    fn name(pool: &Pool, route: &Route) -> String {
        pool.peer(route.current()).name().to_string()
    }

    #[test]
    fn each_upstream_gets_its_own_key_and_the_default_is_named() {
        let (pool, _) = pool(&format!("{}{}", peer("a", ""), peer("b", "")));
        let auth = |i: usize| {
            pool.peer(i)
                .auth()
                .expect("key")
                .to_str()
                .expect("ascii")
                .to_string()
        };
        assert_eq!(auth(0), "Bearer sk-A");
        assert_eq!(auth(1), "Bearer sk-B");
        let text = format!(
            "[[tenants]]\nname = \"t\"\nkey_sha256 = [\"{}\"]\n",
            "ab".repeat(32)
        );
        let config = Config::parse(&text, |_| None).expect("valid");
        let one = Pool::new(
            &config,
            &Keys::from(crate::config::Secret::new("k")),
            &Metrics::new(),
            None,
            None,
        );
        assert_eq!(&**one.peer(0).name(), "default");
        assert_eq!(one.peer(0).header(), "default");
    }

    #[test]
    fn by_model_then_tier_then_weight() {
        let (pool, _) = pool(&format!(
            "{}{}{}",
            peer("r1", "tier = 1\nmodels = [\"deepseek-chat\", \"only-r\"]"),
            peer(
                "a",
                "weight = 3\nmodels = [\"deepseek-chat\", \"deepseek-reasoner\"]"
            ),
            peer("b", "weight = 1\nmodels = [\"deepseek-chat\"]"),
        ));
        assert!(
            pool.route(Some("unknown"), CHAT).is_none(),
            "nobody serves it"
        );
        let r = pool.route(Some("only-r"), CHAT).expect("r1 serves it");
        assert_eq!(
            name(&pool, &r),
            "r1",
            "a higher tier serves what only it has"
        );
        let r = pool.route(Some("deepseek-reasoner"), CHAT).expect("a");
        assert_eq!(name(&pool, &r), "a");
        let mut a = 0;
        for _ in 0..4000 {
            let r = pool.route(Some("deepseek-chat"), CHAT).expect("served");
            match name(&pool, &r).as_str() {
                "a" => a += 1,
                "b" => {}
                other => panic!("tier 0 is available, yet {other} was chosen"),
            }
        }
        // Weights 3:1: a takes 75 % (within a few percent).
        assert!((2850..=3150).contains(&a), "a got {a} of 4000");
    }

    #[test]
    fn failing_over_goes_to_the_same_tier_first_then_the_next() {
        let (pool, _) = pool(&format!(
            "{}{}{}",
            peer("a", ""),
            peer("b", ""),
            peer("c", "tier = 1"),
        ));
        let mut r = pool.route(Some("m"), CHAT).expect("route");
        let first = name(&pool, &r);
        assert_eq!(pool.next(&mut r, false), Next::Other);
        let second = name(&pool, &r);
        assert_ne!(first, second);
        assert!(second == "a" || second == "b");
        assert_eq!(pool.next(&mut r, false), Next::Other);
        assert_eq!(name(&pool, &r), "c", "then the next tier");
        assert_eq!(
            pool.next(&mut r, false),
            Next::Same,
            "nothing left: the same one"
        );
        assert_eq!(name(&pool, &r), "c");
        // c answers 401: back to one that did not (a and b answered 503).
        assert_eq!(pool.next(&mut r, true), Next::Other);
        assert_ne!(name(&pool, &r), "c");
        assert_eq!(pool.next(&mut r, true), Next::Other);
        assert_eq!(
            pool.next(&mut r, true),
            Next::Done,
            "every one answered 401"
        );
        // An ejected upstream gets no first attempts while another is up.
        let a = &pool.peer(0).state.health;
        a.observe(Verdict::Failed);
        for _ in 0..100 {
            let r = pool.route(Some("m"), CHAT).expect("route");
            assert_eq!(name(&pool, &r), "b");
        }
        pool.peer(1).state.health.observe(Verdict::Failed);
        let r = pool.route(Some("m"), CHAT).expect("route");
        assert_eq!(name(&pool, &r), "c", "tier 1 while tier 0 rests");
        pool.peer(2).state.health.observe(Verdict::Auth);
        let r = pool.route(Some("m"), CHAT).expect("route");
        assert_eq!(name(&pool, &r), "a", "all resting: the one back first");
    }

    #[test]
    fn a_reload_keeps_an_upstreams_state() {
        let (old, _) = pool(&format!("{}{}", peer("a", ""), peer("b", "")));
        old.peer(0).state.health.observe(Verdict::Failed);
        let text = format!(
            "{}{}[[tenants]]\nname = \"t\"\nkey_sha256 = [\"{}\"]\n",
            peer("a", "weight = 5"),
            peer("c", ""),
            "ab".repeat(32)
        );
        let next_config = Config::parse(&text, |_| None).expect("valid");
        let keys = Keys::from(crate::config::Secret::new("k"));
        let next = Pool::new(&next_config, &keys, &Metrics::new(), Some(&old), None);
        assert!(Arc::ptr_eq(&next.peer(0).state, &old.peer(0).state));
        assert!(
            !next.peer(0).state.health.available(now_ms()),
            "still resting"
        );
        assert!(!Arc::ptr_eq(&next.peer(1).state, &old.peer(1).state));
    }

    #[test]
    fn model_map_renames_only_for_that_upstream() {
        let (pool, _) = pool(&format!(
            "{}{}",
            peer("a", "model_map = { \"deepseek-chat\" = \"ds/V3\" }"),
            peer("b", "")
        ));
        assert_eq!(
            pool.peer(0).mapped("deepseek-chat").map(|b| &b[..]),
            Some(&b"\"ds/V3\""[..])
        );
        assert_eq!(pool.peer(0).mapped("deepseek-reasoner"), None);
        assert_eq!(pool.peer(1).mapped("deepseek-chat"), None);
    }
}
