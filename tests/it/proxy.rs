//! Forwarding: non-stream and stream answers, every endpoint, auth and
//! validation errors, header handling.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn non_stream_answer_passes_through() {
    let gw = TestGateway::start("").await;
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &chat("hello"), &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "This is a simulated answer."
    );
    assert!(v["usage"]["prompt_cache_miss_tokens"].is_u64());
    assert_eq!(r.header("x-sluice-cache"), "miss");
    assert!(!r.header("x-request-id").is_empty());
    // Both path spellings reach upstream's /chat/completions.
    let r = call(&gw.url("/chat/completions"), ALPHA, &chat("hello 2"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.sim.calls(), 2);
}

#[tokio::test]
async fn a_whole_answer_leaves_with_its_head() {
    // Upstream sends its headers at once and the body 300 ms later: the
    // client gets the head only with the body (one write), not before it.
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let t = std::time::Instant::now();
    let resp = call_open(
        &url,
        ALPHA,
        &chat("late body"),
        &[("x-sim-body-delay-ms", "300")],
    )
    .await;
    let head_after = t.elapsed();
    assert_eq!(resp.status(), 200);
    assert!(
        head_after >= std::time::Duration::from_millis(300),
        "the head came {head_after:?} after the request, before the body"
    );
    let (parts, body) = resp.into_parts();
    let r = read_rest(parts, body, Vec::new()).await;
    assert_eq!(r.json()["object"], "chat.completion");
    // A stream's head is not held back for its first event: here, one
    // that never comes.
    let head = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        call_open(
            &url,
            ALPHA,
            &chat_stream("no events"),
            &[("x-sim-hang", "body")],
        ),
    )
    .await
    .expect("a stream's head arrives before its events");
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn stream_events_arrive_and_usage_chunk_is_hidden_unless_asked() {
    let gw = TestGateway::start("").await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("s1"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_content(&events), "This is a simulated answer.");
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "usage chunk hidden: {events:?}"
    );
    // Upstream was asked for usage anyway.
    let (_, body) = gw.sim.last_request().expect("seen");
    let sent: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let mut asked = chat_stream("s2");
    asked["stream_options"] = json!({"include_usage": true});
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &asked, &[]).await;
    let events = r.events();
    let usage: Vec<&String> = events.iter().filter(|e| e.contains("\"usage\"")).collect();
    assert_eq!(usage.len(), 1, "{events:?}");
    let u: serde_json::Value = serde_json::from_str(usage[0]).expect("json");
    assert_eq!(u["choices"], json!([]));
    assert!(u["usage"]["total_tokens"].as_u64().expect("n") > 0);
}

#[tokio::test]
async fn stream_first_event_arrives_before_the_stream_ends() {
    let gw = TestGateway::start("").await;
    let resp = call_open(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("live"),
        &[("x-sim-chunk-delay-ms", "300"), ("x-sim-chunks", "20")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let start = std::time::Instant::now();
    let first = next_chunk(&mut body).await.expect("first event");
    assert!(String::from_utf8_lossy(&first).contains("chat.completion.chunk"));
    // 20 chunks 300 ms apart take 6 s; the first arrives long before.
    assert!(start.elapsed() < std::time::Duration::from_secs(3));
}

#[tokio::test]
async fn keep_alive_comments_and_blank_lines_are_forwarded() {
    let gw = TestGateway::start("").await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("ka"),
        &[("x-sim-keepalive", "2")],
    )
    .await;
    assert!(
        r.text().starts_with(": keep-alive\n\n: keep-alive\n\n"),
        "{}",
        r.text()
    );
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("blank"),
        &[("x-sim-keepalive", "3")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("\n\n\n{"));
    assert_eq!(r.json()["object"], "chat.completion");
}

#[tokio::test]
async fn reasoner_tool_calls_prefix_and_fim() {
    let gw = TestGateway::start("").await;
    let mut req = chat("think");
    req["model"] = "deepseek-reasoner".into();
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &req, &[]).await;
    assert_eq!(
        r.json()["choices"][0]["message"]["reasoning_content"],
        "Let me think about this."
    );
    assert_eq!(
        r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"],
        6
    );

    let mut tools = chat_stream("weather");
    tools["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &tools, &[]).await;
    let args: String = r
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(args, "{\"city\": \"Paris\"}");

    let prefix = json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "```", "prefix": true}]});
    let r = call(&gw.url("/beta/chat/completions"), ALPHA, &prefix, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "chat.completion");

    let fim = json!({"model": "deepseek-chat", "prompt": "def fib(", "suffix": "return x", "stream": true});
    let r = call(&gw.url("/beta/completions"), ALPHA, &fim, &[]).await;
    let text: String = r
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "This is a simulated answer.");
    let r = call(
        &gw.url("/beta/completions"),
        ALPHA,
        &json!({"model": "deepseek-chat", "messages": []}),
        &[],
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (400, "missing_field")
    );
}

#[tokio::test]
async fn models_are_filtered_per_tenant() {
    let gw = TestGateway::start("").await;
    let get = |key: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            send(
                Request::get(url)
                    .header("authorization", format!("Bearer {key}"))
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await
        }
    };
    let ids = |r: &Resp| -> Vec<String> {
        r.json()["data"]
            .as_array()
            .expect("list")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_string())
            .collect()
    };
    assert_eq!(
        ids(&get(ALPHA).await),
        vec!["deepseek-chat", "deepseek-reasoner"]
    );
    assert_eq!(ids(&get(BETA).await), vec!["deepseek-chat"]);
}

#[tokio::test]
async fn sluice_errors_have_the_openai_shape() {
    let gw =
        TestGateway::start_with(|c| c.replace("[server]\n", "[server]\nmax_body_bytes = 1000\n"))
            .await;
    let url = gw.url("/v1/chat/completions");
    let cases: Vec<(Resp, u16, &str, &str)> = vec![
        (
            call(&url, "sk-wrong", &chat("x"), &[]).await,
            401,
            "authentication_error",
            "invalid_api_key",
        ),
        (
            send(
                Request::post(&url)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .expect("req"),
            )
            .await,
            401,
            "authentication_error",
            "invalid_api_key",
        ),
        (
            call(&gw.url("/v1/nope"), ALPHA, &chat("x"), &[]).await,
            404,
            "invalid_request_error",
            "not_found",
        ),
        (
            send(
                Request::get(&url)
                    .header("authorization", format!("Bearer {ALPHA}"))
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await,
            405,
            "invalid_request_error",
            "method_not_allowed",
        ),
        (
            send(
                post(&url, ALPHA)
                    .body(Full::new(Bytes::from_static(b"\x00\x01binary")))
                    .expect("req"),
            )
            .await,
            400,
            "invalid_request_error",
            "invalid_json",
        ),
        (
            call(&url, ALPHA, &json!([1, 2]), &[]).await,
            400,
            "invalid_request_error",
            "invalid_json",
        ),
        (
            call(&url, ALPHA, &json!({"messages": []}), &[]).await,
            400,
            "invalid_request_error",
            "missing_field",
        ),
        (
            call(&url, ALPHA, &json!({"model": "deepseek-chat"}), &[]).await,
            400,
            "invalid_request_error",
            "missing_field",
        ),
        (
            call(
                &url,
                BETA,
                &json!({"model": "deepseek-reasoner", "messages": []}),
                &[],
            )
            .await,
            403,
            "permission_error",
            "model_not_allowed",
        ),
        (
            call(&url, ALPHA, &chat(&"x".repeat(2000)), &[]).await,
            413,
            "invalid_request_error",
            "body_too_large",
        ),
    ];
    for (r, status, ty, code) in cases {
        assert_eq!(r.status.as_u16(), status, "{code}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["type"], ty);
        assert_eq!(v["error"]["code"], code);
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(!r.header("x-request-id").is_empty());
    }
    assert_eq!(gw.sim.calls(), 0, "no refused request reaches upstream");
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_refused() {
    let gw =
        TestGateway::start_with(|c| c.replace("[server]\n", "[server]\nmax_body_bytes = 1000\n"))
            .await;
    // No content-length: the limit is enforced while reading.
    let big = Bytes::from(chat(&"y".repeat(5000)).to_string());
    let req = post(&gw.url("/v1/chat/completions"), ALPHA)
        .body(Chunked(Some(big)))
        .expect("req");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.expect("resp");
    assert_eq!(resp.status(), 413);
    assert_eq!(gw.sim.calls(), 0);
}

/// A body of unknown length, so it goes out chunked.
struct Chunked(Option<Bytes>);

impl http_body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(
        &url,
        ALPHA,
        &chat("id"),
        &[("x-request-id", "trace-123.abc_X")],
    )
    .await;
    assert_eq!(r.header("x-request-id"), "trace-123.abc_X");
    let (seen, _) = gw.sim.last_request().expect("seen");
    assert_eq!(seen["x-request-id"], "trace-123.abc_X");
    let r = call(&url, ALPHA, &chat("id2"), &[("x-request-id", "has space")]).await;
    assert_ne!(r.header("x-request-id"), "has space");
    assert!(!r.header("x-request-id").is_empty());
    let long = "a".repeat(129);
    let r = call(&url, "bad-key", &chat("id3"), &[("x-request-id", &long)]).await;
    assert_eq!(r.status, 401);
    assert_ne!(r.header("x-request-id"), long);
}

#[tokio::test]
async fn upstream_gets_the_shared_key_and_no_hop_by_hop_headers() {
    let gw = TestGateway::start("").await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("headers"),
        &[
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("x-custom", "kept"),
            ("accept-encoding", "gzip"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let (h, body) = gw.sim.last_request().expect("seen");
    assert_eq!(h["authorization"], format!("Bearer {UPSTREAM_KEY}"));
    assert!(
        !h.contains_key("x-private"),
        "headers named in Connection are dropped"
    );
    assert!(!h.contains_key("te"));
    assert!(!h.contains_key("accept-encoding"));
    assert_eq!(h["x-custom"], "kept");
    assert!(!h.contains_key("keep-alive") && !h.contains_key("connection"));
    // Host names the upstream, not the gateway; the length is the body's.
    let upstream = gw.sim.base_url();
    assert_eq!(
        h["host"],
        upstream.trim_start_matches("http://").trim_end_matches('/')
    );
    assert_eq!(h["content-length"], body.len().to_string().as_str());
    assert!(
        !format!("{h:?}").contains(ALPHA),
        "the tenant key never goes upstream"
    );
}

#[tokio::test]
async fn unknown_fields_pass_through_untouched() {
    let gw = TestGateway::start("").await;
    let raw = br#"{"model":"deepseek-chat","messages":[{"role":"user","content":"x"}],"future_param":{"a":[1,2.50]},"temperature":0.7}"#;
    let r = send(
        post(&gw.url("/v1/chat/completions"), ALPHA)
            .body(Full::new(Bytes::from_static(raw)))
            .expect("req"),
    )
    .await;
    assert_eq!(r.status, 200);
    let (_, body) = gw.sim.last_request().expect("seen");
    assert_eq!(
        &body[..],
        &raw[..],
        "a non-stream body goes upstream byte for byte"
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let gw = TestGateway::start("").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = post(&gw.url("/v1/chat/completions"), ALPHA)
        .body(Full::new(Bytes::from(chat_stream("h2").to_string())))
        .expect("req");
    let resp = client.request(req).await.expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_request_trickled_byte_by_byte_is_served() {
    // The protocol is told from the first segment; whatever that segment
    // holds (here a lone "P", which could still be h2c's preface), the
    // request is served as HTTP/1.1.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start("").await;
    let body = chat("trickle").to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALPHA}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    for b in head.as_bytes() {
        conn.write_all(std::slice::from_ref(b))
            .await
            .expect("write");
    }
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("chat.completion"), "{text}");
}

#[tokio::test]
async fn answers_from_upstream_name_it_and_hits_do_not() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let miss = call(&url, ALPHA, &chat("named"), &[]).await;
    assert_eq!(miss.header("x-sluice-cache"), "miss");
    assert_eq!(miss.header("x-sluice-upstream"), "default");
    let hit = call(&url, ALPHA, &chat("named"), &[]).await;
    assert_eq!(hit.header("x-sluice-cache"), "hit");
    assert!(hit.headers.get("x-sluice-upstream").is_none());
    // Upstream's own errors came from an upstream call too; Sluice's own do
    // not.
    let err = call(&url, ALPHA, &chat("err"), &[("x-sim-status", "400")]).await;
    assert_eq!(err.status, 400);
    assert_eq!(err.header("x-sluice-upstream"), "default");
    let refused = call(&url, "sk-nobody", &chat("x"), &[]).await;
    assert_eq!(refused.status, 401);
    assert!(refused.headers.get("x-sluice-upstream").is_none());
    // A coalesced answer names its leader's upstream.
    let lead = tokio::spawn({
        let url = url.clone();
        async move { call(&url, ALPHA, &chat("shared"), &[("x-sim-latency-ms", "300")]).await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gw.sim.calls() < 3 {
        assert!(std::time::Instant::now() < deadline, "the leader's call");
        tokio::task::yield_now().await;
    }
    let follower = call(&url, ALPHA, &chat("shared"), &[]).await;
    assert_eq!(follower.header("x-sluice-cache"), "coalesced");
    assert_eq!(follower.header("x-sluice-upstream"), "default");
    assert_eq!(
        lead.await.expect("lead").header("x-sluice-upstream"),
        "default"
    );
}
