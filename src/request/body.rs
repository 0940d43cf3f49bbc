//! Reading a request's body: within `max_body_bytes` and the stall timeout,
//! into one buffer sized from `content-length` without trusting it; and
//! draining what is left of a refused request's body so its keep-alive
//! connection stays usable.

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::Config;
use crate::http::error::GatewayError;

/// Reads and discards what is left of a refused request's body, within
/// `max_body_bytes` and `header_read_timeout`. `true` when the body is
/// done and the connection can serve another request.
pub(crate) async fn discard_rest(body: &mut Incoming, e: &GatewayError, config: &Config) -> bool {
    if matches!(e, GatewayError::BodyTooLarge | GatewayError::BodyTimeout) {
        return false;
    }
    if http_body::Body::is_end_stream(body) {
        return true;
    }
    let deadline = tokio::time::Instant::now() + config.server.header_read_timeout;
    let mut left = config.server.max_body_bytes;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                if n > left {
                    return false;
                }
                left -= n;
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

pub(crate) async fn read_body(
    body: &mut Incoming,
    headers: &HeaderMap,
    config: &Config,
) -> Result<Bytes, GatewayError> {
    let max = config.server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(GatewayError::BodyTooLarge);
    }
    // Sized from content-length, but never trusting it for more than 64 KiB up
    // front: a client that claims a large body and then stalls must not hold
    // that much memory.
    let mut buf = BytesMut::with_capacity(declared.map_or(8 * 1024, |n| n.min(64 * 1024) as usize));
    // A client that stalls mid-body is dropped like one that stalls in its
    // headers.
    let gap = config.server.header_read_timeout;
    loop {
        match tokio::time::timeout(gap, body.frame()).await {
            Err(_) => return Err(GatewayError::BodyTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(GatewayError::InvalidJson),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > max {
                        return Err(GatewayError::BodyTooLarge);
                    }
                    // Once the client has sent more than the first
                    // allocation holds, the declared size is reserved in one
                    // go: doubling would hold up to twice the body (and a
                    // copy while it moves).
                    if let (Some(n), true) = (declared, buf.len() + data.len() > buf.capacity()) {
                        buf.reserve((n as usize).max(buf.len() + data.len()) - buf.len());
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(buf.freeze())
}
