//! A TCP proxy that puts faults between Sluice and Redis, controlled while
//! it runs: latency on every chunk in each direction (fixed, or drawn from
//! a range), all connections reset at once, new connections refused for a
//! while (a partition), and a pause that holds every byte until resumed.
//!
//! It runs on a thread and runtime of its own, so a test that blocks
//! (`redis-cli`) or loads its own runtime does not change what the proxy
//! does. It never panics on an I/O error: a connection that fails ends,
//! and the proxy goes on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// The proxy: listens on `addr` (127.0.0.1, a free port) and forwards each
/// connection to its target. Its faults are set through `Deref` to
/// `ProxyHandle`, or a clone of `handle()`. Stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    handle: ProxyHandle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Sets the proxy's faults; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ProxyHandle(Arc<Control>);

struct Control {
    /// Added to each chunk, per direction: drawn uniformly from the range.
    latency: Mutex<Option<(Duration, Duration)>>,
    /// New connections are reset on accept until then.
    refuse_until: Mutex<Option<Instant>>,
    paused: watch::Sender<bool>,
    /// Each bump resets every connection open at the time.
    resets: watch::Sender<u64>,
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl FaultProxy {
    /// A proxy to `target`, with no fault set.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("proxy address");
        let handle = ProxyHandle(Arc::new(Control {
            latency: Mutex::new(None),
            refuse_until: Mutex::new(None),
            paused: watch::channel(false).0,
            resets: watch::channel(0).0,
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }));
        let (stop, stopped) = oneshot::channel();
        let ctl = Arc::clone(&handle.0);
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    _ = stopped => {}
                    () = accept_loop(listener, target, ctl) => {}
                }
            });
            // Dropping the runtime drops every connection with it.
        });
        FaultProxy {
            addr,
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for FaultProxy {
    type Target = ProxyHandle;
    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl ProxyHandle {
    /// Every chunk, in each direction, is held for a time drawn uniformly
    /// from `min..=max` (a fixed delay with `min == max`). Order is kept:
    /// a chunk never overtakes the one before it.
    pub fn latency(&self, min: Duration, max: Duration) {
        *lock(&self.0.latency) = Some((min, max.max(min)));
    }

    pub fn no_latency(&self) {
        *lock(&self.0.latency) = None;
    }

    /// Closes every open connection abruptly (RST on both sides).
    pub fn reset_all(&self) {
        self.0.resets.send_modify(|n| *n += 1);
    }

    /// New connections are accepted and reset at once for `d`.
    pub fn refuse_for(&self, d: Duration) {
        *lock(&self.0.refuse_until) = Some(Instant::now() + d);
    }

    /// A partition: every connection reset, and new ones refused for `d`.
    pub fn partition(&self, d: Duration) {
        self.refuse_for(d);
        self.reset_all();
    }

    /// Holds every byte in both directions (nothing is forwarded, nothing
    /// lost) until `resume`.
    pub fn pause(&self) {
        self.0.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.0.paused.send_replace(false);
    }

    /// No latency, no refusal, no pause (open connections stay open).
    pub fn clear(&self) {
        self.no_latency();
        *lock(&self.0.refuse_until) = None;
        self.resume();
    }

    /// Connections forwarded right now.
    pub fn open_connections(&self) -> usize {
        self.0.open.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded so far (refused ones apart).
    pub fn accepted(&self) -> u64 {
        self.0.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Control {
    fn refusing(&self) -> bool {
        lock(&self.refuse_until).is_some_and(|until| Instant::now() < until)
    }

    fn delay(&self) -> Duration {
        match *lock(&self.latency) {
            None => Duration::ZERO,
            Some((min, max)) => min + (max - min).mul_f64(rand::random::<f64>()),
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, ctl: Arc<Control>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors, or a connection that died in the
                // backlog: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if ctl.refusing() {
            ctl.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        ctl.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(client, target, Arc::clone(&ctl)));
    }
}

/// Counts a connection as open while it lives.
struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(client: TcpStream, target: SocketAddr, ctl: Arc<Control>) {
    // Subscribed before connecting: a reset from now on applies to it.
    let mut resets = ctl.resets.subscribe();
    let server =
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => {
                let _ = client.set_zero_linger();
                return;
            }
        };
    ctl.open.fetch_add(1, Ordering::SeqCst);
    let _open = Open(&ctl.open);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let reset = {
        let both = async {
            tokio::try_join!(relay(&mut cr, &mut sw, &ctl), relay(&mut sr, &mut cw, &ctl))
        };
        tokio::select! {
            _ = both => false,
            _ = resets.changed() => true,
        }
    };
    if reset {
        // Dropped with a zero linger: both peers see a reset, not a FIN.
        let _ = cr.as_ref().set_zero_linger();
        let _ = sr.as_ref().set_zero_linger();
    }
}

/// One direction: chunks are read as they come and written when their
/// delay is over (and the proxy is not paused); end of input half-closes
/// the other side.
async fn relay(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    ctl: &Control,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last_due = Instant::now();
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            let due = (Instant::now() + ctl.delay()).max(last_due);
            last_due = due;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return Ok(());
            }
        }
    };
    let write = async {
        let mut paused = ctl.paused.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            // Err only if the sender is gone, which it is not while `ctl` lives.
            let _ = paused.wait_for(|p| !*p).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

// ---- the proxy itself, against a real redis-server --------------------------

use crate::support::RedisServer;

/// A PING on `s`; its round trip.
async fn ping(s: &mut TcpStream) -> std::io::Result<Duration> {
    let start = Instant::now();
    s.write_all(b"PING\r\n").await?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).await?;
    if &buf != b"+PONG\r\n" {
        return Err(std::io::Error::other(format!(
            "not a PONG: {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    Ok(start.elapsed())
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr)
        .await
        .expect("connect to the proxy")
}

/// A new connection that answers a PING, or `None` (refused, or reset
/// before or after the handshake).
async fn ping_anew(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    ping(&mut s).await.ok()?;
    Some(s)
}

fn target(redis: &RedisServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], redis.port))
}

#[tokio::test]
async fn proxy_forwards_with_and_without_latency() {
    let Some(redis) = RedisServer::start("proxy_forwards_with_and_without_latency") else {
        return;
    };
    let proxy = FaultProxy::start(target(&redis));
    let mut s = connect(proxy.addr).await;
    let rtt = ping(&mut s).await.expect("PING through the proxy");
    assert!(rtt < Duration::from_millis(150), "no latency set: {rtt:?}");

    proxy.latency(Duration::from_millis(100), Duration::from_millis(100));
    let rtt = ping(&mut s).await.expect("PING with latency");
    assert!(
        rtt >= Duration::from_millis(200),
        "100 ms each way: {rtt:?}"
    );

    proxy.latency(Duration::from_millis(10), Duration::from_millis(60));
    for _ in 0..5 {
        let rtt = ping(&mut s).await.expect("PING with a latency range");
        assert!(
            rtt >= Duration::from_millis(20) && rtt < Duration::from_secs(2),
            "10–60 ms each way: {rtt:?}"
        );
    }
    proxy.no_latency();
    let rtt = ping(&mut s).await.expect("PING after latency");
    assert!(rtt < Duration::from_millis(150), "latency off: {rtt:?}");
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.open_connections(), 1);
}

#[tokio::test]
async fn proxy_resets_refuses_and_pauses() {
    let Some(redis) = RedisServer::start("proxy_resets_refuses_and_pauses") else {
        return;
    };
    let proxy = FaultProxy::start(target(&redis));

    // A reset closes the open connection at once.
    let mut s = connect(proxy.addr).await;
    ping(&mut s).await.expect("PING");
    proxy.reset_all();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("the reset reaches the client");
    assert!(
        matches!(read, Err(_) | Ok(0)),
        "a reset connection reads nothing: {read:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.open_connections() > 0 {
        assert!(Instant::now() < deadline, "the connection was dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A partition refuses new connections for its length, then heals; set
    // through a handle, as a test's fault schedule does.
    let faults = proxy.handle();
    faults.partition(Duration::from_millis(500));
    assert!(
        ping_anew(proxy.addr).await.is_none(),
        "refused while partitioned"
    );
    assert!(proxy.refused() >= 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut s = loop {
        if let Some(s) = ping_anew(proxy.addr).await {
            break s;
        }
        assert!(Instant::now() < deadline, "the partition never healed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A pause holds the bytes; clearing the faults delivers them.
    faults.pause();
    s.write_all(b"PING\r\n").await.expect("write");
    let mut buf = [0u8; 7];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf))
            .await
            .is_err(),
        "nothing is forwarded while paused"
    );
    faults.clear();
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .expect("delivered after resume")
        .expect("read");
    assert_eq!(&buf, b"+PONG\r\n");
}
