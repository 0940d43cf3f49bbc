//! A fair share of a full upstream (docs/api.md, "Timeouts and retries";
//! `upstream.max_concurrent` and a tenant's `weight` in docs/config.md):
//! the next free slot goes to the waiting tenant with the least service
//! relative to its weight, first come first served within a tenant. Driven
//! through the real gateway against the simulator, one slot, each call
//! holding it for a while.

use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

use crate::support::*;

const BATCH: &str = "sk-batch-0123456789";
const INTERACTIVE: &str = "sk-interactive-0123456789";

async fn one_slot(batch_weight: u32, interactive_weight: u32) -> TestGateway {
    one_slot_with(batch_weight, interactive_weight, "").await
}

/// `extra`: more config (a `[redis]` section).
async fn one_slot_with(batch_weight: u32, interactive_weight: u32, extra: &str) -> TestGateway {
    let tenants = format!(
        "[[tenants]]\nname = \"batch\"\nkey_sha256 = [\"{}\"]\nrequests_per_minute = 0\ntokens_per_minute = 0\nmax_concurrent = 0\nweight = {batch_weight}\n\
         [[tenants]]\nname = \"interactive\"\nkey_sha256 = [\"{}\"]\nrequests_per_minute = 0\ntokens_per_minute = 0\nmax_concurrent = 0\nweight = {interactive_weight}\n",
        sha(BATCH),
        sha(INTERACTIVE)
    );
    TestGateway::start_with(|text| {
        text.replace("max_retries = 2\n", "max_retries = 2\nmax_concurrent = 1\n")
            .replace(
                "first_byte_timeout_secs = 5",
                "first_byte_timeout_secs = 30",
            )
            + &tenants
            + extra
    })
    .await
}

/// Sends `key`'s request `i` and records, when it is answered, who it was.
fn send(
    set: &mut JoinSet<()>,
    gw: &TestGateway,
    key: &'static str,
    i: usize,
    order: &Arc<Mutex<Vec<&'static str>>>,
) {
    let url = gw.url("/v1/chat/completions");
    let order = Arc::clone(order);
    set.spawn(async move {
        let r = call(
            &url,
            key,
            &chat(&format!("{key} {i}")),
            &[("cache-control", "no-store"), ("x-sim-latency-ms", "20")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        order.lock().expect("order").push(key);
    });
}

/// Waits until `n` requests wait for the slot.
async fn until_waiting(gw: &TestGateway, tenant: &str, n: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gw
        .metric("sluice_upstream_waiting", &[("tenant", tenant)])
        .await
        < n
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{tenant} never queued {n}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn one_request_waits_about_one_turn_behind_another_tenants_hundred() {
    one_behind_a_hundred(one_slot(1, 1).await).await;
}

/// The same with the slot counted for a fleet in Redis: the replica's own
/// order holds.
#[tokio::test]
async fn one_request_waits_about_one_turn_behind_a_hundred_with_a_fleet_count() {
    let Some(redis) =
        RedisServer::start("one_request_waits_about_one_turn_behind_a_hundred_with_a_fleet_count")
    else {
        return;
    };
    let extra = format!("[redis]\nurl = \"{}\"\ntimeout_ms = 500\n", redis.url());
    let gw = one_slot_with(1, 1, &extra).await;
    gw.wait_metric("sluice_redis_up", &[], 1.0).await;
    one_behind_a_hundred(gw).await;
    assert!(
        redis
            .cli(&["--scan", "--pattern", "sluice:{upstream:default}:*"])
            .contains("slots"),
        "the slot was counted in Redis"
    );
}

async fn one_behind_a_hundred(gw: TestGateway) {
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut set = JoinSet::new();
    for i in 0..100 {
        send(&mut set, &gw, BATCH, i, &order);
    }
    // The batch holds the slot and 99 wait.
    until_waiting(&gw, "batch", 99.0).await;
    send(&mut set, &gw, INTERACTIVE, 0, &order);
    until_waiting(&gw, "interactive", 1.0).await;
    while set.join_next().await.is_some() {}
    let order = order.lock().expect("order").clone();
    let at = order
        .iter()
        .position(|k| *k == INTERACTIVE)
        .expect("answered");
    // FIFO would answer it after all hundred.
    assert!(at <= 3, "answered {at}th: {order:?}");
    assert!(
        gw.metric(
            "sluice_upstream_queue_seconds_count",
            &[("tenant", "interactive")]
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn two_backlogged_tenants_share_the_slot_by_weight() {
    let gw = one_slot(3, 1).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut set = JoinSet::new();
    // Both keep requests waiting, arriving interleaved (FIFO: 1:1).
    for i in 0..30 {
        send(&mut set, &gw, BATCH, i, &order);
        send(&mut set, &gw, INTERACTIVE, i, &order);
    }
    until_waiting(&gw, "batch", 25.0).await;
    until_waiting(&gw, "interactive", 25.0).await;
    while set.join_next().await.is_some() {}
    let order = order.lock().expect("order").clone();
    // The first 32 answers, while both had requests waiting: 3:1.
    let batch = order[..32].iter().filter(|k| **k == BATCH).count();
    assert!((21..=27).contains(&batch), "{batch} of 32: {order:?}");
}
