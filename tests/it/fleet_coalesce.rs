//! Coalescing across replicas through Redis (docs/redis.md, "Coalescing across replicas"): one
//! upstream call for identical requests on any replica, errors shared,
//! a dead leader taken over.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use sluice::simulator::Simulator;

use crate::support::*;

/// `n` gateways in this process in front of one simulator (the first's),
/// sharing `redis_url`.
async fn fleet(n: usize, redis_url: &str) -> Vec<TestGateway> {
    let sim = simulator().await;
    let text = config_text(
        &sim.base_url(),
        &format!("[redis]\nurl = \"{redis_url}\"\n"),
    );
    let mut out = vec![TestGateway::with(sim, parse(&text)).await];
    for _ in 1..n {
        out.push(TestGateway::with(simulator().await, parse(&text)).await);
    }
    out
}

/// `N` gateway processes (to be killed) in front of one simulator, sharing
/// `redis`.
async fn processes<const N: usize>(redis: &RedisServer) -> (Simulator, [Replica; N]) {
    let sim = simulator().await;
    let text = config_text(
        &sim.base_url(),
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    );
    let Ok(all) = <[Replica; N]>::try_from(Replica::fleet(N, &text).await) else {
        unreachable!("N started");
    };
    (sim, all)
}

async fn wait_calls(sim: &Simulator, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.calls() < n {
        assert!(Instant::now() < deadline, "upstream never called");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const SLOW: [(&str, &str); 2] = [("x-sim-chunk-delay-ms", "40"), ("x-sim-chunks", "8")];

#[tokio::test]
async fn identical_requests_on_three_replicas_make_one_upstream_call() {
    let Some(redis) = RedisServer::start("identical_requests_on_three_replicas") else {
        return;
    };
    let gws = fleet(3, &redis.url()).await;
    let sim = &gws[0].sim;
    let url = |i: usize| gws[i % 3].url("/v1/chat/completions");
    let lead = tokio::spawn({
        let u = url(0);
        async move { call(&u, ALPHA, &chat_stream("fleet once"), &SLOW).await }
    });
    wait_calls(sim, 1).await;
    let mut followers = Vec::new();
    for i in 1..7 {
        let u = url(i);
        let body = if i % 2 == 0 {
            chat("fleet once")
        } else {
            chat_stream("fleet once")
        };
        followers.push(tokio::spawn(async move {
            (i, call(&u, ALPHA, &body, &[]).await)
        }));
    }
    let lead = lead.await.expect("leader");
    assert_eq!(lead.header("x-sluice-cache"), "miss");
    let content = streamed_content(&lead.events());
    assert!(!content.is_empty());
    for f in followers {
        let (i, r) = f.await.expect("follower");
        assert_eq!(r.status, 200, "{i}");
        assert_eq!(r.header("x-sluice-cache"), "coalesced", "follower {i}");
        let got = if i % 2 == 0 {
            r.json()["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        } else {
            assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
            streamed_content(&r.events())
        };
        assert_eq!(got, content, "follower {i} reassembles the same answer");
    }
    assert_eq!(sim.calls(), 1, "one upstream call for the whole fleet");
    // Every key Sluice wrote expires (the log a minute after the flight).
    let keys = redis.cli(&["--scan", "--pattern", "sluice:*"]);
    assert!(keys.contains(":log"), "{keys}");
    for key in keys.lines() {
        let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().expect("ttl");
        assert!(ttl > 0 || ttl == -2, "{key} has no expiry ({ttl})");
    }
    assert!(
        gws[1]
            .metric(
                "sluice_redis_operations_total",
                &[("op", "coalesce"), ("result", "ok")]
            )
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_follower_elsewhere_streams_as_the_leader_does() {
    let Some(redis) = RedisServer::start("a_follower_elsewhere_streams") else {
        return;
    };
    let gws = fleet(2, &redis.url()).await;
    let headers = [("x-sim-latency-ms", "300"), ("x-sim-chunk-delay-ms", "30")];
    let first_event = |u: String| async move {
        let mut body = call_open(&u, ALPHA, &chat_stream("paced"), &headers)
            .await
            .into_body();
        let chunk = next_chunk(&mut body).await.expect("first event");
        let at = Instant::now();
        while body.frame().await.is_some() {}
        (at, chunk)
    };
    let lead = tokio::spawn(first_event(gws[0].url("/v1/chat/completions")));
    wait_calls(&gws[0].sim, 1).await;
    let follow = tokio::spawn(first_event(gws[1].url("/v1/chat/completions")));
    let (lead_at, lead_chunk) = lead.await.expect("leader");
    let (follow_at, follow_chunk) = follow.await.expect("follower");
    assert_eq!(lead_chunk, follow_chunk, "the same first event");
    let added = follow_at.saturating_duration_since(lead_at);
    eprintln!(
        "first event on another replica: +{:.3} ms",
        added.as_secs_f64() * 1e3
    );
    // Loose on a shared machine; the benchmark measures it.
    assert!(added < Duration::from_millis(250), "{added:?}");
    assert_eq!(gws[0].sim.calls(), 1);
}

#[tokio::test]
async fn an_upstream_error_reaches_every_follower_and_is_not_stored() {
    let Some(redis) = RedisServer::start("an_upstream_error_reaches_every_follower") else {
        return;
    };
    let gws = fleet(2, &redis.url()).await;
    let failing = [("x-sim-status", "400"), ("x-sim-latency-ms", "300")];
    let lead = tokio::spawn({
        let u = gws[0].url("/v1/chat/completions");
        async move { call(&u, ALPHA, &chat("fails"), &failing).await }
    });
    wait_calls(&gws[0].sim, 1).await;
    let f = call(
        &gws[1].url("/v1/chat/completions"),
        ALPHA,
        &chat("fails"),
        &[],
    )
    .await;
    let lead = lead.await.expect("leader");
    assert_eq!(lead.status, 400);
    assert_eq!(f.status, 400);
    assert_eq!(f.header("x-sluice-cache"), "coalesced");
    assert_eq!(f.header("x-sluice-upstream"), "default", "its leader's");
    assert_eq!(f.body, lead.body, "the same body");
    // Nothing was stored: the next one goes upstream.
    let again = call(
        &gws[1].url("/v1/chat/completions"),
        ALPHA,
        &chat("fails"),
        &[],
    )
    .await;
    assert_eq!(again.header("x-sluice-cache"), "miss");
    assert_eq!(gws[0].sim.calls() + gws[1].sim.calls(), 1 + 1);
}

#[tokio::test]
async fn a_killed_leader_is_taken_over_by_a_follower() {
    let Some(redis) = RedisServer::start("a_killed_leader_is_taken_over") else {
        return;
    };
    let (sim, [mut a, mut b]) = processes(&redis).await;
    let slow = [("x-sim-latency-ms", "1500")];
    let url_a = a.url("/v1/chat/completions");
    let lead = tokio::spawn(async move {
        let mut req = post(&url_a, ALPHA);
        for (k, v) in slow {
            req = req.header(k, v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                chat("orphan").to_string(),
            )))
            .expect("req");
        // A dies under this request: its error is expected.
        let _ = tokio::time::timeout(Duration::from_secs(30), try_open(req)).await;
    });
    wait_calls(&sim, 1).await;
    let url_b = b.url("/v1/chat/completions");
    let follower = tokio::spawn(async move { call(&url_b, ALPHA, &chat("orphan"), &slow).await });
    // The follower is waiting on A's call; A dies without a word.
    while redis
        .cli(&["--scan", "--pattern", "sluice:{*}:lead"])
        .trim()
        .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill().await;
    let killed = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), follower)
        .await
        .expect("the follower does not hang")
        .expect("task");
    if r.status != 200 {
        for l in b.logs() {
            eprintln!("{l}");
        }
    }
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sluice-cache"), "miss", "it took the call over");
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_eq!(sim.calls(), 2, "the dead leader's call, and the takeover");
    lead.abort();
}

#[tokio::test]
async fn a_leader_killed_mid_stream_leaves_no_follower_with_a_silent_truncation() {
    let Some(redis) = RedisServer::start("a_leader_killed_mid_stream") else {
        return;
    };
    let (sim, [mut a, b, c]) = processes(&redis).await;
    // About 4 s of events: the kill lands mid-stream.
    let paced = [("x-sim-chunks", "40"), ("x-sim-chunk-delay-ms", "100")];
    let mut lead = call_open(
        &a.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("midway"),
        &paced,
    )
    .await;
    next_chunk(lead.body_mut())
        .await
        .expect("the leader streams");
    // A streaming follower on B has relayed events when A dies.
    let (parts, mut body) = call_open(
        &b.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("midway"),
        &[],
    )
    .await
    .into_parts();
    assert_eq!(parts.headers["x-sluice-cache"], "coalesced");
    let first = next_chunk(&mut body).await.expect("an event relayed");
    // A non-streaming follower on C waits for the end.
    let url_c = c.url("/v1/chat/completions");
    let waiting = tokio::spawn(async move { call(&url_c, ALPHA, &chat("midway"), &[]).await });
    // Both followers have registered with the flight (its followers by
    // leader, a hash).
    loop {
        let n = redis.cli(&["--scan", "--pattern", "sluice:{*}:n"]);
        let joined: u32 = n
            .lines()
            .next()
            .map(|k| redis.cli(&["HVALS", k.trim()]))
            .map(|v| v.lines().filter_map(|c| c.trim().parse::<u32>().ok()).sum())
            .unwrap_or(0);
        if joined >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill().await;
    drop(lead);
    let killed = Instant::now();
    let streamed = tokio::time::timeout(
        Duration::from_secs(20),
        read_rest(parts, body, first.to_vec()),
    )
    .await
    .expect("the streaming follower does not hang");
    // It had relayed events: the error event, never a clean end.
    assert_stream_error_end(&streamed);
    let whole = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the non-streaming follower does not hang")
        .expect("task");
    // It had been sent nothing: a whole answer, from its own call.
    assert_eq!(whole.status, 200, "{}", whole.text());
    let answer = whole.json();
    assert_eq!(answer["object"], "chat.completion");
    assert!(!answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .is_empty());
    assert_eq!(
        whole.header("x-sluice-cache"),
        "miss",
        "it called upstream itself"
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_eq!(sim.calls(), 2, "the dead leader's call, and one more");
}

#[tokio::test]
async fn a_follower_whose_client_leaves_does_not_fail_the_others_on_its_replica() {
    let Some(redis) = RedisServer::start("a_follower_whose_client_leaves") else {
        return;
    };
    let gws = fleet(2, &redis.url()).await;
    let slow = [("x-sim-latency-ms", "1500")];
    let lead = tokio::spawn({
        let u = gws[0].url("/v1/chat/completions");
        async move { call(&u, ALPHA, &chat("left behind"), &slow).await }
    });
    wait_calls(&gws[0].sim, 1).await;
    // On the other replica: the first request follows the leader through
    // Redis, the second joins it locally.
    let first = tokio::spawn({
        let u = gws[1].url("/v1/chat/completions");
        async move { call(&u, ALPHA, &chat("left behind"), &[]).await }
    });
    gws[1]
        .wait_metric("sluice_inflight_requests", &[("tenant", "alpha")], 1.0)
        .await;
    let second = tokio::spawn({
        let u = gws[1].url("/v1/chat/completions");
        async move { call(&u, ALPHA, &chat("left behind"), &[]).await }
    });
    gws[1]
        .wait_metric("sluice_inflight_requests", &[("tenant", "alpha")], 2.0)
        .await;
    // The first one's client leaves.
    first.abort();
    let r = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("no hang")
        .expect("task");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sluice-cache"), "coalesced");
    assert_eq!(r.header("x-sluice-upstream"), "default", "its leader's");
    assert_eq!(lead.await.expect("lead").status, 200);
    assert_eq!(
        gws[0].sim.calls() + gws[1].sim.calls(),
        1,
        "one upstream call"
    );
}

#[tokio::test]
async fn without_redis_each_replica_still_coalesces_its_own() {
    if !redis_available("without_redis_each_replica_still_coalesces_its_own") {
        return;
    }
    let gws = fleet(1, &RedisServer::url_of_port(free_port())).await;
    let u = gws[0].url("/v1/chat/completions");
    let lead = tokio::spawn({
        let u = u.clone();
        async move { call(&u, ALPHA, &chat("alone"), &[("x-sim-latency-ms", "300")]).await }
    });
    wait_calls(&gws[0].sim, 1).await;
    let f = call(&u, ALPHA, &chat("alone"), &[]).await;
    assert_eq!(f.header("x-sluice-cache"), "coalesced");
    assert_eq!(lead.await.expect("lead").status, 200);
    assert_eq!(gws[0].sim.calls(), 1);
}

#[tokio::test]
async fn a_leader_that_stops_reading_does_not_slow_a_follower_elsewhere() {
    let Some(redis) = RedisServer::start("a_leader_that_stops_reading") else {
        return;
    };
    let gws = fleet(2, &redis.url()).await;
    // About 1.5 s of upstream pacing, so the follower joins mid-flight.
    let big = [
        ("x-sim-answer-bytes", "3000000"),
        ("x-sim-chunks", "300"),
        ("x-sim-chunk-delay-ms", "5"),
    ];
    // The leader's client takes the head and then never reads again.
    let stalled = call_open(
        &gws[0].url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("big paced"),
        &big,
    )
    .await;
    wait_calls(&gws[0].sim, 1).await;
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        call(
            &gws[1].url("/v1/chat/completions"),
            ALPHA,
            &chat_stream("big paced"),
            &[],
        ),
    )
    .await
    .expect("the follower is paced by upstream, not by the stalled leader");
    assert_eq!(r.header("x-sluice-cache"), "coalesced");
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    assert!(streamed_content(&r.events()).len() >= 2_900_000);
    assert_eq!(gws[0].sim.calls(), 1);
    drop(stalled);
}

#[tokio::test]
async fn redis_killed_and_restarted_mid_run_then_sharing_resumes() {
    let Some(mut redis) = RedisServer::start("redis_killed_and_restarted_mid_run") else {
        return;
    };
    let gws = fleet(2, &redis.url()).await;
    let u = |i: usize, what: &str| {
        let url = gws[i].url("/v1/chat/completions");
        let body = chat(what);
        async move { call(&url, ALPHA, &body, &[]).await }
    };
    assert_eq!(u(0, "before").await.status, 200);
    redis.kill();
    // Every request is still answered, from local tiers and flights.
    let start = Instant::now();
    for i in 0..6 {
        let r = u(i % 2, "during").await;
        assert_eq!(r.status, 200);
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(gws[0].metric("sluice_redis_up", &[]).await, 0.0);
    redis.restart();
    gws[0].wait_metric("sluice_redis_up", &[], 1.0).await;
    gws[1].wait_metric("sluice_redis_up", &[], 1.0).await;
    // Sharing resumes: stored through one, a hit on the other.
    assert_eq!(u(0, "after").await.header("x-sluice-cache"), "miss");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if u(1, "after").await.header("x-sluice-cache") == "hit" {
            break;
        }
        assert!(Instant::now() < deadline, "sharing never resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
