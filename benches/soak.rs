//! Soak benchmark: the release `sluice` binary and the simulated upstream,
//! driven with mixed traffic at a fixed rate for a long time (ten minutes by
//! default), to show that memory stays flat and nothing but the expected 429s
//! goes wrong. Run with `cargo bench --bench soak`; method and latest
//! results: benches/README.md.
//!
//! Environment: `SLUICE_SOAK_SECS` (default 600), `SLUICE_SOAK_RPS`
//! (default 200), `SLUICE_SOAK_WARMUP_SECS` (default 60, or a tenth of the
//! run if that is shorter), `SLUICE_SOAK_SAMPLE_SECS` (default 5).
//!
//! The mix, chosen per request by a fixed pseudo-random sequence:
//! - hits: one of a few dozen repeated bodies, streamed or not;
//! - misses: bodies never sent before, with answers of 1–16 KiB, so the small
//!   cache (`cache.max_bytes` = 4 MiB) fills within seconds and then evicts
//!   all the time;
//! - streams read to `[DONE]`, new or replayed from the cache;
//! - abandoned streams: the client reads a few events and drops the
//!   connection while upstream is still sending;
//! - coalesced: three identical new requests at once;
//! - `no-store` bypasses;
//! - 429s: a second tenant with a tight request limit, sending well over it.
//!
//! Every answer is checked (status, `x-sluice-cache`, a stream's `[DONE]` and
//! the absence of an error event); anything unexpected other than the tight
//! tenant's 429 is counted by kind and reported. Sluice's RSS (`VmRSS`),
//! open file descriptors and CPU time are sampled every few seconds.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

const KEY: &str = "sk-sluice-soak-0123456789abcdefghijklmnopqrstuvwxyz";
const TIGHT_KEY: &str = "sk-sluice-soak-tight-0123456789abcdefghijklmnopqrst";
/// Repeated bodies: the hit set. Few enough that each stays hot in the
/// cache while unique misses churn through it.
const HOT: u64 = 40;
/// Requests in flight past which the generator counts a request as dropped
/// rather than let a stalled gateway turn the run into a fork bomb.
const MAX_IN_FLIGHT: u64 = 2_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wait_line(r: &mut impl BufRead, needle: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("process ended before printing {needle:?}");
        }
        if line.contains(needle) {
            return line.trim().to_string();
        }
    }
}

/// Sluice's log lines at warn or above, by message, so the report can say
/// what the gateway itself complained about.
type LogCounts = Arc<Mutex<BTreeMap<String, u64>>>;

fn watch_log(r: impl BufRead + Send + 'static, counts: LogCounts) {
    std::thread::spawn(move || {
        for line in r.lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let level = v["level"].as_str().unwrap_or("");
            if level == "WARN" || level == "ERROR" {
                let msg = v["message"].as_str().unwrap_or("?");
                let key = format!("{level} {msg}");
                *counts.lock().expect("lock").entry(key).or_default() += 1;
            }
        }
    });
}

fn drain(r: impl BufRead + Send + 'static) {
    std::thread::spawn(move || for _ in r.lines() {});
}

fn start_simulator() -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .env("TOKIO_WORKER_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn simulator");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let url = wait_line(&mut out, "simulator listening on")
        .rsplit(' ')
        .next()
        .expect("url")
        .to_string();
    drain(out);
    (Proc(child), url)
}

fn start_sluice(
    upstream: &str,
    dir: &std::path::Path,
    log: LogCounts,
) -> (Proc, SocketAddr, SocketAddr) {
    let hash = |k: &str| hex::encode(Sha256::digest(k));
    let cfg = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "{upstream}"
api_key_env = ""
balance_poll_secs = 0
first_byte_timeout_secs = 30
idle_timeout_secs = 30
[cache]
enabled = true
max_bytes = 4194304
ttl_secs = 3600
[[tenants]]
name = "soak"
key_sha256 = ["{}"]
requests_per_minute = 0
tokens_per_minute = 0
max_concurrent = 0
[[tenants]]
name = "tight"
key_sha256 = ["{}"]
requests_per_minute = 60
request_burst = 2
tokens_per_minute = 0
max_concurrent = 0
"#,
        hash(KEY),
        hash(TIGHT_KEY)
    );
    let path = dir.join("soak.toml");
    std::fs::write(&path, cfg).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&path)
        .env("SLUICE_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,sluice=info,sluice::access=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    drain(BufReader::new(child.stdout.take().expect("stdout")));
    let line = wait_line(&mut err, "sluice listening");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
    watch_log(err, log);
    let addr = |k: &str| -> SocketAddr {
        v[k].as_str()
            .expect("address in the log line")
            .parse()
            .expect("addr")
    };
    (Proc(child), addr("listen"), addr("admin"))
}

/// One sample of the gateway process.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    cpu_ms: u64,
}

fn sample(pid: u32, at: Duration) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Sample {
        at,
        rss_kib,
        fds,
        cpu_ms: (num(11) + num(12)) * 10,
    }
}

/// What a request is, and so what its answer must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Hit,
    HitStream,
    Miss,
    Stream,
    Abandon,
    Coalesce,
    NoStore,
    Limited,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Hit => "hit",
            Kind::HitStream => "hit (stream)",
            Kind::Miss => "miss",
            Kind::Stream => "stream",
            Kind::Abandon => "abandoned stream",
            Kind::Coalesce => "coalesced (x3)",
            Kind::NoStore => "no-store",
            Kind::Limited => "tight tenant",
        }
    }

    /// The mix, in percent of requests.
    fn pick(r: u64) -> Kind {
        match r % 100 {
            0..=29 => Kind::Hit,
            30..=39 => Kind::HitStream,
            40..=59 => Kind::Miss,
            60..=71 => Kind::Stream,
            72..=81 => Kind::Abandon,
            82..=86 => Kind::Coalesce,
            87..=91 => Kind::NoStore,
            _ => Kind::Limited,
        }
    }
}

#[derive(Default)]
struct Tally {
    /// Requests sent, per kind.
    sent: BTreeMap<Kind, u64>,
    /// `x-sluice-cache` values seen, per kind.
    cache: BTreeMap<(Kind, String), u64>,
    /// The expected 429s of the tight tenant.
    limited: u64,
    /// Everything else that went wrong, by kind of error.
    errors: BTreeMap<String, u64>,
}

struct Shared {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    tally: Mutex<Tally>,
    in_flight: AtomicU64,
}

impl Shared {
    fn error(&self, what: impl Into<String>) {
        *self
            .tally
            .lock()
            .expect("lock")
            .errors
            .entry(what.into())
            .or_default() += 1;
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn body(content: &str, stream: bool) -> String {
    serde_json::json!({
        "model": "deepseek-chat",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
    })
    .to_string()
}

fn request(
    s: &Shared,
    key: &str,
    body: String,
    headers: &[(&str, String)],
) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{}/v1/chat/completions", s.addr))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::from(body))).expect("request")
}

/// Sends one request and checks its answer. `read_events`: for an abandoned
/// stream, how many body frames to read before dropping the connection.
async fn one(s: &Shared, kind: Kind, req: Request<Full<Bytes>>, abandon_after: Option<usize>) {
    let resp = match tokio::time::timeout(REQUEST_TIMEOUT, s.client.request(req)).await {
        Err(_) => return s.error(format!("{}: no response headers in 30 s", kind.label())),
        Ok(Err(e)) => {
            return s.error(format!(
                "{}: transport error before headers: {e}",
                kind.label()
            ))
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let cache = resp
        .headers()
        .get("x-sluice-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    if kind == Kind::Limited && status == StatusCode::TOO_MANY_REQUESTS {
        s.tally.lock().expect("lock").limited += 1;
        let _ = resp.into_body().collect().await;
        return;
    }
    *s.tally
        .lock()
        .expect("lock")
        .cache
        .entry((kind, cache.clone()))
        .or_default() += 1;
    if status != StatusCode::OK {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default();
        return s.error(format!("{}: status {status} {code}", kind.label()));
    }
    // Coalesced requests mix modes, so the answer's type says which it is.
    let stream = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    let mut frames = 0;
    let read = async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        seen.extend_from_slice(d);
                        frames += 1;
                        if abandon_after.is_some_and(|n| frames >= n) {
                            return Ok(true);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => s.error(format!("{}: body not finished in 30 s", kind.label())),
        Ok(Err(e)) => s.error(format!("{}: body broke: {e}", kind.label())),
        // Dropped on purpose, mid-stream: the connection goes with `body`.
        Ok(Ok(true)) => {}
        Ok(Ok(false)) if stream => {
            let text = String::from_utf8_lossy(&seen);
            if text.contains("upstream_stream_interrupted") || text.contains("\"error\"") {
                s.error(format!("{}: SSE error event", kind.label()));
            } else if !text.trim_end().ends_with("data: [DONE]") {
                s.error(format!("{}: stream ended without [DONE]", kind.label()));
            }
        }
        Ok(Ok(false)) => {
            if serde_json::from_slice::<serde_json::Value>(&seen)
                .ok()
                .and_then(|v| v.get("choices").cloned())
                .is_none()
            {
                s.error(format!("{}: not a completion", kind.label()));
            }
        }
    }
}

/// Starts one unit of traffic of `kind`. `n` makes a body unique.
fn launch(s: &Arc<Shared>, kind: Kind, n: u64, r: u64) {
    s.tally
        .lock()
        .expect("lock")
        .sent
        .entry(kind)
        .and_modify(|c| *c += 1)
        .or_insert(1);
    let answer = (1024 + (r % 15) * 1024).to_string();
    let fast = |extra: &[(&'static str, String)]| {
        let mut h = vec![("x-sim-answer-bytes", answer.clone())];
        h.extend_from_slice(extra);
        h
    };
    let unique = format!("soak {n}: say something about the number {n}.");
    let hot = format!("soak hot {}: say something about rivers.", r % HOT);
    let (reqs, abandon): (Vec<Request<Full<Bytes>>>, Option<usize>) = match kind {
        Kind::Hit => (vec![request(s, KEY, body(&hot, false), &fast(&[]))], None),
        Kind::HitStream => (vec![request(s, KEY, body(&hot, true), &fast(&[]))], None),
        Kind::Miss => (
            vec![request(s, KEY, body(&unique, false), &fast(&[]))],
            None,
        ),
        Kind::Stream => {
            let h = fast(&[
                ("x-sim-chunks", "20".into()),
                ("x-sim-chunk-delay-ms", "5".into()),
            ]);
            (vec![request(s, KEY, body(&unique, true), &h)], None)
        }
        Kind::Abandon => {
            let h = fast(&[
                ("x-sim-chunks", "50".into()),
                ("x-sim-chunk-delay-ms", "20".into()),
            ]);
            (vec![request(s, KEY, body(&unique, true), &h)], Some(3))
        }
        Kind::Coalesce => {
            let h = fast(&[("x-sim-latency-ms", "50".into())]);
            let reqs = (0..3)
                .map(|i| request(s, KEY, body(&unique, i == 1), &h))
                .collect();
            (reqs, None)
        }
        Kind::NoStore => {
            let h = fast(&[("cache-control", "no-store".into())]);
            (vec![request(s, KEY, body(&hot, false), &h)], None)
        }
        Kind::Limited => (
            vec![request(s, TIGHT_KEY, body(&unique, false), &fast(&[]))],
            None,
        ),
    };
    for req in reqs {
        if s.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            s.error("generator: request dropped, too many in flight");
            continue;
        }
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        let s = Arc::clone(s);
        tokio::spawn(async move {
            one(&s, kind, req, abandon).await;
            s.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn metric(client: &Client<HttpConnector, Full<Bytes>>, admin: SocketAddr, name: &str) -> f64 {
    let req = Request::get(format!("http://{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let Ok(resp) = client.request(req).await else {
        return f64::NAN;
    };
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let secs = env_secs("SLUICE_SOAK_SECS", 600).max(10);
    let rps = env_secs("SLUICE_SOAK_RPS", 200).max(1);
    let warmup = Duration::from_secs(
        env_secs("SLUICE_SOAK_WARMUP_SECS", 60)
            .min(secs / 10)
            .max(5),
    );
    let every = Duration::from_secs(env_secs("SLUICE_SOAK_SAMPLE_SECS", 5).max(1));
    let total = Duration::from_secs(secs);

    let dir = std::env::temp_dir().join(format!("sluice-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let (_sim, sim_url) = start_simulator();
    let log: LogCounts = Arc::default();
    let (gw, addr, admin) = start_sluice(&sim_url, &dir, Arc::clone(&log));
    let pid = gw.0.id();
    println!(
        "soak: {secs} s at {rps} req/s, warm-up {} s, RSS sampled every {} s; sluice pid {pid}",
        warmup.as_secs(),
        every.as_secs()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let shared = Arc::new(Shared {
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http(),
        addr,
        tally: Mutex::default(),
        in_flight: AtomicU64::new(0),
    });
    let admin_client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    let samples = rt.block_on(async {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rps as f64);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut next_sample = Duration::ZERO;
        let mut samples = Vec::new();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut n = 0u64;
        let mut last_report = Duration::ZERO;
        while start.elapsed() < total {
            ticker.tick().await;
            let r = xorshift(&mut rng);
            n += 1;
            launch(&shared, Kind::pick(r >> 32), n, r);
            let at = start.elapsed();
            if at >= next_sample {
                let s = sample(pid, at);
                samples.push(s);
                next_sample += every;
                if at - last_report >= Duration::from_secs(60) || last_report.is_zero() {
                    last_report = at;
                    let errors: u64 = shared.tally.lock().expect("lock").errors.values().sum();
                    println!(
                        "  {:>4} s: RSS {:.1} MiB, fds {}, in flight {}, errors {errors}",
                        at.as_secs(),
                        mib(s.rss_kib),
                        s.fds,
                        shared.in_flight.load(Ordering::Relaxed)
                    );
                }
            }
        }
        // Let what is in flight finish (bounded by the request timeouts).
        let drain_until = Instant::now() + REQUEST_TIMEOUT * 2;
        while shared.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        samples.push(sample(pid, start.elapsed()));
        let entries = metric(&admin_client, admin, "sluice_cache_entries").await;
        let bytes = metric(&admin_client, admin, "sluice_cache_bytes").await;
        let estimated = metric(&admin_client, admin, "sluice_usage_estimated_total").await;
        println!(
            "cache at the end: {entries} entries, {:.2} MiB; requests metered by estimate: {estimated}",
            bytes / 1024.0 / 1024.0
        );
        samples
    });

    report(
        &samples,
        warmup,
        &shared.tally.lock().expect("lock"),
        &log.lock().expect("lock"),
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

fn report(samples: &[Sample], warmup: Duration, tally: &Tally, log: &BTreeMap<String, u64>) {
    let sent: u64 = tally.sent.values().sum();
    println!("\n| traffic | requests started | x-sluice-cache seen |");
    println!("|---|---|---|");
    for (kind, count) in &tally.sent {
        let seen: Vec<String> = tally
            .cache
            .iter()
            .filter(|((k, _), _)| k == kind)
            .map(|((_, c), n)| format!("{c} {n}"))
            .collect();
        let seen = if *kind == Kind::Limited {
            format!("429 {}; {}", tally.limited, seen.join(", "))
        } else {
            seen.join(", ")
        };
        println!("| {} | {count} | {seen} |", kind.label());
    }
    println!("| all | {sent} | |");

    // RSS after warm-up: the mean of the samples in the minute (or the
    // tenth of the run) after it; at the end: the mean of the same number of
    // last samples. A mean over several samples keeps one allocation burst
    // from deciding the verdict.
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= warmup).collect();
    let window = (after.len() / 10).clamp(1, 12);
    let mean =
        |xs: &[&Sample]| xs.iter().map(|s| s.rss_kib).sum::<u64>() as f64 / xs.len().max(1) as f64;
    let early = mean(&after[..window.min(after.len())]);
    let late = mean(&after[after.len().saturating_sub(window)..]);
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let change = (late - early) / early.max(1.0) * 100.0;
    let first_fds = after.first().map_or(0, |s| s.fds);
    let last_fds = samples.last().map_or(0, |s| s.fds);
    let cpu_s = samples.last().map_or(0, |s| s.cpu_ms) as f64 / 1000.0;
    println!(
        "\nRSS after warm-up {:.1} MiB, at the end {:.1} MiB: {change:+.1} % (target: within ±5 %: {}); peak {:.1} MiB",
        early / 1024.0,
        late / 1024.0,
        if change.abs() <= 5.0 { "met" } else { "MISSED" },
        mib(peak)
    );
    println!("open fds after warm-up {first_fds}, at the end {last_fds}; sluice CPU {cpu_s:.1} s");
    println!("\nRSS by minute (MiB):");
    let mut line = String::new();
    for s in samples.iter().filter(|s| s.at.as_secs() % 60 < 5) {
        line.push_str(&format!(" {}m {:.1};", s.at.as_secs() / 60, mib(s.rss_kib)));
    }
    println!("{line}");

    println!("\nnon-429 errors, by kind:");
    if tally.errors.is_empty() {
        println!("  none");
    }
    for (what, n) in &tally.errors {
        println!("  {n:>6}  {what}");
    }
    println!("tight tenant's 429s (expected): {}", tally.limited);
    println!("\nsluice's own warn/error log lines:");
    if log.is_empty() {
        println!("  none");
    }
    for (what, n) in log {
        println!("  {n:>6}  {what}");
    }
}
