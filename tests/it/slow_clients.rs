//! Slow and hostile clients on the response side (docs/api.md, "Slow clients and connections",
//! the usage estimate, the error event): each test reproduces an attack and
//! checks that another tenant keeps being served meanwhile.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

/// A POST written on a raw connection. With `rcvbuf`, the socket's receive
/// buffer is that small, so a client that never reads closes its TCP window
/// after a few KiB.
async fn raw_post(
    addr: SocketAddr,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
    rcvbuf: Option<u32>,
) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n).expect("rcvbuf");
    }
    let mut s = socket.connect(addr).await.expect("connect");
    let body = body.to_string();
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).await.expect("write");
    s
}

/// Reads a raw response until the connection closes or breaks (within 20 s).
async fn read_raw(s: &mut TcpStream) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!(
                "the connection stayed open: {}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

/// The raw response carried the SSE error event and then broke off: no
/// terminating chunk, so a client that ignores error events still sees a
/// broken transfer.
fn assert_aborted_after_error_event(raw: &str) {
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("upstream_stream_interrupted"), "{raw}");
    assert!(!raw.contains("data: [DONE]"), "{raw}");
    assert!(
        !raw.ends_with("0\r\n\r\n"),
        "the response ended cleanly after the error event: {raw}"
    );
}

/// Another tenant's request, answered in normal time.
async fn beta_is_served(gw: &TestGateway, what: &str) {
    let start = Instant::now();
    let r = call(&gw.url("/v1/chat/completions"), BETA, &chat(what), &[]).await;
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{what}: took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_frees_its_slots() {
    let gw = TestGateway::start_with(|c| {
        c.replace("[server]\n", "[server]\nsend_timeout_secs = 1\n")
            .replace(
                "first_byte_timeout_secs = 5",
                "first_byte_timeout_secs = 20",
            )
            .replace("max_retries = 2\n", "max_retries = 2\nmax_concurrent = 2\n")
    })
    .await;
    // Two streams whose clients never read: each holds an upstream slot.
    let big = [
        ("x-sim-answer-bytes", "16000000"),
        ("x-sim-chunks", "160"),
        ("cache-control", "no-store"),
    ];
    let mut stalled = Vec::new();
    for i in 0..2 {
        let body = chat_stream(&format!("stalled {i}"));
        stalled.push(raw_post(gw.addr, ALPHA, &body, &big, Some(4096)).await);
    }
    while gw.sim.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Both upstream slots are taken; the other tenant gets one once the
    // stalled clients are dropped, a second or so later (before: only at
    // its first-byte timeout, 504).
    let start = Instant::now();
    let r = call(
        &gw.url("/v1/chat/completions"),
        BETA,
        &chat("meanwhile"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        start.elapsed()
    );
    // The stalled requests are gone, with their tenant slots.
    gw.wait_metric("sluice_inflight_requests", &[("tenant", "alpha")], 0.0)
        .await;
    beta_is_served(&gw, "after").await;
    drop(stalled);
}

#[tokio::test]
async fn a_follower_is_not_paced_by_a_leader_that_stops_reading() {
    let gw = TestGateway::start("").await;
    let body = chat_stream("paced");
    let big = [
        ("x-sim-answer-bytes", "7000000"),
        ("x-sim-chunks", "70"),
        ("x-sim-chunk-delay-ms", "20"),
    ];
    // The leader's client never reads (and its send timeout is a minute).
    let leader = raw_post(gw.addr, ALPHA, &body, &big, Some(4096)).await;
    while gw.sim.calls() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the leader's relay start and stall (either order must work).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let follower = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        let body = body.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), call(&url, ALPHA, &body, &big))
                .await
                .expect("the follower is not held back by the leader's client")
        }
    });
    // A second follower that stops reading slows nobody either.
    let stalled_follower = raw_post(gw.addr, ALPHA, &body, &big, Some(4096)).await;
    let follower = follower.await.expect("follower");
    assert_eq!(follower.header("x-sluice-cache"), "coalesced");
    let events = follower.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_content(&events).len(), 7_000_000);
    assert_eq!(gw.sim.calls(), 1, "one upstream call");
    beta_is_served(&gw, "while the leader stalls").await;
    drop((leader, stalled_follower));
}

#[tokio::test]
async fn a_leader_that_leaves_before_headers_does_not_cancel_the_call() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let slow = [("x-sim-latency-ms", "1500")];
    let leader = tokio::spawn({
        let url = url.clone();
        async move { call(&url, ALPHA, &chat_stream("early"), &slow).await }
    });
    while gw.sim.calls() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let followers: Vec<_> = [chat_stream("early"), chat("early")]
        .into_iter()
        .map(|body| {
            let url = url.clone();
            tokio::spawn(async move { call(&url, ALPHA, &body, &[]).await })
        })
        .collect();
    while gw
        .metric("sluice_inflight_requests", &[("tenant", "alpha")])
        .await
        < 3.0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Past auth, the followers attach within microseconds.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The leader's client goes away before upstream's headers arrive.
    leader.abort();
    let mut streamed = followers.into_iter();
    let s = streamed.next().expect("stream").await.expect("task");
    assert_eq!(s.status, 200, "{}", s.text());
    assert_eq!(s.header("x-sluice-cache"), "coalesced");
    assert_eq!(s.events().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_content(&s.events()), "This is a simulated answer.");
    let n = streamed.next().expect("whole").await.expect("task");
    assert_eq!(n.status, 200, "{}", n.text());
    assert_eq!(
        n.json()["choices"][0]["message"]["content"],
        "This is a simulated answer."
    );
    assert_eq!(gw.sim.calls(), 1, "the one call survived its leader");
    beta_is_served(&gw, "after").await;
}

#[tokio::test]
async fn usage_is_estimated_from_text_not_framing() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    // 400 characters of prompt; 4000 of content in 5 chunks, no usage.
    let r = call(
        &url,
        ALPHA,
        &chat_stream(&"x".repeat(400)),
        &[
            ("x-sim-no-usage", "1"),
            ("x-sim-answer-bytes", "4000"),
            ("x-sim-chunks", "5"),
        ],
    )
    .await;
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    let tokens = |kind: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "sluice_tokens_total",
                &[("tenant", "alpha"), ("type", kind)],
            )
            .await
        }
    };
    gw.wait_metric("sluice_usage_estimated_total", &[("tenant", "alpha")], 1.0)
        .await;
    assert_eq!(tokens("prompt").await, 100.0);
    assert_eq!(tokens("completion").await, 1000.0);
    // Non-streaming, with reasoning: "Let me think about this." is 24
    // characters; 401 of prompt round up to 101 tokens.
    let mut body = chat(&"y".repeat(401));
    body["model"] = "deepseek-reasoner".into();
    let r = call(
        &url,
        ALPHA,
        &body,
        &[
            ("x-sim-no-usage", "1"),
            ("x-sim-answer-bytes", "4000"),
            ("x-sim-chunks", "5"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    gw.wait_metric("sluice_usage_estimated_total", &[("tenant", "alpha")], 2.0)
        .await;
    assert_eq!(tokens("prompt").await, 201.0);
    assert_eq!(tokens("completion").await, 1000.0 + 1006.0);
}

#[tokio::test]
async fn an_upstream_error_event_then_done_passes_through_as_it_came() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let r = call(
        &url,
        ALPHA,
        &chat_stream("error then done"),
        &[("x-sim-error-event", "3")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.aborted, "complete as far as Sluice is concerned");
    let events = r.events();
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&events[3]).expect("json");
    assert_eq!(error["error"]["code"], "internal_error", "upstream's own");
    assert!(
        !r.text().contains("upstream_stream_interrupted"),
        "nothing after [DONE]: {events:?}"
    );
    // Not cached.
    let r = call(&url, ALPHA, &chat_stream("error then done"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
    assert_eq!(gw.sim.calls(), 2);
}

#[tokio::test]
async fn after_the_error_event_the_response_is_aborted() {
    let gw = TestGateway::start("").await;
    let close = ("connection", "close");

    // The relay: upstream dies after three events.
    let mut s = raw_post(
        gw.addr,
        ALPHA,
        &chat_stream("abort relay"),
        &[("x-sim-die-after", "3"), close],
        None,
    )
    .await;
    assert_aborted_after_error_event(&read_raw(&mut s).await);

    // A coalesced follower of a call that breaks.
    let failing = [("x-sim-latency-ms", "500"), ("x-sim-die-after", "3"), close];
    let leader = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move { call(&url, ALPHA, &chat_stream("abort follower"), &failing).await }
    });
    while gw.sim.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s = raw_post(
        gw.addr,
        ALPHA,
        &chat_stream("abort follower"),
        &failing,
        None,
    )
    .await;
    let raw = read_raw(&mut s).await;
    assert!(raw.contains("x-sluice-cache: coalesced"), "{raw}");
    assert_aborted_after_error_event(&raw);
    let leader = leader.await.expect("leader");
    assert!(leader.aborted);
    assert_eq!(gw.sim.calls(), 2);
    beta_is_served(&gw, "after the breaks").await;
}

#[tokio::test]
async fn a_stream_cut_by_the_shutdown_grace_is_aborted() {
    let mut gw = TestGateway::start("").await;
    let mut s = raw_post(
        gw.addr,
        ALPHA,
        &chat_stream("grace"),
        &[
            ("x-sim-chunk-delay-ms", "100"),
            ("x-sim-chunks", "300"),
            ("connection", "close"),
        ],
        None,
    )
    .await;
    let mut first = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut first))
        .await
        .expect("the stream started")
        .expect("read");
    assert!(n > 0);
    let done = gw.shutdown();
    let rest = read_raw(&mut s).await;
    let raw = format!("{}{rest}", String::from_utf8_lossy(&first[..n]));
    assert_aborted_after_error_event(&raw);
    tokio::time::timeout(Duration::from_secs(15), done)
        .await
        .expect("shut down")
        .expect("task");
}
