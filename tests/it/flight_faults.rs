//! Flights across replicas while Redis misbehaves (the spec's §3 SSE error
//! event; §8 "Coalescing", "Exactly once" and "When Redis is unavailable";
//! docs/redis.md, "Coalescing across replicas"). Each test runs three real
//! `sluice` replicas in front of one simulator; they know Redis only
//! through the fault proxy (`fault_proxy`), in front of a real
//! `redis-server` of the test's own.
//!
//! - A streaming follower never sees a cut stream without the error event,
//!   and never content other than the leader's (`a_follower_stream_…`).
//! - When only Redis fails, a follower that was sent nothing yet still gets
//!   a whole answer, within `first_byte_timeout_secs` (`…_redis_partitioned`,
//!   `…_redis_paused`).
//! - One deadline: a follower gets its 504 within one
//!   `first_byte_timeout_secs` of its arrival, whatever its leader does and
//!   even if it takes the call over (`one_deadline_…`).
//! - A claim nobody publishes holds followers at most one claim lease
//!   (`an_orphan_claim_…`).
//! - A waiting follower touches Redis at most a few times per blocking read
//!   (`a_waiting_follower_…`).
//!
//! Waits are on events and on polling with deadlines; the only timed things
//! are the fault schedules, the simulator's pace and one measuring window.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sluice::simulator::Simulator;

use crate::fault_proxy::{FaultProxy, ProxyHandle};
use crate::support::*;

const CHAT: &str = "/v1/chat/completions";

/// How long a follower's blocking read waits before it checks on the
/// leader (`flight::fleet`'s `BLOCK`, docs/redis.md "Following").
const BLOCK: Duration = Duration::from_millis(500);

/// The claim's lease: a claim not renewed lapses after this (docs/redis.md,
/// "Claim").
const CLAIM_LEASE: Duration = Duration::from_secs(3);

/// `[redis] timeout_ms` for the tests whose faults are not latency: room
/// enough that a loaded machine's slow round trip does not send a request
/// off on its own (each replica then decides alone, as it should) before
/// the test has set up what it checks.
const ROOMY_TIMEOUT_MS: u64 = 1000;

// ---- the fleet -------------------------------------------------------------------

/// Per replica: `[upstream] first_byte_timeout_secs`; and the fleet's
/// `[redis] timeout_ms`.
struct Settings {
    timeout_ms: u64,
    first_byte_secs: [u64; 3],
}

/// One `redis-server`, the fault proxy in front of it, one simulator, and
/// three replicas (A, B, C) that reach Redis only through the proxy.
struct Fleet {
    redis: RedisServer,
    proxy: FaultProxy,
    sim: Simulator,
    replicas: Vec<Replica>,
}

impl Fleet {
    async fn start(test: &str, s: Settings) -> Option<Fleet> {
        let redis = RedisServer::start(test)?;
        let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into());
        let sim = simulator().await;
        let mut replicas = Vec::with_capacity(3);
        for first_byte in s.first_byte_secs {
            let text = config_text(
                &sim.base_url(),
                &format!(
                    "[redis]\nurl = \"redis://{}/0\"\ntimeout_ms = {}\n",
                    proxy.addr, s.timeout_ms
                ),
            );
            let default = "first_byte_timeout_secs = 5\n";
            assert!(text.contains(default), "the default test config moved");
            let text = text.replace(
                default,
                &format!("first_byte_timeout_secs = {first_byte}\n"),
            );
            replicas.push(Replica::start(&text).await);
        }
        let f = Fleet {
            redis,
            proxy,
            sim,
            replicas,
        };
        f.wait_redis_up().await;
        Some(f)
    }

    fn url(&self, i: usize) -> String {
        self.replicas[i].url(CHAT)
    }

    /// Waits (up to 10 s each) until every replica says Redis answers.
    async fn wait_redis_up(&self) {
        for r in &self.replicas {
            r.wait_metric("sluice_redis_up", 1.0, Duration::from_secs(10))
                .await;
        }
    }

    /// Redis as the test sees it (never through the proxy).
    fn cli(&self, args: &[&str]) -> String {
        tokio::task::block_in_place(|| self.redis.cli(args))
    }

    fn scan(&self, pattern: &str) -> Vec<String> {
        self.cli(&["--scan", "--pattern", pattern])
            .lines()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Followers registered with any leader so far: the sum of every
    /// flight's followers hash (docs/redis.md, "Claim").
    fn followers_joined(&self) -> u64 {
        self.scan("sluice:{*}:n")
            .iter()
            .map(|k| {
                self.cli(&["HVALS", k])
                    .lines()
                    .filter_map(|c| c.trim().parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    /// Waits until `n` followers have registered in all, unless one of
    /// `tasks` ends first (then the premise did not hold: it says which).
    async fn wait_followers<T>(&self, n: u64, tasks: &[&tokio::task::JoinHandle<T>]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let joined = self.followers_joined();
            if joined >= n {
                return;
            }
            if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
                panic!("request {i} ended before {n} followers registered ({joined} did)");
            }
            assert!(
                Instant::now() < deadline,
                "{joined} followers registered, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }

    /// The Redis name of `body`'s flight (`sluice:{<hex>}:`), learnt from
    /// a real request's claim: a slow request that fails (400, so nothing
    /// is stored) holds the claim while the test looks for it.
    async fn learn_key(&self, body: &serde_json::Value) -> String {
        let before = self.scan("sluice:{*}:lead");
        let url = self.url(0);
        let b = body.clone();
        let probe = tokio::spawn(async move {
            call(
                &url,
                ALPHA,
                &b,
                &[("x-sim-status", "400"), ("x-sim-latency-ms", "600")],
            )
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let lead = loop {
            let now: Vec<String> = self
                .scan("sluice:{*}:lead")
                .into_iter()
                .filter(|k| !before.contains(k))
                .collect();
            if let [one] = now.as_slice() {
                break one.clone();
            }
            assert!(now.len() <= 1, "more than one new claim: {now:?}");
            assert!(
                !probe.is_finished() && Instant::now() < deadline,
                "the probe request's claim never showed"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let r = probe.await.expect("probe");
        assert_eq!(r.status, 400, "the probe request fails: {}", r.text());
        // Released with its end: a request that comes next finds it free.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cli(&["EXISTS", &lead]).trim() != "0" {
            assert!(Instant::now() < deadline, "the probe's claim stayed");
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        lead.strip_suffix("lead")
            .expect("a claim's name")
            .to_string()
    }

    /// `INFO commandstats`: calls per command.
    fn commandstats(&self) -> BTreeMap<String, u64> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect()
    }

    /// Redis round trips of the coalescing traffic that failed or timed
    /// out, on every replica.
    async fn coalesce_failures(&self) -> f64 {
        let mut n = 0.0;
        for r in &self.replicas {
            for result in ["error", "timeout"] {
                n += r
                    .metric(
                        "sluice_redis_operations_total",
                        &[("op", "coalesce"), ("result", result)],
                    )
                    .await;
            }
        }
        n
    }
}

/// POSTs `body` to `url` and reads the whole answer, within 20 s; with the
/// time it took.
async fn timed_call(
    url: String,
    body: serde_json::Value,
    headers: &'static [(&'static str, &'static str)],
) -> (Resp, Duration) {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), call(&url, ALPHA, &body, headers))
        .await
        .unwrap_or_else(|_| panic!("no answer from {url} within 20 s"));
    (r, start.elapsed())
}

/// The chat content of a whole (non-streamed) answer.
fn whole_content(r: &Resp) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

// ---- 1. never a cut stream without the error event ---------------------------------

/// About 2.4 s of events.
const PACED: [(&str, &str); 2] = [("x-sim-chunks", "24"), ("x-sim-chunk-delay-ms", "100")];

/// Per chunk and direction: round trips of 10–60 ms around `timeout_ms = 25`.
const SLOW: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(30));

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Round trips around `timeout_ms` for 1.5 s.
    Latency,
    /// Every connection reset, once.
    Reset,
    /// Every connection reset, new ones refused for 800 ms.
    Partition,
    /// Nothing forwarded for 700 ms, then everything at once.
    Pause,
    /// Latency, then a partition over the stream's last events and its end.
    AtTheEnd,
    /// Latency, a reset, a pause and a partition.
    All,
}

/// Plays `fault` on the proxy, from now (the followers joined, about
/// 0.3 s into a stream of 2.4 s).
async fn play(p: ProxyHandle, fault: Fault) {
    let at = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    match fault {
        Fault::Latency => {
            at(100).await;
            p.latency(SLOW.0, SLOW.1);
            at(1500).await;
        }
        Fault::Reset => {
            at(500).await;
            p.reset_all();
        }
        Fault::Partition => {
            at(400).await;
            p.partition(Duration::from_millis(800));
            at(800).await;
        }
        Fault::Pause => {
            at(400).await;
            p.pause();
            at(700).await;
        }
        Fault::AtTheEnd => {
            at(1200).await;
            p.latency(SLOW.0, SLOW.1);
            at(600).await;
            p.partition(Duration::from_millis(900));
            at(900).await;
        }
        Fault::All => {
            at(100).await;
            p.latency(SLOW.0, SLOW.1);
            at(300).await;
            p.reset_all();
            at(300).await;
            p.pause();
            at(300).await;
            p.resume();
            p.partition(Duration::from_millis(600));
            at(600).await;
        }
    }
    p.clear();
}

/// The `id` of every chunk of a stream (the error event has none).
fn chunk_ids(events: &[String]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect()
}

/// What a streaming follower's answer is, against the leader's events; or
/// why it breaks the rule. A follower may get the leader's call (coalesced
/// with it through Redis) or another (its replica's own, when Redis did not
/// answer in time, with identical requests there coalesced onto it): the
/// leader's call's events must be the leader's very events; any call's
/// content must be the leader's content (the simulator's answer depends on
/// the request alone).
fn judge(r: &Resp, leader: &[String], leader_content: &str) -> Result<&'static str, String> {
    let cache = r.header("x-sluice-cache");
    if r.status != 200 {
        return Err(format!("status {} ({cache}): {}", r.status, r.text()));
    }
    let events = r.events();
    let content = streamed_content(&events);
    let ids = chunk_ids(&events);
    if ids.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!("({cache}) events of more than one call: {ids:?}"));
    }
    let leaders_call = !ids.is_empty() && ids.first() == chunk_ids(leader).first();
    match events.last().map(String::as_str) {
        Some("[DONE]") => {
            if r.aborted {
                return Err(format!("({cache}) [DONE], then the transfer broke"));
            }
            if content != leader_content {
                return Err(format!(
                    "({cache}) a whole stream whose content differs: {content:?} vs the leader's {leader_content:?}"
                ));
            }
            if leaders_call && events != leader {
                return Err(format!(
                    "({cache}) the leader's call, not the leader's events: {events:?} vs {leader:?}"
                ));
            }
            Ok(if leaders_call {
                "[DONE], the leader's events"
            } else {
                "[DONE], another call's answer"
            })
        }
        Some(last) => {
            let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
            if v["error"]["code"] != "upstream_stream_interrupted"
                || v["error"]["type"] != "upstream_error"
            {
                return Err(format!(
                    "({cache}) ends cleanly={} without [DONE] or the error event: last {last:?} of {} events",
                    !r.aborted,
                    events.len()
                ));
            }
            if events.iter().any(|e| e == "[DONE]") {
                return Err(format!("({cache}) an error event after [DONE]"));
            }
            if !r.aborted {
                return Err(format!("({cache}) the error event, then a clean end"));
            }
            if !leader_content.starts_with(&content) {
                return Err(format!(
                    "({cache}) content before the error is not the leader's prefix: {content:?} vs {leader_content:?}"
                ));
            }
            let relayed = &events[..events.len() - 1];
            if leaders_call && !leader.starts_with(relayed) {
                return Err(format!(
                    "({cache}) events before the error are not the leader's first ones: {relayed:?} vs {leader:?}"
                ));
            }
            Ok(if leaders_call {
                "error event after the leader's events"
            } else {
                "error event after another call's"
            })
        }
        None => Err(format!(
            "({cache}) no event at all (aborted: {}): {:?}",
            r.aborted,
            r.text()
        )),
    }
}

/// One round: a paced stream led on A; three streaming followers (two on
/// B, one on C) and two that want a whole answer (one on each) join once
/// it has sent a few events; then `fault`.
async fn stream_round(
    f: &Fleet,
    round: usize,
    fault: Fault,
    outcomes: &mut BTreeMap<&'static str, usize>,
    failures: &mut Vec<String>,
) {
    let question = format!("a paced flight under Redis faults, round {round}");
    let body = chat_stream(&question);
    let (parts, mut lead_body) = call_open(&f.url(0), ALPHA, &body, &PACED)
        .await
        .into_parts();
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-sluice-cache"], "miss", "round {round}");
    // Mid-flight: the leader's client has had a few events.
    let mut got = Vec::new();
    while sse_data(&String::from_utf8_lossy(&got)).len() < 3 {
        let chunk = next_chunk(&mut lead_body)
            .await
            .expect("the leader streams");
        got.extend_from_slice(&chunk);
    }
    let leader = tokio::spawn(read_rest(parts, lead_body, got));

    let (heads, mut headed) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut streams = Vec::new();
    for (name, i) in [("B1", 1), ("B2", 1), ("C1", 2)] {
        let (url, body, heads) = (f.url(i), body.clone(), heads.clone());
        streams.push((
            name,
            tokio::spawn(async move {
                let answer = tokio::time::timeout(Duration::from_secs(20), async {
                    let (parts, body) = call_open(&url, ALPHA, &body, &PACED).await.into_parts();
                    let _ = heads.send(());
                    read_rest(parts, body, Vec::new()).await
                })
                .await;
                answer.map_err(|_| "no end within 20 s".to_string())
            }),
        ));
    }
    drop(heads);
    let wholes = [("Bw", 1), ("Cw", 2)].map(|(name, i)| {
        (
            name,
            tokio::spawn(timed_call(f.url(i), chat(&question), &PACED)),
        )
    });
    // The streaming followers have their heads, and the others are in: the
    // faults begin.
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..streams.len() {
        let head = tokio::time::timeout_at(deadline.into(), headed.recv()).await;
        assert!(
            matches!(head, Ok(Some(()))),
            "round {round}: a follower never got its head"
        );
    }
    // (On a loaded machine a follower may be done before it is seen in
    // flight: then there is nothing left to wait for.)
    for (i, want) in [(1, 3.0), (2, 2.0)] {
        while f.replicas[i]
            .metric("sluice_inflight_requests", &[("tenant", "alpha")])
            .await
            < want
            && !wholes.iter().any(|(_, t)| t.is_finished())
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the followers never reached replica {i}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    play(f.proxy.handle(), fault).await;

    let leader = tokio::time::timeout(Duration::from_secs(20), leader)
        .await
        .unwrap_or_else(|_| panic!("round {round}: the leader's stream never ended"))
        .expect("leader");
    // Upstream is healthy: the leader's own client gets the whole stream.
    let leader_events = leader.events();
    assert_eq!(
        leader_events.last().map(String::as_str),
        Some("[DONE]"),
        "round {round} ({fault:?}): the leader's stream: {leader_events:?}"
    );
    assert!(!leader.aborted);
    let leader_content = streamed_content(&leader_events);
    assert!(leader_content.contains("more23"), "{leader_content}");

    for (name, task) in streams {
        match task.await.expect("follower") {
            Ok(r) => match judge(&r, &leader_events, &leader_content) {
                Ok(outcome) => {
                    eprintln!(
                        "round {round} ({fault:?}): follower {name} ({}): {outcome}, {} events",
                        r.header("x-sluice-cache"),
                        r.events().len()
                    );
                    *outcomes.entry(outcome).or_default() += 1;
                }
                Err(e) => failures.push(format!("round {round} ({fault:?}), follower {name}: {e}")),
            },
            Err(e) => failures.push(format!("round {round} ({fault:?}), follower {name}: {e}")),
        }
    }
    // Sent nothing before the end: a whole answer, whatever Redis did.
    for (name, task) in wholes {
        let (r, took) = task.await.expect("follower");
        let cache = r.header("x-sluice-cache");
        eprintln!(
            "round {round} ({fault:?}): follower {name}: {} ({cache}) in {took:?}",
            r.status
        );
        if r.status != 200 || whole_content(&r) != leader_content {
            failures.push(format!(
                "round {round} ({fault:?}), follower {name} ({cache}): not a whole answer: {} {}",
                r.status,
                r.text()
            ));
        } else {
            *outcomes.entry("whole answer").or_default() += 1;
        }
    }
}

/// Streaming followers on B and C of a paced stream led on A, through
/// latency around `timeout_ms`, a reset, a short partition, a pause, a
/// partition over the stream's end, and all of them: every streaming
/// follower gets the whole stream, ending in `[DONE]`, with the leader's
/// content (the leader's very events, when it follows the leader's call),
/// or a prefix of it ending in the SSE error event and an aborted
/// transfer. Never a clean end without `[DONE]`, never anything but the
/// leader's content, never one call's events spliced onto another's. The
/// followers that want a whole answer were sent nothing before the end:
/// each gets the whole answer. (With `timeout_ms = 25` a loaded machine
/// adds faults of its own: a request whose lookup times out goes upstream
/// on its own, and identical requests on its replica follow it there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stream_is_whole_or_ends_with_the_error_event_under_redis_faults() {
    let _one_at_a_time = heavy().await;
    let test = "a_follower_stream_is_whole_or_ends_with_the_error_event";
    let Some(f) = Fleet::start(
        test,
        Settings {
            timeout_ms: 25,
            first_byte_secs: [5, 5, 5],
        },
    )
    .await
    else {
        return;
    };
    let mut outcomes = BTreeMap::new();
    let mut failures = Vec::new();
    let start = Instant::now();
    let faults = [
        Fault::Latency,
        Fault::Reset,
        Fault::Partition,
        Fault::Pause,
        Fault::AtTheEnd,
        Fault::All,
    ];
    for (round, fault) in faults.into_iter().enumerate() {
        f.wait_redis_up().await;
        stream_round(&f, round, fault, &mut outcomes, &mut failures).await;
    }
    let reached = f.coalesce_failures().await;
    eprintln!(
        "{test}: {} rounds in {:?}; outcomes {outcomes:?}; coalescing round trips failed or timed out: {reached}; \
         upstream calls {}; proxy: {} connections, {} refused",
        faults.len(),
        start.elapsed(),
        f.sim.calls(),
        f.proxy.accepted(),
        f.proxy.refused()
    );
    assert!(failures.is_empty(), "{test}:\n  {}", failures.join("\n  "));
    // The test's premises: followers did follow, and the faults did reach
    // their flights.
    assert!(
        outcomes
            .iter()
            .any(|(k, n)| k.contains("the leader's events") && *n > 0),
        "no follower followed the leader on A: {outcomes:?}"
    );
    assert!(reached > 0.0, "the faults never reached a flight");
}

// ---- 2. Redis failing alone: a follower sent nothing yet gets a whole answer -------

/// A leader's upstream answers after this (its headers), within the
/// replicas' `first_byte_timeout_secs` (6).
const LEADER_LATENCY: [(&str, &str); 1] = [("x-sim-latency-ms", "4000")];
const FIRST_BYTE_SECS: u64 = 6;

#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Every connection reset, new ones refused.
    Partition,
    /// Nothing forwarded (nothing lost) until resumed.
    Pause,
}

/// A non-streaming follower on B and a streaming one on C, both waiting on
/// a stream led on A whose upstream answer takes 4 s; Redis becomes
/// unreachable (and stays so) before anything was sent to them. Each gets
/// a 200 with a whole answer within `first_byte_timeout_secs` (6) of its
/// arrival: it cannot have it from the leader (Redis is gone), so it asks
/// upstream itself; one that waited on Redis would get a 504 at 6 s.
async fn followers_get_whole_answers_when_redis_fails(test: &str, outage: Outage) {
    let Some(f) = Fleet::start(
        test,
        Settings {
            timeout_ms: ROOMY_TIMEOUT_MS,
            first_byte_secs: [FIRST_BYTE_SECS; 3],
        },
    )
    .await
    else {
        return;
    };
    // One flight: a stream led on A; whole answers and streams follow it.
    let whole = chat("a follower sent nothing yet");
    let stream = chat_stream("a follower sent nothing yet");
    let leader = tokio::spawn(timed_call(f.url(0), stream.clone(), &LEADER_LATENCY));
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.sim.calls() < 1 {
        assert!(Instant::now() < deadline, "the leader never went upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = tokio::spawn(timed_call(f.url(1), whole, &[]));
    let c = tokio::spawn(timed_call(f.url(2), stream, &[]));
    f.wait_followers(2, &[&b, &c]).await;
    let registered = Instant::now();
    match outage {
        Outage::Partition => f.proxy.partition(Duration::from_secs(60)),
        Outage::Pause => f.proxy.pause(),
    }
    let (rb, tb) = b.await.expect("follower on B");
    let (rc, tc) = c.await.expect("follower on C");
    let since_fault = registered.elapsed();
    let (rl, tl) = leader.await.expect("leader");
    f.proxy.clear();
    eprintln!(
        "{test}: follower B {} {} in {tb:?}, follower C {} {} in {tc:?} ({since_fault:?} after the outage began); \
         leader {} in {tl:?}; upstream calls {}",
        rb.status,
        rb.header("x-sluice-cache"),
        rc.status,
        rc.header("x-sluice-cache"),
        rl.status,
        f.sim.calls()
    );
    // Upstream is healthy: the leader's own client gets its whole stream.
    assert_eq!(rl.status, 200, "the leader: {}", rl.text());
    assert_eq!(rl.events().last().map(String::as_str), Some("[DONE]"));
    let leader_content = streamed_content(&rl.events());
    assert!(!leader_content.is_empty());
    let bound = Duration::from_secs(FIRST_BYTE_SECS);
    assert_eq!(rb.status, 200, "follower B: {}", rb.text());
    assert_eq!(rb.json()["object"], "chat.completion");
    assert_eq!(
        whole_content(&rb),
        leader_content,
        "follower B: a whole answer"
    );
    assert!(tb < bound, "follower B took {tb:?}");
    assert_eq!(rc.status, 200, "follower C: {}", rc.text());
    let events = rc.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "follower C: a whole stream: {events:?}"
    );
    assert!(!rc.aborted);
    assert_eq!(streamed_content(&events), leader_content, "follower C");
    assert!(tc < bound, "follower C took {tc:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sent_nothing_yet_gets_a_whole_answer_when_redis_is_partitioned() {
    let _one_at_a_time = heavy().await;
    followers_get_whole_answers_when_redis_fails(
        "a_follower_sent_nothing_yet_gets_a_whole_answer_when_redis_is_partitioned",
        Outage::Partition,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sent_nothing_yet_gets_a_whole_answer_when_redis_is_paused() {
    let _one_at_a_time = heavy().await;
    followers_get_whole_answers_when_redis_fails(
        "a_follower_sent_nothing_yet_gets_a_whole_answer_when_redis_is_paused",
        Outage::Pause,
    )
    .await;
}

// ---- 3. one deadline ---------------------------------------------------------------------

const HANG: [(&str, &str); 1] = [("x-sim-hang", "headers")];

/// A follower's 504: `upstream_timeout`, said not to be retried.
fn assert_timed_out(who: &str, r: &Resp, took: Duration, bound: Duration) {
    assert_eq!(r.status, 504, "{who}: {}", r.text());
    assert_eq!(r.error_code(), "upstream_timeout", "{who}");
    assert_eq!(r.header("x-should-retry"), "false", "{who}");
    assert!(
        took <= bound,
        "{who}: its 504 came {took:?} after it arrived, over one first_byte_timeout_secs plus slack ({bound:?})"
    );
}

/// B and C wait 3 s for a first byte (`first_byte_timeout_secs = 3`); A,
/// whose leaders never hear from upstream, waits 20. A follower on B or C
/// gets its 504 `upstream_timeout` within about 3 s of its own arrival:
///
/// - following a leader on A that never answers (its own deadline, not the
///   leader's, bounds its wait);
/// - following a claim nobody publishes, that lapses while it waits (1.8 s
///   in), so it takes the call over and goes upstream itself, which never
///   answers either: still one deadline from its arrival, not a fresh one
///   from the takeover (that would be 4.8 s or more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_a_follower_times_out_once_from_its_arrival() {
    let _one_at_a_time = heavy().await;
    let test = "one_deadline_a_follower_times_out_once_from_its_arrival";
    let Some(f) = Fleet::start(
        test,
        Settings {
            timeout_ms: ROOMY_TIMEOUT_MS,
            first_byte_secs: [20, 3, 3],
        },
    )
    .await
    else {
        return;
    };
    // One first_byte_timeout_secs, and a second of slack for a loaded
    // machine: a wait of 1.6 times that or more fails.
    let bound = Duration::from_secs(3) + Duration::from_secs(1);

    // A leader on A that never answers (A would wait 20 s); a whole
    // answer and a stream follow it.
    let whole = chat("one deadline");
    let stream = chat_stream("one deadline");
    let leader = tokio::spawn(timed_call(f.url(0), stream.clone(), &HANG));
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.sim.calls() < 1 {
        assert!(Instant::now() < deadline, "the leader never went upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = tokio::spawn(timed_call(f.url(1), whole, &HANG));
    let c = tokio::spawn(timed_call(f.url(2), stream, &HANG));
    f.wait_followers(2, &[&b, &c]).await;
    let (rb, tb) = b.await.expect("follower on B");
    let (rc, tc) = c.await.expect("follower on C");
    eprintln!(
        "{test}: behind a silent leader: B {} in {tb:?}, C {} in {tc:?}",
        rb.status, rc.status
    );
    assert_timed_out("follower on B of a silent leader", &rb, tb, bound);
    assert_timed_out("follower on C of a silent leader", &rc, tc, bound);
    assert!(
        !leader.is_finished(),
        "the leader on A was still waiting (20 s): the followers' own deadline ended their wait"
    );
    leader.abort();

    // A claim nobody publishes lapses 1.8 s into the follower's 3: it takes
    // the call over, and upstream never answers.
    let body = chat("one deadline across a takeover");
    let key = f.learn_key(&body).await;
    let calls = f.sim.calls();
    let set = f.cli(&["SET", &format!("{key}lead"), "nobody", "PX", "1800"]);
    assert!(set.contains("OK"), "{set}");
    let (r, took) = timed_call(f.url(1), body, &HANG).await;
    eprintln!(
        "{test}: across a takeover: {} in {took:?}; upstream calls made {}",
        r.status,
        f.sim.calls() - calls
    );
    assert_eq!(
        f.sim.calls() - calls,
        1,
        "the follower took the call over once the claim lapsed, before its deadline"
    );
    assert_timed_out("follower on B that took the call over", &r, took, bound);
}

// ---- 4. an orphan claim -------------------------------------------------------------------

/// A claim set by hand (`SET …:lead nobody PX 3000`) that no replica
/// publishes under: followers on B and C (two rounds: whole answers, then
/// streams) are answered within about one claim lease (3 s) plus slack,
/// not at their deadline (`first_byte_timeout_secs = 10`): one of them
/// takes the call over (`miss`), the other follows it (`coalesced`), one
/// upstream call in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_claim_holds_followers_at_most_one_claim_lease() {
    let _one_at_a_time = heavy().await;
    let test = "an_orphan_claim_holds_followers_at_most_one_claim_lease";
    let Some(f) = Fleet::start(
        test,
        Settings {
            timeout_ms: ROOMY_TIMEOUT_MS,
            first_byte_secs: [10, 10, 10],
        },
    )
    .await
    else {
        return;
    };
    let bound = CLAIM_LEASE + Duration::from_millis(1500);
    // A stream and a whole answer share a flight (and a cached answer): a
    // question of each round's own.
    for (round, body) in [
        chat("an orphan claim"),
        chat_stream("an orphan claim, streamed"),
    ]
    .into_iter()
    .enumerate()
    {
        let stream = round == 1;
        let key = f.learn_key(&body).await;
        let calls = f.sim.calls();
        let set = f.cli(&[
            "SET",
            &format!("{key}lead"),
            "nobody",
            "PX",
            &CLAIM_LEASE.as_millis().to_string(),
        ]);
        assert!(set.contains("OK"), "{set}");
        let b = tokio::spawn(timed_call(f.url(1), body.clone(), &[]));
        let c = tokio::spawn(timed_call(f.url(2), body.clone(), &[]));
        let (rb, tb) = b.await.expect("B");
        let (rc, tc) = c.await.expect("C");
        let made = f.sim.calls() - calls;
        eprintln!(
            "{test}: stream={stream}: B {} {} in {tb:?}, C {} {} in {tc:?}; upstream calls {made}",
            rb.status,
            rb.header("x-sluice-cache"),
            rc.status,
            rc.header("x-sluice-cache"),
        );
        let mut caches = Vec::new();
        for (who, r, took) in [("B", &rb, tb), ("C", &rc, tc)] {
            assert_eq!(r.status, 200, "{who} (stream={stream}): {}", r.text());
            let content = if stream {
                let events = r.events();
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{who}");
                streamed_content(&events)
            } else {
                whole_content(r)
            };
            assert_eq!(
                content, "This is a simulated answer.",
                "{who} (stream={stream})"
            );
            assert!(
                took <= bound,
                "{who} (stream={stream}) was held {took:?} by a claim nobody publishes (lease {CLAIM_LEASE:?})"
            );
            // It cannot know the claim is an orphan: it waited for it.
            assert!(
                took >= CLAIM_LEASE - Duration::from_millis(500),
                "{who} (stream={stream}) did not follow the claim: answered in {took:?}"
            );
            caches.push(r.header("x-sluice-cache").to_string());
        }
        caches.sort();
        assert_eq!(
            caches,
            ["coalesced", "miss"],
            "stream={stream}: one took the call over, the other followed it"
        );
        assert_eq!(made, 1, "stream={stream}: one upstream call");
    }
}

// ---- 5. a waiting follower's Redis traffic ------------------------------------------------

/// While a follower on B waits on a leader on A whose upstream answer takes
/// 6 s, Redis receives at most a few commands from its loop per blocking
/// read (500 ms): `INFO commandstats` over a 2 s window counts the
/// follower's reads (`XREAD`, only followers send it) and its checks of the
/// claim (`GET`, shared with the leader's renewal), and everything Redis
/// ran. A busy loop would be hundreds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_follower_touches_redis_at_most_a_few_times_per_wait() {
    let _one_at_a_time = heavy().await;
    let test = "a_waiting_follower_touches_redis_at_most_a_few_times_per_wait";
    let Some(f) = Fleet::start(
        test,
        Settings {
            timeout_ms: ROOMY_TIMEOUT_MS,
            first_byte_secs: [10, 10, 10],
        },
    )
    .await
    else {
        return;
    };
    let body = chat("a follower waits");
    // Slow enough that the follower still waits at the end of the window,
    // however long the set-up took on a loaded machine.
    let leader = tokio::spawn(timed_call(
        f.url(0),
        body.clone(),
        &[("x-sim-latency-ms", "6000")],
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.sim.calls() < 1 {
        assert!(Instant::now() < deadline, "the leader never went upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let follower = tokio::spawn(timed_call(f.url(1), body, &[]));
    f.wait_followers(1, &[&follower]).await;
    // Its reads have begun.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.commandstats().get("xread").copied().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the follower never read the log");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let window = Duration::from_secs(2);
    let before = f.commandstats();
    let began = Instant::now();
    tokio::time::sleep(window).await;
    let after = f.commandstats();
    let measured = began.elapsed();
    if follower.is_finished() || leader.is_finished() {
        let (r, took) = follower.await.expect("follower");
        panic!(
            "the follower was no longer waiting when the window closed: {} ({}) after {took:?}",
            r.status,
            r.header("x-sluice-cache")
        );
    }
    let delta =
        |cmd: &str| after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0);
    let mut per_command: BTreeMap<&str, u64> = BTreeMap::new();
    for cmd in after.keys() {
        if cmd != "info" && !cmd.starts_with("command") && delta(cmd) > 0 {
            per_command.insert(cmd, delta(cmd));
        }
    }
    let total: u64 = per_command.values().sum();
    let waits = measured.as_secs_f64() / BLOCK.as_secs_f64();
    eprintln!(
        "{test}: over {measured:?} ({waits:.1} blocking reads' time): {per_command:?}, {total} in all"
    );
    let (xread, get) = (delta("xread"), delta("get"));
    assert!(xread >= 1, "the follower's reads went on: {per_command:?}");
    // One read per wait at most (plus the ones in flight at either edge).
    assert!(
        xread as f64 <= waits + 2.0,
        "{xread} XREADs in {measured:?}: the reads do not block"
    );
    // A claim check per empty read, and the leader's renewal once a second.
    assert!(
        get as f64 <= waits + measured.as_secs_f64() + 3.0,
        "{get} GETs in {measured:?}"
    );
    // Everything Redis ran: the follower's loop, the leader's renewal and
    // the replicas' health checks (once a second each), a few per wait.
    assert!(
        total as f64 <= 10.0 * waits,
        "{total} commands in {measured:?} ({per_command:?}): a busy loop"
    );
    let (r, _) = follower.await.expect("follower");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sluice-cache"), "coalesced");
    assert_eq!(leader.await.expect("leader").0.status, 200);
    assert_eq!(f.sim.calls(), 1);
}
