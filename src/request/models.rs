//! `GET /models`: upstream's list, filtered to the tenant's allowed models.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde_json::Value;

use std::sync::Arc;

use http::HeaderMap;

use super::forward::upstream_headers;
use super::{Ctx, Served};
use crate::api::{Endpoint, Format};
use crate::http::error::GatewayError;
use crate::http::headers::mark_no_retry;
use crate::response::body::Body;
use crate::tenant::Tenant;
use crate::upstream::{read_small, Outbound};

impl Ctx {
    /// `GET /models`: upstream's list, filtered to the tenant's models.
    pub(super) async fn models(&mut self, tenant: &Tenant, headers: HeaderMap) -> Served {
        let snap = Arc::clone(&self.snap);
        let cfg = &snap.config.upstream;
        let peer = snap
            .upstreams
            .choose()
            .ok_or(GatewayError::UpstreamUnreachable)?;
        self.record.upstream = Some(peer.header().clone());
        let target = peer
            .target(Endpoint::Models.upstream_path())
            .ok_or(GatewayError::UpstreamUnreachable)?;
        let outbound = Outbound::new(
            Method::GET,
            target,
            upstream_headers(headers, peer, &self.record.request_id, Format::OpenAi),
            Bytes::new(),
        )
        .for_tenant(&tenant.name, tenant.weight);
        let deadline = self.record.start + cfg.first_byte_timeout;
        let sent = self
            .app
            .upstream
            .send(cfg, &self.app.metrics, deadline, &outbound)
            .await?;
        let (parts, incoming) = sent.response.into_parts();
        self.record.upstream_status = Some(parts.status.as_u16());
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
