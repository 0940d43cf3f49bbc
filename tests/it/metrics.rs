//! Metrics move as requests flow, with exact values after known traffic.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn tokens_cost_and_requests_after_known_traffic() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(
        &url,
        ALPHA,
        &chat_stream("metered"),
        &[("x-sim-usage", "50,30")],
    )
    .await;
    assert_eq!(r.status, 200);
    let m = |kind: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "sluice_tokens_total",
                &[
                    ("tenant", "alpha"),
                    ("model", "deepseek-chat"),
                    ("type", kind),
                ],
            )
            .await
        }
    };
    assert_eq!(m("prompt").await, 50.0);
    assert_eq!(m("completion").await, 30.0);
    // The simulator reports a quarter of the prompt as cache hits.
    assert_eq!(m("prompt_cache_hit").await, 12.0);
    assert_eq!(m("prompt_cache_miss").await, 38.0);
    let cost = gw
        .metric(
            "sluice_cost_usd_total",
            &[("tenant", "alpha"), ("model", "deepseek-chat")],
        )
        .await;
    let expected = (12.0 * 0.1 + 38.0 * 1.0 + 30.0 * 2.0) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
    gw.wait_metric(
        "sluice_requests_total",
        &[
            ("tenant", "alpha"),
            ("model", "deepseek-chat"),
            ("endpoint", "chat"),
            ("status", "200"),
            ("cache", "miss"),
        ],
        1.0,
    )
    .await;
    // A hit spends nothing and counts what it saved.
    let r = call(&url, ALPHA, &chat("metered"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
    assert_eq!(m("prompt").await, 50.0);
    gw.wait_metric(
        "sluice_cache_tokens_saved_total",
        &[("tenant", "alpha"), ("model", "deepseek-chat")],
        80.0,
    )
    .await;
    gw.wait_metric(
        "sluice_time_to_first_token_seconds_count",
        &[("tenant", "alpha"), ("cache", "hit")],
        1.0,
    )
    .await;
    gw.wait_metric(
        "sluice_request_duration_seconds_count",
        &[("tenant", "alpha"), ("stream", "true")],
        1.0,
    )
    .await;
    assert_eq!(
        gw.metric("sluice_upstream_duration_seconds_count", &[])
            .await,
        1.0
    );
    assert_eq!(gw.metric("sluice_cache_entries", &[]).await, 1.0);
    // Reasoning tokens.
    let mut req = chat("why");
    req["model"] = "deepseek-reasoner".into();
    call(&url, ALPHA, &req, &[]).await;
    assert_eq!(
        gw.metric(
            "sluice_tokens_total",
            &[("model", "deepseek-reasoner"), ("type", "reasoning")]
        )
        .await,
        6.0
    );
}

#[tokio::test]
async fn refusals_auth_failures_and_inflight() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    call(&url, "sk-nobody", &chat("x"), &[]).await;
    call(&url, "", &chat("x"), &[]).await;
    assert_eq!(gw.metric("sluice_auth_failures_total", &[]).await, 2.0);
    gw.wait_metric(
        "sluice_requests_total",
        &[("tenant", "unknown"), ("status", "401")],
        2.0,
    )
    .await;
    call(&gw.url("/nope"), ALPHA, &chat("x"), &[]).await;
    gw.wait_metric(
        "sluice_requests_total",
        &[("endpoint", "other"), ("status", "404")],
        1.0,
    )
    .await;
    let open = call_open(
        &url,
        ALPHA,
        &chat_stream("held"),
        &[("x-sim-chunk-delay-ms", "30"), ("x-sim-chunks", "10")],
    )
    .await;
    assert_eq!(
        gw.metric("sluice_inflight_requests", &[("tenant", "alpha")])
            .await,
        1.0
    );
    let _ = http_body_util::BodyExt::collect(open.into_body()).await;
    gw.wait_metric("sluice_inflight_requests", &[("tenant", "alpha")], 0.0)
        .await;
}

#[tokio::test]
async fn model_labels_stay_bounded_whatever_clients_send() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    for i in 0..40 {
        let body = json!({"model": format!("random-model-{i}-{}", i * 7919), "messages": [{"role": "user", "content": "x"}]});
        let r = call(&url, ALPHA, &body, &[]).await;
        assert_eq!(r.status, 200);
    }
    gw.wait_metric(
        "sluice_requests_total",
        &[("model", "other"), ("status", "200")],
        40.0,
    )
    .await;
    let text = gw.metrics_text().await;
    assert!(
        !text.contains("random-model"),
        "client model names never become labels"
    );
    assert_eq!(
        metric_value(
            &text,
            "sluice_requests_total",
            &[("model", "other"), ("status", "200")]
        ),
        Some(40.0)
    );
}

#[tokio::test]
async fn exposition_is_well_formed_and_has_every_metric() {
    let gw = TestGateway::start("").await;
    call(&gw.url("/v1/chat/completions"), ALPHA, &chat("x"), &[]).await;
    let text = gw.metrics_text().await;
    for name in [
        "sluice_requests_total",
        "sluice_request_duration_seconds",
        "sluice_time_to_first_token_seconds",
        "sluice_upstream_requests_total",
        "sluice_upstream_duration_seconds",
        "sluice_tokens_total",
        "sluice_cost_usd_total",
        "sluice_inflight_requests",
        "sluice_cache_entries",
        "sluice_cache_bytes",
        "sluice_auth_failures_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
}

#[tokio::test]
async fn balance_is_polled_from_upstream() {
    let gw =
        TestGateway::start_with(|c| c.replace("balance_poll_secs = 0", "balance_poll_secs = 1"))
            .await;
    gw.wait_metric("sluice_upstream_balance", &[("currency", "CNY")], 110.0)
        .await;
}

#[tokio::test]
async fn upstream_metrics_name_the_upstream() {
    let gw = TestGateway::start("").await;
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &chat("x"), &[]).await;
    assert_eq!(r.status, 200);
    let default = [("upstream", "default")];
    assert_eq!(
        gw.metric(
            "sluice_upstream_requests_total",
            &[("upstream", "default"), ("status", "200")]
        )
        .await,
        1.0
    );
    assert_eq!(
        gw.metric("sluice_upstream_duration_seconds_count", &default)
            .await,
        1.0
    );
    assert_eq!(gw.metric("sluice_upstream_available", &default).await, 1.0);
    // The answer has ended: nothing in flight.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gw.metric("sluice_upstream_inflight", &default).await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a call stays in flight"
        );
        tokio::task::yield_now().await;
    }
}
