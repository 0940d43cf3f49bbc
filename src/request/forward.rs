//! Phase 7, forward: the request goes to the upstream the pool chooses,
//! with retries while no byte has reached the client; the answer's headers
//! are cleaned and its body becomes the relay that streams it back.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::validate::{with_include_usage, ApiRequest};
use super::{Ctx, Served};
use crate::api::{Endpoint, Format};
use crate::http::error::GatewayError;
use crate::http::headers::{self, mark_no_retry};
use crate::http::request_id::X_REQUEST_ID;
use crate::response::body::Body;
use crate::response::lead::{Launch, LeadBody};
use crate::response::relay::{Answer, Billing, Meter, Plan, Sink, StreamOpts};
use crate::tenant::Tenant;
use crate::upstream::pool::Peer;
use crate::upstream::Outbound;

static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

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
        let format = endpoint.format();
        let peer = snap
            .upstreams
            .choose()
            .ok_or(GatewayError::UpstreamUnreachable)?;
        self.record.upstream = Some(peer.header().clone());
        if let Some(leader) = &sink.leader {
            // Its followers' answers name it too.
            leader.flight.set_upstream(peer.header());
        }
        let path = endpoint.upstream_path();
        let target = peer.target(path).ok_or(match format {
            // The upstream serves no Messages API (`anthropic_base_url = ""`).
            Format::Anthropic => GatewayError::NotFound,
            Format::OpenAi => GatewayError::UpstreamUnreachable,
        })?;
        let body = if api.stream {
            with_include_usage(&body, &api)
        } else {
            body
        };
        let mut headers = upstream_headers(headers, peer, &self.record.request_id, format);
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
                prompt_chars: api.prompt_chars,
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
        let (sent, plan) = if plan.sink.leader.is_some() {
            // A flight's leader: the call is owned (boxed), so that if this
            // client leaves before the headers while followers wait, it goes
            // on without it.
            let call = {
                let (app, snap) = (Arc::clone(&self.app), Arc::clone(&snap));
                Box::pin(async move {
                    let target = snap
                        .upstreams
                        .choose()
                        .and_then(|peer| peer.target(path))
                        .ok_or(GatewayError::UpstreamUnreachable)?;
                    let outbound = Outbound::new(Method::POST, target, headers, body)
                        .for_tenant(&name, weight)
                        .with_query(query.as_deref());
                    let cfg = &snap.config.upstream;
                    app.upstream
                        .send(cfg, &app.metrics, deadline, &outbound)
                        .await
                })
            };
            let launch = Launch::new(call, plan);
            launch.await?
        } else {
            let outbound = Outbound::new(Method::POST, target, headers, body)
                .for_tenant(&name, weight)
                .with_query(query.as_deref());
            let sent = self
                .app
                .upstream
                .send(cfg, &self.app.metrics, deadline, &outbound)
                .await?;
            (sent, plan)
        };
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

/// Headers sent upstream: the client's, less hop-by-hop headers and those
/// that never go upstream, with the upstream's own key: `Authorization` for
/// OpenAI's API, `x-api-key` for Anthropic's. `Outbound` replaces Host and
/// Content-Length.
pub(super) fn upstream_headers(
    mut h: HeaderMap,
    peer: &Peer,
    request_id: &HeaderValue,
    format: Format,
) -> HeaderMap {
    headers::clean_request(&mut h);
    let key = match format {
        Format::OpenAi => peer.auth().map(|v| (header::AUTHORIZATION, v)),
        Format::Anthropic => peer.api_key().map(|v| (X_API_KEY.clone(), v)),
    };
    if let Some((name, value)) = key {
        h.insert(name, value.clone());
    }
    h.insert(&X_REQUEST_ID, request_id.clone());
    h
}
