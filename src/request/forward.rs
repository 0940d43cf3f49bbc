//! Phase 7, forward: the request goes to the upstream the pool chooses,
//! with retries while no byte has reached the client; the answer's headers
//! are cleaned and its body becomes the relay that streams it back.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::validate::ApiRequest;
use super::{Ctx, Served};
use crate::api::{Endpoint, Format};
use crate::app::Snapshot;
use crate::http::error::GatewayError;
use crate::http::headers::{self, mark_no_retry};
use crate::http::request_id::X_REQUEST_ID;
use crate::response::body::Body;
use crate::response::lead::{Launch, LeadBody};
use crate::response::relay::{Answer, Billing, Meter, Plan, Sink, StreamOpts};
use crate::tenant::Tenant;
use crate::upstream::pool::Route;
use crate::upstream::{KeyHeader, Outbound, Sent};

/// A validated request, ready to go upstream.
pub(super) struct Call {
    pub(super) endpoint: Endpoint,
    pub(super) headers: HeaderMap,
    /// The client's query string, for the APIs that forward it.
    pub(super) query: Option<Box<str>>,
    pub(super) body: Bytes,
    pub(super) api: ApiRequest,
}

impl Ctx {
    /// 7. Upstream, then the relay.
    pub(super) async fn forward(&mut self, tenant: Arc<Tenant>, call: Call, sink: Sink) -> Served {
        let snap = Arc::clone(&self.snap);
        let cfg = &snap.config.upstream;
        let Call {
            endpoint,
            headers,
            query,
            body,
            api,
        } = call;
        let serving = self.serving.ok_or(GatewayError::ModelNotFound)?;
        // Chosen now, just before the call.
        let mut route = snap.upstreams.start(serving);
        let first = route.current();
        let path = endpoint.upstream_path();
        // Counted in the client's bytes, before a stream's are spliced.
        let prompt_chars = api.prompt_chars(&body);
        let (body, model_at) = api.upstream_body(&body);
        let format = endpoint.format();
        let mut headers = upstream_headers(headers, &self.record.request_id);
        headers
            .entry(header::CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/json"));
        let deadline = self.record.start + cfg.first_byte_timeout;
        let model = self
            .record
            .model
            .clone()
            .unwrap_or_else(|| Arc::from(crate::metrics::OTHER));
        // Made before the call: a leader's call may outlive this request.
        let plan = Plan {
            format,
            stream: api.stream.then(|| StreamOpts {
                shape: endpoint.shape(),
                client_wants_usage: api.include_usage,
            }),
            first_event_deadline: deadline,
            idle: cfg.idle_timeout,
            grace: self.app.lifecycle.grace_watch(),
            meter: Meter {
                lease: self.record.lease.take(),
                tenant,
                price: snap.price(&model).copied(),
                model,
                prompt_chars,
                billing: if endpoint.generates() {
                    Billing::Usage
                } else {
                    Billing::Free
                },
            },
            sink,
        };
        let (name, weight) = (
            Arc::clone(&plan.meter.tenant.name),
            plan.meter.tenant.weight,
        );
        let (sent, plan) = if let Some(leader) = &plan.sink.leader {
            // A flight's leader: the call is owned (boxed), so that if this
            // client leaves before the headers while followers wait, it goes
            // on without it.
            let call = {
                let (app, snap) = (Arc::clone(&self.app), Arc::clone(&snap));
                let flight = Arc::clone(&leader.flight);
                let client_model = api.model;
                Box::pin(async move {
                    let outbound = Outbound::new(Method::POST, path, headers, body)
                        .key_in(key_header(format))
                        .with_query(query.as_deref())
                        .to(first, snap.upstreams.peer(first))
                        .naming(&client_model, model_at)
                        .for_tenant(&name, weight);
                    let cfg = &snap.config.upstream;
                    let sent = app
                        .upstream
                        .send(
                            &snap.upstreams,
                            &mut route,
                            cfg,
                            &app.metrics,
                            deadline,
                            &outbound,
                        )
                        .await;
                    // Its followers' answers (and this request's log line,
                    // should the call fail) name its last upstream.
                    flight.set_upstream(snap.upstreams.peer(route.current()).header());
                    sent
                })
            };
            let flight = Arc::clone(&leader.flight);
            let launch = Launch::new(call, plan);
            match launch.await {
                Ok(launched) => launched,
                Err(e) => {
                    if let Some(at) = flight.upstream() {
                        self.record.upstream = Some(at);
                    }
                    return Err(e);
                }
            }
        } else {
            let outbound = Outbound::new(Method::POST, path, headers, body)
                .key_in(key_header(format))
                .with_query(query.as_deref())
                .to(first, snap.upstreams.peer(first))
                .naming(&api.model, model_at)
                .for_tenant(&name, weight);
            let sent = self.send(&snap, &mut route, deadline, &outbound).await?;
            (sent, plan)
        };
        self.record.upstream = Some(sent.upstream.clone());
        let (parts, answer) = Answer::of(sent);
        self.record.upstream_status = Some(parts.status.as_u16());
        let is_sse = api.stream && parts.status == StatusCode::OK;
        let mut resp_headers = parts.headers;
        headers::clean_response(&mut resp_headers);
        resp_headers.remove(&X_REQUEST_ID);
        if is_sse {
            resp_headers.remove(header::CONTENT_LENGTH);
        }
        mark_no_retry(parts.status, &mut resp_headers);
        let relay = plan.relay(answer);
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
}

impl Ctx {
    /// Sends `outbound` on `route` from this request's task (failing over
    /// and retrying); the record names the upstream of the last attempt.
    pub(super) async fn send(
        &mut self,
        snap: &Snapshot,
        route: &mut Route,
        deadline: std::time::Instant,
        outbound: &Outbound<'_>,
    ) -> Result<Sent, GatewayError> {
        let cfg = &snap.config.upstream;
        let sent = self
            .app
            .upstream
            .send(
                &snap.upstreams,
                route,
                cfg,
                &self.app.metrics,
                deadline,
                outbound,
            )
            .await;
        self.record.upstream = Some(snap.upstreams.peer(route.current()).header().clone());
        sent
    }
}

/// The header each upstream's key goes in for `format`.
fn key_header(format: Format) -> KeyHeader {
    match format {
        Format::OpenAi => KeyHeader::Authorization,
        Format::Anthropic => KeyHeader::ApiKey,
    }
}

/// Headers sent upstream: the client's, less hop-by-hop headers and those
/// that never go upstream. `Outbound` sets Host, Content-Length and each
/// upstream's own `Authorization`.
pub(super) fn upstream_headers(mut h: HeaderMap, request_id: &HeaderValue) -> HeaderMap {
    headers::clean_request(&mut h);
    h.insert(&X_REQUEST_ID, request_id.clone());
    h
}
