//! Slow and hostile clients on the response side (SPEC §3 "Slow clients"):
//! each test reproduces an attack and checks that another tenant keeps being
//! served meanwhile.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
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
