//! The request path: one request's life as ordered phases over one
//! context (`Ctx`), each phase a function of its own file. The order, and
//! the reason for each phase's place:
//!
//! 1. **Route** (`http::routes`) — cheapest refusal first; unknown paths
//!    never touch auth.
//! 2. **Auth** — before limits, so buckets are keyed by tenant and anonymous
//!    floods cannot drain anyone's quota. Past here code sees a `Tenant`.
//! 3. **Admit** (`limit`) — request bucket and concurrency, before reading
//!    the body, so a refused request costs nothing and is never queued;
//!    before the cache, so hits count as requests.
//! 4. **Body** (`body`, `validate`) — read within `max_body_bytes`;
//!    validated (`model`, `messages`/`prompt`) and keyed for the cache in
//!    one pass; model allowlist.
//! 5. **Cache** (`cache`) — lookup, then attach to an identical request in
//!    flight, on this replica or another.
//! 6. **Budget and token bucket** — only for requests that will go
//!    upstream: hits and coalesced answers spend nothing.
//! 7. **Forward** (`forward`) — retries before any byte reached the client;
//!    then the relay streams the answer back, metering and caching along
//!    the way.
//!
//! Every phase reads and writes the same `Ctx`; the response carries its
//! `Record`, which writes the metrics and the access-log line when the
//! response body is dropped.

mod body;
mod cache;
mod forward;
mod models;
pub mod validate;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, Version};
use hyper::body::Incoming;

use crate::api::{Endpoint, Format};
use crate::app::{App, Snapshot};
use crate::http::error::{GatewayError, Limit};
use crate::http::headers::detach_headers;
use crate::http::request_id::X_REQUEST_ID;
use crate::http::routes;
use crate::limit::{Admission, Standings, UpstreamCheck};
use crate::response::body::Body;
use crate::response::record::Record;
use crate::tenant::Tenant;
use crate::upstream::pool::Serving;
use validate::ApiRequest;

// Parsed once: a `&str` name is parsed and validated on every use.
static X_SLUICE_CACHE: HeaderName = HeaderName::from_static("x-sluice-cache");
static X_SLUICE_UPSTREAM: HeaderName = HeaderName::from_static("x-sluice-upstream");

/// One request's state, handed from phase to phase.
pub(crate) struct Ctx {
    app: Arc<App>,
    /// The configuration this request runs under, start to end.
    snap: Arc<Snapshot>,
    /// The facts written out when the response body is dropped; it rides
    /// in the response.
    record: Box<Record>,
    /// Where the tenant stands on its limits: the rate-limit headers.
    standings: Standings,
    /// The budget and token check admission prepared, made (and so taken)
    /// once, only before this request may go upstream.
    upstream_check: Option<UpstreamCheck>,
    /// The upstreams that serve this request (known with its model; one
    /// is chosen when it is sent).
    serving: Option<Serving>,
    /// The API format the client speaks (known from the path, before the
    /// route is resolved): the shape of Sluice's own errors and headers.
    format: Format,
}

/// A routed request's head, detached from the connection's read buffer.
struct Routed {
    endpoint: Endpoint,
    headers: HeaderMap,
    /// The query string, copied, for the APIs that forward it (Anthropic's).
    query: Option<Box<str>>,
}

/// What the request path ends in: an answer, or the error that becomes one.
type Served = Result<Response<Body>, GatewayError>;

/// Entry point for every client request.
pub(crate) async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let request_id = app.request_ids.of(req.headers());
    let record = Box::new(Record::new(
        Arc::clone(&app.metrics),
        request_id.clone(),
        start,
    ));
    let snap = app.snapshot.load_full();
    let http1 = req.version() < Version::HTTP_2;
    let (parts, mut body) = req.into_parts();
    let mut ctx = Ctx {
        app,
        snap,
        record,
        standings: Standings::default(),
        upstream_check: None,
        serving: None,
        format: routes::format_of(parts.uri.path()),
    };
    // The rest of the path is boxed: hyper keeps the slot of a connection's
    // in-flight service future for the connection's lifetime, so an unboxed
    // request path (a few KiB) would stay allocated for every open stream;
    // and the head, taken apart here, takes no room in that slot either.
    let served = match ctx.route(parts) {
        Ok(routed) => {
            let serving = Box::pin(ctx.serve(routed, &mut body));
            // A panic on the path answers 500 here, in the request's API
            // format and counted like any refusal (the service stack's own
            // catch is the last resort, for what panics outside this).
            match std::panic::AssertUnwindSafe(serving).catch_unwind().await {
                Ok(served) => served,
                Err(_) => {
                    tracing::error!("a request handler panicked; answered 500");
                    Err(GatewayError::Internal)
                }
            }
        }
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
                let draining = Box::pin(body::discard_rest(&mut body, &e, &ctx.snap.config));
                draining.await
            };
            let mut resp = ctx.refuse(e);
            if http1 && !keep {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    drop(body);
    let Ctx {
        mut record,
        standings,
        format: ctx_format,
        ..
    } = ctx;
    record.status = resp.status().as_u16();
    let h = resp.headers_mut();
    // Room for what follows at once (the id, six rate-limit and three
    // budget headers, the cache state, the upstream): one growth of the
    // map, not one for each that overflows it.
    h.reserve(12);
    h.insert(&X_REQUEST_ID, request_id);
    if record.tenant.is_some() {
        standings.write_headers(h, ctx_format);
    }
    if let Some(cache) = record.cache {
        h.insert(&X_SLUICE_CACHE, HeaderValue::from_static(cache.label()));
    }
    // Every answer that came from an upstream call names the upstream (a
    // coalesced one, its leader's); hits and Sluice's own refusals do not.
    let from_upstream =
        record.upstream_status.is_some() || record.cache == Some(crate::api::CacheState::Coalesced);
    if let Some(name) = record.upstream.clone().filter(|_| from_upstream) {
        h.insert(&X_SLUICE_UPSTREAM, name);
    }
    resp.body_mut().set_record(record);
    Ok(resp)
}

/// How many times a request whose fleet leader was lost asks again.
const LOST_RETRIES: u32 = 2;

impl Ctx {
    /// 1. Route, and detach the head: its values are slices of the
    ///    connection's read buffer, which hyper can reuse for its next read
    ///    only once nothing points into it.
    fn route(&mut self, parts: http::request::Parts) -> Result<Routed, GatewayError> {
        let endpoint = routes::route(&parts.method, parts.uri.path())?;
        self.record.endpoint = Some(endpoint);
        let query = match endpoint.format() {
            Format::Anthropic => parts.uri.query().map(Box::from),
            Format::OpenAi => None,
        };
        Ok(Routed {
            endpoint,
            headers: detach_headers(&parts.headers),
            query,
        })
    }

    /// Phases 2 to 7, for a routed request.
    async fn serve(&mut self, routed: Routed, body: &mut Incoming) -> Served {
        let tenant = self.authenticate(&routed.headers, routed.endpoint.format())?;
        self.admit(&tenant).await?;
        if !routed.endpoint.takes_body() {
            // The rarer paths are boxed so the common one's future stays
            // small.
            let listing = Box::pin(self.models(&tenant, routed.headers));
            return listing.await;
        }
        let bytes = body::read_body(body, &routed.headers, &self.snap.config).await?;
        let (api, mode) = self.validate(&tenant, &routed, &bytes).await?;
        let fill = match self.cached(&tenant, &api, mode).await? {
            cache::Cached::Answer(resp) => return Ok(resp),
            cache::Cached::Miss(fill) => fill,
        };
        // A token count spends nothing, so a token deficit or a spent
        // budget does not refuse it.
        if routed.endpoint.generates() {
            self.check_upstream(&tenant)?;
        }
        let call = forward::Call {
            endpoint: routed.endpoint,
            headers: routed.headers,
            query: routed.query,
            body: bytes,
            api,
        };
        self.forward(tenant, call, fill).await
    }

    /// 2. Auth: the presented key's hash to a tenant.
    fn authenticate(
        &mut self,
        headers: &HeaderMap,
        format: Format,
    ) -> Result<Arc<Tenant>, GatewayError> {
        let Some(tenant) = self.snap.authenticate(headers, format) else {
            self.app.metrics.auth_failures.inc();
            return Err(GatewayError::InvalidApiKey);
        };
        self.record.set_tenant(Arc::clone(&tenant));
        Ok(tenant)
    }

    /// 3. Request bucket and concurrency (and where the token bucket and
    ///    the budget stand): one decision, at most one Redis round trip
    ///    when limits are shared (none while a replica's share lasts).
    async fn admit(&mut self, tenant: &Tenant) -> Result<(), GatewayError> {
        let Admission { lease, check } = self
            .app
            .limiter
            .admit(&tenant.limits, &mut self.standings)
            .await?;
        self.record.lease = lease;
        self.upstream_check = Some(check);
        Ok(())
    }

    /// 4. Validates the body (and keys it for the cache, unless the cache
    ///    is bypassed) in one pass; the model allowlist.
    async fn validate(
        &mut self,
        tenant: &Tenant,
        routed: &Routed,
        bytes: &bytes::Bytes,
    ) -> Result<(ApiRequest, cache::CacheMode), GatewayError> {
        // A token count is never cached or coalesced.
        let mode = match routed.endpoint.generates() {
            true => cache::CacheMode::of(&self.snap, tenant, &routed.headers),
            false => cache::CacheMode::Bypass,
        };
        let scope = match mode {
            cache::CacheMode::Bypass => validate::Keyed::No,
            cache::CacheMode::Lookup | cache::CacheMode::Refresh => {
                validate::Keyed::In(self.snap.cache_scope(tenant))
            }
        };
        let api = validate::parse_body(bytes, routed.endpoint, scope).await?;
        self.record.model = Some(self.snap.models.label(&api.model));
        self.record.stream = api.stream;
        if !tenant.allows(&api.model) {
            return Err(GatewayError::ModelNotAllowed);
        }
        self.serving = Some(
            self.snap
                .upstreams
                .serving(Some(&api.model), routed.endpoint.upstream_path())
                .ok_or(GatewayError::ModelNotFound)?,
        );
        if routed.endpoint.generates() {
            self.record.cache = Some(mode.state());
        }
        Ok((api, mode))
    }

    /// 6. The budget and the token bucket, once, before this request may go
    ///    upstream.
    fn check_upstream(&mut self, tenant: &Tenant) -> Result<(), GatewayError> {
        match self.upstream_check.take() {
            Some(check) => Ok(check.check(&tenant.limits, &mut self.standings)?),
            None => Ok(()),
        }
    }

    /// A refusal's response, counted and logged once.
    fn refuse(&mut self, e: GatewayError) -> Response<Body> {
        let record = &mut self.record;
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
            GatewayError::BudgetExceeded { .. } => Some(Limit::Budget.label()),
            _ => None,
        };
        if let (Some(limit), Some(t)) = (limit, &record.tenant) {
            self.app
                .metrics
                .rate_limited
                .with_label_values(&[&t.name, limit])
                .inc();
        }
        e.into_response(self.format, record.request_id.to_str().ok())
            .map(Body::full)
    }
}
