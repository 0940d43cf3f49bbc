//! The relay: the response body that carries an upstream answer to the
//! client as it arrives. Polled by the client's connection, so a slow client
//! slows the upstream read (backpressure, no backlog) and a client that goes
//! away drops the upstream request — unless coalesced followers still read,
//! in which case the relay is handed to a task that finishes the call.
//!
//! Along the way it reads: SSE events are framed as zero-copy slices and
//! forwarded as they came (only the usage-only chunk is held back from a
//! client that did not ask for it); usage is extracted for metering; the
//! stream is assembled for the cache and published to followers. Timeouts
//! (first data event, idle gap) and the end of the shutdown grace are
//! enforced here; a stream that breaks ends with the SSE error event.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode};
use http_body::Body as _;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

use crate::cache::{End, Entry, Head, Key, Leader, FLIGHT_LOG_MAX};
use crate::error::{stream_error_event, GatewayError};
use crate::limit::Lease;
use crate::sse::{self, Assembler, EventData, Framer, Shape, Usage};
use crate::state::{App, Tenant};
use crate::upstream::UpstreamBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the relay tells the record when it is done.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelaySummary {
    pub usage: Option<Usage>,
    pub estimated: bool,
    pub first_event_at: Option<Instant>,
    /// How the body ended: "ok", "interrupted", "client_gone", "handed_off".
    pub outcome: &'static str,
}

/// Who pays for the tokens of this upstream call.
pub struct Meter {
    /// Settled with the answer's tokens once they are known; dropped (no
    /// tokens) when the answer is an error.
    pub lease: Option<Lease>,
    pub app: Arc<App>,
    pub tenant: Arc<Tenant>,
    pub model: Arc<str>,
    pub request_bytes: usize,
}

/// Where a complete answer goes besides the client.
#[derive(Default)]
pub struct Sink {
    /// Store the answer under this key once complete.
    pub store: Option<Key>,
    /// Publish to coalesced followers.
    pub leader: Option<Leader>,
}

enum Mode {
    /// Non-streaming (or an error response): bytes pass through untouched
    /// and are collected to read usage and fill the cache.
    Raw {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        /// A copy, not slices: slices would pin each upstream read buffer
        /// until the body ends.
        collected: BytesMut,
        /// Whether anyone reads `collected`: a 200 for its usage and the
        /// cache, an error answer only for coalesced followers.
        collecting: bool,
        overflow: bool,
        /// Upstream's content-length: hyper stops polling a body once that
        /// much went out, so the relay ends itself there.
        length: Option<u64>,
    },
    /// A 200 event stream.
    Sse {
        framer: Framer,
        assembler: Option<Assembler>,
        client_wants_usage: bool,
        done: bool,
        broken: bool,
        usage: Option<Usage>,
    },
}

pub struct Relay {
    upstream: UpstreamBody,
    mode: Mode,
    /// When the current wait (first event, or the gap since the last one)
    /// runs out.
    deadline: Instant,
    /// The timer and the grace watch are made on the first wait: an answer
    /// that arrives whole never registers either.
    timer: Option<Pin<Box<Sleep>>>,
    idle: Duration,
    grace: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    out: VecDeque<Bytes>,
    finished: bool,
    charged: bool,
    meter: Meter,
    sink: Sink,
    slot: Option<OwnedSemaphorePermit>,
    response_bytes: usize,
    summary: RelaySummary,
}

/// How a stream request wants its events.
pub struct StreamOpts {
    pub shape: Shape,
    pub client_wants_usage: bool,
    /// Deadline for the first data event (the first-byte timeout).
    pub first_event_deadline: Instant,
}

impl Relay {
    /// `stream`: `Some` for a 200 answer to a streaming request.
    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is a distinct part of the answer; a struct would only rename them"
    )]
    pub fn new(
        upstream: UpstreamBody,
        status: StatusCode,
        content_type: Option<HeaderValue>,
        stream: Option<StreamOpts>,
        idle: Duration,
        meter: Meter,
        sink: Sink,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Relay {
        let assembling = sink.store.is_some() || sink.leader.is_some();
        // Copied out of the upstream connection's read buffer, like the body.
        let content_type =
            content_type.map(|ct| HeaderValue::from_bytes(ct.as_bytes()).unwrap_or(ct));
        let (mode, deadline) = match stream {
            Some(opts) => {
                if let Some(l) = &sink.leader {
                    l.flight.set_head(Head::Stream);
                }
                (
                    Mode::Sse {
                        framer: Framer::default(),
                        assembler: assembling.then(|| Assembler::new(opts.shape)),
                        client_wants_usage: opts.client_wants_usage,
                        done: false,
                        broken: false,
                        usage: None,
                    },
                    opts.first_event_deadline,
                )
            }
            None => {
                if let Some(l) = &sink.leader {
                    l.flight.set_head(Head::Other);
                }
                (
                    Mode::Raw {
                        status,
                        content_type,
                        collected: BytesMut::new(),
                        collecting: status == StatusCode::OK || sink.leader.is_some(),
                        overflow: false,
                        length: upstream.size_hint().exact(),
                    },
                    Instant::now() + idle,
                )
            }
        };
        Relay {
            upstream,
            mode,
            deadline,
            timer: None,
            idle,
            grace: None,
            out: VecDeque::new(),
            finished: false,
            charged: false,
            meter,
            sink,
            slot,
            response_bytes: 0,
            summary: RelaySummary {
                outcome: "ok",
                ..RelaySummary::default()
            },
        }
    }

    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.on_data(data);
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream body broke");
                    if let Some(err) = self.fail() {
                        return Poll::Ready(Some(Err(err)));
                    }
                    continue;
                }
                Poll::Ready(None) => {
                    self.on_eof();
                    continue;
                }
                Poll::Pending => {
                    // `[DONE]` is the end of a stream even if upstream keeps
                    // the body open; had it ended, the poll above would have
                    // said so and the connection would go back to the pool.
                    if matches!(self.mode, Mode::Sse { done: true, .. }) {
                        self.on_eof();
                        continue;
                    }
                }
            }
            let deadline = tokio::time::Instant::from_std(self.deadline);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                tracing::warn!("upstream went quiet past its timeout");
                if let Some(err) = self.fail() {
                    return Poll::Ready(Some(Err(err)));
                }
                continue;
            }
            let app = &self.meter.app;
            let grace = self.grace.get_or_insert_with(|| {
                let mut over = app.lifecycle.grace_watch();
                Box::pin(async move {
                    if over.wait_for(|over| *over).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                })
            });
            if grace.as_mut().poll(cx).is_ready() {
                if let Some(err) = self.fail() {
                    return Poll::Ready(Some(Err(err)));
                }
                continue;
            }
            return Poll::Pending;
        }
    }

    fn touch(&mut self) {
        let now = Instant::now();
        self.summary.first_event_at.get_or_insert(now);
        self.deadline = now + self.idle;
    }

    fn on_data(&mut self, data: Bytes) {
        self.response_bytes += data.len();
        if matches!(self.mode, Mode::Raw { .. }) {
            self.touch();
            if let Mode::Raw {
                collected,
                collecting,
                overflow,
                ..
            } = &mut self.mode
            {
                if *collecting && !*overflow {
                    if collected.len() + data.len() > FLIGHT_LOG_MAX {
                        *overflow = true;
                        *collected = BytesMut::new();
                    } else {
                        collected.extend_from_slice(&data);
                    }
                }
            }
            self.out.push_back(data);
            if let Mode::Raw {
                length: Some(len), ..
            } = self.mode
            {
                if self.response_bytes as u64 >= len {
                    self.on_eof();
                }
            }
            return;
        }
        let mut events = Vec::new();
        let framed = match &mut self.mode {
            Mode::Sse { framer, .. } => framer.push(data, |ev| events.push(ev)),
            Mode::Raw { .. } => Ok(()),
        };
        for ev in events {
            if self.finished {
                return;
            }
            self.on_event(ev);
        }
        if framed.is_err() {
            tracing::warn!("upstream stream is not SSE");
            self.fail();
        }
    }

    fn on_event(&mut self, ev: Bytes) {
        let data = match sse::event_data(&ev) {
            EventData::None => {
                // Comments and blank lines: forwarded, but they are not data,
                // so they neither start the stream nor reset the idle clock.
                self.publish(&ev, false);
                self.out.push_back(ev);
                return;
            }
            EventData::Done => {
                if let Mode::Sse { done, .. } = &mut self.mode {
                    *done = true;
                }
                self.publish(&ev, false);
                self.out.push_back(ev);
                return;
            }
            EventData::Data(d) => d,
        };
        self.touch();
        let Mode::Sse {
            assembler,
            client_wants_usage,
            broken,
            usage,
            ..
        } = &mut self.mode
        else {
            return;
        };
        let info = match assembler {
            Some(a) => a.push(&data),
            None => sse::inspect(&data),
        };
        let info = match info {
            Ok(info) => info,
            Err(_) => {
                tracing::warn!("upstream sent an event that is not JSON");
                self.fail();
                return;
            }
        };
        if info.is_error {
            *broken = true;
        }
        if info.usage.is_some() {
            *usage = info.usage;
        }
        let forward = !info.usage_only || *client_wants_usage;
        self.publish(&ev, info.usage_only);
        if forward {
            self.out.push_back(ev);
        }
    }

    fn publish(&mut self, ev: &Bytes, usage_only: bool) {
        if let Some(leader) = &self.sink.leader {
            // A copy: the event is a slice of the upstream connection's read
            // buffer, and the log lives as long as the flight; holding slices
            // would pin one 8 KiB buffer per read.
            if !leader
                .flight
                .push_event(Bytes::copy_from_slice(ev), usage_only)
            {
                // Too long to keep for followers: stop taking new ones.
                leader.close();
            }
        }
    }

    fn on_eof(&mut self) {
        match &mut self.mode {
            Mode::Sse {
                done,
                broken,
                framer,
                ..
            } => {
                if !*done || *broken || !framer.pending().iter().all(u8::is_ascii_whitespace) {
                    tracing::warn!("upstream stream ended before [DONE]");
                    self.fail();
                    return;
                }
                let (usage, assembler) = match &mut self.mode {
                    Mode::Sse {
                        usage, assembler, ..
                    } => (*usage, assembler.take()),
                    Mode::Raw { .. } => (None, None),
                };
                self.finish_ok(usage);
                let entry = assembler.and_then(|a| Entry::from_assembled(&a.finish()));
                self.deliver(entry.map(Arc::new), None);
            }
            Mode::Raw {
                status,
                content_type,
                collected,
                overflow,
                ..
            } => {
                let status = *status;
                let content_type = content_type.clone();
                let body = if *overflow {
                    None
                } else {
                    Some(collected.split().freeze())
                };
                if status == StatusCode::OK {
                    // Parse once: into an entry when the cache or followers
                    // want one (its usage comes along), else just the usage.
                    let wanted = self.sink.store.is_some() || self.sink.leader.is_some();
                    let entry = if wanted {
                        body.clone().and_then(Entry::from_completion).map(Arc::new)
                    } else {
                        None
                    };
                    let usage = match &entry {
                        Some(e) => e.usage,
                        None => body.as_deref().and_then(sse::usage_of_completion),
                    };
                    self.finish_ok(usage);
                    self.deliver(entry, body.map(|b| (status, content_type, b)));
                } else {
                    self.finished = true;
                    self.slot = None;
                    // An error answer spends no tokens; its slot is free now.
                    self.meter.lease = None;
                    if let (Some(leader), Some(body)) = (self.sink.leader.take(), body) {
                        leader.end(End::Response {
                            status,
                            content_type,
                            body,
                        });
                    }
                }
            }
        }
    }

    fn finish_ok(&mut self, usage: Option<Usage>) {
        self.finished = true;
        self.slot = None;
        self.charge(usage);
    }

    /// Hands a complete answer to the cache and the followers.
    fn deliver(
        &mut self,
        entry: Option<Arc<Entry>>,
        raw: Option<(StatusCode, Option<HeaderValue>, Bytes)>,
    ) {
        if let (Some(key), Some(entry)) = (self.sink.store, &entry) {
            self.meter.app.cache.put(key, Arc::clone(entry));
        }
        if let Some(leader) = self.sink.leader.take() {
            match (entry, raw) {
                (Some(e), _) => leader.end(End::Done(e)),
                // A 200 that is not a completion: followers get it as it came.
                (None, Some((status, content_type, body))) => leader.end(End::Response {
                    status,
                    content_type,
                    body,
                }),
                (None, None) => leader.end(End::Error(GatewayError::StreamInterrupted)),
            }
        }
    }

    /// Ends a broken answer. A stream gets the SSE error event (and `None` is
    /// returned); a non-stream body is cut off, by returning an error for
    /// hyper to abort the connection with.
    fn fail(&mut self) -> Option<BoxError> {
        if self.finished {
            return None;
        }
        self.finished = true;
        self.slot = None;
        self.summary.outcome = "interrupted";
        self.charge_partial();
        self.meter.lease = None;
        // Leader dropped unended: followers get the interruption.
        self.sink.leader = None;
        match self.mode {
            Mode::Sse { .. } => {
                self.out.push_back(stream_error_event());
                None
            }
            Mode::Raw { .. } => Some("upstream body interrupted".into()),
        }
    }

    /// Charges an answer that did not complete: a 200 is billed upstream, so
    /// it is metered from the usage seen so far (streams) or an estimate;
    /// error answers cost nothing.
    fn charge_partial(&mut self) {
        match &self.mode {
            Mode::Sse { usage, .. } => self.charge(*usage),
            Mode::Raw { status, .. } if *status == StatusCode::OK => self.charge(None),
            Mode::Raw { .. } => {}
        }
    }

    /// Debits the tenant and records tokens, once: from upstream's usage, or
    /// an estimate when it never arrived.
    fn charge(&mut self, usage: Option<Usage>) {
        if self.charged {
            return;
        }
        self.charged = true;
        let (u, estimated) = match usage {
            Some(u) => (u, false),
            None => (
                Usage::estimate(self.meter.request_bytes, self.response_bytes),
                true,
            ),
        };
        let m = &self.meter;
        let snapshot = m.app.snapshot.load();
        let price = snapshot.price(&m.model);
        if let Some(lease) = self.meter.lease.take() {
            lease.settle(u.billable(), price.map_or(0.0, |p| u.cost_usd(p)));
        }
        let m = &self.meter;
        let handles = m.tenant.usage(&m.model, &m.app.metrics);
        handles.record(&u, price);
        if estimated {
            handles.estimated.inc();
        }
        self.summary.usage = Some(u);
        self.summary.estimated = estimated;
    }

    /// Called when the client's body is dropped. If the answer is not
    /// finished and followers are reading it, a task finishes the upstream
    /// call for them; otherwise the upstream request is cancelled here and
    /// metered by estimate.
    pub fn release(mut self: Box<Self>) -> RelaySummary {
        if self.finished {
            return self.summary;
        }
        let handoff = self.sink.leader.as_ref().is_some_and(Leader::has_followers);
        if handoff {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let mut summary = self.summary;
                summary.outcome = "handed_off";
                rt.spawn(async move {
                    let mut relay = self;
                    relay.out.clear();
                    while let Some(Ok(_)) = std::future::poll_fn(|cx| relay.poll(cx)).await {
                        relay.out.clear();
                    }
                });
                return summary;
            }
        }
        self.finished = true;
        self.slot = None;
        self.summary.outcome = "client_gone";
        self.charge_partial();
        self.meter.lease = None;
        self.summary
    }
}
