//! Spend budgets (docs/budgets.md): refusal before upstream once spent, hits still
//! served, the headers and gauges, spend kept across restarts in the state
//! file, and one budget for a fleet through Redis.

use std::time::{Duration, Instant};

use crate::support::*;

const TEAM: &str = "sk-budgeted-0123456789";

/// One request with `x-sim-usage: 800,400` costs, at the test pricing
/// (hit 0.1, miss 1.0, output 2.0 per million; a quarter of the prompt
/// is a cache hit): (200 × 0.1 + 600 × 1.0 + 400 × 2.0) / 1e6.
const COST: f64 = 0.001_42;
const USAGE: (&str, &str) = ("x-sim-usage", "800,400");

fn budgeted(usd: f64, period: &str) -> String {
    format!(
        "[[tenants]]\nname = \"team\"\nkey_sha256 = [\"{}\"]\nrequests_per_minute = 0\ntokens_per_minute = 0\nmax_concurrent = 0\nmodels = [\"deepseek-chat\"]\nbudget_usd = {usd}\nbudget_period = \"{period}\"\n",
        sha(TEAM)
    )
}

fn usd(r: &Resp, h: &str) -> f64 {
    r.header(h)
        .parse()
        .unwrap_or_else(|_| panic!("{h}: {:?}", r.header(h)))
}

#[tokio::test]
async fn spent_budget_refuses_before_upstream_but_serves_hits() {
    let gw = TestGateway::start(&budgeted(0.001, "day")).await;
    let url = gw.url("/v1/chat/completions");
    assert_eq!(
        gw.metric("sluice_budget_usd", &[("tenant", "team")]).await,
        0.001
    );
    assert_eq!(
        gw.metric("sluice_budget_spent_usd", &[("tenant", "team")])
            .await,
        0.0
    );

    let r = call(&url, TEAM, &chat("first"), &[USAGE]).await;
    assert_eq!(r.status, 200);
    assert_eq!(usd(&r, "x-sluice-budget-limit-usd"), 0.001);
    assert_eq!(
        usd(&r, "x-sluice-budget-remaining-usd"),
        0.001,
        "as known when the headers were sent, before this answer's charge"
    );
    let reset = r.header("x-sluice-budget-reset");
    assert!(reset.ends_with('s') && !reset.is_empty(), "{reset}");

    // Under budget when it started, it overran; the next one is refused.
    let r = call(&url, TEAM, &chat("second"), &[USAGE]).await;
    assert_eq!(r.status, 402);
    assert_eq!(r.error_code(), "budget_exceeded");
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    assert_eq!(r.header("x-should-retry"), "false");
    let retry: u64 = r.header("retry-after").parse().expect("retry-after");
    assert!((1..=86_400).contains(&retry), "until the day ends: {retry}");
    assert_eq!(
        usd(&r, "x-sluice-budget-remaining-usd"),
        0.0,
        "never below 0"
    );
    assert_eq!(gw.sim.calls(), 1, "nothing went upstream");

    // A cached answer is still served, and costs nothing.
    let r = call(&url, TEAM, &chat("first"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-sluice-cache"), "hit");
    assert_eq!(gw.sim.calls(), 1);
    // So is the model list.
    let models = send(
        http::Request::get(gw.url("/v1/models"))
            .header("authorization", format!("Bearer {TEAM}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(models.status, 200);

    let spent = gw
        .metric("sluice_budget_spent_usd", &[("tenant", "team")])
        .await;
    assert!((spent - COST).abs() < 1e-9, "{spent}");
    assert_eq!(
        gw.metric(
            "sluice_rate_limited_total",
            &[("tenant", "team"), ("limit", "budget")]
        )
        .await,
        1.0
    );
    // Other tenants are untouched.
    assert_eq!(call(&url, ALPHA, &chat("x"), &[]).await.status, 200);
}

#[tokio::test]
async fn streams_are_charged_from_their_usage() {
    let gw = TestGateway::start(&budgeted(0.002, "month")).await;
    let url = gw.url("/v1/chat/completions");
    let r = call(&url, TEAM, &chat_stream("s1"), &[USAGE]).await;
    assert_eq!(r.status, 200);
    assert_eq!(usd(&r, "x-sluice-budget-remaining-usd"), 0.002);
    let r = call(&url, TEAM, &chat("s2"), &[]).await;
    assert_eq!(r.status, 200);
    let left = usd(&r, "x-sluice-budget-remaining-usd");
    assert!((left - (0.002 - COST)).abs() < 1e-6, "{left}");
    // A month's reset is the time left until the next month begins (UTC),
    // in hours past 24.
    let reset = r.header("x-sluice-budget-reset");
    let left = secs_to_next_month_utc();
    let read = duration_secs(reset);
    assert!(read.abs_diff(left) <= 2, "{reset}: {read} s, {left} s left");
    assert_eq!(reset.contains('h'), left >= 3600, "{reset}");
}

/// Seconds from now until the first of next month, 00:00 UTC, as GNU
/// `date` reckons it (an oracle apart from Sluice's own calendar code).
fn secs_to_next_month_utc() -> u64 {
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            r#"echo "$(date -u -d "$(date -u +%Y-%m-01) +1 month" +%s) $(date -u +%s)""#,
        ])
        .output()
        .expect("date");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut secs = text
        .split_whitespace()
        .map(|n| n.parse::<u64>().expect("seconds"));
    let (next, now) = (secs.next().expect("next"), secs.next().expect("now"));
    next - now
}

/// `743h59m0s` (the durations of docs/api.md) in seconds.
fn duration_secs(d: &str) -> u64 {
    let mut total = 0;
    let mut n = String::new();
    for c in d.chars() {
        if c.is_ascii_digit() || c == '.' {
            n.push(c);
            continue;
        }
        let v: f64 = n.parse().unwrap_or_else(|_| panic!("duration {d}"));
        n.clear();
        total += match c {
            'h' => v * 3600.0,
            'm' => v * 60.0,
            's' => v,
            _ => panic!("duration {d}"),
        } as u64;
    }
    total
}

// ---- the state file, across restarts of the real binary --------------------

fn file_config(sim: &str, state: &std::path::Path) -> String {
    config_text(
        sim,
        &format!(
            "{}[budgets]\nstate_path = \"{}\"\n",
            budgeted(1.0, "month"),
            state.display()
        ),
    )
}

async fn remaining(replica: &Replica) -> f64 {
    let r = call(
        &replica.url("/v1/chat/completions"),
        TEAM,
        &chat("probe"),
        &[("cache-control", "no-store"), ("x-sim-usage", "0,0")],
    )
    .await;
    assert!(r.status == 200 || r.status == 402, "{}", r.status);
    usd(&r, "x-sluice-budget-remaining-usd")
}

#[tokio::test]
async fn spend_survives_sigterm_and_sigkill_and_a_corrupt_file_stops_start_up() {
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let dir = std::env::temp_dir().join(format!("sluice-spend-{:x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("dir");
    let state = dir.join("spend.json");
    let text = file_config(&sim.base_url(), &state);

    let mut a = Replica::start(&text).await;
    assert!(state.exists(), "a missing file is created at start");
    let r = call(&a.url("/v1/chat/completions"), TEAM, &chat("a"), &[USAGE]).await;
    assert_eq!(r.status, 200);
    a.stop().await;
    let b = Replica::start(&text).await;
    let left = remaining(&b).await;
    assert!((left - (1.0 - COST)).abs() < 1e-9, "after SIGTERM: {left}");

    // SIGKILL: what was written (at least every 5 s) survives.
    let mut b = b;
    let r = call(&b.url("/v1/chat/completions"), TEAM, &chat("b"), &[USAGE]).await;
    assert_eq!(r.status, 200);
    let written = Instant::now();
    loop {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let spent = v["spend"]["team"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0);
        if (spent - 2.0 * COST).abs() < 1e-9 {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "written within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.kill().await;
    let c = Replica::start(&text).await;
    let left = remaining(&c).await;
    assert!(
        (left - (1.0 - 2.0 * COST)).abs() < 1e-9,
        "after SIGKILL: {left}"
    );
    drop(c);

    // A file that exists but cannot be parsed is never silently zeroed.
    std::fs::write(&state, b"{\"version\":1,\"spend\":").expect("corrupt");
    let cfg = TempFile::new(&text);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&cfg.0)
        .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&state.display().to_string()), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- one budget for a fleet ---------------------------------------------------

#[tokio::test]
async fn a_fleet_shares_one_budget_and_keeps_spend_made_while_redis_was_away() {
    let Some(mut redis) = RedisServer::start("a_fleet_shares_one_budget") else {
        return;
    };
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let text = config_text(
        &sim.base_url(),
        &format!(
            "{}[redis]\nurl = \"{}\"\n",
            budgeted(0.002, "month"),
            redis.url()
        ),
    );
    let a = Replica::start(&text).await;
    let b = Replica::start(&text).await;
    let post = |r: &Replica, what: &str| {
        let url = r.url("/v1/chat/completions");
        let what = what.to_string();
        async move {
            call(
                &url,
                TEAM,
                &chat(&what),
                &[USAGE, ("cache-control", "no-store")],
            )
            .await
        }
    };
    assert_eq!(post(&a, "one").await.status, 200);
    // Charged before the answer ended, seen by the other replica within a
    // second.
    let seen = Instant::now();
    loop {
        let left = remaining(&b).await;
        if (left - (0.002 - COST)).abs() < 1e-6 {
            break;
        }
        assert!(seen.elapsed() < Duration::from_secs(1), "{left}");
    }
    assert_eq!(
        post(&b, "two").await.status,
        200,
        "under budget when it started"
    );
    // Now both spent: the fleet stops at the budget, not twice it.
    let seen = Instant::now();
    while remaining(&a).await > 0.0 {
        assert!(
            seen.elapsed() < Duration::from_secs(1),
            "b's charge reaches a"
        );
    }
    let calls = sim.calls();
    for r in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let resp = post(r, "three").await;
            if resp.status == 402 {
                assert_eq!(resp.error_code(), "budget_exceeded");
                break;
            }
            assert!(Instant::now() < deadline, "{}", resp.status);
        }
    }
    assert_eq!(sim.calls(), calls, "refused before upstream");

    // Spend made while Redis is away is added when it is back.
    let roomy = config_text(
        &sim.base_url(),
        &format!(
            "{}[redis]\nurl = \"{}\"\n",
            budgeted(1.0, "month"),
            redis.url()
        ),
    );
    redis.kill();
    let c = Replica::start(&roomy).await;
    assert_eq!(post(&c, "while away").await.status, 200);
    redis.restart();
    let d = Replica::start(&roomy).await;
    let back = Instant::now();
    loop {
        let r = call(
            &d.url("/v1/chat/completions"),
            TEAM,
            &chat("probe"),
            &[("cache-control", "no-store"), ("x-sim-usage", "0,0")],
        )
        .await;
        let left = usd(&r, "x-sluice-budget-remaining-usd");
        if (left - (1.0 - COST)).abs() < 1e-6 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "the spend made while Redis was away never reached it: {left}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn start_up_says_when_spend_is_not_kept_or_redis_is_away() {
    if !redis_available("start_up_says_when_spend_is_not_kept") {
        return;
    }
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let warned = |r: &mut Replica, prefix: &str| {
        r.logs().iter().any(|l| {
            l["level"] == "WARN" && l["message"].as_str().unwrap_or("").starts_with(prefix)
        })
    };
    // A budget with neither Redis nor a state file: a restart resets spend.
    let mut memory = Replica::start(&config_text(&sim.base_url(), &budgeted(1.0, "day"))).await;
    assert!(warned(&mut memory, "tenants have budgets but neither"));
    // An unreachable Redis: start-up succeeds, and says so.
    let away = format!(
        "{}[redis]\nurl = \"{}\"\n",
        budgeted(1.0, "day"),
        RedisServer::url_of_port(free_port())
    );
    let mut shared = Replica::start(&config_text(&sim.base_url(), &away)).await;
    assert!(warned(&mut shared, "Redis unavailable"));
    assert!(!warned(&mut shared, "tenants have budgets but neither"));
    let r = call(&shared.url("/v1/chat/completions"), TEAM, &chat("x"), &[]).await;
    assert_eq!(r.status, 200, "served with local limits");
}

/// The rolling-upgrade rule (docs/redis.md, "Upgrading a fleet"): a
/// tenant's spend is one key per period under the same name in every
/// version, a plain number; a replica honours what another wrote there.
#[tokio::test]
async fn spend_another_replica_wrote_is_honoured() {
    let Some(redis) = RedisServer::start("spend_another_replica_wrote_is_honoured") else {
        return;
    };
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let text = config_text(
        &sim.base_url(),
        &format!(
            "{}[redis]\nurl = \"{}\"\n",
            budgeted(0.002, "day"),
            redis.url()
        ),
    );
    let replica = Replica::start(&text).await;
    let url = replica.url("/v1/chat/completions");
    let first = call(
        &url,
        TEAM,
        &chat("one"),
        &[USAGE, ("cache-control", "no-store")],
    )
    .await;
    assert_eq!(first.status, 200);
    let keys = redis.cli(&["--scan", "--pattern", "sluice:{team}:spend:day:*"]);
    let key = keys
        .lines()
        .next()
        .expect("the day's spend key")
        .trim()
        .to_string();
    // As a replica of another version would add its charges.
    redis.cli(&["INCRBYFLOAT", &key, "0.01"]);
    let r = call(
        &url,
        TEAM,
        &chat("two"),
        &[USAGE, ("cache-control", "no-store")],
    )
    .await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.error_code(), "budget_exceeded");
    assert_eq!(sim.calls(), 1);
}
