//! The in-memory store: moka, weighed by bytes, each entry expiring after
//! its own time to live.

use std::sync::Arc;
use std::time::Duration;

use super::{Entry, Key};

/// The in-memory store: moka, weighed by bytes, each entry expiring after
/// its own time to live (the TTL, or less for a copy of a shared entry).
pub struct Store {
    /// Hashed with foldhash (seeded per process): its keys are SHA-256
    /// digests, and a lookup on every keyed request need not pay SipHash.
    cache: moka::sync::Cache<Key, Stored, foldhash::fast::RandomState>,
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
                .build_with_hasher(foldhash::fast::RandomState::default()),
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
    pub(crate) fn insert_for(&self, key: Key, entry: Arc<Entry>, ttl: Duration) {
        // An entry bigger than the whole cache would only evict everything.
        if u64::from(entry.weight()) <= self.cache.policy().max_capacity().unwrap_or(u64::MAX) {
            let ttl = ttl.min(self.ttl);
            if !ttl.is_zero() {
                self.cache.insert(key, Stored { entry, ttl });
            }
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// (entries, bytes), after applying pending evictions.
    pub(crate) fn stats(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}
