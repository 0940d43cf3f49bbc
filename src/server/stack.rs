//! The client service stack, outermost first: tower-http's `CatchPanic`
//! (a panic while a request is handled is answered 500 in the API's shape,
//! the connection kept), then `Proxy`, which runs the request path and
//! marks the request busy on its connection until its response body is
//! dropped (for the keep-alive timeout).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use tower_http::catch_panic::{CatchPanic, ResponseForPanic};

use crate::app::App;
use crate::http::error::GatewayError;
use crate::response::body::Body;

/// Whether a connection has a request in flight, and since when it has had
/// none. A request is in flight from its head until its response body is
/// dropped (sent, or the client gone).
pub(super) struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `base` when the last request ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = self.idle_since_ms.load(Ordering::SeqCst);
        Some(self.base + Duration::from_millis(ms))
    }
}

/// A request in flight on its connection.
pub(super) struct Busy(Arc<Activity>);

impl Busy {
    pub(super) fn begin(activity: &Arc<Activity>) -> Busy {
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

/// The client API as a tower service: `request::handle`, with each response
/// body marking its request busy on the connection until it is dropped.
#[derive(Clone)]
pub(super) struct Proxy {
    pub(super) app: Arc<App>,
    pub(super) activity: Arc<Activity>,
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
        // A combinator, not an `async` block: the request's future (a few
        // KiB) is moved into the box once, not again on its first poll.
        let handling = crate::request::handle(Arc::clone(&self.app), req);
        Box::pin(handling.map(|served| Ok(served?.map(|body| Tracked { body, _busy: busy }))))
    }
}

/// A response body that keeps its request marked busy until dropped.
pub(super) struct Tracked {
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
pub(super) fn client_service<S, B>(inner: S) -> TowerToHyperService<CatchPanic<S, PanicAnswer>>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone,
{
    TowerToHyperService::new(CatchPanic::custom(inner, PanicAnswer))
}

/// The answer to a panic: Sluice's 500, logged without the payload (a
/// panic message could quote request data).
#[derive(Clone, Copy)]
pub(super) struct PanicAnswer;

impl ResponseForPanic for PanicAnswer {
    type ResponseBody = Full<Bytes>;

    fn response_for_panic(
        &mut self,
        _: Box<dyn std::any::Any + Send + 'static>,
    ) -> Response<Full<Bytes>> {
        tracing::error!("a request handler panicked; answered 500");
        GatewayError::Internal
            .into_response(crate::api::Format::OpenAi, None)
            .map(Full::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};

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
