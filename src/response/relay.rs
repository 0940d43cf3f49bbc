//! The relay: the response body that carries an upstream answer to the
//! client as it arrives. Polled by the client's connection, so a slow client
//! slows the upstream read (backpressure, no backlog) and a client that goes
//! away drops the upstream request — unless coalesced readers still read.
//!
//! Along the way it reads: SSE events are framed as zero-copy slices and
//! forwarded as they came (only the usage-only chunk is held back from a
//! client that did not ask for it); usage is extracted for metering; the
//! stream is assembled for the cache and published to followers. Timeouts
//! (first data event, idle gap) and the end of the shutdown grace are
//! enforced here; a stream that breaks ends with the SSE error event, and
//! then the response is aborted, not ended cleanly.
//!
//! A flight's leader (a cacheable miss) is relayed in place, like any other
//! answer, until a follower attaches: then the relay moves into a task of its
//! own that reads upstream at upstream's pace (`Lead`, `drive`), and every
//! client — the leader's too — reads the flight's bounded log at its own pace
//! (`LogBody`). The call survives its leader's client leaving at any point
//! (`Launch` before the response headers, `Relay::release` after) while a
//! reader remains, and is cancelled when none does.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode};
use http_body::Body as _;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::api::openai::Shape;
use crate::api::sse::{self, EventData, Framer};
use crate::api::usage::Usage;
use crate::api::{Format, StreamAssembler, StreamReader};
use crate::cache::tiered::Fill;
use crate::cache::Entry;
use crate::config::Pricing;
use crate::flight::{End, Flight, Head, Leader, Mark, Reader, FLIGHT_LOG_MAX};
use crate::http::error::{stream_error_event, GatewayError};
use crate::limit::Lease;
use crate::metrics::Tokens;
use crate::response::log::LogOpts;
use crate::response::record::{Outcome, RelaySummary};
use crate::response::BoxError;
use crate::tenant::Tenant;
use crate::upstream::fair::Slot;
use crate::upstream::health::{Health, Verdict};
use crate::upstream::{Sent, UpstreamBody};

/// Who pays for the tokens of this upstream call, and at what price.
pub(crate) struct Meter {
    /// Settled with the answer's tokens once they are known; dropped (no
    /// tokens) when the answer is an error.
    pub(crate) lease: Option<Lease>,
    pub(crate) tenant: Arc<Tenant>,
    /// The model's label (bounded), for the usage metrics.
    pub(crate) model: Arc<str>,
    /// The model's price, when it has one.
    pub(crate) price: Option<Pricing>,
    /// Characters of the request's messages or prompt, for the estimate.
    pub(crate) prompt_chars: u64,
    /// Whether the answer spends tokens and budget.
    pub(crate) billing: Billing,
}

/// Whether an answer is metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Billing {
    /// A completion or a message: its usage (or estimate) is charged.
    Usage,
    /// A token count: it spends nothing, and holds its concurrency slot
    /// only until it is done.
    Free,
}

/// Where a complete answer goes besides the client.
#[derive(Default)]
pub(crate) struct Sink {
    /// The cache's fill for this answer: it is stored once complete.
    pub(crate) fill: Option<Fill>,
    /// Publish to coalesced followers.
    pub(crate) leader: Option<Leader>,
}

/// A non-streaming answer's bytes as they come. Most answers are one read:
/// that one is kept as the `Bytes` it came in (no copy) until a second
/// comes; from then on they are copied into one buffer, so that no slice
/// pins an upstream read buffer while the rest of a long answer arrives.
#[derive(Default)]
enum Collected {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Collected {
    fn len(&self) -> usize {
        match self {
            Collected::Empty => 0,
            Collected::One(b) => b.len(),
            Collected::Many(b) => b.len(),
        }
    }

    fn push(&mut self, data: &Bytes) {
        *self = match std::mem::take(self) {
            Collected::Empty => Collected::One(data.clone()),
            Collected::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + data.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(data);
                Collected::Many(all)
            }
            Collected::Many(mut all) => {
                all.extend_from_slice(data);
                Collected::Many(all)
            }
        };
    }

    /// The whole answer. `keep`: it outlives the relay (a cache entry,
    /// followers), so a single read is copied out of the buffer it pins.
    fn take(&mut self, keep: bool) -> Bytes {
        match std::mem::take(self) {
            Collected::Empty => Bytes::new(),
            Collected::One(b) if keep => Bytes::copy_from_slice(&b),
            Collected::One(b) => b,
            Collected::Many(all) => all.freeze(),
        }
    }
}

enum Mode {
    /// Non-streaming (or an error response): bytes pass through untouched
    /// and are collected to read usage and fill the cache.
    Raw {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        collected: Collected,
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
        /// Reads events when they are not assembled.
        reader: StreamReader,
        assembler: Option<StreamAssembler>,
        client_wants_usage: bool,
        /// The stream's end arrived (`[DONE]`, `message_stop`, Anthropic's
        /// `error`): it is complete, nothing follows.
        done: bool,
        /// Upstream sent an error event.
        broken: bool,
        usage: Option<Usage>,
        /// `usage` holds the prompt but not yet the answer's count.
        usage_partial: bool,
    },
}

pub(crate) struct Relay {
    upstream: UpstreamBody,
    /// The API format of the answer: how it is read, stored and broken off.
    format: Format,
    mode: Mode,
    /// When the current wait (first event, or the gap since the last one)
    /// runs out.
    deadline: Instant,
    /// The timer and the grace watch are made on the first wait: an answer
    /// that arrives whole never registers either.
    timer: Option<Pin<Box<Sleep>>>,
    idle: Duration,
    /// The shutdown grace's watch, until the first wait turns it into
    /// `grace`.
    grace_watch: Option<watch::Receiver<bool>>,
    grace: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// What the client gets next, each with the number of the flight's log
    /// entry a reader resumes at if it has not been sent yet.
    out: VecDeque<(Bytes, usize)>,
    finished: bool,
    /// The answer broke after bytes went out: once `out` is sent, the
    /// response is aborted rather than ended.
    abort: bool,
    /// Driven by a task for the flight's readers: nothing is queued for a
    /// client, and body pieces go to the log.
    detached: bool,
    charged: bool,
    meter: Meter,
    sink: Sink,
    slot: Option<Slot>,
    /// The upstream's health: a stream whose first event never comes
    /// counts against it, as a first-byte timeout does.
    health: Option<Arc<Health>>,
    /// A data event arrived (a keep-alive is none).
    seen_data: bool,
    response_bytes: usize,
    /// Characters of generated text relayed, for the usage estimate.
    completion_chars: u64,
    summary: RelaySummary,
}

/// How a stream request wants its events.
pub(crate) struct StreamOpts {
    pub(crate) shape: Shape,
    pub(crate) client_wants_usage: bool,
}

/// Everything the relay of one upstream call needs but its response: made
/// before the call goes out, so a call that outlives its client (a flight's
/// leader) can still be relayed for the followers.
pub(crate) struct Plan {
    /// The API format of the request (and so of its answer).
    pub(crate) format: Format,
    /// `Some` for a streaming request.
    pub(crate) stream: Option<StreamOpts>,
    /// Deadline for the first data event (the first-byte timeout).
    pub(crate) first_event_deadline: Instant,
    pub(crate) idle: Duration,
    /// Flips to true when the shutdown grace is over: the answer ends.
    pub(crate) grace: watch::Receiver<bool>,
    pub(crate) meter: Meter,
    pub(crate) sink: Sink,
}

/// The parts of an upstream answer the relay reads.
pub(crate) struct Answer {
    pub(crate) body: UpstreamBody,
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<HeaderValue>,
    /// The upstream concurrency slot the call holds until it is done.
    pub(crate) slot: Option<Slot>,
    pub(crate) health: Option<Arc<Health>>,
}

impl Answer {
    /// An upstream call's answer, its headers left to the caller.
    pub(crate) fn of(sent: Sent) -> (http::response::Parts, Answer) {
        let (parts, body) = sent.response.into_parts();
        let answer = Answer {
            body,
            status: parts.status,
            content_type: parts.headers.get(http::header::CONTENT_TYPE).cloned(),
            slot: sent.slot,
            health: sent.health,
        };
        (parts, answer)
    }
}

impl Plan {
    /// The relay of the answer that arrived for this plan.
    pub(crate) fn relay(self, answer: Answer) -> Relay {
        let Plan {
            format,
            stream,
            first_event_deadline,
            idle,
            grace,
            meter,
            mut sink,
        } = self;
        let Answer {
            body: upstream,
            status,
            content_type,
            slot,
            health,
        } = answer;
        if status != StatusCode::OK {
            sink.fill = None;
        }
        // `Some` for a 200 answer to a streaming request.
        let stream = stream.filter(|_| status == StatusCode::OK);
        let assembling = sink.fill.is_some() || sink.leader.is_some();
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
                        reader: format.reader(),
                        assembler: assembling.then(|| format.assembler(opts.shape)),
                        client_wants_usage: opts.client_wants_usage,
                        done: false,
                        broken: false,
                        usage: None,
                        usage_partial: false,
                    },
                    first_event_deadline,
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
                        collected: Collected::default(),
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
            format,
            mode,
            deadline,
            timer: None,
            idle,
            grace_watch: Some(grace),
            grace: None,
            out: VecDeque::new(),
            finished: false,
            abort: false,
            detached: false,
            charged: false,
            meter,
            sink,
            slot,
            health,
            seen_data: false,
            response_bytes: 0,
            completion_chars: 0,
            summary: RelaySummary {
                outcome: Outcome::Ok,
                ..RelaySummary::default()
            },
        }
    }
}

impl Relay {
    /// Whether this relay publishes to a flight.
    pub(crate) fn leads(&self) -> bool {
        self.sink.leader.is_some()
    }

    /// The flight this relay publishes to.
    pub(super) fn flight(&self) -> Option<Arc<Flight>> {
        self.sink.leader.as_ref().map(|l| Arc::clone(&l.flight))
    }

    /// Runs the relay for its flight's readers only: nothing is queued for
    /// a client (its client is gone, or reads the log).
    pub(super) fn for_readers(mut self) -> Relay {
        self.detached = true;
        self
    }

    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        loop {
            if let Some((b, _)) = self.out.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if self.finished {
                if std::mem::take(&mut self.abort) {
                    return Poll::Ready(Some(Err("upstream stream interrupted".into())));
                }
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
                    self.fail();
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
                if !self.seen_data && matches!(self.mode, Mode::Sse { .. }) {
                    // The first-byte timeout of a stream.
                    if let Some(h) = &self.health {
                        h.observe(Verdict::Failed);
                    }
                }
                self.fail();
                continue;
            }
            let watch = &mut self.grace_watch;
            let grace = self.grace.get_or_insert_with(|| {
                let mut over = watch.take();
                Box::pin(async move {
                    let ended = match &mut over {
                        Some(over) => over.wait_for(|over| *over).await.is_ok(),
                        None => false,
                    };
                    if !ended {
                        std::future::pending::<()>().await;
                    }
                })
            });
            if grace.as_mut().poll(cx).is_ready() {
                self.fail();
                continue;
            }
            return Poll::Pending;
        }
    }

    /// A data event arrived: the idle clock starts again; the first event
    /// that carries generated content is the first token.
    fn touch(&mut self, token: bool) {
        let now = Instant::now();
        if token {
            self.summary.first_event_at.get_or_insert(now);
        }
        self.seen_data = true;
        self.deadline = now + self.idle;
    }

    /// Queues bytes for the client (none once the relay runs for readers).
    fn emit(&mut self, b: Bytes, resume: usize) {
        if !self.detached {
            self.out.push_back((b, resume));
        }
    }

    fn on_data(&mut self, data: Bytes) {
        self.response_bytes += data.len();
        if matches!(self.mode, Mode::Raw { .. }) {
            // A token count generates nothing: no time to first token.
            self.touch(self.meter.billing == Billing::Usage);
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
                        *collected = Collected::default();
                    } else {
                        collected.push(&data);
                    }
                }
            }
            if self.detached {
                // The leader's client reads the body from the log now.
                self.publish(&data, Mark::Event);
            } else {
                self.out.push_back((data, 0));
            }
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
            // Nothing follows the stream's end.
            if self.finished || matches!(self.mode, Mode::Sse { done: true, .. }) {
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
                let at = self.publish(&ev, Mark::Event);
                self.emit(ev, at);
                return;
            }
            EventData::Done => {
                let mut seen = None;
                if let Mode::Sse { done, usage, .. } = &mut self.mode {
                    *done = true;
                    seen = *usage;
                }
                // Charged before `[DONE]` reaches the client: a request it
                // sends next sees the charge (docs/budgets.md).
                self.charge(seen);
                let at = self.publish(&ev, Mark::Done);
                self.emit(ev, at);
                return;
            }
            EventData::Data(d) => d,
        };
        let Mode::Sse {
            reader, assembler, ..
        } = &mut self.mode
        else {
            return;
        };
        let info = match assembler {
            Some(a) => a.push(&data),
            None => reader.read(&data),
        };
        let info = match info {
            Ok(info) => info,
            Err(_) => {
                tracing::warn!("upstream sent an event that is not JSON");
                self.fail();
                return;
            }
        };
        if info.keepalive {
            // Anthropic's `ping`: forwarded; like an SSE comment it does
            // not start the stream (the first-byte timeout runs on), but
            // once the stream runs it is an event and resets the idle clock.
            if self.seen_data {
                self.deadline = Instant::now() + self.idle;
            }
            let at = self.publish(&ev, Mark::Event);
            self.emit(ev, at);
            return;
        }
        self.touch(info.token);
        let Mode::Sse {
            client_wants_usage,
            broken,
            usage,
            usage_partial,
            done,
            ..
        } = &mut self.mode
        else {
            return;
        };
        if info.is_error {
            *broken = true;
        }
        if info.usage.is_some() {
            *usage = info.usage;
            *usage_partial = info.usage_partial;
        }
        self.completion_chars += info.text_chars;
        if info.ends {
            *done = true;
            let seen = *usage;
            // Charged before the end reaches the client, as for `[DONE]`.
            self.charge(seen);
            let at = self.publish(&ev, Mark::Done);
            self.emit(ev, at);
            return;
        }
        let forward = !info.usage_only || *client_wants_usage;
        let at = self.publish(
            &ev,
            if info.usage_only {
                Mark::UsageOnly
            } else {
                Mark::Event
            },
        );
        if forward {
            self.emit(ev, at);
        }
    }

    /// Logs an entry for the flight's readers; returns its number (0 without
    /// a flight).
    fn publish(&mut self, ev: &Bytes, mark: Mark) -> usize {
        let Some(leader) = &self.sink.leader else {
            return 0;
        };
        // A copy: the event is a slice of the upstream connection's read
        // buffer, and the log lives as long as the flight; holding slices
        // would pin one 8 KiB buffer per read.
        let logged = leader.flight.push_event(Bytes::copy_from_slice(ev), mark);
        if logged.just_trimmed {
            // The first events left the log: a new follower could not start.
            leader.close();
        }
        logged.at
    }

    fn on_eof(&mut self) {
        match &mut self.mode {
            Mode::Sse {
                done,
                broken,
                framer,
                ..
            } => {
                if !*done {
                    tracing::warn!("upstream stream ended before its end event");
                    self.fail();
                    return;
                }
                let clean = !*broken && framer.pending().iter().all(u8::is_ascii_whitespace);
                let (usage, assembler) = match &mut self.mode {
                    Mode::Sse {
                        usage, assembler, ..
                    } => (*usage, assembler.take()),
                    Mode::Raw { .. } => (None, None),
                };
                self.finish_ok(usage);
                // An upstream error event before the end went to the client
                // as it came, and the stream is over; it is not cached.
                let format = self.format;
                let entry = assembler
                    .filter(|a| clean && a.is_whole())
                    .and_then(|a| Entry::from_assembled(&a.finish(), format));
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
                // Kept past this call (a cache entry, followers): compact.
                let wanted = self.sink.fill.is_some() || self.sink.leader.is_some();
                let body = if *overflow {
                    None
                } else {
                    Some(collected.take(wanted || status != StatusCode::OK))
                };
                if status == StatusCode::OK {
                    // Parse once: into an entry when the cache or followers
                    // want one (its usage comes along), else just the usage.
                    let format = self.format;
                    let entry = if wanted {
                        body.clone()
                            .and_then(|b| Entry::from_completion(b, format))
                            .map(Arc::new)
                    } else {
                        None
                    };
                    let usage = match &entry {
                        Some(e) => e.usage,
                        None => body.as_deref().and_then(|b| format.usage_of_answer(b)),
                    };
                    if usage.is_none() {
                        self.completion_chars =
                            body.as_deref().map_or(0, |b| format.answer_text_chars(b));
                    }
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
        if let (Some(fill), Some(entry)) = (self.sink.fill.take(), &entry) {
            fill.store(Arc::clone(entry));
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

    /// Ends a broken answer. A stream gets the SSE error event and is then
    /// aborted; a non-stream body is cut off (aborted at once). A stream
    /// that already had its `[DONE]` is complete: nothing is added.
    fn fail(&mut self) {
        if self.finished {
            return;
        }
        if matches!(self.mode, Mode::Sse { done: true, .. }) {
            self.on_eof();
            return;
        }
        self.finished = true;
        self.abort = true;
        self.slot = None;
        self.summary.outcome = Outcome::Interrupted;
        self.charge_partial();
        self.meter.lease = None;
        // Leader dropped unended: followers get the interruption.
        self.sink.leader = None;
        if matches!(self.mode, Mode::Sse { .. }) {
            self.emit(stream_error_event(self.format), 0);
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
        if self.meter.billing == Billing::Free {
            self.meter.lease = None;
            return;
        }
        let partial = matches!(
            self.mode,
            Mode::Sse {
                usage_partial: true,
                ..
            }
        );
        let (u, estimated) = match usage {
            // The prompt as reported; the answer's tokens never were: they
            // are estimated from the text relayed.
            Some(mut u) if partial => {
                u.completion = Usage::estimate(0, self.completion_chars).completion;
                u.total = u.prompt + u.completion;
                (u, true)
            }
            Some(u) => (u, false),
            None => (
                Usage::estimate(self.meter.prompt_chars, self.completion_chars),
                true,
            ),
        };
        // Priced once: the same cost is charged to the budget and counted.
        let cost = self.meter.price.as_ref().map(|p| cost_usd(&u, p));
        if let Some(lease) = self.meter.lease.take() {
            lease.settle(u.billable(), cost.unwrap_or(0.0));
        }
        let m = &self.meter;
        let handles = m.tenant.usage(&m.model);
        handles.record(
            &Tokens {
                prompt: u.prompt,
                completion: u.completion,
                prompt_cache_hit: u.prompt_cache_hit,
                prompt_cache_miss: u.prompt_cache_miss,
                reasoning: u.reasoning,
            },
            cost,
        );
        if estimated {
            handles.estimated.inc();
        }
        self.summary.usage = Some(u);
        self.summary.estimated = estimated;
    }

    /// Cancels the upstream call: nobody reads the answer any more.
    fn cancel(&mut self) {
        self.finished = true;
        self.slot = None;
        self.summary.outcome = Outcome::ClientGone;
        self.charge_partial();
        self.meter.lease = None;
        self.sink.leader = None;
    }

    /// Called when the client's body is dropped. If the answer is not
    /// finished and readers of its flight remain, a task finishes the
    /// upstream call for them; otherwise the upstream request is cancelled
    /// here and metered by estimate.
    pub(crate) fn release(mut self, slot: Option<SummarySlot>) -> RelaySummary {
        if self.finished {
            return self.summary;
        }
        let keep = self.sink.leader.as_ref().is_some_and(|l| !l.abandon());
        if keep {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let mut summary = self.summary;
                summary.outcome = Outcome::HandedOff;
                self.out.clear();
                self.detached = true;
                rt.spawn(drive(self, slot));
                return summary;
            }
        }
        self.cancel();
        self.summary
    }

    /// Moves the relay off the leader's connection: the leader's client
    /// gets a reader that resumes in the log where its client is, and from
    /// now on the relay queues nothing for a client. `None` if there is
    /// nothing left to drive.
    pub(super) fn detach_reader(&mut self) -> Option<(Reader, LogOpts)> {
        if self.finished {
            return None;
        }
        let leader = self.sink.leader.as_ref()?;
        let (resume, opts) = match &self.mode {
            Mode::Sse {
                client_wants_usage, ..
            } => (
                // The first event the client has not been sent yet; every
                // event of a stream is in the log already.
                self.out
                    .front()
                    .map_or_else(|| leader.flight.logged(), |(_, at)| *at),
                LogOpts {
                    format: self.format,
                    raw: false,
                    include_usage: *client_wants_usage,
                },
            ),
            Mode::Raw { .. } => {
                // Body pieces are logged only from now on: the ones not yet
                // sent go first.
                let at = leader.flight.logged();
                for (b, _) in self.out.drain(..) {
                    leader
                        .flight
                        .push_event(Bytes::copy_from_slice(&b), Mark::Event);
                }
                (
                    at,
                    LogOpts {
                        format: self.format,
                        raw: true,
                        include_usage: false,
                    },
                )
            }
        };
        let reader = leader.flight.attach_leader(resume);
        self.out.clear();
        self.detached = true;
        Some((reader, opts))
    }
}

/// Where a relay driven by a task leaves its summary when it is done, for
/// the body that handed it off.
pub(super) type SummarySlot = Weak<Mutex<Option<RelaySummary>>>;

/// Drives a relay in a task for a flight's readers until the answer is done,
/// or until no reader is left (then the upstream call is cancelled).
pub(super) async fn drive(mut relay: Relay, summary: Option<SummarySlot>) {
    std::future::poll_fn(|cx| loop {
        match relay.poll(cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
            Poll::Pending => {}
        }
        let Some(leader) = &relay.sink.leader else {
            return Poll::Pending;
        };
        if leader.flight.poll_unread(cx).is_pending() {
            return Poll::Pending;
        }
        if leader.abandon() {
            tracing::debug!("every reader of a flight left: upstream call cancelled");
            relay.cancel();
            return Poll::Ready(());
        }
    })
    .await;
    if let Some(slot) = summary.and_then(|s| s.upgrade()) {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay.summary);
    }
}

/// What an answer's usage costs, in USD: prompt cache hits and misses and
/// completion tokens at the model's prices per million. The one place
/// usage and prices meet.
fn cost_usd(u: &Usage, p: &Pricing) -> f64 {
    (u.prompt_cache_hit as f64 * p.input_cache_hit
        + u.prompt_cache_miss as f64 * p.input_cache_miss
        + u.completion as f64 * p.output)
        / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_read_is_kept_as_it_came_and_more_are_joined() {
        let buffer = Bytes::from_static(b"0123456789");
        let mut one = Collected::default();
        one.push(&buffer.slice(2..5));
        assert_eq!(one.len(), 3);
        let kept = one.take(false);
        assert_eq!(kept.as_ptr(), buffer[2..].as_ptr(), "no copy");
        let mut one = Collected::default();
        one.push(&buffer.slice(2..5));
        let copied = one.take(true);
        assert_eq!(copied, "234");
        assert_ne!(copied.as_ptr(), buffer[2..].as_ptr(), "compact when kept");
        let mut many = Collected::default();
        for part in [&b"ab"[..], b"cd", b"e"] {
            many.push(&Bytes::copy_from_slice(part));
        }
        assert_eq!(many.len(), 5);
        assert_eq!(many.take(false), "abcde");
        assert_eq!(many.take(false), "", "taken");
    }

    #[test]
    fn cost_follows_pricing() {
        let p = Pricing {
            input_cache_hit: 1.0,
            input_cache_miss: 2.0,
            output: 4.0,
        };
        let u = Usage {
            prompt: 30,
            completion: 10,
            total: 40,
            prompt_cache_hit: 10,
            prompt_cache_miss: 20,
            reasoning: 0,
        };
        assert!((cost_usd(&u, &p) - (10.0 + 40.0 + 40.0) / 1e6).abs() < 1e-12);
    }
}
