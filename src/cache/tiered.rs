//! The cache store the request path looks up and stores through
//! (docs/api.md, "Cache"; docs/redis.md, "Shared cache"): the replica's
//! in-memory store, in front of Redis when `[redis] cache` is on.
//!
//! - A lookup that misses memory asks Redis (one `GET`, at most
//!   `timeout_ms`); what it finds is a hit, kept in memory too. A Redis that
//!   fails, is slow or is down is a miss, never an error.
//! - A store goes to memory at once and to Redis from a task, so it never
//!   delays a response; an entry larger than `cache_max_entry_bytes` (as
//!   encoded) stays in memory only.
//! - With `[redis] coalesce` on too, a miss's lookup is made by the fleet's
//!   flights instead, in the same round trip as the call's claim, and what
//!   they find is handed here (`adopt`); the store rides the flight's end
//!   when the publisher took the `Fill`'s Redis half (`Fill::hand_over`).
//!   Either way this module decides whether an answer goes to Redis, for
//!   how long, under what name and in what encoding.
//! - A replica keeps its copy of an entry it read from or wrote to Redis at
//!   most 60 s, so a `no-cache` refresh elsewhere reaches it within a
//!   minute.
//!
//! An entry crosses replicas in a versioned encoding of what a hit needs:
//! the completion (its usage is inside) and when it was first stored, as
//! wall-clock time. The SSE replay is rebuilt from the completion on the
//! replica that reads it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Semaphore;

use redis::RedisWrite;

use crate::api::Format;
use crate::cache::{Entry, Key, Store};
use crate::config::RedisConfig;
use crate::shared::{Op, Redis};

/// The longest a replica keeps its own copy of a shared entry.
const SHARED_COPY_TTL: Duration = Duration::from_secs(60);
/// Encoding version 1: magic, stored-at (Unix ms, big endian), completion.
const MAGIC: &[u8; 4] = b"SLC1";
/// The same for an Anthropic message: a replica that does not know the
/// format reads it as a miss.
const MAGIC_ANTHROPIC: &[u8; 4] = b"SLA1";

/// The magic of an entry's format.
fn magic(format: Format) -> &'static [u8; 4] {
    match format {
        Format::OpenAi => MAGIC,
        Format::Anthropic => MAGIC_ANTHROPIC,
    }
}
/// Writes to Redis in flight at once; past it a store stays local.
const WRITES_IN_FLIGHT: usize = 256;

/// The cache as the request path sees it.
pub(crate) struct CacheStore {
    local: Store,
    shared: Option<Shared>,
}

struct Shared {
    redis: Arc<Redis>,
    max_entry_bytes: u64,
    /// Who reads Redis on a memory miss.
    read_by: SharedReads,
    writes: Arc<Semaphore>,
    /// Lookups Redis answered, found and not found.
    found: prometheus::IntCounter,
    not_found: prometheus::IntCounter,
}

/// Who asks Redis for an answer that missed memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SharedReads {
    /// `CacheStore::get` itself (one `GET`).
    Get,
    /// The fleet's flights, in the round trip that claims the call.
    FleetLookup,
}

/// The right to store one answer, made by the cache when a request leads a
/// miss and spent by the relay when the answer is complete
/// (`CacheStore::put`). With a shared tier, its Redis half can be handed
/// to the fleet's flights (`hand_over`), which write the answer with the
/// release of their claim; the cache still decides whether the answer goes
/// there, names its key and encodes it (`SharedFill`).
pub(crate) struct Fill {
    cache: Arc<CacheStore>,
    key: Key,
    shared: Tier,
}

#[derive(Debug)]
enum Tier {
    /// No shared tier: memory only, for the whole TTL.
    None,
    /// The relay's `put` writes Redis too.
    Here(SharedFill),
    /// The fleet's flights write Redis; memory keeps a short copy.
    HandedOver,
}

impl Fill {
    /// Stores the complete answer (`CacheStore::put`).
    pub(crate) fn store(self, entry: Arc<Entry>) {
        let cache = Arc::clone(&self.cache);
        cache.put(self, entry);
    }

    /// Takes the Redis half of this fill, for the fleet's flights to write
    /// with their end; `None` without a shared tier.
    pub(crate) fn hand_over(&mut self) -> Option<SharedFill> {
        match std::mem::replace(&mut self.shared, Tier::HandedOver) {
            Tier::Here(s) => Some(s),
            Tier::None => {
                self.shared = Tier::None;
                None
            }
            Tier::HandedOver => None,
        }
    }
}

/// How an answer goes into Redis, decided by the cache: its time to live,
/// and the size past which it stays in memory only.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedFill {
    ttl_ms: u64,
    max_entry_bytes: u64,
}

impl SharedFill {
    /// The time to live of `entry` in Redis, or `None` when it stays out
    /// of Redis (larger than `cache_max_entry_bytes`, as encoded).
    pub(crate) fn ttl_ms(&self, entry: &Entry) -> Option<u64> {
        (encoded_len(entry) as u64 <= self.max_entry_bytes).then_some(self.ttl_ms)
    }
}

impl CacheStore {
    /// `redis`: the shared tier, when `[redis] cache` is on.
    #[expect(
        clippy::expect_used,
        reason = "metric definitions are static; a bad one is a bug caught by every test"
    )]
    pub(crate) fn new(
        local: Store,
        redis: Option<(&Arc<Redis>, &RedisConfig)>,
        registry: &prometheus::Registry,
    ) -> CacheStore {
        let shared = redis.filter(|(_, c)| c.cache).map(|(redis, c)| {
            let lookups = prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "sluice_cache_shared_lookups_total",
                    "Lookups that missed memory and were answered by Redis: found there or not.",
                ),
                &["result"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(lookups.clone()))
                .expect("unique metric");
            Shared {
                redis: Arc::clone(redis),
                max_entry_bytes: c.cache_max_entry_bytes,
                read_by: if c.coalesce {
                    SharedReads::FleetLookup
                } else {
                    SharedReads::Get
                },
                writes: Arc::new(Semaphore::new(WRITES_IN_FLIGHT)),
                found: lookups.with_label_values(&["hit"]),
                not_found: lookups.with_label_values(&["miss"]),
            }
        });
        CacheStore { local, shared }
    }

    /// The in-memory tier (for its gauges).
    pub(crate) fn local(&self) -> &Store {
        &self.local
    }

    /// Memory first, then Redis, unless the fleet's flights read Redis for
    /// this cache (in the round trip that claims the call).
    pub(crate) async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        if let Some(e) = self.local.get(key) {
            return Some(e);
        }
        let shared = self.shared.as_ref()?;
        if shared.read_by == SharedReads::FleetLookup {
            return None;
        }
        let bytes: Option<Vec<u8>> = shared
            .redis
            .query(Op::CacheGet, redis::cmd("GET").arg(shared.key(key)))
            .await
            .ok()?;
        match bytes {
            Some(bytes) => self.adopt(key, &bytes),
            None => {
                self.shared_missed();
                None
            }
        }
    }

    /// Whether the fleet's flights read Redis for this cache.
    pub(crate) fn read_by_fleet(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.read_by == SharedReads::FleetLookup)
    }

    /// An entry Redis had for `key` (its portable form, read by whoever
    /// asked): decoded and kept in memory too; `None`, counted as a miss,
    /// for what does not decode.
    pub(crate) fn adopt(&self, key: &Key, bytes: &[u8]) -> Option<Arc<Entry>> {
        let Some(entry) = decode(bytes) else {
            self.shared_missed();
            return None;
        };
        if let Some(shared) = &self.shared {
            shared.found.inc();
        }
        let entry = Arc::new(entry);
        let left = self.local.ttl().saturating_sub(entry.age());
        self.local
            .insert_for(*key, Arc::clone(&entry), left.min(SHARED_COPY_TTL));
        Some(entry)
    }

    /// Counts a lookup Redis answered with nothing.
    pub(crate) fn shared_missed(&self) {
        if let Some(shared) = &self.shared {
            shared.not_found.inc();
        }
    }

    /// The right to store the answer to `key`.
    pub(crate) fn fill(self: &Arc<Self>, key: Key) -> Fill {
        let shared = match &self.shared {
            None => Tier::None,
            Some(s) => Tier::Here(SharedFill {
                ttl_ms: self.local.ttl().as_millis() as u64,
                max_entry_bytes: s.max_entry_bytes,
            }),
        };
        Fill {
            cache: Arc::clone(self),
            key,
            shared,
        }
    }

    /// Stores a complete answer: memory at once; Redis from a task, never
    /// delaying the caller, unless the fill's Redis half was handed over.
    fn put(&self, fill: Fill, entry: Arc<Entry>) {
        let Fill { key, shared, .. } = fill;
        let Some(tier) = &self.shared else {
            self.local.insert(key, entry);
            return;
        };
        if encoded_len(&entry) as u64 > tier.max_entry_bytes {
            self.local.insert(key, entry);
            return;
        }
        // The command is built here, so the entry's age is taken now.
        let cmd = match shared {
            Tier::Here(fill) => {
                let name = tier.key(&key);
                let mut cmd = redis::Cmd::with_capacity(5, name.len() + encoded_len(&entry) + 32);
                cmd.arg("SET").arg(name);
                encode_into(&entry, &mut cmd.writer_for_next_arg());
                cmd.arg("PX").arg(fill.ttl_ms);
                Some(cmd)
            }
            Tier::None | Tier::HandedOver => None,
        };
        self.local
            .insert_for(key, entry, SHARED_COPY_TTL.min(self.local.ttl()));
        let Some(cmd) = cmd else {
            return;
        };
        let Ok(permit) = Arc::clone(&tier.writes).try_acquire_owned() else {
            return;
        };
        let redis = Arc::clone(&tier.redis);
        tokio::spawn(async move {
            let _: Result<(), _> = redis.query(Op::CachePut, &cmd).await;
            drop(permit);
        });
    }
}

impl Shared {
    fn key(&self, key: &Key) -> String {
        redis_key(self.redis.key_prefix(), key, "cache")
    }
}

/// The Redis key of `part` (`cache`, or a flight's `lead`, `log`, `n`) for
/// a cache key: `prefix:{<hex of the key>}:part`. The key already holds the
/// scope; the hash tag keeps an answer and its flight in one cluster slot,
/// so one script can look up the answer and claim the call.
pub(crate) fn redis_key(prefix: &str, key: &Key, part: &str) -> String {
    let mut hex = [0u8; 64];
    let mut out = String::with_capacity(prefix.len() + 68 + part.len());
    out.push_str(prefix);
    out.push_str(":{");
    if hex::encode_to_slice(key, &mut hex).is_ok() {
        out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    }
    out.push_str("}:");
    out.push_str(part);
    out
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The length of an entry's portable form.
pub(crate) fn encoded_len(entry: &Entry) -> usize {
    MAGIC.len() + 8 + entry.completion.len()
}

/// Writes the portable form of an entry (into a command's argument, so
/// the completion is copied once).
pub(crate) fn encode_into(entry: &Entry, out: &mut impl std::io::Write) {
    let stored = unix_ms(SystemTime::now()).saturating_sub(entry.age().as_millis() as u64);
    // Writes into memory (a `Vec` or a command's buffer) do not fail.
    let _ = out
        .write_all(magic(entry.format))
        .and_then(|()| out.write_all(&stored.to_be_bytes()))
        .and_then(|()| out.write_all(&entry.completion));
}

/// The portable form of an entry, on its own.
#[cfg(test)]
fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(entry));
    encode_into(entry, &mut out);
    out
}

/// An entry from its portable form; `None` for anything else (another
/// version, or not an entry at all): a miss.
pub(crate) fn decode(bytes: &[u8]) -> Option<Entry> {
    let (format, rest) = match bytes.split_at_checked(MAGIC.len())? {
        (m, rest) if m == MAGIC => (Format::OpenAi, rest),
        (m, rest) if m == MAGIC_ANTHROPIC => (Format::Anthropic, rest),
        _ => return None,
    };
    let (stored, completion) = rest.split_at_checked(8)?;
    let stored = u64::from_be_bytes(stored.try_into().ok()?);
    let mut entry = Entry::from_completion(Bytes::copy_from_slice(completion), format)?;
    let age = Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(stored));
    entry.stored_at = std::time::Instant::now()
        .checked_sub(age)
        .unwrap_or(entry.stored_at);
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_crosses_replicas_whole() {
        let completion = Bytes::from_static(
            br#"{"id":"x","object":"chat.completion","model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"hi","reasoning_content":"r"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        );
        let entry = Entry::from_completion(completion.clone(), Format::OpenAi).expect("entry");
        let bytes = encode(&entry);
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back.completion, completion);
        assert_eq!(back.usage, entry.usage);
        assert_eq!(
            back.replay().expect("replays").chunks,
            entry.replay().expect("replays").chunks,
            "replay rebuilt alike"
        );
        assert!(back.age() < Duration::from_secs(2));
        assert!(decode(b"SLC2....").is_none(), "another version is a miss");
        assert!(decode(b"garbage").is_none());
        let mut old = bytes.to_vec();
        old[4..12].copy_from_slice(&(unix_ms(SystemTime::now()) - 90_000).to_be_bytes());
        let aged = decode(&old).expect("decodes");
        assert!(
            aged.age() >= Duration::from_secs(89),
            "age from the first store"
        );
        // An Anthropic message crosses as one, under its own magic.
        let message = Bytes::from_static(
            br#"{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":2}}"#,
        );
        let entry = Entry::from_completion(message.clone(), Format::Anthropic).expect("entry");
        let bytes = encode(&entry);
        assert!(bytes.starts_with(b"SLA1"));
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back.format, Format::Anthropic);
        assert_eq!(back.completion, message);
        assert_eq!(back.usage, entry.usage);
    }
}
