//! The cache shared by replicas through Redis (docs/redis.md, "Shared cache"): gateways
//! in this process, one simulator, one `redis-server` of the test's own.

use std::time::{Duration, Instant};

use crate::support::*;

/// `n` gateways in front of one simulator (the first gateway's), sharing
/// `redis_url`, with `extra` config.
async fn fleet(n: usize, redis_url: &str, extra: &str) -> Vec<TestGateway> {
    let sim = simulator().await;
    let text = config_text(
        &sim.base_url(),
        &format!("{extra}\n[redis]\nurl = \"{redis_url}\"\n"),
    );
    let mut out = vec![TestGateway::with(sim, parse(&text)).await];
    for _ in 1..n {
        out.push(TestGateway::with(simulator().await, parse(&text)).await);
    }
    out
}

fn url(gw: &TestGateway) -> String {
    gw.url("/v1/chat/completions")
}

/// Waits until Redis holds `n` cache entries (written from a task after
/// the answer).
async fn stored(redis: &RedisServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = redis.cli(&["--scan", "--pattern", "sluice:{*}:cache"]);
        if keys.lines().filter(|l| !l.trim().is_empty()).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "never stored in Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `gw` answers `body` from the cache (the write to Redis is
/// made after the answer, from a task).
async fn hit_on(gw: &TestGateway, body: &serde_json::Value) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(&url(gw), ALPHA, body, &[]).await;
        if r.header("x-sluice-cache") == "hit" {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "never a hit: {}",
            r.header("x-sluice-cache")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_answer_stored_on_one_replica_is_a_hit_on_another_in_both_modes() {
    let Some(redis) = RedisServer::start("an_answer_stored_on_one_replica_is_a_hit") else {
        return;
    };
    let gws = fleet(3, &redis.url(), "").await;
    let sim = &gws[0].sim;

    // JSON stored, JSON and stream hits elsewhere.
    let first = call(&url(&gws[0]), ALPHA, &chat("shared one"), &[]).await;
    assert_eq!(first.header("x-sluice-cache"), "miss");
    stored(&redis, 1).await;
    let hit = hit_on(&gws[1], &chat("shared one")).await;
    assert_eq!(
        hit.json()["choices"][0]["message"],
        first.json()["choices"][0]["message"]
    );
    let streamed = call(&url(&gws[2]), ALPHA, &chat_stream("shared one"), &[]).await;
    assert_eq!(streamed.header("x-sluice-cache"), "hit");
    assert_eq!(
        streamed_content(&streamed.events()),
        first.json()["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
    );
    assert_eq!(streamed.events().last().map(String::as_str), Some("[DONE]"));

    // Stream stored, JSON hit elsewhere.
    let s = call(&url(&gws[1]), ALPHA, &chat_stream("shared two"), &[]).await;
    assert_eq!(s.header("x-sluice-cache"), "miss");
    stored(&redis, 2).await;
    let hit = hit_on(&gws[0], &chat("shared two")).await;
    assert_eq!(
        hit.json()["choices"][0]["message"]["content"].as_str(),
        Some(streamed_content(&s.events()).as_str())
    );
    assert_eq!(sim.calls(), 2, "one upstream call per answer, fleet-wide");

    // Tenant scope still isolates tenants.
    let other = call(&url(&gws[1]), BETA, &chat("shared one"), &[]).await;
    assert_eq!(other.header("x-sluice-cache"), "miss");

    // A replica that starts now serves hits from Redis at once.
    let fresh = fleet(1, &redis.url(), "").await;
    let r = call(&url(&fresh[0]), ALPHA, &chat("shared one"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit");
    assert_eq!(fresh[0].sim.calls(), 0);
    assert_eq!(
        fresh[0]
            .metric("sluice_cache_shared_lookups_total", &[("result", "hit")])
            .await,
        1.0
    );

    // `no-cache` replaces the shared entry too: a replica without its own
    // copy gets the refreshed answer.
    let r = call(
        &url(&gws[0]),
        ALPHA,
        &chat("shared one"),
        &[("cache-control", "no-cache"), ("x-sim-usage", "7,7")],
    )
    .await;
    assert_eq!(r.header("x-sluice-cache"), "refresh");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A new replica each time: it has no copy of its own.
        let later = fleet(1, &redis.url(), "").await;
        let r = call(&url(&later[0]), ALPHA, &chat("shared one"), &[]).await;
        if r.header("x-sluice-cache") == "hit" && r.json()["usage"]["prompt_tokens"] == 7 {
            break;
        }
        assert!(Instant::now() < deadline, "the refresh never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for g in gws.iter().chain(&fresh) {
        assert!(
            g.metric(
                "sluice_redis_operations_total",
                &[("op", "cache_get"), ("result", "ok")]
            )
            .await
                + g.metric(
                    "sluice_redis_operations_total",
                    &[("op", "cache_put"), ("result", "ok")]
                )
                .await
                >= 1.0
        );
    }
}

#[tokio::test]
async fn age_counts_from_the_first_store() {
    let Some(redis) = RedisServer::start("age_counts_from_the_first_store") else {
        return;
    };
    let gws = fleet(2, &redis.url(), "").await;
    call(&url(&gws[0]), ALPHA, &chat("aged"), &[]).await;
    // Let the entry be stored in Redis, then grow a second older.
    hit_on(&gws[0], &chat("aged")).await;
    let stored = Instant::now();
    while stored.elapsed() < Duration::from_millis(1100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = hit_on(&gws[1], &chat("aged")).await;
    let age: u64 = r.header("age").parse().expect("age");
    assert!(age >= 1, "age {age} counts from the first store");
}

#[tokio::test]
async fn no_store_errors_and_large_answers_stay_off_redis() {
    let Some(redis) = RedisServer::start("no_store_errors_and_large_answers_stay_off_redis") else {
        return;
    };
    let gws = fleet(2, &redis.url(), "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let r = call(
        &url(a),
        ALPHA,
        &chat("private"),
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(r.header("x-sluice-cache"), "bypass");
    let r = call(&url(a), ALPHA, &chat("err"), &[("x-sim-status", "400")]).await;
    assert_eq!(r.status, 400);
    // A broken stream: read to whatever end it has.
    let mut broken = call_open(
        &url(a),
        ALPHA,
        &chat_stream("broken"),
        &[("x-sim-die-after", "2")],
    )
    .await
    .into_body();
    while next_chunk(&mut broken).await.is_some() {}
    // A normal answer, so we know the writes of the ones above would have
    // landed by the time this one has.
    call(&url(a), ALPHA, &chat("marker"), &[]).await;
    hit_on(b, &chat("marker")).await;
    for body in ["private", "err", "broken"] {
        let r = call(&url(b), ALPHA, &chat(body), &[]).await;
        assert_eq!(r.header("x-sluice-cache"), "miss", "{body} was not shared");
    }
    let keys = redis.cli(&["--scan", "--pattern", "sluice:{*}:cache"]);
    assert!(!keys.trim().is_empty());
    for key in keys.lines() {
        let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().expect("ttl");
        assert!(ttl > 0, "every key Sluice writes expires: {key} {ttl}");
    }

    // An answer over cache_max_entry_bytes stays in memory.
    drop(gws);
    let text = |sim: &str| {
        config_text(
            sim,
            &format!(
                "[redis]\nurl = \"{}\"\ncache_max_entry_bytes = 64\n",
                redis.url()
            ),
        )
    };
    let sim = simulator().await;
    let t = text(&sim.base_url());
    let a = TestGateway::with(sim, parse(&t)).await;
    let b = TestGateway::with(simulator().await, parse(&t)).await;
    call(&url(&a), ALPHA, &chat("large"), &[]).await;
    let r = call(&url(&a), ALPHA, &chat("large"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "hit", "kept in memory");
    let r = call(&url(&b), ALPHA, &chat("large"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "miss", "not in Redis");
}

#[tokio::test]
async fn shared_entries_expire_after_the_ttl() {
    let Some(redis) = RedisServer::start("shared_entries_expire_after_the_ttl") else {
        return;
    };
    let gws = fleet(2, &redis.url(), "[cache]\nttl_secs = 1\n").await;
    call(&url(&gws[0]), ALPHA, &chat("brief"), &[]).await;
    hit_on(&gws[1], &chat("brief")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(&url(&gws[1]), ALPHA, &chat("brief"), &[]).await;
        if r.header("x-sluice-cache") == "miss" {
            break;
        }
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_redis_that_is_away_is_a_miss_never_an_error() {
    if !redis_available("a_redis_that_is_away_is_a_miss_never_an_error") {
        return;
    }
    let gws = fleet(1, &RedisServer::url_of_port(free_port()), "").await;
    let start = Instant::now();
    let r = call(&url(&gws[0]), ALPHA, &chat("down"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-sluice-cache"), "miss");
    let r = call(&url(&gws[0]), ALPHA, &chat("down"), &[]).await;
    assert_eq!(
        r.header("x-sluice-cache"),
        "hit",
        "the local tier still works"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn redis_memory_stays_proportional_to_the_cached_bytes() {
    let Some(redis) = RedisServer::start("redis_memory_stays_proportional") else {
        return;
    };
    let used = |r: &RedisServer| -> i64 {
        r.cli(&["INFO", "memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory")
    };
    let gws = fleet(1, &redis.url(), "").await;
    let before = used(&redis);
    let mut cached = 0i64;
    for i in 0..300 {
        let r = call(
            &url(&gws[0]),
            ALPHA,
            &chat(&format!("distinct {i}")),
            &[("x-sim-answer-bytes", "2000")],
        )
        .await;
        assert_eq!(r.status, 200);
        cached += r.body.len() as i64;
    }
    // Let the writes from tasks land.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.cli(&["DBSIZE"]).trim().parse::<i64>().unwrap_or(0) < 300 {
        assert!(Instant::now() < deadline, "writes never landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grown = used(&redis) - before;
    eprintln!("Redis grew {grown} bytes for {cached} cached bytes");
    assert!(
        grown < cached * 2,
        "Redis grew {grown} bytes for {cached} bytes of answers"
    );
}

#[tokio::test]
async fn a_miss_costs_two_round_trips_and_a_memory_hit_none() {
    let Some(redis) = RedisServer::start("a_miss_costs_two_round_trips") else {
        return;
    };
    let gws = fleet(1, &redis.url(), "").await;
    let gw = &gws[0];
    let base = cache_ops(gw).await;
    for (i, what) in ["trips one", "trips two", "trips three"].iter().enumerate() {
        let r = call(&url(gw), ALPHA, &chat(what), &[]).await;
        assert_eq!(r.header("x-sluice-cache"), "miss");
        // The lookup with the claim before upstream, the end with the
        // release and the store after (from a task): two, no more.
        let want = base + 2.0 * (i + 1) as f64;
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache_ops(gw).await < want {
            assert!(Instant::now() < deadline, "the end never went to Redis");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A memory hit on the answer asks Redis nothing.
        assert_eq!(
            call(&url(gw), ALPHA, &chat(what), &[])
                .await
                .header("x-sluice-cache"),
            "hit"
        );
    }
    // Nothing more arrived after the last miss's two and its hit.
    let r = call(&url(gw), ALPHA, &chat("trips four"), &[]).await;
    assert_eq!(r.header("x-sluice-cache"), "miss");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache_ops(gw).await < base + 8.0 {
        assert!(Instant::now() < deadline, "the end never went to Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        cache_ops(gw).await,
        base + 8.0,
        "two a miss, none a memory hit"
    );
    assert_eq!(
        redis_ops(gw, "cache_get").await,
        4.0,
        "one lookup (and claim) a miss"
    );
    assert_eq!(
        redis_ops(gw, "cache_put").await,
        4.0,
        "one store (and release) a miss"
    );
    // Each answer is in Redis for the fleet, and no claim or log is left.
    stored(&redis, 4).await;
    assert!(redis
        .cli(&["--scan", "--pattern", "sluice:{*}:lead"])
        .trim()
        .is_empty());
    assert!(redis
        .cli(&["--scan", "--pattern", "sluice:{*}:log:*"])
        .trim()
        .is_empty());
}

async fn redis_ops(gw: &TestGateway, op: &str) -> f64 {
    gw.metric("sluice_redis_operations_total", &[("op", op)])
        .await
}

/// Round trips of the cache and the flights so far.
async fn cache_ops(gw: &TestGateway) -> f64 {
    redis_ops(gw, "cache_get").await
        + redis_ops(gw, "cache_put").await
        + redis_ops(gw, "coalesce").await
}
