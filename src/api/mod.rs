//! The client API's vocabulary and wire formats. `Endpoint`, `Format` and
//! `CacheState` name what a request is and how it was answered (they are
//! also metric labels); the submodules are plain functions over bytes: the
//! strict scan of a request body (`json`), counting a prompt's text
//! (`text`), SSE framing (`sse`), usage and its estimate (`usage`), and one
//! module per API format (`openai`, `anthropic`: what an event says,
//! assembling a stream into an answer, replaying an answer as a stream,
//! the facts of a whole answer, the shape of an error body).
//!
//! `Format` is the seam: the rest of Sluice asks it for the format's
//! reading of a stream (`StreamReader`, `StreamAssembler`, `EventInfo`),
//! of a whole answer, its replay and its stream's end, and never names a
//! format module itself. A third format is a module beside these two and
//! an arm in each `match` here.
//! Imports no other Sluice module.

pub mod anthropic;
pub mod json;
pub mod openai;
pub mod sse;
pub(crate) mod text;
pub mod usage;

use bytes::Bytes;
use serde_json::Value;

use openai::Shape;
use usage::Usage;

/// An API endpoint Sluice serves (the route table is `http::routes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    ChatPrefix,
    Fim,
    Models,
    /// Anthropic's Messages API.
    Messages,
    /// Anthropic's token counting (`/v1/messages/count_tokens`).
    CountTokens,
}

impl Endpoint {
    /// Every endpoint, in the order of `index`.
    pub(crate) const ALL: [Endpoint; 6] = [
        Endpoint::Chat,
        Endpoint::ChatPrefix,
        Endpoint::Fim,
        Endpoint::Models,
        Endpoint::Messages,
        Endpoint::CountTokens,
    ];

    /// The `endpoint` metric label (and a part of the cache key).
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::ChatPrefix => "chat_prefix",
            Endpoint::Fim => "fim",
            Endpoint::Models => "models",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
        }
    }

    /// Its place in `ALL`.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The path appended to the upstream's base URL for the endpoint's
    /// format (`base_url`, or `anthropic_base_url` for the Messages API).
    pub(crate) fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::ChatPrefix => "/beta/chat/completions",
            Endpoint::Fim => "/beta/completions",
            Endpoint::Models => "/models",
            Endpoint::Messages => "/v1/messages",
            Endpoint::CountTokens => "/v1/messages/count_tokens",
        }
    }

    /// Whether the client sends a body (and the request goes through the
    /// body, cache and upstream phases) or only asks (`GET /models`).
    pub(crate) fn takes_body(self) -> bool {
        match self {
            Endpoint::Chat
            | Endpoint::ChatPrefix
            | Endpoint::Fim
            | Endpoint::Messages
            | Endpoint::CountTokens => true,
            Endpoint::Models => false,
        }
    }

    /// Whether its answers are answers to store, share and meter (a
    /// completion or a message), or only facts about a request (a token
    /// count: never cached or coalesced, and it spends nothing).
    pub(crate) fn generates(self) -> bool {
        match self {
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Fim | Endpoint::Messages => true,
            Endpoint::Models | Endpoint::CountTokens => false,
        }
    }

    /// The shape of its answers' choices.
    pub(crate) fn shape(self) -> Shape {
        match self {
            Endpoint::Fim => Shape::Text,
            Endpoint::Chat
            | Endpoint::ChatPrefix
            | Endpoint::Models
            | Endpoint::Messages
            | Endpoint::CountTokens => Shape::Chat,
        }
    }

    /// The wire format it speaks.
    pub fn format(self) -> Format {
        match self {
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Fim | Endpoint::Models => {
                Format::OpenAi
            }
            Endpoint::Messages | Endpoint::CountTokens => Format::Anthropic,
        }
    }
}

/// An API format: how streams are framed and read, where usage is, how a
/// stream assembles into a whole answer and a whole answer replays as a
/// stream, how error bodies look. Limits, the cache, flights, budgets and
/// the upstream pool are the same for every format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenAI's (and DeepSeek's) chat and text completions.
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

impl Format {
    /// Reads a stream's events without assembling them.
    pub fn reader(self) -> StreamReader {
        match self {
            Format::OpenAi => StreamReader::OpenAi,
            Format::Anthropic => StreamReader::Anthropic(Box::default()),
        }
    }

    /// Reads and assembles a stream's events into the whole answer.
    pub fn assembler(self, shape: Shape) -> StreamAssembler {
        match self {
            Format::OpenAi => StreamAssembler::OpenAi(openai::Assembler::new(shape)),
            Format::Anthropic => StreamAssembler::Anthropic(Box::default()),
        }
    }

    /// What storing a whole answer needs to know of it; `None` for what
    /// is not one of this format's answers (never stored).
    pub(crate) fn facts(self, body: &[u8]) -> Option<Completion> {
        match self {
            Format::OpenAi => openai::completion_facts(body),
            Format::Anthropic => anthropic::message_facts(body),
        }
    }

    /// The usage of a whole non-streaming answer.
    pub fn usage_of_answer(self, body: &[u8]) -> Option<Usage> {
        match self {
            Format::OpenAi => openai::usage_of_completion(body),
            Format::Anthropic => anthropic::usage_of_message(body),
        }
    }

    /// Characters of generated text in a whole answer, for the estimate.
    pub(crate) fn answer_text_chars(self, body: &[u8]) -> u64 {
        match self {
            Format::OpenAi => openai::completion_text_chars(body),
            Format::Anthropic => anthropic::message_text_chars(body),
        }
    }

    /// A stored answer as the events of a stream.
    pub fn replay(self, answer: &Value) -> Option<Replay> {
        match self {
            Format::OpenAi => openai::replay(answer),
            Format::Anthropic => anthropic::replay(answer),
        }
    }

    /// What ends a replayed stream after its events (OpenAI's `[DONE]`;
    /// an Anthropic replay ends with its own `message_stop`).
    pub(crate) fn replay_end(self) -> Option<&'static [u8]> {
        match self {
            Format::OpenAi => Some(sse::DONE_EVENT),
            Format::Anthropic => None,
        }
    }
}

/// What the relay needs to know of one event of a stream, in any format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventInfo {
    /// OpenAI's usage-only chunk: sent only to clients that asked for it.
    pub usage_only: bool,
    /// The stream's usage as of this event, when this event reported some.
    pub usage: Option<Usage>,
    /// An error from upstream, not part of an answer (never cached).
    pub is_error: bool,
    /// Characters of generated text in the event, for the usage estimate.
    pub text_chars: u64,
    /// Nothing of the answer follows this event (Anthropic's
    /// `message_stop`, or its `error`; OpenAI's `[DONE]` is no JSON and is
    /// framed apart).
    pub ends: bool,
    /// The event carries generated content: the first one is the time to
    /// first token.
    pub token: bool,
    /// A keep-alive (Anthropic's `ping`): forwarded, but it starts no
    /// stream and resets no idle clock, like an SSE comment.
    pub keepalive: bool,
    /// `usage` lacks the answer's own count so far (Anthropic's
    /// `message_start` reports the prompt; its `output_tokens` is a
    /// placeholder until `message_delta`).
    pub usage_partial: bool,
}

impl From<openai::ChunkInfo> for EventInfo {
    fn from(c: openai::ChunkInfo) -> EventInfo {
        EventInfo {
            usage_only: c.usage_only,
            usage: c.usage,
            is_error: c.is_error,
            text_chars: c.text_chars,
            ends: false,
            token: true,
            keepalive: false,
            usage_partial: false,
        }
    }
}

/// Reads a stream's events (without assembling them), in its format.
#[derive(Debug)]
pub enum StreamReader {
    OpenAi,
    /// Boxed, so OpenAI's relay is no larger for it.
    Anthropic(Box<anthropic::Tally>),
}

impl StreamReader {
    /// One event's data: `Err` if it is not JSON at all.
    pub fn read(&mut self, data: &[u8]) -> Result<EventInfo, serde_json::Error> {
        match self {
            StreamReader::OpenAi => openai::inspect(data).map(EventInfo::from),
            StreamReader::Anthropic(t) => t.read(data),
        }
    }
}

/// Assembles a stream's events into the whole answer, in its format; each
/// event is read as `StreamReader::read` reads it.
#[derive(Debug)]
pub enum StreamAssembler {
    OpenAi(openai::Assembler),
    /// Boxed, so OpenAI's relay is no larger for it.
    Anthropic(Box<anthropic::Assembler>),
}

impl StreamAssembler {
    pub fn push(&mut self, data: &[u8]) -> Result<EventInfo, serde_json::Error> {
        match self {
            StreamAssembler::OpenAi(a) => a.push(data).map(EventInfo::from),
            StreamAssembler::Anthropic(a) => a.push(data),
        }
    }

    /// Whether every event pushed was assembled.
    pub fn is_whole(&self) -> bool {
        match self {
            StreamAssembler::OpenAi(a) => a.is_whole(),
            StreamAssembler::Anthropic(a) => a.is_whole(),
        }
    }

    /// The whole answer, as the non-streaming call would have given it.
    pub fn finish(self) -> Value {
        match self {
            StreamAssembler::OpenAi(a) => a.finish(),
            StreamAssembler::Anthropic(a) => (*a).finish(),
        }
    }
}

/// An answer replayed as SSE: its events, and (OpenAI) the usage-only
/// chunk on its own so it can be sent only to clients that asked for it.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    pub chunks: Bytes,
    pub usage_chunk: Option<Bytes>,
}

/// A whole non-streaming answer, as a format's facts found it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Completion {
    /// Its usage; `None` when it has none.
    pub(crate) usage: Option<Usage>,
}

/// Upstream may send blank lines before a non-streaming JSON body.
pub fn trim_leading_ws(body: &[u8]) -> &[u8] {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    &body[start..]
}

/// Any JSON object, skipped; anything else is refused.
pub(crate) struct AnyObject;

impl<'de> serde::Deserialize<'de> for AnyObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};
        struct Skip;
        impl<'de> Visitor<'de> for Skip {
            type Value = AnyObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<AnyObject, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnyObject)
            }
        }
        d.deserialize_map(Skip)
    }
}

/// How a request used the cache: the `x-sluice-cache` header's value and
/// the `cache` metric label. A request that never reached the cache step (a
/// refusal, `GET /models`) has none (`cache="none"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheState {
    Miss,
    Hit,
    Coalesced,
    Refresh,
    Bypass,
}

impl CacheState {
    /// Every state, in the order of `index`.
    pub(crate) const ALL: [CacheState; 5] = [
        CacheState::Miss,
        CacheState::Hit,
        CacheState::Coalesced,
        CacheState::Refresh,
        CacheState::Bypass,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            CacheState::Miss => "miss",
            CacheState::Hit => "hit",
            CacheState::Coalesced => "coalesced",
            CacheState::Refresh => "refresh",
            CacheState::Bypass => "bypass",
        }
    }

    /// Its place in `ALL`.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_match_all() {
        for (i, e) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
        for (i, c) in CacheState::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }
}
