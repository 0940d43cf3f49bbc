//! Token usage as upstream reports it, and the estimate for an answer
//! whose usage never arrived.

use serde_json::Value;

use crate::api::json;

/// Token usage as DeepSeek reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    pub(crate) prompt_cache_hit: u64,
    pub(crate) prompt_cache_miss: u64,
    pub(crate) reasoning: u64,
}

/// A `usage` object's fields as upstream wrote them.
#[derive(Default)]
struct RawUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: Option<u64>,
    prompt_cache_hit_tokens: Option<u64>,
    prompt_cache_miss_tokens: Option<u64>,
    /// `prompt_tokens_details.cached_tokens`.
    cached_tokens: Option<u64>,
    /// `completion_tokens_details.reasoning_tokens`.
    reasoning_tokens: Option<u64>,
}

/// A JSON integer that fits in a `u64` (the value is valid JSON already).
fn integer(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `null` (`Some(None)`) or an integer; `None` for anything else.
fn optional(v: &[u8]) -> Option<Option<u64>> {
    if v == b"null" {
        return Some(None);
    }
    integer(v).map(Some)
}

/// The one member `name` of a details object, or of `null` (none). Of a
/// repeated member the last is read, as a tree keeps it: a wrong type
/// before a right one does not count.
fn detail(v: &[u8], name: &[u8]) -> Option<Option<u64>> {
    if v == b"null" {
        return Some(None);
    }
    let mut found = Some(None);
    json::each_member(v, |k, v| {
        if k == name {
            found = optional(v);
        }
        true
    })?;
    found
}

impl RawUsage {
    /// Reads the `usage` object at the start of `bytes`, by hand: every
    /// answer's usage is read on the request path, and a derived
    /// deserializer spent most of its time matching key strings. Unknown
    /// keys are skipped; of a repeated key the last is read, as a tree
    /// keeps it; a known key whose (last) value has the wrong type makes
    /// it `None`.
    fn read(bytes: &[u8]) -> Option<RawUsage> {
        let mut raw = RawUsage::default();
        // The known keys whose last value so far had the wrong type.
        let mut wrong = 0u8;
        json::each_member(bytes, |key, v| {
            let set = |field: &mut Option<u64>| optional(v).map(|n| *field = n).is_some();
            let (bit, right) = match key {
                b"prompt_tokens" => (1, integer(v).map(|n| raw.prompt_tokens = n).is_some()),
                b"completion_tokens" => {
                    (2, integer(v).map(|n| raw.completion_tokens = n).is_some())
                }
                b"total_tokens" => (4, set(&mut raw.total_tokens)),
                b"prompt_cache_hit_tokens" => (8, set(&mut raw.prompt_cache_hit_tokens)),
                b"prompt_cache_miss_tokens" => (16, set(&mut raw.prompt_cache_miss_tokens)),
                b"prompt_tokens_details" => (
                    32,
                    detail(v, b"cached_tokens")
                        .map(|n| raw.cached_tokens = n)
                        .is_some(),
                ),
                b"completion_tokens_details" => (
                    64,
                    detail(v, b"reasoning_tokens")
                        .map(|n| raw.reasoning_tokens = n)
                        .is_some(),
                ),
                _ => return true,
            };
            if right {
                wrong &= !bit;
            } else {
                wrong |= bit;
            }
            true
        })?;
        (wrong == 0).then_some(raw)
    }
}

impl Usage {
    /// Reads a `usage` object already parsed into a tree, by the same
    /// rules as `read` but written apart from it (the fuzz target and the
    /// tests hold one against the other); `None` if it is not one.
    pub fn from_value(v: &Value) -> Option<Usage> {
        let o = v.as_object()?;
        // Missing: the default; `null`: none; anything but an integer: no
        // usage at all.
        let optional = |k: &str| match o.get(k) {
            None | Some(Value::Null) => Some(None),
            Some(n) => n.as_u64().map(Some),
        };
        let required = |k: &str| o.get(k).map_or(Some(0), Value::as_u64);
        let detail = |k: &str, name: &str| match o.get(k) {
            None | Some(Value::Null) => Some(None),
            Some(Value::Object(d)) => match d.get(name) {
                None | Some(Value::Null) => Some(None),
                Some(n) => n.as_u64().map(Some),
            },
            Some(_) => None,
        };
        Some(Self::from_raw(RawUsage {
            prompt_tokens: required("prompt_tokens")?,
            completion_tokens: required("completion_tokens")?,
            total_tokens: optional("total_tokens")?,
            prompt_cache_hit_tokens: optional("prompt_cache_hit_tokens")?,
            prompt_cache_miss_tokens: optional("prompt_cache_miss_tokens")?,
            cached_tokens: detail("prompt_tokens_details", "cached_tokens")?,
            reasoning_tokens: detail("completion_tokens_details", "reasoning_tokens")?,
        }))
    }

    /// Reads the `usage` object at the start of `bytes`; `None` if it is
    /// not one.
    pub(crate) fn read(bytes: &[u8]) -> Option<Usage> {
        RawUsage::read(bytes).map(Self::from_raw)
    }

    fn from_raw(raw: RawUsage) -> Usage {
        let hit = raw
            .prompt_cache_hit_tokens
            .or(raw.cached_tokens)
            .unwrap_or(0);
        Usage {
            prompt: raw.prompt_tokens,
            completion: raw.completion_tokens,
            total: raw
                .total_tokens
                .unwrap_or(raw.prompt_tokens.saturating_add(raw.completion_tokens)),
            prompt_cache_hit: hit,
            prompt_cache_miss: raw
                .prompt_cache_miss_tokens
                .unwrap_or(raw.prompt_tokens.saturating_sub(hit)),
            reasoning: raw.reasoning_tokens.unwrap_or(0),
        }
    }

    /// What a tenant's token bucket is charged: prompt + completion.
    pub(crate) fn billable(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }

    /// A guess for a request whose usage never arrived (docs/api.md): four
    /// characters a token, rounded up, of text only — the request's
    /// messages or prompt, and the text generated and sent (content,
    /// reasoning_content, tool-call arguments) — never of JSON or SSE
    /// framing.
    pub(crate) fn estimate(prompt_chars: u64, completion_chars: u64) -> Usage {
        let prompt = prompt_chars.div_ceil(4);
        let completion = completion_chars.div_ceil(4);
        Usage {
            prompt,
            completion,
            total: prompt + completion,
            prompt_cache_hit: 0,
            prompt_cache_miss: prompt,
            reasoning: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand reader, checked against the tree's reading of the same
    /// text.
    fn read(s: &str) -> Option<Usage> {
        let by_hand = Usage::read(s.as_bytes());
        let tree = serde_json::Deserializer::from_str(s)
            .into_iter::<Value>()
            .next()
            .and_then(Result::ok);
        if let Some(tree) = tree {
            assert_eq!(by_hand, Usage::from_value(&tree), "{s}");
        }
        by_hand
    }

    #[test]
    fn reads_deepseek_and_openai_usage() {
        let u = read(
            r#" {"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,
                "prompt_tokens_details":{"cached_tokens":4},
                "prompt_cache_hit_tokens":4,"prompt_cache_miss_tokens":6,
                "completion_tokens_details":{"reasoning_tokens":2,"other":[1,{"x":null}]}}}trailing"#,
        )
        .expect("usage");
        assert_eq!(
            u,
            Usage {
                prompt: 10,
                completion: 5,
                total: 15,
                prompt_cache_hit: 4,
                prompt_cache_miss: 6,
                reasoning: 2
            }
        );
        // OpenAI's shape: the cache hit from the details, the rest derived.
        let u = read(r#"{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":3}}"#)
            .expect("usage");
        assert_eq!(
            (u.total, u.prompt_cache_hit, u.prompt_cache_miss),
            (15, 3, 7)
        );
        // Missing fields are zero; unknown ones of any type are skipped.
        let u = read(r#"{"weird":{"a":[true,"\"}"]},"completion_tokens":1}"#).expect("usage");
        assert_eq!((u.prompt, u.completion, u.total), (0, 1, 1));
    }

    #[test]
    fn nulls_repeats_and_wrong_types() {
        let u = read(r#"{"prompt_tokens":1,"total_tokens":null,"prompt_tokens_details":null}"#)
            .expect("null is none");
        assert_eq!(u.total, 1);
        let u = read(r#"{"prompt_tokens":1,"prompt_tokens":7}"#).expect("repeated");
        assert_eq!(u.prompt, 7, "the last wins");
        // The last is read, as a tree keeps it: a wrong type before a right
        // one does not count, a right one before a wrong one does not save it.
        let u = read(
            r#"{"prompt_tokens":"x","prompt_tokens":12,"completion_tokens":5,
                "completion_tokens_details":4,"completion_tokens_details":{"reasoning_tokens":"y","reasoning_tokens":2},
                "prompt_tokens_details":{"cached_tokens":3,"cached_tokens":null}}"#,
        )
        .expect("the last of each is right");
        assert_eq!((u.prompt, u.reasoning, u.prompt_cache_hit), (12, 2, 0));
        for bad in [
            r#"{"prompt_tokens":12,"prompt_tokens":"x"}"#,
            r#"{"completion_tokens_details":{"reasoning_tokens":2},"completion_tokens_details":4}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":3,"cached_tokens":[]}}"#,
        ] {
            assert_eq!(read(bad), None, "{bad}");
        }
        for bad in [
            r#"{"prompt_tokens":null}"#,
            r#"{"prompt_tokens":"3"}"#,
            r#"{"prompt_tokens":1.5}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":"x"}}"#,
            r#"{"completion_tokens_details":[]}"#,
            r#"{"prompt_tokens":1"#,
            r#"[1]"#,
            r#"{"prompt_tokens":01}"#,
            "",
        ] {
            assert_eq!(read(bad), None, "{bad}");
        }
    }
}
