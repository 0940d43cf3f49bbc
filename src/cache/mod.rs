//! The exact-match cache (docs/api.md, "Cache"): the key (SHA-256 over scope, endpoint
//! and canonical JSON), the store (moka, weighed by bytes, TTL), and the
//! in-flight map that coalesces identical requests onto one upstream call.
//!
//! An entry holds the completion bytes, checked and its usage read at store
//! time without building a tree, and its SSE replay, built the first time a
//! streaming client hits it: a miss pays nothing for a replay it may never
//! need, and every hit after the first in either mode is served from bytes
//! without parsing.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::json::Scan;
use crate::api::usage::Usage;
use crate::api::{trim_leading_ws, Format, Replay};

mod store;
pub(crate) mod tiered;

pub use store::Store;

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
    /// The API format of the answer (the endpoint is in the key, so one
    /// key's answers are always of one format).
    pub format: Format,
    /// The completion (or message) as the non-streaming endpoint answers it.
    pub completion: Bytes,
    /// The same completion as SSE chunks (without `[DONE]`), built at the
    /// first streaming hit: see [`Entry::replay`].
    replay: OnceLock<Option<Replay>>,
    /// `None` when upstream's answer carried no usage.
    pub usage: Option<Usage>,
    pub(crate) stored_at: Instant,
}

impl Entry {
    /// Builds an entry from a complete 200 body; `None` if it is not an
    /// answer of its format (invalid JSON; for OpenAI no choices, a chat
    /// choice without a message; for Anthropic no content blocks): such
    /// answers are never stored.
    pub fn from_completion(body: Bytes, format: Format) -> Option<Entry> {
        let trimmed = trim_leading_ws(&body);
        let offset = body.len() - trimmed.len();
        let usage = format.facts(trimmed)?.usage;
        Some(Entry {
            format,
            completion: body.slice(offset..),
            replay: OnceLock::new(),
            usage,
            stored_at: Instant::now(),
        })
    }

    /// Builds an entry from an assembled stream.
    pub fn from_assembled(value: &Value, format: Format) -> Option<Entry> {
        Self::from_completion(Bytes::from(serde_json::to_vec(value).ok()?), format)
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
                    .and_then(|v| self.format.replay(&v))
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

    pub(crate) fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn an_answer_whose_tree_does_not_parse_has_no_replay_never_an_empty_one() {
        let ok = Entry::from_completion(
            Bytes::from_static(
                br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
            ),
            Format::OpenAi,
        )
        .expect("stored");
        assert!(ok.replay().is_some_and(|r| !r.chunks.is_empty()));
        // Stored (the check skips what it does not need), but no replay:
        // served to non-streaming clients only.
        for body in [
            &br#"{"choices":[{"message":{"content":"a"}}],"created":1e400}"#[..],
            br#"{"choices":[{"message":{"content":"\ud83d"}}]}"#,
        ] {
            let e =
                Entry::from_completion(Bytes::from_static(body), Format::OpenAi).expect("stored");
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
            &crate::api::json::scan(body.as_bytes(), crate::api::json::Canonical::Write)
                .expect("json"),
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
        let body = crate::api::json::scan(raw.as_bytes(), crate::api::json::Canonical::Write)
            .expect("json");
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
            let e = Entry::from_completion(Bytes::from(body.to_string()), Format::OpenAi)
                .expect("entry");
            let raw = json!({ "i": i }).to_string();
            let body = crate::api::json::scan(raw.as_bytes(), crate::api::json::Canonical::Write)
                .expect("json");
            store.insert(key(None, "chat", &body), Arc::new(e));
        }
        let (entries, bytes) = store.stats();
        assert!(bytes <= 64 * 1024, "{bytes}");
        assert!(entries > 0 && entries < 200);
    }

    #[test]
    fn only_completions_become_entries() {
        for format in [Format::OpenAi, Format::Anthropic] {
            assert!(Entry::from_completion(Bytes::from_static(b"not json"), format).is_none());
            assert!(
                Entry::from_completion(Bytes::from_static(b"{\"error\":{}}"), format).is_none()
            );
        }
        let e = Entry::from_completion(Bytes::from_static(b"\n\n{\"choices\":[]}"), Format::OpenAi)
            .expect("entry");
        assert_eq!(&e.completion[..], b"{\"choices\":[]}");
        // Each format takes its own answers only.
        let message = Bytes::from_static(
            br#"{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"output_tokens":2}}"#,
        );
        assert!(Entry::from_completion(message.clone(), Format::OpenAi).is_none());
        let e = Entry::from_completion(message, Format::Anthropic).expect("a message");
        assert_eq!(e.usage.map(|u| u.total), Some(5));
        let replay = e.replay().expect("replay");
        assert!(replay.chunks.starts_with(b"event: message_start\n"));
        assert!(Entry::from_completion(e.completion.clone(), Format::OpenAi).is_none());
    }
}
