//! The request path, top to bottom, with the reason for each step's place:
//!
//! 1. **Route** — cheapest refusal first; unknown paths never touch auth.
//! 2. **Auth** — before limits, so buckets are keyed by tenant and anonymous
//!    floods cannot drain anyone's quota. Past here code sees a `Tenant`.
//! 3. **Request bucket, concurrency** — before reading the body, so a
//!    refused request costs nothing and is never queued; before the cache,
//!    so hits count as requests.
//! 4. **Body** — read within `max_body_bytes`; validated (`model`,
//!    `messages`/`prompt`); model allowlist.
//! 5. **Cache** — lookup, then attach to an identical request in flight.
//! 6. **Token bucket** — only for requests that will go upstream: hits and
//!    coalesced answers spend no tokens.
//! 7. **Upstream** — retries before any byte reached the client; then the
//!    relay streams the answer back, metering and caching along the way.

use std::convert::Infallible;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use crate::body::{Body, Record};
use crate::cache::{self, End, Entry, Head, Join, Leader, Reader};
use crate::config::Config;
use crate::error::GatewayError;
use crate::fleet_flight::{Lookup, Remote};
use crate::json;
use crate::limit::{Admission, Standings, UpstreamCheck};
use crate::relay::{Launch, LeadBody, LogBody, LogOpts, Meter, Plan, Sink, StreamOpts};
use crate::request_id::X_REQUEST_ID;
use crate::routes::{self, Endpoint};
use crate::sse::DONE_EVENT;
use crate::state::{App, Snapshot, Tenant};
use crate::text::PromptText;
use crate::upstream::{read_small, strip_hop_by_hop, Outbound};

// Parsed once: a `&str` name is parsed and validated on every use.
static X_SLUICE_CACHE: HeaderName = HeaderName::from_static("x-sluice-cache");
static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Entry point for every client request.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let request_id = app.request_ids.of(req.headers());
    let mut record = Box::new(Record::new(Arc::clone(&app), request_id.clone(), start));
    let snap = app.snapshot.load_full();
    let mut standings = Standings::default();
    let http1 = req.version() < Version::HTTP_2;
    let (parts, mut body) = req.into_parts();
    let served = match begin(&app, &snap, parts, &mut body, &mut record, &mut standings) {
        Ok(serving) => serving.await,
        Err(e) => Err(e),
    };
    let mut resp = match served {
        Ok(resp) => resp,
        Err(e) => {
            // A refusal may come before the body was read (401, 404, 413,
            // 429, 503): the rest is read and discarded so the keep-alive
            // connection stays usable, or, when that cannot be done in
            // bounds, the answer says the connection closes. Never a
            // connection closed under the client's next request.
            let keep = http1 && {
                let draining = Box::pin(discard_rest(&mut body, &e, &snap.config));
                draining.await
            };
            let mut resp = refuse(&app, &mut record, e);
            if http1 && !keep {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    drop(body);
    record.status = resp.status().as_u16();
    let h = resp.headers_mut();
    h.insert(&X_REQUEST_ID, request_id);
    if record.tenant.is_some() {
        standings.write_headers(h);
    }
    if record.cache != "none" {
        h.insert(&X_SLUICE_CACHE, HeaderValue::from_static(record.cache));
    }
    resp.body_mut().set_record(record);
    Ok(resp)
}

/// Reads and discards what is left of a refused request's body, within
/// `max_body_bytes` and `header_read_timeout`. `true` when the body is
/// done and the connection can serve another request.
async fn discard_rest(body: &mut Incoming, e: &GatewayError, config: &Config) -> bool {
    if matches!(e, GatewayError::BodyTooLarge | GatewayError::BodyTimeout) {
        return false;
    }
    if http_body::Body::is_end_stream(body) {
        return true;
    }
    let deadline = tokio::time::Instant::now() + config.server.header_read_timeout;
    let mut left = config.server.max_body_bytes;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                if n > left {
                    return false;
                }
                left -= n;
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

/// What the request path ends in: an answer, or the error that becomes one.
type Served = Result<Response<Body>, GatewayError>;

/// Step 1: route, and detach the head (its values are slices of the
/// connection's read buffer, which hyper can reuse for its next read only
/// once nothing points into it); then the rest of the path, boxed. hyper
/// keeps the slot of a connection's in-flight service future for the
/// connection's lifetime, so an unboxed request path (a few KiB) would stay
/// allocated for every open stream; and done here, outside `handle`, the
/// request's head takes no room in that slot either.
fn begin<'a>(
    app: &'a Arc<App>,
    snap: &'a Arc<Snapshot>,
    parts: http::request::Parts,
    body: &'a mut Incoming,
    record: &'a mut Record,
    standings: &'a mut Standings,
) -> Result<Pin<Box<impl Future<Output = Served> + 'a>>, GatewayError> {
    let endpoint = routes::route(&parts.method, parts.uri.path())?;
    record.endpoint = endpoint.label();
    let headers = detach_headers(&parts.headers);
    drop(parts);
    Ok(Box::pin(serve(
        app, snap, endpoint, headers, body, record, standings,
    )))
}

fn refuse(app: &App, record: &mut Record, e: GatewayError) -> Response<Body> {
    record.error = Some(e.code());
    if e.is_server_fault() {
        tracing::warn!(
            request_id = record.request_id.to_str().unwrap_or("-"),
            code = e.code(),
            "request failed"
        );
    } else {
        tracing::debug!(
            request_id = record.request_id.to_str().unwrap_or("-"),
            code = e.code(),
            "request refused"
        );
    }
    let limit = match &e {
        GatewayError::RateLimited { limit, .. } => Some(limit.label()),
        GatewayError::BudgetExceeded { .. } => Some(crate::limit::Limit::Budget.label()),
        _ => None,
    };
    if let (Some(limit), Some(t)) = (limit, &record.tenant) {
        app.metrics
            .rate_limited
            .with_label_values(&[&t.name, limit])
            .inc();
    }
    e.into_response().map(Body::full)
}

/// Steps 2 to 7, for a routed request.
async fn serve(
    app: &Arc<App>,
    snap: &Arc<Snapshot>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: &mut Incoming,
    record: &mut Record,
    standings: &mut Standings,
) -> Result<Response<Body>, GatewayError> {
    // 2. Auth.
    let Some(tenant) = snap.authenticate(&headers) else {
        app.metrics.auth_failures.inc();
        return Err(GatewayError::InvalidApiKey);
    };
    record.set_tenant(Arc::clone(&tenant));

    // 3. Request bucket and concurrency (and where the token bucket
    // stands): one decision, one Redis round trip when limits are shared.
    let Admission { lease, check } = app.limiter.admit(&tenant.limits, standings).await?;
    record.lease = lease;
    if endpoint == Endpoint::Models {
        // The rarer paths are boxed so the common one's future stays small.
        let listing = Box::pin(models(app, snap, &tenant, headers, record));
        return listing.await;
    }

    // 4. Body.
    let bytes = read_body(body, &headers, &snap.config).await?;
    // One pass over the body validates it and, unless the cache is
    // bypassed, computes the cache key; nothing built from the body outlives
    // it.
    let mode = CacheMode::of(snap, &tenant, &headers);
    let scope = (mode != CacheMode::Bypass).then(|| snap.cache_scope(&tenant));
    let api = if bytes.len() < SCAN_ON_RUNTIME_MAX {
        ApiRequest::parse(&bytes, endpoint, scope)?
    } else {
        let parsing = Box::pin(parse_off_runtime(bytes.clone(), endpoint, scope));
        parsing.await?
    };
    record.model = Some(snap.models.label(&api.model));
    record.stream = api.stream;
    if !tenant.allows(&api.model) {
        return Err(GatewayError::ModelNotAllowed);
    }

    // 5. Cache, and 6. budget and token bucket: only what goes upstream is
    // refused for spend or tokens (hits and coalesced answers are served).
    record.cache = mode.label();
    let key = api.key;
    let mut check = Some(check);
    let mut leader = None;
    let mut shared_put = true;
    if let (CacheMode::Lookup, Some(key)) = (mode, key) {
        let mut lost = 0;
        loop {
            let attempt = Box::pin(coalesce(
                app, snap, &key, &api, &tenant, record, &mut check, standings,
            ));
            match attempt.await? {
                Coalesced::Answer(resp) => return Ok(resp),
                Coalesced::Lead {
                    leader: l,
                    shared_put: p,
                } => {
                    leader = Some(l);
                    shared_put = p;
                    break;
                }
                // The leader on another replica was lost before this client
                // was sent anything: ask again (a hit, another flight, or
                // this replica's own call), a bounded number of times.
                Coalesced::Lost if lost < LOST_RETRIES => lost += 1,
                // Still lost: this request calls upstream on its own,
                // uncoalesced (after the check below, if not made yet).
                Coalesced::Lost => break,
            }
        }
    }
    if let Some(check) = check.take() {
        check.check(&tenant.limits, standings)?;
    }

    // 7. Upstream.
    let sink = Sink {
        store: key,
        leader,
        shared_put,
    };
    forward(
        app, snap, endpoint, headers, bytes, api, tenant, record, sink,
    )
    .await
}

/// How many times a request whose fleet leader was lost asks again.
const LOST_RETRIES: u32 = 2;

/// What one look at the cache and the flights came to.
enum Coalesced {
    /// A hit, or a followed call's answer.
    Answer(Response<Body>),
    /// This request leads the call (upstream next); `shared_put`: its
    /// answer is for the relay to write to Redis (false: the fleet's
    /// publisher writes it with the release of the claim).
    Lead { leader: Leader, shared_put: bool },
    /// It followed a call whose leader on another replica was lost before
    /// anything was sent to the client.
    Lost,
}

/// Step 5 for a cacheable request: a hit, a flight to follow (on this
/// replica or, with `[redis] coalesce`, another), or the lead of a new one.
/// With the fleet's flights, the shared cache's lookup and the call's claim
/// are one round trip, made once this replica leads the local flight. The
/// budget and token check (`check`) is made, once, only before this request
/// may go upstream.
#[allow(clippy::too_many_arguments)]
async fn coalesce(
    app: &Arc<App>,
    snap: &Snapshot,
    key: &cache::Key,
    api: &ApiRequest,
    tenant: &Tenant,
    record: &mut Record,
    check: &mut Option<UpstreamCheck>,
    standings: &mut Standings,
) -> Result<Coalesced, GatewayError> {
    record.cache = CacheMode::Lookup.label();
    let fleet = app.fleet_flights.as_ref();
    let cached = match fleet {
        Some(f) if f.reads_cache() => app.cache.get_local(key),
        _ => app.cache.get(key).await,
    };
    if let Some(resp) = cached.and_then(|e| hit(&e, api, record)) {
        return Ok(Coalesced::Answer(resp));
    }
    if let Some(reader) = app.flights.follow(key) {
        record.cache = "coalesced";
        return follow(app, reader, api, record).await;
    }
    let leader = match app.flights.join(*key) {
        Join::Follow(reader) => {
            record.cache = "coalesced";
            return follow(app, reader, api, record).await;
        }
        Join::Lead(l) => l,
    };
    let mut lead = |leader| may_lead(leader, check, tenant, standings);
    let Some(fleet) = fleet else {
        return lead(leader).map(Coalesced::lead_here);
    };
    match fleet.lookup(key).await {
        Err(_) => lead(leader).map(Coalesced::lead_here),
        Ok(Lookup::Cached(answer)) => match app.cache.adopt(key, &answer) {
            Some(entry) if !api.stream || entry.replay().is_some() => {
                leader.end(End::Done(Arc::clone(&entry)));
                let resp = hit(&entry, api, record).ok_or(GatewayError::StreamInterrupted)?;
                Ok(Coalesced::Answer(resp))
            }
            _ => lead(leader).map(Coalesced::lead_here),
        },
        Ok(Lookup::Lead(publisher)) => {
            if fleet.reads_cache() {
                app.cache.shared_missed();
            }
            let leader = match check.take() {
                Some(c) => match c.check(&tenant.limits, standings) {
                    Ok(()) => leader,
                    Err(refused) => {
                        // The claim first, so those who ask again find it
                        // free.
                        publisher.abandon().await;
                        leader.end(End::Lost);
                        return Err(refused.into());
                    }
                },
                None => leader,
            };
            // Mirrored for the fleet from the local flight; the answer
            // goes into the shared cache with the end.
            let store = app.cache.shared_put();
            if let Some(reader) = app.flights.follow(key) {
                publisher.start(reader, store);
            }
            Ok(Coalesced::Lead {
                leader,
                shared_put: store.is_none(),
            })
        }
        Ok(Lookup::Claimed(owner)) => {
            if fleet.reads_cache() {
                app.cache.shared_missed();
            }
            let deadline = Instant::now() + snap.config.upstream.first_byte_timeout;
            let idle = snap.config.upstream.idle_timeout;
            match fleet.follow(key, owner, leader, deadline, idle).await {
                Remote::Following(reader) => {
                    record.cache = "coalesced";
                    follow(app, reader, api, record).await
                }
                Remote::TakeOver(leader) | Remote::Alone(leader) => {
                    lead(leader).map(Coalesced::lead_here)
                }
            }
        }
    }
}

/// Makes the budget and token check (once: `check` is then spent) before
/// `leader` may go upstream. Refused, its flight ends as lost, so identical
/// requests that joined meanwhile ask again (one of them may be allowed).
fn may_lead(
    leader: Leader,
    check: &mut Option<UpstreamCheck>,
    tenant: &Tenant,
    standings: &mut Standings,
) -> Result<Leader, GatewayError> {
    match check.take().map(|c| c.check(&tenant.limits, standings)) {
        Some(Err(refused)) => {
            leader.end(End::Lost);
            Err(refused.into())
        }
        Some(Ok(())) | None => Ok(leader),
    }
}

impl Coalesced {
    /// Leads the call, the relay writing the answer to Redis itself.
    fn lead_here(leader: Leader) -> Coalesced {
        Coalesced::Lead {
            leader,
            shared_put: true,
        }
    }
}

/// A hit's response; `None` (a miss) for a stream of an answer that has
/// no replay.
fn hit(entry: &Entry, api: &ApiRequest, record: &mut Record) -> Option<Response<Body>> {
    let mut resp = entry_response(entry, api.stream, api.include_usage)?;
    record.cache = "hit";
    record.saved = entry.usage;
    resp.headers_mut()
        .insert(header::AGE, HeaderValue::from(entry.age().as_secs()));
    Some(resp)
}

/// How this request uses the cache (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheMode {
    Lookup,
    Refresh,
    Bypass,
}

impl CacheMode {
    fn of(snap: &Snapshot, tenant: &Tenant, headers: &HeaderMap) -> CacheMode {
        if !snap.config.cache.enabled || !tenant.cache {
            return CacheMode::Bypass;
        }
        let mut mode = CacheMode::Lookup;
        for v in headers.get_all(header::CACHE_CONTROL) {
            for directive in v.to_str().unwrap_or("").split(',') {
                match directive.trim().to_ascii_lowercase().as_str() {
                    "no-store" => return CacheMode::Bypass,
                    "no-cache" => mode = CacheMode::Refresh,
                    _ => {}
                }
            }
        }
        mode
    }

    fn label(self) -> &'static str {
        match self {
            CacheMode::Lookup => "miss",
            CacheMode::Refresh => "refresh",
            CacheMode::Bypass => "bypass",
        }
    }
}

/// A validated API request. Every field but the few read here passes
/// through untouched; nothing built from the body is kept but these.
pub struct ApiRequest {
    /// The cache key, when the cache is used (computed while the body was
    /// scanned, and the scan dropped at once).
    pub key: Option<cache::Key>,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// How a stream's body gets `stream_options.include_usage = true`.
    splice: Splice,
    /// Characters of the messages' text (or the FIM prompt), for the usage
    /// estimate: counted here so nothing of the body is kept for it.
    pub prompt_chars: u64,
}

/// Where the upstream body of a stream differs from the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Splice {
    /// No `stream_options`: the whole member goes in after the opening brace
    /// (at this offset).
    Add(usize),
    /// `stream_options` is `null` (or no object): its value is replaced.
    Replace(Range<usize>),
    /// An object without `include_usage`: the member goes in after its brace.
    Insert { at: usize, empty: bool },
    /// An object with `include_usage` (each occurrence, absolute spans):
    /// each value becomes `true`.
    Set(Vec<Range<usize>>),
}

impl ApiRequest {
    /// Validates a body in one pass without building a tree, refusing a
    /// repeated top-level key whatever the cache mode. With `key_scope`
    /// (`Some(scope)` when the cache is used), also computes the cache key.
    pub fn parse(
        bytes: &[u8],
        endpoint: Endpoint,
        key_scope: Option<Option<&str>>,
    ) -> Result<ApiRequest, GatewayError> {
        let scan = json::scan(bytes, key_scope.is_some()).map_err(|e| match e {
            json::Invalid::Syntax => GatewayError::InvalidJson,
            json::Invalid::DuplicateKey(k) => GatewayError::DuplicateKey(k.into()),
        })?;
        let starts = |name: &str, c: u8| scan.get(name).is_some_and(|r| r.first() == Some(&c));
        let model = scan
            .get("model")
            .filter(|r| r.first() == Some(&b'"'))
            .and_then(|r| serde_json::from_slice::<String>(r).ok())
            .ok_or(GatewayError::MissingField(
                "`model` is required and must be a string.",
            ))?;
        match endpoint {
            Endpoint::Fim if !starts("prompt", b'"') => {
                return Err(GatewayError::MissingField(
                    "`prompt` is required and must be a string.",
                ));
            }
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Models
                if !starts("messages", b'[') =>
            {
                return Err(GatewayError::MissingField(
                    "`messages` is required and must be an array.",
                ));
            }
            Endpoint::Fim | Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Models => {}
        }
        let stream = scan.get("stream") == Some(&b"true"[..]);
        let (splice, include_usage) = match scan.span("stream_options") {
            None => (Splice::Add(open_brace(bytes)), false),
            Some(span) => match json::members(&bytes[span.clone()]) {
                None => (Splice::Replace(span), false),
                Some(members) => {
                    let usage: Vec<Range<usize>> = members
                        .iter()
                        .filter(|(k, _)| k.as_slice() == b"\"include_usage\"")
                        .map(|(_, v)| span.start + v.start..span.start + v.end)
                        .collect();
                    // The last occurrence is what most parsers keep.
                    let wants = usage.last().is_some_and(|r| &bytes[r.clone()] == b"true");
                    let splice = if usage.is_empty() {
                        Splice::Insert {
                            at: span.start + open_brace(&bytes[span]),
                            empty: members.is_empty(),
                        }
                    } else {
                        Splice::Set(usage)
                    };
                    (splice, wants)
                }
            },
        };
        let key = key_scope.map(|scope| cache::key(scope, endpoint.label(), &scan));
        // The prompt's characters, for the usage estimate, counted without
        // building its strings.
        let text = match endpoint {
            Endpoint::Fim => scan.get("prompt"),
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Models => scan.get("messages"),
        };
        let prompt_chars = text
            .and_then(|raw| serde_json::from_slice::<PromptText>(raw).ok())
            .map_or(0, |t| t.chars);
        Ok(ApiRequest {
            key,
            model,
            stream,
            include_usage: stream && include_usage,
            splice,
            prompt_chars,
        })
    }
}

/// Bodies at least this large are scanned on the blocking pool: a few
/// megabytes of JSON take milliseconds of CPU, which must not stall every
/// other request on the same runtime worker.
const SCAN_ON_RUNTIME_MAX: usize = 256 * 1024;

async fn parse_off_runtime(
    bytes: Bytes,
    endpoint: Endpoint,
    scope: Option<Option<&str>>,
) -> Result<ApiRequest, GatewayError> {
    let scope: Option<Option<Box<str>>> = scope.map(|s| s.map(Box::from));
    tokio::task::spawn_blocking(move || {
        ApiRequest::parse(&bytes, endpoint, scope.as_ref().map(|s| s.as_deref()))
    })
    .await
    .unwrap_or(Err(GatewayError::Internal))
}

/// The offset just past the first `{` (a validated object has one).
fn open_brace(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| b == b'{').map_or(0, |i| i + 1)
}

/// The body sent upstream for a stream: the client's bytes with
/// `stream_options.include_usage = true`, spliced in so every other byte
/// (key order, number spelling, whitespace) passes through as it came.
pub fn with_include_usage(bytes: &Bytes, api: &ApiRequest) -> Bytes {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    const OBJECT: &[u8] = br#"{"include_usage":true}"#;
    const USAGE: &[u8] = br#""include_usage":true"#;
    let splice = |at: Range<usize>, with: &[&[u8]]| {
        let extra: usize = with.iter().map(|w| w.len()).sum();
        let mut out = BytesMut::with_capacity(bytes.len() + extra);
        out.extend_from_slice(&bytes[..at.start]);
        for w in with {
            out.extend_from_slice(w);
        }
        out.extend_from_slice(&bytes[at.end..]);
        out.freeze()
    };
    match &api.splice {
        Splice::Add(at) => splice(*at..*at, &[MEMBER]),
        Splice::Replace(span) => splice(span.clone(), &[OBJECT]),
        Splice::Insert { at, empty: true } => splice(*at..*at, &[USAGE]),
        Splice::Insert { at, empty: false } => splice(*at..*at, &[USAGE, b","]),
        Splice::Set(values) => {
            if values.iter().all(|r| &bytes[r.clone()] == b"true") {
                return bytes.clone();
            }
            let mut out = BytesMut::with_capacity(bytes.len() + 4);
            let mut at = 0;
            for r in values {
                out.extend_from_slice(&bytes[at..r.start]);
                out.extend_from_slice(b"true");
                at = r.end;
            }
            out.extend_from_slice(&bytes[at..]);
            out.freeze()
        }
    }
}

async fn read_body(
    body: &mut Incoming,
    headers: &HeaderMap,
    config: &Config,
) -> Result<Bytes, GatewayError> {
    let max = config.server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(GatewayError::BodyTooLarge);
    }
    // Sized from content-length, but never trusting it for more than 64 KiB up
    // front: a client that claims a large body and then stalls must not hold
    // that much memory.
    let mut buf = BytesMut::with_capacity(declared.map_or(8 * 1024, |n| n.min(64 * 1024) as usize));
    // A client that stalls mid-body is dropped like one that stalls in its
    // headers.
    let gap = config.server.header_read_timeout;
    loop {
        match tokio::time::timeout(gap, body.frame()).await {
            Err(_) => return Err(GatewayError::BodyTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(GatewayError::InvalidJson),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > max {
                        return Err(GatewayError::BodyTooLarge);
                    }
                    // Once the client has sent more than the first
                    // allocation holds, the declared size is reserved in one
                    // go: doubling would hold up to twice the body (and a
                    // copy while it moves).
                    if let (Some(n), true) = (declared, buf.len() + data.len() > buf.capacity()) {
                        buf.reserve((n as usize).max(buf.len() + data.len()) - buf.len());
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(buf.freeze())
}

/// Copies a request's headers into storage of their own: one buffer for all
/// values, so a request costs one allocation here instead of pinning the
/// connection's 8 KiB read buffer (and making hyper allocate another).
pub fn detach_headers(h: &HeaderMap) -> HeaderMap {
    let mut buf = BytesMut::with_capacity(h.values().map(|v| v.len()).sum());
    for v in h.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let buf = buf.freeze();
    let mut out = HeaderMap::with_capacity(h.len());
    let mut at = 0;
    for (name, v) in h {
        let end = at + v.len();
        let mut value =
            HeaderValue::from_maybe_shared(buf.slice(at..end)).unwrap_or_else(|_| v.clone());
        value.set_sensitive(v.is_sensitive());
        out.append(name.clone(), value);
        at = end;
    }
    out
}

/// Headers sent upstream: the client's, less hop-by-hop headers and those
/// of `not_forwarded`, with the shared key's Authorization. `Outbound`
/// replaces Host and Content-Length.
fn upstream_headers(mut h: HeaderMap, snap: &Snapshot, request_id: &HeaderValue) -> HeaderMap {
    strip_hop_by_hop(&mut h);
    remove_where(&mut h, not_forwarded);
    if let Some(auth) = &snap.upstream_auth {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    h.insert(&X_REQUEST_ID, request_id.clone());
    h
}

/// Client headers that never go upstream (SPEC §3 "Headers"), beside the
/// hop-by-hop ones: the client's own Authorization (replaced by the shared
/// key), Expect (Sluice has read the body already), Cookie, and headers
/// that would speak for the shared account; Accept-Encoding too, since
/// Sluice reads the answer and asks for it uncompressed.
fn not_forwarded(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization"
            | "accept-encoding"
            | "expect"
            | "cookie"
            | "openai-organization"
            | "openai-project"
            | "api-key"
            | "x-api-key"
    )
}

/// Upstream response headers that never reach a client, beside the
/// hop-by-hop ones: cookies, the shared account's identity, and upstream's
/// own `x-ratelimit-*` (the shared account's standing; Sluice writes the
/// tenant's own afterwards, and only for limits the tenant has).
fn not_returned(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(n, "set-cookie" | "openai-organization" | "openai-project")
        || n.starts_with("x-ratelimit-")
}

/// Removes every header whose name `drop` picks. One pass decides; most
/// maps need one removal at most.
fn remove_where(h: &mut HeaderMap, drop: fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = h.keys().filter(|k| drop(k)).cloned().collect();
    for name in names {
        h.remove(name);
    }
}

/// Where retrying an upstream error cannot help (402 Insufficient Balance,
/// a bad key, a bad request), SDKs are told not to.
fn mark_no_retry(status: StatusCode, h: &mut HeaderMap) {
    if matches!(status.as_u16(), 400 | 401 | 402 | 403 | 404 | 422) {
        h.insert(&X_SHOULD_RETRY, HeaderValue::from_static("false"));
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the request path's state, handed over once; bundling it would only rename it"
)]
async fn forward(
    app: &Arc<App>,
    snap: &Arc<Snapshot>,
    endpoint: Endpoint,
    headers: HeaderMap,
    bytes: Bytes,
    api: ApiRequest,
    tenant: Arc<Tenant>,
    record: &mut Record,
    sink: Sink,
) -> Result<Response<Body>, GatewayError> {
    let cfg = &snap.config.upstream;
    let target = snap
        .upstream_target(endpoint.upstream_path())
        .ok_or(GatewayError::UpstreamUnreachable)?;
    let body = if api.stream {
        with_include_usage(&bytes, &api)
    } else {
        bytes
    };
    let mut headers = upstream_headers(headers, snap, &record.request_id);
    headers
        .entry(header::CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/json"));
    let deadline = record.start + cfg.first_byte_timeout;
    // Made before the call: a leader's call may outlive this request.
    let plan = Plan {
        stream: api.stream.then(|| StreamOpts {
            shape: endpoint.shape(),
            client_wants_usage: api.include_usage,
        }),
        first_event_deadline: deadline,
        idle: cfg.idle_timeout,
        meter: Meter {
            lease: record.lease.take(),
            app: Arc::clone(app),
            tenant,
            model: record
                .model
                .clone()
                .unwrap_or_else(|| Arc::from(crate::metrics::OTHER)),
            prompt_chars: api.prompt_chars,
        },
        sink,
    };
    let (sent, plan) = if plan.sink.leader.is_some() {
        // A flight's leader: the call is owned (boxed), so that if this
        // client leaves before the headers while followers wait, it goes on
        // without it.
        let call = {
            let (app, snap) = (Arc::clone(app), Arc::clone(snap));
            let path = endpoint.upstream_path();
            Box::pin(async move {
                let target = snap
                    .upstream_target(path)
                    .ok_or(GatewayError::UpstreamUnreachable)?;
                let outbound = Outbound::new(Method::POST, target, headers, body);
                let cfg = &snap.config.upstream;
                app.upstream
                    .send(cfg, &app.metrics, deadline, &outbound)
                    .await
            })
        };
        let launch = Launch::new(call, plan);
        launch.await?
    } else {
        let outbound = Outbound::new(Method::POST, target, headers, body);
        let sent = app
            .upstream
            .send(cfg, &app.metrics, deadline, &outbound)
            .await?;
        (sent, plan)
    };
    let (parts, incoming) = sent.response.into_parts();
    record.upstream_status = Some(parts.status.as_u16());
    let is_sse = api.stream && parts.status == StatusCode::OK;
    let mut resp_headers = parts.headers;
    strip_hop_by_hop(&mut resp_headers);
    remove_where(&mut resp_headers, not_returned);
    resp_headers.remove(&X_REQUEST_ID);
    if is_sse {
        resp_headers.remove(header::CONTENT_LENGTH);
    }
    mark_no_retry(parts.status, &mut resp_headers);
    let content_type = resp_headers.get(header::CONTENT_TYPE).cloned();
    let relay = plan.relay(incoming, parts.status, content_type, sent.slot);
    let mut body = if relay.leads() {
        Body::lead(LeadBody::start(relay))
    } else {
        Body::relay(relay)
    };
    if !is_sse {
        // Whole answers leave with their head in one write; a stream's head
        // goes at once (its client may be waiting on it).
        body.prime().await;
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = resp_headers;
    Ok(resp)
}

/// A stored answer, in the mode the client asked for.
/// `None`: a stream asked for an answer that has no replay (see
/// `Entry::replay`).
pub fn entry_response(entry: &Entry, stream: bool, include_usage: bool) -> Option<Response<Body>> {
    let (body, content_type) = if stream {
        let replay = entry.replay()?;
        let mut frames = vec![replay.chunks.clone()];
        if include_usage {
            frames.extend(replay.usage_chunk.clone());
        }
        frames.push(Bytes::from_static(DONE_EVENT));
        (Body::frames(frames), "text/event-stream")
    } else {
        (Body::full(entry.completion.clone()), "application/json")
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Some(resp)
}

/// Serves a coalesced follower from the leader's flight: a streaming
/// follower of a streaming leader reads its log from the first event on, at
/// its own pace; everyone else gets the finished answer.
async fn follow(
    app: &Arc<App>,
    mut reader: Reader,
    api: &ApiRequest,
    record: &mut Record,
) -> Result<Coalesced, GatewayError> {
    let mut head_seen = false;
    loop {
        let (head, end) = reader.changed(head_seen).await;
        if api.stream && head == Some(Head::Stream) {
            let tenant = record.tenant.as_ref().map_or("unknown", |t| &t.name);
            let model = record.model.as_deref().unwrap_or(crate::metrics::OTHER);
            let saved = match &record.tenant {
                Some(t) => t.usage(model, &app.metrics).saved.clone(),
                None => app.metrics.tokens_saved.with_label_values(&[tenant, model]),
            };
            return Ok(Coalesced::Answer(stream_follower(
                saved,
                reader,
                api.include_usage,
            )));
        }
        if let Some(end) = end {
            if matches!(end, End::Lost) {
                return Ok(Coalesced::Lost);
            }
            return end_response(end, api, record).map(Coalesced::Answer);
        }
        head_seen = head.is_some();
    }
}

fn end_response(
    end: End,
    api: &ApiRequest,
    record: &mut Record,
) -> Result<Response<Body>, GatewayError> {
    match end {
        End::Done(entry) => {
            record.saved = entry.usage;
            entry_response(&entry, api.stream, api.include_usage)
                .ok_or(GatewayError::StreamInterrupted)
        }
        End::Response {
            status,
            content_type,
            body,
        } => {
            let mut resp = Response::new(Body::full(body));
            *resp.status_mut() = status;
            if let Some(ct) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            mark_no_retry(status, resp.headers_mut());
            Ok(resp)
        }
        End::Error(e) => Err(e),
        End::Lost => Err(GatewayError::StreamInterrupted),
    }
}

/// A streaming follower's response: the flight's log, read at the
/// follower's pace; the log is shared, so a slow follower costs no more
/// memory than the log already holds.
fn stream_follower(
    saved: prometheus::IntCounter,
    reader: Reader,
    include_usage: bool,
) -> Response<Body> {
    let opts = LogOpts {
        raw: false,
        include_usage,
    };
    let mut resp = Response::new(Body::log(LogBody::new(reader, opts, Some(saved))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /models`: upstream's list, filtered to the tenant's models.
async fn models(
    app: &Arc<App>,
    snap: &Snapshot,
    tenant: &Tenant,
    headers: HeaderMap,
    record: &mut Record,
) -> Result<Response<Body>, GatewayError> {
    let cfg = &snap.config.upstream;
    let target = snap
        .upstream_target(Endpoint::Models.upstream_path())
        .ok_or(GatewayError::UpstreamUnreachable)?;
    let outbound = Outbound::new(
        Method::GET,
        target,
        upstream_headers(headers, snap, &record.request_id),
        Bytes::new(),
    );
    let deadline = record.start + cfg.first_byte_timeout;
    let sent = app
        .upstream
        .send(cfg, &app.metrics, deadline, &outbound)
        .await?;
    let (parts, incoming) = sent.response.into_parts();
    record.upstream_status = Some(parts.status.as_u16());
    let body = read_small(incoming, 16 << 20, cfg.idle_timeout).await?;
    let body = if parts.status == StatusCode::OK {
        filter_models(&body, tenant).unwrap_or(body)
    } else {
        body
    };
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = parts.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    mark_no_retry(parts.status, resp.headers_mut());
    Ok(resp)
}

fn filter_models(body: &[u8], tenant: &Tenant) -> Option<Bytes> {
    if tenant.models.is_empty() {
        return None;
    }
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let data = v.get_mut("data")?.as_array_mut()?;
    data.retain(|m| {
        m.get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| tenant.allows(id))
    });
    Some(Bytes::from(serde_json::to_vec(&v).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spliced(raw: &str) -> String {
        let raw = Bytes::copy_from_slice(raw.as_bytes());
        let api = ApiRequest::parse(&raw, Endpoint::Chat, None).expect("valid");
        assert!(api.stream);
        String::from_utf8(with_include_usage(&raw, &api).to_vec()).expect("utf8")
    }

    #[test]
    fn include_usage_is_spliced_without_touching_other_bytes() {
        let m =
            r#""model":"m", "messages": [], "temperature": 1.50, "seed": 12345678901234567890123"#;
        // Absent: the member goes in after the opening brace.
        assert_eq!(
            spliced(&format!(" {{{m}, \"stream\":true}}")),
            format!(" {{\"stream_options\":{{\"include_usage\":true}},{m}, \"stream\":true}}")
        );
        // `null`: replaced, never a second key.
        assert_eq!(
            spliced(&format!("{{{m},\"stream_options\": null,\"stream\":true}}")),
            format!("{{{m},\"stream_options\": {{\"include_usage\":true}},\"stream\":true}}")
        );
        // An object: include_usage set inside it, every other byte kept.
        assert_eq!(
            spliced(&format!(
                "{{{m},\"stream\":true,\"stream_options\":{{\"x\":1.0, \"include_usage\" : false}}}}"
            )),
            format!("{{{m},\"stream\":true,\"stream_options\":{{\"x\":1.0, \"include_usage\" : true}}}}")
        );
        assert_eq!(
            spliced(&format!(
                "{{{m},\"stream\":true,\"stream_options\":{{ \"x\":2}}}}"
            )),
            format!(
                "{{{m},\"stream\":true,\"stream_options\":{{\"include_usage\":true, \"x\":2}}}}"
            )
        );
        assert_eq!(
            spliced(&format!("{{{m},\"stream\":true,\"stream_options\":{{ }}}}")),
            format!("{{{m},\"stream\":true,\"stream_options\":{{\"include_usage\":true }}}}")
        );
        let already =
            format!("{{{m},\"stream\":true,\"stream_options\":{{\"include_usage\":true}}}}");
        assert_eq!(spliced(&already), already);
        // Each result parses to the client's object plus the one field.
        for raw in [
            format!("{{{m},\"stream\":true,\"stream_options\":[1]}}"),
            format!(
                "{{{m},\"stream\":true,\"stream_options\":{{\"a\":{{\"include_usage\":false}}}}}}"
            ),
        ] {
            let out: Value = serde_json::from_str(&spliced(&raw)).expect("json");
            assert_eq!(out["stream_options"]["include_usage"], true, "{raw}");
        }
    }

    #[test]
    fn parse_validates_fields() {
        // With and without the cache key, every body is judged alike.
        let bad = |body: &str, ep| {
            let keyed = ApiRequest::parse(body.as_bytes(), ep, Some(Some("t")))
                .err()
                .map(|e| e.code());
            let plain = ApiRequest::parse(body.as_bytes(), ep, None)
                .err()
                .map(|e| e.code());
            assert_eq!(keyed, plain, "{body}");
            keyed
        };
        assert_eq!(bad("nope", Endpoint::Chat), Some("invalid_json"));
        assert_eq!(bad("[1]", Endpoint::Chat), Some("invalid_json"));
        assert_eq!(
            bad(r#"{"model":"m","messages":[]}trailing"#, Endpoint::Chat),
            Some("invalid_json")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":[],"x":1,"x":2}"#, Endpoint::Chat),
            Some("invalid_json")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":[],"t":1e400}"#, Endpoint::Chat),
            None
        );
        assert_eq!(bad("{}", Endpoint::Chat), Some("missing_field"));
        assert_eq!(
            bad(r#"{"model":1,"messages":[]}"#, Endpoint::Chat),
            Some("missing_field")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":{}}"#, Endpoint::Chat),
            Some("missing_field")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":null}"#, Endpoint::Chat),
            Some("missing_field")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":[]}"#, Endpoint::Fim),
            Some("missing_field")
        );
        assert_eq!(bad(r#"{"model":"m","prompt":"x"}"#, Endpoint::Fim), None);
        let ok = ApiRequest::parse(
            br#"{"model":"m\u0031","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
            Endpoint::Chat,
            Some(None),
        )
        .expect("valid");
        assert!(ok.stream && ok.include_usage && ok.key.is_some());
        assert_eq!(ok.model, "m1", "escapes in the model name are decoded");
        let dup = ApiRequest::parse(
            br#"{"model":"a","model":"b","messages":[]}"#,
            Endpoint::Chat,
            None,
        );
        let Err(e) = dup else {
            panic!("a repeated key is refused")
        };
        assert!(e.to_string().contains("\"model\""), "{e}");
    }

    #[test]
    fn detached_headers_are_equal_and_own_their_bytes() {
        let wire = Bytes::from_static(b"Bearer sk-1application/jsonab");
        let mut h = HeaderMap::new();
        let slice =
            |a: usize, b: usize| HeaderValue::from_maybe_shared(wire.slice(a..b)).expect("value");
        h.insert(header::AUTHORIZATION, slice(0, 11));
        h.insert(header::CONTENT_TYPE, slice(11, 27));
        h.append("x-multi", slice(27, 28));
        h.append("x-multi", slice(28, 29));
        let d = detach_headers(&h);
        assert_eq!(d, h);
        let wire_range = wire.as_ptr_range();
        for v in d.values() {
            assert!(
                !wire_range.contains(&v.as_bytes().as_ptr()),
                "no value points into the read buffer"
            );
        }
        let multi: Vec<_> = d.get_all("x-multi").iter().collect();
        assert_eq!(multi, vec!["a", "b"]);
    }
}
