//! Client connections: the protocol told by a peek (HTTP/1.1, or h2c by
//! its preface), each connection's driver (keep-alive timeout, graceful
//! close at shutdown) and the count that stops the accept loop at
//! `max_connections`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::send_timeout::SendTimeout;
use super::stack::{client_service, Activity, Proxy};
use crate::app::App;

/// The open client connections, counted so the accept loop can stop at
/// `max_connections` and shutdown can wait for the last one. A connection
/// closing touches two atomics; the `Notify` (and its lock) only when
/// someone waits.
#[derive(Default)]
pub(super) struct Connections {
    count: AtomicUsize,
    waiting: AtomicBool,
    changed: Notify,
}

/// One open connection's place in `Connections`.
pub(super) struct Open(Arc<Connections>);

impl Connections {
    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub(super) fn enter(self: &Arc<Self>) -> Open {
        self.count.fetch_add(1, Ordering::SeqCst);
        Open(Arc::clone(self))
    }

    /// Until fewer than `n` are open. One waiter at a time (the accept
    /// loop, then shutdown).
    pub(super) async fn wait_below(&self, n: usize) {
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
pub(super) struct Conn {
    pub(super) _open: Open,
    pub(super) stopping: watch::Receiver<bool>,
    pub(super) keepalive: Duration,
}

/// The opening bytes of an HTTP/2 connection (RFC 9113 §3.4); a client
/// with prior knowledge of h2c starts with them, an HTTP/1.1 client cannot.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How client connections are served, built once per
/// `header_read_timeout` (again after a reload changes it).
pub(super) struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// For the rare client whose first segment is a partial preface.
    auto: auto::Builder<TokioExecutor>,
    pub(super) header_read_timeout: Duration,
}

impl Protocols {
    pub(super) fn new(header_read_timeout: Duration) -> Protocols {
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

pub(super) fn serve_connection(
    protocols: Arc<Protocols>,
    conn: Conn,
    stream: TcpStream,
    app: Arc<App>,
) {
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
///
/// The connection's task wakes several times a request (its client's
/// bytes, upstream's answer: the upstream connection is driven from this
/// task too). Its two watchers, the shutdown signal and the idle timer, are
/// polled only when one of them woke it (`Watchers`), not on every wake-up:
/// polling them costs about a thousand instructions a request.
pub(super) async fn drive<C>(conn: C, mut c: Conn, activity: &Activity)
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
    let keepalive = c.keepalive;
    let stopping = c.stopping.changed();
    tokio::pin!(stopping);
    let watchers = Arc::new(Watchers::default());
    let waker = Waker::from(Arc::clone(&watchers));
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            return Poll::Ready(());
        }
        if closing {
            return Poll::Pending;
        }
        watchers.task.register(cx.waker());
        if !watchers.woke.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut watching = Context::from_waker(&waker);
        if stopping.as_mut().poll(&mut watching).is_ready() {
            closing = true;
            conn.as_mut().graceful_shutdown();
            continue;
        }
        if idle.as_mut().poll(&mut watching).is_ready() {
            let now = tokio::time::Instant::now();
            match activity.idle_since() {
                Some(since) if since + keepalive <= now.into_std() => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                Some(since) => idle.as_mut().reset((since + keepalive).into()),
                None => idle.as_mut().reset(now + keepalive),
            }
            // Polled again (a reset timer registers on its next poll), or
            // the connection told to close.
            watchers.woke.store(true, Ordering::Release);
            continue;
        }
        return Poll::Pending;
    })
    .await;
}

/// The waker of a connection's watchers: it notes that they woke the
/// task, then wakes it. Starts woken, so they are polled (and register)
/// on the task's first poll.
struct Watchers {
    woke: AtomicBool,
    task: AtomicWaker,
}

impl Default for Watchers {
    fn default() -> Watchers {
        Watchers {
            woke: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }
}

impl Wake for Watchers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.task.wake();
    }
}
