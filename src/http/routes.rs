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
        // Anthropic's Messages API: under DeepSeek's `/anthropic` base URL,
        // or on the bare host.
        "/anthropic/v1/messages" | "/v1/messages" => Endpoint::Messages,
        "/anthropic/v1/messages/count_tokens" | "/v1/messages/count_tokens" => {
            Endpoint::CountTokens
        }
        _ => return Err(GatewayError::NotFound),
    };
    let allowed = match endpoint {
        Endpoint::Models => method == Method::GET || method == Method::HEAD,
        Endpoint::Chat
        | Endpoint::ChatPrefix
        | Endpoint::Fim
        | Endpoint::Messages
        | Endpoint::CountTokens => method == Method::POST,
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
            (Method::POST, "/anthropic/v1/messages", Endpoint::Messages),
            (Method::POST, "/v1/messages", Endpoint::Messages),
            (Method::POST, "/v1/messages/", Endpoint::Messages),
            (
                Method::POST,
                "/anthropic/v1/messages/count_tokens",
                Endpoint::CountTokens,
            ),
            (
                Method::POST,
                "/v1/messages/count_tokens",
                Endpoint::CountTokens,
            ),
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
        assert!(matches!(
            route(&Method::GET, "/v1/messages"),
            Err(GatewayError::MethodNotAllowed)
        ));
        assert!(matches!(
            route(&Method::POST, "/anthropic/messages/batches"),
            Err(GatewayError::NotFound)
        ));
        // Errors on the Messages paths (known or not) are Anthropic's.
        for path in [
            "/anthropic/v1/messages",
            "/anthropic/v1/nope",
            "/v1/messages/count_tokens",
        ] {
            assert_eq!(format_of(path), Format::Anthropic, "{path}");
        }
        for path in ["/v1/chat/completions", "/v1/models", "/nope"] {
            assert_eq!(format_of(path), Format::OpenAi, "{path}");
        }
    }
}
