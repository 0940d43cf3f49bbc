//! Local flights: the in-flight map that coalesces identical cacheable
//! requests of this replica onto one upstream call, and each flight's
//! bounded event log that its readers (the leader's client and every
//! follower) read at their own pace. Uses the cache's `Key` and `Entry`;
//! knows nothing of Redis (see `fleet` for flights across replicas).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::cache::{Entry, Key};
use crate::http::error::GatewayError;

pub(crate) mod fleet;

// ---- coalescing ---------------------------------------------------------

/// Upper bound on what one in-flight request keeps of its answer for its
/// readers. Past it the oldest events leave the log: the flight stops taking
/// new followers (they need the first event), and a reader that has not yet
/// read an event that left gets the stream error event. A flight never holds
/// more than this, whoever stops reading.
pub(crate) const FLIGHT_LOG_MAX: usize = 8 * 1024 * 1024;

/// How an in-flight request ended.
#[derive(Debug, Clone)]
pub(crate) enum End {
    Done(Arc<Entry>),
    /// An upstream error response, replayed to every follower as it came.
    Response {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    Error(GatewayError),
    /// The leader on another replica was lost before the end (the replica
    /// died, or Redis went away): a stream that relayed events ends with the
    /// error event; a client that was sent nothing asks again.
    Lost,
}

/// What the leader's upstream answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// A 200 event stream: followers that stream can follow it live.
    Stream,
    /// Anything else: followers wait for the end.
    Other,
}

/// What one entry of a flight's log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// An event (or, for a non-stream answer, a piece of the body).
    Event,
    /// DeepSeek's usage-only chunk: only clients that asked for usage get it.
    UsageOnly,
    /// The stream's end (`data: [DONE]`, Anthropic's `message_stop` or
    /// `error`): nothing follows it.
    Done,
}

/// An opaque handle to the relay of a flight's leader while its client's
/// connection reads it in place. The flight only keeps it and hands it to
/// the first reader that attaches (`Reader::take_handoff`); the response
/// layer, which made it, then moves the relay into a task of its own, so
/// that no reader's pace holds back another's. Nothing here calls it.
#[derive(Clone)]
pub(crate) struct RelayHandle(Weak<dyn Any + Send + Sync>);

impl RelayHandle {
    pub(crate) fn new<T: Any + Send + Sync>(relay: Weak<T>) -> RelayHandle {
        RelayHandle(relay)
    }

    /// The relay, if it is still there and of this type.
    pub(crate) fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0.upgrade()?.downcast::<T>().ok()
    }
}

#[derive(Default)]
struct FlightState {
    head: Option<Head>,
    /// The upstream the leader's call went to.
    upstream: Option<HeaderValue>,
    /// The log: raw upstream events, oldest first; `events[0]` is event
    /// number `base` of the answer.
    events: VecDeque<(Bytes, Mark)>,
    base: usize,
    bytes: usize,
    /// Events have left the log: no new follower can start from the first.
    trimmed: bool,
    end: Option<End>,
    /// Attached readers: followers, and the leader's own client once its
    /// relay runs in a task.
    readers: usize,
    next_reader: u64,
    /// Readers waiting for the log to grow (or the head, or the end).
    wakers: HashMap<u64, Waker>,
    /// The task driving the upstream call, waiting for readers to leave.
    driver: Option<Waker>,
    relay: Option<RelayHandle>,
}

impl std::fmt::Debug for FlightState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightState")
            .field("head", &self.head)
            .field("base", &self.base)
            .field("events", &self.events.len())
            .field("end", &self.end)
            .field("readers", &self.readers)
            .finish_non_exhaustive()
    }
}

/// One request in flight upstream that identical requests can attach to.
#[derive(Debug, Default)]
pub(crate) struct Flight {
    state: Mutex<FlightState>,
}

/// What a reader finds next in the log.
#[derive(Debug)]
pub(crate) enum Next {
    Event(Bytes, Mark),
    /// The reader fell further behind than the log keeps.
    Behind,
    End(End),
}

impl Flight {
    fn with<R>(&self, f: impl FnOnce(&mut FlightState) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    /// Runs `f` on the state, then wakes the readers waiting on it (outside
    /// the lock).
    fn update<R>(&self, f: impl FnOnce(&mut FlightState) -> R) -> R {
        let (r, wakers) = self.with(|s| {
            let r = f(s);
            let wakers = if s.wakers.is_empty() {
                Vec::new()
            } else {
                s.wakers.drain().map(|(_, w)| w).collect()
            };
            (r, wakers)
        });
        for w in wakers {
            w.wake();
        }
        r
    }

    pub(crate) fn set_head(&self, head: Head) {
        self.update(|s| s.head = Some(head));
    }

    /// Names the upstream the leader's call went to.
    pub(crate) fn set_upstream(&self, upstream: &HeaderValue) {
        self.with(|s| s.upstream = Some(upstream.clone()));
    }

    /// The upstream the leader's call went to, once known.
    pub(crate) fn upstream(&self) -> Option<HeaderValue> {
        self.with(|s| s.upstream.clone())
    }

    /// Appends one entry to the log; past `FLIGHT_LOG_MAX` the oldest leave.
    pub(crate) fn push_event(&self, event: Bytes, mark: Mark) -> Logged {
        self.update(|s| {
            let at = s.base + s.events.len();
            s.bytes += event.len();
            s.events.push_back((event, mark));
            let whole = !s.trimmed;
            while s.bytes > FLIGHT_LOG_MAX && s.events.len() > 1 {
                if let Some((old, _)) = s.events.pop_front() {
                    s.bytes -= old.len();
                    s.base += 1;
                    s.trimmed = true;
                }
            }
            Logged {
                at,
                just_trimmed: whole && s.trimmed,
            }
        })
    }

    /// The number of the next entry the log will take.
    pub(crate) fn logged(&self) -> usize {
        self.with(|s| s.base + s.events.len())
    }

    fn finish(&self, end: End) {
        let hook = self.update(|s| {
            if s.end.is_none() {
                s.end = Some(end);
            }
            s.relay.take()
        });
        drop(hook);
    }

    /// Readers attached now.
    pub(crate) fn readers(&self) -> usize {
        self.with(|s| s.readers)
    }

    /// Keeps the handle of the leader's relay for the first follower.
    /// Returns false if readers are attached already (the caller moves the
    /// relay at once).
    pub(crate) fn keep_relay(&self, relay: RelayHandle) -> bool {
        self.with(|s| {
            if s.readers > 0 || s.end.is_some() {
                false
            } else {
                s.relay = Some(relay);
                true
            }
        })
    }

    /// Attaches a reader at entry `pos`; the first one takes the leader's
    /// relay handle along.
    fn attach(self: &Arc<Self>, pos: usize) -> Reader {
        let (id, handoff) = self.with(|s| {
            s.readers += 1;
            s.next_reader += 1;
            (s.next_reader, s.relay.take())
        });
        Reader {
            flight: Arc::clone(self),
            id,
            pos,
            handoff,
        }
    }

    /// A reader for the leader's own client, resuming at `pos`.
    pub(crate) fn attach_leader(self: &Arc<Self>, pos: usize) -> Reader {
        self.attach(pos)
    }

    /// For the task driving the call: ready once no reader is attached.
    pub(crate) fn poll_unread(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.with(|s| {
            if s.readers == 0 {
                Poll::Ready(())
            } else {
                if !s.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.driver = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        })
    }
}

/// Where `push_event` put an entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Logged {
    /// The entry's number in the answer.
    pub(crate) at: usize,
    /// This push made the first events leave the log: the flight must stop
    /// taking followers.
    pub(crate) just_trimmed: bool,
}

/// What a reader waits for (`Reader::changed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// The head is known, or the flight ended.
    HeadOrEnd,
    /// The flight ended (the head is known already).
    End,
}

/// How a leader dropped unended ends its flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfDropped {
    /// Interrupted: its followers get the error.
    Interrupted,
    /// Lost: its followers ask again. For a flight fed from another
    /// replica, whose first request may go away while it waits.
    Lost,
}

/// One client reading a flight's log at its own pace. Dropping it detaches
/// it; when the last reader leaves, the task driving the call (if any) is
/// told, and cancels the call.
pub(crate) struct Reader {
    flight: Arc<Flight>,
    id: u64,
    pos: usize,
    /// The leader's relay, for the first reader to move into a task.
    handoff: Option<RelayHandle>,
}

impl Reader {
    /// The leader's relay handle, if this reader was the first to attach
    /// while the relay ran in place (see `RelayHandle`).
    pub(crate) fn take_handoff(&mut self) -> Option<RelayHandle> {
        self.handoff.take()
    }

    pub(crate) fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// The next entry, or `Pending` (woken when the log grows or ends).
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        let id = self.id;
        let pos = self.pos;
        let next = self.flight.with(|s| {
            if pos < s.base {
                return Some(Next::Behind);
            }
            if let Some((ev, mark)) = s.events.get(pos - s.base) {
                return Some(Next::Event(ev.clone(), *mark));
            }
            if let Some(end) = &s.end {
                return Some(Next::End(end.clone()));
            }
            register(s, id, cx);
            None
        });
        match next {
            Some(n) => {
                if matches!(n, Next::Event(..)) {
                    self.pos += 1;
                }
                Poll::Ready(n)
            }
            None => Poll::Pending,
        }
    }

    /// Waits for what `until` names, and returns the head and the end as
    /// they are then.
    pub(crate) async fn changed(&mut self, until: Until) -> (Option<Head>, Option<End>) {
        let head_seen = until == Until::End;
        let id = self.id;
        std::future::poll_fn(|cx| {
            self.flight.with(|s| {
                if s.end.is_some() || (!head_seen && s.head.is_some()) {
                    Poll::Ready((s.head, s.end.clone()))
                } else {
                    register(s, id, cx);
                    Poll::Pending
                }
            })
        })
        .await
    }
}

fn register(s: &mut FlightState, id: u64, cx: &Context<'_>) {
    match s.wakers.get_mut(&id) {
        Some(w) if w.will_wake(cx.waker()) => {}
        Some(w) => w.clone_from(cx.waker()),
        None => {
            s.wakers.insert(id, cx.waker().clone());
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let driver = self.flight.with(|s| {
            s.readers -= 1;
            s.wakers.remove(&self.id);
            if s.readers == 0 {
                s.driver.take()
            } else {
                None
            }
        });
        if let Some(w) = driver {
            w.wake();
        }
    }
}

/// Keyed by the cache key, a SHA-256: foldhash (seeded per process)
/// rather than SipHash, as for every table the request path reads.
type InFlight = HashMap<Key, Arc<Flight>, foldhash::fast::RandomState>;
type Shard = Mutex<InFlight>;

/// The in-flight map, sharded so unrelated requests do not share a lock.
pub(crate) struct Flights {
    shards: Box<[Shard]>,
}

impl Default for Flights {
    fn default() -> Self {
        Self {
            shards: (0..64).map(|_| Mutex::new(InFlight::default())).collect(),
        }
    }
}

pub(crate) enum Join {
    Lead(Leader),
    Follow(Reader),
}

impl Flights {
    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, InFlight> {
        self.shards[usize::from(key[0]) % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches to an identical request in flight, if there is one.
    pub(crate) fn follow(&self, key: &Key) -> Option<Reader> {
        // Attached under the map's lock, so a flight is never given up
        // (`Leader::abandon`) between being found and being read.
        let shard = self.shard(key);
        Some(shard.get(key)?.attach(0))
    }

    /// Becomes the leader for `key`, unless someone else just did.
    pub(crate) fn join(self: &Arc<Self>, key: Key) -> Join {
        let mut shard = self.shard(&key);
        if let Some(f) = shard.get(&key) {
            return Join::Follow(f.attach(0));
        }
        let flight = Arc::new(Flight::default());
        shard.insert(key, Arc::clone(&flight));
        Join::Lead(Leader {
            flights: Arc::clone(self),
            key,
            flight,
            ended: false,
            if_dropped: IfDropped::Interrupted,
        })
    }

    fn remove(&self, key: &Key, flight: &Arc<Flight>) {
        let mut shard = self.shard(key);
        if shard.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            shard.remove(key);
        }
    }
}

/// The leader's side of a flight. Ending it (or dropping it, which ends it
/// as interrupted) removes it from the map first, so no follower joins a
/// flight that will not be answered.
pub(crate) struct Leader {
    flights: Arc<Flights>,
    key: Key,
    pub(crate) flight: Arc<Flight>,
    ended: bool,
    /// How the flight ends if this is dropped unended.
    if_dropped: IfDropped,
}

impl Leader {
    /// How the flight ends if this is dropped unended.
    pub(crate) fn if_dropped(&mut self, end: IfDropped) {
        self.if_dropped = end;
    }

    /// Stops new followers from joining (the answer outgrew the log).
    pub(crate) fn close(&self) {
        self.flights.remove(&self.key, &self.flight);
    }

    pub(crate) fn end(mut self, end: End) {
        self.ended = true;
        self.flights.remove(&self.key, &self.flight);
        self.flight.finish(end);
    }

    #[cfg(test)]
    pub(crate) fn has_followers(&self) -> bool {
        self.flight.readers() > 0
    }

    /// Gives the flight up if no reader is attached: removed from the map
    /// (under its lock, so no follower can attach in between), it takes no
    /// more. Returns false, changing nothing, while someone still reads.
    pub(crate) fn abandon(&self) -> bool {
        let mut shard = self.flights.shard(&self.key);
        if self.flight.readers() > 0 {
            return false;
        }
        if shard
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            shard.remove(&self.key);
        }
        true
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.ended {
            self.flights.remove(&self.key, &self.flight);
            self.flight.finish(match self.if_dropped {
                IfDropped::Lost => End::Lost,
                IfDropped::Interrupted => End::Error(GatewayError::StreamInterrupted),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flight_lifecycle() {
        let flights = Arc::new(Flights::default());
        let key = [7u8; 32];
        let Join::Lead(leader) = flights.join(key) else {
            panic!("first is leader")
        };
        assert!(!leader.has_followers());
        let Join::Follow(mut f) = flights.join(key) else {
            panic!("second follows")
        };
        assert!(leader.has_followers());
        assert!(!leader.abandon(), "a reader is attached");
        leader.flight.set_head(Head::Stream);
        leader
            .flight
            .push_event(Bytes::from_static(b"data: 1\n\n"), Mark::Event);
        let (head, end) = f.changed(Until::HeadOrEnd).await;
        assert_eq!(head, Some(Head::Stream));
        assert!(end.is_none());
        let next = std::future::poll_fn(|cx| f.poll_next(cx)).await;
        assert!(matches!(next, Next::Event(_, Mark::Event)));
        drop(leader);
        let next = std::future::poll_fn(|cx| f.poll_next(cx)).await;
        assert!(matches!(
            next,
            Next::End(End::Error(GatewayError::StreamInterrupted))
        ));
        assert!(
            flights.follow(&key).is_none(),
            "ended flights leave the map"
        );
    }

    #[test]
    fn the_log_is_bounded_and_a_reader_left_behind_is_told() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(leader) = flights.join([1u8; 32]) else {
            panic!("leader")
        };
        let mut slow = flights.follow(&[1u8; 32]).expect("follows");
        let chunk = Bytes::from(vec![b'x'; FLIGHT_LOG_MAX / 4]);
        let mut trimmed = false;
        for _ in 0..8 {
            trimmed |= leader
                .flight
                .push_event(chunk.clone(), Mark::Event)
                .just_trimmed;
        }
        assert!(trimmed);
        let held: usize = leader.flight.with(|s| s.bytes);
        assert!(held <= FLIGHT_LOG_MAX, "{held}");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(slow.poll_next(&mut cx), Poll::Ready(Next::Behind)));
        assert!(!leader.abandon(), "the slow reader is still attached");
        drop(slow);
        assert!(leader.abandon(), "no reader left");
        assert!(flights.follow(&[1u8; 32]).is_none());
    }
}
