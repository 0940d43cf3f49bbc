//! The exact-match cache (SPEC §5): the key (SHA-256 over scope, endpoint
//! and canonical JSON), the store (moka, weighed by bytes, TTL), and the
//! in-flight map that coalesces identical requests onto one upstream call.
//!
//! An entry holds the completion bytes and its SSE replay, both built once at
//! store time, so a hit in either mode is served from bytes without parsing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

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
    /// The same completion as SSE chunks (without `[DONE]`).
    pub replay: Replay,
    /// `None` when upstream's answer carried no usage.
    pub usage: Option<Usage>,
    pub stored_at: Instant,
}

impl Entry {
    /// Builds an entry from a complete 200 body; `None` if it is not a
    /// completion (invalid JSON, no choices): such answers are never stored.
    pub fn from_completion(body: Bytes) -> Option<Entry> {
        let trimmed = sse::trim_leading_ws(&body);
        let offset = body.len() - trimmed.len();
        let value: Value = serde_json::from_slice(trimmed).ok()?;
        Self::from_value(body.slice(offset..), &value)
    }

    /// Builds an entry from an assembled stream.
    pub fn from_assembled(value: &Value) -> Option<Entry> {
        Self::from_value(Bytes::from(serde_json::to_vec(value).ok()?), value)
    }

    fn from_value(completion: Bytes, value: &Value) -> Option<Entry> {
        value.get("choices")?.as_array()?;
        let usage = value.get("usage").and_then(Usage::from_value);
        Some(Entry {
            replay: sse::replay(value)?,
            completion,
            usage,
            stored_at: Instant::now(),
        })
    }

    /// What the entry weighs against `cache.max_bytes`.
    pub fn weight(&self) -> u32 {
        let bytes = self.completion.len()
            + self.replay.chunks.len()
            + self.replay.usage_chunk.as_ref().map_or(0, Bytes::len)
            + std::mem::size_of::<Entry>()
            + 64;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    pub fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }
}

/// The store: moka, weighed by bytes, entries expiring after the TTL.
pub struct Store {
    cache: moka::sync::Cache<Key, Arc<Entry>>,
}

impl Store {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, e: &Arc<Entry>| e.weight())
                .time_to_live(ttl)
                .build(),
        }
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: Key, entry: Arc<Entry>) {
        // An entry bigger than the whole cache would only evict everything.
        if u64::from(entry.weight()) <= self.cache.policy().max_capacity().unwrap_or(u64::MAX) {
            self.cache.insert(key, entry);
        }
    }

    /// (entries, bytes), after applying pending evictions.
    pub fn stats(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}

// ---- coalescing ---------------------------------------------------------

/// Upper bound on what one in-flight request records for its followers; a
/// longer answer stops being joinable and its followers end with the stream
/// error event, so a flight never holds more than this.
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
}

/// What the leader's upstream answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A 200 event stream: followers that stream can follow it live.
    Stream,
    /// Anything else: followers wait for the end.
    Other,
}

#[derive(Debug, Default)]
struct FlightState {
    head: Option<Head>,
    /// Raw upstream events, each flagged if it is the usage-only chunk.
    events: Vec<(Bytes, bool)>,
    bytes: usize,
    overflow: bool,
    end: Option<End>,
}

/// One request in flight upstream that identical requests can attach to.
#[derive(Debug, Default)]
pub struct Flight {
    state: Mutex<FlightState>,
    notify: Notify,
}

/// A follower's view of the flight at one moment.
pub struct Progress {
    pub head: Option<Head>,
    pub events: Vec<(Bytes, bool)>,
    pub overflow: bool,
    pub end: Option<End>,
}

impl Flight {
    fn with<R>(&self, f: impl FnOnce(&mut FlightState) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    pub fn set_head(&self, head: Head) {
        self.with(|s| s.head = Some(head));
        self.notify.notify_waiters();
    }

    /// Records one event for followers. Returns false once the log is full.
    pub fn push_event(&self, event: Bytes, usage_only: bool) -> bool {
        let ok = self.with(|s| {
            if s.overflow {
                return false;
            }
            s.bytes += event.len();
            if s.bytes > FLIGHT_LOG_MAX {
                s.overflow = true;
                s.events = Vec::new();
                return false;
            }
            s.events.push((event, usage_only));
            true
        });
        self.notify.notify_waiters();
        ok
    }

    fn finish(&self, end: End) {
        self.with(|s| {
            if s.end.is_none() {
                s.end = Some(end);
            }
        });
        self.notify.notify_waiters();
    }

    /// Waits until something past `seen` events (or the head, or the end) is
    /// there, then returns it.
    pub async fn progress(&self, seen: usize, head_seen: bool) -> Progress {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let p = self.with(|s| {
                let fresh = s.events.len() > seen
                    || s.end.is_some()
                    || s.overflow
                    || (!head_seen && s.head.is_some());
                fresh.then(|| Progress {
                    head: s.head,
                    events: s.events.get(seen..).map(<[_]>::to_vec).unwrap_or_default(),
                    overflow: s.overflow,
                    end: s.end.clone(),
                })
            });
            if let Some(p) = p {
                return p;
            }
            notified.await;
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
    Follow(Arc<Flight>),
}

impl Flights {
    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Flight>>> {
        self.shards[usize::from(key[0]) % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches to an identical request in flight, if there is one.
    pub fn follow(&self, key: &Key) -> Option<Arc<Flight>> {
        self.shard(key).get(key).cloned()
    }

    /// Becomes the leader for `key`, unless someone else just did.
    pub fn join(self: &Arc<Self>, key: Key) -> Join {
        let mut shard = self.shard(&key);
        if let Some(f) = shard.get(&key) {
            return Join::Follow(Arc::clone(f));
        }
        let flight = Arc::new(Flight::default());
        shard.insert(key, Arc::clone(&flight));
        Join::Lead(Leader {
            flights: Arc::clone(self),
            key,
            flight,
            ended: false,
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
pub struct Leader {
    flights: Arc<Flights>,
    key: Key,
    pub flight: Arc<Flight>,
    ended: bool,
}

impl Leader {
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
        // The map's reference and ours; anything more is a follower.
        Arc::strong_count(&self.flight) > 2
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.ended {
            self.flights.remove(&self.key, &self.flight);
            self.flight
                .finish(End::Error(GatewayError::StreamInterrupted));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let Join::Follow(f) = flights.join(key) else {
            panic!("second follows")
        };
        assert!(leader.has_followers());
        leader.flight.set_head(Head::Stream);
        leader
            .flight
            .push_event(Bytes::from_static(b"data: 1\n\n"), false);
        let p = f.progress(0, false).await;
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.head, Some(Head::Stream));
        drop(leader);
        let p = f.progress(1, true).await;
        assert!(matches!(
            p.end,
            Some(End::Error(GatewayError::StreamInterrupted))
        ));
        assert!(
            flights.follow(&key).is_none(),
            "ended flights leave the map"
        );
    }
}
