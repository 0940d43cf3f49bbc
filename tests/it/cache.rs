//! The exact-match cache: one entry for both modes, key canonicalization,
//! controls, scopes, coalescing, size bound.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::support::*;

/// Rebuilds the message a chat stream amounts to (the SDK's way).
fn assemble(events: &[String]) -> Value {
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut args = String::new();
    let mut name = String::new();
    let mut finish = Value::Null;
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).expect("json");
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let d = &c["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        if let Some(t) = d["tool_calls"].get(0) {
            name.push_str(t["function"]["name"].as_str().unwrap_or(""));
            args.push_str(t["function"]["arguments"].as_str().unwrap_or(""));
        }
        if !c["finish_reason"].is_null() {
            finish = c["finish_reason"].clone();
        }
    }
    json!({"content": content, "reasoning": reasoning, "tool": name, "args": args, "finish": finish})
}

fn summarize(completion: &Value) -> Value {
    let m = &completion["choices"][0]["message"];
    json!({
        "content": m["content"].as_str().unwrap_or(""),
        "reasoning": m["reasoning_content"].as_str().unwrap_or(""),
        "tool": m["tool_calls"][0]["function"]["name"].as_str().unwrap_or(""),
        "args": m["tool_calls"][0]["function"]["arguments"].as_str().unwrap_or(""),
        "finish": completion["choices"][0]["finish_reason"],
    })
}

#[tokio::test]
async fn one_entry_serves_both_modes() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let miss = call(&url, ALPHA, &chat("both"), &[]).await;
    assert_eq!(miss.header("x-sluice-cache"), "miss");
    let hit = call(&url, ALPHA, &chat_stream("both"), &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert_eq!(hit.header("content-type"), "text/event-stream");
    assert!(hit.header("age").parse::<u64>().is_ok());
    let events = hit.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "no usage chunk unless asked"
    );
    assert_eq!(assemble(&events), summarize(&miss.json()));
    let mut with_usage = chat_stream("both");
    with_usage["stream_options"] = json!({"include_usage": true});
    let hit = call(&url, ALPHA, &with_usage, &[]).await;
    let usage: Vec<Value> = hit
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v.get("usage").is_some_and(|u| u.is_object()))
        .collect();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["usage"], miss.json()["usage"]);
    let hit = call(&url, ALPHA, &chat("both"), &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert_eq!(hit.json(), miss.json());
    assert_eq!(gw.sim.calls(), 1);
}

#[tokio::test]
async fn a_stream_is_stored_as_the_completion_it_amounts_to() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let miss = call(&url, ALPHA, &chat_stream("streamed first"), &[]).await;
    let hit = call(&url, ALPHA, &chat("streamed first"), &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    let v = hit.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(summarize(&v), assemble(&miss.events()));
    assert!(
        v["usage"]["total_tokens"].as_u64().expect("usage") > 0,
        "usage from the stream's usage chunk"
    );
}

#[tokio::test]
async fn key_order_and_whitespace_do_not_matter() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let a = br#"{"model":"deepseek-chat","temperature":0.2,"messages":[{"role":"user","content":"k"}]}"#;
    let b = br#"  {
        "messages" : [ { "content" : "k" , "role" : "user" } ],
        "temperature" : 0.2 ,   "model" : "deepseek-chat" }  "#;
    let r = send(
        post(&url, ALPHA)
            .body(Full::new(Bytes::from_static(a)))
            .expect("req"),
    )
    .await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
    let r = send(
        post(&url, ALPHA)
            .body(Full::new(Bytes::from_static(b)))
            .expect("req"),
    )
    .await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
    let c = br#"{"model":"deepseek-chat","temperature":0.3,"messages":[{"role":"user","content":"k"}]}"#;
    let r = send(
        post(&url, ALPHA)
            .body(Full::new(Bytes::from_static(c)))
            .expect("req"),
    )
    .await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
}

#[tokio::test]
async fn cache_control_and_tenant_switch() {
    let extra = format!(
        "[[tenants]]\nname = \"nocache\"\nkey_sha256 = [\"{}\"]\ncache = false\n",
        sha("sk-nocache-0123456789")
    );
    let gw = TestGateway::start(&extra).await;
    let url = gw.url("/v1/chat/completions");
    let r = call(&url, ALPHA, &chat("cc"), &[("cache-control", "no-store")]).await;
    assert_eq!(r.header("x-sluice-cache"), "bypass");
    let r = call(&url, ALPHA, &chat("cc"), &[]).await;
    assert_eq!(
        r.header("x-sluice-cache"),
        "miss",
        "no-store stored nothing"
    );
    let r = call(&url, ALPHA, &chat("cc"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
    let r = call(&url, ALPHA, &chat("cc"), &[("cache-control", "no-cache")]).await;
    assert_eq!(r.header("x-sluice-cache"), "refresh");
    assert_eq!(gw.sim.calls(), 3, "refresh skips the lookup");
    let r = call(&url, ALPHA, &chat("cc"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
    assert_eq!(r.json()["id"], "sim-2", "the refreshed answer was stored");
    for _ in 0..2 {
        let r = call(&url, "sk-nocache-0123456789", &chat("cc"), &[]).await;
        assert_eq!(r.header("x-sluice-cache"), "bypass");
    }
    assert_eq!(gw.sim.calls(), 5);
}

#[tokio::test]
async fn tenant_scope_isolates_and_shared_scope_pools() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    call(&url, ALPHA, &chat("scoped"), &[]).await;
    let r = call(&url, BETA, &chat("scoped"), &[]).await;
    assert_eq!(
        r.header("x-sluice-cache"),
        "miss",
        "beta cannot read alpha's entry"
    );

    let gw = TestGateway::start("[cache]\nscope = \"shared\"\n").await;
    let url = gw.url("/v1/chat/completions");
    call(&url, ALPHA, &chat("pooled"), &[]).await;
    let r = call(&url, BETA, &chat("pooled"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
}

#[tokio::test]
async fn ten_identical_requests_in_flight_make_one_upstream_call() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let slow = [("x-sim-latency-ms", "300"), ("x-sim-chunk-delay-ms", "30")];
    let leader = tokio::spawn({
        let url = url.clone();
        async move { call(&url, ALPHA, &chat_stream("herd"), &slow).await }
    });
    // Wait until the leader is upstream, so the rest find it in flight.
    while gw.sim.calls() == 0 {
        tokio::task::yield_now().await;
    }
    let mut followers = Vec::new();
    for i in 0..9 {
        let url = url.clone();
        followers.push(tokio::spawn(async move {
            let body = if i % 2 == 0 {
                chat_stream("herd")
            } else {
                chat("herd")
            };
            (i % 2 == 0, call(&url, ALPHA, &body, &slow).await)
        }));
    }
    let leader = leader.await.expect("leader");
    assert_eq!(leader.header("x-sluice-cache"), "miss");
    let expected = assemble(&leader.events());
    let mut coalesced = 0.0;
    for f in followers {
        let (stream, r) = f.await.expect("follower");
        assert_eq!(r.status, 200);
        let cache = r.header("x-sluice-cache").to_string();
        assert!(cache == "coalesced" || cache == "hit", "{cache}");
        if cache == "coalesced" {
            coalesced += 1.0;
        }
        if stream {
            assert_eq!(assemble(&r.events()), expected);
            assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
        } else {
            assert_eq!(summarize(&r.json()), expected);
        }
    }
    assert_eq!(gw.sim.calls(), 1);
    assert!(coalesced >= 1.0, "followers attached to the leader");
    gw.wait_metric(
        "sluice_requests_total",
        &[("cache", "coalesced")],
        coalesced,
    )
    .await;
}

#[tokio::test]
async fn coalesced_followers_share_the_leaders_error_and_nothing_is_stored() {
    let gw = TestGateway::start_with(|c| c.replace("max_retries = 2", "max_retries = 0")).await;
    let url = gw.url("/v1/chat/completions");
    let failing = [("x-sim-latency-ms", "300"), ("x-sim-status", "500")];
    let mut all = Vec::new();
    all.push(tokio::spawn({
        let url = url.clone();
        async move { call(&url, ALPHA, &chat("doomed"), &failing).await }
    }));
    while gw.sim.calls() == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..4 {
        let url = url.clone();
        all.push(tokio::spawn(async move {
            call(&url, ALPHA, &chat_stream("doomed"), &failing).await
        }));
    }
    for r in all {
        let r = r.await.expect("task");
        assert_eq!(r.status, 500);
        assert_eq!(r.json()["error"]["message"], "Server Error");
    }
    assert_eq!(gw.sim.calls(), 1);
    let r = call(&url, ALPHA, &chat("doomed"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-sluice-cache"), "miss");
}

#[tokio::test]
async fn followers_keep_the_upstream_call_alive_when_the_leader_leaves() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let slow = [("x-sim-chunk-delay-ms", "40"), ("x-sim-chunks", "15")];
    let leader = call_open(&url, ALPHA, &chat_stream("left"), &slow).await;
    let mut body = leader.into_body();
    next_chunk(&mut body).await.expect("first event");
    let follower = tokio::spawn({
        let url = url.clone();
        async move { call(&url, ALPHA, &chat("left"), &slow).await }
    });
    // Wait until the follower is attached, then let the leader go.
    while gw
        .metric("sluice_inflight_requests", &[("tenant", "alpha")])
        .await
        < 2.0
    {
        tokio::task::yield_now().await;
    }
    // The follower is past auth; give it a few of the leader's events to
    // attach (it joins in microseconds, the events are 40 ms apart).
    for _ in 0..3 {
        next_chunk(&mut body).await.expect("event");
    }
    drop(body);
    let r = follower.await.expect("follower");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-sluice-cache"), "coalesced");
    assert!(r.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .contains("more14"));
    assert_eq!(gw.sim.aborted(), 0, "upstream ran to the end");
    assert_eq!(gw.sim.calls(), 1);
    let r = call(&url, ALPHA, &chat_stream("left"), &[]).await;
    assert_eq!(
        r.header("x-sluice-cache"),
        "hit",
        "and the answer was stored"
    );
}

#[tokio::test]
async fn reasoner_with_tool_calls_replays_identically_in_both_modes() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let mut req = json!({
        "model": "deepseek-reasoner",
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    });
    let direct = call(&url, ALPHA, &req, &[("cache-control", "no-store")]).await;
    let expected = summarize(&direct.json());
    assert_eq!(expected["tool"], "get_weather");
    assert_eq!(expected["reasoning"], "Let me think about this.");
    req["stream"] = true.into();
    let miss = call(&url, ALPHA, &req, &[]).await;
    assert_eq!(miss.header("x-sluice-cache"), "miss");
    assert_eq!(assemble(&miss.events()), expected);
    let hit = call(&url, ALPHA, &req, &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert_eq!(assemble(&hit.events()), expected);
    req["stream"] = false.into();
    let hit = call(&url, ALPHA, &req, &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert_eq!(summarize(&hit.json()), expected);
    assert_eq!(
        hit.json()["choices"][0]["message"]["tool_calls"][0]["id"],
        "call_sim_0"
    );
}

#[tokio::test]
async fn max_bytes_holds_under_a_flood_of_large_answers() {
    let gw = TestGateway::start("[cache]\nmax_bytes = 300000\n").await;
    let url = gw.url("/v1/chat/completions");
    for i in 0..60 {
        let r = call(
            &url,
            ALPHA,
            &chat(&format!("flood {i}")),
            &[("x-sim-answer-bytes", "20000")],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let bytes = gw.metric("sluice_cache_bytes", &[]).await;
    let entries = gw.metric("sluice_cache_entries", &[]).await;
    assert!(bytes <= 300_000.0 && bytes > 0.0, "{bytes}");
    assert!((1.0..60.0).contains(&entries), "{entries}");
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let gw = TestGateway::start("[cache]\nttl_secs = 1\n").await;
    let url = gw.url("/v1/chat/completions");
    call(&url, ALPHA, &chat("short-lived"), &[]).await;
    let r = call(&url, ALPHA, &chat("short-lived"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
    // Wall-clock expiry: wait out the configured TTL.
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let r = call(&url, ALPHA, &chat("short-lived"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
    assert_eq!(gw.sim.calls(), 2);
}

#[tokio::test]
async fn no_store_and_no_cache_never_coalesce() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let leader = tokio::spawn({
        let url = url.clone();
        async move { call(&url, ALPHA, &chat("alone"), &[("x-sim-latency-ms", "300")]).await }
    });
    while gw.sim.calls() == 0 {
        tokio::task::yield_now().await;
    }
    for cc in ["no-store", "no-cache"] {
        let r = call(&url, ALPHA, &chat("alone"), &[("cache-control", cc)]).await;
        assert_ne!(r.header("x-sluice-cache"), "coalesced", "{cc}");
    }
    assert_eq!(
        leader.await.expect("leader").header("x-sluice-cache"),
        "miss"
    );
    assert_eq!(gw.sim.calls(), 3, "each went upstream itself");
}
