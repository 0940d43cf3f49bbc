//! Operations: health endpoints and graceful shutdown.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::support::*;

async fn admin_get(gw: &TestGateway, path: &str) -> Resp {
    send(
        Request::get(format!("http://{}{path}", gw.admin))
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await
}

#[tokio::test]
async fn health_and_readiness() {
    let gw = TestGateway::start("").await;
    assert_eq!(admin_get(&gw, "/healthz").await.status, 200);
    assert_eq!(admin_get(&gw, "/readyz").await.status, 200);
    assert_eq!(admin_get(&gw, "/nope").await.status, 404);
}

#[tokio::test]
async fn shutdown_lets_running_streams_finish_and_refuses_new_connections() {
    let mut gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let resp = call_open(
        &url,
        ALPHA,
        &chat_stream("drain"),
        &[("x-sim-chunk-delay-ms", "50"), ("x-sim-chunks", "10")],
    )
    .await;
    let mut body = resp.into_body();
    next_chunk(&mut body).await.expect("first event");
    let done = gw.shutdown();
    // Readiness flips while the stream drains.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while admin_get(&gw, "/readyz").await.status != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never went 503"
        );
        tokio::task::yield_now().await;
    }
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "new connections are refused"
    );
    let rest = body.collect().await.expect("stream finishes").to_bytes();
    assert!(
        rest.ends_with(b"data: [DONE]\n\n"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("stops")
        .expect("clean");
}

#[tokio::test]
async fn streams_outliving_the_grace_end_with_the_error_event() {
    let mut gw = TestGateway::start_with(|c| {
        c.replace("shutdown_grace_secs = 2", "shutdown_grace_secs = 1")
    })
    .await;
    let url = gw.url("/v1/chat/completions");
    let resp = call_open(
        &url,
        ALPHA,
        &chat_stream("too long"),
        &[("x-sim-chunk-delay-ms", "100"), ("x-sim-chunks", "200")],
    )
    .await;
    let mut body = resp.into_body();
    next_chunk(&mut body).await.expect("first event");
    let done = gw.shutdown();
    // The error event, then the transfer breaks (no clean end).
    let mut rest = Vec::new();
    let mut aborted = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => rest.extend_from_slice(&f.into_data().unwrap_or_default()),
            Err(_) => {
                aborted = true;
                break;
            }
        }
    }
    assert!(aborted, "the response is aborted after the error event");
    let events = sse_data(&String::from_utf8_lossy(&rest));
    let last: serde_json::Value =
        serde_json::from_str(events.last().expect("event")).expect("json");
    assert_eq!(last["error"]["code"], "upstream_stream_interrupted");
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("stops")
        .expect("clean");
}
