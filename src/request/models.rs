//! `GET /models`: upstream's list, filtered to the tenant's allowed models.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde_json::Value;

use std::sync::Arc;

use http::HeaderMap;

use super::forward::upstream_headers;
use super::{Ctx, Served};
use crate::api::Endpoint;
use crate::http::error::GatewayError;
use crate::http::headers::mark_no_retry;
use crate::response::body::Body;
use crate::tenant::Tenant;
use crate::upstream::pool::Peer;
use crate::upstream::{read_small, Outbound};

impl Ctx {
    /// `GET /models`: upstream's list, filtered to the tenant's models.
    pub(super) async fn models(&mut self, tenant: &Tenant, headers: HeaderMap) -> Served {
        let snap = Arc::clone(&self.snap);
        let cfg = &snap.config.upstream;
        let path = Endpoint::Models.upstream_path();
        // Chosen as a request without a model would be.
        let mut route = snap
            .upstreams
            .route(None, path)
            .ok_or(GatewayError::UpstreamUnreachable)?;
        let outbound = Outbound::new(
            Method::GET,
            path,
            upstream_headers(headers, &self.record.request_id),
            Bytes::new(),
        )
        .to(route.current(), snap.upstreams.peer(route.current()))
        .for_tenant(&tenant.name, tenant.weight);
        let deadline = self.record.start + cfg.first_byte_timeout;
        let sent = self.send(&snap, &mut route, deadline, &outbound).await?;
        let (parts, incoming) = sent.response.into_parts();
        self.record.upstream_status = Some(parts.status.as_u16());
        let body = read_small(incoming, 16 << 20, cfg.idle_timeout).await?;
        let body = if parts.status == StatusCode::OK {
            let pool = &snap.upstreams;
            let peer = pool.peer(route.current());
            let listed = Listed {
                tenant,
                peer,
                every_model: pool.serves_every_model(),
                // Only models some upstream serves (a model list restricts).
                served: |id: &str| {
                    pool.serving(Some(id), Endpoint::Chat.upstream_path())
                        .is_some()
                },
            };
            listed.filter(&body).unwrap_or(body)
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

/// How a model list is shown to a tenant.
struct Listed<'a, F> {
    tenant: &'a Tenant,
    /// The upstream that answered: its `model_map` names are shown as the
    /// clients' names.
    peer: &'a Peer,
    /// Some upstream serves any model: `served` filters nothing.
    every_model: bool,
    served: F,
}

impl<F: Fn(&str) -> bool> Listed<'_, F> {
    /// The list as the tenant sees it, or `None` when it needs no change
    /// (or is not a list).
    fn filter(&self, body: &[u8]) -> Option<Bytes> {
        let renames = self.peer.has_model_map();
        let restricted = !self.tenant.models.is_empty();
        if !renames && !restricted && self.every_model {
            return None;
        }
        let mut v: Value = serde_json::from_slice(body).ok()?;
        let data = v.get_mut("data")?.as_array_mut()?;
        let before = data.len();
        if renames {
            for m in data.iter_mut() {
                let client = m
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|id| self.peer.client_name(id));
                if let (Some(name), Some(obj)) = (client, m.as_object_mut()) {
                    obj.insert("id".into(), Value::String(name.to_string()));
                }
            }
        }
        data.retain(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| (self.served)(id) && (!restricted || self.tenant.allows(id)))
        });
        if !renames && data.len() == before {
            return None;
        }
        Some(Bytes::from(serde_json::to_vec(&v).ok()?))
    }
}
