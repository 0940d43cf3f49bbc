//! An upstream's `max_concurrent` counted once for a fleet (docs/redis.md,
//! "An upstream's concurrency"): real `sluice` replicas in front of one
//! simulator, sharing a `redis-server` of the test's own; and the slot
//! script on its own, called with `EVAL`.

use std::time::{Duration, Instant};

use sluice::simulator::Simulator;
use tokio::task::JoinSet;

use crate::support::*;

const SLOTS_LUA: &str = include_str!("../../src/upstream/lua/slots.lua");

/// A replica config: the upstream capped at `cap` with a wait of up to
/// `wait_secs`, Redis at `redis_url` under `prefix`.
fn config(sim: &Simulator, cap: u32, wait_secs: u32, redis_url: &str, prefix: &str) -> String {
    let text = config_text(
        &sim.base_url(),
        &format!(
            "[redis]\nurl = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\n\
             # A loaded test machine: a slow round trip is not the fault here.\n\
             timeout_ms = 500\n"
        ),
    );
    let edited = text
        .replace(
            "max_retries = 2\n",
            &format!("max_retries = 2\nmax_concurrent = {cap}\n"),
        )
        .replace(
            "first_byte_timeout_secs = 5",
            &format!("first_byte_timeout_secs = {wait_secs}"),
        );
    assert!(
        edited.contains("max_concurrent = "),
        "the test config moved"
    );
    edited
}

async fn fleet(n: usize, text: &str) -> Vec<Replica> {
    let out = Replica::fleet(n, text).await;
    for r in &out {
        wait_metric(r, "sluice_redis_up", 1.0).await;
    }
    out
}

/// Waits (up to 10 s) until a replica's metric reads `want`.
async fn wait_metric(r: &Replica, name: &str, want: f64) {
    r.wait_metric(name, want, Duration::from_secs(10)).await;
}

fn prefix() -> String {
    format!("cap{:08x}", rand::random::<u32>())
}

fn slots_key(prefix: &str) -> String {
    format!("{prefix}:{{upstream:default}}:slots")
}

/// Sends a slow request to `url`; its status and error code.
fn slow(set: &mut JoinSet<(u16, String)>, url: String, i: usize, latency_ms: u64) {
    set.spawn(async move {
        let r = call(
            &url,
            ALPHA,
            &chat(&format!("slow {i}")),
            &[
                ("cache-control", "no-store"),
                ("x-sim-latency-ms", &latency_ms.to_string()),
            ],
        )
        .await;
        (r.status.as_u16(), r.error_code_or_empty())
    });
}

async fn all_ok(mut set: JoinSet<(u16, String)>) -> usize {
    let mut n = 0;
    while let Some(done) = set.join_next().await {
        let (status, code) = done.expect("request task");
        assert_eq!(status, 200, "{code}");
        n += 1;
    }
    n
}

#[tokio::test]
async fn three_replicas_keep_one_count_of_the_upstreams_slots() {
    let _one_at_a_time = heavy().await;
    let Some(redis) = RedisServer::start("three_replicas_keep_one_count_of_the_upstreams_slots")
    else {
        return;
    };
    let sim = simulator().await;
    let prefix = prefix();
    let replicas = fleet(3, &config(&sim, 2, 60, &redis.url(), &prefix)).await;
    let mut set = JoinSet::new();
    for i in 0..24 {
        slow(
            &mut set,
            replicas[i % 3].url("/v1/chat/completions"),
            i,
            250,
        );
    }
    assert_eq!(all_ok(set).await, 24);
    assert_eq!(sim.calls(), 24);
    // Each replica alone would allow 2: up to 6 at once.
    assert_eq!(
        sim.max_in_flight(),
        2,
        "the upstream saw more calls at once than its max_concurrent"
    );
    // Nothing is held once nothing is in flight.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let held: u64 = entries(&redis, &slots_key(&prefix))
            .iter()
            .map(|e| e.1)
            .sum();
        if held == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} slots still counted with nothing in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn one_replicas_backlog_does_not_keep_the_slots_from_another() {
    let _one_at_a_time = heavy().await;
    let Some(redis) =
        RedisServer::start("one_replicas_backlog_does_not_keep_the_slots_from_another")
    else {
        return;
    };
    let sim = simulator().await;
    let replicas = fleet(2, &config(&sim, 1, 60, &redis.url(), &prefix())).await;
    // Replica 0: 30 calls of 200 ms for one slot, a 6 s backlog.
    let mut backlog = JoinSet::new();
    for i in 0..30 {
        slow(
            &mut backlog,
            replicas[0].url("/v1/chat/completions"),
            i,
            200,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas[0].metric("sluice_upstream_waiting", &[]).await < 20.0 {
        assert!(Instant::now() < deadline, "the backlog never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Replica 1's one call gets the slot within a few turns, not after
    // the backlog: replica 0 gives its slot back while replica 1 waits.
    let started = Instant::now();
    let mut one = JoinSet::new();
    slow(&mut one, replicas[1].url("/v1/chat/completions"), 100, 200);
    assert_eq!(all_ok(one).await, 1);
    let took = started.elapsed();
    let left = replicas[0].metric("sluice_upstream_waiting", &[]).await;
    assert!(
        took < Duration::from_millis(2500) && left > 0.0,
        "answered in {took:?}, with {left} of the backlog still waiting"
    );
    assert_eq!(all_ok(backlog).await, 30);
    assert_eq!(sim.max_in_flight(), 1);
}

/// A holder's entry in the slot hash: (slots, lease end in Unix ms).
fn entries(redis: &RedisServer, key: &str) -> Vec<(String, u64, u64)> {
    let out = redis.cli(&["HGETALL", key]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter(|kv| kv.len() == 2 && !kv[0].ends_with(":w"))
        .filter_map(|kv| {
            let mut it = kv[1].split(' ');
            let slots = it.next()?.parse().ok()?;
            let _version = it.next()?;
            let until = it.next()?.parse().ok()?;
            Some((kv[0].to_string(), slots, until))
        })
        .collect()
}

/// Redis's clock, in Unix ms.
fn redis_now(redis: &RedisServer) -> u64 {
    let out = redis.cli(&["TIME"]);
    let mut it = out.lines().map(|l| l.trim().parse::<u64>().expect("TIME"));
    let (s, us) = (it.next().expect("s"), it.next().expect("us"));
    s * 1000 + us / 1000
}

#[tokio::test]
async fn a_dead_replicas_slots_come_back_within_thirty_seconds() {
    let _one_at_a_time = heavy().await;
    let Some(redis) = RedisServer::start("a_dead_replicas_slots_come_back_within_thirty_seconds")
    else {
        return;
    };
    let sim = simulator().await;
    let prefix = prefix();
    let key = slots_key(&prefix);
    let mut replicas = fleet(2, &config(&sim, 2, 60, &redis.url(), &prefix)).await;
    // Replica 0 takes both slots with calls that never end, and dies.
    let mut hung = JoinSet::new();
    for i in 0..2 {
        let url = replicas[0].url("/v1/chat/completions");
        hung.spawn(async move {
            let _ = try_open(
                post(&url, ALPHA)
                    .header("x-sim-hang", "headers")
                    .header("cache-control", "no-store")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        chat(&format!("hang {i}")).to_string(),
                    )))
                    .expect("req"),
            )
            .await;
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.calls() < 2 {
        assert!(Instant::now() < deadline, "the hung calls never went out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replicas[0].kill().await;
    let killed_at = redis_now(&redis);
    // Replica 1's request waits for a slot the dead replica holds.
    let mut waiting = JoinSet::new();
    slow(&mut waiting, replicas[1].url("/v1/chat/completions"), 0, 0);
    let dead = loop {
        let e = entries(&redis, &key);
        if let Some(d) = e.iter().find(|(_, slots, _)| *slots == 2) {
            break d.clone();
        }
        assert!(Instant::now() < deadline, "no holder of 2 slots: {e:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        dead.2 <= killed_at + 30_000,
        "the dead replica's lease ends {} ms after it died",
        dead.2 - killed_at
    );
    wait_metric(&replicas[1], "sluice_upstream_waiting", 1.0).await;
    assert_eq!(sim.calls(), 2, "served past a full fleet");
    // Instead of waiting out the lease, move the dead replica's lease end
    // to now (what Redis would see when it lapsed).
    let lapse = "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
         local n, ver = string.match(v, '^(%d+) (%d+) ') \
         redis.call('HSET', KEYS[1], ARGV[1], n .. ' ' .. ver .. ' 0')";
    redis.cli(&["EVAL", lapse, "1", &key, &dead.0]);
    let started = Instant::now();
    assert_eq!(all_ok(waiting).await, 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served {:?} after the lease lapsed",
        started.elapsed()
    );
    hung.abort_all();
}

#[tokio::test]
async fn with_redis_down_each_replica_keeps_its_own_cap() {
    let _one_at_a_time = heavy().await;
    let Some(mut redis) = RedisServer::start("with_redis_down_each_replica_keeps_its_own_cap")
    else {
        return;
    };
    let sim = simulator().await;
    let replicas = fleet(2, &config(&sim, 1, 30, &redis.url(), &prefix())).await;
    redis.kill();
    for r in &replicas {
        wait_metric(r, "sluice_redis_up", 0.0).await;
    }
    let mut set = JoinSet::new();
    for i in 0..6 {
        slow(
            &mut set,
            replicas[i % 2].url("/v1/chat/completions"),
            i,
            300,
        );
    }
    assert_eq!(all_ok(set).await, 6);
    // One at a time on each replica: two in all, never six.
    assert_eq!(sim.max_in_flight(), 2);
}

#[tokio::test]
async fn a_request_waiting_for_the_fleet_is_served_when_redis_goes_away() {
    let _one_at_a_time = heavy().await;
    let Some(mut redis) =
        RedisServer::start("a_request_waiting_for_the_fleet_is_served_when_redis_goes_away")
    else {
        return;
    };
    let sim = simulator().await;
    let replicas = fleet(2, &config(&sim, 1, 60, &redis.url(), &prefix())).await;
    // Replica 0 holds the fleet's one slot; replica 1's request waits.
    let mut hung = JoinSet::new();
    slow(
        &mut hung,
        replicas[0].url("/v1/chat/completions"),
        0,
        30_000,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.calls() < 1 {
        assert!(Instant::now() < deadline, "the long call never went out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut waiting = JoinSet::new();
    slow(&mut waiting, replicas[1].url("/v1/chat/completions"), 1, 0);
    wait_metric(&replicas[1], "sluice_upstream_waiting", 1.0).await;
    assert_eq!(sim.calls(), 1, "served past a full fleet");
    // Redis goes away: replica 1 keeps its own cap, and has a slot free.
    let started = Instant::now();
    redis.kill();
    assert_eq!(all_ok(waiting).await, 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served {:?} after Redis went away",
        started.elapsed()
    );
    hung.abort_all();
}

// ---- the script on its own ------------------------------------------------------

/// The slot hash the script tests use, of an upstream with 2 slots.
const KEY: &str = "t:{upstream:default}:slots";
const CAP: u64 = 2;

/// One SLOTS call of `holder` (with its change's version, the slots it
/// has, how many more it wants, and whether its requests were served since
/// its last call): (granted, other holders waiting, applied).
fn slots(
    redis: &RedisServer,
    holder: &str,
    version: u64,
    have: u64,
    want: u64,
    served: bool,
    lease_ms: u64,
) -> (u64, u64, u64) {
    let (key, cap) = (KEY, CAP);
    // Calls a millisecond apart or more, so who waited longer is clear.
    std::thread::sleep(Duration::from_millis(2));
    let out = redis.cli(&[
        "EVAL",
        SLOTS_LUA,
        "1",
        key,
        holder,
        &version.to_string(),
        &have.to_string(),
        &want.to_string(),
        &cap.to_string(),
        &lease_ms.to_string(),
        "1000",
        if served { "1" } else { "0" },
    ]);
    let n: Vec<u64> = out
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("SLOTS: {out}")))
        .collect();
    assert_eq!(n.len(), 3, "SLOTS: {out}");
    (n[0], n[1], n[2])
}

#[test]
fn the_slot_script_counts_for_the_fleet_and_serves_in_turn() {
    let Some(redis) = RedisServer::start("the_slot_script_counts_for_the_fleet_and_serves_in_turn")
    else {
        return;
    };
    const LEASE: u64 = 30_000;
    // a takes both slots; b and c must wait.
    assert_eq!(slots(&redis, "a", 1, 0, 2, false, LEASE), (2, 0, 1));
    assert_eq!(slots(&redis, "b", 1, 0, 1, false, LEASE), (0, 0, 1));
    assert_eq!(slots(&redis, "c", 1, 0, 1, false, LEASE), (0, 1, 1));
    // a learns that others wait, and gives one back.
    assert_eq!(slots(&redis, "a", 2, 1, 0, false, LEASE), (0, 2, 1));
    // c asks first, but b has waited longer: the slot is b's.
    assert_eq!(slots(&redis, "c", 2, 0, 1, false, LEASE), (0, 1, 1));
    assert_eq!(slots(&redis, "b", 2, 0, 1, false, LEASE), (1, 1, 1));
    // a late change (an older version) changes nothing.
    assert_eq!(slots(&redis, "a", 1, 0, 2, false, LEASE).2, 0);
    // b gives its slot back while still wanting more: it has been served,
    // so c, waiting longer now, is next.
    assert_eq!(slots(&redis, "b", 3, 0, 1, false, LEASE), (0, 1, 1));
    assert_eq!(slots(&redis, "c", 3, 0, 1, false, LEASE), (1, 1, 1));
    // a's own requests were served (one slot going from one to the next)
    // while it waited: behind b, which has not been.
    assert_eq!(slots(&redis, "a", 3, 0, 1, true, LEASE), (0, 1, 1));
    assert_eq!(slots(&redis, "b", 4, 0, 1, false, LEASE), (1, 1, 1));
    // The key expires with the last lease written.
    let ttl: i64 = redis.cli(&["PTTL", KEY]).trim().parse().expect("PTTL");
    assert!(ttl > 0 && ttl <= LEASE as i64, "PTTL {ttl}");
}

#[test]
fn a_holder_whose_lease_lapsed_holds_nothing() {
    let Some(redis) = RedisServer::start("a_holder_whose_lease_lapsed_holds_nothing") else {
        return;
    };
    // The dead holder's lease is 50 ms.
    assert_eq!(slots(&redis, "dead", 1, 0, 2, false, 50), (2, 0, 1));
    assert_eq!(slots(&redis, "live", 1, 0, 1, false, 30_000), (0, 0, 1));
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(slots(&redis, "live", 2, 0, 2, false, 30_000), (2, 0, 1));
    assert!(
        !redis
            .cli(&["HKEYS", KEY])
            .lines()
            .any(|l| l.starts_with("dead")),
        "the dead holder's fields are gone"
    );
}
