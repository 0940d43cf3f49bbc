//! Listeners: the client API (HTTP/1.1 and h2c told apart by a peek at the
//! first bytes, header read timeout, `TCP_NODELAY`), the admin listener (`/metrics`,
//! `/healthz`, `/readyz`), graceful shutdown and the balance poller.
//! `Gateway` is the seam the binary, `sluice demo` and the tests all start.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower_http::catch_panic::{CatchPanic, ResponseForPanic};

mod send_timeout;

use crate::app::App;
use crate::config::{Config, Secret};
use crate::http::error::GatewayError;
use crate::response::body::Body;
use crate::upstream::balance;
use send_timeout::SendTimeout;

/// A bound gateway, not yet serving.
pub struct Gateway {
    app: Arc<App>,
    listener: TcpListener,
    admin: TcpListener,
}

/// Controls a running gateway from outside (signals, tests).
#[derive(Clone)]
pub struct Handle {
    app: Arc<App>,
}

impl Handle {
    /// Applies a new, already validated config (SIGHUP). Returns the keys
    /// whose change was ignored (they cannot change in a running process;
    /// each was logged at warn).
    pub fn reload(&self, config: Config, key: &Secret) -> Vec<&'static str> {
        let ignored = self.app.reload(config, key);
        self.app
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
        ignored
    }

    /// Counts a refused reload.
    pub fn reload_refused(&self) {
        self.app
            .metrics
            .config_reloads
            .with_label_values(&["error"])
            .inc();
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }
}

impl Gateway {
    /// Binds both listeners. Nothing is served until `run`.
    pub async fn bind(config: Config, key: Secret) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(config.server.listen).await?;
        let admin = TcpListener::bind(config.server.admin_listen).await?;
        let app = Arc::new(App::new(config, &key).await?);
        Ok(Gateway {
            app,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn handle(&self) -> Handle {
        Handle {
            app: Arc::clone(&self.app),
        }
    }

    /// Serves until `shutdown` completes, then drains: the listener closes
    /// (new connections are refused), `/readyz` answers 503, and in-flight
    /// requests get `shutdown_grace_secs` to finish; streams still running
    /// then end with the SSE error event.
    ///
    /// Connection settings (`header_read_timeout_secs`,
    /// `keepalive_timeout_secs`, `max_connections`) are read from the
    /// current snapshot at each accept, and the grace when shutdown begins,
    /// so a reload applies them to new connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Gateway {
            app,
            listener,
            admin,
        } = self;
        let admin_task = tokio::spawn(serve_admin(admin, Arc::clone(&app)));
        let poller = tokio::spawn(poll_balance(Arc::clone(&app)));

        let open = Arc::new(Connections::default());
        let (stop, stopping) = watch::channel(false);
        let mut protocols: Option<Arc<Protocols>> = None;

        tokio::pin!(shutdown);
        loop {
            let snap = app.snapshot.load_full();
            let server = &snap.config.server;
            // Past max_connections nothing is accepted: new connections wait
            // in the listen backlog until one closes.
            if open.count() >= server.max_connections {
                tokio::select! {
                    () = open.wait_below(server.max_connections) => continue,
                    () = &mut shutdown => break,
                }
            }
            let protocols = match &protocols {
                Some(p) if p.header_read_timeout == server.header_read_timeout => Arc::clone(p),
                _ => Arc::clone(
                    protocols.insert(Arc::new(Protocols::new(server.header_read_timeout))),
                ),
            };
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off
                            // briefly instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let conn = Conn {
                        _open: open.enter(),
                        stopping: stopping.clone(),
                        keepalive: server.keepalive_timeout,
                    };
                    serve_connection(protocols, conn, stream, Arc::clone(&app));
                }
                () = &mut shutdown => break,
            }
        }

        drop(listener);
        app.lifecycle.stop_accepting();
        // The grace as configured now: a reload may have changed it.
        let grace = app.snapshot.load().config.server.shutdown_grace;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: draining in-flight requests"
        );
        stop.send_replace(true);
        tokio::select! {
            () = open.wait_below(1) => {}
            () = tokio::time::sleep(grace) => {
                tracing::warn!("shutdown grace over: ending the streams still running");
                app.lifecycle.end_grace();
                let _ = tokio::time::timeout(Duration::from_secs(5), open.wait_below(1)).await;
            }
        }
        poller.abort();
        admin_task.abort();
        // Spend recorded during the drain is in the state file too.
        app.limiter.flush();
        tracing::info!("stopped");
    }
}

/// The open client connections, counted so the accept loop can stop at
/// `max_connections` and shutdown can wait for the last one. A connection
/// closing touches two atomics; the `Notify` (and its lock) only when
/// someone waits.
#[derive(Default)]
struct Connections {
    count: AtomicUsize,
    waiting: AtomicBool,
    changed: Notify,
}

/// One open connection's place in `Connections`.
struct Open(Arc<Connections>);

impl Connections {
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Self>) -> Open {
        self.count.fetch_add(1, Ordering::SeqCst);
        Open(Arc::clone(self))
    }

    /// Until fewer than `n` are open. One waiter at a time (the accept
    /// loop, then shutdown).
    async fn wait_below(&self, n: usize) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if self.count() < n {
                self.waiting.store(false, Ordering::SeqCst);
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) {
            self.0.changed.notify_waiters();
        }
    }
}

/// What a connection's task needs beside the socket.
struct Conn {
    _open: Open,
    stopping: watch::Receiver<bool>,
    keepalive: Duration,
}

/// The opening bytes of an HTTP/2 connection (RFC 9113 §3.4); a client
/// with prior knowledge of h2c starts with them, an HTTP/1.1 client cannot.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How client connections are served, built once per
/// `header_read_timeout` (again after a reload changes it).
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// For the rare client whose first segment is a partial preface.
    auto: auto::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl Protocols {
    fn new(header_read_timeout: Duration) -> Protocols {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(true);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)));
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Protocols {
            http1,
            http2,
            auto,
            header_read_timeout,
        }
    }
}

fn serve_connection(protocols: Arc<Protocols>, conn: Conn, stream: TcpStream, app: Arc<App>) {
    // Never hold a small write back waiting for an ACK: a first SSE event
    // must leave at once.
    let _ = stream.set_nodelay(true);
    tokio::spawn(async move {
        // The protocol is told from a peek, not a read, so hyper's own first
        // read gets the whole segment. (hyper-util's auto builder reads the
        // first 24 bytes itself and hands them over; hyper's read buffer
        // then doubles to 16 KiB on the next read, for every connection.)
        let mut head = [0u8; H2_PREFACE.len()];
        let peeked =
            tokio::time::timeout(protocols.header_read_timeout, stream.peek(&mut head)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            // Closed, failed, or silent for the header read timeout.
            _ => return,
        };
        // Read per connection, so a reload applies to new connections.
        let send_timeout = app.snapshot.load().config.server.send_timeout;
        let activity = Arc::new(Activity::new());
        let service = client_service(Proxy {
            app,
            activity: Arc::clone(&activity),
        });
        let io = TokioIo::new(SendTimeout::new(stream, send_timeout));
        // The rarer protocols are boxed, so every connection's task is only
        // as large as an HTTP/1.1 connection needs. (Bound by `let`: a
        // temporary in the awaiting statement would be kept in the task.)
        if head[..n] == H2_PREFACE[..] {
            let served = Box::pin(drive(
                protocols.http2.serve_connection(io, service),
                conn,
                &activity,
            ));
            served.await;
        } else if H2_PREFACE.starts_with(&head[..n]) {
            let served = Box::pin(drive(
                protocols.auto.serve_connection(io, service),
                conn,
                &activity,
            ));
            served.await;
        } else {
            drive(
                protocols.http1.serve_connection(io, service),
                conn,
                &activity,
            )
            .await;
        }
    });
}

/// Runs a client connection until it ends: closed gracefully (HTTP/2:
/// GOAWAY) once it has had no request in flight for `keepalive`, or when
/// shutdown begins. One timer per connection, re-armed at most once per
/// `keepalive`; requests themselves touch only two atomics (`Activity`).
async fn drive<C>(conn: C, mut c: Conn, activity: &Activity)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let idle = tokio::time::sleep(c.keepalive);
    tokio::pin!(idle);
    let mut closing = *c.stopping.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            biased;
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = c.stopping.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = idle.as_mut(), if !closing => {
                let now = tokio::time::Instant::now();
                match activity.idle_since() {
                    Some(since) if since + c.keepalive <= now.into_std() => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Some(since) => idle.as_mut().reset((since + c.keepalive).into()),
                    None => idle.as_mut().reset(now + c.keepalive),
                }
            }
        }
    }
}

/// Whether a connection has a request in flight, and since when it has had
/// none. A request is in flight from its head until its response body is
/// dropped (sent, or the client gone).
struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `base` when the last request ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = self.idle_since_ms.load(Ordering::SeqCst);
        Some(self.base + Duration::from_millis(ms))
    }
}

/// A request in flight on its connection.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: &Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(ms, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The client API as a tower service: `proxy::handle`, with each response
/// body marking its request busy on the connection until it is dropped.
#[derive(Clone)]
struct Proxy {
    app: Arc<App>,
    activity: Arc<Activity>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<Request<Incoming>> for Proxy {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Tracked>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::begin(&self.activity);
        let handling = crate::request::handle(Arc::clone(&self.app), req);
        Box::pin(async move {
            let resp = handling.await?;
            Ok(resp.map(|body| Tracked { body, _busy: busy }))
        })
    }
}

/// A response body that keeps its request marked busy until dropped.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The layers around the client API, outermost first:
///
/// - `CatchPanic` (tower-http): a panic while a request is handled becomes
///   a 500 in the OpenAI error shape (`internal_error`) instead of a
///   dropped connection; the connection stays usable. (A panic while a
///   response body is polled is past this layer: hyper drops that
///   connection.)
///
/// Then `TowerToHyperService` turns the stack into the service hyper calls.
fn client_service<S, B>(inner: S) -> TowerToHyperService<CatchPanic<S, PanicAnswer>>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone,
{
    TowerToHyperService::new(CatchPanic::custom(inner, PanicAnswer))
}

/// The answer to a panic: Sluice's 500, logged without the payload (a
/// panic message could quote request data).
#[derive(Clone, Copy)]
struct PanicAnswer;

impl ResponseForPanic for PanicAnswer {
    type ResponseBody = Full<Bytes>;

    fn response_for_panic(
        &mut self,
        _: Box<dyn std::any::Any + Send + 'static>,
    ) -> Response<Full<Bytes>> {
        tracing::error!("a request handler panicked; answered 500");
        GatewayError::Internal.into_response().map(Full::new)
    }
}

async fn serve_admin(listener: TcpListener, app: Arc<App>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |req| std::future::ready(admin(&app, &req)));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn admin(app: &App, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body): (StatusCode, &'static str, Bytes) =
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let (entries, bytes) = app.cache.local().stats();
                app.metrics
                    .cache_entries
                    .set(i64::try_from(entries).unwrap_or(i64::MAX));
                app.metrics
                    .cache_bytes
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    Bytes::from(app.metrics.render()),
                )
            }
            (&Method::GET, "/healthz") => {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
            }
            (&Method::GET, "/readyz") => {
                if app.lifecycle.is_ready() {
                    (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        Bytes::from_static(b"shutting down\n"),
                    )
                }
            }
            (_, "/metrics" | "/healthz" | "/readyz") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"method not allowed\n"),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"not found\n"),
            ),
        };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(resp)
}

/// Polls each upstream's balance for `sluice_upstream_balance` while
/// `balance_poll_secs` is set (read again after each poll, so a reload
/// applies).
async fn poll_balance(app: Arc<App>) {
    loop {
        let snap = app.snapshot.load_full();
        let Some(every) = snap.config.upstream.balance_poll else {
            tokio::time::sleep(Duration::from_secs(60)).await;
            continue;
        };
        if let Some(peer) = snap.upstreams.choose() {
            let cfg = &snap.config.upstream;
            if let Err(e) = balance::fetch(&app.upstream, peer, cfg, &app.metrics).await {
                tracing::debug!(error = %e, "balance poll failed");
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A service that panics on every request, behind the same layers as
    /// the client API.
    #[derive(Clone)]
    struct Panics;

    impl tower_service::Service<Request<Incoming>> for Panics {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = BoxFuture<Result<Response<Full<Bytes>>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Incoming>) -> Self::Future {
            if req.uri().path() == "/sync" {
                panic!("a panic before the future");
            }
            Box::pin(async { panic!("a panic in the request path") })
        }
    }

    #[tokio::test]
    async fn a_panic_is_a_500_in_the_openai_shape_and_the_connection_stays() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), client_service(Panics))
                .await;
        });
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        // Both on one connection: it survives each panic.
        for path in ["/async", "/sync", "/async"] {
            let resp = send
                .send_request(
                    Request::post(path)
                        .header("host", "x")
                        .body(Full::new(Bytes::new()))
                        .expect("req"),
                )
                .await
                .expect("an answer, not a dropped connection");
            assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["error"]["code"], "internal_error");
            assert_eq!(v["error"]["type"], "api_error");
            assert!(v["error"]["param"].is_null() && v["error"]["message"].is_string());
        }
        server.abort();
    }
}
