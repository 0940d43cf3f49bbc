//! Client connections under hostile use (issue 14): refusals before the
//! body is read, idle connections (HTTP/1.1 and h2c that answers PING),
//! `max_connections`, and connection settings applied by a reload.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// One HTTP/1.1 response read off a raw socket; `None` if the connection
/// closed before a status line arrived.
struct RawResp {
    status: u16,
    head: String,
}

impl RawResp {
    fn closes(&self) -> bool {
        self.head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close"))
    }
}

async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawResp> {
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer or a close in time")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + length {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..end + length);
    Some(RawResp { status, head })
}

fn request_head(path: &str, key: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

const LIMITED: &str = "sk-limited-0123456789";

#[tokio::test]
async fn refusals_before_the_body_never_close_a_connection_without_warning() {
    let gw = TestGateway::start(&format!(
        "[[tenants]]\nname = \"limited\"\nkey_sha256 = [\"{}\"]\nrequests_per_minute = 1\nrequest_burst = 1\n",
        sha(LIMITED)
    ))
    .await;
    // Spend the limited tenant's one request.
    let r = call(&gw.url("/v1/chat/completions"), LIMITED, &chat("once"), &[]).await;
    assert_eq!(r.status, 200);

    let body = serde_json::to_vec(&chat(&"x".repeat(20_000))).expect("json");
    let mut unwarned = 0;
    let mut answered = 0;
    for (path, key, want) in [
        ("/v1/chat/completions", "sk-wrong", 401),
        ("/v1/chat/completions", LIMITED, 429),
        ("/v1/nowhere", ALPHA, 404),
    ] {
        for _ in 0..5 {
            let mut s = TcpStream::connect(gw.addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let mut buf = Vec::new();
            // The head and part of the body, then the rest a moment later:
            // the refusal is decided before the body is all there.
            s.write_all(request_head(path, key, body.len()).as_bytes())
                .await
                .expect("write");
            s.write_all(&body[..1000]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(30)).await;
            s.write_all(&body[1000..]).await.expect("write");
            let first = read_response(&mut s, &mut buf).await.expect("an answer");
            assert_eq!(first.status, want, "{}", first.head);
            if first.closes() {
                continue;
            }
            // The connection was left open without a warning: the next
            // request on it must be answered.
            let next = serde_json::to_vec(&chat("next")).expect("json");
            let _ = s
                .write_all(request_head(path, key, next.len()).as_bytes())
                .await;
            let _ = s.write_all(&next).await;
            match read_response(&mut s, &mut buf).await {
                Some(r) => {
                    assert_eq!(r.status, want);
                    answered += 1;
                }
                None => unwarned += 1,
            }
        }
    }
    assert_eq!(unwarned, 0, "connections closed under the next request");
    assert!(answered > 0, "refusals keep their connection when they can");

    // A body declared over the limit is not read: the answer says close.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(request_head("/v1/chat/completions", ALPHA, 5 << 20).as_bytes())
        .await
        .expect("write");
    let r = read_response(&mut s, &mut buf).await.expect("an answer");
    assert_eq!(r.status, 413);
    assert!(r.closes(), "{}", r.head);

    // Meanwhile another tenant is served as usual.
    let r = call(&gw.url("/v1/chat/completions"), BETA, &chat("beta"), &[]).await;
    assert_eq!(r.status, 200);
}

fn short_keepalive(c: String) -> String {
    c.replace(
        "shutdown_grace_secs = 2",
        "shutdown_grace_secs = 2\nkeepalive_timeout_secs = 1",
    )
}

#[tokio::test]
async fn idle_http1_connections_are_closed_after_the_keepalive_timeout() {
    let gw = TestGateway::start_with(short_keepalive).await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let mut buf = Vec::new();
    let body = serde_json::to_vec(&chat("idle")).expect("json");
    s.write_all(request_head("/v1/chat/completions", ALPHA, body.len()).as_bytes())
        .await
        .expect("write");
    s.write_all(&body).await.expect("write");
    let r = read_response(&mut s, &mut buf).await.expect("answer");
    assert_eq!(r.status, 200);
    let idle = Instant::now();
    assert!(read_response(&mut s, &mut buf).await.is_none(), "closed");
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );

    // A stream longer than the timeout is a request in flight, not idle.
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("slow"),
        &[("x-sim-chunk-delay-ms", "400")],
    )
    .await;
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn idle_h2c_connections_that_answer_ping_are_closed_with_goaway() {
    let gw = TestGateway::start_with(short_keepalive).await;
    let stream = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(200))
        .keep_alive_while_idle(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    let conn = tokio::spawn(conn);
    // One request, then nothing but PINGs.
    let r = send
        .send_request(
            http::Request::get(gw.url("/v1/models"))
                .header("authorization", format!("Bearer {ALPHA}"))
                .body(Empty::new())
                .expect("req"),
        )
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    let _ = r.into_body().collect().await;
    let idle = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle h2c connection is closed")
        .expect("join")
        .ok();
    assert!(
        idle.elapsed() >= Duration::from_millis(900),
        "{:?}",
        idle.elapsed()
    );
}

#[tokio::test]
async fn past_max_connections_new_ones_wait_in_the_backlog() {
    let gw = TestGateway::start_with(|c| {
        c.replace(
            "shutdown_grace_secs = 2",
            "shutdown_grace_secs = 2\nmax_connections = 2",
        )
    })
    .await;
    let a = TcpStream::connect(gw.addr).await.expect("connect");
    let mut b = TcpStream::connect(gw.addr).await.expect("connect");
    // Both are accepted (b answers a request), then a third waits.
    let body = serde_json::to_vec(&chat("held")).expect("json");
    let mut buf = Vec::new();
    b.write_all(request_head("/v1/chat/completions", ALPHA, body.len()).as_bytes())
        .await
        .expect("write");
    b.write_all(&body).await.expect("write");
    assert_eq!(
        read_response(&mut b, &mut buf)
            .await
            .expect("answer")
            .status,
        200
    );

    let mut c = TcpStream::connect(gw.addr)
        .await
        .expect("the backlog takes it");
    c.write_all(request_head("/v1/chat/completions", ALPHA, body.len()).as_bytes())
        .await
        .expect("write");
    c.write_all(&body).await.expect("write");
    let mut cbuf = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(700), read_response(&mut c, &mut cbuf)).await;
    assert!(
        waited.is_err(),
        "a third connection was served past max_connections"
    );
    drop(a);
    let r = tokio::time::timeout(Duration::from_secs(5), read_response(&mut c, &mut cbuf))
        .await
        .expect("served once a connection closed")
        .expect("answer");
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_reload_applies_connection_settings_and_names_what_it_cannot() {
    let mut gw = TestGateway::start_with(|c| {
        c.replace("shutdown_grace_secs = 2", "shutdown_grace_secs = 30")
    })
    .await;
    let text = config_text(&gw.sim.base_url(), "").replace(
        "shutdown_grace_secs = 2",
        "shutdown_grace_secs = 1\nheader_read_timeout_secs = 1",
    );
    let changed = text
        .replace("max_retries = 2", "max_retries = 2\nmax_concurrent = 7")
        .replace(
            "[pricing.deepseek-chat]",
            "[cache]\nmax_bytes = 1000\n\n[pricing.deepseek-chat]",
        );
    let ignored = gw
        .handle
        .reload(parse(&changed), sluice::Secret::new(UPSTREAM_KEY));
    assert_eq!(ignored, vec!["cache.max_bytes", "upstream.max_concurrent"]);
    let running = gw.handle.app().snapshot.load();
    assert_eq!(running.config.upstreams[0].max_concurrent, 0, "kept");
    assert_eq!(
        running.config.server.header_read_timeout,
        Duration::from_secs(1)
    );

    // header_read_timeout: a new connection that stalls in its headers is
    // dropped after the new timeout, not the old 10 s.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let t = Instant::now();
    let mut buf = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), read_response(&mut s, &mut buf)).await;
    assert!(ended.is_ok(), "the stalled client was not dropped in time");
    assert!(t.elapsed() < Duration::from_secs(5));

    // shutdown_grace: a stream still running at shutdown ends after the
    // reloaded 1 s, not 30 s.
    let mut open = call_open(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("long"),
        &[("x-sim-chunk-delay-ms", "500"), ("x-sim-chunks", "40")],
    )
    .await;
    assert!(next_chunk(open.body_mut()).await.is_some());
    let t = Instant::now();
    let done = gw.shutdown();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("drained within the reloaded grace")
        .expect("join");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}
