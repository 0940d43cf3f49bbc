//! Hostile bodies and headers (issue 14): each test sends what a hostile
//! tenant would and checks the documented answer, and where it makes sense that
//! another tenant keeps getting answers while the attack runs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

/// Sends raw body bytes as tenant `key`, with extra headers.
async fn raw(url: &str, key: &str, body: impl Into<Bytes>, headers: &[(&str, &str)]) -> Resp {
    let mut b = post(url, key);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(body.into())).expect("req")).await
}

/// A chat body of about `size` bytes whose padding is one long array of
/// small numbers: the shape that made a JSON tree cost ~17× the body.
fn numbers_body(size: usize, n: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"model":"deepseek-chat","messages":[{{"role":"user","content":"numbers {n}"}}],"padding":["#
    );
    let mut body = head.into_bytes();
    while body.len() + 4 < size {
        body.extend_from_slice(b"1,");
    }
    body.extend_from_slice(b"1]}");
    body
}

/// `VmHWM` (peak RSS) or `VmRSS` of a process, in bytes.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("field")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_bodies_of_a_million_numbers_stay_within_a_small_multiple_of_their_size() {
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let text = config_text(&sim.base_url(), "").replace(
        "first_byte_timeout_secs = 5",
        "first_byte_timeout_secs = 60",
    );
    let mut replica = Replica::start(&text).await;
    let pid = replica.pid();
    let url = replica.url("/v1/chat/completions");
    let before = sim.calls();
    // Warm up, then take the baseline peak.
    assert_eq!(call(&url, BETA, &chat("warm"), &[]).await.status, 200);
    let base = status_kib(pid, "VmHWM:");

    // Twenty bodies as in the issue, of 512 KiB each so a debug build scans
    // them in time; the ratio to the body size is what is asserted.
    const N: usize = 20;
    const SIZE: usize = 512 * 1024;
    let bodies: Vec<Bytes> = (0..N).map(|i| Bytes::from(numbers_body(SIZE, i))).collect();
    let attack: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let url = url.clone();
            tokio::spawn(async move {
                // Held upstream for a while, so every request is alive at
                // once, through the upstream wait; then answered with
                // upstream's 400 (the simulator need not parse the body).
                let req = post(&url, ALPHA)
                    .header("x-sim-latency-ms", "1500")
                    .header("x-sim-status", "400")
                    .body(Full::new(body))
                    .expect("req");
                let resp = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http()
                .request(req)
                .await;
                match resp {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => panic!("attack request {i}: {e:?}"),
                }
            })
        })
        .collect();
    // Fault isolation: the other tenant keeps getting prompt answers.
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        let r = call(&url, BETA, &chat(&format!("beta during attack {i}")), &[]).await;
        assert_eq!(r.status, 200);
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for a in attack {
        let status = a.await;
        if !matches!(status, Ok(400)) {
            for l in replica.logs() {
                eprintln!("{l}");
            }
            panic!("attack: {status:?}");
        }
    }
    eprintln!("beta's slowest answer during the attack: {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "beta waited {slowest:?}");
    assert_eq!(
        sim.calls() - before,
        1 + 10 + N as u64,
        "every body went upstream"
    );
    let peak = status_kib(pid, "VmHWM:");
    let grew = peak.saturating_sub(base);
    let bodies = (N * SIZE) as u64;
    eprintln!(
        "peak RSS grew {} MiB for {} MiB of bodies",
        grew >> 20,
        bodies >> 20
    );
    // The body is held for upstream (1×); the scan's canonical form lives
    // only during the scan (about 1×); hyper's read buffers and the
    // allocator take some more. A tree per request was ~17×.
    assert!(
        grew < bodies * 4,
        "peak RSS grew {} MiB for {} MiB of bodies",
        grew >> 20,
        bodies >> 20
    );
    assert!(replica.logs().iter().all(|l| l["level"] != "ERROR"));
}

#[tokio::test]
async fn a_repeated_top_level_key_is_refused_whatever_the_cache_mode() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let body = r#"{"model":"deepseek-chat","messages":[],"model":"deepseek-reasoner"}"#;
    for cc in [None, Some("no-store"), Some("no-cache")] {
        let headers: Vec<(&str, &str)> = cc.map(|v| ("cache-control", v)).into_iter().collect();
        let r = raw(&url, ALPHA, body, &headers).await;
        assert_eq!(r.status, 400, "{cc:?}");
        assert_eq!(r.error_code(), "invalid_json");
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(message.contains("\"model\""), "{message}");
    }
    // A key that repeats under another spelling is the same key.
    let r = raw(
        &url,
        ALPHA,
        r#"{"model":"deepseek-chat","messages":[],"stre\u0061m":true,"stream":false}"#,
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(r.error_code(), "invalid_json");
    assert_eq!(gw.sim.calls(), 0, "nothing went upstream");
}

#[tokio::test]
async fn stream_options_null_is_replaced_and_an_object_is_spliced_byte_for_byte() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let upstream_body =
        || String::from_utf8(gw.sim.last_request().expect("a call").1.to_vec()).expect("utf8");

    let r = raw(
        &url,
        ALPHA,
        r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"n"}],"stream":true,"stream_options":null}"#,
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream_body(),
        r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"n"}],"stream":true,"stream_options":{"include_usage":true}}"#
    );
    assert!(
        !r.events()
            .iter()
            .any(|e| e.contains("\"usage\":{") && e.contains("\"choices\":[]")),
        "the client did not ask for usage"
    );

    let sent = r#"{ "temperature": 1.50, "seed": 12345678901234567890123, "stream_options": {"x": 1.0, "include_usage": false}, "model": "deepseek-chat", "stream": true, "messages": [{"role":"user","content":"o"}] }"#;
    let r = raw(&url, ALPHA, sent, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream_body(),
        sent.replace(r#""include_usage": false"#, r#""include_usage": true"#),
        "only the one value changed"
    );

    let sent = r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"p"}],"stream":true,"stream_options":{ },"top_p":1.50}"#;
    let r = raw(&url, ALPHA, sent, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream_body(),
        sent.replace(r#"{ }"#, r#"{"include_usage":true }"#)
    );
}

#[tokio::test]
async fn any_valid_json_number_is_accepted() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let sent = r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"big"}],"x":1e400,"y":-0.0e-400,"z":123456789012345678901234567890}"#;
    for cc in ["", "no-store"] {
        let r = raw(&url, ALPHA, sent, &[("cache-control", cc)]).await;
        assert_ne!(
            r.error_code_or_empty(),
            "invalid_json",
            "{cc}: {}",
            r.text()
        );
        let (_, body) = gw.sim.last_request().expect("went upstream");
        assert_eq!(&body[..], sent.as_bytes(), "passed through unchanged");
    }
}

#[tokio::test]
async fn number_spelling_shares_a_cache_entry_and_every_digit_counts() {
    let gw = TestGateway::start("").await;
    let url = gw.url("/v1/chat/completions");
    let body = |t: &str| {
        format!(
            r#"{{"model":"deepseek-chat","messages":[{{"role":"user","content":"n"}}],"temperature":{t}}}"#
        )
    };
    let first = raw(&url, ALPHA, body("1"), &[]).await;
    assert_eq!(first.header("x-sluice-cache"), "miss");
    for same in ["1.0", "1e0", "10E-1", "0.1e1"] {
        let r = raw(&url, ALPHA, body(same), &[]).await;
        assert_eq!(r.header("x-sluice-cache"), "hit", "{same}");
    }
    let a = raw(&url, ALPHA, body("12345678901234567890123"), &[]).await;
    let b = raw(&url, ALPHA, body("12345678901234567890124"), &[]).await;
    assert_eq!(a.header("x-sluice-cache"), "miss");
    assert_eq!(
        b.header("x-sluice-cache"),
        "miss",
        "a 23-digit integer keeps every digit"
    );
}

/// A third tenant with a request limit but no token limit.
const GAMMA: &str = "sk-gamma-0123456789";

fn with_gamma() -> String {
    format!(
        "[[tenants]]\nname = \"gamma\"\nkey_sha256 = [\"{}\"]\nrequests_per_minute = 6000\nrequest_burst = 600\ntokens_per_minute = 0\nmax_concurrent = 0\n",
        sha(GAMMA)
    )
}

#[tokio::test]
async fn account_headers_go_neither_upstream_nor_back_to_clients() {
    let gw = TestGateway::start(&with_gamma()).await;
    let hostile: &[(&str, &str)] = &[
        ("proxy-connection", "keep-alive"),
        ("cookie", "tenant-session=1"),
        ("openai-organization", "org-someone-else"),
        ("openai-project", "proj-someone-else"),
        ("api-key", "sk-other"),
        ("x-api-key", "sk-other"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("te", "trailers"),
        ("x-client-note", "kept"),
        ("x-sim-account-headers", "1"),
    ];
    for (path, stream) in [
        ("/v1/chat/completions", false),
        ("/v1/chat/completions", true),
    ] {
        let body = if stream {
            chat_stream("headers, streamed")
        } else {
            chat("headers")
        };
        let r = call(&gw.url(path), GAMMA, &body, hostile).await;
        assert_eq!(r.status, 200);
        let (sent, _) = gw.sim.last_request().expect("a call");
        for name in [
            "proxy-connection",
            "cookie",
            "openai-organization",
            "openai-project",
            "api-key",
            "x-api-key",
            "connection",
            "x-hop",
            "te",
        ] {
            assert!(!sent.contains_key(name), "{name} reached upstream");
        }
        assert_eq!(sent["x-client-note"], "kept");
        assert_eq!(sent["authorization"], format!("Bearer {UPSTREAM_KEY}"));

        for name in ["set-cookie", "openai-organization", "openai-project"] {
            assert!(!r.headers.contains_key(name), "{name} reached the client");
        }
        assert_eq!(r.header("x-upstream-note"), "kept", "{:?}", r.headers);
        // Gamma has a request limit and no token limit: Sluice's request
        // headers, and no token headers at all (not upstream's either).
        assert_eq!(r.header("x-ratelimit-limit-requests"), "6000");
        for name in [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ] {
            assert!(!r.headers.contains_key(name), "{name}: {}", r.header(name));
        }
    }
    // A tenant without limits gets no rate-limit header at all.
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("alpha"),
        hostile,
    )
    .await;
    assert!(
        !r.headers
            .keys()
            .any(|k| k.as_str().starts_with("x-ratelimit-")),
        "{:?}",
        r.headers
    );
    // `/models` carries none of them upstream either.
    let r = send(
        http::Request::get(gw.url("/v1/models"))
            .header("authorization", format!("Bearer {ALPHA}"))
            .header("openai-organization", "org-someone-else")
            .header("cookie", "c=1")
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(r.status, 200);
}
