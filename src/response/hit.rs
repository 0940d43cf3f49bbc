//! Replies built from a stored answer: a cache hit, or a coalesced
//! follower's finished answer, in the mode the client asked for.

use bytes::Bytes;
use http::{header, HeaderValue, Response};

use crate::api::sse::DONE_EVENT;
use crate::cache::Entry;
use crate::response::body::Body;

/// A stored answer, in the mode the client asked for.
/// `None`: a stream asked for an answer that has no replay (see
/// `Entry::replay`).
pub fn entry_response(entry: &Entry, stream: bool, include_usage: bool) -> Option<Response<Body>> {
    let (body, content_type) = if stream {
        let replay = entry.replay()?;
        let mut frames = vec![replay.chunks.clone()];
        if include_usage {
            frames.extend(replay.usage_chunk.clone());
        }
        frames.push(Bytes::from_static(DONE_EVENT));
        (Body::frames(frames), "text/event-stream")
    } else {
        (Body::full(entry.completion.clone()), "application/json")
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Some(resp)
}
