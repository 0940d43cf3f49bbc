//! The `Record` every response carries: one request's facts, filled in
//! along the request path and written out (metrics and the one access-log
//! line) when the response body is dropped — sent in full, or the client
//! gone — so a request is metered and logged exactly once, whatever path it
//! took.

use std::sync::Arc;
use std::time::Instant;

use crate::api::usage::Usage;
use crate::api::{CacheState, Endpoint};
use crate::limit::Lease;
use crate::metrics::Metrics;
use crate::tenant::Tenant;

/// What the relay tells the record when it is done.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RelaySummary {
    pub(crate) usage: Option<Usage>,
    pub(crate) estimated: bool,
    pub(crate) first_event_at: Option<Instant>,
    pub(crate) outcome: Outcome,
}

/// How a response body ended, for the access log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Sent in full.
    #[default]
    Ok,
    /// The answer broke after bytes went out.
    Interrupted,
    /// The client left before the end.
    ClientGone,
    /// The client left; the call goes on for a flight's other readers.
    HandedOff,
}

impl Outcome {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Interrupted => "interrupted",
            Outcome::ClientGone => "client_gone",
            Outcome::HandedOff => "handed_off",
        }
    }
}

/// One request's facts, filled in along the request path and written out
/// (metrics and the access-log line) when the response body is dropped.
pub(crate) struct Record {
    metrics: Arc<Metrics>,
    pub(crate) request_id: http::HeaderValue,
    pub(crate) start: Instant,
    pub(crate) tenant: Option<Arc<Tenant>>,
    pub(crate) model: Option<Arc<str>>,
    /// `None` until routed.
    pub(crate) endpoint: Option<Endpoint>,
    pub(crate) stream: bool,
    pub(crate) status: u16,
    /// `None` until the request reaches the cache step.
    pub(crate) cache: Option<CacheState>,
    /// The upstream of the last attempt.
    pub(crate) upstream: Option<http::HeaderValue>,
    pub(crate) upstream_status: Option<u16>,
    pub(crate) usage: Option<Usage>,
    /// Tokens answered without going upstream (hits, coalesced).
    pub(crate) saved: Option<Usage>,
    pub(crate) estimated: bool,
    pub(crate) first_byte: Option<Instant>,
    pub(crate) outcome: Outcome,
    pub(crate) error: Option<&'static str>,
    /// Held until settled: by the relay with the answer's tokens, or here,
    /// with none, when the request ends without going upstream.
    pub(crate) lease: Option<Lease>,
    inflight: bool,
}

impl Record {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        request_id: http::HeaderValue,
        start: Instant,
    ) -> Record {
        Record {
            metrics,
            request_id,
            start,
            tenant: None,
            model: None,
            endpoint: None,
            stream: false,
            status: 0,
            cache: None,
            upstream: None,
            upstream_status: None,
            usage: None,
            saved: None,
            estimated: false,
            first_byte: None,
            outcome: Outcome::Ok,
            error: None,
            lease: None,
            inflight: false,
        }
    }

    /// Counts the request in `sluice_inflight_requests` until it is logged.
    pub(crate) fn set_tenant(&mut self, tenant: Arc<Tenant>) {
        tenant.inflight.inc();
        self.inflight = true;
        self.tenant = Some(tenant);
    }

    pub(crate) fn absorb(&mut self, s: RelaySummary) {
        if s.usage.is_some() {
            self.usage = s.usage;
        }
        self.estimated |= s.estimated;
        if self.first_byte.is_none() {
            self.first_byte = s.first_event_at;
        }
        self.outcome = s.outcome;
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let m = &*self.metrics;
        let tenant = self.tenant.as_ref().map_or("unknown", |t| &t.name);
        let model = self.model.as_deref().unwrap_or(crate::metrics::OTHER);
        // StatusCode::as_str is a static table: no formatting per request.
        let code = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let status = code.as_str();
        let elapsed = self.start.elapsed();
        let ttft = self
            .first_byte
            .map(|t| t.saturating_duration_since(self.start));
        let handles = self.tenant.as_ref().map(|t| t.usage(model));
        m.observe_request(
            handles.as_deref().map(|h| &h.requests),
            &crate::metrics::RequestLabels {
                tenant,
                model,
                endpoint: self.endpoint,
                status,
                cache: self.cache,
                stream: self.stream,
            },
            self.endpoint.map(|_| elapsed.as_secs_f64()),
            ttft.filter(|_| self.status == 200 && self.model.is_some())
                .map(|t| t.as_secs_f64()),
        );
        if let (Some(saved), Some(h)) = (&self.saved, &handles) {
            h.saved.inc_by(saved.total);
        }
        if self.inflight {
            if let Some(t) = &self.tenant {
                t.inflight.dec();
            }
        }
        let usage = self.usage.unwrap_or_default();
        // The one access-log line. Keys, prompts and completions never appear.
        tracing::info!(
            target: "sluice::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            tenant,
            model,
            endpoint = self.endpoint.map_or(crate::metrics::OTHER, Endpoint::label),
            status = self.status,
            cache = self.cache.map_or("none", CacheState::label),
            stream = self.stream,
            prompt_tokens = usage.prompt,
            completion_tokens = usage.completion,
            usage_estimated = self.estimated,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            ttft_ms = ttft.map(|t| t.as_secs_f64() * 1000.0),
            upstream = self.upstream.as_ref().and_then(|u| u.to_str().ok()),
            upstream_status = self.upstream_status,
            outcome = self.outcome.label(),
            error = self.error,
            "request"
        );
    }
}
