//! Tenant limits: request bucket, token bucket, concurrency cap, the
//! headers that report them, and their fate across a reload.

use std::time::Duration;

use crate::support::*;

const LIMITED: &str = "sk-limited-0123456789";

fn limited(rpm: u32, burst: u32, tpm: u64, concurrent: u32) -> String {
    tenant_with_limits("limited", LIMITED, rpm, burst, tpm, concurrent)
}

fn num(r: &Resp, h: &str) -> u64 {
    r.header(h)
        .parse()
        .unwrap_or_else(|_| panic!("{h}: {:?}", r.header(h)))
}

#[tokio::test]
async fn request_burst_then_refusal_then_refill() {
    let gw = TestGateway::start(&limited(60, 3, 0, 0)).await;
    let url = gw.url("/v1/chat/completions");
    let mut remaining = Vec::new();
    for i in 0..3 {
        let r = call(&url, LIMITED, &chat(&format!("b{i}")), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(num(&r, "x-ratelimit-limit-requests"), 60);
        remaining.push(num(&r, "x-ratelimit-remaining-requests"));
        assert!(!r.header("x-ratelimit-reset-requests").is_empty());
        assert!(
            r.header("x-ratelimit-limit-tokens").is_empty(),
            "no token limit, no token headers"
        );
    }
    assert_eq!(remaining, vec![2, 1, 0]);
    let r = call(&url, LIMITED, &chat("b3"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 0);
    let wait_ms = num(&r, "retry-after-ms");
    assert!(
        (1..=1000).contains(&wait_ms),
        "60/min refills one a second: {wait_ms}"
    );
    assert_eq!(num(&r, "retry-after"), 1);
    assert_eq!(
        gw.sim.calls(),
        3,
        "the refused request never reached upstream"
    );
    // Capacity comes back when the bucket said it would.
    tokio::time::sleep(Duration::from_millis(wait_ms + 20)).await;
    let r = call(&url, LIMITED, &chat("b4"), &[]).await;
    assert_eq!(r.status, 200);
    // Another tenant is untouched by this one's refusals.
    assert_eq!(call(&url, ALPHA, &chat("other"), &[]).await.status, 200);
    assert_eq!(
        gw.metric(
            "sluice_rate_limited_total",
            &[("tenant", "limited"), ("limit", "requests")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn token_deficit_refuses_upstream_work_but_not_cache_hits() {
    let gw = TestGateway::start(&limited(0, 1, 600, 0)).await;
    let url = gw.url("/v1/chat/completions");
    let r = call(
        &url,
        LIMITED,
        &chat("expensive"),
        &[("x-sim-usage", "500,300")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(num(&r, "x-ratelimit-limit-tokens"), 600);
    assert_eq!(
        num(&r, "x-ratelimit-remaining-tokens"),
        600,
        "charged after the answer"
    );
    // 800 spent of 600: in deficit.
    let r = call(&url, LIMITED, &chat("next"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "tokens_rate_limit_exceeded");
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 0);
    let wait = num(&r, "retry-after-ms");
    // 201 tokens at 10 a second.
    assert!((19_000..=20_200).contains(&wait), "{wait}");
    assert!(num(&r, "retry-after") >= 20);
    // The cached answer is still served.
    let r = call(&url, LIMITED, &chat("expensive"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-sluice-cache"), "hit");
    assert_eq!(gw.sim.calls(), 1);
    assert_eq!(
        gw.metric(
            "sluice_rate_limited_total",
            &[("tenant", "limited"), ("limit", "tokens")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn remaining_tokens_go_down_as_the_tenant_spends() {
    let gw = TestGateway::start(&limited(0, 1, 100_000, 0)).await;
    let url = gw.url("/v1/chat/completions");
    // 100k a minute refills 5/3 of a token a millisecond: what may have
    // come back since the first charge is bounded by the time taken.
    let refill =
        |since: std::time::Instant| (since.elapsed().as_millis() as u64 * 5).div_ceil(3) + 1;
    let start = std::time::Instant::now();
    call(&url, LIMITED, &chat("one"), &[("x-sim-usage", "50,30")]).await;
    let r = call(&url, LIMITED, &chat("two"), &[("x-sim-usage", "50,30")]).await;
    let after_one = num(&r, "x-ratelimit-remaining-tokens");
    assert!(
        (99_920..=(99_920 + refill(start)).min(100_000)).contains(&after_one),
        "{after_one}"
    );
    // A stream is charged from its usage chunk too.
    let r = call(
        &url,
        LIMITED,
        &chat_stream("three"),
        &[("x-sim-usage", "50,30")],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = call(&url, LIMITED, &chat("four"), &[]).await;
    let after_three = num(&r, "x-ratelimit-remaining-tokens");
    assert!(
        (99_760..=(99_760 + refill(start)).min(100_000)).contains(&after_three),
        "{after_three}"
    );
}

#[tokio::test]
async fn concurrency_cap_is_released_when_a_stream_ends() {
    let gw = TestGateway::start(&limited(0, 1, 0, 1)).await;
    let url = gw.url("/v1/chat/completions");
    let resp = call_open(
        &url,
        LIMITED,
        &chat_stream("long"),
        &[("x-sim-chunk-delay-ms", "50"), ("x-sim-chunks", "10")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let r = call(&url, LIMITED, &chat("second"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "concurrency_limit_exceeded");
    assert!(num(&r, "retry-after") >= 1);
    assert!(!r.header("retry-after-ms").is_empty());
    // Read the stream to its end; the slot is free again.
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    let r = call(&url, LIMITED, &chat("third"), &[]).await;
    assert_eq!(r.status, 200);
    // A client that goes away frees its slot too.
    let resp = call_open(
        &url,
        LIMITED,
        &chat_stream("abandon"),
        &[("x-sim-chunk-delay-ms", "50"), ("x-sim-chunks", "100")],
    )
    .await;
    drop(resp);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(&url, LIMITED, &chat("after abandon"), &[]).await;
        if r.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never released");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn reload_keeps_unchanged_buckets_applies_new_limits_and_drops_removed_tenants() {
    let extra = format!(
        "{}\n[[tenants]]\nname = \"gone\"\nkey_sha256 = [\"{}\"]\n",
        limited(60, 2, 0, 0),
        sha("sk-gone-0123456789")
    );
    let mut gw = TestGateway::start(&extra).await;
    let url = gw.url("/v1/chat/completions");
    for i in 0..2 {
        assert_eq!(
            call(&url, LIMITED, &chat(&format!("r{i}")), &[])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        call(&url, "sk-gone-0123456789", &chat("g"), &[])
            .await
            .status,
        200
    );
    let base = config_text(&gw.sim.base_url(), "");
    // Same limits for `limited`, `gone` removed: the spent burst stays spent.
    gw.handle.reload(
        parse(&format!("{base}\n{}", limited(60, 2, 0, 0))),
        sluice::Secret::new(UPSTREAM_KEY),
    );
    let r = call(&url, LIMITED, &chat("r2"), &[]).await;
    assert_eq!(r.status, 429, "no free burst from a reload");
    assert_eq!(
        call(&url, "sk-gone-0123456789", &chat("g2"), &[])
            .await
            .status,
        401
    );
    // Changed limits take effect at once.
    gw.handle.reload(
        parse(&format!("{base}\n{}", limited(600, 5, 0, 0))),
        sluice::Secret::new(UPSTREAM_KEY),
    );
    let r = call(&url, LIMITED, &chat("r3"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(num(&r, "x-ratelimit-limit-requests"), 600);
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 4);
    // Cache entries survive a reload.
    let r = call(&url, LIMITED, &chat("r3"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
    gw.shutdown().await.expect("stops");
}

#[tokio::test]
async fn absurd_upstream_usage_does_not_break_the_gateway() {
    let gw = TestGateway::start(&limited(0, 1, 600, 0)).await;
    let url = gw.url("/v1/chat/completions");
    let max = u64::MAX.to_string();
    let usage = format!("{max},{max}");
    let r = call(
        &url,
        LIMITED,
        &chat_stream("absurd"),
        &[("x-sim-usage", &usage)],
    )
    .await;
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    let r = call(&url, LIMITED, &chat("after"), &[]).await;
    assert_eq!(r.status, 429);
    assert!(
        num(&r, "retry-after") <= 86_401,
        "the deficit is floored at a day"
    );
    // Everyone else is served.
    assert_eq!(call(&url, ALPHA, &chat("others"), &[]).await.status, 200);
}
