//! Test support: the simulator on an ephemeral port, a `TestGateway` that
//! binds port 0 and shuts down on drop, and a small HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

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

pub fn parse(text: &str) -> Config {
    Config::parse(text, |_| None).expect("test config is valid")
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
        let gateway = Gateway::bind(config, Secret::new(UPSTREAM_KEY))
            .await
            .expect("bind");
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
    pub body: Bytes,
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

/// Sends a request and reads the whole answer.
pub async fn send(req: Request<Full<Bytes>>) -> Resp {
    let resp = client().request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).expect("body");
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
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
    let mut b = post(url, key);
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
