//! Prometheus metrics (docs/metrics.md). One `Registry` owned by the gateway (no
//! process globals, so several gateways can live in one test process).
//! Label values are bounded: tenants come from config or are `unknown`,
//! models are known names or `other` (see `ModelLabels`), everything else is
//! a `&'static str`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::api::{CacheState, Endpoint};

/// Latency buckets for LLM traffic: from a cache hit (sub-millisecond) to a
/// long reasoning stream (minutes).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 60.0, 120.0, 300.0, 600.0,
];

pub struct Metrics {
    registry: Registry,
    /// Requests whose limits were decided locally because Redis was down.
    pub(crate) limits_local_fallback: IntCounterVec,
    /// Budgeted tenants' caps and their spend in the current period.
    pub(crate) budget_usd: GaugeVec,
    pub(crate) budget_spent_usd: GaugeVec,
    pub(crate) requests: IntCounterVec,
    pub(crate) request_duration: HistogramVec,
    pub(crate) ttft: HistogramVec,
    pub(crate) upstream_requests: IntCounterVec,
    pub(crate) upstream_duration: HistogramVec,
    /// This replica's calls in flight, per upstream.
    pub(crate) upstream_inflight: IntGaugeVec,
    /// 1 while an upstream takes requests, 0 while it rests.
    pub(crate) upstream_available: IntGaugeVec,
    /// Upstreams rested, per upstream and reason.
    pub(crate) upstream_ejections: IntCounterVec,
    /// Attempts moved off an upstream to another, per upstream left.
    pub(crate) upstream_failovers: IntCounterVec,
    pub(crate) tokens: IntCounterVec,
    pub(crate) tokens_saved: IntCounterVec,
    pub(crate) cost: prometheus::CounterVec,
    pub(crate) rate_limited: IntCounterVec,
    pub(crate) auth_failures: IntCounter,
    pub(crate) usage_estimated: IntCounterVec,
    pub(crate) inflight: IntGaugeVec,
    /// Time waiting for a full upstream's slot, per tenant.
    pub(crate) upstream_queue: HistogramVec,
    /// Requests waiting for a full upstream's slot, per tenant.
    pub(crate) upstream_waiting: IntGaugeVec,
    pub(crate) cache_entries: IntGauge,
    pub(crate) cache_bytes: IntGauge,
    pub(crate) balance: GaugeVec,
    pub(crate) config_reloads: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[expect(
        clippy::expect_used,
        reason = "metric definitions are static; a bad one is a bug caught by every test"
    )]
    pub fn new() -> Self {
        let r = Registry::new();
        let auth_failures = IntCounter::new(
            "sluice_auth_failures_total",
            "Requests refused for a missing or unknown key.",
        )
        .expect("valid metric");
        r.register(Box::new(auth_failures.clone()))
            .expect("unique metric");
        let cost = prometheus::CounterVec::new(
            Opts::new(
                "sluice_cost_usd_total",
                "Upstream cost in USD, from [pricing].",
            ),
            &["tenant", "model"],
        )
        .expect("valid metric");
        r.register(Box::new(cost.clone())).expect("unique metric");
        let upstream_waiting = IntGaugeVec::new(
            Opts::new(
                "sluice_upstream_waiting",
                "Requests waiting for a slot of a full upstream (max_concurrent).",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        r.register(Box::new(upstream_waiting.clone()))
            .expect("unique metric");
        let inflight = IntGaugeVec::new(
            Opts::new(
                "sluice_inflight_requests",
                "Requests being served, streams included.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        r.register(Box::new(inflight.clone()))
            .expect("unique metric");
        let cache_entries = IntGauge::new("sluice_cache_entries", "Entries in the response cache.")
            .expect("valid metric");
        r.register(Box::new(cache_entries.clone()))
            .expect("unique metric");
        let cache_bytes = IntGauge::new("sluice_cache_bytes", "Bytes held by the response cache.")
            .expect("valid metric");
        r.register(Box::new(cache_bytes.clone()))
            .expect("unique metric");
        let balance = GaugeVec::new(
            Opts::new(
                "sluice_upstream_balance",
                "An upstream account's total balance.",
            ),
            &["upstream", "currency"],
        )
        .expect("valid metric");
        r.register(Box::new(balance.clone()))
            .expect("unique metric");
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");

        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["tenant"]).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        Self {
            budget_usd: gauge(
                "sluice_budget_usd",
                "A budgeted tenant's spend cap per period, in USD.",
            ),
            budget_spent_usd: gauge(
                "sluice_budget_spent_usd",
                "A budgeted tenant's spend in the current period, in USD.",
            ),
            limits_local_fallback: counter(
                &r,
                "sluice_limits_local_fallback_total",
                "Requests whose limits were decided by this replica alone because Redis was unavailable.",
                &["tenant"],
            ),
            requests: counter(
                &r,
                "sluice_requests_total",
                "Requests answered, by outcome.",
                &["tenant", "model", "endpoint", "status", "cache"],
            ),
            request_duration: histogram(
                &r,
                "sluice_request_duration_seconds",
                "Time from request to the end of the response body.",
                &["tenant", "model", "endpoint", "stream"],
            ),
            ttft: histogram(
                &r,
                "sluice_time_to_first_token_seconds",
                "Time from request to the first data event (streams) or the first body byte.",
                &["tenant", "model", "cache"],
            ),
            upstream_requests: counter(
                &r,
                "sluice_upstream_requests_total",
                "Upstream attempts, retries included.",
                &["upstream", "status"],
            ),
            upstream_duration: histogram(
                &r,
                "sluice_upstream_duration_seconds",
                "Time from sending an upstream request to its response headers, per attempt.",
                &["upstream"],
            ),
            upstream_inflight: gauge_vec(
                &r,
                "sluice_upstream_inflight",
                "This replica's calls in flight, per upstream (from the request sent to the answer's end).",
                &["upstream"],
            ),
            upstream_available: gauge_vec(
                &r,
                "sluice_upstream_available",
                "1 while an upstream takes new requests, 0 while it is ejected.",
                &["upstream"],
            ),
            upstream_ejections: counter(
                &r,
                "sluice_upstream_ejections_total",
                "Times an upstream was ejected (rested), by reason: errors, rate_limited, auth.",
                &["upstream", "reason"],
            ),
            upstream_failovers: counter(
                &r,
                "sluice_upstream_failovers_total",
                "Attempts failed over to another upstream, by the upstream failed over from.",
                &["upstream"],
            ),
            tokens: counter(
                &r,
                "sluice_tokens_total",
                "Upstream tokens by type.",
                &["tenant", "model", "type"],
            ),
            tokens_saved: counter(
                &r,
                "sluice_cache_tokens_saved_total",
                "Tokens not spent upstream thanks to the cache and coalescing.",
                &["tenant", "model"],
            ),
            cost,
            rate_limited: counter(
                &r,
                "sluice_rate_limited_total",
                "Requests refused by a tenant limit.",
                &["tenant", "limit"],
            ),
            auth_failures,
            usage_estimated: counter(
                &r,
                "sluice_usage_estimated_total",
                "Requests metered by estimate because upstream usage never arrived.",
                &["tenant", "model"],
            ),
            upstream_queue: histogram(
                &r,
                "sluice_upstream_queue_seconds",
                "Time a request waited for a slot of a full upstream (max_concurrent), waits that ended in a 504 included.",
                &["tenant"],
            ),
            upstream_waiting,
            inflight,
            cache_entries,
            cache_bytes,
            balance,
            config_reloads: counter(
                &r,
                "sluice_config_reloads_total",
                "SIGHUP reloads, by result.",
                &["result"],
            ),
            registry: r,
        }
    }

    /// The usage handles of one (tenant, model), resolved once.
    /// The registry, for metrics that only some configurations have.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn usage_handles(&self, tenant: &str, model: &str) -> UsageHandles {
        let kinds = [
            "prompt",
            "completion",
            "prompt_cache_hit",
            "prompt_cache_miss",
            "reasoning",
        ];
        UsageHandles {
            tokens: kinds.map(|kind| self.tokens.with_label_values(&[tenant, model, kind])),
            cost: self.cost.with_label_values(&[tenant, model]),
            saved: self.tokens_saved.with_label_values(&[tenant, model]),
            estimated: self.usage_estimated.with_label_values(&[tenant, model]),
            requests: RequestHandles::default(),
        }
    }

    /// Counts a finished request and observes its duration (`None` for an
    /// unrouted one) and time to first byte. Where the labels are common
    /// ones (a 200, a known endpoint and cache state), through `cached`:
    /// the tenant's handles for this model, made on first use.
    pub(crate) fn observe_request(
        &self,
        cached: Option<&RequestHandles>,
        l: &RequestLabels<'_>,
        duration: Option<f64>,
        ttft: Option<f64>,
    ) {
        let e = l.endpoint.map(Endpoint::index);
        let c = l.cache.map_or(0, |c| c.index() + 1);
        let (endpoint, cache) = (endpoint_label(l.endpoint), cache_label(l.cache));
        let ok = cached
            .zip(e)
            .filter(|_| l.status == "200")
            .map(|(h, e)| &h.ok[e][c]);
        with_cell(
            ok,
            || {
                self.requests
                    .with_label_values(&[l.tenant, l.model, endpoint, l.status, cache])
            },
            IntCounter::inc,
        );
        let stream = if l.stream { "true" } else { "false" };
        if let Some(secs) = duration {
            with_cell(
                cached
                    .zip(e)
                    .map(|(h, e)| &h.duration[e][usize::from(l.stream)]),
                || {
                    self.request_duration
                        .with_label_values(&[l.tenant, l.model, endpoint, stream])
                },
                |h| h.observe(secs),
            );
        }
        if let Some(secs) = ttft {
            with_cell(
                cached.map(|h| &h.ttft[c]),
                || self.ttft.with_label_values(&[l.tenant, l.model, cache]),
                |h| h.observe(secs),
            );
        }
    }

    /// The text exposition for `/metrics`.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .ok();
        out
    }
}

/// Per (tenant, model) metric handles, so metering a request touches no
/// label map: each tenant keeps these for every model label, made on first use.
#[derive(Clone)]
pub(crate) struct UsageHandles {
    tokens: [prometheus::IntCounter; 5],
    cost: prometheus::Counter,
    pub(crate) saved: prometheus::IntCounter,
    pub(crate) estimated: prometheus::IntCounter,
    pub(crate) requests: RequestHandles,
}

/// The endpoints and cache states (and none) whose request metrics each
/// tenant keeps handles for.
const ENDPOINTS: usize = Endpoint::ALL.len();
const CACHE_STATES: usize = CacheState::ALL.len() + 1;

/// The `cache` label of a request: its state, or `none`.
fn cache_label(cache: Option<CacheState>) -> &'static str {
    cache.map_or("none", CacheState::label)
}

/// The `endpoint` label of a request: its endpoint, or `other`.
fn endpoint_label(endpoint: Option<Endpoint>) -> &'static str {
    endpoint.map_or(OTHER, Endpoint::label)
}

/// A (tenant, model)'s request metrics by endpoint, cache state and stream,
/// each made on first use: `requests_total` of 200s, the duration and TTFT
/// histograms.
#[derive(Clone, Default)]
pub(crate) struct RequestHandles {
    ok: [[OnceLock<IntCounter>; CACHE_STATES]; ENDPOINTS],
    duration: [[OnceLock<Histogram>; 2]; ENDPOINTS],
    ttft: [OnceLock<Histogram>; CACHE_STATES],
}

/// The labels of one finished request.
pub(crate) struct RequestLabels<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) model: &'a str,
    /// `None`: not routed (`other`).
    pub(crate) endpoint: Option<Endpoint>,
    pub(crate) status: &'a str,
    /// `None`: the request never reached the cache step (`none`).
    pub(crate) cache: Option<CacheState>,
    pub(crate) stream: bool,
}

/// A request's tokens by type, as metered.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tokens {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
    pub(crate) prompt_cache_hit: u64,
    pub(crate) prompt_cache_miss: u64,
    pub(crate) reasoning: u64,
}

/// Applies `f` to the handle in `cell` (made by `make` on first use), or,
/// without a cell, to a handle looked up now.
fn with_cell<T>(cell: Option<&OnceLock<T>>, make: impl FnOnce() -> T, f: impl FnOnce(&T)) {
    match cell {
        Some(cell) => f(cell.get_or_init(make)),
        None => f(&make()),
    }
}

impl UsageHandles {
    /// Records upstream usage: tokens by type, and its cost (USD) when the
    /// model has a price.
    pub(crate) fn record(&self, usage: &Tokens, cost: Option<f64>) {
        let by_kind = [
            usage.prompt,
            usage.completion,
            usage.prompt_cache_hit,
            usage.prompt_cache_miss,
            usage.reasoning,
        ];
        for (counter, n) in self.tokens.iter().zip(by_kind) {
            counter.inc_by(n);
        }
        if let Some(usd) = cost {
            self.cost.inc_by(usd);
        }
    }
}

/// Maps client-supplied model names to bounded label values. Built once per
/// config; the lookup borrows, so the hot path does not allocate.
#[derive(Debug)]
pub(crate) struct ModelLabels {
    known: HashMap<String, Arc<str>, foldhash::fast::RandomState>,
    other: Arc<str>,
}

pub(crate) const OTHER: &str = "other";

impl ModelLabels {
    pub(crate) fn new(models: impl IntoIterator<Item = String>) -> Self {
        Self {
            known: models
                .into_iter()
                .map(|m| {
                    let label: Arc<str> = Arc::from(m.as_str());
                    (m, label)
                })
                .collect(),
            other: Arc::from(OTHER),
        }
    }

    pub(crate) fn label(&self, model: &str) -> Arc<str> {
        self.known.get(model).unwrap_or(&self.other).clone()
    }

    /// Every label value this map can return.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<str>> {
        self.known.values().chain(std::iter::once(&self.other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_request_handles_count_under_the_same_labels() {
        let m = Metrics::new();
        let handles = m.usage_handles("team", "deepseek-chat");
        let labels = |status, cache| RequestLabels {
            tenant: "team",
            model: "deepseek-chat",
            endpoint: Some(Endpoint::Chat),
            status,
            cache,
            stream: true,
        };
        // Twice through the cached handles, once by lookup (a 429), once
        // without handles at all (no tenant): all under their own labels.
        for _ in 0..2 {
            m.observe_request(
                Some(&handles.requests),
                &labels("200", Some(CacheState::Miss)),
                Some(0.5),
                Some(0.1),
            );
        }
        m.observe_request(
            Some(&handles.requests),
            &labels("429", None),
            Some(0.0),
            None,
        );
        m.observe_request(
            None,
            &labels("200", Some(CacheState::Miss)),
            Some(0.5),
            Some(0.1),
        );
        let text = String::from_utf8(m.render()).expect("utf-8");
        let has = |needle: &str| text.lines().any(|l| l == needle);
        assert!(
            has(
                r#"sluice_requests_total{cache="miss",endpoint="chat",model="deepseek-chat",status="200",tenant="team"} 3"#
            ),
            "{text}"
        );
        assert!(
            has(
                r#"sluice_requests_total{cache="none",endpoint="chat",model="deepseek-chat",status="429",tenant="team"} 1"#
            ),
            "{text}"
        );
        assert!(
            has(
                r#"sluice_request_duration_seconds_count{endpoint="chat",model="deepseek-chat",stream="true",tenant="team"} 4"#
            ),
            "{text}"
        );
        assert!(
            has(
                r#"sluice_time_to_first_token_seconds_count{cache="miss",model="deepseek-chat",tenant="team"} 3"#
            ),
            "{text}"
        );
    }

    #[test]
    fn unknown_models_collapse_to_other() {
        let labels = ModelLabels::new(["deepseek-chat".to_string()]);
        assert_eq!(&*labels.label("deepseek-chat"), "deepseek-chat");
        assert_eq!(&*labels.label("gpt-9"), "other");
    }

    #[test]
    fn tokens_are_counted_by_type() {
        let m = Metrics::new();
        let t = Tokens {
            prompt: 30,
            completion: 10,
            prompt_cache_hit: 10,
            prompt_cache_miss: 20,
            reasoning: 0,
        };
        m.usage_handles("t", "deepseek-chat").record(&t, Some(0.25));
        let cost = m.cost.with_label_values(&["t", "deepseek-chat"]).get();
        assert!((cost - 0.25).abs() < 1e-12);
        assert_eq!(
            m.tokens
                .with_label_values(&["t", "deepseek-chat", "prompt_cache_miss"])
                .get(),
            20
        );
    }
}
