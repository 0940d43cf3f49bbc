//! The response body type, and the `Record` every response carries. A body
//! is whole bytes (errors, cache hits), a list of frames (SSE replay), the
//! upstream relay (a flight's leader's in its `LeadBody`), or a reader of a
//! flight's log (coalesced followers). The record rides in
//! the body, so when hyper drops the body — sent in full, or the client gone —
//! the request is metered and logged exactly once, whatever path it took.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;

use crate::response::lead::LeadBody;
use crate::response::log::LogBody;
use crate::response::record::Record;
use crate::response::relay::Relay;
use crate::response::BoxError;
use http_body::{Frame, SizeHint};

pub struct Body {
    kind: Kind,
    record: Option<Box<Record>>,
    /// The error that aborts the response, held back for one poll so hyper
    /// first writes out what came before it (the SSE error event).
    failing: Option<BoxError>,
    /// The first frame (or the end), polled before hyper got the response
    /// (`prime`).
    held: Option<Primed>,
}

/// What `prime` polled: the first frame, or the end (`None`).
struct Primed(Option<Result<Bytes, BoxError>>);

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
    pub(crate) fn full(b: impl Into<Bytes>) -> Body {
        Body::of(Kind::Full(Some(b.into())))
    }
    pub(crate) fn frames(frames: impl IntoIterator<Item = Bytes>) -> Body {
        Body::of(Kind::Frames(frames.into_iter().collect()))
    }
    pub(crate) fn relay(r: Relay) -> Body {
        Body::of(Kind::Relay(Box::new(r)))
    }
    pub(crate) fn lead(l: LeadBody) -> Body {
        Body::of(Kind::Lead(l))
    }
    pub(crate) fn log(l: LogBody) -> Body {
        Body::of(Kind::Log(l))
    }
    pub(crate) fn set_record(&mut self, record: Box<Record>) {
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
    pub(crate) async fn prime(&mut self) {
        let first = std::future::poll_fn(|cx| self.poll_kind(cx)).await;
        self.held = Some(Primed(first));
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
            Some(Primed(first)) => Poll::Ready(first),
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
