//! A client's body read from a flight's log, at the client's own pace: a
//! coalesced follower's, or a leader's once its relay moved into a task.

use std::task::{Context, Poll};

use bytes::Bytes;

use crate::api::Format;
use crate::flight::{End, Mark, Next, Reader};
use crate::http::error::stream_error_event;
use crate::response::BoxError;

/// How a reader of a flight's log delivers it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogOpts {
    /// The answer's API format: the shape of the event that ends a break.
    pub(crate) format: Format,
    /// A non-stream body: pieces as they are; a break aborts the response.
    pub(crate) raw: bool,
    /// Whether the usage-only chunk is sent.
    pub(crate) include_usage: bool,
}

/// A client's body read from a flight's log, at the client's own pace: a
/// coalesced follower's, or the leader's once its relay moved into a task.
/// Nothing follows a stream's end (`[DONE]`, `message_stop`); a break (the flight's, or this reader falling
/// further behind than the log keeps) ends a stream with the SSE error event
/// and then aborts the response.
pub(crate) struct LogBody {
    reader: Reader,
    opts: LogOpts,
    /// Tokens answered without going upstream, counted when the answer is
    /// complete (followers).
    saved: Option<prometheus::IntCounter>,
    done_sent: bool,
    abort: bool,
    pub(crate) ended: bool,
}

impl LogBody {
    pub(crate) fn new(
        reader: Reader,
        opts: LogOpts,
        saved: Option<prometheus::IntCounter>,
    ) -> LogBody {
        LogBody {
            reader,
            opts,
            saved,
            done_sent: false,
            abort: false,
            ended: false,
        }
    }

    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        if std::mem::take(&mut self.abort) {
            return Poll::Ready(Some(Err("upstream stream interrupted".into())));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            let next = match self.reader.poll_next(cx) {
                Poll::Ready(n) => n,
                Poll::Pending => return Poll::Pending,
            };
            match next {
                Next::Event(b, mark) => {
                    if self.done_sent {
                        continue;
                    }
                    match mark {
                        Mark::UsageOnly if !self.opts.include_usage && !self.opts.raw => continue,
                        Mark::Done => self.done_sent = true,
                        Mark::UsageOnly | Mark::Event => {}
                    }
                    return Poll::Ready(Some(Ok(b)));
                }
                Next::Behind => return self.broken(),
                Next::End(end) => {
                    if let (End::Done(entry), Some(saved)) = (&end, &self.saved) {
                        // Only the tokens of a completed answer count as saved.
                        saved.inc_by(entry.usage.map_or(0, |u| u.total));
                    }
                    // A stream is whole only with its end event: an end
                    // without it (a log cut short) is a break.
                    let clean = self.done_sent
                        || match end {
                            End::Done(_) => self.opts.raw,
                            End::Response { .. } => self.opts.raw,
                            End::Error(_) | End::Lost => false,
                        };
                    if clean {
                        self.ended = true;
                        return Poll::Ready(None);
                    }
                    return self.broken();
                }
            }
        }
    }

    fn broken(&mut self) -> Poll<Option<Result<Bytes, BoxError>>> {
        self.ended = true;
        if self.done_sent {
            return Poll::Ready(None);
        }
        if self.opts.raw {
            return Poll::Ready(Some(Err("upstream body interrupted".into())));
        }
        self.abort = true;
        Poll::Ready(Some(Ok(stream_error_event(self.opts.format))))
    }
}
