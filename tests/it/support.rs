//! Test support: the simulator on an ephemeral port, a `TestGateway` that
//! binds port 0 and shuts down on drop, and a small HTTP client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use sluice::simulator::Simulator;
use sluice::{Config, Gateway, Handle, Secret};
use tokio::sync::oneshot;

pub const ALPHA: &str = "sk-alpha-0123456789";
pub const BETA: &str = "sk-beta-0123456789";
pub const UPSTREAM_KEY: &str = "sk-upstream-shared";

pub fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Two tenants: `alpha` (any model, no limits) and `beta`
/// (deepseek-chat only). `extra` is appended (sections, more tenants).
pub fn config_text(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[upstream]
base_url = "{upstream}"
api_key_env = "TEST_UPSTREAM_KEY"
connect_timeout_secs = 2
first_byte_timeout_secs = 5
idle_timeout_secs = 5
max_retries = 2
balance_poll_secs = 0

[[tenants]]
name = "alpha"
key_sha256 = ["{}"]
requests_per_minute = 0
tokens_per_minute = 0
max_concurrent = 0

[[tenants]]
name = "beta"
key_sha256 = ["{}"]
requests_per_minute = 0
tokens_per_minute = 0
max_concurrent = 0
models = ["deepseek-chat"]

[pricing.deepseek-chat]
input_cache_hit = 0.1
input_cache_miss = 1.0
output = 2.0
{extra}
"#,
        sha(ALPHA),
        sha(BETA)
    )
}

/// A `[[tenants]]` block with these limits (0 = unlimited).
pub fn tenant_with_limits(
    name: &str,
    key: &str,
    rpm: u32,
    burst: u32,
    tpm: u64,
    concurrent: u32,
) -> String {
    format!(
        "[[tenants]]\nname = \"{name}\"\nkey_sha256 = [\"{}\"]\nrequests_per_minute = {rpm}\nrequest_burst = {burst}\ntokens_per_minute = {tpm}\nmax_concurrent = {concurrent}\n",
        sha(key)
    )
}

pub fn parse(text: &str) -> Config {
    Config::parse(text, |_| None).expect("test config is valid")
}

/// The simulated upstream on an ephemeral loopback port.
pub async fn simulator() -> Simulator {
    Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("simulator")
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub handle: Handle,
    pub sim: Simulator,
    shutdown: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestGateway {
    /// A gateway in front of a fresh simulator, with `extra` config.
    pub async fn start(extra: &str) -> TestGateway {
        let sim = Simulator::start(([127, 0, 0, 1], 0).into())
            .await
            .expect("simulator");
        let config = parse(&config_text(&sim.base_url(), extra));
        Self::with(sim, config).await
    }

    /// A gateway with a config edited by `edit` (text replace on the default).
    pub async fn start_with(edit: impl FnOnce(String) -> String) -> TestGateway {
        let sim = Simulator::start(([127, 0, 0, 1], 0).into())
            .await
            .expect("simulator");
        let config = parse(&edit(config_text(&sim.base_url(), "")));
        Self::with(sim, config).await
    }

    pub async fn with(sim: Simulator, config: Config) -> TestGateway {
        Self::with_keys(sim, config, Secret::new(UPSTREAM_KEY).into()).await
    }

    /// A gateway with each upstream's key given.
    pub async fn with_keys(sim: Simulator, config: Config, keys: sluice::Keys) -> TestGateway {
        let gateway = Gateway::bind(config, keys).await.expect("bind");
        let (tx, rx) = oneshot::channel::<()>();
        let addr = gateway.local_addr();
        let admin = gateway.admin_addr();
        let handle = gateway.handle();
        let done = tokio::spawn(gateway.run(async move {
            let _ = rx.await;
        }));
        TestGateway {
            addr,
            admin,
            handle,
            sim,
            shutdown: Some(tx),
            done: Some(done),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Starts the graceful shutdown and returns the task that ends with it.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.done.take().expect("running")
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `sluice_requests_total{cache="miss",...}` (labels in any order).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics_text().await;
        metric_value(&text, name, labels).unwrap_or(0.0)
    }

    /// Waits (up to 10 s) until a sample reads `want`. Metrics move when a
    /// response body is dropped, just after the client saw its end.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(name, labels).await;
            if v == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}{labels:?} stayed at {v}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn metrics_text(&self) -> String {
        let r = send(
            Request::get(format!("http://{}/metrics", self.admin))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await;
        String::from_utf8(r.body.to_vec()).expect("utf8")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    total
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// What arrived, up to the end or the break.
    pub body: Bytes,
    /// The transfer broke (the response was aborted) instead of ending.
    pub aborted: bool,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    /// The error code, or "" for a body that is not an error object.
    pub fn error_code_or_empty(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    /// The SSE `data` payloads, in order.
    pub fn events(&self) -> Vec<String> {
        sse_data(&self.text())
    }
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole answer (up to a break, if the
/// response is aborted: see `Resp::aborted`).
pub async fn send(req: Request<Full<Bytes>>) -> Resp {
    let (parts, body) = client().request(req).await.expect("request").into_parts();
    read_rest(parts, body, Vec::new()).await
}

/// Reads the rest of a live answer after `buf` (what was read of it
/// already), up to its end or its break.
pub async fn read_rest(parts: http::response::Parts, mut body: Incoming, mut buf: Vec<u8>) -> Resp {
    let mut aborted = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Err(_) => {
                aborted = true;
                break;
            }
        }
    }
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(buf),
        aborted,
    }
}

/// A stream that broke after sending events ends with docs/api.md's error
/// event, no `[DONE]`, and an aborted transfer.
pub fn assert_stream_error_end(r: &Resp) {
    let events = r.events();
    let last = events.last().expect("some event");
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|_| panic!("last event is JSON: {events:?}"));
    assert_eq!(
        v["error"]["code"], "upstream_stream_interrupted",
        "{events:?}"
    );
    assert_eq!(v["error"]["type"], "upstream_error");
    assert!(v["error"]["param"].is_null());
    assert!(v["error"]["message"].is_string());
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "no [DONE] after a break: {events:?}"
    );
    assert!(r.aborted, "the transfer is aborted after the error event");
}

/// Sends a request; the answer's head and live body, or the error (for a
/// server that may die under it).
pub async fn try_open(
    req: Request<Full<Bytes>>,
) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
    client().request(req).await
}

/// Sends a request and returns the answer's head and live body.
pub async fn open(req: Request<Full<Bytes>>) -> http::Response<Incoming> {
    client().request(req).await.expect("request")
}

pub fn post(url: &str, key: &str) -> http::request::Builder {
    Request::post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
}

/// POST `body` as JSON with `key`, plus `headers`.
pub async fn call(
    url: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Resp {
    send_json(post(url, key), body, headers).await
}

/// Sends `body` as JSON with the request `b` begins, plus `headers`.
pub async fn send_json(
    mut b: http::request::Builder,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Resp {
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(
        b.body(Full::new(Bytes::from(body.to_string())))
            .expect("req"),
    )
    .await
}

pub async fn call_open(
    url: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> http::Response<Incoming> {
    let mut b = post(url, key);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    open(
        b.body(Full::new(Bytes::from(body.to_string())))
            .expect("req"),
    )
    .await
}

pub fn chat(content: &str) -> serde_json::Value {
    serde_json::json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": content}]})
}

pub fn chat_stream(content: &str) -> serde_json::Value {
    let mut v = chat(content);
    v["stream"] = true.into();
    v
}

/// Reads the next data frame of a live body, within a generous bound.
pub async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("frame in time")?;
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    return Some(d);
                }
            }
            Err(_) => return None,
        }
    }
}

/// Assembles the content of a chat stream's data payloads.
pub fn streamed_content(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

// ---- Redis and replicas -----------------------------------------------------

/// A free loopback port (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Whether the Redis tests can run here. Without `redis-server` they are
/// skipped with a line saying so, unless `SLUICE_TEST_REDIS=require` (CI),
/// where a missing server is a failure.
pub fn redis_available(test: &str) -> bool {
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("SLUICE_TEST_REDIS").as_deref() != Ok("require"),
            "SLUICE_TEST_REDIS=require but redis-server is not installed"
        );
        eprintln!("SKIPPED {test}: redis-server is not installed (apt-get install redis-server)");
    }
    found
}

/// A `redis-server` of the test's own on a free loopback port, without
/// persistence; killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// `None` (with the reason printed) when `redis-server` is missing.
    pub fn start(test: &str) -> Option<RedisServer> {
        Self::start_with(test, &[])
    }

    pub fn start_with(test: &str, extra: &[&str]) -> Option<RedisServer> {
        Self::start_on(test, free_port(), extra)
    }

    /// On a given port (one a gateway was told about before it existed).
    pub fn start_on(test: &str, port: u16, extra: &[&str]) -> Option<RedisServer> {
        if !redis_available(test) {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("sluice-redis-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r = RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.launch();
        Some(r)
    }

    /// A port nothing listens on, for a Redis that is down from the start.
    pub fn url_of_port(port: u16) -> String {
        format!("redis://127.0.0.1:{port}/0")
    }

    pub fn url(&self) -> String {
        Self::url_of_port(self.port)
    }

    fn launch(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits (up to 10 s) until the server answers PING, or says it needs
    /// a password (which is also an answer).
    fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.cli(&["PING"]);
            if out.contains("PONG") || out.contains("NOAUTH") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on {} did not start: {out}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis-cli` against this server; its output (stdout and stderr).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A config file in the temp directory, removed on drop.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(text: &str) -> TempFile {
        let n: u64 = rand::random();
        let path = std::env::temp_dir().join(format!("sluice-test-{n:x}.toml"));
        std::fs::write(&path, text).expect("write config");
        TempFile(path)
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("rewrite config");
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The real `sluice` binary as one replica of a fleet: JSON logs read by a
/// thread, addresses taken from its "sluice listening" line; killed on drop.
pub struct Replica {
    child: tokio::process::Child,
    pub addr: String,
    pub admin: String,
    logs: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    /// Every line read so far.
    seen: Vec<serde_json::Value>,
    _config: TempFile,
}

impl Replica {
    pub async fn start(config_text: &str) -> Replica {
        let config = TempFile::new(config_text);
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--config")
            .arg(&config.0)
            .env_remove("SLUICE_REDIS_URL")
            .env_remove("SLUICE_LISTEN")
            .env_remove("SLUICE_ADMIN_LISTEN")
            .env_remove("SLUICE_UPSTREAM_URL")
            .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
            .env("SLUICE_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, mut logs) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let fd = stderr.into_owned_fd().expect("fd");
            for line in std::io::BufReader::new(std::fs::File::from(fd)).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let listening = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let v = logs.recv().await.expect("sluice exited before listening");
                seen.push(v.clone());
                if v["message"] == "sluice listening" {
                    return v;
                }
            }
        })
        .await
        .expect("replica started");
        Replica {
            child,
            addr: listening["listen"].as_str().expect("listen").to_string(),
            admin: listening["admin"].as_str().expect("admin").to_string(),
            logs,
            seen,
            _config: config,
        }
    }

    /// `n` replicas of one config, started one after another.
    pub async fn fleet(n: usize, config_text: &str) -> Vec<Replica> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(Replica::start(config_text).await);
        }
        out
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits (up to `within`) until the metric `name` (without labels)
    /// reads `want`.
    pub async fn wait_metric(&self, name: &str, want: f64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.metric(name, &[]).await != want {
            assert!(
                Instant::now() < deadline,
                "{name} never read {want} on replica {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id (for /proc).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGKILL: the replica dies without releasing anything.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, and wait for the process to exit.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let r = send(
            Request::get(format!("http://{}/metrics", self.admin))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await;
        metric_value(&String::from_utf8_lossy(&r.body), name, labels).unwrap_or(0.0)
    }

    /// Every log line written so far.
    pub fn logs(&mut self) -> &[serde_json::Value] {
        while let Ok(v) = self.logs.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }

    /// Waits (up to 20 s) for a new log line whose message is `want`.
    pub async fn wait_log(&mut self, want: &str) -> serde_json::Value {
        let seen = &mut self.seen;
        let logs = &mut self.logs;
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let v = logs.recv().await.expect("log line");
                seen.push(v.clone());
                if v["message"] == want {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line {want:?}"))
    }
}

/// The tests that run three replicas against Redis through a fault proxy
/// take one turn each: run together, they load a small machine enough to
/// push the timing of other tests (and their own) past what they check.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the heavy tests' turn; held for the whole test.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// `n` replicas (real processes) in front of `sim`, with `extra` config.
pub async fn replicas(n: usize, sim: &Simulator, extra: &str) -> Vec<Replica> {
    Replica::fleet(n, &config_text(&sim.base_url(), extra)).await
}

/// Each replica's chat completions URL.
pub fn chat_urls(replicas: &[Replica]) -> Vec<String> {
    replicas
        .iter()
        .map(|r| r.url("/v1/chat/completions"))
        .collect()
}

/// What a steady load got back (`drive`).
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    /// Answered 200.
    pub ok: u64,
    /// Refused 429 with the code asked.
    pub refused: u64,
    /// From the first send to the last answer.
    pub elapsed: Duration,
}

/// Sends `key`'s tenant `per_sec` chat requests a second for `run`,
/// round-robin over `urls`, each with `headers`, and waits for every
/// answer. A refusal must be a 429 with the code `refusal` (`None`: none
/// may be refused); any other answer fails the test.
pub async fn drive(
    urls: &[String],
    key: &'static str,
    per_sec: u32,
    run: Duration,
    headers: &'static [(&'static str, &'static str)],
    refusal: Option<&'static str>,
) -> Tally {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0usize;
    while start.elapsed() < run {
        tick.tick().await;
        let url = urls[i % urls.len()].clone();
        tasks.spawn(async move {
            let r = call(&url, key, &chat(&format!("drive {i}")), headers).await;
            (r.status.as_u16(), r.error_code_or_empty())
        });
        i += 1;
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done.expect("request task") {
            (200, _) => ok += 1,
            (429, code) if refusal.is_some_and(|want| code == want) => refused += 1,
            other => panic!("unexpected answer {other:?} (refusals expected: {refusal:?})"),
        }
    }
    Tally {
        ok,
        refused,
        elapsed: start.elapsed(),
    }
}
