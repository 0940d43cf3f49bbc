//! Sluice's own errors (the table in docs/api.md): status, type and code,
//! the body in the shape of the request's API format (OpenAI's, or
//! Anthropic's on the Messages paths, written by the format's module),
//! `x-sluice-error`, `x-should-retry` and the `retry-after` headers of a
//! refusal. The only place Sluice's errors are decided; upstream errors are
//! forwarded, never wrapped, so they never come here.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use super::headers::X_SHOULD_RETRY;
use crate::api::{anthropic, openai, Format};

/// The code of an error Sluice made itself, on every such response (an
/// error passed through from upstream has none).
static X_SLUICE_ERROR: HeaderName = HeaderName::from_static("x-sluice-error");

/// Which tenant limit refused a request (the vocabulary of 429 and 402
/// refusals and of the `limit` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    Concurrency,
    /// The tenant's spend budget for the period (docs/budgets.md).
    Budget,
}

impl Limit {
    /// The `limit` label of `sluice_rate_limited_total`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
            Limit::Concurrency => "concurrency",
            Limit::Budget => "budget",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("The request body is not a JSON object.")]
    InvalidJson,
    /// A top-level key given twice (named, as the client wrote it).
    #[error("The request body gives the key {0} more than once; two parsers may read different values from it.")]
    DuplicateKey(Box<str>),
    #[error("{0}")]
    MissingField(&'static str),
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    #[error("This key is not allowed to use the requested model.")]
    ModelNotAllowed,
    #[error("Unknown path.")]
    NotFound,
    /// No configured upstream serves the requested model.
    #[error("No upstream serves the requested model.")]
    ModelNotFound,
    #[error("Method not allowed on this path.")]
    MethodNotAllowed,
    #[error("The request body is larger than this gateway accepts.")]
    BodyTooLarge,
    #[error("The request body did not arrive in time.")]
    BodyTimeout,
    #[error("Rate limit reached for {}; retry after {retry_after:?}.", limit.label())]
    RateLimited { limit: Limit, retry_after: Duration },
    #[error("This key's spend budget for the period is used up; it resets when the period ends.")]
    BudgetExceeded { retry_after: Duration },
    #[error("Shared limit state is unavailable; retry shortly.")]
    SharedStateUnavailable,
    #[error("The upstream API could not be reached.")]
    UpstreamUnreachable,
    #[error("The upstream API did not answer in time.")]
    UpstreamTimeout,
    #[error("The upstream stream was interrupted before it completed.")]
    StreamInterrupted,
    /// A fault of Sluice's own (a panic caught on the request path).
    #[error("The gateway failed to handle this request.")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidJson
            | GatewayError::DuplicateKey(_)
            | GatewayError::MissingField(_) => StatusCode::BAD_REQUEST,
            GatewayError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::ModelNotAllowed => StatusCode::FORBIDDEN,
            GatewayError::NotFound | GatewayError::ModelNotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamUnreachable | GatewayError::StreamInterrupted => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::SharedStateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::BudgetExceeded { .. } => StatusCode::PAYMENT_REQUIRED,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            GatewayError::InvalidJson
            | GatewayError::DuplicateKey(_)
            | GatewayError::MissingField(_)
            | GatewayError::NotFound
            | GatewayError::ModelNotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::BodyTooLarge
            | GatewayError::BodyTimeout => "invalid_request_error",
            GatewayError::InvalidApiKey => "authentication_error",
            GatewayError::ModelNotAllowed => "permission_error",
            GatewayError::RateLimited { .. } => "rate_limit_error",
            GatewayError::UpstreamUnreachable
            | GatewayError::UpstreamTimeout
            | GatewayError::StreamInterrupted => "upstream_error",
            GatewayError::SharedStateUnavailable | GatewayError::Internal => "api_error",
            GatewayError::BudgetExceeded { .. } => "insufficient_quota",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidJson | GatewayError::DuplicateKey(_) => "invalid_json",
            GatewayError::MissingField(_) => "missing_field",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::ModelNotAllowed => "model_not_allowed",
            GatewayError::NotFound => "not_found",
            GatewayError::ModelNotFound => "model_not_found",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::BodyTooLarge => "body_too_large",
            GatewayError::BodyTimeout => "request_timeout",
            GatewayError::RateLimited { limit, .. } => match limit {
                Limit::Requests => "rate_limit_exceeded",
                Limit::Tokens => "tokens_rate_limit_exceeded",
                Limit::Concurrency => "concurrency_limit_exceeded",
                Limit::Budget => "budget_exceeded",
            },
            GatewayError::UpstreamUnreachable => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::StreamInterrupted => "upstream_stream_interrupted",
            GatewayError::SharedStateUnavailable => "shared_state_unavailable",
            GatewayError::BudgetExceeded { .. } => "budget_exceeded",
            GatewayError::Internal => "internal_error",
        }
    }

    /// The error's type in Anthropic's vocabulary, so each Anthropic SDK
    /// raises its class for the status.
    pub fn anthropic_type(&self) -> &'static str {
        match self {
            GatewayError::InvalidJson
            | GatewayError::DuplicateKey(_)
            | GatewayError::MissingField(_)
            | GatewayError::MethodNotAllowed => "invalid_request_error",
            GatewayError::InvalidApiKey => "authentication_error",
            GatewayError::BudgetExceeded { .. } => "billing_error",
            GatewayError::ModelNotAllowed => "permission_error",
            GatewayError::NotFound | GatewayError::ModelNotFound => "not_found_error",
            GatewayError::BodyTooLarge => "request_too_large",
            GatewayError::RateLimited { .. } => "rate_limit_error",
            GatewayError::UpstreamUnreachable
            | GatewayError::StreamInterrupted
            | GatewayError::SharedStateUnavailable
            | GatewayError::Internal => "api_error",
            GatewayError::UpstreamTimeout | GatewayError::BodyTimeout => "timeout_error",
        }
    }

    /// Whether an SDK should be told not to retry (`x-should-retry: false`):
    /// a request that cannot succeed as sent (400, 401, 402, 403, 404, 405,
    /// 413), and a 502 or 504 that come only once Sluice's own retries are
    /// spent or `first_byte_timeout_secs` has passed, so an SDK's retries
    /// don't multiply Sluice's.
    fn retry_cannot_help(&self) -> bool {
        match self {
            GatewayError::InvalidJson
            | GatewayError::DuplicateKey(_)
            | GatewayError::MissingField(_)
            | GatewayError::InvalidApiKey
            | GatewayError::BudgetExceeded { .. }
            | GatewayError::ModelNotAllowed
            | GatewayError::NotFound
            | GatewayError::ModelNotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::BodyTooLarge
            | GatewayError::UpstreamUnreachable
            | GatewayError::UpstreamTimeout => true,
            // A stalled body, a limit, Redis unavailable, a coalesced call
            // that broke, a fault of Sluice's own: a retry may well succeed.
            GatewayError::BodyTimeout
            | GatewayError::RateLimited { .. }
            | GatewayError::SharedStateUnavailable
            | GatewayError::StreamInterrupted
            | GatewayError::Internal => false,
        }
    }

    /// Server and upstream faults are worth a warning; client faults are not.
    pub fn is_server_fault(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamUnreachable
                | GatewayError::UpstreamTimeout
                | GatewayError::StreamInterrupted
                | GatewayError::SharedStateUnavailable
                | GatewayError::Internal
        )
    }

    /// The body in `format`'s shape: OpenAI's
    /// `{"error":{"message","type","param","code"}}`, or Anthropic's
    /// `{"type":"error","error":{"type","message"},"request_id"}`.
    pub fn body(&self, format: Format, request_id: Option<&str>) -> Bytes {
        let message = self.to_string();
        match format {
            Format::OpenAi => openai::error_body(&message, self.error_type(), self.code()),
            Format::Anthropic => anthropic::error_body(self.anthropic_type(), &message, request_id),
        }
    }

    /// The error as a response with whole-bytes body in `format`'s shape;
    /// the caller wraps the body in its own type (this module knows no
    /// body type).
    pub fn into_response(self, format: Format, request_id: Option<&str>) -> Response<Bytes> {
        let mut resp = Response::new(self.body(format, request_id));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(&X_SLUICE_ERROR, HeaderValue::from_static(self.code()));
        // Anthropic's SDKs read an error's id from `request-id`.
        if let (Format::Anthropic, Some(id)) = (format, request_id) {
            if let Ok(v) = HeaderValue::from_str(id) {
                h.insert(&REQUEST_ID, v);
            }
        }
        if self.retry_cannot_help() {
            h.insert(&X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        if let GatewayError::SharedStateUnavailable = self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        if let GatewayError::BudgetExceeded { retry_after } = self {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
        }
        if let GatewayError::RateLimited { retry_after, .. } = self {
            let ms = retry_after.as_millis().max(1);
            // Whole seconds, rounded up and at least 1, so a client that sleeps
            // `retry-after` is never early; `retry-after-ms` is the exact wait.
            let secs = ms.div_ceil(1000).max(1);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
            h.insert("retry-after-ms", HeaderValue::from(ms as u64));
        }
        resp
    }
}

static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("request-id");

/// The SSE event that ends a stream broken after bytes reached the client,
/// in the stream's format: an SDK raises on it instead of taking a partial
/// answer for a whole one.
pub fn stream_error_event(format: Format) -> Bytes {
    let e = GatewayError::StreamInterrupted;
    match format {
        Format::OpenAi => openai::error_event(&e.body(format, None)),
        Format::Anthropic => anthropic::error_event(
            e.anthropic_type(),
            "upstream stream interrupted before the message completed",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_spec() {
        let cases = [
            (
                GatewayError::InvalidJson,
                400,
                "invalid_request_error",
                "invalid_json",
            ),
            (
                GatewayError::MissingField("x"),
                400,
                "invalid_request_error",
                "missing_field",
            ),
            (
                GatewayError::InvalidApiKey,
                401,
                "authentication_error",
                "invalid_api_key",
            ),
            (
                GatewayError::ModelNotAllowed,
                403,
                "permission_error",
                "model_not_allowed",
            ),
            (
                GatewayError::NotFound,
                404,
                "invalid_request_error",
                "not_found",
            ),
            (
                GatewayError::ModelNotFound,
                404,
                "invalid_request_error",
                "model_not_found",
            ),
            (
                GatewayError::MethodNotAllowed,
                405,
                "invalid_request_error",
                "method_not_allowed",
            ),
            (
                GatewayError::BodyTooLarge,
                413,
                "invalid_request_error",
                "body_too_large",
            ),
            (
                GatewayError::RateLimited {
                    limit: Limit::Tokens,
                    retry_after: Duration::ZERO,
                },
                429,
                "rate_limit_error",
                "tokens_rate_limit_exceeded",
            ),
            (
                GatewayError::UpstreamUnreachable,
                502,
                "upstream_error",
                "upstream_unreachable",
            ),
            (
                GatewayError::UpstreamTimeout,
                504,
                "upstream_error",
                "upstream_timeout",
            ),
            (
                GatewayError::BudgetExceeded {
                    retry_after: Duration::from_secs(3600),
                },
                402,
                "insufficient_quota",
                "budget_exceeded",
            ),
            (
                GatewayError::SharedStateUnavailable,
                503,
                "api_error",
                "shared_state_unavailable",
            ),
            (GatewayError::Internal, 500, "api_error", "internal_error"),
        ];
        for (e, status, ty, code) in cases {
            assert_eq!(e.status().as_u16(), status);
            let v: serde_json::Value =
                serde_json::from_slice(&e.body(Format::OpenAi, Some("r"))).expect("json");
            assert_eq!(v["error"]["type"], ty);
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["param"].is_null());
            assert!(v["error"]["message"].is_string());
            assert!(v.get("request_id").is_none());
        }
    }

    #[test]
    fn anthropic_table() {
        let limited = GatewayError::RateLimited {
            limit: Limit::Requests,
            retry_after: Duration::from_secs(1),
        };
        let budget = GatewayError::BudgetExceeded {
            retry_after: Duration::from_secs(1),
        };
        let cases = [
            (GatewayError::InvalidJson, 400, "invalid_request_error"),
            (
                GatewayError::MissingField("x"),
                400,
                "invalid_request_error",
            ),
            (GatewayError::InvalidApiKey, 401, "authentication_error"),
            (budget, 402, "billing_error"),
            (GatewayError::ModelNotAllowed, 403, "permission_error"),
            (GatewayError::NotFound, 404, "not_found_error"),
            (GatewayError::MethodNotAllowed, 405, "invalid_request_error"),
            (GatewayError::BodyTooLarge, 413, "request_too_large"),
            (limited, 429, "rate_limit_error"),
            (GatewayError::UpstreamUnreachable, 502, "api_error"),
            (GatewayError::SharedStateUnavailable, 503, "api_error"),
            (GatewayError::UpstreamTimeout, 504, "timeout_error"),
        ];
        for (e, status, ty) in cases {
            let code = e.code();
            let r = e.into_response(Format::Anthropic, Some("req-7"));
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()["x-sluice-error"], code);
            let v: serde_json::Value = serde_json::from_slice(r.body()).expect("json");
            assert_eq!(v["type"], "error", "{code}");
            assert_eq!(v["error"]["type"], ty, "{code}");
            assert!(v["error"]["message"].is_string());
            assert_eq!(v["request_id"], "req-7");
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        let e = GatewayError::RateLimited {
            limit: Limit::Requests,
            retry_after: Duration::from_millis(1200),
        };
        let r = e.into_response(Format::OpenAi, None);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1200");
        let e = GatewayError::RateLimited {
            limit: Limit::Requests,
            retry_after: Duration::ZERO,
        };
        let r = e.into_response(Format::OpenAi, None);
        assert_eq!(r.headers()["retry-after"], "1");
    }

    #[test]
    fn own_errors_carry_their_code_and_whether_to_retry() {
        let limited = |limit| GatewayError::RateLimited {
            limit,
            retry_after: Duration::from_secs(1),
        };
        let cases = [
            (GatewayError::InvalidJson, true),
            (GatewayError::DuplicateKey("model".into()), true),
            (GatewayError::MissingField("x"), true),
            (GatewayError::InvalidApiKey, true),
            (
                GatewayError::BudgetExceeded {
                    retry_after: Duration::from_secs(60),
                },
                true,
            ),
            (GatewayError::ModelNotAllowed, true),
            (GatewayError::NotFound, true),
            (GatewayError::ModelNotFound, true),
            (GatewayError::MethodNotAllowed, true),
            (GatewayError::BodyTooLarge, true),
            (GatewayError::UpstreamUnreachable, true),
            (GatewayError::UpstreamTimeout, true),
            (GatewayError::BodyTimeout, false),
            (limited(Limit::Requests), false),
            (limited(Limit::Tokens), false),
            (limited(Limit::Concurrency), false),
            (GatewayError::SharedStateUnavailable, false),
            (GatewayError::StreamInterrupted, false),
            (GatewayError::Internal, false),
        ];
        for (e, no_retry) in cases {
            let code = e.code();
            let r = e.into_response(Format::OpenAi, None);
            assert_eq!(r.headers()["x-sluice-error"], code);
            assert_eq!(
                r.headers().get("x-should-retry").map(|v| v.as_bytes()),
                no_retry.then_some(&b"false"[..]),
                "{code}"
            );
        }
    }

    #[test]
    fn stream_error_event_shape() {
        let ev = stream_error_event(Format::Anthropic);
        let text = std::str::from_utf8(&ev).expect("utf8");
        assert!(text.starts_with("event: error\ndata: {"), "{text}");
        assert!(text.contains("upstream stream interrupted"));
        let ev = stream_error_event(Format::OpenAi);
        let text = std::str::from_utf8(&ev).expect("utf8");
        assert!(text.starts_with("data: {") && text.ends_with("}\n\n"));
        let v: serde_json::Value = serde_json::from_str(&text[6..]).expect("json");
        assert_eq!(v["error"]["code"], "upstream_stream_interrupted");
        assert_eq!(v["error"]["type"], "upstream_error");
    }
}
