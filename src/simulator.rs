//! A simulated DeepSeek upstream, shared by the tests, the benchmarks and
//! `sluice demo`. It speaks DeepSeek's shapes: chat, chat prefix completion
//! and FIM, streamed or not; `reasoning_content` for deepseek-reasoner;
//! `tool_calls` as deltas; usage with DeepSeek's fields; `: keep-alive`
//! comments and leading blank lines; `GET /models` and `GET /user/balance`.
//! And Anthropic's Messages API as DeepSeek serves it (`/anthropic/v1/messages`,
//! also `/v1/messages`): a text block, a thinking block with its signature
//! first when the request enables `thinking`, a tool_use block when it
//! sends `tools`; streamed (with a `ping`) or not; usage with Anthropic's
//! fields (a quarter of the prompt read from the cache); Anthropic's error
//! bodies; and `/v1/messages/count_tokens`.
//!
//! Faults are chosen per request with `x-sim-*` headers (which Sluice
//! forwards like any other header), alike for both APIs:
//!
//! | header | effect |
//! |---|---|
//! | `x-sim-status: N` | answer with status N and a DeepSeek error body |
//! | `x-sim-fail-first: N` + `x-sim-key: K` | only the first N calls with key K fail (status from `x-sim-status`, default 503) |
//! | `x-sim-retry-after: S` | `retry-after` on error answers |
//! | `x-sim-latency-ms: N` | wait before the response headers |
//! | `x-sim-body-delay-ms: N` | non-stream: the body follows the headers after N ms |
//! | `x-sim-chunk-delay-ms: N` | wait between stream events |
//! | `x-sim-chunks: N` | content chunks (default 5) |
//! | `x-sim-answer-bytes: N` | content of about N bytes |
//! | `x-sim-usage: P,C` | prompt and completion tokens to report (Messages: P is input + cache read) |
//! | `x-sim-no-usage: 1` | ignore `include_usage` (and omit usage; Messages: no `usage` anywhere) |
//! | `x-sim-ping-every-ms: N` | Messages streams: `ping` events every N ms during each `x-sim-chunk-delay-ms` gap |
//! | `x-sim-keepalive: N` | N keep-alive comments (stream; Messages: `ping` events) / blank lines (non-stream) first |
//! | `x-sim-die-after: N` | the connection dies after N events (stream) or N bytes |
//! | `x-sim-hang: headers\|body` | never answer / never send the body |
//! | `x-sim-garbage: 1` | a non-JSON event mid-stream, or a non-JSON 200 body |
//! | `x-sim-linger: 1` | the stream stays open after `data: [DONE]` (Messages: `message_stop`) |
//! | `x-sim-error-event: N` | after N events, an error event and `data: [DONE]` end the stream (Messages: an `event: error`, then the stream ends) |
//! | `x-sim-close: 1` | the failing calls close the connection without answering |
//! | `x-sim-upstream: NAME` | the other `x-sim-*` faults apply only on the simulator of that name (`sluice simulate --name`) |
//! | `x-sim-account-headers: 1` | answers carry the shared account's headers (`set-cookie`, `openai-organization`, `openai-project`, `x-ratelimit-*`, `anthropic-ratelimit-*`) and a harmless `x-upstream-note` |
//!
//! `GET /sim/stats` reports the number of completion calls and of
//! connections accepted, and the path and query of the last call, as JSON. Messages and token counts are completion
//! calls too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the simulator saw, for tests to assert on.
#[derive(Default)]
pub(crate) struct SimStats {
    calls: AtomicU64,
    /// Completion calls between arrival and response headers, and the most
    /// there ever were at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    connections: AtomicU64,
    aborted: AtomicU64,
    aborted_notify: tokio::sync::Notify,
    ids: AtomicU64,
    last: Mutex<Option<(HeaderMap, Bytes)>>,
    /// The path and query of the last completion call.
    last_uri: Mutex<Option<String>>,
    failures: Mutex<HashMap<String, u32>>,
    /// Its name, for `x-sim-upstream` (several simulators behind one
    /// gateway).
    name: String,
}

/// A running simulator; stops when dropped.
pub struct Simulator {
    addr: SocketAddr,
    stats: Arc<SimStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    pub async fn start(addr: SocketAddr) -> std::io::Result<Simulator> {
        Self::start_named(addr, "").await
    }

    /// A simulator whose faults apply only to requests whose
    /// `x-sim-upstream` names it (or that name none).
    pub async fn start_named(addr: SocketAddr, name: &str) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(SimStats {
            name: name.to_string(),
            ..SimStats::default()
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&stats)));
        Ok(Simulator { addr, stats, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Completion calls received (chat, prefix, FIM), retries included.
    pub fn calls(&self) -> u64 {
        self.stats.calls.load(Ordering::SeqCst)
    }

    /// The most completion calls that were ever waiting for their response
    /// headers at once (what upstream sees of a concurrency cap).
    pub fn max_in_flight(&self) -> u64 {
        self.stats.max_in_flight.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// Streams whose reader went away before the end (Sluice cancelled them).
    pub fn aborted(&self) -> u64 {
        self.stats.aborted.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` streams were aborted by their reader.
    pub async fn wait_aborted(&self, n: u64) {
        loop {
            let notified = self.stats.aborted_notify.notified();
            if self.aborted() >= n {
                return;
            }
            notified.await;
        }
    }

    /// The path and query of the last completion call.
    pub fn last_uri(&self) -> Option<String> {
        self.stats
            .last_uri
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Headers and body of the last completion call.
    pub fn last_request(&self) -> Option<(HeaderMap, Bytes)> {
        self.stats
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the simulator on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, stats: Arc<SimStats>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&stats), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The simulator's body: whole bytes, or events fed by a task (which can
/// also make the body fail, killing the connection mid-answer).
pub(crate) enum SimBody {
    Full(Option<Bytes>),
    Chan(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl http_body::Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Chan(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            SimBody::Full(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            SimBody::Chan(_) => http_body::SizeHint::default(),
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: SimBody) -> Response<SimBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<SimBody> {
    respond(
        status,
        "application/json",
        SimBody::Full(Some(Bytes::from(v.to_string()))),
    )
}

fn error_body(status: StatusCode) -> Value {
    let (message, ty) = match status.as_u16() {
        400 => ("Invalid request body", "invalid_request_error"),
        401 => (
            "Authentication Fails, Your api key is invalid",
            "authentication_error",
        ),
        402 => ("Insufficient Balance", "unknown_error"),
        422 => ("Invalid Parameters", "invalid_request_error"),
        429 => ("Rate Limit Reached", "rate_limit_error"),
        503 => ("Server Overloaded", "service_unavailable_error"),
        _ => ("Server Error", "api_error"),
    };
    json!({"error": {"message": message, "type": ty, "param": null, "code": "invalid_request_error"}})
}

/// An error body as Anthropic (and DeepSeek's Messages API) writes it.
fn anthropic_error_body(status: StatusCode) -> Value {
    let (message, ty) = match status.as_u16() {
        400 => ("Invalid request body", "invalid_request_error"),
        401 => ("invalid x-api-key", "authentication_error"),
        402 => ("Insufficient Balance", "billing_error"),
        403 => ("Forbidden", "permission_error"),
        404 => ("Not found", "not_found_error"),
        429 => ("Rate limited", "rate_limit_error"),
        529 => ("Overloaded", "overloaded_error"),
        _ => ("Internal server error", "api_error"),
    };
    json!({"type": "error", "error": {"type": ty, "message": message}, "request_id": "req_sim"})
}

/// Characters of a request's prompt: its messages' string contents (and,
/// for the Messages API, the text of its blocks and of `system`).
fn prompt_chars(request: &Value, fim: bool) -> usize {
    if fim {
        return request
            .get("prompt")
            .and_then(Value::as_str)
            .map_or(0, str::len);
    }
    let content = |c: &Value| match c {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    };
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |m| {
            m.iter().filter_map(|m| m.get("content")).map(content).sum()
        });
    messages + request.get("system").map_or(0, content)
}

struct Faults {
    status: Option<u16>,
    fail_first: Option<(String, u32)>,
    retry_after: Option<String>,
    latency: Duration,
    body_delay: Duration,
    chunk_delay: Duration,
    /// Messages: `ping` events this often during each `chunk_delay`.
    ping_every: Option<Duration>,
    chunks: usize,
    answer_bytes: Option<usize>,
    usage: Option<(u64, u64)>,
    no_usage: bool,
    keepalive: usize,
    die_after: Option<usize>,
    hang: Option<String>,
    garbage: bool,
    linger: bool,
    close: bool,
    error_event: Option<usize>,
    account_headers: bool,
}

impl Faults {
    fn of(h: &HeaderMap) -> Faults {
        let s = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let n = |name: &str| s(name).and_then(|v| v.trim().parse::<u64>().ok());
        Faults {
            status: n("x-sim-status").and_then(|v| u16::try_from(v).ok()),
            fail_first: n("x-sim-fail-first")
                .map(|count| (s("x-sim-key").unwrap_or_default(), count as u32)),
            retry_after: s("x-sim-retry-after"),
            latency: Duration::from_millis(n("x-sim-latency-ms").unwrap_or(0)),
            body_delay: Duration::from_millis(n("x-sim-body-delay-ms").unwrap_or(0)),
            chunk_delay: Duration::from_millis(n("x-sim-chunk-delay-ms").unwrap_or(0)),
            ping_every: n("x-sim-ping-every-ms")
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            chunks: n("x-sim-chunks").map_or(5, |c| c.clamp(1, 100_000) as usize),
            answer_bytes: n("x-sim-answer-bytes").map(|b| b.min(64 << 20) as usize),
            usage: s("x-sim-usage").and_then(|v| {
                let (p, c) = v.split_once(',')?;
                Some((p.trim().parse().ok()?, c.trim().parse().ok()?))
            }),
            no_usage: s("x-sim-no-usage").is_some(),
            keepalive: n("x-sim-keepalive").unwrap_or(0) as usize,
            die_after: n("x-sim-die-after").map(|d| d as usize),
            hang: s("x-sim-hang"),
            garbage: s("x-sim-garbage").is_some(),
            linger: s("x-sim-linger").is_some(),
            close: s("x-sim-close").is_some(),
            error_event: n("x-sim-error-event").map(|e| e as usize),
            account_headers: s("x-sim-account-headers").is_some(),
        }
    }
}

async fn handle(
    stats: Arc<SimStats>,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, std::io::Error> {
    let path = req.uri().path().to_string();
    let endpoint = match (req.method(), path.as_str()) {
        (&Method::GET, "/models" | "/v1/models") => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": [
                    {"id": "deepseek-chat", "object": "model", "owned_by": "deepseek"},
                    {"id": "deepseek-reasoner", "object": "model", "owned_by": "deepseek"},
                ]}),
            ))
        }
        (&Method::GET, "/user/balance") => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"is_available": true, "balance_infos": [
                    {"currency": "CNY", "total_balance": "110.00", "granted_balance": "10.00", "topped_up_balance": "100.00"}
                ]}),
            ))
        }
        (&Method::GET, "/sim/stats") => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({
                    "calls": stats.calls.load(Ordering::SeqCst),
                    "connections": stats.connections.load(Ordering::SeqCst),
                    "last_uri": stats.last_uri.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                }),
            ));
        }
        (
            &Method::POST,
            "/chat/completions" | "/v1/chat/completions" | "/beta/chat/completions",
        ) => "chat",
        (&Method::POST, "/beta/completions") => "fim",
        (&Method::POST, "/anthropic/v1/messages" | "/v1/messages") => "messages",
        (&Method::POST, "/anthropic/v1/messages/count_tokens" | "/v1/messages/count_tokens") => {
            "count_tokens"
        }
        _ => {
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                &error_body(StatusCode::NOT_FOUND),
            ))
        }
    };
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    stats.calls.fetch_add(1, Ordering::SeqCst);
    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let answer = answer(&stats, endpoint, parts, body).await;
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    answer
}

/// A completion call's answer, after its faults.
async fn answer(
    stats: &Arc<SimStats>,
    endpoint: &'static str,
    parts: http::request::Parts,
    body: Bytes,
) -> Result<Response<SimBody>, std::io::Error> {
    *stats.last.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((parts.headers.clone(), body.clone()));
    *stats.last_uri.lock().unwrap_or_else(|e| e.into_inner()) =
        parts.uri.path_and_query().map(|p| p.as_str().to_string());
    // Faults aimed at another simulator are not this one's.
    let aimed_elsewhere = parts
        .headers
        .get("x-sim-upstream")
        .is_some_and(|v| v.as_bytes() != stats.name.as_bytes());
    let faults = if aimed_elsewhere {
        Faults::of(&HeaderMap::new())
    } else {
        Faults::of(&parts.headers)
    };
    let mut r = answer_with(stats, endpoint, body, &faults).await?;
    if faults.account_headers {
        let h = r.headers_mut();
        for (k, v) in [
            ("set-cookie", "session=shared-account; Path=/"),
            ("openai-organization", "org-shared"),
            ("openai-project", "proj-shared"),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-limit-tokens", "5000000"),
            ("x-ratelimit-remaining-tokens", "4999000"),
            ("x-ratelimit-reset-tokens", "12ms"),
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:00:00Z"),
            ("x-upstream-note", "kept"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
    }
    Ok(r)
}

async fn answer_with(
    stats: &Arc<SimStats>,
    endpoint: &'static str,
    body: Bytes,
    faults: &Faults,
) -> Result<Response<SimBody>, std::io::Error> {
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.hang.as_deref() == Some("headers") {
        std::future::pending::<()>().await;
    }
    let failing = match &faults.fail_first {
        Some((key, count)) => {
            let mut f = stats.failures.lock().unwrap_or_else(|e| e.into_inner());
            let seen = f.entry(key.clone()).or_insert(0);
            *seen += 1;
            (*seen <= *count).then(|| faults.status.unwrap_or(503))
        }
        None => faults.status.or(faults.close.then_some(503)),
    };
    if failing.is_some() && faults.close {
        // hyper drops the connection when the service fails: no response.
        return Err(std::io::Error::other("simulated connection close"));
    }
    let anthropic = matches!(endpoint, "messages" | "count_tokens");
    if let Some(code) = failing {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = if anthropic {
            anthropic_error_body(status)
        } else {
            error_body(status)
        };
        let mut r = json_response(status, &body);
        if let Some(ra) = faults
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            r.headers_mut().insert(header::RETRY_AFTER, ra);
        }
        return Ok(r);
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        let status = StatusCode::BAD_REQUEST;
        let body = if anthropic {
            anthropic_error_body(status)
        } else {
            error_body(status)
        };
        return Ok(json_response(status, &body));
    };
    if endpoint == "count_tokens" {
        let tokens = prompt_chars(&request, false).div_ceil(4) + 5;
        return Ok(json_response(
            StatusCode::OK,
            &json!({"input_tokens": tokens}),
        ));
    }
    let id = format!("sim-{}", stats.ids.fetch_add(1, Ordering::Relaxed));
    let answer = Answer::new(endpoint, &request, faults, id);
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if anthropic {
        return Ok(if stream {
            stream_response(answer.message_events(!faults.no_usage), faults, stats)
        } else {
            whole_response(answer.message(!faults.no_usage), faults)
        });
    }
    if stream {
        let include_usage = !faults.no_usage
            && request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        Ok(stream_response(answer.events(include_usage), faults, stats))
    } else {
        Ok(whole_response(answer.completion(!faults.no_usage), faults))
    }
}

fn whole_response(completion: Value, faults: &Faults) -> Response<SimBody> {
    let mut body = "\n".repeat(faults.keepalive).into_bytes();
    if faults.garbage {
        body.extend_from_slice(b"<html>502 Bad Gateway</html>");
    } else {
        serde_json::to_writer(&mut body, &completion).ok();
    }
    let body = Bytes::from(body);
    if faults.hang.is_none() && faults.die_after.is_none() && faults.body_delay.is_zero() {
        return respond(
            StatusCode::OK,
            "application/json",
            SimBody::Full(Some(body)),
        );
    }
    let (tx, rx) = mpsc::channel(4);
    let die_after = faults.die_after;
    let hang = faults.hang.is_some();
    let body_delay = faults.body_delay;
    tokio::spawn(async move {
        if hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(body_delay).await;
        let Some(cut) = die_after.map(|n| n.min(body.len())) else {
            let _ = tx.send(Ok(body)).await;
            return;
        };
        let _ = tx.send(Ok(body.slice(..cut))).await;
        // Let the partial body reach the wire before the connection dies.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = tx.send(Err(std::io::Error::other("simulated death"))).await;
    });
    respond(StatusCode::OK, "application/json", SimBody::Chan(rx))
}

/// A stream's events, and how many of them (the first ones) are content,
/// paced by `x-sim-chunk-delay-ms`; the usage chunk and `[DONE]` follow the
/// last content chunk at once, as DeepSeek sends them.
struct Events {
    all: Vec<Bytes>,
    paced: usize,
    /// Anthropic's events: an error event ends the stream by itself.
    anthropic: bool,
}

fn stream_response(events: Events, faults: &Faults, stats: &Arc<SimStats>) -> Response<SimBody> {
    let keepalives = faults.keepalive;
    let instant = faults.chunk_delay.is_zero()
        && faults.die_after.is_none()
        && faults.hang.is_none()
        && !faults.garbage
        && !faults.linger
        && faults.error_event.is_none()
        && keepalives == 0;
    let mut r = if instant {
        // Fast path for benchmarks: the whole stream in one write.
        let all: Vec<u8> = events.all.iter().flat_map(|e| e.iter().copied()).collect();
        respond(
            StatusCode::OK,
            "text/event-stream",
            SimBody::Full(Some(Bytes::from(all))),
        )
    } else {
        let (tx, rx) = mpsc::channel(16);
        let delay = faults.chunk_delay;
        let ping_every = faults.ping_every;
        let die_after = faults.die_after;
        let hang = faults.hang.is_some();
        let garbage = faults.garbage;
        let linger = faults.linger;
        let error_event = faults.error_event;
        let anthropic = events.anthropic;
        let stats = Arc::clone(stats);
        let aborted = move || {
            stats.aborted.fetch_add(1, Ordering::SeqCst);
            stats.aborted_notify.notify_waiters();
        };
        tokio::spawn(async move {
            // Messages: Anthropic's `ping` events rather than comments.
            let keepalive: &'static [u8] = if anthropic {
                b"event: ping\ndata: {\"type\":\"ping\"}\n\n"
            } else {
                b": keep-alive\n\n"
            };
            for _ in 0..keepalives {
                if tx.send(Ok(Bytes::from_static(keepalive))).await.is_err() {
                    return;
                }
            }
            if hang {
                // Headers (and keep-alives) went out; the events never come.
                std::future::pending::<()>().await;
            }
            let paced = events.paced;
            for (i, ev) in events.all.into_iter().enumerate() {
                if error_event == Some(i) {
                    if anthropic {
                        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"Internal server error\"}}\n\n";
                        let _ = tx.send(Ok(Bytes::from_static(error.as_bytes()))).await;
                        return;
                    }
                    let error = "data: {\"error\":{\"message\":\"Server Error\",\"type\":\"api_error\",\"param\":null,\"code\":\"internal_error\"}}\n\n";
                    let _ = tx.send(Ok(Bytes::from_static(error.as_bytes()))).await;
                    let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                    return;
                }
                if die_after == Some(i) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = tx.send(Err(std::io::Error::other("simulated death"))).await;
                    return;
                }
                if garbage && i == 1 {
                    let _ = tx
                        .send(Ok(Bytes::from_static(b"data: {this is not json\n\n")))
                        .await;
                }
                if i > 0 && i < paced && !delay.is_zero() {
                    match ping_every.filter(|_| anthropic) {
                        None => tokio::time::sleep(delay).await,
                        // The gap filled with pings.
                        Some(every) => {
                            let until = tokio::time::Instant::now() + delay;
                            while tokio::time::Instant::now() + every < until {
                                tokio::time::sleep(every).await;
                                if tx.send(Ok(Bytes::from_static(keepalive))).await.is_err() {
                                    aborted();
                                    return;
                                }
                            }
                            tokio::time::sleep_until(until).await;
                        }
                    }
                }
                if tx.send(Ok(ev)).await.is_err() {
                    aborted();
                    return;
                }
            }
            if linger {
                // Keep the body open until the reader goes away.
                tx.closed().await;
            }
        });
        respond(StatusCode::OK, "text/event-stream", SimBody::Chan(rx))
    };
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// One simulated answer, rendered either whole or as events.
struct Answer {
    fim: bool,
    id: String,
    model: String,
    created: u64,
    reasoning: Vec<String>,
    content: Vec<String>,
    tool: Option<(String, Vec<String>)>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Answer {
    fn new(endpoint: &str, request: &Value, faults: &Faults, id: String) -> Answer {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("deepseek-chat")
            .to_string();
        let fim = endpoint == "fim";
        let messages = endpoint == "messages";
        // Messages: thinking when the request enables it.
        let thinking = request
            .pointer("/thinking/type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "disabled");
        let reasoning =
            if (model == "deepseek-reasoner" && !fim && !messages) || (messages && thinking) {
                ["Let me ", "think ", "about this."]
                    .map(String::from)
                    .to_vec()
            } else {
                Vec::new()
            };
        // Messages: a tool is called once per turn; an answer to a tool's
        // result is text (so a client that runs tools, like an agent,
        // ends its turn instead of calling tools forever).
        let answers_tool_result = messages
            && request
                .pointer("/messages")
                .and_then(Value::as_array)
                .and_then(|m| m.last())
                .and_then(|m| m.get("content"))
                .and_then(Value::as_array)
                .is_some_and(|blocks| {
                    blocks
                        .iter()
                        .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                });
        let tool = request
            .get("tools")
            .filter(|_| !answers_tool_result)
            .and_then(Value::as_array)
            .and_then(|t| t.first())
            .filter(|_| request.get("tool_choice").and_then(Value::as_str) != Some("none"))
            .filter(|_| {
                request.pointer("/tool_choice/type").and_then(Value::as_str) != Some("none")
            })
            .and_then(|t| {
                // OpenAI's tools name a function; Anthropic's are named.
                let at = if messages { "/name" } else { "/function/name" };
                t.pointer(at).and_then(Value::as_str)
            })
            .filter(|_| !fim)
            .map(|name| {
                (
                    name.to_string(),
                    ["{\"city\": ", "\"Paris\"", "}"].map(String::from).to_vec(),
                )
            });
        let content: Vec<String> = match faults.answer_bytes {
            Some(bytes) => {
                let per = (bytes / faults.chunks).max(1);
                (0..faults.chunks)
                    .map(|i| ((b'a' + (i % 26) as u8) as char).to_string().repeat(per))
                    .collect()
            }
            None => {
                let base = ["This ", "is ", "a ", "simulated ", "answer."];
                (0..faults.chunks)
                    .map(|i| {
                        base.get(i)
                            .map_or_else(|| format!(" more{i}"), |s| s.to_string())
                    })
                    .collect()
            }
        };
        let prompt_chars = prompt_chars(request, fim);
        let (prompt_tokens, completion_tokens) = faults.usage.unwrap_or((
            (prompt_chars as u64).div_ceil(4) + 5,
            (content.len() + reasoning.len()) as u64 * 2,
        ));
        Answer {
            fim,
            id,
            model,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            reasoning,
            content,
            tool,
            prompt_tokens,
            completion_tokens,
        }
    }

    fn usage(&self) -> Value {
        let hit = self.prompt_tokens / 4;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens.saturating_add(self.completion_tokens),
            "prompt_tokens_details": {"cached_tokens": hit},
            "prompt_cache_hit_tokens": hit,
            "prompt_cache_miss_tokens": self.prompt_tokens - hit,
            "completion_tokens_details": {"reasoning_tokens": if self.reasoning.is_empty() { 0 } else { self.reasoning.len() as u64 * 2 }},
        })
    }

    fn finish_reason(&self) -> &'static str {
        if self.tool.is_some() {
            "tool_calls"
        } else {
            "stop"
        }
    }

    fn completion(&self, with_usage: bool) -> Value {
        let mut v = if self.fim {
            json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": "fp_sim",
                "choices": [{"index": 0, "text": self.content.concat(), "logprobs": null, "finish_reason": "stop"}],
            })
        } else {
            let mut message = json!({"role": "assistant", "content": if self.tool.is_some() { Value::Null } else { Value::from(self.content.concat()) }});
            if !self.reasoning.is_empty() {
                message["reasoning_content"] = Value::from(self.reasoning.concat());
            }
            if let Some((name, args)) = &self.tool {
                message["tool_calls"] = json!([{"id": "call_sim_0", "type": "function", "function": {"name": name, "arguments": args.concat()}}]);
            }
            json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": "fp_sim",
                "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": self.finish_reason()}],
            })
        };
        if with_usage {
            v["usage"] = self.usage();
        }
        v
    }

    /// Usage in Anthropic's fields: a quarter of the prompt read from the
    /// prompt cache.
    fn message_usage(&self) -> Value {
        let hit = self.prompt_tokens / 4;
        json!({
            "input_tokens": self.prompt_tokens - hit,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": hit,
            "output_tokens": self.completion_tokens,
        })
    }

    fn stop_reason(&self) -> &'static str {
        if self.tool.is_some() {
            "tool_use"
        } else {
            "end_turn"
        }
    }

    /// The signature of the thinking block (opaque to clients).
    fn signature(&self) -> String {
        format!("sim-signature-{}", self.id)
    }

    /// A whole Messages answer.
    fn message(&self, with_usage: bool) -> Value {
        let mut content = Vec::new();
        if !self.reasoning.is_empty() {
            content.push(json!({"type": "thinking", "thinking": self.reasoning.concat(), "signature": self.signature()}));
        }
        content.push(json!({"type": "text", "text": self.content.concat()}));
        if let Some((name, args)) = &self.tool {
            let input: Value = serde_json::from_str(&args.concat()).unwrap_or(Value::Null);
            content.push(
                json!({"type": "tool_use", "id": "toolu_sim_0", "name": name, "input": input}),
            );
        }
        let mut v = json!({
            "id": format!("msg_{}", self.id), "type": "message", "role": "assistant",
            "model": self.model, "content": content,
            "stop_reason": self.stop_reason(), "stop_sequence": null,
        });
        if with_usage {
            v["usage"] = self.message_usage();
        }
        v
    }

    /// A Messages stream: `message_start`, a `ping`, each block's start,
    /// deltas and stop, `message_delta` and `message_stop`.
    fn message_events(&self, with_usage: bool) -> Events {
        let event = |v: Value| -> Bytes {
            let kind = v["type"].as_str().unwrap_or("").to_string();
            Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))
        };
        let mut start = json!({
            "id": format!("msg_{}", self.id), "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
        });
        if with_usage {
            let mut u = self.message_usage();
            u["output_tokens"] = Value::from(1);
            start["usage"] = u;
        }
        let mut out = vec![
            event(json!({"type": "message_start", "message": start})),
            event(json!({"type": "ping"})),
        ];
        let mut index = 0;
        if !self.reasoning.is_empty() {
            out.push(event(json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})));
            for piece in &self.reasoning {
                out.push(event(json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": piece}})));
            }
            out.push(event(json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": self.signature()}})));
            out.push(event(json!({"type": "content_block_stop", "index": index})));
            index += 1;
        }
        out.push(event(json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
        for piece in &self.content {
            out.push(event(json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}})));
        }
        out.push(event(json!({"type": "content_block_stop", "index": index})));
        if let Some((name, args)) = &self.tool {
            index += 1;
            out.push(event(json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": "toolu_sim_0", "name": name, "input": {}}})));
            for a in args {
                out.push(event(json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": a}})));
            }
            out.push(event(json!({"type": "content_block_stop", "index": index})));
        }
        let mut delta = json!({"type": "message_delta", "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null}});
        if with_usage {
            delta["usage"] = json!({"output_tokens": self.completion_tokens});
        }
        out.push(event(delta));
        let paced = out.len();
        out.push(event(json!({"type": "message_stop"})));
        Events {
            all: out,
            paced,
            anthropic: true,
        }
    }

    fn events(&self, include_usage: bool) -> Events {
        let object = if self.fim {
            "text_completion"
        } else {
            "chat.completion.chunk"
        };
        let event = |choices: Value, usage: Option<Value>| -> Bytes {
            let mut v = json!({
                "id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": "fp_sim", "choices": choices,
            });
            if let Some(u) = usage {
                v["usage"] = u;
            }
            Bytes::from(format!("data: {v}\n\n"))
        };
        let mut out = Vec::new();
        if self.fim {
            for piece in &self.content {
                out.push(event(
                    json!([{"index": 0, "text": piece, "logprobs": null, "finish_reason": null}]),
                    None,
                ));
            }
            out.push(event(
                json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": "stop"}]),
                None,
            ));
        } else {
            out.push(event(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None));
            for piece in &self.reasoning {
                out.push(event(json!([{"index": 0, "delta": {"content": null, "reasoning_content": piece}, "logprobs": null, "finish_reason": null}]), None));
            }
            match &self.tool {
                Some((name, args)) => {
                    out.push(event(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_sim_0", "type": "function", "function": {"name": name, "arguments": ""}}]}, "logprobs": null, "finish_reason": null}]), None));
                    for a in args {
                        out.push(event(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}, "logprobs": null, "finish_reason": null}]), None));
                    }
                }
                None => {
                    for piece in &self.content {
                        out.push(event(json!([{"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}]), None));
                    }
                }
            }
            out.push(event(json!([{"index": 0, "delta": {"content": ""}, "logprobs": null, "finish_reason": self.finish_reason()}]), None));
        }
        let paced = out.len();
        if include_usage {
            out.push(event(json!([]), Some(self.usage())));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Events {
            all: out,
            paced,
            anthropic: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::anthropic::Assembler;
    use crate::api::sse::{event_data, EventData, Framer};

    fn faults() -> Faults {
        Faults::of(&HeaderMap::new())
    }

    /// A Messages stream of the simulator, assembled.
    fn assembled(events: Events) -> Value {
        let mut framer = Framer::default();
        let mut a = Assembler::new();
        for chunk in events.all {
            let mut evs = Vec::new();
            framer.push(chunk, |e| evs.push(e)).expect("sse");
            for ev in evs {
                if let EventData::Data(d) = event_data(&ev) {
                    a.push(&d).expect("json");
                }
            }
        }
        assert!(a.is_whole());
        a.finish()
    }

    #[test]
    fn a_messages_stream_assembles_into_the_whole_message() {
        let request = json!({
            "model": "claude-sonnet-4-5", "max_tokens": 100,
            "thinking": {"type": "enabled", "budget_tokens": 50},
            "system": "be brief",
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        });
        let answer = Answer::new("messages", &request, &faults(), "sim-1".into());
        let whole = answer.message(true);
        let kinds: Vec<&str> = whole["content"]
            .as_array()
            .expect("content")
            .iter()
            .filter_map(|b| b["type"].as_str())
            .collect();
        assert_eq!(kinds, ["thinking", "text", "tool_use"]);
        assert_eq!(whole["content"][2]["input"], json!({"city": "Paris"}));
        assert_eq!(whole["stop_reason"], "tool_use");
        assert_eq!(assembled(answer.message_events(true)), whole);
        // A tool's result is answered with text.
        let after_tool = json!({
            "model": "m", "max_tokens": 5,
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "sunny"}]},
            ],
        });
        let answer = Answer::new("messages", &after_tool, &faults(), "sim-3".into());
        assert_eq!(answer.message(true)["stop_reason"], "end_turn");
        // Without thinking or tools: one text block.
        let plain =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        let answer = Answer::new("messages", &plain, &faults(), "sim-2".into());
        let whole = answer.message(false);
        assert_eq!(whole["content"].as_array().map(Vec::len), Some(1));
        assert!(whole.get("usage").is_none());
        assert_eq!(assembled(answer.message_events(false)), whole);
    }
}
