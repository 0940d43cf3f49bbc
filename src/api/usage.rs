//! Token usage as upstream reports it, and the estimate for an answer
//! whose usage never arrived.

use serde::Deserialize;
use serde_json::Value;

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

#[derive(Deserialize)]
pub(crate) struct RawUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u64>,
    #[serde(default)]
    prompt_cache_miss_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Reads a `usage` object; `None` if it is not one.
    pub fn from_value(v: &Value) -> Option<Usage> {
        if !v.is_object() {
            return None;
        }
        let raw: RawUsage = serde_json::from_value(v.clone()).ok()?;
        Some(Self::from_raw(raw))
    }

    pub(crate) fn from_raw(raw: RawUsage) -> Usage {
        let hit = raw
            .prompt_cache_hit_tokens
            .or(raw.prompt_tokens_details.and_then(|d| d.cached_tokens))
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
            reasoning: raw
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
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
