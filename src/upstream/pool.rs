//! The upstream pool: the upstreams a request may go to, built once per
//! configuration, and the choice of one for a request. Today the pool holds
//! the one configured upstream (`default`); the request path asks it for
//! a peer and never names an upstream itself.

use std::collections::HashMap;
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};

use crate::api::{Endpoint, Format};
use crate::config::Config;
use crate::config::Secret;
use crate::metrics::Metrics;

/// One upstream: its name, where each path of it is, and the shared key it
/// is sent (`Authorization: Bearer` for OpenAI's API, `x-api-key` for
/// Anthropic's).
pub(crate) struct Peer {
    name: Arc<str>,
    /// Its name as `x-sluice-upstream` says it, made once.
    header: HeaderValue,
    /// Targets per upstream path, parsed once.
    targets: HashMap<&'static str, Target>,
    /// `Bearer <upstream key>`; `None` for a keyless upstream.
    auth: Option<HeaderValue>,
    /// The upstream key as Anthropic's `x-api-key` sends it; `None` for a
    /// keyless upstream.
    api_key: Option<HeaderValue>,
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
        self.targets.get(path)
    }

    /// The `Authorization` this upstream gets.
    pub(crate) fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// The `x-api-key` this upstream gets on Anthropic's Messages API.
    pub(crate) fn api_key(&self) -> Option<&HeaderValue> {
        self.api_key.as_ref()
    }
}

/// An upstream's metric handles: its name, its attempts' duration and its
/// calls in flight, made once per configuration so an attempt looks no
/// label up but its status's.
pub(crate) struct PeerStats {
    pub(super) name: Arc<str>,
    pub(super) requests: Option<prometheus::IntCounterVec>,
    pub(super) duration: Option<prometheus::Histogram>,
    pub(super) inflight: Option<prometheus::IntGauge>,
}

impl PeerStats {
    fn new(name: &Arc<str>, metrics: &Metrics) -> PeerStats {
        // Available until ejection (which rests an upstream) exists.
        metrics
            .upstream_available
            .with_label_values(&[&**name])
            .set(1);
        PeerStats {
            name: Arc::clone(name),
            requests: Some(metrics.upstream_requests.clone()),
            duration: Some(metrics.upstream_duration.with_label_values(&[&**name])),
            inflight: Some(metrics.upstream_inflight.with_label_values(&[&**name])),
        }
    }

    /// A target parsed on its own, counted nowhere.
    fn unnamed() -> PeerStats {
        PeerStats {
            name: Arc::from(""),
            requests: None,
            duration: None,
            inflight: None,
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
}

/// One call in flight on an upstream.
pub(crate) struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The upstreams of one configuration.
pub(crate) struct Pool {
    peers: Vec<Peer>,
}

/// The path the balance poller asks.
pub(crate) const BALANCE_PATH: &str = "/user/balance";

impl Pool {
    /// The pool of a configuration, with the shared key.
    pub(crate) fn new(config: &Config, key: &Secret, metrics: &Metrics) -> Pool {
        let name: Arc<str> = Arc::from("default");
        let stats = Arc::new(PeerStats::new(&name, metrics));
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
        // Each endpoint's path at the base URL of its format: Anthropic's
        // Messages API at `anthropic_base_url` (none when it is "").
        let upstream = &config.upstream;
        let targets = Endpoint::ALL
            .into_iter()
            .filter_map(|e| {
                let base = match e.format() {
                    Format::OpenAi => Some(upstream.base_url.as_str()),
                    Format::Anthropic => upstream.anthropic_base_url.as_deref(),
                };
                Some((e.upstream_path(), base?))
            })
            .chain([(BALANCE_PATH, upstream.base_url.as_str())])
            .filter_map(|(path, base)| {
                let mut target = Target::parse(&format!("{base}{path}"))?;
                target.stats = Arc::clone(&stats);
                Some((path, target))
            })
            .collect();
        Pool {
            peers: vec![Peer {
                header: HeaderValue::from_static("default"),
                name,
                targets,
                auth,
                api_key,
            }],
        }
    }

    /// The upstream a request goes to.
    pub(crate) fn choose(&self) -> Option<&Peer> {
        self.peers.first()
    }
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
