//! The exact-match cache (SPEC §5): the key (SHA-256 over scope, endpoint
//! and canonical JSON), the store (moka, weighed by bytes, TTL), and the
//! in-flight map that coalesces identical requests onto one upstream call.
//!
//! An entry holds the completion bytes, checked and its usage read at store
//! time without building a tree, and its SSE replay, built the first time a
//! streaming client hits it: a miss pays nothing for a replay it may never
//! need, and every hit after the first in either mode is served from bytes
//! without parsing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::json::Scan;
use crate::sse::{self, Replay, Usage};

pub type Key = [u8; 32];

/// Top-level fields that do not change the answer, only how it is delivered.
const DELIVERY_FIELDS: [&str; 2] = ["stream", "stream_options"];

/// The cache key: SHA-256 over the scope (tenant name, or the shared pool),
/// the endpoint label, and the canonical JSON of the body (see `json`:
/// object keys sorted at every depth, no whitespace, one spelling per string
/// and number, top-level `stream`/`stream_options` dropped). The canonical
/// form is streamed into the hasher from the scan's arena.
pub fn key(scope: Option<&str>, endpoint: &str, body: &Scan<'_>) -> Key {
    let mut h = Sha256::new();
    match scope {
        // A tenant name is [a-z0-9_-]+, so it can never collide with the
        // shared pool's marker byte.
        Some(tenant) => {
            h.update(b"t:");
            h.update(tenant.as_bytes());
        }
        None => h.update(b"\x00shared"),
    }
    h.update(b"\x00");
    h.update(endpoint.as_bytes());
    h.update(b"\x00");
    body.write_canonical(&DELIVERY_FIELDS, &mut |b| h.update(b));
    h.finalize().into()
}

/// One stored answer.
#[derive(Debug)]
pub struct Entry {
    /// The completion as the non-streaming endpoint answers it.
    pub completion: Bytes,
    /// The same completion as SSE chunks (without `[DONE]`), built at the
    /// first streaming hit: see [`Entry::replay`].
    replay: OnceLock<Option<Replay>>,
    /// `None` when upstream's answer carried no usage.
    pub usage: Option<Usage>,
    pub stored_at: Instant,
}

impl Entry {
    /// Builds an entry from a complete 200 body; `None` if it is not a
    /// completion (invalid JSON, no choices, a chat choice without a
    /// message): such answers are never stored.
    pub fn from_completion(body: Bytes) -> Option<Entry> {
        let trimmed = sse::trim_leading_ws(&body);
        let offset = body.len() - trimmed.len();
        let usage = sse::completion_facts(trimmed)?;
        Some(Entry {
            completion: body.slice(offset..),
            replay: OnceLock::new(),
            usage,
            stored_at: Instant::now(),
        })
    }

    /// Builds an entry from an assembled stream.
    pub fn from_assembled(value: &Value) -> Option<Entry> {
        Self::from_completion(Bytes::from(serde_json::to_vec(value).ok()?))
    }

    /// The completion as SSE chunks, built from the completion the first
    /// time it is asked for. Its shape was checked at store time, but that
    /// check skips what it does not need (a number out of range, a broken
    /// escape in a string upstream sent): `None` for such an answer, which
    /// then serves non-streaming clients only.
    pub fn replay(&self) -> Option<&Replay> {
        self.replay
            .get_or_init(|| {
                serde_json::from_slice::<Value>(&self.completion)
                    .ok()
                    .and_then(|v| sse::replay(&v))
            })
            .as_ref()
    }

    /// What the entry weighs against `cache.max_bytes`: fixed at store
    /// time, so it counts the replay before it is built (about the
    /// completion's size again, plus an envelope a chunk).
    pub fn weight(&self) -> u32 {
        let bytes = 2 * self.completion.len() + 768 + std::mem::size_of::<Entry>() + 64;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    pub fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }
}

/// The in-memory store: moka, weighed by bytes, each entry expiring after
/// its own time to live (the TTL, or less for a copy of a shared entry).
pub struct Store {
    cache: moka::sync::Cache<Key, Stored>,
    ttl: Duration,
}

#[derive(Clone)]
struct Stored {
    entry: Arc<Entry>,
    ttl: Duration,
}

struct PerEntry;

impl moka::Expiry<Key, Stored> for PerEntry {
    fn expire_after_create(
        &self,
        _: &Key,
        value: &Stored,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl Store {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, s: &Stored| s.entry.weight())
                .expire_after(PerEntry)
                .build(),
            ttl,
        }
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache.get(key).map(|s| s.entry)
    }

    /// Stores an entry for the whole TTL.
    pub fn insert(&self, key: Key, entry: Arc<Entry>) {
        self.insert_for(key, entry, self.ttl);
    }

    /// Stores an entry for at most `ttl` (never longer than the TTL).
    pub fn insert_for(&self, key: Key, entry: Arc<Entry>, ttl: Duration) {
        // An entry bigger than the whole cache would only evict everything.
        if u64::from(entry.weight()) <= self.cache.policy().max_capacity().unwrap_or(u64::MAX) {
            let ttl = ttl.min(self.ttl);
            if !ttl.is_zero() {
                self.cache.insert(key, Stored { entry, ttl });
            }
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// (entries, bytes), after applying pending evictions.
    pub fn stats(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}

// ---- coalescing ---------------------------------------------------------

/// Upper bound on what one in-flight request keeps of its answer for its
/// readers. Past it the oldest events leave the log: the flight stops taking
/// new followers (they need the first event), and a reader that has not yet
/// read an event that left gets the stream error event. A flight never holds
/// more than this, whoever stops reading.
pub const FLIGHT_LOG_MAX: usize = 8 * 1024 * 1024;

/// How an in-flight request ended.
#[derive(Debug, Clone)]
pub enum End {
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
pub enum Head {
    /// A 200 event stream: followers that stream can follow it live.
    Stream,
    /// Anything else: followers wait for the end.
    Other,
}

/// What one entry of a flight's log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// An event (or, for a non-stream answer, a piece of the body).
    Event,
    /// DeepSeek's usage-only chunk: only clients that asked for usage get it.
    UsageOnly,
    /// `data: [DONE]`: nothing follows it.
    Done,
}

/// Moves a leader's upstream reading off its client's connection (into a
/// task of its own), so that no reader's pace holds back another's. Called
/// when the first follower attaches; implemented by the relay.
pub trait Detach: Send + Sync {
    fn detach(&self);
}

#[derive(Default)]
struct FlightState {
    head: Option<Head>,
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
    detach: Option<Weak<dyn Detach>>,
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
pub struct Flight {
    state: Mutex<FlightState>,
}

/// What a reader finds next in the log.
#[derive(Debug)]
pub enum Next {
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

    pub fn set_head(&self, head: Head) {
        self.update(|s| s.head = Some(head));
    }

    /// Appends one entry to the log; past `FLIGHT_LOG_MAX` the oldest leave.
    pub fn push_event(&self, event: Bytes, mark: Mark) -> Logged {
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
    pub fn logged(&self) -> usize {
        self.with(|s| s.base + s.events.len())
    }

    fn finish(&self, end: End) {
        let hook = self.update(|s| {
            if s.end.is_none() {
                s.end = Some(end);
            }
            s.detach.take()
        });
        drop(hook);
    }

    /// Readers attached now.
    pub fn readers(&self) -> usize {
        self.with(|s| s.readers)
    }

    /// Registers the hook that moves the upstream reading into a task.
    /// Returns true if readers are attached already (the caller detaches at
    /// once); otherwise the first follower to attach calls it.
    pub fn set_detach(&self, hook: Weak<dyn Detach>) -> bool {
        self.with(|s| {
            if s.readers > 0 || s.end.is_some() {
                true
            } else {
                s.detach = Some(hook);
                false
            }
        })
    }

    /// Attaches a reader at entry `pos`, handing back the detach hook if it
    /// is the first (to be called outside any lock).
    fn attach(self: &Arc<Self>, pos: usize) -> (Reader, Option<Weak<dyn Detach>>) {
        let (id, hook) = self.with(|s| {
            s.readers += 1;
            s.next_reader += 1;
            (s.next_reader, s.detach.take())
        });
        (
            Reader {
                flight: Arc::clone(self),
                id,
                pos,
            },
            hook,
        )
    }

    /// A reader for the leader's own client, resuming at `pos`.
    pub fn attach_leader(self: &Arc<Self>, pos: usize) -> Reader {
        self.attach(pos).0
    }

    /// For the task driving the call: ready once no reader is attached.
    pub fn poll_unread(&self, cx: &mut Context<'_>) -> Poll<()> {
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
pub struct Logged {
    /// The entry's number in the answer.
    pub at: usize,
    /// This push made the first events leave the log: the flight must stop
    /// taking followers.
    pub just_trimmed: bool,
}

/// One client reading a flight's log at its own pace. Dropping it detaches
/// it; when the last reader leaves, the task driving the call (if any) is
/// told, and cancels the call.
pub struct Reader {
    flight: Arc<Flight>,
    id: u64,
    pos: usize,
}

impl Reader {
    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// The next entry, or `Pending` (woken when the log grows or ends).
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
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

    /// Waits until the head is known (when `head_seen` is false) or the
    /// flight ended, and returns both.
    pub async fn changed(&mut self, head_seen: bool) -> (Option<Head>, Option<End>) {
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

type Shard = Mutex<HashMap<Key, Arc<Flight>>>;

/// The in-flight map, sharded so unrelated requests do not share a lock.
pub struct Flights {
    shards: Box<[Shard]>,
}

impl Default for Flights {
    fn default() -> Self {
        Self {
            shards: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

pub enum Join {
    Lead(Leader),
    Follow(Reader),
}

impl Flights {
    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Flight>>> {
        self.shards[usize::from(key[0]) % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches to an identical request in flight, if there is one.
    pub fn follow(&self, key: &Key) -> Option<Reader> {
        let (reader, hook) = {
            // Attached under the map's lock, so a flight is never given up
            // (`Leader::abandon`) between being found and being read.
            let shard = self.shard(key);
            shard.get(key)?.attach(0)
        };
        detach(hook);
        Some(reader)
    }

    /// Becomes the leader for `key`, unless someone else just did.
    pub fn join(self: &Arc<Self>, key: Key) -> Join {
        let mut shard = self.shard(&key);
        if let Some(f) = shard.get(&key) {
            let (reader, hook) = f.attach(0);
            drop(shard);
            detach(hook);
            return Join::Follow(reader);
        }
        let flight = Arc::new(Flight::default());
        shard.insert(key, Arc::clone(&flight));
        Join::Lead(Leader {
            flights: Arc::clone(self),
            key,
            flight,
            ended: false,
            lost_if_dropped: false,
        })
    }

    fn remove(&self, key: &Key, flight: &Arc<Flight>) {
        let mut shard = self.shard(key);
        if shard.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            shard.remove(key);
        }
    }
}

fn detach(hook: Option<Weak<dyn Detach>>) {
    if let Some(d) = hook.and_then(|h| h.upgrade()) {
        d.detach();
    }
}

/// The leader's side of a flight. Ending it (or dropping it, which ends it
/// as interrupted) removes it from the map first, so no follower joins a
/// flight that will not be answered.
pub struct Leader {
    flights: Arc<Flights>,
    key: Key,
    pub flight: Arc<Flight>,
    ended: bool,
    /// Dropped unended, the flight ends as lost (its followers ask again)
    /// rather than interrupted: for a flight fed from another replica, whose
    /// first request may go away while it waits.
    lost_if_dropped: bool,
}

impl Leader {
    /// See `lost_if_dropped`.
    pub fn set_lost_if_dropped(&mut self, lost: bool) {
        self.lost_if_dropped = lost;
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Stops new followers from joining (the answer outgrew the log).
    pub fn close(&self) {
        self.flights.remove(&self.key, &self.flight);
    }

    pub fn end(mut self, end: End) {
        self.ended = true;
        self.flights.remove(&self.key, &self.flight);
        self.flight.finish(end);
    }

    pub fn has_followers(&self) -> bool {
        self.flight.readers() > 0
    }

    /// Gives the flight up if no reader is attached: removed from the map
    /// (under its lock, so no follower can attach in between), it takes no
    /// more. Returns false, changing nothing, while someone still reads.
    pub fn abandon(&self) -> bool {
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
            self.flight.finish(if self.lost_if_dropped {
                End::Lost
            } else {
                End::Error(GatewayError::StreamInterrupted)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_whose_tree_does_not_parse_has_no_replay_never_an_empty_one() {
        let ok = Entry::from_completion(Bytes::from_static(
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
        ))
        .expect("stored");
        assert!(ok.replay().is_some_and(|r| !r.chunks.is_empty()));
        // Stored (the check skips what it does not need), but no replay:
        // served to non-streaming clients only.
        for body in [
            &br#"{"choices":[{"message":{"content":"a"}}],"created":1e400}"#[..],
            br#"{"choices":[{"message":{"content":"\ud83d"}}]}"#,
        ] {
            let e = Entry::from_completion(Bytes::from_static(body)).expect("stored");
            assert!(e.replay().is_none(), "{}", String::from_utf8_lossy(body));
        }
    }
    use serde_json::json;

    fn k(v: Value) -> Key {
        k_raw(&v.to_string())
    }

    fn k_raw(body: &str) -> Key {
        key(
            Some("t"),
            "chat",
            &crate::json::scan(body.as_bytes(), true).expect("json"),
        )
    }

    #[test]
    fn key_ignores_order_whitespace_and_delivery() {
        let a = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#;
        let b = r#" { "temperature" : 5e-1 , "messages" : [ { "content":"h\u0069", "role":"user" } ], "model":"m", "stream": true, "stream_options": {"include_usage": true} } "#;
        assert_eq!(k_raw(a), k_raw(b));
        // Number spelling does not matter; the value does, to the last digit.
        assert_eq!(k_raw(r#"{"n":1}"#), k_raw(r#"{"n":1.0}"#));
        assert_eq!(k_raw(r#"{"n":1}"#), k_raw(r#"{"n":1e0}"#));
        assert_ne!(
            k_raw(r#"{"n":12345678901234567890123}"#),
            k_raw(r#"{"n":12345678901234567890124}"#)
        );
        assert_ne!(k_raw(r#"{"n":1}"#), k_raw(r#"{"n":"1"}"#));
        assert_ne!(
            k_raw(a),
            k(
                json!({"model": "m", "messages": [{"role": "user", "content": "hi!"}], "temperature": 0.5})
            )
        );
        // Array order matters; nested `stream` is content, not delivery.
        assert_ne!(k(json!({"a": [1, 2]})), k(json!({"a": [2, 1]})));
        assert_ne!(k(json!({"a": {"stream": true}})), k(json!({"a": {}})));
    }

    #[test]
    fn key_separates_scopes_and_endpoints() {
        let raw = json!({"model": "m", "messages": []}).to_string();
        let body = crate::json::scan(raw.as_bytes(), true).expect("json");
        assert_ne!(key(Some("a"), "chat", &body), key(Some("b"), "chat", &body));
        assert_ne!(key(Some("a"), "chat", &body), key(None, "chat", &body));
        assert_ne!(
            key(Some("a"), "chat", &body),
            key(Some("a"), "chat_prefix", &body)
        );
    }

    #[test]
    fn store_holds_max_bytes() {
        let store = Store::new(64 * 1024, Duration::from_secs(60));
        for i in 0..200u32 {
            let text = "x".repeat(4000);
            let body = json!({"id": i, "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]});
            let e = Entry::from_completion(Bytes::from(body.to_string())).expect("entry");
            let raw = json!({ "i": i }).to_string();
            let body = crate::json::scan(raw.as_bytes(), true).expect("json");
            store.insert(key(None, "chat", &body), Arc::new(e));
        }
        let (entries, bytes) = store.stats();
        assert!(bytes <= 64 * 1024, "{bytes}");
        assert!(entries > 0 && entries < 200);
    }

    #[test]
    fn only_completions_become_entries() {
        assert!(Entry::from_completion(Bytes::from_static(b"not json")).is_none());
        assert!(Entry::from_completion(Bytes::from_static(b"{\"error\":{}}")).is_none());
        let e = Entry::from_completion(Bytes::from_static(b"\n\n{\"choices\":[]}")).expect("entry");
        assert_eq!(&e.completion[..], b"{\"choices\":[]}");
    }

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
        let (head, end) = f.changed(false).await;
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
