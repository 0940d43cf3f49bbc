//! The client API's vocabulary and wire formats. `Endpoint`, `Format` and
//! `CacheState` name what a request is and how it was answered (they are
//! also metric labels); the submodules are plain functions over bytes: the
//! strict scan of a request body (`json`), counting a prompt's text
//! (`text`), SSE framing (`sse`), usage and its estimate (`usage`), and one
//! module per API format (`openai`: what a chunk says, assembling a stream
//! into an answer, replaying an answer as a stream).
//! Imports no other Sluice module.

pub mod json;
pub mod openai;
pub mod sse;
pub(crate) mod text;
pub mod usage;

use openai::Shape;

/// An API endpoint Sluice serves (the route table is `http::routes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    ChatPrefix,
    Fim,
    Models,
}

impl Endpoint {
    /// Every endpoint, in the order of `index`.
    pub(crate) const ALL: [Endpoint; 4] = [
        Endpoint::Chat,
        Endpoint::ChatPrefix,
        Endpoint::Fim,
        Endpoint::Models,
    ];

    /// The `endpoint` metric label (and a part of the cache key).
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::ChatPrefix => "chat_prefix",
            Endpoint::Fim => "fim",
            Endpoint::Models => "models",
        }
    }

    /// Its place in `ALL`.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The path appended to the upstream's base URL.
    pub(crate) fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::ChatPrefix => "/beta/chat/completions",
            Endpoint::Fim => "/beta/completions",
            Endpoint::Models => "/models",
        }
    }

    /// Whether the client sends a body (and the request goes through the
    /// body, cache and upstream phases) or only asks (`GET /models`).
    pub(crate) fn takes_body(self) -> bool {
        match self {
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Fim => true,
            Endpoint::Models => false,
        }
    }

    /// The shape of its answers' choices.
    pub(crate) fn shape(self) -> Shape {
        match self {
            Endpoint::Fim => Shape::Text,
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Models => Shape::Chat,
        }
    }

    /// The wire format it speaks.
    #[expect(
        dead_code,
        reason = "the seam for a second API format: formats differ in framing, usage, assembly, replay and error bodies"
    )]
    pub(crate) fn format(self) -> Format {
        match self {
            Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Fim | Endpoint::Models => {
                Format::OpenAi
            }
        }
    }
}

/// An API format: how bodies, streams, usage and error bodies are written.
/// Limits, the cache and flights are the same for every format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// OpenAI's (and DeepSeek's) chat and text completions.
    OpenAi,
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
