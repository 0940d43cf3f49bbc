//! Replies built from a stored answer: a cache hit, or a coalesced
//! follower's finished answer, in the mode the client asked for.

use bytes::Bytes;
use http::{header, HeaderValue, Response};

use crate::cache::Entry;
use crate::response::body::Body;

/// A stored answer, in the mode the client asked for.
/// `None`: a stream asked for an answer that has no replay (see
/// `Entry::replay`).
/// How a client wants an answer delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// One JSON body.
    Whole,
    /// An SSE stream; `usage_chunk`: with the usage-only chunk.
    Stream { usage_chunk: bool },
}

pub fn entry_response(entry: &Entry, delivery: Delivery) -> Option<Response<Body>> {
    let (body, content_type) = if let Delivery::Stream { usage_chunk } = delivery {
        let replay = entry.replay()?;
        let mut frames = vec![replay.chunks.clone()];
        if usage_chunk {
            frames.extend(replay.usage_chunk.clone());
        }
        frames.extend(entry.format.replay_end().map(Bytes::from_static));
        (Body::frames(frames), "text/event-stream")
    } else {
        (Body::full(entry.completion.clone()), "application/json")
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Some(resp)
}
