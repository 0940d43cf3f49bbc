//! Listeners: the client API (HTTP/1.1 and h2c told apart by a peek at the
//! first bytes, header read timeout, `TCP_NODELAY`), the admin listener (`/metrics`,
//! `/healthz`, `/readyz`), graceful shutdown and the balance poller.
//! `Gateway` is the seam the binary, `sluice demo` and the tests all start.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, Secret};
use crate::send_timeout::SendTimeout;
use crate::state::App;
use crate::upstream::{read_small, Outbound};

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
    /// Applies a new, already validated config (SIGHUP).
    pub fn reload(&self, config: Config, key: &Secret) {
        self.app.reload(config, key);
        self.app
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
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
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Gateway {
            app,
            listener,
            admin,
        } = self;
        let admin_task = tokio::spawn(serve_admin(admin, Arc::clone(&app)));
        let poller = tokio::spawn(poll_balance(Arc::clone(&app)));

        let config = app.snapshot.load().config.server.clone();
        let protocols = Arc::new(Protocols::new(config.header_read_timeout));
        let graceful = GracefulShutdown::new();

        tokio::pin!(shutdown);
        loop {
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
                    serve_connection(&protocols, graceful.watcher(), stream, Arc::clone(&app));
                }
                () = &mut shutdown => break,
            }
        }

        drop(listener);
        app.lifecycle.stop_accepting();
        tracing::info!(
            grace_secs = config.shutdown_grace.as_secs(),
            "shutting down: draining in-flight requests"
        );
        let drained = graceful.shutdown();
        tokio::pin!(drained);
        tokio::select! {
            () = &mut drained => {}
            () = tokio::time::sleep(config.shutdown_grace) => {
                tracing::warn!("shutdown grace over: ending the streams still running");
                app.lifecycle.end_grace();
                let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
            }
        }
        poller.abort();
        admin_task.abort();
        // Spend recorded during the drain is in the state file too.
        app.limiter.flush();
        tracing::info!("stopped");
    }
}

/// The opening bytes of an HTTP/2 connection (RFC 9113 §3.4); a client
/// with prior knowledge of h2c starts with them, an HTTP/1.1 client cannot.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How client connections are served, built once.
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

fn serve_connection(
    protocols: &Arc<Protocols>,
    watcher: Watcher,
    stream: TcpStream,
    app: Arc<App>,
) {
    // Never hold a small write back waiting for an ACK: a first SSE event
    // must leave at once.
    let _ = stream.set_nodelay(true);
    let protocols = Arc::clone(protocols);
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
        let service = service_fn(move |req| crate::proxy::handle(Arc::clone(&app), req));
        let io = TokioIo::new(SendTimeout::new(stream, send_timeout));
        // The rarer protocols are boxed, so every connection's task is only
        // as large as an HTTP/1.1 connection needs. (Bound by `let`: a
        // temporary in the awaiting statement would be kept in the task.)
        if head[..n] == H2_PREFACE[..] {
            let conn = Box::pin(watched(
                watcher,
                protocols.http2.serve_connection(io, service),
            ));
            conn.await;
        } else if H2_PREFACE.starts_with(&head[..n]) {
            let conn = Box::pin(watched(
                watcher,
                protocols.auto.serve_connection(io, service),
            ));
            conn.await;
        } else {
            watched(watcher, protocols.http1.serve_connection(io, service)).await;
        }
    });
}

/// Runs a client connection under graceful shutdown.
async fn watched<C>(watcher: Watcher, conn: C)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "client connection ended with an error");
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

/// Polls upstream's `GET /user/balance` for `sluice_upstream_balance`, so
/// ops see the shared account running dry before everyone gets 402.
async fn poll_balance(app: Arc<App>) {
    loop {
        let snap = app.snapshot.load_full();
        let Some(every) = snap.config.upstream.balance_poll else {
            tokio::time::sleep(Duration::from_secs(60)).await;
            continue;
        };
        if let Err(e) = fetch_balance(&app, &snap).await {
            tracing::debug!(error = %e, "balance poll failed");
        }
        tokio::time::sleep(every).await;
    }
}

async fn fetch_balance(app: &App, snap: &crate::state::Snapshot) -> Result<(), String> {
    let cfg = &snap.config.upstream;
    let target = snap
        .upstream_target("/user/balance")
        .ok_or("no upstream URI")?;
    let mut headers = http::HeaderMap::new();
    if let Some(auth) = &snap.upstream_auth {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let outbound = Outbound::new(Method::GET, target, headers, Bytes::new());
    let within = cfg.connect_timeout + Duration::from_secs(10);
    let sent = app
        .upstream
        .send(
            cfg,
            &app.metrics,
            std::time::Instant::now() + within,
            &outbound,
        )
        .await
        .map_err(|e| e.to_string())?;
    if sent.response.status() != StatusCode::OK {
        return Err(format!("status {}", sent.response.status()));
    }
    let body = read_small(sent.response.into_body(), 1 << 20, within)
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    for info in v
        .get("balance_infos")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let currency = info.get("currency").and_then(|c| c.as_str()).unwrap_or("");
        // Bounded label: a currency code is three letters.
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
            continue;
        }
        let total = match info.get("total_balance") {
            Some(serde_json::Value::String(s)) => s.parse::<f64>().ok(),
            Some(n) => n.as_f64(),
            None => None,
        };
        if let Some(total) = total {
            app.metrics
                .balance
                .with_label_values(&[currency])
                .set(total);
        }
    }
    Ok(())
}
