//! Anthropic's Messages API through Sluice (docs/api.md, "Anthropic
//! Messages API"): routes and auth, errors in Anthropic's shape, limits
//! and their headers, streams and their usage, the cache across modes,
//! coalescing, and count_tokens.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};
use sluice::api::anthropic::Assembler;
use sluice::api::sse::{event_data, EventData, Framer};

use crate::support::*;

const MODEL: &str = "claude-sonnet-4-5";

fn message(content: &str) -> Value {
    json!({"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": content}]})
}

fn message_stream(content: &str) -> Value {
    let mut v = message(content);
    v["stream"] = true.into();
    v
}

/// A request as the Anthropic SDKs send it: the key in `x-api-key`.
fn anthropic_post(url: &str, key: &str) -> http::request::Builder {
    Request::post(url)
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
}

async fn send_message(url: &str, key: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    send_json(anthropic_post(url, key), body, headers).await
}

/// The events of a stream as (event name, data).
fn named_events(r: &Resp) -> Vec<(String, Value)> {
    let mut framer = Framer::default();
    let mut raw = Vec::new();
    framer.push(r.body.clone(), |e| raw.push(e)).expect("sse");
    raw.iter()
        .filter_map(|ev| {
            let text = String::from_utf8_lossy(ev);
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            match event_data(ev) {
                EventData::Data(d) => Some((name, serde_json::from_slice(&d).expect("json data"))),
                EventData::None | EventData::Done => None,
            }
        })
        .collect()
}

/// A stream's events, accumulated as an Anthropic SDK does into a message.
fn accumulated(r: &Resp) -> Value {
    let mut a = Assembler::new();
    for (_, data) in named_events(r) {
        a.push(data.to_string().as_bytes()).expect("json");
    }
    assert!(a.is_whole(), "{}", r.text());
    a.finish()
}

/// Anthropic's error shape, with the request id.
fn assert_anthropic_error(r: &Resp, status: u16, ty: &str, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], ty, "{v}");
    assert!(v["error"]["message"].is_string());
    assert_eq!(v["request_id"], r.header("x-request-id"), "{v}");
    assert_eq!(
        r.header("request-id"),
        r.header("x-request-id"),
        "where the Anthropic SDKs read an error's id"
    );
    assert_eq!(r.header("x-sluice-error"), code);
}

#[tokio::test]
async fn both_path_families_reach_the_messages_api_with_the_shared_key_and_the_bytes_as_sent() {
    let gw = TestGateway::start("").await;
    // Key order, spacing and a stream flag exactly as sent.
    let raw = r#"{ "stream":true, "model" : "claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"bytes"}], "metadata":{"user_id":"s-1"}}"#;
    for (path, query) in [
        ("/anthropic/v1/messages", "?beta=true"),
        ("/v1/messages", ""),
        ("/v1/messages", "?beta=true&x=a%20b"),
    ] {
        let r = send(
            anthropic_post(&gw.url(&format!("{path}{query}")), ALPHA)
                .header(
                    "anthropic-beta",
                    "interleaved-thinking-2025-05-14,context-management",
                )
                .header("authorization", "Bearer sk-wrong-but-not-used")
                .body(Full::new(Bytes::from(raw)))
                .expect("req"),
        )
        .await;
        // Bearer wins when both are sent: a wrong Bearer is refused even
        // with a good x-api-key.
        assert_eq!(r.status, 401, "{path}");
        let r = send(
            anthropic_post(&gw.url(&format!("{path}{query}")), "sk-wrong")
                .header(
                    "anthropic-beta",
                    "interleaved-thinking-2025-05-14,context-management",
                )
                .header("authorization", format!("Bearer {ALPHA}"))
                .header("cache-control", "no-store")
                .body(Full::new(Bytes::from(raw)))
                .expect("req"),
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), "text/event-stream");
        let (headers, body) = gw.sim.last_request().expect("went upstream");
        assert_eq!(
            &body[..],
            raw.as_bytes(),
            "bytes unchanged, nothing spliced"
        );
        assert_eq!(headers["x-api-key"], UPSTREAM_KEY, "the shared key");
        assert!(headers.get("authorization").is_none());
        assert_eq!(headers["anthropic-version"], "2023-06-01");
        assert_eq!(
            headers["anthropic-beta"],
            "interleaved-thinking-2025-05-14,context-management"
        );
        assert_eq!(
            gw.sim.last_uri().as_deref(),
            Some(format!("/anthropic/v1/messages{query}").as_str()),
            "anthropic_base_url + /v1/messages, the query as sent"
        );
    }
    // The key in x-api-key alone.
    let r = send_message(
        &gw.url("/anthropic/v1/messages"),
        ALPHA,
        &message("x-api-key"),
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "message");
    // x-api-key is Anthropic's only: the OpenAI paths want a Bearer.
    let r = send(
        anthropic_post(&gw.url("/v1/chat/completions"), ALPHA)
            .body(Full::new(Bytes::from(chat("hi").to_string())))
            .expect("req"),
    )
    .await;
    assert_eq!(r.status, 401);
    gw.wait_metric(
        "sluice_requests_total",
        &[
            ("tenant", "alpha"),
            ("endpoint", "messages"),
            ("status", "200"),
            ("cache", "bypass"),
        ],
        4.0,
    )
    .await;
}

#[tokio::test]
async fn own_errors_on_the_messages_paths_are_anthropic_shaped_and_say_whether_to_retry() {
    let gw = TestGateway::start_with(|t| {
        t.replace(
            "shutdown_grace_secs = 2",
            "shutdown_grace_secs = 2\nmax_body_bytes = 2048",
        )
    })
    .await;
    let url = gw.url("/anthropic/v1/messages");
    // 401: unknown key, no key.
    let r = send_message(&url, "sk-nobody", &message("hi"), &[]).await;
    assert_anthropic_error(&r, 401, "authentication_error", "invalid_api_key");
    assert_eq!(r.header("x-should-retry"), "false");
    // 400: a field missing or of the wrong type.
    let mut no_max = message("hi");
    no_max.as_object_mut().expect("object").remove("max_tokens");
    let r = send_message(&url, ALPHA, &no_max, &[]).await;
    assert_anthropic_error(&r, 400, "invalid_request_error", "missing_field");
    assert_eq!(r.header("x-should-retry"), "false");
    let r = send_message(
        &url,
        ALPHA,
        &json!({"model": MODEL, "max_tokens": 1.5, "messages": []}),
        &[],
    )
    .await;
    assert_anthropic_error(&r, 400, "invalid_request_error", "missing_field");
    let r = send(
        anthropic_post(&url, ALPHA)
            .body(Full::new(Bytes::from_static(b"{not json")))
            .expect("req"),
    )
    .await;
    assert_anthropic_error(&r, 400, "invalid_request_error", "invalid_json");
    // 403: a model outside the tenant's list.
    let r = send_message(&url, BETA, &message("hi"), &[]).await;
    assert_anthropic_error(&r, 403, "permission_error", "model_not_allowed");
    assert_eq!(r.header("x-should-retry"), "false");
    // 404 and 405 under the Anthropic paths.
    let r = send_message(&gw.url("/anthropic/v1/files"), ALPHA, &message("hi"), &[]).await;
    assert_anthropic_error(&r, 404, "not_found_error", "not_found");
    assert_eq!(r.header("x-should-retry"), "false");
    let r = send(
        Request::get(gw.url("/v1/messages"))
            .header("x-api-key", ALPHA)
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_anthropic_error(&r, 405, "invalid_request_error", "method_not_allowed");
    assert_eq!(r.header("x-should-retry"), "false");
    // 413.
    let big = message(&"x".repeat(4096));
    let r = send_message(&url, ALPHA, &big, &[]).await;
    assert_anthropic_error(&r, 413, "request_too_large", "body_too_large");
    assert_eq!(r.header("x-should-retry"), "false");
    assert_eq!(gw.sim.calls(), 0, "none of these went upstream");
    // The OpenAI paths keep OpenAI's shape, with the same two headers.
    let r = call(
        &gw.url("/v1/chat/completions"),
        "sk-nobody",
        &chat("hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "invalid_api_key");
    assert_eq!(r.header("x-sluice-error"), "invalid_api_key");
    assert_eq!(r.header("x-should-retry"), "false");
    // Upstream's errors pass through as they came, with no x-sluice-error.
    let r = send_message(&url, ALPHA, &message("hi"), &[("x-sim-status", "400")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.json()["request_id"], "req_sim", "upstream's own body");
    assert_eq!(r.header("x-sluice-error"), "");
    assert_eq!(r.header("x-should-retry"), "false");
    // An overloaded upstream (529) is retried like a 503.
    let r = send_message(
        &url,
        ALPHA,
        &message("overloaded once"),
        &[
            ("x-sim-status", "529"),
            ("x-sim-fail-first", "1"),
            ("x-sim-key", "msg-529"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn limits_speak_anthropics_headers_and_refusals() {
    let extra = tenant_with_limits("capped", "sk-capped-0123456789", 60, 1, 1000, 0);
    let gw = TestGateway::start(&extra).await;
    let url = gw.url("/v1/messages");
    let r = send_message(
        &url,
        "sk-capped-0123456789",
        &message("first"),
        &[("x-sim-account-headers", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("anthropic-ratelimit-requests-limit"), "60");
    assert_eq!(r.header("anthropic-ratelimit-requests-remaining"), "0");
    assert_eq!(r.header("anthropic-ratelimit-tokens-limit"), "1000");
    for h in [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
    ] {
        let reset = r.header(h);
        // RFC 3339 UTC, to the second: 2026-12-07T21:04:05Z.
        assert!(
            reset.len() == 20 && reset.ends_with('Z') && reset.as_bytes()[10] == b'T',
            "{h}: {reset}"
        );
        assert_ne!(reset, "2026-01-01T00:00:00Z", "not upstream's");
    }
    assert!(r.headers.get("x-ratelimit-limit-requests").is_none());
    assert!(
        r.headers.get("x-ratelimit-limit-tokens").is_none(),
        "upstream's are stripped"
    );
    assert_eq!(r.header("x-upstream-note"), "kept");
    // The bucket holds one: the next is refused, Anthropic-shaped.
    let r = send_message(&url, "sk-capped-0123456789", &message("second"), &[]).await;
    assert_anthropic_error(&r, 429, "rate_limit_error", "rate_limit_exceeded");
    let secs: u64 = r.header("retry-after").parse().expect("whole seconds");
    let ms: u64 = r.header("retry-after-ms").parse().expect("milliseconds");
    assert!(
        secs >= 1 && ms <= secs * 1000 && ms > 0,
        "{secs} s, {ms} ms"
    );
    assert!(!r.header("anthropic-ratelimit-requests-reset").is_empty());
    assert_eq!(gw.sim.calls(), 1, "refused before upstream");
}

#[tokio::test]
async fn streams_are_relayed_event_by_event_and_metered_like_chat() {
    let gw = TestGateway::start(
        "[pricing.default]\ninput_cache_hit = 1.0\ninput_cache_miss = 2.0\noutput = 4.0\n",
    )
    .await;
    let url = gw.url("/anthropic/v1/messages");
    let r = send_message(
        &url,
        ALPHA,
        &message_stream("metered"),
        &[("x-sim-usage", "40,10")],
    )
    .await;
    assert_eq!(r.status, 200);
    let names: Vec<String> = named_events(&r).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert!(
        names.contains(&"ping".to_string()),
        "pings are relayed: {names:?}"
    );
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(!r.aborted);
    // prompt = input + cache read (+ creation); hit = cache read.
    let tokens =
        |ty: &'static str| async move { [("tenant", "alpha"), ("model", "other"), ("type", ty)] };
    gw.wait_metric("sluice_tokens_total", &tokens("completion").await, 10.0)
        .await;
    assert_eq!(
        gw.metric("sluice_tokens_total", &tokens("prompt").await)
            .await,
        40.0
    );
    assert_eq!(
        gw.metric("sluice_tokens_total", &tokens("prompt_cache_hit").await)
            .await,
        10.0
    );
    assert_eq!(
        gw.metric("sluice_tokens_total", &tokens("prompt_cache_miss").await)
            .await,
        30.0
    );
    let cost = gw
        .metric(
            "sluice_cost_usd_total",
            &[("tenant", "alpha"), ("model", "other")],
        )
        .await;
    assert!(
        (cost - (10.0 * 1.0 + 30.0 * 2.0 + 10.0 * 4.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    let ttft = gw
        .metric(
            "sluice_time_to_first_token_seconds_count",
            &[("tenant", "alpha"), ("model", "other"), ("cache", "miss")],
        )
        .await;
    assert_eq!(ttft, 1.0);
    // No usage from upstream: the estimate, counted as one.
    let r = send_message(
        &url,
        ALPHA,
        &message_stream("no usage at all"),
        &[("x-sim-no-usage", "1")],
    )
    .await;
    assert_eq!(r.status, 200);
    gw.wait_metric(
        "sluice_usage_estimated_total",
        &[("tenant", "alpha"), ("model", "other")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_broken_stream_ends_with_one_anthropic_error_event_and_an_abort() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/messages");
    let r = send_message(
        &url,
        ALPHA,
        &message_stream("breaks"),
        &[("x-sim-die-after", "4")],
    )
    .await;
    assert_eq!(r.status, 200);
    let events = named_events(&r);
    let errors: Vec<&(String, Value)> = events.iter().filter(|(n, _)| n == "error").collect();
    assert_eq!(errors.len(), 1, "{}", r.text());
    let (_, last) = events.last().expect("events");
    assert_eq!(last["type"], "error");
    assert_eq!(last["error"]["type"], "api_error");
    let message = last["error"]["message"].as_str().expect("message");
    assert!(message.contains("upstream stream interrupted"), "{message}");
    assert!(!events.iter().any(|(n, _)| n == "message_stop"));
    assert!(r.aborted, "aborted after the error event");
    // Its output never counted by upstream: estimated from the text relayed
    // (message_start's output_tokens is a placeholder).
    gw.wait_metric("sluice_usage_estimated_total", &[("tenant", "alpha")], 1.0)
        .await;
    // Not JSON mid-stream: the same end.
    let r = send_message(
        &url,
        ALPHA,
        &message_stream("garbage"),
        &[("x-sim-garbage", "1")],
    )
    .await;
    assert_eq!(
        named_events(&r).last().map(|(n, _)| n.as_str()),
        Some("error")
    );
    assert!(r.aborted);
    // Upstream's own error event ends the stream as it came, not cached.
    let r = send_message(
        &url,
        ALPHA,
        &message_stream("upstream error"),
        &[("x-sim-error-event", "3")],
    )
    .await;
    let events = named_events(&r);
    let (name, data) = events.last().expect("events");
    assert_eq!(name, "error");
    assert_eq!(
        data["error"]["message"], "Internal server error",
        "upstream's"
    );
    assert!(!r.aborted, "a stream upstream ended is complete");
    let again = send_message(&url, ALPHA, &message_stream("upstream error"), &[]).await;
    assert_eq!(
        again.header("x-sluice-cache"),
        "miss",
        "an error is never stored"
    );
}

#[tokio::test]
async fn one_entry_serves_streaming_and_whole_clients_with_thinking_and_tools() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/anthropic/v1/messages");
    let body = json!({
        "model": MODEL, "max_tokens": 1024,
        "thinking": {"type": "enabled", "budget_tokens": 512},
        "system": [{"type": "text", "text": "You are terse."}],
        "tools": [{"name": "get_weather", "description": "w", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    });
    let mut streaming = body.clone();
    streaming["stream"] = true.into();
    // A streamed miss, then a whole hit equal to what the stream amounts to.
    let miss = send_message(&url, ALPHA, &streaming, &[]).await;
    assert_eq!(miss.header("x-sluice-cache"), "miss");
    let streamed = accumulated(&miss);
    let kinds: Vec<&str> = streamed["content"]
        .as_array()
        .expect("content")
        .iter()
        .filter_map(|b| b["type"].as_str())
        .collect();
    assert_eq!(kinds, ["thinking", "text", "tool_use"]);
    assert!(streamed["content"][0]["signature"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(streamed["content"][2]["input"], json!({"city": "Paris"}));
    let hit = send_message(&url, ALPHA, &body, &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert_eq!(hit.header("content-type"), "application/json");
    assert_eq!(hit.json(), streamed);
    // A streamed hit: Anthropic's event sequence, accumulating to the same.
    let replayed = send_message(&url, ALPHA, &streaming, &[]).await;
    assert_eq!(replayed.header("x-sluice-cache"), "hit");
    assert_eq!(replayed.header("content-type"), "text/event-stream");
    let names: Vec<String> = named_events(&replayed)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(names.iter().any(|n| n == "content_block_delta"));
    assert!(!replayed.text().contains("[DONE]"));
    assert_eq!(accumulated(&replayed), streamed);
    assert_eq!(gw.sim.calls(), 1);
    // Whole first, then a streamed hit of it.
    let mut other = body.clone();
    other["messages"][0]["content"] = "Weather in Rome?".into();
    let whole = send_message(&url, ALPHA, &other, &[]).await;
    assert_eq!(whole.header("x-sluice-cache"), "miss");
    other["stream"] = true.into();
    let hit = send_message(&url, ALPHA, &other, &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert_eq!(accumulated(&hit), whole.json());
    // Tokens saved by a hit: the stored prompt (every input token) and
    // output tokens; two hits of the first message, one of the second.
    gw.wait_metric(
        "sluice_cache_tokens_saved_total",
        &[("tenant", "alpha"), ("model", "other")],
        2.0 * saved(&streamed) + saved(&whole.json()),
    )
    .await;
    assert!(saved(&streamed) > 0.0);
}

/// The tokens a hit of a stored message saves.
fn saved(message: &Value) -> f64 {
    let u = &message["usage"];
    [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "output_tokens",
    ]
    .iter()
    .map(|k| u[k].as_f64().unwrap_or(0.0))
    .sum()
}

#[tokio::test]
async fn identical_calls_in_flight_share_one_upstream_call() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/messages");
    let slow = [("x-sim-chunk-delay-ms", "50")];
    let body = message_stream("coalesce me");
    let mut b = anthropic_post(&url, ALPHA);
    for (k, v) in slow {
        b = b.header(k, v);
    }
    let leader = open(
        b.body(Full::new(Bytes::from(body.to_string())))
            .expect("req"),
    )
    .await;
    let (parts, mut live) = leader.into_parts();
    assert_eq!(parts.headers["x-sluice-cache"], "miss");
    // The leader's first event is out: its call is in flight.
    let first = next_chunk(&mut live).await.expect("an event");
    let follower_stream = send_message(&url, ALPHA, &body, &slow);
    let mut whole = body.clone();
    whole.as_object_mut().expect("object").remove("stream");
    let follower_whole = send_message(&url, ALPHA, &whole, &slow);
    let (stream, whole) = tokio::join!(follower_stream, follower_whole);
    let leader = read_rest(parts, live, first.to_vec()).await;
    assert_eq!(stream.header("x-sluice-cache"), "coalesced");
    assert_eq!(whole.header("x-sluice-cache"), "coalesced");
    assert_eq!(gw.sim.calls(), 1, "one upstream call, three answers");
    let message = accumulated(&leader);
    assert_eq!(accumulated(&stream), message);
    assert_eq!(whole.json(), message);
    assert_eq!(stream.text(), leader.text(), "the leader's very events");
}

#[tokio::test]
async fn count_tokens_is_forwarded_never_cached_and_spends_nothing() {
    let extra = format!(
        "[pricing.default]\ninput_cache_hit = 1.0\ninput_cache_miss = 1.0\noutput = 1.0\n{}budget_usd = 0.000001\n",
        tenant_with_limits("spender", "sk-spender-0123456789", 0, 0, 0, 0)
    );
    let gw = TestGateway::start(&extra).await;
    let url = gw.url("/anthropic/v1/messages/count_tokens?beta=true");
    let body = json!({"model": MODEL, "system": "count", "messages": [{"role": "user", "content": "How many tokens?"}]});
    for _ in 0..2 {
        let r = send_message(&url, ALPHA, &body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.json()["input_tokens"].as_u64().is_some_and(|n| n > 0));
        assert_eq!(r.header("x-sluice-cache"), "", "never cached");
    }
    assert_eq!(gw.sim.calls(), 2, "each one forwarded");
    assert_eq!(
        gw.sim.last_uri().as_deref(),
        Some("/anthropic/v1/messages/count_tokens?beta=true")
    );
    gw.wait_metric(
        "sluice_requests_total",
        &[
            ("tenant", "alpha"),
            ("endpoint", "count_tokens"),
            ("status", "200"),
        ],
        2.0,
    )
    .await;
    assert_eq!(
        gw.metric(
            "sluice_tokens_total",
            &[("tenant", "alpha"), ("type", "prompt")]
        )
        .await,
        0.0,
        "no tokens metered"
    );
    // `stream: true` changes nothing: a count is one JSON answer.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = send_message(&url, ALPHA, &streamed, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["input_tokens"].as_u64().is_some_and(|n| n > 0));
    // No max_tokens needed; messages are.
    let r = send_message(&url, ALPHA, &json!({"model": MODEL}), &[]).await;
    assert_anthropic_error(&r, 400, "invalid_request_error", "missing_field");
    // A spent budget refuses messages, never a count.
    let spend = send_message(
        &gw.url("/v1/messages"),
        "sk-spender-0123456789",
        &message("spend it"),
        &[("x-sim-usage", "100,100")],
    )
    .await;
    assert_eq!(spend.status, 200);
    let refused = send_message(
        &gw.url("/v1/messages"),
        "sk-spender-0123456789",
        &message("again"),
        &[],
    )
    .await;
    assert_anthropic_error(&refused, 402, "billing_error", "budget_exceeded");
    assert_eq!(refused.header("x-should-retry"), "false");
    let counted = send_message(&url, "sk-spender-0123456789", &body, &[]).await;
    assert_eq!(counted.status, 200, "{}", counted.text());
    let spent = gw
        .metric("sluice_budget_spent_usd", &[("tenant", "spender")])
        .await;
    assert!(
        (spent - 200.0 / 1e6).abs() < 1e-12,
        "only the message spent: {spent}"
    );
}

#[tokio::test]
async fn identical_calls_on_two_replicas_share_one_call_and_the_shared_cache() {
    let Some(redis) = RedisServer::start("messages_across_replicas") else {
        return;
    };
    let start = || async { simulator().await };
    let sim = start().await;
    let text = config_text(
        &sim.base_url(),
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    );
    let a = TestGateway::with(sim, parse(&text)).await;
    let b = TestGateway::with(start().await, parse(&text)).await;
    let body = message_stream("across the fleet");
    let slow = [("x-sim-chunk-delay-ms", "40"), ("x-sim-chunks", "8")];
    let mut req = anthropic_post(&a.url("/v1/messages"), ALPHA);
    for (k, v) in slow {
        req = req.header(k, v);
    }
    let (parts, mut live) = open(
        req.body(Full::new(Bytes::from(body.to_string())))
            .expect("req"),
    )
    .await
    .into_parts();
    assert_eq!(parts.headers["x-sluice-cache"], "miss");
    let first = next_chunk(&mut live).await.expect("an event");
    // The leader's call is in flight on replica a: b's clients follow it.
    let mut whole = body.clone();
    whole.as_object_mut().expect("object").remove("stream");
    let b_url = b.url("/anthropic/v1/messages");
    let (stream, whole) = tokio::join!(
        send_message(&b_url, ALPHA, &body, &[]),
        send_message(&b_url, ALPHA, &whole, &[]),
    );
    let leader = read_rest(parts, live, first.to_vec()).await;
    let message = accumulated(&leader);
    assert_eq!(stream.header("x-sluice-cache"), "coalesced");
    assert_eq!(whole.header("x-sluice-cache"), "coalesced");
    assert_eq!(accumulated(&stream), message);
    assert_eq!(whole.json(), message);
    assert_eq!(a.sim.calls() + b.sim.calls(), 1, "one call for the fleet");
    // A third replica finds the message in the shared cache.
    let c = TestGateway::with(start().await, parse(&text)).await;
    let hit = send_message(&c.url("/v1/messages"), ALPHA, &body, &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit", "{}", hit.text());
    assert_eq!(accumulated(&hit), message);
    assert_eq!(c.sim.calls(), 0);
}

#[tokio::test]
async fn pings_keep_no_stream_alive_and_a_message_stop_ends_one_left_open() {
    let gw = TestGateway::start_with(|t| {
        t.replace("first_byte_timeout_secs = 5", "first_byte_timeout_secs = 2")
            .replace("idle_timeout_secs = 5", "idle_timeout_secs = 30")
    })
    .await;
    let url = gw.url("/v1/messages");
    // Pings and nothing else: the first-byte timeout (2 s) still runs, as
    // if the pings were not there (were they data, the 30 s idle timeout
    // would), and the stream ends with the error event after the pings it
    // relayed.
    let started = std::time::Instant::now();
    let r = send_message(
        &url,
        ALPHA,
        &message_stream("only pings"),
        &[("x-sim-keepalive", "3"), ("x-sim-hang", "body")],
    )
    .await;
    assert_eq!(r.status, 200);
    let names: Vec<String> = named_events(&r).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["ping", "ping", "ping", "error"], "{}", r.text());
    assert!(r.aborted);
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1500) && took < std::time::Duration::from_secs(20),
        "{took:?}"
    );
    // Upstream keeps the body open after message_stop: the stream is whole
    // there, ends cleanly, and is stored.
    let r = send_message(
        &url,
        ALPHA,
        &message_stream("lingers"),
        &[("x-sim-linger", "1")],
    )
    .await;
    assert!(!r.aborted);
    assert_eq!(
        named_events(&r).last().map(|(n, _)| n.as_str()),
        Some("message_stop")
    );
    let hit = send_message(&url, ALPHA, &message("lingers"), &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert_eq!(hit.json(), accumulated(&r));
}

#[tokio::test]
async fn once_a_stream_has_begun_pings_keep_it_alive_past_the_idle_timeout() {
    let gw =
        TestGateway::start_with(|t| t.replace("idle_timeout_secs = 5", "idle_timeout_secs = 1"))
            .await;
    // Each gap between events (1.3 s) is longer than the idle timeout (1 s),
    // filled with a ping every 200 ms: the stream runs to its end.
    let r = send_message(
        &gw.url("/v1/messages"),
        ALPHA,
        &message_stream("slow but alive"),
        &[
            ("cache-control", "no-store"),
            ("x-sim-chunks", "1"),
            ("x-sim-chunk-delay-ms", "1300"),
            ("x-sim-ping-every-ms", "200"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.aborted, "{}", r.text());
    let names: Vec<String> = named_events(&r).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{names:?}"
    );
    assert!(names.iter().filter(|n| *n == "ping").count() > 3);
    // Without the pings the same gaps end it with the error event.
    let r = send_message(
        &gw.url("/v1/messages"),
        ALPHA,
        &message_stream("slow and silent"),
        &[
            ("cache-control", "no-store"),
            ("x-sim-chunks", "1"),
            ("x-sim-chunk-delay-ms", "1300"),
        ],
    )
    .await;
    assert_eq!(
        named_events(&r).last().map(|(n, _)| n.clone()).as_deref(),
        Some("error")
    );
    assert!(r.aborted);
}
