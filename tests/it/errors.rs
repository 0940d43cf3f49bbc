//! The headers of Sluice's own errors: each names its code in
//! `x-sluice-error`; those a retry cannot fix, and the 502 and 504 that
//! come only after Sluice's own retries or its first-byte wait, carry
//! `x-should-retry: false`. Errors passed through from upstream carry no
//! `x-sluice-error`.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

/// Asserts `r` is Sluice's own `code` error, telling SDKs not to retry or not.
fn assert_own_error(r: &Resp, status: u16, code: &str, no_retry: bool) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text());
    assert_eq!(r.error_code(), code);
    assert_eq!(r.header("x-sluice-error"), code);
    let want = if no_retry { "false" } else { "" };
    assert_eq!(r.header("x-should-retry"), want, "{code}");
}

#[tokio::test]
async fn a_502_after_retries_tells_sdks_not_to_retry() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    // Upstream drops every connection before its headers: 1 + max_retries
    // attempts, then Sluice's own 502.
    let r = call(&url, ALPHA, &chat("dropped"), &[("x-sim-close", "1")]).await;
    assert_own_error(&r, 502, "upstream_unreachable", true);
    assert_eq!(gw.sim.calls(), 3, "Sluice retried before answering");
    // The same for a stream: nothing was sent, so the answer is the 502.
    let r = call(
        &url,
        ALPHA,
        &chat_stream("dropped stream"),
        &[("x-sim-close", "1")],
    )
    .await;
    assert_own_error(&r, 502, "upstream_unreachable", true);
    assert_eq!(gw.sim.calls(), 6);
}

#[tokio::test]
async fn a_504_after_the_first_byte_wait_tells_sdks_not_to_retry() {
    let gw = TestGateway::start_with(|c| {
        c.replace("first_byte_timeout_secs = 5", "first_byte_timeout_secs = 1")
    })
    .await;
    let url = gw.url("/v1/chat/completions");
    let r = call(&url, ALPHA, &chat("hang"), &[("x-sim-hang", "headers")]).await;
    assert_own_error(&r, 504, "upstream_timeout", true);
    let r = call(
        &url,
        ALPHA,
        &chat_stream("hang stream"),
        &[("x-sim-hang", "headers")],
    )
    .await;
    assert_own_error(&r, 504, "upstream_timeout", true);
}

#[tokio::test]
async fn refusals_a_retry_cannot_fix_say_so() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");

    let r = call(&url, "sk-unknown-0123456789", &chat("who"), &[]).await;
    assert_own_error(&r, 401, "invalid_api_key", true);

    let r = call(&gw.url("/v1/nowhere"), ALPHA, &chat("where"), &[]).await;
    assert_own_error(&r, 404, "not_found", true);

    let r = send(
        Request::get(&url)
            .header("authorization", format!("Bearer {ALPHA}"))
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_own_error(&r, 405, "method_not_allowed", true);

    let r = send(
        post(&url, ALPHA)
            .body(Full::new(Bytes::from_static(b"[1, 2]")))
            .expect("req"),
    )
    .await;
    assert_own_error(&r, 400, "invalid_json", true);

    let mut reasoner = chat("not yours");
    reasoner["model"] = "deepseek-reasoner".into();
    let r = call(&url, BETA, &reasoner, &[]).await;
    assert_own_error(&r, 403, "model_not_allowed", true);

    assert_eq!(gw.sim.calls(), 0, "none reached upstream");
}

#[tokio::test]
async fn a_429_names_its_code_and_may_be_retried() {
    const LIMITED: &str = "sk-limited-0123456789";
    let gw = TestGateway::start(&tenant_with_limits("limited", LIMITED, 60, 1, 0, 0)).await;
    let url = gw.url("/v1/chat/completions");
    assert_eq!(call(&url, LIMITED, &chat("one"), &[]).await.status, 200);
    let r = call(&url, LIMITED, &chat("two"), &[]).await;
    assert_own_error(&r, 429, "rate_limit_exceeded", false);
    assert!(!r.header("retry-after").is_empty());
}

#[tokio::test]
async fn upstream_errors_carry_no_sluice_error_code() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    for status in ["401", "503"] {
        let r = call(
            &url,
            ALPHA,
            &chat(&format!("upstream {status}")),
            &[("x-sim-status", status)],
        )
        .await;
        assert_eq!(r.status.as_str(), status);
        assert_eq!(r.header("x-sluice-error"), "", "{status} is upstream's");
    }
}
