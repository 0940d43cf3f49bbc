//! Upstream faults and hostile clients: retries, timeouts, broken streams,
//! garbage, cancellation, slow-loris.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test]
async fn retries_get_through_a_flaky_upstream() {
    let gw = TestGateway::start("").await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("flaky"),
        &[("x-sim-fail-first", "2"), ("x-sim-key", "flaky-1")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.sim.calls(), 3);
    assert_eq!(
        gw.metric("sluice_upstream_requests_total", &[("status", "503")])
            .await,
        2.0
    );
    assert_eq!(
        gw.metric("sluice_upstream_requests_total", &[("status", "200")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_overloaded_upstream_is_retried() {
    let gw = TestGateway::start("").await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("overloaded"),
        &[
            ("x-sim-status", "529"),
            ("x-sim-fail-first", "1"),
            ("x-sim-key", "overloaded-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.sim.calls(), 2);
    assert_eq!(
        gw.metric("sluice_upstream_requests_total", &[("status", "529")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn connections_broken_before_headers_are_retried() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(
        &url,
        ALPHA,
        &chat("broken once"),
        &[
            ("x-sim-close", "1"),
            ("x-sim-fail-first", "1"),
            ("x-sim-key", "close-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "the retry got through");
    assert_eq!(gw.sim.calls(), 2);
    let r = call(&url, ALPHA, &chat("always broken"), &[("x-sim-close", "1")]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unreachable");
    assert_eq!(gw.sim.calls(), 5, "1 + max_retries attempts");
}

#[tokio::test]
async fn upstream_errors_pass_through_once_retries_are_spent() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(&url, ALPHA, &chat("down"), &[("x-sim-status", "503")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.json()["error"]["message"],
        "Server Overloaded",
        "upstream's body, unchanged"
    );
    assert_eq!(gw.sim.calls(), 3, "1 try + max_retries");
    assert_eq!(r.header("x-sluice-cache"), "miss");

    for (status, should_retry) in [
        (402, "false"),
        (401, "false"),
        (400, "false"),
        (422, "false"),
    ] {
        let before = gw.sim.calls();
        let r = call(
            &url,
            ALPHA,
            &chat(&format!("no retry {status}")),
            &[("x-sim-status", &status.to_string())],
        )
        .await;
        assert_eq!(r.status.as_u16(), status);
        assert_eq!(r.header("x-should-retry"), should_retry);
        assert_eq!(gw.sim.calls() - before, 1, "{status} is not retried");
    }
    // Errors are never cached.
    let before = gw.sim.calls();
    let r = call(&url, ALPHA, &chat("no retry 402"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.sim.calls() - before, 1);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let gw = TestGateway::start("").await;
    let start = Instant::now();
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("slow down"),
        &[
            ("x-sim-fail-first", "1"),
            ("x-sim-key", "ra"),
            ("x-sim-status", "429"),
            ("x-sim-retry-after", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(990),
        "waited {:?}",
        start.elapsed()
    );
    assert_eq!(gw.sim.calls(), 2);
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let gw = TestGateway::start_with(|c| {
        let start = c.find("base_url = \"").expect("base_url") + "base_url = \"".len();
        let end = start + c[start..].find('"').expect("end");
        format!("{}http://127.0.0.1:{port}{}", &c[..start], &c[end..])
    })
    .await;
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &chat("x"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unreachable");
    assert_eq!(r.json()["error"]["type"], "upstream_error");
    assert_eq!(
        gw.metric("sluice_upstream_requests_total", &[("status", "error")])
            .await,
        3.0
    );
}

fn quick_timeouts(c: String) -> String {
    c.replace("first_byte_timeout_secs = 5", "first_byte_timeout_secs = 1")
        .replace("idle_timeout_secs = 5", "idle_timeout_secs = 1")
}

#[tokio::test]
async fn no_headers_in_time_is_504() {
    let gw = TestGateway::start_with(quick_timeouts).await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("hang"),
        &[("x-sim-hang", "headers")],
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), "upstream_timeout");
    assert_eq!(gw.sim.calls(), 1, "timeouts are not retried");
}

#[tokio::test]
async fn stream_without_a_first_event_ends_with_the_error_event() {
    let gw = TestGateway::start_with(quick_timeouts).await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("hang"),
        &[("x-sim-hang", "body"), ("x-sim-keepalive", "1")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.text().starts_with(": keep-alive"),
        "keep-alives are forwarded but don't count"
    );
    assert_stream_error_end(&r);
}

#[tokio::test]
async fn idle_gap_in_a_stream_ends_it() {
    let gw = TestGateway::start_with(quick_timeouts).await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("gap"),
        &[("x-sim-chunk-delay-ms", "2500")],
    )
    .await;
    assert_stream_error_end(&r);
    assert!(r.events().len() >= 2, "the first event came through");
}

#[tokio::test]
async fn stream_dying_mid_way_ends_with_the_error_event_and_is_not_cached() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(
        &url,
        ALPHA,
        &chat_stream("die"),
        &[("x-sim-die-after", "3")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_stream_error_end(&r);
    assert_eq!(r.events().len(), 4, "3 events, then the error");
    let r = call(&url, ALPHA, &chat_stream("die"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
    assert_eq!(gw.sim.calls(), 2);
    // The broken stream was metered by estimate.
    assert_eq!(
        gw.metric("sluice_usage_estimated_total", &[("tenant", "alpha")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_stream_ends_at_done_even_if_upstream_lingers() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(
        &url,
        ALPHA,
        &chat_stream("linger"),
        &[("x-sim-linger", "1")],
    )
    .await;
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    assert!(!r.text().contains("upstream_stream_interrupted"));
    // Complete, so metered from its usage and stored.
    assert_eq!(gw.metric("sluice_usage_estimated_total", &[]).await, 0.0);
    assert_eq!(
        call(&url, ALPHA, &chat("linger"), &[])
            .await
            .header("x-sluice-cache"),
        "hit"
    );
}

#[tokio::test]
async fn garbage_in_a_stream_ends_it() {
    let gw = TestGateway::start("").await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("junk"),
        &[("x-sim-garbage", "1")],
    )
    .await;
    assert_stream_error_end(&r);
    assert!(
        !r.text().contains("this is not json"),
        "garbage is not forwarded"
    );
}

#[tokio::test]
async fn non_stream_cut_off_reaches_the_client_cut_off() {
    let gw = TestGateway::start("").await;
    let resp = call_open(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("cut"),
        &[("x-sim-die-after", "20")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let read = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(read.is_err(), "the client's HTTP stack sees the body break");
    // And nothing was cached.
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &chat("cut"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
}

#[tokio::test]
async fn non_stream_garbage_passes_through_and_is_not_cached() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(&url, ALPHA, &chat("html"), &[("x-sim-garbage", "1")]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("<html>"));
    let r = call(&url, ALPHA, &chat("html"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
    assert_eq!(
        gw.metric("sluice_usage_estimated_total", &[("tenant", "alpha")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let gw = TestGateway::start("").await;
    let resp = call_open(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("bye"),
        &[("x-sim-chunk-delay-ms", "50"), ("x-sim-chunks", "400")],
    )
    .await;
    let mut body = resp.into_body();
    next_chunk(&mut body).await.expect("first event");
    drop(body);
    tokio::time::timeout(Duration::from_secs(10), gw.sim.wait_aborted(1))
        .await
        .expect("upstream stream cancelled");
    // The tenant's in-flight gauge and permit are released.
    gw.wait_metric("sluice_inflight_requests", &[("tenant", "alpha")], 0.0)
        .await;
}

#[tokio::test]
async fn slow_loris_is_dropped_and_others_are_served() {
    let gw = TestGateway::start_with(|c| {
        c.replace("[server]\n", "[server]\nheader_read_timeout_secs = 1\n")
    })
    .await;
    let mut slow = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // One that never sends a byte is dropped the same way.
    let mut silent = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("meanwhile"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf))
        .await
        .expect("closed within the timeout");
    assert!(read.is_ok());
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf))
        .await
        .expect("a silent connection is closed within the timeout");
    assert!(read.is_ok());
}

#[tokio::test]
async fn upstream_max_concurrent_queues_fifo() {
    let gw = TestGateway::start_with(|c| {
        c.replace("max_retries = 2\n", "max_retries = 2\nmax_concurrent = 1\n")
    })
    .await;
    let url = gw.url("/v1/chat/completions");
    let (ra, rb) = (chat("a"), chat("b"));
    let a = call(&url, ALPHA, &ra, &[("x-sim-latency-ms", "300")]);
    let b = call(&url, ALPHA, &rb, &[("x-sim-latency-ms", "300")]);
    let start = Instant::now();
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    assert!(
        start.elapsed() >= Duration::from_millis(590),
        "one at a time: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_gives_up_before_headers_frees_its_slot() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let body = chat("slow");
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { call(&url, ALPHA, &body, &[("x-sim-latency-ms", "8000")]).await }
    });
    while gw.sim.calls() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        gw.metric("sluice_inflight_requests", &[("tenant", "alpha")])
            .await,
        1.0
    );
    waiting.abort();
    // The client's connection closed: the request is dropped long before
    // upstream's 8 s answer.
    gw.wait_metric("sluice_inflight_requests", &[("tenant", "alpha")], 0.0)
        .await;
}

#[tokio::test]
async fn every_retryable_status_is_retried() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    for (i, status) in ["429", "500", "502", "503"].into_iter().enumerate() {
        let key = format!("retry-{status}");
        let before = gw.sim.calls();
        let r = call(
            &url,
            ALPHA,
            &chat(&format!("r{i}")),
            &[
                ("x-sim-fail-first", "1"),
                ("x-sim-key", &key),
                ("x-sim-status", status),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{status} retried");
        assert_eq!(gw.sim.calls() - before, 2);
    }
}

#[tokio::test]
async fn a_stalled_non_stream_body_is_cut_at_the_idle_timeout() {
    let gw = TestGateway::start_with(quick_timeouts).await;
    let resp = call_open(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("stall"),
        &[("x-sim-hang", "body")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("cut within the idle timeout");
    assert!(
        read.is_err(),
        "the connection is closed, so the client's HTTP stack raises"
    );
}

#[tokio::test]
async fn streams_without_usage_are_metered_by_estimate() {
    let gw = TestGateway::start("").await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("no usage"),
        &[("x-sim-no-usage", "1")],
    )
    .await;
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        gw.metric(
            "sluice_usage_estimated_total",
            &[("tenant", "alpha"), ("model", "deepseek-chat")]
        )
        .await,
        1.0
    );
    assert!(
        gw.metric(
            "sluice_tokens_total",
            &[
                ("tenant", "alpha"),
                ("type", "prompt"),
                ("model", "deepseek-chat")
            ]
        )
        .await
            == 2.0,
        "the prompt's 8 characters, counted in the client's body (not in the \
         upstream's, where `stream_options` went in before the messages)"
    );
    assert!(
        gw.metric(
            "sluice_tokens_total",
            &[("tenant", "alpha"), ("type", "completion")]
        )
        .await
            > 0.0
    );
    // An abandoned stream is estimated too.
    let resp = call_open(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("abandoned"),
        &[("x-sim-chunk-delay-ms", "50"), ("x-sim-chunks", "100")],
    )
    .await;
    let mut body = resp.into_body();
    next_chunk(&mut body).await.expect("first event");
    drop(body);
    gw.wait_metric(
        "sluice_usage_estimated_total",
        &[("tenant", "alpha"), ("model", "deepseek-chat")],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn an_https_upstream_is_spoken_to_over_tls() {
    // The simulator speaks plain HTTP: a TLS client hello gets garbage back,
    // the handshake fails, and the request ends as unreachable. (A plain
    // HTTP request would have succeeded.)
    let gw =
        TestGateway::start_with(|c| c.replace("base_url = \"http://", "base_url = \"https://"))
            .await;
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &chat("tls"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unreachable");
    assert_eq!(
        gw.sim.calls(),
        0,
        "no plain HTTP request reached the simulator"
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let gw = TestGateway::start("").await;
    // Answers, a stream read to its end, and an answer after it: each frees
    // the connection for the next.
    let bodies = (0..4)
        .map(|i| chat(&format!("reuse {i}")))
        .chain([chat_stream("reuse stream"), chat("after the stream")]);
    for body in bodies {
        let r = call(&gw.url("/v1/chat/completions"), ALPHA, &body, &[]).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(gw.sim.calls(), 6);
    assert_eq!(
        gw.sim.connections(),
        1,
        "one upstream connection served all"
    );
}

/// An upstream that answers one request per connection and then closes it,
/// without saying so in the answer (as a server whose keep-alive timeout
/// ran out would). Reports each connection it closed.
async fn one_shot_upstream() -> (String, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Head, then a body of content-length bytes.
            let complete = |seen: &[u8]| {
                let text = String::from_utf8_lossy(seen);
                let Some(end) = text.find("\r\n\r\n") else {
                    return false;
                };
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                seen.len() >= end + 4 + len
            };
            while !complete(&seen) {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let body = r#"{"id":"x","object":"chat.completion","created":1,"model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
            drop(conn);
            let _ = tx.send(());
        }
    });
    (format!("http://{addr}"), rx)
}

#[tokio::test]
async fn a_connection_upstream_closed_while_idle_is_not_used() {
    let (upstream, mut closed) = one_shot_upstream().await;
    // No retries: only noticing the closed connection keeps the second
    // request from failing.
    let gw = TestGateway::start_with(|c| {
        let c = c.replace("max_retries = 2", "max_retries = 0");
        let start = c.find("base_url = \"").expect("base_url") + "base_url = \"".len();
        let end = start + c[start..].find('"').expect("quote");
        format!("{}{upstream}{}", &c[..start], &c[end..])
    })
    .await;
    for i in 0..3 {
        let r = call(
            &gw.url("/v1/chat/completions"),
            ALPHA,
            &chat(&format!("idle close {i}")),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        closed.recv().await.expect("upstream closed its connection");
    }
}
