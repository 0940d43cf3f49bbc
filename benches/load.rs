//! Load benchmark: what a Sluice hop costs, side by side with hitting the
//! simulated upstream directly and with a plain nginx `proxy_pass` hop, in
//! one run on one machine. Run with `benches/load.sh` (raises the fd limit,
//! then `cargo bench --bench load`). Method and latest figures:
//! benches/README.md.
//!
//! The proxy under test is pinned to core 0 (one worker thread); the load
//! generator and the simulator share core 1, so per-core figures compare.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// The same request in Anthropic's Messages API, for the Messages rows.
const MESSAGES_BODY: &str = r#"{"model":"deepseek-chat","max_tokens":256,"system":"You are a helpful assistant.","messages":[{"role":"user","content":"Write one sentence about rivers."}]}"#;

/// Where `BODY` is made distinct: a tag and a number go after this.
const BODY_SPLIT: &str = "rivers.";

/// The request bodies a row sends.
#[derive(Clone)]
enum Bodies {
    /// `BODY`, every time.
    Fixed,
    /// `MESSAGES_BODY` to `/v1/messages`, every time.
    Messages,
    /// `BODY` with ` #<tag><n>` in its user message, `n` counting up from a
    /// shared counter until `end` (exclusive): every request distinct, and
    /// the same sequence reproducible (so one replica can fill Redis with
    /// the answers another then reads).
    Distinct {
        tag: &'static str,
        next: Arc<AtomicU64>,
        end: Arc<AtomicU64>,
    },
}

impl Bodies {
    fn distinct(tag: &'static str, start: u64, end: u64) -> Bodies {
        Bodies::Distinct {
            tag,
            next: Arc::new(AtomicU64::new(start)),
            end: Arc::new(AtomicU64::new(end)),
        }
    }
    /// The next body; `None` once a distinct sequence is used up.
    fn next(&self) -> Option<Bytes> {
        match self {
            Bodies::Fixed => Some(Bytes::from_static(BODY.as_bytes())),
            Bodies::Messages => Some(Bytes::from_static(MESSAGES_BODY.as_bytes())),
            Bodies::Distinct { tag, next, end } => {
                let end = end.load(Ordering::Relaxed);
                let n = next
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n < end).then_some(n + 1)
                    })
                    .ok()?;
                Some(Bytes::from(distinct_body(tag, n)))
            }
        }
    }
    /// The path the bodies go to.
    fn path(&self) -> &'static str {
        match self {
            Bodies::Messages => "/v1/messages",
            Bodies::Fixed | Bodies::Distinct { .. } => "/v1/chat/completions",
        }
    }
    /// Lets a distinct sequence run on from `from` (if it has not passed it)
    /// for `count` more bodies.
    fn window(&self, from: u64, count: u64) {
        if let Bodies::Distinct { next, end, .. } = self {
            let at = next.load(Ordering::Relaxed).max(from);
            next.store(at, Ordering::Relaxed);
            end.store(at + count, Ordering::Relaxed);
        }
    }
}

fn distinct_body(tag: &str, n: u64) -> String {
    let (head, tail) = BODY.split_at(BODY.find(BODY_SPLIT).expect("split") + BODY_SPLIT.len());
    format!("{head} #{tag}{n}{tail}")
}

struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    /// Kills the process and its children (nginx's worker would outlive a
    /// killed master).
    fn drop(&mut self) {
        let children = children(self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in children {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
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
    num(11) + num(12) + children(pid).into_iter().map(cpu_ticks).sum::<u64>()
}

/// The live child processes of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
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
    name: &str,
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
    (
        Proc {
            child,
            name: name.to_string(),
        },
        err,
        out,
    )
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

/// The same limits without a concurrency cap: with Redis, such a tenant is
/// decided from the replica's share of its limits (docs/redis.md "Shared
/// limits").
const SHARE_LIMITS: &str = "requests_per_minute = 100000000
request_burst = 100000000
tokens_per_minute = 1000000000000
max_concurrent = 0";

const NO_LIMITS: &str = "requests_per_minute = 0
tokens_per_minute = 0
max_concurrent = 0";

/// A build of Sluice under test: this tree's (HEAD), or another one
/// (`SLUICE_BENCH_BASELINE_BIN`) whose rows run interleaved with HEAD's.
struct Build {
    bin: String,
    /// After a row's name: "" for HEAD, "@base" for the baseline.
    suffix: &'static str,
    /// The Redis database of its Sluices, so that two builds never read
    /// each other's keys (whose layout may differ between them).
    db: u8,
}

impl Build {
    fn head() -> Build {
        Build {
            bin: env!("CARGO_BIN_EXE_sluice").to_string(),
            suffix: "",
            db: 0,
        }
    }
    fn baseline(bin: String) -> Build {
        assert!(
            std::path::Path::new(&bin).is_file(),
            "SLUICE_BENCH_BASELINE_BIN: no file at {bin}"
        );
        Build {
            bin,
            suffix: "@base",
            db: 1,
        }
    }
    fn is_baseline(&self) -> bool {
        !self.suffix.is_empty()
    }
    fn label(&self, name: &str) -> String {
        format!("{name}{}", self.suffix)
    }
}

/// A Sluice of `build` under test. `limits` sets the tenant's limits
/// (`BENCH_LIMITS`); `redis` (a port) shares them through that Redis.
fn start_sluice(
    build: &Build,
    name: &str,
    upstream: &str,
    cache: bool,
    limits: &str,
    redis: Option<u16>,
    tmp: &std::path::Path,
) -> Sluice {
    let name = build.label(name);
    let redis_section = redis.map_or(String::new(), |port| {
        format!("[redis]\nurl = \"redis://127.0.0.1:{port}/{}\"\n", build.db)
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
        limits
    );
    let path = tmp.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).expect("write config");
    let (p, mut err, out) = spawn(
        &name,
        "0",
        &[&build.bin, "--config", path.to_str().expect("path")],
        &[
            ("SLUICE_LOG_FORMAT", "json"),
            (
                "RUST_LOG",
                if access_log() {
                    "warn,sluice=info"
                } else {
                    "warn,sluice=info,sluice::access=off"
                },
            ),
            ("TOKIO_WORKER_THREADS", "1"),
        ],
    );
    let line = wait_line(&mut err, "sluice listening");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
    drain(err);
    drain(out);
    let addr = |k: &str| -> SocketAddr { v[k].as_str().expect(k).parse().expect("addr") };
    Sluice {
        addr: addr("listen"),
        admin: addr("admin"),
        proc_: p,
    }
}

struct Sluice {
    proc_: Proc,
    addr: SocketAddr,
    admin: SocketAddr,
}

/// The Redis counters of a Sluice's `/metrics` (round trips by op and
/// result, shared-cache lookups, local fallbacks), by series.
fn sluice_redis_metrics(admin: SocketAddr) -> BTreeMap<String, f64> {
    let mut text = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(admin) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n"
        );
        let _ = s.read_to_string(&mut text);
    }
    text.lines()
        .filter(|l| {
            l.starts_with("sluice_redis_operations_total")
                || l.starts_with("sluice_cache_shared_lookups_total")
                || l.starts_with("sluice_limits_local_fallback_total")
        })
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
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
    /// Every command but INFO so far (those scripts run included): calls,
    /// failed calls (e.g. NOSCRIPT on a script's first use) and Redis's own
    /// time in them (µs), by command.
    fn commands(&self) -> BTreeMap<String, [u64; 3]> {
        let info = self.info("commandstats");
        let mut out = BTreeMap::new();
        for line in info.lines() {
            let Some((name, rest)) = line.trim().split_once(':') else {
                continue;
            };
            let Some(cmd) = name.strip_prefix("cmdstat_") else {
                continue;
            };
            if cmd == "info" {
                continue;
            }
            let field = |k: &str| -> u64 {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            out.insert(
                cmd.to_string(),
                [field("calls="), field("failed_calls="), field("usec=")],
            );
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

/// What Redis and one Sluice had counted at one moment.
struct Snap {
    cmds: BTreeMap<String, [u64; 3]>,
    reads: u64,
    sluice: BTreeMap<String, f64>,
}

impl Redis {
    fn snap(&self, admin: SocketAddr) -> Snap {
        Snap {
            cmds: self.commands(),
            reads: self.reads(),
            sluice: sluice_redis_metrics(admin),
        }
    }
}

/// A Redis row's counts over its own phases only (the rows take turns, so
/// each row's Redis traffic is told apart by when it happened).
#[derive(Default)]
struct RedisTally {
    cmds: BTreeMap<String, [u64; 3]>,
    reads: u64,
    sluice: BTreeMap<String, f64>,
    /// Requests in the counted phases: closed loop, fixed rate, warm-ups.
    requests: u64,
    /// Of these, the closed-loop ones, over which Redis's CPU is taken.
    closed_requests: u64,
    /// Redis's utime + stime over the closed-loop phases, µs.
    cpu_us: u64,
}

impl RedisTally {
    fn add(&mut self, a: &Snap, b: &Snap, requests: u64) {
        for (k, v1) in &b.cmds {
            let v0 = a.cmds.get(k).copied().unwrap_or_default();
            let t = self.cmds.entry(k.clone()).or_default();
            for i in 0..3 {
                t[i] += v1[i] - v0[i];
            }
        }
        self.reads += b.reads - a.reads;
        for (k, v1) in &b.sluice {
            *self.sluice.entry(k.clone()).or_default() += v1 - a.sluice.get(k).unwrap_or(&0.0);
        }
        self.requests += requests;
    }
    /// Calls of these commands a request.
    fn per_req(&self, cmds: &[&str]) -> f64 {
        let n: u64 = cmds
            .iter()
            .filter_map(|c| self.cmds.get(*c))
            .map(|v| v[0])
            .sum();
        n as f64 / self.requests.max(1) as f64
    }
    /// Sluice's own count of its Redis round trips with `needle` in the
    /// series (e.g. `op="cache_get"`), a request.
    fn trips(&self, needle: &str) -> f64 {
        let n: f64 = self
            .sluice
            .iter()
            .filter(|(k, _)| k.starts_with("sluice_redis_operations_total") && k.contains(needle))
            .map(|(_, v)| v)
            .sum();
        n / self.requests.max(1) as f64
    }
    fn report(&self, name: &str) {
        let reqs = self.requests.max(1) as f64;
        let cmds: Vec<String> = self
            .cmds
            .iter()
            .filter(|(_, v)| v[0] > 0)
            .map(|(k, v)| {
                let failed = if v[1] > 0 {
                    format!(" ({} failed)", v[1])
                } else {
                    String::new()
                };
                format!("{k} {:.3}{failed}", v[0] as f64 / reqs)
            })
            .collect();
        let all: u64 = self.cmds.values().map(|v| v[0]).sum();
        let usec: u64 = self.cmds.values().map(|v| v[2]).sum();
        let trips: Vec<String> = ["limits", "cache_get", "cache_put", "coalesce"]
            .iter()
            .map(|op| (op, self.trips(&format!("op=\"{op}\""))))
            .filter(|(_, v)| *v > 0.0)
            .map(|(op, v)| format!("{op} {v:.3}"))
            .collect();
        let bad = self.trips("result=\"error\"") + self.trips("result=\"timeout\"");
        let other: Vec<String> = self
            .sluice
            .iter()
            .filter(|(k, v)| !k.starts_with("sluice_redis_operations_total") && **v != 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "{name}: over {} requests ({} closed-loop): Redis CPU {:.1} µs/req (closed loop), \
             {:.1} µs/req inside commands; commands a request: {}; all commands {:.3}/req; \
             Redis socket reads {:.3}/req; Sluice's round trips a request: {} = {:.3} \
             (ending in an error or timeout: {:.4} a request){}{}",
            self.requests,
            self.closed_requests,
            self.cpu_us as f64 / self.closed_requests.max(1) as f64,
            usec as f64 / reqs,
            cmds.join(", "),
            all as f64 / reqs,
            self.reads as f64 / reqs,
            trips.join(" + "),
            self.trips("op="),
            bad,
            if other.is_empty() { "" } else { "; " },
            other.join(", "),
        );
    }
}

/// `SLUICE_BENCH_ACCESS_LOG=1`: both proxies write an access-log line a
/// request (Sluice its JSON line to stderr, which the bench reads; nginx
/// its default line to a file), as they run in production. Off by default.
fn access_log() -> bool {
    std::env::var("SLUICE_BENCH_ACCESS_LOG").is_ok_and(|v| v == "1")
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
    {access_log}
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
        tmp = tmp.display(),
        access_log = if access_log() {
            format!("access_log {}/nginx-access.log;", tmp.display())
        } else {
            "access_log off;".to_string()
        },
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

fn request(addr: SocketAddr, body: Bytes, path: &str) -> Request<Full<Bytes>> {
    // hyper's connection-level client does not add Host; nginx insists on it.
    Request::post(format!("http://{addr}{path}"))
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(body))
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

/// One closed-loop phase: requests answered, of them `x-sluice-cache: hit`,
/// and the time from the start to the last answer.
#[derive(Default, Clone, Copy)]
struct Pass {
    done: u64,
    hits: u64,
    elapsed: Duration,
}

fn is_hit<B>(resp: &http::Response<B>) -> bool {
    resp.headers()
        .get("x-sluice-cache")
        .is_some_and(|v| v.as_bytes() == b"hit")
}

/// Closed loop: `conns` connections each sending back to back for `dur`,
/// or until `bodies` is used up.
async fn throughput(addr: SocketAddr, conns: usize, dur: Duration, bodies: &Bodies) -> Pass {
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            let mut pass = Pass::default();
            let mut send = connect(addr).await;
            while Instant::now() < deadline {
                let Some(body) = bodies.next() else {
                    break;
                };
                if send.ready().await.is_err() {
                    send = connect(addr).await;
                }
                let resp = match send.send_request(request(addr, body, bodies.path())).await {
                    Ok(r) => r,
                    Err(_) => {
                        send = connect(addr).await;
                        continue;
                    }
                };
                assert!(resp.status().is_success(), "status {}", resp.status());
                pass.hits += u64::from(is_hit(&resp));
                resp.into_body().collect().await.expect("body");
                pass.done += 1;
            }
            pass.elapsed = start.elapsed();
            pass
        }));
    }
    let mut total = Pass::default();
    for t in tasks {
        let p = t.await.expect("task");
        total.done += p.done;
        total.hits += p.hits;
        total.elapsed = total.elapsed.max(p.elapsed);
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
async fn fixed_rate(
    addr: SocketAddr,
    rate: u64,
    dur: Duration,
    bodies: &Bodies,
) -> (Duration, Duration) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    // Warm the pool.
    for _ in 0..FIXED_RATE_WARM {
        let body = bodies.next().expect("a body for the warm-up");
        let r = client
            .request(request(addr, body, bodies.path()))
            .await
            .expect("warm");
        r.into_body().collect().await.expect("body");
    }
    let path = bodies.path();
    let n = rate * dur.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + interval * i as u32;
        let body = bodies.next().expect("a body for each request");
        tokio::time::sleep_until(at.into()).await;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = client
                .request(request(addr, body, path))
                .await
                .expect("response");
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

impl StreamTimes {
    /// The stream table's figures (of sorted times).
    fn figures(&self) -> Vec<Figure> {
        [
            ("first event p50 ms, 32 concurrent", &self.first, 0.5),
            ("first event p99 ms, 32 concurrent", &self.first, 0.99),
            ("whole stream p50 ms, 32 concurrent", &self.total, 0.5),
            ("first event p50 ms, one at a time", &self.lone, 0.5),
            ("first event p99 ms, one at a time", &self.lone, 0.99),
        ]
        .into_iter()
        .map(|(what, times, p)| Figure::ms(what, percentile(times, p)))
        .collect()
    }
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

/// One stream request (`body`, paced by the simulator) read to its end:
/// its `x-sluice-cache` and when each data event arrived.
async fn timed_events(
    client: &StreamClient,
    addr: SocketAddr,
    body: String,
) -> (String, Vec<Instant>) {
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .header("x-sim-latency-ms", "100")
        .header("x-sim-chunks", "20")
        .header("x-sim-chunk-delay-ms", "10")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let cache = resp
        .headers()
        .get("x-sluice-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body: Incoming = resp.into_body();
    let mut at = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Some(d) = frame.data_ref() {
            let now = Instant::now();
            let events = d.windows(5).filter(|w| w == b"data:").count();
            at.extend(std::iter::repeat_n(now, events));
        }
    }
    (cache, at)
}

/// A stream led on one replica and followed on another (both with Redis
/// cache and coalescing): `rounds` distinct streams, the second client
/// starting 30 ms after the first (while upstream's 100 ms first-byte
/// latency runs). For each event, how much later the follower (the one
/// answered `coalesced`) received it than the leader's client: the first
/// event's delays and every event's. Rounds where neither followed (the
/// second came too late) are counted apart.
async fn fleet_follow(
    a: SocketAddr,
    b: SocketAddr,
    rounds: usize,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let client: StreamClient = Client::builder(TokioExecutor::new()).build_http();
    let (mut first, mut all, mut alone) = (Vec::new(), Vec::new(), 0);
    for i in 0..rounds {
        let body = BODY.replacen('{', r#"{"stream":true,"#, 1).replace(
            "rivers.",
            &format!("rivers. #follow{i}-{}", std::process::id()),
        );
        let lead = tokio::spawn({
            let (client, body) = (client.clone(), body.clone());
            async move { timed_events(&client, a, body).await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let other = timed_events(&client, b, body).await;
        let lead = lead.await.expect("task");
        let (leader, follower) = match (lead.0.as_str(), other.0.as_str()) {
            (_, "coalesced") => (lead.1, other.1),
            ("coalesced", _) => (other.1, lead.1),
            _ => {
                alone += 1;
                continue;
            }
        };
        assert_eq!(leader.len(), follower.len(), "the same events");
        for (j, (l, f)) in leader.iter().zip(&follower).enumerate() {
            let d = f.saturating_duration_since(*l);
            if j == 0 {
                first.push(d);
            }
            all.push(d);
        }
    }
    first.sort();
    all.sort();
    (first, all, alone)
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

/// One figure of a row, for its table and the comparison with the baseline.
struct Figure {
    what: &'static str,
    value: f64,
    decimals: usize,
}

impl Figure {
    fn ms(what: &'static str, d: Duration) -> Figure {
        Figure {
            what,
            value: d.as_secs_f64() * 1000.0,
            decimals: 3,
        }
    }
    fn show(&self) -> String {
        if self.value.is_nan() {
            "-".into()
        } else {
            format!("{:.*}", self.decimals, self.value)
        }
    }
}

/// A row's figures in the main table.
struct Res {
    name: &'static str,
    baseline: bool,
    rps: f64,
    cpu: Option<f64>,
    p50: Duration,
    p99: Duration,
    /// Peak RSS, MiB.
    rss: Option<f64>,
}

impl Res {
    fn figures(&self) -> Vec<Figure> {
        vec![
            Figure {
                what: "req/s @64 conns",
                value: self.rps,
                decimals: 0,
            },
            Figure {
                what: "CPU µs/req",
                value: self.cpu.unwrap_or(f64::NAN),
                decimals: 2,
            },
            Figure::ms("p50 ms @500 rps", self.p50),
            Figure::ms("p99 ms @500 rps", self.p99),
            Figure {
                what: "peak RSS MiB",
                value: self.rss.unwrap_or(f64::NAN),
                decimals: 1,
            },
        ]
    }
}

/// A row of HEAD's figures beside the baseline's, by name.
type Pair = (&'static str, Vec<Figure>, Vec<Figure>);

/// The closing table: each Sluice row's figures by HEAD and by the
/// baseline, and HEAD's over the baseline's.
fn print_comparison(pairs: &[Pair]) {
    println!("\n| HEAD against baseline | figure | HEAD | baseline | HEAD/baseline |");
    println!("|---|---|---|---|---|");
    for (name, head, base) in pairs {
        for (h, b) in head.iter().zip(base) {
            println!(
                "| {name} | {} | {} | {} | {:.3} |",
                h.what,
                h.show(),
                b.show(),
                h.value / b.value
            );
        }
    }
}

/// A target of the main table.
struct Row<'a> {
    /// What the row measures: the same for HEAD's and the baseline's.
    name: &'static str,
    /// Its name in the tables: `name`, and `@base` after the baseline's.
    label: String,
    baseline: bool,
    proc_: Option<&'a Proc>,
    addr: SocketAddr,
    /// Admin address, for the Redis rows' round-trip counts.
    admin: Option<SocketAddr>,
    bodies: Bodies,
    /// Bodies a closed-loop pass may use (the remote-hit row).
    window: Option<u64>,
}

impl<'a> Row<'a> {
    /// A target that is not a Sluice: direct, nginx.
    fn other(name: &'static str, proc_: Option<&'a Proc>, addr: SocketAddr) -> Row<'a> {
        Row {
            name,
            label: name.to_string(),
            baseline: false,
            proc_,
            addr,
            admin: None,
            bodies: Bodies::Fixed,
            window: None,
        }
    }
}

/// What every Sluice under test is started against.
struct TestBed<'a> {
    sim_url: &'a str,
    redis_port: Option<u16>,
    tmp: &'a std::path::Path,
    rt: &'a tokio::runtime::Runtime,
    /// Distinct answers the remote-hit row reads in a closed-loop pass.
    remote_pass: u64,
    /// Distinct answers a filler stores in Redis for the remote-hit row.
    fill_n: u64,
}

/// One build's Sluices: one for each Sluice row of the main table (for the
/// Redis rows only with Redis); the miss row's serves the stream row too.
struct Sluices {
    build: Build,
    miss: Sluice,
    limited: Sluice,
    cached: Sluice,
    hit: Sluice,
    /// Hits of a tenant with the shares rows' limits, in memory.
    hit_limited: Sluice,
    shared: Option<Sluice>,
    /// Shared limits without a concurrency cap: decided from shares.
    shares: Option<Sluice>,
    cached_redis: Option<Sluice>,
    hit_local: Option<Sluice>,
    hit_shares: Option<Sluice>,
    hit_remote: Option<Sluice>,
    /// The remote-hit row's bodies: the answers its filler stored.
    remote_bodies: Bodies,
    remote_pass: u64,
}

impl Sluices {
    fn start(build: Build, bed: &TestBed) -> Sluices {
        let start = |name, cache, limits, redis| {
            start_sluice(&build, name, bed.sim_url, cache, limits, redis, bed.tmp)
        };
        let redis_row = |name, cache, limits| {
            bed.redis_port
                .map(|port| start(name, cache, limits, Some(port)))
        };
        let miss = start("sluice-miss", false, NO_LIMITS, None);
        let limited = start("sluice-miss-limits", false, BENCH_LIMITS, None);
        let hit = start("sluice-hit", true, NO_LIMITS, None);
        let hit_limited = start("sluice-hit-limits", true, SHARE_LIMITS, None);
        let cached = start("sluice-miss-cache", true, NO_LIMITS, None);
        let shared = redis_row("sluice-miss-redis", false, BENCH_LIMITS);
        let shares = redis_row("sluice-miss-redis-shares", false, SHARE_LIMITS);
        let cached_redis = redis_row("sluice-miss-redis-cache", true, NO_LIMITS);
        let hit_local = redis_row("sluice-hit-redis-local", true, NO_LIMITS);
        let hit_shares = redis_row("sluice-hit-redis-shares", true, SHARE_LIMITS);
        // Hits from Redis: a replica of this build (the filler) stores
        // distinct answers `#r0`, `#r1`, … in Redis; a replica started after
        // it (its memory empty) reads each of them once, each pass a window
        // of its own, so every request misses its memory and is answered by
        // one Redis GET.
        let hit_remote = redis_row("sluice-filler", true, NO_LIMITS).map(|filler| {
            fill_redis(&filler, bed);
            drop(filler);
            start("sluice-hit-redis-remote", true, NO_LIMITS, bed.redis_port)
        });
        Sluices {
            build,
            miss,
            limited,
            cached,
            hit,
            hit_limited,
            shared,
            shares,
            cached_redis,
            hit_local,
            hit_shares,
            hit_remote,
            remote_bodies: Bodies::distinct("r", 0, 0),
            remote_pass: bed.remote_pass,
        }
    }

    /// This build's rows of the main table, in their order.
    fn rows(&self) -> Vec<Row<'_>> {
        let distinct = |tag| Bodies::distinct(tag, 0, u64::MAX);
        [
            ("sluice-miss", Some(&self.miss), Bodies::Fixed),
            ("sluice-miss-limits", Some(&self.limited), Bodies::Fixed),
            ("sluice-miss-cache", Some(&self.cached), distinct("c")),
            ("sluice-miss-redis", self.shared.as_ref(), Bodies::Fixed),
            (
                "sluice-miss-redis-shares",
                self.shares.as_ref(),
                Bodies::Fixed,
            ),
            (
                "sluice-miss-redis-cache",
                self.cached_redis.as_ref(),
                distinct("m"),
            ),
            ("sluice-hit", Some(&self.hit), Bodies::Fixed),
            // The same request through Anthropic's Messages API, on the
            // same gateways as the chat miss and hit rows.
            ("sluice-messages-miss", Some(&self.miss), Bodies::Messages),
            ("sluice-messages-hit", Some(&self.hit), Bodies::Messages),
            ("sluice-hit-limits", Some(&self.hit_limited), Bodies::Fixed),
            (
                "sluice-hit-redis-local",
                self.hit_local.as_ref(),
                Bodies::Fixed,
            ),
            (
                "sluice-hit-redis-shares",
                self.hit_shares.as_ref(),
                Bodies::Fixed,
            ),
            (
                "sluice-hit-redis-remote",
                self.hit_remote.as_ref(),
                self.remote_bodies.clone(),
            ),
        ]
        .into_iter()
        // A baseline from before the Messages API has no Messages rows.
        .filter(|(_, _, bodies)| !(self.build.is_baseline() && matches!(bodies, Bodies::Messages)))
        .filter_map(|(name, s, bodies)| {
            s.map(|s| Row {
                name,
                label: self.build.label(name),
                baseline: self.build.is_baseline(),
                proc_: Some(&s.proc_),
                addr: s.addr,
                admin: Some(s.admin),
                window: (name == "sluice-hit-redis-remote").then_some(self.remote_pass),
                bodies,
            })
        })
        .collect()
    }

    /// The hit rows' addresses, whose one entry is warmed before the run.
    fn hit_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        [
            Some(&self.hit),
            Some(&self.hit_limited),
            self.hit_local.as_ref(),
            self.hit_shares.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|s| s.addr)
    }

    fn procs(&self) -> impl Iterator<Item = &Proc> {
        [
            &self.miss,
            &self.limited,
            &self.hit,
            &self.hit_limited,
            &self.cached,
        ]
        .into_iter()
        .chain(
            [
                &self.shared,
                &self.shares,
                &self.cached_redis,
                &self.hit_local,
                &self.hit_shares,
                &self.hit_remote,
            ]
            .into_iter()
            .flatten(),
        )
        .map(|s| &s.proc_)
    }
}

/// Stores `bed.fill_n` distinct answers (`#r0`, `#r1`, …) in Redis through
/// `filler`, and waits until its last stores have reached Redis.
fn fill_redis(filler: &Sluice, bed: &TestBed) {
    let t0 = Instant::now();
    let pass = bed.rt.block_on(throughput(
        filler.addr,
        64,
        Duration::from_secs(3600),
        &Bodies::distinct("r", 0, bed.fill_n),
    ));
    // Stores reach Redis from tasks: wait for the last ones.
    let stored = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| k.contains("op=\"cache_put\""))
            .map(|(_, v)| v)
            .sum()
    };
    let mut puts = 0.0;
    for _ in 0..50 {
        puts = stored(&sluice_redis_metrics(filler.admin));
        if puts >= bed.fill_n as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "filled Redis through one replica ({}): {} distinct answers in {:.1} s, {puts} stores sent",
        filler.proc_.name,
        pass.done,
        t0.elapsed().as_secs_f64()
    );
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
    const REPS: usize = 3;
    const RATE: u64 = 500;
    let nginx = start_nginx(sim_addr, &tmp);
    let redis = start_redis(&tmp);
    let remote_pass: u64 = std::env::var("SLUICE_BENCH_REMOTE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 8_000 } else { 25_000 });
    let fixed_n = RATE * dur.as_secs() + FIXED_RATE_WARM;
    let bed = TestBed {
        sim_url: &sim_url,
        redis_port: redis.as_ref().ok().map(|r| r.port),
        tmp: &tmp,
        rt: &rt,
        remote_pass,
        fill_n: remote_pass * REPS as u64 + fixed_n,
    };
    let head = Sluices::start(Build::head(), &bed);
    // SLUICE_BENCH_BASELINE_BIN=path (older name: SLUICE_BENCH_ALT_BIN):
    // every Sluice row again with that build, right after HEAD's in every
    // pass, and a closing table of HEAD's figures against the baseline's
    // (benches/README.md, "Comparing with a baseline").
    let baseline = ["SLUICE_BENCH_BASELINE_BIN", "SLUICE_BENCH_ALT_BIN"]
        .into_iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .map(|bin| {
            println!("baseline build: {bin}");
            Sluices::start(Build::baseline(bin), &bed)
        });
    let builds: Vec<&Sluices> = std::iter::once(&head).chain(&baseline).collect();

    let mut rows = vec![Row::other("direct", None, sim_addr)];
    match &nginx {
        Ok((p, addr)) => rows.push(Row::other("nginx", Some(p), *addr)),
        Err(reason) => println!("nginx row skipped: {reason}"),
    }
    if let Err(reason) = &redis {
        println!("Redis rows (sluice-miss-redis, sluice-miss-redis-cache, sluice-hit-redis-*) skipped: {reason}");
    }
    // Each of HEAD's Sluice rows, then the baseline's of the same name.
    let mut twins = baseline
        .as_ref()
        .map(Sluices::rows)
        .unwrap_or_default()
        .into_iter();
    for row in head.rows() {
        rows.push(row);
        rows.extend(twins.next());
    }
    // SLUICE_BENCH_ROWS=a,b: only these rows (and direct, the baseline).
    if let Ok(only) = std::env::var("SLUICE_BENCH_ROWS") {
        let only: Vec<&str> = only.split(',').map(str::trim).collect();
        rows.retain(|r| r.name == "direct" || only.contains(&r.name));
    }
    // Warm the hit rows' one entry (and the Messages hit row's).
    for addr in builds.iter().flat_map(|s| s.hit_addrs()) {
        rt.block_on(async {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            for bodies in [Bodies::Fixed, Bodies::Messages] {
                let body = bodies.next().expect("a body");
                let r = client
                    .request(request(addr, body, bodies.path()))
                    .await
                    .expect("warm");
                r.into_body().collect().await.expect("body");
            }
        });
    }

    println!("\n| target | req/s @64 conns | CPU µs/req (proxy) | core 0 / core 1 busy | p50 ms @500 rps | p99 ms @500 rps | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    let redis_ok = redis.as_ref().ok();
    let is_redis_row = |r: &Row| r.name.contains("redis");
    // Redis's counters and CPU, per Redis row, over that row's phases only.
    let mut tallies: Vec<RedisTally> = rows.iter().map(|_| RedisTally::default()).collect();
    // Redis's counters after a Redis row's phase: its last stores and
    // publications land from tasks, so they are given a moment.
    let settle = || std::thread::sleep(Duration::from_millis(100));
    // Throughput in `REPS` passes over the targets, round robin, so drift on
    // a shared machine hits every target alike; requests, time, CPU time and
    // busy fractions are summed over the passes.
    #[derive(Default)]
    struct Sum {
        pass: Pass,
        cpu_us: u64,
        busy: Vec<f64>,
    }
    let mut sums: Vec<Sum> = rows.iter().map(|_| Sum::default()).collect();
    for _ in 0..REPS {
        for ((row, sum), tally) in rows.iter().zip(&mut sums).zip(&mut tallies) {
            if let Some(w) = row.window {
                row.bodies.window(0, w);
            }
            let redis_here = redis_ok.filter(|_| is_redis_row(row));
            let snap0 = redis_here.map(|r| r.snap(row.admin.expect("admin")));
            let cpu0 = row.proc_.map(Proc::cpu_us).unwrap_or(0);
            let rcpu0 = redis_here.map(|r| r.proc_.cpu_us()).unwrap_or(0);
            let (pass, busy) =
                core_busy(|| rt.block_on(throughput(row.addr, 64, dur, &row.bodies)));
            if let (Some(r), Some(snap0)) = (redis_here, snap0) {
                settle();
                tally.cpu_us += r.proc_.cpu_us() - rcpu0;
                tally.closed_requests += pass.done;
                tally.add(&snap0, &r.snap(row.admin.expect("admin")), pass.done);
            }
            sum.cpu_us += row.proc_.map(Proc::cpu_us).unwrap_or(0) - cpu0;
            sum.pass.done += pass.done;
            sum.pass.hits += pass.hits;
            sum.pass.elapsed += pass.elapsed;
            sum.busy.resize(busy.len(), 0.0);
            for (s, b) in sum.busy.iter_mut().zip(&busy) {
                *s += b / REPS as f64;
            }
        }
    }
    let mut results = Vec::new();
    for ((row, sum), tally) in rows.iter().zip(&sums).zip(&mut tallies) {
        let cpu = row.proc_.map(|_| sum.cpu_us as f64 / sum.pass.done as f64);
        let rps = sum.pass.done as f64 / sum.pass.elapsed.as_secs_f64();
        if row.window.is_some() {
            // The fixed-rate phase reads filled answers not read yet.
            row.bodies.window(remote_pass * REPS as u64, fixed_n);
        }
        let redis_here = redis_ok.filter(|_| is_redis_row(row));
        let snap0 = redis_here.map(|r| r.snap(row.admin.expect("admin")));
        let (p50, p99) = rt.block_on(fixed_rate(row.addr, RATE, dur, &row.bodies));
        if let (Some(r), Some(snap0)) = (redis_here, snap0) {
            settle();
            tally.add(&snap0, &r.snap(row.admin.expect("admin")), fixed_n);
        }
        let rss = row.proc_.map(|p| p.rss_kib().0 as f64 / 1024.0);
        println!(
            "| {} | {rps:.0} | {} | {:.0}% / {:.0}% | {} | {} | {} |",
            row.label,
            cpu.map_or("-".into(), |c| format!("{c:.1}")),
            sum.busy.first().unwrap_or(&0.0) * 100.0,
            sum.busy.get(1).unwrap_or(&0.0) * 100.0,
            ms(p50),
            ms(p99),
            rss.map_or("-".into(), |r| format!("{r:.1}"))
        );
        results.push(Res {
            name: row.name,
            baseline: row.baseline,
            rps,
            cpu,
            p50,
            p99,
            rss,
        });
    }
    println!();
    for (row, sum) in rows.iter().zip(&sums) {
        if row.name.contains("cache") || row.name.contains("hit") {
            println!(
                "{}: {} of {} closed-loop answers were x-sluice-cache: hit ({:.2}%)",
                row.label,
                sum.pass.hits,
                sum.pass.done,
                sum.pass.hits as f64 * 100.0 / sum.pass.done.max(1) as f64
            );
        }
    }
    // HEAD's row of that name.
    let base = |n: &str| results.iter().find(|r| r.name == n && !r.baseline);
    let cpu_of = |r: &Res| r.cpu.unwrap_or(f64::NAN);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let tally = |n: &str| {
        rows.iter()
            .position(|r| r.name == n && !r.baseline)
            .and_then(|i| tallies.get(i))
            .filter(|_| redis_ok.is_some())
    };
    if let (Some(direct), Some(miss)) = (base("direct"), base("sluice-miss")) {
        println!(
            "\nsluice-miss: {:.2}× direct req/s; added p50 {} ms, added p99 {} ms",
            miss.rps / direct.rps,
            ms(miss.p50.saturating_sub(direct.p50)),
            ms(miss.p99.saturating_sub(direct.p99))
        );
        if let Some(ng) = base("nginx") {
            println!(
                "nginx: added p50 {} ms, p99 {} ms; sluice-miss/nginx: req/s {:.2}×, CPU/req {:.2}×",
                ms(ng.p50.saturating_sub(direct.p50)),
                ms(ng.p99.saturating_sub(direct.p99)),
                miss.rps / ng.rps,
                cpu_of(miss) / cpu_of(ng)
            );
        }
        if let Some(hit) = base("sluice-hit") {
            println!("sluice-hit: {:.2}× direct req/s", hit.rps / direct.rps);
        }
        if let Some(lim) = base("sluice-miss-limits") {
            println!(
                "sluice-miss-limits: added p50 {} ms; vs sluice-miss: req/s {:.2}×, CPU/req {:.2}×",
                ms(lim.p50.saturating_sub(direct.p50)),
                lim.rps / miss.rps,
                cpu_of(lim) / cpu_of(miss)
            );
            if let (Some(red), Some(t)) = (base("sluice-miss-redis"), tally("sluice-miss-redis")) {
                let cpu_ratio = cpu_of(red) / cpu_of(lim);
                let rps_ratio = red.rps / lim.rps;
                let evals = t.per_req(&["evalsha", "eval"]);
                let p50_more = red.p50.as_secs_f64() * 1000.0 - lim.p50.as_secs_f64() * 1000.0;
                println!(
                    "sluice-miss-redis: added p50 {} ms",
                    ms(red.p50.saturating_sub(direct.p50))
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
        if let (Some(lim), Some(sh), Some(t)) = (
            base("sluice-miss-limits"),
            base("sluice-miss-redis-shares"),
            tally("sluice-miss-redis-shares"),
        ) {
            let cpu_ratio = cpu_of(sh) / cpu_of(lim);
            let evals = t.per_req(&["evalsha", "eval"]);
            let p50_more = sh.p50.as_secs_f64() * 1000.0 - lim.p50.as_secs_f64() * 1000.0;
            println!(
                "sluice-miss-redis-shares vs sluice-miss-limits: CPU/req {cpu_ratio:.2}× (≤ 1.1×: {}); \
                 req/s {:.2}×; p50 {p50_more:+.3} ms (≤ +0.02: {}); \
                 EVALSHA+EVAL per request {evals:.4} (≤ 0.1: {})",
                met(cpu_ratio <= 1.1),
                sh.rps / lim.rps,
                met(p50_more <= 0.02),
                met(evals <= 0.1),
            );
        }
        if let Some(mrc) = base("sluice-miss-redis-cache") {
            let ratio = cpu_of(mrc) / cpu_of(miss);
            print!(
                "sluice-miss-redis-cache: added p50 {} ms; vs sluice-miss: CPU/req {ratio:.2}× \
                 (≤ 1.3×: {}), req/s {:.2}×, p50 {:+.3} ms",
                ms(mrc.p50.saturating_sub(direct.p50)),
                met(ratio <= 1.3),
                mrc.rps / miss.rps,
                (mrc.p50.as_secs_f64() - miss.p50.as_secs_f64()) * 1000.0
            );
            if let Some(mc) = base("sluice-miss-cache") {
                print!(
                    "; vs sluice-miss-cache (same, no Redis): CPU/req {:.2}×, req/s {:.2}×",
                    cpu_of(mrc) / cpu_of(mc),
                    mrc.rps / mc.rps
                );
            }
            println!();
        }
    }
    if let Some(hit) = base("sluice-hit") {
        if let Some(local) = base("sluice-hit-redis-local") {
            let ratio = local.rps / hit.rps;
            println!(
                "sluice-hit-redis-local vs sluice-hit: req/s {ratio:.2}× (≥ 0.95×: {}), CPU/req {:.2}×",
                met(ratio >= 0.95),
                cpu_of(local) / cpu_of(hit)
            );
        }
        if let (Some(lim), Some(sh)) = (base("sluice-hit-limits"), base("sluice-hit-redis-shares"))
        {
            let ratio = sh.rps / lim.rps;
            let evals = tally("sluice-hit-redis-shares")
                .map_or(f64::NAN, |t| t.per_req(&["evalsha", "eval"]));
            println!(
                "sluice-hit-limits vs sluice-hit: req/s {:.2}×, CPU/req {:.2}×",
                lim.rps / hit.rps,
                cpu_of(lim) / cpu_of(hit)
            );
            println!(
                "sluice-hit-redis-shares vs sluice-hit-limits: req/s {ratio:.2}× (≥ 0.95×: {}), \
                 CPU/req {:.2}×, EVALSHA+EVAL per request {evals:.4}",
                met(ratio >= 0.95),
                cpu_of(sh) / cpu_of(lim)
            );
        }
        if let Some(remote) = base("sluice-hit-redis-remote") {
            println!(
                "sluice-hit-redis-remote: {:.0} req/s, {:.1} µs/req (Sluice); vs sluice-hit: \
                 req/s {:.2}×, CPU/req {:.2}×",
                remote.rps,
                cpu_of(remote),
                remote.rps / hit.rps,
                cpu_of(remote) / cpu_of(hit)
            );
        }
    }
    println!();
    for (row, t) in rows.iter().zip(&tallies) {
        if is_redis_row(row) && redis_ok.is_some() {
            t.report(&row.label);
        }
    }
    // Each baseline row beside HEAD's, for the closing table.
    let mut comparison: Vec<Pair> = results
        .iter()
        .filter(|r| r.baseline)
        .filter_map(|b| base(b.name).map(|h| (b.name, h.figures(), b.figures())))
        .collect();

    println!("\n| streams (32 concurrent, 20 chunks 5 ms apart) | first event p50 ms | first event p99 ms | whole stream p50 ms | one stream at a time: first event p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    let rounds = if quick { 5 } else { 20 };
    let mut stream_rows = vec![("direct".to_string(), sim_addr)];
    if let Ok((_, addr)) = &nginx {
        stream_rows.push(("nginx".into(), *addr));
    }
    let sluice_at = stream_rows.len();
    stream_rows.extend(
        builds
            .iter()
            .map(|s| (s.build.label("sluice-stream"), s.miss.addr)),
    );
    let addrs: Vec<SocketAddr> = stream_rows.iter().map(|r| r.1).collect();
    let times = rt.block_on(streams(&addrs, rounds));
    for ((label, _), t) in stream_rows.iter().zip(&times) {
        let cells: Vec<String> = t.figures().iter().map(Figure::show).collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    if let [head_t, base_t] = &times[sluice_at..] {
        comparison.push(("sluice-stream", head_t.figures(), base_t.figures()));
    }

    if let (Some(a), Some(b)) = (&head.cached_redis, &head.hit_local) {
        let rounds = if quick { 40 } else { 200 };
        let (first, all, alone) = rt.block_on(fleet_follow(a.addr, b.addr, rounds));
        if first.is_empty() {
            println!("\nfleet follower: no round coalesced across replicas ({alone} alone)");
        } else {
            println!(
                "\nfleet follower (stream led on one replica, followed on another through Redis; \
                 {} rounds, {alone} not coalesced): first event +{} ms p50, +{} ms p99 after the leader's client; \
                 every event +{} ms p50, +{} ms p99",
                first.len(),
                ms(percentile(&first, 0.5)),
                ms(percentile(&first, 0.99)),
                ms(percentile(&all, 0.5)),
                ms(percentile(&all, 0.99)),
            );
        }
    }

    if idle_n > 0 {
        let (opened, rss) = rt.block_on(idle_streams(head.miss.addr, &head.miss.proc_, idle_n));
        println!(
            "\nidle streams held open through sluice: {opened} of {idle_n}, RSS {:.1} MiB",
            rss as f64 / 1024.0
        );
    }
    for p in builds.iter().flat_map(|s| s.procs()) {
        let (hwm, _) = p.rss_kib();
        println!("{} peak RSS: {:.1} MiB", p.name, hwm as f64 / 1024.0);
    }
    if !comparison.is_empty() {
        print_comparison(&comparison);
        let twin = results
            .iter()
            .find(|r| r.name == "sluice-miss" && r.baseline);
        if let (Some(h), Some(b)) = (base("sluice-miss"), twin) {
            println!(
                "\nsluice-miss, HEAD/baseline: CPU/req {:.3}× ({:.2} vs {:.2} µs), req/s {:.3}×, \
                 p50 {:.3}×, p99 {:.3}×",
                cpu_of(h) / cpu_of(b),
                cpu_of(h),
                cpu_of(b),
                h.rps / b.rps,
                h.p50.as_secs_f64() / b.p50.as_secs_f64(),
                h.p99.as_secs_f64() / b.p99.as_secs_f64()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
