//! Reading usage out of a non-streaming completion body (the fast path that
//! looks for the last `"usage"` key, and its fallback), and building a cache
//! entry from it, on bytes an upstream could send.
//!
//! Checked: no panic; when the body is a JSON object whose only `"usage"`
//! is its top-level member, and that member is a well-formed usage object
//! (no repeated field, numbers where numbers go), the fast path reads what a
//! full parse reads;
//! an entry's replay builds (the body was checked without a tree when it
//! was stored) and carries the usage the entry was stored with.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::cache::Entry;
use sluice::api::openai;
use sluice::api::sse;
use sluice::api::usage::Usage;
use sluice::api::Format;

/// DeepSeek's and OpenAI's usage fields, with the types they have: a body
/// that parses into this (serde refuses repeated fields) has a usage that
/// both of Sluice's readers must read alike.
#[derive(serde::Deserialize)]
#[allow(dead_code, reason = "only whether it parses matters")]
struct Strict {
    usage: Option<StrictUsage>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code, reason = "only whether it parses matters")]
struct StrictUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    total_tokens: Option<u64>,
    prompt_cache_hit_tokens: Option<u64>,
    prompt_cache_miss_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code, reason = "only whether it parses matters")]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

fuzz_target!(|data: &[u8]| {
    let fast = openai::usage_of_completion(data);
    let _ = openai::inspect(data);

    if let Ok(v) = serde_json::from_slice::<Value>(openai::trim_leading_ws(data)) {
        let once = data.windows(7).filter(|w| w == b"\"usage\"").count() == 1;
        let strict = serde_json::from_slice::<Strict>(openai::trim_leading_ws(data))
            .is_ok_and(|s| s.usage.is_some());
        if let (true, true, Some(u)) = (once, strict, v.get("usage")) {
            // The full parse as the slow path would do it.
            let slow = Usage::from_value(u);
            if slow.is_some() {
                assert_eq!(fast, slow, "usage fast path disagrees");
            }
        }
    }

    if let Some(entry) = Entry::from_completion(Bytes::copy_from_slice(data), Format::OpenAi) {
        assert!(entry.weight() as usize >= entry.completion.len());
        // What is stored was checked without a tree; its replay, built at
        // the first streaming hit, is the tree's replay (or none, for an
        // answer whose tree does not parse: it then serves only
        // non-streaming clients). Never an empty stand-in.
        let tree = serde_json::from_slice::<Value>(&entry.completion).ok();
        assert_eq!(
            entry.replay().map(|r| r.chunks.clone()),
            tree.as_ref().and_then(openai::replay).map(|r| r.chunks),
            "the replay is the stored answer's"
        );
        let usage = entry
            .replay()
            .and_then(|r| r.usage_chunk.as_deref())
            .map(|c| {
                let sse::EventData::Data(d) = sse::event_data(c) else {
                    panic!("the usage chunk is a data event");
                };
                openai::inspect(&d).expect("a replayed chunk is JSON").usage
            });
        if let Some(u) = usage {
            assert_eq!(u, entry.usage, "replayed usage");
        }
    }
});
