//! A flight leader's answer: relayed in place on its client's connection
//! until a follower attaches, then moved into a task (`drive`) that reads
//! upstream at upstream's pace while every client, the leader's too, reads
//! the flight's log (`LeadBody`). Before its response headers, the call
//! itself is owned (`Launch`), so it survives its client leaving while
//! followers wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::flight::{End, Leader, Reader, RelayHandle};
use crate::http::error::GatewayError;
use crate::response::log::{LogBody, LogOpts};
use crate::response::record::{Outcome, RelaySummary};
use crate::response::relay::{drive, Answer, Plan, Relay};
use crate::response::BoxError;
use crate::upstream::Sent;

/// A flight leader's relay, where its first follower can find it.
pub(crate) struct Lead {
    state: Mutex<LeadState>,
    /// What the relay reported when it finished in its task.
    summary: Arc<Mutex<Option<RelaySummary>>>,
}

struct LeadState {
    slot: Slot,
    /// The leader's connection, waiting on the relay: woken when the relay
    /// moves, so it starts reading the log.
    waker: Option<Waker>,
}

enum Slot {
    /// Polled by the leader's connection.
    Here(Box<Relay>),
    /// Driven by a task; the leader's client reads the log with this reader.
    Moved(Option<(Reader, LogOpts)>),
    Gone,
}

impl Lead {
    fn with<R>(&self, f: impl FnOnce(&mut LeadState) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }
}

/// Moves the leader's relay that `reader` (the first to attach to its
/// flight) took the handle of into a task, if it still runs in place.
pub(crate) fn hand_off(reader: &mut Reader) {
    if let Some(lead) = reader.take_handoff().and_then(|h| h.get::<Lead>()) {
        lead.detach();
    }
}

impl Lead {
    /// Moves the relay off the leader's connection into a task that reads
    /// upstream at upstream's pace for the flight's readers.
    fn detach(&self) {
        // Taken out of the slot under its lock: the leader's connection is
        // not polling it meanwhile.
        let moved = self.with(|s| {
            let Slot::Here(relay) = &mut s.slot else {
                return None;
            };
            let (reader, opts) = relay.detach_reader()?;
            let Slot::Here(relay) =
                std::mem::replace(&mut s.slot, Slot::Moved(Some((reader, opts))))
            else {
                return None;
            };
            Some((relay, s.waker.take()))
        });
        let Some((relay, waker)) = moved else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // A weak reference from the task: the leader's body owns the lead,
        // and the task only leaves its summary there when it is done.
        rt.spawn(drive(*relay, Some(Arc::downgrade(&self.summary))));
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The leader's client's body: the relay in place, then, once a follower
/// attached, a reader of the flight's log.
pub(crate) struct LeadBody {
    lead: Arc<Lead>,
    log: Option<LogBody>,
}

impl LeadBody {
    /// Takes a leader's relay; if followers attached while the call waited
    /// for its headers, the relay moves into its task at once.
    pub(crate) fn start(relay: Relay) -> LeadBody {
        let flight = relay.flight();
        let lead = Arc::new(Lead {
            state: Mutex::new(LeadState {
                slot: Slot::Here(Box::new(relay)),
                waker: None,
            }),
            summary: Arc::new(Mutex::new(None)),
        });
        if let Some(flight) = flight {
            if !flight.keep_relay(RelayHandle::new(Arc::downgrade(&lead))) {
                lead.detach();
            }
        }
        LeadBody { lead, log: None }
    }

    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        if let Some(log) = &mut self.log {
            return log.poll(cx);
        }
        let moved = self.lead.with(|s| match &mut s.slot {
            Slot::Here(relay) => {
                let polled = relay.poll(cx);
                if polled.is_pending() && !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
                {
                    s.waker = Some(cx.waker().clone());
                }
                Err(polled)
            }
            Slot::Moved(reader) => Ok(reader.take()),
            Slot::Gone => Err(Poll::Ready(None)),
        });
        match moved {
            Err(polled) => polled,
            Ok(Some((reader, opts))) => {
                let log = self.log.insert(LogBody::new(reader, opts, None));
                log.poll(cx)
            }
            Ok(None) => Poll::Ready(None),
        }
    }

    /// Called when the client's body is dropped.
    pub(crate) fn release(self) -> RelaySummary {
        let relay = self
            .lead
            .with(|s| match std::mem::replace(&mut s.slot, Slot::Gone) {
                Slot::Here(relay) => Some(relay),
                Slot::Moved(_) | Slot::Gone => None,
            });
        let summary = *self.lead.summary.lock().unwrap_or_else(|e| e.into_inner());
        match relay {
            Some(relay) => (*relay).release(Some(Arc::downgrade(&self.lead.summary))),
            None => summary.unwrap_or(RelaySummary {
                outcome: if self.log.as_ref().is_some_and(|l| l.ended) {
                    Outcome::Ok
                } else {
                    Outcome::HandedOff
                },
                ..RelaySummary::default()
            }),
        }
    }
}

type Call = Pin<Box<dyn Future<Output = Result<Sent, GatewayError>> + Send>>;

/// A flight leader's upstream call, up to its response headers. If the
/// leader's client leaves before they arrive while followers wait, the call
/// goes on in a task and its answer is relayed to them; with no follower it
/// is cancelled, as any request's is.
pub(crate) struct Launch {
    call: Option<Call>,
    plan: Option<Plan>,
}

impl Launch {
    pub(crate) fn new(call: Call, plan: Plan) -> Launch {
        Launch {
            call: Some(call),
            plan: Some(plan),
        }
    }
}

impl Future for Launch {
    type Output = Result<(Sent, Plan), GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(call) = &mut this.call else {
            return Poll::Ready(Err(GatewayError::StreamInterrupted));
        };
        let sent = match call.as_mut().poll(cx) {
            Poll::Ready(sent) => sent,
            Poll::Pending => return Poll::Pending,
        };
        this.call = None;
        let Some(mut plan) = this.plan.take() else {
            return Poll::Ready(Err(GatewayError::StreamInterrupted));
        };
        Poll::Ready(match sent {
            Ok(sent) => Ok((sent, plan)),
            Err(e) => {
                if let Some(leader) = plan.sink.leader.take() {
                    leader.end(End::Error(e.clone()));
                }
                Err(e)
            }
        })
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        let (Some(call), Some(mut plan)) = (self.call.take(), self.plan.take()) else {
            return;
        };
        if plan.sink.leader.as_ref().is_none_or(Leader::abandon) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            match call.await {
                Ok(sent) => {
                    let (_, answer) = Answer::of(sent);
                    drive(plan.relay(answer).for_readers(), None).await;
                }
                Err(e) => {
                    if let Some(leader) = plan.sink.leader.take() {
                        leader.end(End::Error(e));
                    }
                }
            }
        });
    }
}
