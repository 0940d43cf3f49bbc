//! The response body type, and the `Record` every response carries. A body
//! is whole bytes (errors, cache hits), a list of frames (SSE replay), the
//! upstream relay (a flight's leader's in its `LeadBody`), or a reader of a
//! flight's log (coalesced followers). The record rides in
//! the body, so when hyper drops the body — sent in full, or the client gone —
//! the request is metered and logged exactly once, whatever path it took.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::limit::Lease;
use crate::relay::{BoxError, LeadBody, LogBody, Relay, RelaySummary};
use crate::sse::Usage;
use crate::state::{App, Tenant};
use bytes::Bytes;
use http_body::{Frame, SizeHint};

pub struct Body {
    kind: Kind,
    record: Option<Box<Record>>,
    /// The error that aborts the response, held back for one poll so hyper
    /// first writes out what came before it (the SSE error event).
    failing: Option<BoxError>,
    /// The first frame (or the end), polled before hyper got the response
    /// (`prime`).
    held: Option<Option<Result<Bytes, BoxError>>>,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Frames(VecDeque<Bytes>),
    Relay(Box<Relay>),
    Lead(LeadBody),
    Log(LogBody),
}

impl Body {
    fn of(kind: Kind) -> Body {
        Body {
            kind,
            record: None,
            failing: None,
            held: None,
        }
    }
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::of(Kind::Full(Some(b.into())))
    }
    pub fn frames(frames: impl IntoIterator<Item = Bytes>) -> Body {
        Body::of(Kind::Frames(frames.into_iter().collect()))
    }
    pub fn relay(r: Relay) -> Body {
        Body::of(Kind::Relay(Box::new(r)))
    }
    pub fn lead(l: LeadBody) -> Body {
        Body::of(Kind::Lead(l))
    }
    pub fn log(l: LogBody) -> Body {
        Body::of(Kind::Log(l))
    }
    pub fn set_record(&mut self, record: Box<Record>) {
        self.record = Some(record);
    }
    fn first_byte(&mut self) {
        if let Some(r) = &mut self.record {
            r.first_byte.get_or_insert_with(Instant::now);
        }
    }
}

impl Body {
    /// Waits until the body has its first frame, or its end, and holds it
    /// for hyper's first poll. hyper writes a response's head at once and
    /// its body when the body has data: a non-streaming answer primed so
    /// leaves in one write with its head instead of two, and its
    /// connection is woken once instead of twice.
    pub async fn prime(&mut self) {
        let first = std::future::poll_fn(|cx| self.poll_kind(cx)).await;
        self.held = Some(first);
    }

    fn poll_kind(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(Ok)),
            Kind::Frames(q) => Poll::Ready(q.pop_front().map(Ok)),
            Kind::Log(l) => {
                let polled = l.poll(cx);
                if let Poll::Ready(Some(Ok(_))) = &polled {
                    self.first_byte();
                }
                polled
            }
            // The relay keeps its own time of first data event; the record
            // takes it when the body is dropped.
            Kind::Relay(r) => r.poll(cx),
            Kind::Lead(l) => l.poll(cx),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(e) = this.failing.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let polled = match this.held.take() {
            Some(first) => Poll::Ready(first),
            None => this.poll_kind(cx),
        };
        let next = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Err(e))) => {
                // An abort (HTTP/1.1: no final chunk; HTTP/2: RST_STREAM)
                // would discard what hyper has not written yet: yield once
                // so it is flushed first.
                this.failing = Some(e);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Some(Ok(b))) => Some(b),
            Poll::Ready(None) => None,
        };
        match next {
            Some(b) => {
                if matches!(this.kind, Kind::Full(_) | Kind::Frames(_)) {
                    this.first_byte();
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.held.is_some() {
            return false;
        }
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Frames(q) => q.is_empty(),
            Kind::Relay(_) | Kind::Lead(_) | Kind::Log(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Frames(q) => SizeHint::with_exact(q.iter().map(|b| b.len() as u64).sum()),
            Kind::Relay(_) | Kind::Lead(_) | Kind::Log(_) => SizeHint::default(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let summary = match std::mem::replace(&mut self.kind, Kind::Empty) {
            Kind::Relay(relay) => (*relay).release(None),
            Kind::Lead(lead) => lead.release(),
            Kind::Empty | Kind::Full(_) | Kind::Frames(_) | Kind::Log(_) => return,
        };
        if let Some(rec) = &mut self.record {
            rec.absorb(summary);
        }
    }
}

/// One request's facts, filled in along the request path and written out
/// (metrics and the access-log line) when the response body is dropped.
pub struct Record {
    app: Arc<App>,
    pub request_id: http::HeaderValue,
    pub start: Instant,
    pub tenant: Option<Arc<Tenant>>,
    pub model: Option<Arc<str>>,
    pub endpoint: &'static str,
    pub stream: bool,
    pub status: u16,
    pub cache: &'static str,
    pub upstream_status: Option<u16>,
    pub usage: Option<Usage>,
    /// Tokens answered without going upstream (hits, coalesced).
    pub saved: Option<Usage>,
    pub estimated: bool,
    pub first_byte: Option<Instant>,
    pub outcome: &'static str,
    pub error: Option<&'static str>,
    /// Held until settled: by the relay with the answer's tokens, or here,
    /// with none, when the request ends without going upstream.
    pub lease: Option<Lease>,
    inflight: bool,
}

impl Record {
    pub fn new(app: Arc<App>, request_id: http::HeaderValue, start: Instant) -> Record {
        Record {
            app,
            request_id,
            start,
            tenant: None,
            model: None,
            endpoint: "other",
            stream: false,
            status: 0,
            cache: "none",
            upstream_status: None,
            usage: None,
            saved: None,
            estimated: false,
            first_byte: None,
            outcome: "ok",
            error: None,
            lease: None,
            inflight: false,
        }
    }

    /// Counts the request in `sluice_inflight_requests` until it is logged.
    pub fn set_tenant(&mut self, tenant: Arc<Tenant>) {
        tenant.inflight.inc();
        self.inflight = true;
        self.tenant = Some(tenant);
    }

    fn absorb(&mut self, s: RelaySummary) {
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
        let m = &self.app.metrics;
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
        let handles = self.tenant.as_ref().map(|t| t.usage(model, m));
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
            (self.endpoint != "other").then_some(elapsed.as_secs_f64()),
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
            endpoint = self.endpoint,
            status = self.status,
            cache = self.cache,
            stream = self.stream,
            prompt_tokens = usage.prompt,
            completion_tokens = usage.completion,
            usage_estimated = self.estimated,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            ttft_ms = ttft.map(|t| t.as_secs_f64() * 1000.0),
            upstream_status = self.upstream_status,
            outcome = self.outcome,
            error = self.error,
            "request"
        );
    }
}
