//! The only outbound code: Sluice's own pool of HTTP/1.1 connections over
//! hyper's connection-level client (rustls with the webpki roots for
//! https), its cap on in-flight upstream requests, and the retry loop of
//! docs/api.md (connect errors, connections broken before headers,
//! 429/500/502/503; backoff with jitter; `retry-after` honoured up to 60 s;
//! never once a byte went out).
//!
//! The pool is written here rather than taken from hyper-util's client
//! because it is the request path's largest cost after the kernel: each
//! connection is driven by the request using it (hyper's connection future
//! is polled inside the request's own task, not spawned as a task of its
//! own), so a response costs no wake-up of another task and no hop through
//! a pool mutex. Idle connections wait in a lock-free queue.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use crossbeam_queue::ArrayQueue;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpStream;
use tower_service::Service;

pub(crate) mod balance;
pub(crate) mod fair;
mod fleet_cap;
pub(crate) mod health;
pub(crate) mod pool;

use fair::{Claimant, Slot};
use health::{Health, Verdict};
use pool::{Next, Origin, Peer, Pool, Route, Target};

use crate::config::UpstreamConfig;
use crate::http::error::GatewayError;
use crate::metrics::Metrics;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client: Sluice's own pool of upstream connections, shared by every
/// upstream (each connection belongs to one origin).
pub(crate) struct Upstream {
    pool: Arc<Links>,
    /// For the TCP connect and the TLS handshake together.
    connect_timeout: Duration,
}

/// A response whose headers arrived, with the upstream slot it holds until
/// its body is done, and the upstream that sent it.
pub(crate) struct Sent {
    pub(crate) response: Response<UpstreamBody>,
    pub(crate) slot: Option<Slot>,
    pub(crate) upstream: HeaderValue,
    /// Its health, told if a stream's first event never comes.
    pub(crate) health: Option<Arc<Health>>,
}

/// The longest `retry-after` Sluice waits out for a client.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The TLS and TCP setup of one upstream: the public web roots, plus the
/// certificates of `ca_file` when given.
pub(crate) fn connector(
    connect_timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> std::io::Result<HttpsConnector<HttpConnector>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match ca_file {
        None => builder
            .with_provider_and_webpki_roots(provider)
            .map_err(std::io::Error::other)?,
        // A private CA: its certificates, in addition to the public web
        // roots.
        Some(path) => {
            let mut roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            roots
                .roots
                .extend(crate::config::read_ca_file(path).map_err(std::io::Error::other)?);
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(std::io::Error::other)?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(tls)
        }
    };
    Ok(builder
        .https_or_http()
        // HTTP/1.1 only: over HTTP/2 one connection per host would carry
        // every stream, queued beyond the server's concurrency limit, so
        // one team's long streams could hold up everyone's first byte.
        .enable_http1()
        .wrap_connector(http))
}

impl Upstream {
    pub(crate) fn new(connect_timeout: Duration) -> Upstream {
        let pool = Arc::new(Links {
            idle: ArrayQueue::new(MAX_IDLE),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&pool)));
        }
        Upstream {
            pool,
            connect_timeout,
        }
    }

    /// Sends `req` on `route`, failing over and retrying as
    /// docs/upstreams.md says, until `deadline` (the first-byte timeout).
    /// `route` ends naming the upstream of the last attempt.
    pub(crate) async fn send(
        &self,
        peers: &Pool,
        route: &mut Route,
        cfg: &UpstreamConfig,
        metrics: &Metrics,
        deadline: Instant,
        req: &Outbound<'_>,
    ) -> Result<Sent, GatewayError> {
        let deadline = tokio::time::Instant::from_std(deadline);
        // Sluice's own requests (balance polls) take no tenant's slot and
        // say nothing of an upstream's health.
        let own = req.claimant.is_none();
        let mut attempt = 0u32;
        loop {
            let index = route.current();
            let peer = peers.peer(index);
            let target = peer
                .target(req.path)
                .ok_or(GatewayError::UpstreamUnreachable)?;
            let state = &peer.state;
            let slot = match &state.gate {
                Some(gate) if !own => {
                    Some(gate.take(req.claimant.as_ref(), metrics, deadline).await?)
                }
                _ => None,
            };
            let health = (!own).then_some(&state.health);
            let stats = &state.stats;
            let call = stats.in_flight();
            let started = Instant::now();
            let result = tokio::time::timeout_at(
                deadline,
                self.exchange(&state.connector, target, || {
                    req.attempt(index, peer, target)
                }),
            )
            .await;
            let took = started.elapsed().as_secs_f64();
            let (failure, wait) = match result {
                Err(_) => {
                    stats.attempt("timeout", took);
                    health.inspect(|h| h.observe(Verdict::Failed));
                    return Err(GatewayError::UpstreamTimeout);
                }
                Ok(Err(e)) => {
                    stats.attempt("error", took);
                    health.inspect(|h| h.observe(Verdict::Failed));
                    tracing::debug!(error = %e, attempt, upstream = %peer.name(), "upstream request failed");
                    if attempt >= cfg.max_retries {
                        return Err(GatewayError::UpstreamUnreachable);
                    }
                    (None, backoff(attempt))
                }
                Ok(Ok(mut response)) => {
                    let status = response.status();
                    stats.attempt(status.as_str(), took);
                    let rest = rest_asked(response.headers());
                    health.inspect(|h| h.observe(Verdict::of(status, rest)));
                    response.body_mut().call = call;
                    // An upstream's broken key or account is failed over
                    // to every other one, beyond the retries.
                    let auth = route.has_alternatives() && matches!(status.as_u16(), 401 | 402);
                    if !(auth || retryable(status) && attempt < cfg.max_retries) {
                        return Ok(Sent {
                            response,
                            slot,
                            upstream: peer.header().clone(),
                            health: health.cloned(),
                        });
                    }
                    let wait = rest
                        .map(|r| r.min(MAX_RETRY_AFTER))
                        .unwrap_or_else(|| backoff(attempt));
                    (Some((response, auth)), wait)
                }
            };
            drop(slot);
            let auth = failure.as_ref().is_some_and(|(_, auth)| *auth);
            let wait = match peers.next(route, auth) {
                // A failed-over attempt goes at once.
                Next::Other => Duration::ZERO,
                Next::Same => wait,
                Next::Done => {
                    let (response, _) = failure.expect("only an answer fails over for auth");
                    return Ok(Sent {
                        response,
                        slot: None,
                        upstream: peer.header().clone(),
                        health: health.cloned(),
                    });
                }
            };
            if tokio::time::Instant::now() + wait >= deadline {
                // Waiting would outlast the client's deadline: hand
                // upstream's answer over rather than a timeout.
                return match failure {
                    Some((response, _)) => Ok(Sent {
                        response,
                        slot: None,
                        upstream: peer.header().clone(),
                        health: health.cloned(),
                    }),
                    None => Err(GatewayError::UpstreamTimeout),
                };
            }
            drop(failure);
            if !auth {
                attempt += 1;
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// One request (made by `request`) and its response head, on a pooled
    /// connection or a new one.
    async fn exchange(
        &self,
        connector: &HttpsConnector<HttpConnector>,
        target: &Target,
        request: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        if let Some(mut link) = self.pool.checkout(&target.origin) {
            match link.round_trip(request()).await {
                Ok(resp) => return Ok(self.pool.body(resp, link)),
                // Closed by upstream while idle, before the request was
                // written: it cost upstream nothing, so a new connection
                // takes it without spending a retry.
                Err(e) if e.is_canceled() => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Boxed (and bound by `let`, so no temporary stays in this future):
        // a new connection is the rare path, and its future, holding a TLS
        // stream, is larger than all the rest of a request's.
        let connecting = Box::pin(connect(connector, target, self.connect_timeout));
        let mut link = connecting.await?;
        let resp = link.round_trip(request()).await?;
        Ok(self.pool.body(resp, link))
    }
}

async fn connect(
    connector: &HttpsConnector<HttpConnector>,
    target: &Target,
    timeout: Duration,
) -> Result<Box<Link>, BoxError> {
    let mut connector = connector.clone();
    poll_fn(|cx| connector.poll_ready(cx)).await?;
    // The TLS handshake counts against the connect timeout too.
    let io = match tokio::time::timeout(timeout, connector.call(target.connect.clone())).await {
        Err(_) => return Err("upstream connect timed out".into()),
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            // A failed TLS handshake (an untrusted certificate, a wrong
            // name) is an operator's problem: say why, once per attempt.
            if target.connect.scheme_str() == Some("https") {
                tracing::warn!(error = %e, "upstream connection failed");
            }
            return Err(e);
        }
    };
    let (tx, conn) = http1::handshake(io).await?;
    Ok(Box::new(Link {
        tx,
        conn: Some(conn),
        origin: target.origin.clone(),
        idle_since: Instant::now(),
    }))
}

static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// Which header carries an upstream's key: OpenAI's API takes
/// `Authorization: Bearer <key>`, Anthropic's `x-api-key: <key>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyHeader {
    Authorization,
    ApiKey,
}

impl KeyHeader {
    fn name(self) -> http::HeaderName {
        match self {
            KeyHeader::Authorization => header::AUTHORIZATION,
            KeyHeader::ApiKey => X_API_KEY.clone(),
        }
    }

    fn value(self, peer: &Peer) -> Option<&HeaderValue> {
        match self {
            KeyHeader::Authorization => peer.auth(),
            KeyHeader::ApiKey => peer.api_key(),
        }
    }
}

/// One upstream request, built afresh for each attempt (hyper consumes a
/// request; the body is a shared `Bytes`, the headers are cloned).
pub(crate) struct Outbound<'a> {
    method: Method,
    /// The upstream path (an endpoint's, or the balance's).
    path: &'static str,
    headers: HeaderMap,
    body: Bytes,
    /// The client's model name and where its JSON string is in `body`, for
    /// an upstream whose `model_map` renames it.
    model: Option<(&'a str, Range<usize>)>,
    /// Whose request it is, for its place when the upstream is full
    /// (`None`: Sluice's own, such as a balance poll).
    claimant: Option<Claimant>,
    /// The upstream whose `Host` and `Authorization` `headers` hold.
    prepared: Option<usize>,
    /// The client's query string, sent along unchanged (Anthropic's
    /// clients send one: `?beta=true`).
    query: Option<Box<str>>,
    /// Which header carries each upstream's key.
    key: KeyHeader,
}

impl<'a> Outbound<'a> {
    /// The framing headers are Sluice's own: `Host` names the target, and
    /// `Content-Length` is the body's (set here, hyper would add it to each
    /// attempt's copy of the map and grow it); whatever the client sent for
    /// them is replaced. `headers` come cleaned (`http::headers::
    /// clean_request`: no client key in them); each upstream's own key is
    /// written per attempt (`to`, `attempt`).
    pub(crate) fn new(
        method: Method,
        path: &'static str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Self {
        if body.is_empty() {
            headers.remove(header::CONTENT_LENGTH);
        } else {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        Outbound {
            method,
            path,
            headers,
            body,
            model: None,
            claimant: None,
            prepared: None,
            query: None,
            key: KeyHeader::Authorization,
        }
    }

    /// Sends the client's query string along (unchanged) to the target.
    pub(crate) fn with_query(mut self, query: Option<&str>) -> Self {
        self.query = query.map(Box::from);
        self
    }

    /// Each upstream's key goes in `key` (the API format's header).
    pub(crate) fn key_in(mut self, key: KeyHeader) -> Self {
        self.key = key;
        self
    }

    /// Writes the `Host` and `Authorization` of the upstream at `index`
    /// (the route's first) into the headers once, so its attempt copies
    /// them as they are.
    pub(crate) fn to(mut self, index: usize, peer: &Peer) -> Self {
        if let Some(target) = peer.target(self.path) {
            self.headers.insert(header::HOST, target.host.clone());
            if let Some(value) = self.key.value(peer) {
                self.headers.insert(self.key.name(), value.clone());
            }
            self.prepared = Some(index);
        }
        self
    }

    /// The request is `tenant`'s, with its weight for a full upstream.
    pub(crate) fn for_tenant(mut self, tenant: &Arc<str>, weight: u32) -> Self {
        self.claimant = Some(Claimant {
            tenant: Arc::clone(tenant),
            weight,
        });
        self
    }

    /// The body names `model` at `span` (its JSON string, quotes included).
    pub(crate) fn naming(mut self, model: &'a str, span: Range<usize>) -> Self {
        self.model = Some((model, span));
        self
    }

    fn attempt(&self, index: usize, peer: &Peer, target: &Target) -> Request<Full<Bytes>> {
        let body = match &self.model {
            Some((model, span)) if span.end <= self.body.len() => match peer.mapped(model) {
                Some(name) => {
                    let mut b = BytesMut::with_capacity(self.body.len() + name.len());
                    b.extend_from_slice(&self.body[..span.start]);
                    b.extend_from_slice(name);
                    b.extend_from_slice(&self.body[span.end..]);
                    b.freeze()
                }
                None => self.body.clone(),
            },
            _ => self.body.clone(),
        };
        let mut headers = self.headers.clone();
        if body.len() != self.body.len() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if self.prepared != Some(index) {
            headers.insert(header::HOST, target.host.clone());
            match self.key.value(peer) {
                Some(value) => headers.insert(self.key.name(), value.clone()),
                None => headers.remove(self.key.name()),
            };
        }
        let mut r = Request::new(Full::new(body));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = match &self.query {
            Some(q) => format!("{}?{q}", target.path.path())
                .parse()
                .unwrap_or_else(|_| target.path.clone()),
            None => target.path.clone(),
        };
        *r.headers_mut() = headers;
        r
    }
}

/// Idle connections kept, in all; more are closed as they come free.
const MAX_IDLE: usize = 1024;
/// An idle connection is closed after this long unused (checked every
/// `REAP_EVERY`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const REAP_EVERY: Duration = Duration::from_secs(15);

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// An upstream connection. Nobody polls it while it is idle: an upstream
/// that closed it is noticed when it is next taken out, by polling it once.
struct Link {
    tx: http1::SendRequest<Full<Bytes>>,
    /// `None` once the connection ended.
    conn: Option<http1::Connection<Io, Full<Bytes>>>,
    origin: Origin,
    idle_since: Instant,
}

impl Link {
    /// Lets the connection read and write as far as it can; `false` once it
    /// has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = &mut self.conn else {
            return false;
        };
        match Pin::new(conn).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                self.conn = None;
                false
            }
        }
    }

    /// Open, and waiting for its next request: polled once, so a close
    /// that arrived while nobody was looking is seen.
    fn reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.tx.is_ready()
    }

    /// Writes `req` and reads the response head, driving the connection
    /// from this task.
    async fn round_trip(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        let mut response = pin!(self.tx.send_request(req));
        poll_fn(|cx| {
            if let Poll::Ready(r) = response.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

struct Links {
    idle: ArrayQueue<Box<Link>>,
}

impl Links {
    fn checkout(&self, origin: &Origin) -> Option<Box<Link>> {
        while let Some(mut link) = self.idle.pop() {
            // Links to an origin a reload replaced are closed here.
            if link.origin == *origin && link.reusable() {
                return Some(link);
            }
        }
        None
    }

    fn checkin(&self, mut link: Box<Link>) {
        // The body was just read through this connection: it is ready for
        // the next request unless hyper has yet to see the end.
        if link.conn.is_some() && link.tx.is_ready() || link.reusable() {
            link.idle_since = Instant::now();
            // A full pool closes the connection.
            let _ = self.idle.push(link);
        }
    }

    fn body(
        self: &Arc<Links>,
        resp: Response<Incoming>,
        link: Box<Link>,
    ) -> Response<UpstreamBody> {
        resp.map(|body| UpstreamBody {
            body,
            link: Some(link),
            pool: Arc::clone(self),
            complete: false,
            call: None,
        })
    }
}

/// Closes connections idle past `IDLE_TIMEOUT` (and those upstream closed),
/// until the pool is gone.
async fn reap(pool: Weak<Links>) {
    let mut every = tokio::time::interval(REAP_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        for _ in 0..pool.idle.len() {
            let Some(mut link) = pool.idle.pop() else {
                break;
            };
            if now.duration_since(link.idle_since) < IDLE_TIMEOUT && link.reusable() {
                let _ = pool.idle.push(link);
            }
        }
    }
}

/// An upstream response body. Reading it drives its connection, which goes
/// back to the pool when the body was read to its end, and is closed
/// otherwise (a client gone mid-answer, a timeout, an abandoned retry).
pub(crate) struct UpstreamBody {
    body: Incoming,
    link: Option<Box<Link>>,
    pool: Arc<Links>,
    complete: bool,
    /// The call counted in flight on its upstream until the body is done.
    call: Option<pool::InFlight>,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            if let Some(link) = &mut this.link {
                link.drive(cx);
                polled = Pin::new(&mut this.body).poll_frame(cx);
            }
        }
        if matches!(polled, Poll::Ready(None)) {
            this.complete = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.complete || self.body.is_end_stream() {
            if let Some(link) = self.link.take() {
                self.pool.checkin(link);
            }
        }
    }
}

/// Reads a whole small upstream body (model lists, balances), bounded in
/// size and time.
pub(crate) async fn read_small(
    body: UpstreamBody,
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

/// Upstream statuses worth another attempt: rate limited, and the server
/// errors that say it is busy or broken for now (529: overloaded).
fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 529)
}

/// Exponential backoff from 100 ms, doubling, capped at 5 s, with full
/// jitter between half and all of it so retries from many clients spread.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(5));
    base.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// `retry-after-ms`, else `retry-after` in seconds, capped at 60 s: how
/// long Sluice waits before it asks the same upstream again.
#[cfg(test)]
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    rest_asked(h).map(|d| d.min(MAX_RETRY_AFTER))
}

/// `retry-after-ms`, else `retry-after` in seconds, up to the longest rest:
/// how long upstream asks to be left alone.
fn rest_asked(h: &HeaderMap) -> Option<Duration> {
    let num = |name: &str| -> Option<f64> {
        h.get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let max = health::MAX_REST.as_secs_f64();
    let secs = num("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| num(header::RETRY_AFTER.as_str()))?;
    Some(Duration::from_secs_f64(secs.min(max)))
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
}
