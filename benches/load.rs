//! Load benchmark: what a Sluice hop costs, side by side with hitting the
//! simulated upstream directly and with a plain nginx `proxy_pass` hop, in
//! one run on one machine. Run with `benches/load.sh` (raises the fd limit,
//! then `cargo bench --bench load`). Method and latest figures:
//! benches/README.md.
//!
//! The proxy under test is pinned to core 0 (one worker thread); the load
//! generator and the simulator share core 1, so per-core figures compare.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

const KEY: &str = "sk-sluice-bench-0123456789abcdefghijklmnopqrstuvwxyz";
const BODY: &str = r#"{"model":"deepseek-chat","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write one sentence about rivers."}]}"#;

struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// utime + stime of the process and its children (nginx's workers),
    /// in microseconds.
    fn cpu_us(&self) -> u64 {
        cpu_ticks(self.pid()) * 1_000_000 / 100
    }
    /// Peak RSS (VmHWM) in KiB, and the current RSS.
    fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let get = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (get("VmHWM:"), get("VmRSS:"))
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // After the name: state ppid pgrp session tty tpgid flags minflt cminflt
    // majflt cmajflt utime stime.
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let own = num(11) + num(12);
    let children: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .map(cpu_ticks)
        .sum();
    own + children
}

/// Busy fraction of each core over a closure, from /proc/stat.
fn core_busy<R>(f: impl FnOnce() -> R) -> (R, Vec<f64>) {
    let read = || -> Vec<(u64, u64)> {
        std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .map(|l| {
                let v: Vec<u64> = l
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                (v.iter().sum(), idle)
            })
            .collect()
    };
    let a = read();
    let r = f();
    let b = read();
    let busy = a
        .iter()
        .zip(&b)
        .map(|((t0, i0), (t1, i1))| 1.0 - (i1 - i0) as f64 / ((t1 - t0).max(1)) as f64)
        .collect();
    (r, busy)
}

fn spawn(
    name: &'static str,
    core: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (
    Proc,
    BufReader<std::process::ChildStderr>,
    BufReader<std::process::ChildStdout>,
) {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(core)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let err = BufReader::new(child.stderr.take().expect("stderr"));
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    (Proc { child, name }, err, out)
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

/// Keeps reading a child's pipe so it never blocks on a full pipe.
fn drain(r: impl BufRead + Send + 'static) {
    std::thread::spawn(move || for _ in r.lines() {});
}

/// Limits for the limited rows: all three set, so high that no request is
/// ever refused, so that the row measures what keeping them costs.
const BENCH_LIMITS: &str = "requests_per_minute = 100000000
request_burst = 100000000
tokens_per_minute = 1000000000000
max_concurrent = 100000";

const NO_LIMITS: &str = "requests_per_minute = 0
tokens_per_minute = 0
max_concurrent = 0";

/// A Sluice under test. `limits` sets the tenant's limits (`BENCH_LIMITS`);
/// `redis` (a port) shares them through that Redis.
fn start_sluice(
    name: &'static str,
    upstream: &str,
    cache: bool,
    limits: bool,
    redis: Option<u16>,
    tmp: &std::path::Path,
) -> (Proc, SocketAddr) {
    let redis_section = redis.map_or(String::new(), |port| {
        format!("[redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n")
    });
    let cfg = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "{upstream}"
api_key_env = ""
balance_poll_secs = 0
first_byte_timeout_secs = 3600
idle_timeout_secs = 3600
[cache]
enabled = {cache}
{redis_section}
[[tenants]]
name = "bench"
key_sha256 = ["{}"]
{}
"#,
        hex::encode(Sha256::digest(KEY)),
        if limits { BENCH_LIMITS } else { NO_LIMITS }
    );
    let path = tmp.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).expect("write config");
    let (p, mut err, out) = spawn(
        name,
        "0",
        &[
            env!("CARGO_BIN_EXE_sluice"),
            "--config",
            path.to_str().expect("path"),
        ],
        &[
            ("SLUICE_LOG_FORMAT", "json"),
            ("RUST_LOG", "warn,sluice=info,sluice::access=off"),
            ("TOKIO_WORKER_THREADS", "1"),
        ],
    );
    let line = wait_line(&mut err, "sluice listening");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
    drain(err);
    drain(out);
    (
        p,
        v["listen"].as_str().expect("listen").parse().expect("addr"),
    )
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn find_exe(candidates: &[&'static str]) -> Option<&'static str> {
    candidates
        .iter()
        .copied()
        .find(|p| std::path::Path::new(p).exists())
}

/// A throwaway redis-server on a free loopback port, no persistence, pinned
/// to core 0 with the proxy (see benches/README.md).
struct Redis {
    proc_: Proc,
    port: u16,
    cli: &'static str,
}

fn start_redis(tmp: &std::path::Path) -> Result<Redis, String> {
    let Some(server) = find_exe(&["/usr/bin/redis-server", "/usr/local/bin/redis-server"]) else {
        return Err("redis-server is not installed (apt-get install redis-server)".into());
    };
    let Some(cli) = find_exe(&["/usr/bin/redis-cli", "/usr/local/bin/redis-cli"]) else {
        return Err("redis-cli is not installed (apt-get install redis-tools)".into());
    };
    let port = free_port()?;
    let port_s = port.to_string();
    let dir = tmp.display().to_string();
    let (p, err, out) = spawn(
        "redis",
        "0",
        &[
            server,
            "--port",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
        ],
        &[],
    );
    drain(err);
    drain(out);
    let r = Redis {
        proc_: p,
        port,
        cli,
    };
    for _ in 0..300 {
        if r.info("server").contains("redis_version") {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("redis-server did not start".into())
}

impl Redis {
    fn info(&self, section: &str) -> String {
        Command::new(self.cli)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "INFO",
                section,
            ])
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
    /// EVALSHA + EVAL so far: calls, failed calls (NOSCRIPT on a script's
    /// first use), and Redis's own time in them (µs); and all commands
    /// but INFO, those the scripts run included.
    fn command_calls(&self) -> [u64; 4] {
        let info = self.info("commandstats");
        let mut out = [0; 4];
        for line in info.lines() {
            let Some((name, rest)) = line.trim().split_once(':') else {
                continue;
            };
            let Some(cmd) = name.strip_prefix("cmdstat_") else {
                continue;
            };
            let field = |k: &str| -> u64 {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if cmd == "evalsha" || cmd == "eval" {
                out[0] += field("calls=");
                out[1] += field("failed_calls=");
                out[2] += field("usec=");
            }
            if cmd != "info" {
                out[3] += field("calls=");
            }
        }
        out
    }
    /// Reads Redis has processed from its clients (`total_reads_processed`):
    /// a pipelined batch of commands is one read, so this counts round trips.
    fn reads(&self) -> u64 {
        self.info("stats")
            .lines()
            .find_map(|l| l.trim().strip_prefix("total_reads_processed:"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn start_nginx(upstream: SocketAddr, tmp: &std::path::Path) -> Result<(Proc, SocketAddr), String> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(nginx) = nginx else {
        return Err("nginx is not installed (apt-get install nginx-light)".into());
    };
    let port = free_port()?;
    let conf = format!(
        r#"
worker_processes 1;
daemon off;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 65536; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    upstream sim {{ server {upstream}; keepalive 256; keepalive_requests 10000000; }}
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#,
        tmp = tmp.display()
    );
    let path = tmp.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let (p, err, out) = spawn(
        "nginx",
        "0",
        &[
            nginx,
            "-c",
            path.to_str().unwrap_or_default(),
            "-p",
            &tmp.display().to_string(),
        ],
        &[],
    );
    drain(err);
    drain(out);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok((p, addr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("nginx did not start".into())
}

fn request(addr: SocketAddr, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    // hyper's connection-level client does not add Host; nginx insists on it.
    let mut b = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .expect("request")
}

fn stream_request(addr: SocketAddr) -> Request<Full<Bytes>> {
    let body = BODY.replacen('{', r#"{"stream":true,"#, 1);
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .header("x-sim-chunks", "20")
        .header("x-sim-chunk-delay-ms", "5")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).ok();
    let (send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    send
}

/// Closed loop: `conns` connections each sending back to back for `dur`.
async fn throughput(addr: SocketAddr, conns: usize, dur: Duration) -> u64 {
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut send = connect(addr).await;
            while Instant::now() < deadline {
                if send.ready().await.is_err() {
                    send = connect(addr).await;
                }
                let resp = match send.send_request(request(addr, &[])).await {
                    Ok(r) => r,
                    Err(_) => {
                        send = connect(addr).await;
                        continue;
                    }
                };
                assert!(resp.status().is_success(), "status {}", resp.status());
                resp.into_body().collect().await.expect("body");
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total
}

/// Requests `fixed_rate` sends before it measures.
const FIXED_RATE_WARM: u64 = 32;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Open loop at a fixed rate. Latency is counted from the moment the request
/// is handed to the client: tokio's timer has millisecond granularity, so
/// counting from the scheduled time would add up to 1 ms of timer jitter to
/// every target alike and drown the differences being measured.
async fn fixed_rate(addr: SocketAddr, rate: u64, dur: Duration) -> (Duration, Duration) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    // Warm the pool.
    for _ in 0..FIXED_RATE_WARM {
        let r = client.request(request(addr, &[])).await.expect("warm");
        r.into_body().collect().await.expect("body");
    }
    let n = rate * dur.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + interval * i as u32;
        tokio::time::sleep_until(at.into()).await;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = client.request(request(addr, &[])).await.expect("response");
            r.into_body().collect().await.expect("body");
            t0.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    for t in tasks {
        lat.push(t.await.expect("task"));
    }
    lat.sort();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

type StreamClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Reads one stream to its end: (time to the first data event, total time).
async fn one_stream(client: &StreamClient, addr: SocketAddr) -> (Duration, Duration) {
    let t0 = Instant::now();
    let resp = client
        .request(stream_request(addr))
        .await
        .expect("response");
    let mut body: Incoming = resp.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if frame
            .data_ref()
            .is_some_and(|d| d.windows(5).any(|w| w == b"data:"))
        {
            first.get_or_insert_with(|| t0.elapsed());
        }
    }
    (first.expect("an event"), t0.elapsed())
}

/// Stream latencies of one target: first event (32 concurrent), whole
/// stream (32 concurrent), first event (one at a time).
#[derive(Default)]
struct StreamTimes {
    first: Vec<Duration>,
    total: Vec<Duration>,
    lone: Vec<Duration>,
}

/// `rounds` rounds; in each, every target in turn gets 32 concurrent streams
/// of 20 chunks 5 ms apart, then 10 streams one at a time. Targets are
/// interleaved round by round, so drift on a shared machine hits them alike.
async fn streams(targets: &[SocketAddr], rounds: usize) -> Vec<StreamTimes> {
    let clients: Vec<StreamClient> = targets
        .iter()
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build_http()
        })
        .collect();
    let mut times: Vec<StreamTimes> = targets.iter().map(|_| StreamTimes::default()).collect();
    for _ in 0..rounds {
        for ((addr, client), t) in targets.iter().zip(&clients).zip(&mut times) {
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let (client, addr) = (client.clone(), *addr);
                tasks.push(tokio::spawn(async move { one_stream(&client, addr).await }));
            }
            for task in tasks {
                let (f, all) = task.await.expect("task");
                t.first.push(f);
                t.total.push(all);
            }
            for _ in 0..10 {
                t.lone.push(one_stream(client, *addr).await.0);
            }
        }
    }
    for t in &mut times {
        t.first.sort();
        t.total.sort();
        t.lone.sort();
    }
    times
}

/// Holds `n` idle streams open through Sluice and reports its RSS.
async fn idle_streams(addr: SocketAddr, proxy: &Proc, n: usize) -> (usize, u64) {
    let mut held = Vec::with_capacity(n);
    let body = BODY.replacen('{', r#"{"stream":true,"#, 1);
    for i in 0..n {
        let Ok(stream) = TcpStream::connect(addr).await else {
            break;
        };
        let Ok((mut send, conn)) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
        else {
            break;
        };
        tokio::spawn(conn);
        let req = Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {KEY}"))
            .header("x-sim-hang", "body")
            .header("x-sim-keepalive", "1")
            .header("cache-control", "no-store")
            .header("x-request-id", format!("idle-{i}"))
            .body(Full::new(Bytes::from(body.clone())))
            .expect("request");
        match send.send_request(req).await {
            Ok(resp) => held.push((send, resp)),
            Err(_) => break,
        }
    }
    let opened = held.len();
    let (_, rss) = proxy.rss_kib();
    drop(held);
    (opened, rss)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument "quick" shortens runs.
    let quick = std::env::args().any(|a| a == "quick");
    let dur = Duration::from_secs(if quick { 2 } else { 5 });
    let idle_n: usize = std::env::var("SLUICE_BENCH_IDLE_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // The load generator shares core 1 with the simulator.
    let _ = Command::new("taskset")
        .args(["-cp", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let tmp = std::env::temp_dir().join(format!("sluice-load-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");

    let (sim, _, mut out) = spawn(
        "simulator",
        "1",
        &[
            env!("CARGO_BIN_EXE_sluice"),
            "simulate",
            "--listen",
            "127.0.0.1:0",
        ],
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    let sim_url = wait_line(&mut out, "simulator listening on")
        .rsplit(' ')
        .next()
        .expect("url")
        .to_string();
    drain(out);
    let sim_addr: SocketAddr = sim_url.trim_start_matches("http://").parse().expect("addr");
    let _ = &sim;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows: Vec<(String, Option<&Proc>, SocketAddr)> = Vec::new();
    let (miss, miss_addr) = start_sluice("sluice-miss", &sim_url, false, false, None, &tmp);
    let (limited, limited_addr) =
        start_sluice("sluice-miss-limits", &sim_url, false, true, None, &tmp);
    let (hit, hit_addr) = start_sluice("sluice-hit", &sim_url, true, false, None, &tmp);
    let nginx = start_nginx(sim_addr, &tmp);
    let redis = start_redis(&tmp);
    let shared = redis.as_ref().ok().map(|r| {
        start_sluice(
            "sluice-miss-redis",
            &sim_url,
            false,
            true,
            Some(r.port),
            &tmp,
        )
    });
    rows.push(("direct".into(), None, sim_addr));
    match &nginx {
        Ok((p, addr)) => rows.push(("nginx".into(), Some(p), *addr)),
        Err(reason) => println!("nginx row skipped: {reason}"),
    }
    rows.push(("sluice-miss".into(), Some(&miss), miss_addr));
    rows.push(("sluice-miss-limits".into(), Some(&limited), limited_addr));
    match &shared {
        Some((p, addr)) => rows.push(("sluice-miss-redis".into(), Some(p), *addr)),
        None => println!(
            "sluice-miss-redis row skipped: {}",
            redis.as_ref().err().map_or("", String::as_str)
        ),
    }
    rows.push(("sluice-hit".into(), Some(&hit), hit_addr));
    // Warm the hit path's one entry.
    rt.block_on(async {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let r = client.request(request(hit_addr, &[])).await.expect("warm");
        r.into_body().collect().await.expect("body");
    });

    println!("\n| target | req/s @64 conns | CPU µs/req (proxy) | core 0 / core 1 busy | p50 ms @500 rps | p99 ms @500 rps | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    // Redis's own counters, from before the first request of the Redis row
    // to after its last settlement.
    let redis_ok = redis.as_ref().ok().filter(|_| shared.is_some());
    let redis_before = redis_ok.map(|r| (r.command_calls(), r.reads()));
    let mut redis_cpu_us = 0u64;
    // Requests the Redis row served: closed loop, fixed rate, warm-ups.
    let mut redis_row_requests = 0u64;
    // Of these, the closed-loop ones (over which Redis's CPU is taken).
    let mut redis_closed_requests = 0u64;
    // Throughput in `REPS` passes over the targets, round robin, so drift on
    // a shared machine hits every target alike; requests, CPU time and busy
    // fractions are summed over the passes.
    const REPS: usize = 3;
    const RATE: u64 = 500;
    let mut sums: Vec<(u64, u64, Vec<f64>)> = rows.iter().map(|_| (0, 0, Vec::new())).collect();
    for _ in 0..REPS {
        for ((name, proc_, addr), sum) in rows.iter().zip(&mut sums) {
            let redis_here = redis_ok.filter(|_| name == "sluice-miss-redis");
            let cpu0 = proc_.map(Proc::cpu_us).unwrap_or(0);
            let rcpu0 = redis_here.map(|r| r.proc_.cpu_us()).unwrap_or(0);
            let (done, busy) = core_busy(|| rt.block_on(throughput(*addr, 64, dur)));
            sum.0 += done;
            sum.1 += proc_.map(Proc::cpu_us).unwrap_or(0) - cpu0;
            if let Some(r) = redis_here {
                redis_cpu_us += r.proc_.cpu_us() - rcpu0;
                redis_row_requests += done;
                redis_closed_requests += done;
            }
            sum.2.resize(busy.len(), 0.0);
            for (s, b) in sum.2.iter_mut().zip(&busy) {
                *s += b / REPS as f64;
            }
        }
    }
    let mut results = Vec::new();
    for ((name, proc_, addr), (done, cpu_us, busy)) in rows.iter().zip(&sums) {
        let cpu = proc_.map(|_| *cpu_us as f64 / *done as f64);
        let rps = *done as f64 / (dur.as_secs_f64() * REPS as f64);
        let (p50, p99) = rt.block_on(fixed_rate(*addr, RATE, dur));
        if name == "sluice-miss-redis" {
            redis_row_requests += RATE * dur.as_secs() + FIXED_RATE_WARM;
        }
        let rss = proc_.map(|p| p.rss_kib().0 as f64 / 1024.0);
        println!(
            "| {name} | {rps:.0} | {} | {:.0}% / {:.0}% | {} | {} | {} |",
            cpu.map_or("-".into(), |c| format!("{c:.1}")),
            busy.first().unwrap_or(&0.0) * 100.0,
            busy.get(1).unwrap_or(&0.0) * 100.0,
            ms(p50),
            ms(p99),
            rss.map_or("-".into(), |r| format!("{r:.1}"))
        );
        results.push((name.clone(), rps, cpu, p50, p99));
    }
    let base = |n: &str| results.iter().find(|r| r.0 == n).cloned();
    if let (Some(direct), Some(miss)) = (base("direct"), base("sluice-miss")) {
        println!(
            "\nsluice-miss: {:.2}× direct req/s; added p50 {} ms, added p99 {} ms",
            miss.1 / direct.1,
            ms(miss.3.saturating_sub(direct.3)),
            ms(miss.4.saturating_sub(direct.4))
        );
        if let Some(ng) = base("nginx") {
            println!(
                "nginx: added p50 {} ms, p99 {} ms; sluice-miss/nginx: req/s {:.2}×, CPU/req {:.2}×",
                ms(ng.3.saturating_sub(direct.3)),
                ms(ng.4.saturating_sub(direct.4)),
                miss.1 / ng.1,
                miss.2.unwrap_or(0.0) / ng.2.unwrap_or(f64::NAN)
            );
        }
        if let Some(hit) = base("sluice-hit") {
            println!("sluice-hit: {:.2}× direct req/s", hit.1 / direct.1);
        }
        if let Some(lim) = base("sluice-miss-limits") {
            println!(
                "sluice-miss-limits: added p50 {} ms; vs sluice-miss: req/s {:.2}×, CPU/req {:.2}×",
                ms(lim.3.saturating_sub(direct.3)),
                lim.1 / miss.1,
                lim.2.unwrap_or(0.0) / miss.2.unwrap_or(f64::NAN)
            );
            if let (Some(red), Some(r), Some((c0, n0))) =
                (base("sluice-miss-redis"), redis_ok, redis_before)
            {
                // Let the last settlements land.
                std::thread::sleep(Duration::from_millis(200));
                let (c1, n1) = (r.command_calls(), r.reads());
                let d = |i: usize| c1[i] - c0[i];
                let reqs = redis_row_requests.max(1) as f64;
                let cpu_ratio = red.2.unwrap_or(0.0) / lim.2.unwrap_or(f64::NAN);
                let rps_ratio = red.1 / lim.1;
                let evals = d(0) as f64 / reqs;
                let p50_more = red.3.as_secs_f64() * 1000.0 - lim.3.as_secs_f64() * 1000.0;
                let met = |ok: bool| if ok { "met" } else { "NOT met" };
                println!(
                    "sluice-miss-redis: added p50 {} ms; Redis CPU {:.1} µs/req; \
                     EVALSHA+EVAL {evals:.3}/req ({} calls, {} failed, {:.1} µs/req inside Redis), \
                     all commands incl. those run by scripts {:.2}/req, \
                     Redis reads (round trips, batched) {:.3}/req; over {redis_row_requests} requests",
                    ms(red.3.saturating_sub(direct.3)),
                    redis_cpu_us as f64 / redis_closed_requests.max(1) as f64,
                    d(0),
                    d(1),
                    d(2) as f64 / reqs,
                    d(3) as f64 / reqs,
                    (n1 - n0) as f64 / reqs,
                );
                println!(
                    "  vs sluice-miss-limits: CPU/req {cpu_ratio:.2}× (≤ 1.3×: {}); \
                     req/s {rps_ratio:.2}× (≥ 0.7×: {}); p50 {p50_more:+.3} ms (≤ +0.15: {}); \
                     EVALSHA+EVAL per miss {evals:.3} (≤ 2: {})",
                    met(cpu_ratio <= 1.3),
                    met(rps_ratio >= 0.7),
                    met(p50_more <= 0.15),
                    met(evals <= 2.0),
                );
            }
        }
    }

    println!("\n| streams (32 concurrent, 20 chunks 5 ms apart) | first event p50 ms | first event p99 ms | whole stream p50 ms | one stream at a time: first event p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    let rounds = if quick { 5 } else { 20 };
    let mut stream_rows = vec![("direct", sim_addr), ("sluice-stream", miss_addr)];
    if let Ok((_, addr)) = &nginx {
        stream_rows.insert(1, ("nginx", *addr));
    }
    let addrs: Vec<SocketAddr> = stream_rows.iter().map(|r| r.1).collect();
    let times = rt.block_on(streams(&addrs, rounds));
    for ((name, _), t) in stream_rows.iter().zip(&times) {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            ms(percentile(&t.first, 0.5)),
            ms(percentile(&t.first, 0.99)),
            ms(percentile(&t.total, 0.5)),
            ms(percentile(&t.lone, 0.5)),
            ms(percentile(&t.lone, 0.99))
        );
    }

    if idle_n > 0 {
        let (opened, rss) = rt.block_on(idle_streams(miss_addr, &miss, idle_n));
        println!(
            "\nidle streams held open through sluice: {opened} of {idle_n}, RSS {:.1} MiB",
            rss as f64 / 1024.0
        );
    }
    for p in [&miss, &limited, &hit]
        .into_iter()
        .chain(shared.as_ref().map(|s| &s.0))
    {
        let (hwm, _) = p.rss_kib();
        println!("{} peak RSS: {:.1} MiB", p.name, hwm as f64 / 1024.0);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
