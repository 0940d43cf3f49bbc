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
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use crate::body::{Body, Record};
use crate::cache::{self, End, Entry, Head, Join, Reader};
use crate::error::GatewayError;
use crate::fleet_flight::Remote;
use crate::limit::{Admission, Standings};
use crate::relay::{Launch, LeadBody, LogBody, LogOpts, Meter, Plan, Sink, StreamOpts};
use crate::request_id::X_REQUEST_ID;
use crate::routes::{self, Endpoint};
use crate::sse::{self, DONE_EVENT};
use crate::state::{App, Snapshot, Tenant};
use crate::text::{PromptText, TextKind};
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
    let served = match begin(&app, &snap, req, &mut record, &mut standings) {
        Ok(serving) => serving.await,
        Err(e) => Err(e),
    };
    let mut resp = match served {
        Ok(resp) => resp,
        Err(e) => refuse(&app, &mut record, e),
    };
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
    req: Request<Incoming>,
    record: &'a mut Record,
    standings: &'a mut Standings,
) -> Result<Pin<Box<impl Future<Output = Served> + 'a>>, GatewayError> {
    let (parts, body) = req.into_parts();
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
    body: Incoming,
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
    // The cache mode needs no body; a request that bypasses the cache is
    // validated without building a JSON tree.
    let mode = CacheMode::of(snap, &tenant, &headers);
    let api = ApiRequest::parse(&bytes, endpoint, mode != CacheMode::Bypass)?;
    record.model = Some(snap.models.label(&api.model));
    record.stream = api.stream;
    if !tenant.allows(&api.model) {
        return Err(GatewayError::ModelNotAllowed);
    }

    // 5. Cache.
    record.cache = mode.label();
    let key = api
        .value
        .as_ref()
        .map(|v| cache::key(snap.cache_scope(&tenant), endpoint.label(), v));
    let mut leader = None;
    if let (CacheMode::Lookup, Some(key)) = (mode, key) {
        if let Some(entry) = app.cache.get(&key).await {
            record.cache = "hit";
            record.saved = entry.usage;
            let mut resp = entry_response(&entry, api.stream, api.include_usage);
            resp.headers_mut()
                .insert(header::AGE, HeaderValue::from(entry.age().as_secs()));
            return Ok(resp);
        }
        if let Some(reader) = app.flights.follow(&key) {
            record.cache = "coalesced";
            let following = Box::pin(follow(app, reader, &api, record));
            return following.await;
        }
    }

    // 6. Budget and token bucket: only what goes upstream is refused for
    // spend or tokens.
    check.check(&tenant.limits, standings)?;
    if let (CacheMode::Lookup, Some(key)) = (mode, key) {
        match app.flights.join(key) {
            Join::Lead(l) => match &app.fleet_flights {
                None => leader = Some(l),
                // Another replica may be calling upstream for this already.
                Some(fleet) => match fleet.claim(&key).await {
                    Ok(Some(publisher)) => {
                        // Mirrored for the fleet from the local flight.
                        if let Some(reader) = app.flights.follow(&key) {
                            publisher.start(reader);
                        }
                        leader = Some(l);
                    }
                    Err(_) => leader = Some(l),
                    Ok(None) => {
                        let deadline = record.start + snap.config.upstream.first_byte_timeout;
                        let idle = snap.config.upstream.idle_timeout;
                        let remote = Box::pin(fleet.follow(&key, l, deadline, idle));
                        match remote.await {
                            Remote::Following(reader) => {
                                record.cache = "coalesced";
                                let following = Box::pin(follow(app, reader, &api, record));
                                return following.await;
                            }
                            Remote::TakeOver(l) | Remote::Alone(l) => leader = Some(l),
                        }
                    }
                },
            },
            Join::Follow(reader) => {
                record.cache = "coalesced";
                let following = Box::pin(follow(app, reader, &api, record));
                return following.await;
            }
        }
    }

    // 7. Upstream.
    let sink = Sink { store: key, leader };
    forward(
        app, snap, endpoint, headers, bytes, api, tenant, record, sink,
    )
    .await
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
/// through untouched.
pub struct ApiRequest {
    /// The parsed body, when the cache needs it for the key.
    pub value: Option<Value>,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// The client sent `stream_options` (so it cannot simply be spliced in).
    pub has_stream_options: bool,
    /// Characters of the messages' text (or the FIM prompt), for the usage
    /// estimate: counted here so nothing of the body is kept for it.
    pub prompt_chars: u64,
}

/// The fields Sluice reads, each kept raw so a wrong type is told apart from
/// invalid JSON; every other field is skipped without being built.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    messages: Option<PromptText>,
    #[serde(default)]
    prompt: Option<PromptText>,
    #[serde(borrow, default)]
    stream: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    stream_options: Option<&'a serde_json::value::RawValue>,
}

impl ApiRequest {
    /// Validates a body. `keep` also builds the JSON tree (for the cache key).
    pub fn parse(bytes: &[u8], endpoint: Endpoint, keep: bool) -> Result<ApiRequest, GatewayError> {
        // A derived struct would also accept a JSON array; the body must be
        // an object.
        if sse::trim_leading_ws(bytes).first() != Some(&b'{') {
            return Err(GatewayError::InvalidJson);
        }
        // One parse either way: the tree when the cache needs it, else a
        // borrowed view of just the fields read here.
        let (seen, value) = if keep {
            let value: Value =
                serde_json::from_slice(bytes).map_err(|_| GatewayError::InvalidJson)?;
            (Seen::of_tree(&value), Some(value))
        } else {
            let f: Fields<'_> =
                serde_json::from_slice(bytes).map_err(|_| GatewayError::InvalidJson)?;
            (Seen::of_fields(&f), None)
        };
        let model = seen.model.ok_or(GatewayError::MissingField(
            "`model` is required and must be a string.",
        ))?;
        match endpoint {
            Endpoint::Fim if !seen.prompt_is_string => {
                return Err(GatewayError::MissingField(
                    "`prompt` is required and must be a string.",
                ));
            }
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Models if !seen.messages_is_array => {
                return Err(GatewayError::MissingField(
                    "`messages` is required and must be an array.",
                ));
            }
            Endpoint::Fim | Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Models => {}
        }
        Ok(ApiRequest {
            value,
            model,
            stream: seen.stream,
            include_usage: seen.stream && seen.include_usage,
            has_stream_options: seen.has_stream_options,
            prompt_chars: match endpoint {
                Endpoint::Fim => seen.prompt_chars,
                Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Models => seen.messages_chars,
            },
        })
    }
}

/// What validation needs to know of a body, however it was parsed.
struct Seen {
    model: Option<String>,
    messages_is_array: bool,
    prompt_is_string: bool,
    stream: bool,
    include_usage: bool,
    has_stream_options: bool,
    messages_chars: u64,
    prompt_chars: u64,
}

impl Seen {
    fn of_tree(v: &Value) -> Seen {
        let opts = v.get("stream_options");
        let text = |field: &str| v.get(field).map(PromptText::of_value);
        Seen {
            model: v.get("model").and_then(Value::as_str).map(str::to_string),
            messages_is_array: v.get("messages").is_some_and(Value::is_array),
            prompt_is_string: v.get("prompt").is_some_and(Value::is_string),
            stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: opts
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            has_stream_options: opts.is_some_and(|o| !o.is_null()),
            messages_chars: text("messages").map_or(0, |t| t.chars),
            prompt_chars: text("prompt").map_or(0, |t| t.chars),
        }
    }

    fn of_fields(f: &Fields<'_>) -> Seen {
        Seen {
            model: f
                .model
                .filter(|r| r.get().starts_with('"'))
                .and_then(|r| serde_json::from_str::<String>(r.get()).ok()),
            messages_is_array: f.messages.is_some_and(|t| t.kind == TextKind::Array),
            prompt_is_string: f.prompt.is_some_and(|t| t.kind == TextKind::String),
            stream: f.stream.is_some_and(|r| r.get() == "true"),
            include_usage: f
                .stream_options
                .and_then(|r| serde_json::from_str::<Value>(r.get()).ok())
                .and_then(|o| o.get("include_usage").and_then(Value::as_bool))
                .unwrap_or(false),
            has_stream_options: f.stream_options.is_some_and(|r| r.get() != "null"),
            messages_chars: f.messages.map_or(0, |t| t.chars),
            prompt_chars: f.prompt.map_or(0, |t| t.chars),
        }
    }
}

/// The body sent upstream for a stream: the client's bytes with
/// `stream_options.include_usage = true`. When the client sent no
/// `stream_options`, the field is spliced in after the opening brace so
/// every other byte passes through as it came; otherwise that one member is
/// rewritten and the body re-serialized.
pub fn with_include_usage(bytes: &Bytes, api: &ApiRequest) -> Bytes {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
    if !api.has_stream_options {
        if let Some(open) = bytes.iter().position(|&b| b == b'{') {
            let mut out = BytesMut::with_capacity(bytes.len() + FIELD.len());
            out.extend_from_slice(&bytes[..=open]);
            out.extend_from_slice(FIELD);
            out.extend_from_slice(&bytes[open + 1..]);
            return out.freeze();
        }
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(bytes) else {
        return bytes.clone();
    };
    if let Some(obj) = v.as_object_mut() {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if !opts.is_object() {
            *opts = Value::Object(Default::default());
        }
        if let Some(o) = opts.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    Bytes::from(serde_json::to_vec(&v).unwrap_or_else(|_| bytes.to_vec()))
}

async fn read_body(
    mut body: Incoming,
    headers: &HeaderMap,
    config: &crate::config::Config,
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

/// Headers sent upstream: the client's, less hop-by-hop headers, its
/// Authorization (replaced by the shared key) and Accept-Encoding (Sluice
/// reads the answer, so it asks for it uncompressed). `Outbound` replaces
/// Host and Content-Length.
fn upstream_headers(mut h: HeaderMap, snap: &Snapshot, request_id: &HeaderValue) -> HeaderMap {
    strip_hop_by_hop(&mut h);
    h.remove(header::AUTHORIZATION);
    h.remove(header::ACCEPT_ENCODING);
    if let Some(auth) = &snap.upstream_auth {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    h.insert(&X_REQUEST_ID, request_id.clone());
    h
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
    resp_headers.remove(&X_REQUEST_ID);
    if is_sse {
        resp_headers.remove(header::CONTENT_LENGTH);
    }
    mark_no_retry(parts.status, &mut resp_headers);
    let content_type = resp_headers.get(header::CONTENT_TYPE).cloned();
    let relay = plan.relay(incoming, parts.status, content_type, sent.slot);
    let body = if relay.leads() {
        Body::lead(LeadBody::start(relay))
    } else {
        Body::relay(relay)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = resp_headers;
    Ok(resp)
}

/// A stored answer, in the mode the client asked for.
pub fn entry_response(entry: &Entry, stream: bool, include_usage: bool) -> Response<Body> {
    let (body, content_type) = if stream {
        let mut frames = vec![entry.replay.chunks.clone()];
        if include_usage {
            frames.extend(entry.replay.usage_chunk.clone());
        }
        frames.push(Bytes::from_static(DONE_EVENT));
        (Body::frames(frames), "text/event-stream")
    } else {
        (Body::full(entry.completion.clone()), "application/json")
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Serves a coalesced follower from the leader's flight: a streaming
/// follower of a streaming leader reads its log from the first event on, at
/// its own pace; everyone else gets the finished answer.
async fn follow(
    app: &Arc<App>,
    mut reader: Reader,
    api: &ApiRequest,
    record: &mut Record,
) -> Result<Response<Body>, GatewayError> {
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
            return Ok(stream_follower(saved, reader, api.include_usage));
        }
        if let Some(end) = end {
            return end_response(end, api, record);
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
            Ok(entry_response(&entry, api.stream, api.include_usage))
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

    #[test]
    fn include_usage_is_spliced_without_touching_other_bytes() {
        let raw = Bytes::from_static(
            b" {\"model\":\"m\", \"messages\": [], \"temperature\": 1.50, \"stream\":true}",
        );
        let api = ApiRequest::parse(&raw, Endpoint::Chat, false).expect("valid");
        assert!(api.stream && !api.has_stream_options);
        let out = with_include_usage(&raw, &api);
        assert_eq!(
            &out[..],
            b" {\"stream_options\":{\"include_usage\":true},\"model\":\"m\", \"messages\": [], \"temperature\": 1.50, \"stream\":true}"
        );
        let raw = Bytes::from_static(
            b"{\"model\":\"m\",\"messages\":[],\"stream\":true,\"stream_options\":{\"include_usage\":false}}",
        );
        let api = ApiRequest::parse(&raw, Endpoint::Chat, false).expect("valid");
        assert!(api.has_stream_options && !api.include_usage);
        let out: Value = serde_json::from_slice(&with_include_usage(&raw, &api)).expect("json");
        assert_eq!(out["stream_options"]["include_usage"], true);
    }

    #[test]
    fn parse_validates_fields() {
        // Both parse paths (tree for the cache, borrowed view otherwise)
        // must judge every body alike.
        let bad = |body: &str, ep| {
            let tree = ApiRequest::parse(body.as_bytes(), ep, true)
                .err()
                .map(|e| e.code());
            let view = ApiRequest::parse(body.as_bytes(), ep, false)
                .err()
                .map(|e| e.code());
            assert_eq!(tree, view, "{body}");
            tree
        };
        assert_eq!(bad("nope", Endpoint::Chat), Some("invalid_json"));
        assert_eq!(bad("[1]", Endpoint::Chat), Some("invalid_json"));
        assert_eq!(
            bad(r#"{"model":"m","messages":[]}trailing"#, Endpoint::Chat),
            Some("invalid_json")
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
            true,
        )
        .expect("valid");
        assert!(ok.stream && ok.include_usage && ok.value.is_some());
        assert_eq!(ok.model, "m1", "escapes in the model name are decoded");
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
