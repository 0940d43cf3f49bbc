//! The client-facing route table (docs/api.md): path and method to endpoint.
//! The only place the table is written.

use http::Method;

use crate::api::{Endpoint, Format};
use crate::http::error::GatewayError;

/// The API format a path speaks, for answers made before (or without) a
/// route: every path under `/anthropic/` or `/v1/messages` is Anthropic's.
pub(crate) fn format_of(path: &str) -> Format {
    if path.starts_with("/anthropic/") || path.starts_with("/v1/messages") {
        Format::Anthropic
    } else {
        Format::OpenAi
    }
}

/// Resolves a request line. A known path with the wrong method is 405; an
/// unknown path is 404. A trailing slash is tolerated.
pub(crate) fn route(method: &Method, path: &str) -> Result<Endpoint, GatewayError> {
    let path = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    let endpoint = match path {
        "/chat/completions" | "/v1/chat/completions" => Endpoint::Chat,
        "/beta/chat/completions" | "/v1/beta/chat/completions" => Endpoint::ChatPrefix,
        "/beta/completions" | "/v1/beta/completions" => Endpoint::Fim,
        "/models" | "/v1/models" => Endpoint::Models,
        _ => return Err(GatewayError::NotFound),
    };
    let allowed = match endpoint {
        Endpoint::Models => method == Method::GET || method == Method::HEAD,
        Endpoint::Chat | Endpoint::ChatPrefix | Endpoint::Fim => method == Method::POST,
    };
    if allowed {
        Ok(endpoint)
    } else {
        Err(GatewayError::MethodNotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            (Method::POST, "/chat/completions", Endpoint::Chat),
            (Method::POST, "/v1/chat/completions", Endpoint::Chat),
            (Method::POST, "/v1/chat/completions/", Endpoint::Chat),
            (Method::POST, "/beta/chat/completions", Endpoint::ChatPrefix),
            (Method::POST, "/beta/completions", Endpoint::Fim),
            (Method::GET, "/models", Endpoint::Models),
            (Method::GET, "/v1/models", Endpoint::Models),
        ];
        for (m, p, e) in ok {
            assert_eq!(route(&m, p).expect(p), e);
        }
        assert!(matches!(
            route(&Method::GET, "/chat/completions"),
            Err(GatewayError::MethodNotAllowed)
        ));
        assert!(matches!(
            route(&Method::POST, "/models"),
            Err(GatewayError::MethodNotAllowed)
        ));
        assert!(matches!(
            route(&Method::POST, "/"),
            Err(GatewayError::NotFound)
        ));
        assert!(matches!(
            route(&Method::POST, "/v2/chat/completions"),
            Err(GatewayError::NotFound)
        ));
    }
}
