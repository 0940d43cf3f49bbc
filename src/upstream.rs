//! The only outbound code: a pooled hyper-util client (HTTP/1.1, a
//! connection per in-flight request; rustls with the webpki roots), Sluice's own cap on
//! in-flight upstream requests, and the retry loop of SPEC §3 (connect
//! errors, connections broken before headers, 429/500/502/503; backoff with
//! jitter; `retry-after` honoured up to 60 s; never once a byte went out).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::metrics::Metrics;

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Upstream {
    client: HttpsClient,
    /// `upstream.max_concurrent`; tokio's semaphore is fair (FIFO).
    slots: Option<Arc<Semaphore>>,
}

/// A response whose headers arrived, with the upstream slot it holds until
/// its body is done.
pub struct Sent {
    pub response: Response<Incoming>,
    pub slot: Option<OwnedSemaphorePermit>,
}

/// The longest `retry-after` Sluice waits out for a client.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> std::io::Result<Upstream> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(std::io::Error::other)?
            .https_or_http()
            // HTTP/1.1 only: over HTTP/2 the client shares one connection per
            // host and queues streams beyond the server's concurrency limit,
            // so one team's long streams could hold up everyone's first byte.
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Upstream {
            client,
            slots: (cfg.max_concurrent > 0).then(|| Arc::new(Semaphore::new(cfg.max_concurrent))),
        })
    }

    /// Sends `req`, retrying as SPEC §3 says, until `deadline` (the
    /// first-byte timeout).
    pub async fn send(
        &self,
        cfg: &UpstreamConfig,
        metrics: &Metrics,
        deadline: Instant,
        req: &Outbound,
    ) -> Result<Sent, GatewayError> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut attempt = 0u32;
        loop {
            let slot = match &self.slots {
                None => None,
                Some(s) => {
                    match tokio::time::timeout_at(deadline, Arc::clone(s).acquire_owned()).await {
                        Ok(Ok(permit)) => Some(permit),
                        Ok(Err(_)) | Err(_) => return Err(GatewayError::UpstreamTimeout),
                    }
                }
            };
            let started = Instant::now();
            let result =
                tokio::time::timeout_at(deadline, self.client.request(req.attempt())).await;
            metrics
                .upstream_duration
                .observe(started.elapsed().as_secs_f64());
            let retry_in = match result {
                Err(_) => {
                    metrics
                        .upstream_requests
                        .with_label_values(&["timeout"])
                        .inc();
                    return Err(GatewayError::UpstreamTimeout);
                }
                Ok(Err(e)) => {
                    metrics
                        .upstream_requests
                        .with_label_values(&["error"])
                        .inc();
                    tracing::debug!(error = %e, attempt, "upstream request failed");
                    if attempt >= cfg.max_retries {
                        return Err(GatewayError::UpstreamUnreachable);
                    }
                    backoff(attempt)
                }
                Ok(Ok(response)) => {
                    let status = response.status();
                    metrics
                        .upstream_requests
                        .with_label_values(&[status.as_str()])
                        .inc();
                    if !retryable(status) || attempt >= cfg.max_retries {
                        return Ok(Sent { response, slot });
                    }
                    let wait = retry_after(response.headers()).unwrap_or_else(|| backoff(attempt));
                    if tokio::time::Instant::now() + wait >= deadline {
                        // Waiting would outlast the client's deadline: hand
                        // upstream's answer over rather than a timeout.
                        return Ok(Sent { response, slot });
                    }
                    wait
                }
            };
            drop(slot);
            attempt += 1;
            if tokio::time::Instant::now() + retry_in >= deadline {
                return Err(GatewayError::UpstreamTimeout);
            }
            tokio::time::sleep(retry_in).await;
        }
    }
}

/// One upstream request, built afresh for each attempt (hyper consumes a
/// request; the body is a shared `Bytes`, the headers are cloned).
pub struct Outbound {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Outbound {
    fn attempt(&self) -> Request<Full<Bytes>> {
        let mut r = Request::new(Full::new(self.body.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// Reads a whole small upstream body (model lists, balances), bounded in
/// size and time.
pub async fn read_small(
    body: Incoming,
    limit: usize,
    within: Duration,
) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    match tokio::time::timeout(within, http_body_util::Limited::new(body, limit).collect()).await {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        Ok(Err(_)) => Err(GatewayError::UpstreamUnreachable),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503)
}

/// Exponential backoff from 100 ms, doubling, capped at 5 s, with full
/// jitter between half and all of it so retries from many clients spread.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(5));
    base.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// `retry-after-ms`, else `retry-after` in seconds, capped at 60 s.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let num = |name: &str| -> Option<f64> {
        h.get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let max = MAX_RETRY_AFTER.as_secs_f64();
    let secs = num("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| num(header::RETRY_AFTER.as_str()))?;
    Some(Duration::from_secs_f64(secs.min(max)))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded either way.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, and any header the Connection header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        h.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_both_headers_and_caps() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().expect("v"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().expect("v"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        h.remove("retry-after-ms");
        h.insert("retry-after", "3600".parse().expect("v"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert("retry-after", "1e300".parse().expect("v"));
        assert_eq!(
            retry_after(&h),
            Some(MAX_RETRY_AFTER),
            "absurd values saturate"
        );
    }

    #[test]
    fn backoff_grows_with_jitter() {
        for attempt in 0..8 {
            let d = backoff(attempt);
            let base = Duration::from_millis(100 << attempt.min(6)).min(Duration::from_secs(5));
            assert!(d >= base / 2 && d <= base, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "x"),
            ("content-type", "application/json"),
        ] {
            h.insert(k, v.parse().expect("v"));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-type"]);
    }
}
