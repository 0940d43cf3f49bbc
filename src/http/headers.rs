//! Header hygiene, written once for every path: which client headers
//! never go upstream, which upstream headers never reach a client (the
//! hop-by-hop set both ways), copying a request's headers out of the
//! connection's read buffer, and `x-should-retry`. The rules are listed in
//! docs/api.md ("Headers").

use bytes::BytesMut;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

pub(crate) static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// A client's headers as they go upstream: less the hop-by-hop set and
/// those of `not_forwarded`.
pub(crate) fn clean_request(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    remove_where(h, not_forwarded);
}

/// Upstream's headers as they reach a client: less the hop-by-hop set and
/// those of `not_returned`.
pub(crate) fn clean_response(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    remove_where(h, not_returned);
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the non-standard
/// Proxy-Connection that old clients send), never forwarded either way.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, and any header the Connection header names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names decides, each
    // name matched by its text (a jump on its length, then one compare)
    // rather than against the nine names in turn.
    if !h.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    for name in &named {
        h.remove(name.as_str());
    }
}

/// Whether `name` (lowercase, as `HeaderName`s are) is one of `HOP_BY_HOP`.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Copies a request's headers into storage of their own: one buffer for all
/// values, so a request costs one allocation here instead of pinning the
/// connection's 8 KiB read buffer (and making hyper allocate another).
pub(crate) fn detach_headers(h: &HeaderMap) -> HeaderMap {
    let mut buf = BytesMut::with_capacity(h.values().map(|v| v.len()).sum());
    for v in h.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let buf = buf.freeze();
    let mut out = HeaderMap::with_capacity(h.len());
    let mut at = 0;
    for (name, v) in h {
        let end = at + v.len();
        let mut value =
            HeaderValue::from_maybe_shared(buf.slice(at..end)).unwrap_or_else(|_| v.clone());
        value.set_sensitive(v.is_sensitive());
        out.append(name.clone(), value);
        at = end;
    }
    out
}

/// Client headers that never go upstream (docs/api.md, "Headers"), beside the
/// hop-by-hop ones: the client's own Authorization (replaced by the shared
/// key), Expect (Sluice has read the body already), Cookie, and headers
/// that would speak for the shared account; Accept-Encoding too, since
/// Sluice reads the answer and asks for it uncompressed.
fn not_forwarded(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization"
            | "accept-encoding"
            | "expect"
            | "cookie"
            | "openai-organization"
            | "openai-project"
            | "api-key"
            | "x-api-key"
    )
}

/// Upstream response headers that never reach a client, beside the
/// hop-by-hop ones: cookies, the shared account's identity, and upstream's
/// own `x-ratelimit-*` and `anthropic-ratelimit-*` (the shared account's
/// standing; Sluice writes the tenant's own afterwards, and only for limits
/// the tenant has), and an `x-sluice-error` (only Sluice's own errors carry
/// one).
fn not_returned(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "set-cookie" | "openai-organization" | "openai-project" | "x-sluice-error"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
}

/// Removes every header whose name `drop` picks. One pass decides; most
/// maps need one removal at most.
fn remove_where(h: &mut HeaderMap, drop: fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = h.keys().filter(|k| drop(k)).cloned().collect();
    for name in names {
        h.remove(name);
    }
}

/// Where retrying an upstream error cannot help (402 Insufficient Balance,
/// a bad key, a bad request), SDKs are told not to.
pub(crate) fn mark_no_retry(status: StatusCode, h: &mut HeaderMap) {
    if matches!(status.as_u16(), 400 | 401 | 402 | 403 | 404 | 422) {
        h.insert(&X_SHOULD_RETRY, HeaderValue::from_static("false"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "x"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "application/json"),
        ] {
            h.insert(k, v.parse().expect("v"));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-type"]);
    }

    #[test]
    fn each_hop_by_hop_name_alone_is_seen() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name.as_str()), "{name}");
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}");
        }
        for other in ["content-type", "x-api-key", "tee", "upgrades", ""] {
            assert!(!is_hop_by_hop(other), "{other}");
        }
    }
}
