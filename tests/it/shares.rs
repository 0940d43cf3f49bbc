//! Shares of a fleet's limits (docs/redis.md "Shares"): a replica spends a
//! share of a tenant's request bucket without a Redis round trip, settles
//! its charges in batches, sees the others' charges within a second, and
//! gives its share back when it stops. Real `sluice` replicas against a
//! `redis-server` of the test's own (skipped without one, a failure with
//! `SLUICE_TEST_REDIS=require`).

use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::support::*;

const KEY: &str = "sk-shares-0123456789";

fn tenant(rpm: u32, burst: u32, tpm: u64) -> String {
    capped(rpm, burst, tpm, 0)
}

fn capped(rpm: u32, burst: u32, tpm: u64, max_concurrent: u32) -> String {
    tenant_with_limits("shares", KEY, rpm, burst, tpm, max_concurrent)
}

/// Only the limits in Redis, so every script call Redis counts is theirs.
fn redis_section(url: &str) -> String {
    format!("[redis]\nurl = \"{url}\"\ntimeout_ms = 250\ncache = false\ncoalesce = false\n")
}

async fn ask(url: &str, what: &str, usage: &str) -> Resp {
    call(
        url,
        KEY,
        &chat(what),
        &[("cache-control", "no-store"), ("x-sim-usage", usage)],
    )
    .await
}

/// Sends `per_sec` requests a second through `url` for `run` (each
/// reporting 10 + 5 tokens); returns how many were answered 200 (every
/// other answer fails the test).
async fn drive_one(url: &str, per_sec: u32, run: Duration) -> u64 {
    let headers = &[("cache-control", "no-store"), ("x-sim-usage", "10,5")];
    drive(&[url.to_string()], KEY, per_sec, run, headers, None)
        .await
        .ok
}

/// Script calls Redis has run (`EVALSHA` and `EVAL`), from `INFO
/// commandstats`.
fn script_calls(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split(',').next())
        .filter_map(|kv| kv.split_once("calls="))
        .map(|(_, v)| v.trim().parse::<u64>().expect("a count"))
        .sum()
}

/// Waits until Redis has run no script for `quiet` (longer than any
/// periodic round trip of a replica, the share's return when idle
/// included); returns the count then.
async fn quiet_script_calls(redis: &RedisServer, quiet: Duration) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = script_calls(redis);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = script_calls(redis);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(Instant::now() < deadline, "the replicas never went quiet");
    }
}

#[tokio::test]
async fn a_busy_tenant_costs_redis_under_a_tenth_of_a_command_a_request() {
    let Some(redis) = RedisServer::start("a_busy_tenant_costs_redis_under_a_tenth") else {
        return;
    };
    let _turn = heavy().await;
    let sim = simulator().await;
    // 200 requests a second; driven at 80, under half of it. A token limit
    // too, so the balance is read and charges settled all along, and a
    // concurrency cap, so slots are held.
    let extra = format!(
        "{}{}",
        capped(12_000, 200, 10_000_000, 100),
        redis_section(&redis.url())
    );
    let fleet = replicas(1, &sim, &extra).await;
    let before = quiet_script_calls(&redis, Duration::from_millis(500)).await;
    // Twelve seconds: the steady cost (about four scripts a second) must
    // outweigh what taking the share and giving it back costs once (about
    // twenty), which over six seconds left a ratio of 0.085-0.096 that a
    // loaded machine pushed past 0.1.
    let admitted = drive_one(
        &fleet[0].url("/v1/chat/completions"),
        80,
        Duration::from_secs(12),
    )
    .await;
    // Everything the traffic caused: the charges settled, the share given
    // back once idle.
    let after = quiet_script_calls(&redis, Duration::from_millis(1500)).await;
    let per_request = (after - before) as f64 / admitted as f64;
    eprintln!(
        "{} script calls for {admitted} requests: {per_request:.3} a request",
        after - before
    );
    assert!(
        per_request <= 0.1,
        "{} script calls for {admitted} requests: {per_request:.3} a request",
        after - before
    );
    let r = &fleet[0];
    assert_eq!(
        r.metric("sluice_limits_local_fallback_total", &[]).await,
        0.0,
        "every decision was shared"
    );
    // Batched, yet every charge is in Redis: the replica's ledger there
    // holds 15 tokens an answer.
    let ledgers = redis.cli(&["--scan", "--pattern", "sluice:{shares}:charged:*"]);
    let ledger = ledgers.lines().next().expect("a ledger");
    assert_eq!(
        redis.cli(&["HGET", ledger, "tok"]).trim(),
        (15 * admitted).to_string()
    );
}

#[tokio::test]
async fn a_token_deficit_refuses_on_every_replica_within_a_second() {
    let Some(redis) = RedisServer::start("a_token_deficit_refuses_on_every_replica") else {
        return;
    };
    let sim = simulator().await;
    // 600 tokens a minute; requests far from their limit.
    let extra = format!(
        "{}{}",
        tenant(600_000, 10_000, 600),
        redis_section(&redis.url())
    );
    let fleet = replicas(3, &sim, &extra).await;
    let urls = chat_urls(&fleet);
    // Every replica busy with the tenant (each decides from its share).
    for (i, url) in urls.iter().enumerate() {
        for j in 0..4 {
            assert_eq!(ask(url, &format!("warm {i} {j}"), "1,1").await.status, 200);
        }
    }
    let r = ask(&urls[0], "expensive", "500,300").await;
    assert_eq!(r.status, 200);
    let spent = Instant::now();
    let mut others = JoinSet::new();
    for url in urls.into_iter().skip(1) {
        others.spawn(async move {
            loop {
                let r = ask(&url, "next", "0,0").await;
                if r.status == 429 {
                    assert_eq!(r.error_code(), "tokens_rate_limit_exceeded");
                    assert_eq!(r.header("x-ratelimit-remaining-tokens"), "0");
                    assert!(r.header("retry-after").parse::<u64>().expect("retry-after") >= 1);
                    return spent.elapsed();
                }
                assert_eq!(r.status, 200);
                assert!(
                    spent.elapsed() < Duration::from_secs(5),
                    "the deficit never reached {url}"
                );
            }
        });
    }
    while let Some(took) = others.join_next().await {
        let took = took.expect("task");
        eprintln!("a deficit made on one replica refused on another after {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "a deficit made on one replica refused on another after {took:?}"
        );
    }
}

/// The request bucket's requests taken, by Redis's clock: what the bucket
/// lacks of full, in requests (fractions are its refill).
fn taken(redis: &RedisServer, key: &str, rpm: u32) -> f64 {
    let tat: f64 = redis.cli(&["GET", key]).trim().parse().unwrap_or(0.0);
    let time = redis.cli(&["TIME"]);
    let mut t = time.split_whitespace();
    let secs: f64 = t.next().and_then(|v| v.parse().ok()).expect("time");
    let micros: f64 = t.next().and_then(|v| v.parse().ok()).expect("time");
    let now = secs * 1e6 + micros;
    ((tat - now) / (60e6 / f64::from(rpm))).max(0.0)
}

#[tokio::test]
async fn a_replica_that_stops_gives_its_share_back() {
    let Some(redis) = RedisServer::start("a_replica_that_stops_gives_its_share_back") else {
        return;
    };
    let sim = simulator().await;
    // A request every 10 s refills the bucket: what it lacks is what was
    // taken, within a tenth of a request a second.
    let rpm = 6;
    let extra = format!("{}{}", tenant(rpm, 200, 0), redis_section(&redis.url()));
    let mut fleet = replicas(1, &sim, &extra).await;
    let key = "sluice:{shares}:req:6:200";
    let admitted = drive_one(
        &fleet[0].url("/v1/chat/completions"),
        40,
        Duration::from_secs(1),
    )
    .await;
    let held = taken(&redis, key, rpm);
    assert!(
        held >= admitted as f64 + 1.0,
        "a busy replica holds a share: {held:.1} taken for {admitted} admitted"
    );
    fleet[0].stop().await;
    let after = taken(&redis, key, rpm);
    assert!(
        (after - admitted as f64).abs() < 1.0,
        "the share came back at shutdown: {after:.1} taken for {admitted} admitted"
    );
}

#[tokio::test]
async fn the_request_headers_stay_truthful_under_a_share() {
    let Some(redis) = RedisServer::start("the_request_headers_stay_truthful_under_a_share") else {
        return;
    };
    let sim = simulator().await;
    // 10 requests a second, a burst of 100: a busy replica holds a share.
    let extra = format!("{}{}", tenant(600, 100, 0), redis_section(&redis.url()));
    let fleet = replicas(1, &sim, &extra).await;
    let url = fleet[0].url("/v1/chat/completions");
    let start = Instant::now();
    let mut shared = 0;
    for i in 0..60u32 {
        let r = ask(&url, &format!("h {i}"), "1,1").await;
        assert_eq!(r.status, 200);
        let remaining: f64 = r
            .header("x-ratelimit-remaining-requests")
            .parse()
            .expect("remaining");
        // What the bucket truly holds for this tenant after this request,
        // this replica's share counted as its own: the burst, less what
        // was admitted, plus the refill so far.
        let admitted = f64::from(i + 1);
        let truth = (100.0 - admitted + 10.0 * start.elapsed().as_secs_f64()).min(100.0);
        // The header leaves out at most the refill since the replica's
        // last round trip (half a second: 5 requests) and never says more.
        assert!(
            remaining <= truth + 1.0 && remaining >= truth - 6.0,
            "request {i}: the header says {remaining}, the bucket holds {truth:.1}"
        );
        if taken(&redis, "sluice:{shares}:req:600:100", 600) > admitted + 0.5 {
            shared += 1;
        }
    }
    assert!(shared > 0, "the replica never held a share");
}

/// ADMIT as Sluice sends it, run through `redis-cli`: the replica `who`
/// needs one request and wants `want`; returns the requests granted.
fn admit_script(redis: &RedisServer, who: &str, want: u32) -> i64 {
    const SCRIPT: &str = concat!(
        include_str!("../../src/limit/lua/prelude.lua"),
        include_str!("../../src/limit/lua/admit.lua")
    );
    let want = want.to_string();
    let out = redis.cli(&[
        "EVAL",
        SCRIPT,
        "6",
        "t:{s}:req",
        "t:{s}:tok",
        "t:{s}:lessees",
        "t:{s}:tok",
        "t:{s}:conc",
        "t:{s}:live",
        // 6 a minute, a burst of 100: the bucket barely refills meanwhile.
        "6",
        "100",
        "0",
        who,
        "2000",
        "0",
        "1",
        &want,
        "4",
        // No concurrency cap: no slot asked.
        "0",
        "0",
        "0",
        "0",
        "0",
        "15000",
    ]);
    let items: Vec<&str> = out.lines().collect();
    assert_eq!(items.first(), Some(&"0"), "admitted: {out}");
    items[1].trim().parse().expect("granted")
}

#[tokio::test]
async fn a_share_shrinks_as_the_bucket_empties_down_to_one_request() {
    let Some(redis) = RedisServer::start("a_share_shrinks_as_the_bucket_empties") else {
        return;
    };
    // One lessee: a quarter of what the bucket holds.
    assert_eq!(admit_script(&redis, "a", 1000), 25);
    assert_eq!(admit_script(&redis, "a", 1000), 18, "a quarter of 75");
    // Never more than wanted.
    assert_eq!(admit_script(&redis, "a", 3), 3);
    // A second replica taking shares halves them: 54 / (2 × 4).
    assert_eq!(admit_script(&redis, "b", 1000), 6);
    let mut grants = Vec::new();
    while grants.len() < 200 {
        let held: f64 = 100.0 - taken(&redis, "t:{s}:req", 6);
        if held < 1.0 {
            break;
        }
        grants.push(admit_script(&redis, "a", 1000));
    }
    assert!(
        grants.windows(2).all(|w| w[1] <= w[0]),
        "shares only shrink as the bucket empties: {grants:?}"
    );
    assert!(
        grants.ends_with(&[1, 1, 1, 1, 1, 1, 1, 1]),
        "near the limit, one request a round trip: {grants:?}"
    );
}

/// The slots every replica holds for the tenant in Redis.
fn slots_held(redis: &RedisServer) -> i64 {
    let all = redis.cli(&["HGETALL", "sluice:{shares}:conc"]);
    let lines: Vec<&str> = all.lines().collect();
    lines
        .chunks(2)
        .filter(|kv| kv.len() == 2 && !kv[0].contains(':'))
        .map(|kv| kv[1].trim().parse::<i64>().expect("a count"))
        .sum()
}

#[tokio::test]
async fn a_busy_capped_tenant_never_exceeds_its_cap_and_frees_its_slots() {
    let Some(redis) = RedisServer::start("a_busy_capped_tenant_never_exceeds_its_cap") else {
        return;
    };
    let _turn = heavy().await;
    let sim = simulator().await;
    // At most 6 at once for the fleet; 60 requests a second of 200 ms each
    // want about 12.
    let extra = format!(
        "{}{}",
        capped(600_000, 10_000, 0, 6),
        redis_section(&redis.url())
    );
    let fleet = replicas(3, &sim, &extra).await;
    let urls = chat_urls(&fleet);
    let slow = &[("x-sim-latency-ms", "200"), ("cache-control", "no-store")];
    let Tally { ok, refused, .. } = drive(
        &urls,
        KEY,
        60,
        Duration::from_secs(3),
        slow,
        Some("concurrency_limit_exceeded"),
    )
    .await;
    assert!(
        sim.max_in_flight() <= 6,
        "never more than max_concurrent at the upstream: {}",
        sim.max_in_flight()
    );
    assert!(ok >= 30 && refused > 0, "{ok} answered, {refused} refused");
    // Idle, each replica gives its spare slots back: the fleet's count
    // goes back to the requests in flight, none.
    let deadline = Instant::now() + Duration::from_secs(5);
    while slots_held(&redis) != 0 {
        assert!(
            Instant::now() < deadline,
            "slots still held: {}",
            slots_held(&redis)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
