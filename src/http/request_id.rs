//! Request ids (docs/api.md): the client's `x-request-id` when it is a sane one,
//! else a fresh id from a per-gateway random prefix and a counter.

use http::{HeaderMap, HeaderName, HeaderValue};

// Parsed once: a `&str` name is parsed and validated on every use.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Makes request ids: a random prefix per gateway and a counter, unique
/// without drawing random bytes per request.
pub(crate) struct RequestIds {
    prefix: u64,
    next: std::sync::atomic::AtomicU64,
}

impl Default for RequestIds {
    fn default() -> RequestIds {
        RequestIds {
            prefix: rand::random(),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    /// The client's `x-request-id` when it is a sane one, else a new id.
    pub(crate) fn of(&self, h: &HeaderMap) -> HeaderValue {
        if let Some(v) = h.get(&X_REQUEST_ID) {
            let b = v.as_bytes();
            if (1..=128).contains(&b.len())
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
            {
                // A copy, not `v.clone()`: the client's header value is a
                // slice of the connection's read buffer, and this id lives as
                // long as the response; holding the slice would pin that
                // buffer for the whole stream.
                if let Ok(owned) = HeaderValue::from_bytes(b) {
                    return owned;
                }
            }
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut id = *b"req_00000000000000000000000000000000";
        let _ = hex::encode_to_slice(self.prefix.to_be_bytes(), &mut id[4..20]);
        let _ = hex::encode_to_slice(n.to_be_bytes(), &mut id[20..]);
        HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("req"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-1.2_3"));
        let ids = RequestIds::default();
        assert_eq!(ids.of(&h), "abc-1.2_3");
        h.insert("x-request-id", HeaderValue::from_static("bad id"));
        assert_ne!(ids.of(&h), "bad id");
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&"a".repeat(129)).expect("v"),
        );
        let (a, b) = (ids.of(&h), ids.of(&h));
        assert_eq!(a.len(), 36);
        assert_ne!(a, b, "each request gets its own id");
    }
}
