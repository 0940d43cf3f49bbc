//! The admin listener (`/metrics`, `/healthz`, `/readyz`) and the balance
//! poller.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::app::App;
use crate::upstream::balance;

pub(super) async fn serve_admin(listener: TcpListener, app: Arc<App>) {
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

pub(super) fn admin(
    app: &App,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
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

/// Polls each upstream's balance for `sluice_upstream_balance` every
/// `balance_poll_secs` of its own (the pool is read again after each
/// poll, so a reload applies).
pub(super) async fn poll_balance(app: Arc<App>) {
    // When each upstream, by name, is due next.
    let mut due: HashMap<Arc<str>, tokio::time::Instant> = HashMap::new();
    loop {
        let snap = app.snapshot.load_full();
        let now = tokio::time::Instant::now();
        let mut next = now + Duration::from_secs(30);
        for (index, peer) in snap.upstreams.peers().iter().enumerate() {
            let Some(every) = peer.balance_poll else {
                continue;
            };
            let at = *due.entry(Arc::clone(peer.name())).or_insert(now);
            if at <= now {
                let cfg = &snap.config.upstream;
                if let Err(e) =
                    balance::fetch(&app.upstream, &snap.upstreams, index, cfg, &app.metrics).await
                {
                    tracing::debug!(error = %e, upstream = %peer.name(), "balance poll failed");
                }
                let again = tokio::time::Instant::now() + every;
                due.insert(Arc::clone(peer.name()), again);
                next = next.min(again);
            } else {
                next = next.min(at);
            }
        }
        due.retain(|name, _| snap.upstreams.peers().iter().any(|p| p.name() == name));
        drop(snap);
        tokio::time::sleep_until(next).await;
    }
}
