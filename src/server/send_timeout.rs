//! `server.send_timeout_secs` (docs/api.md, "Slow clients and connections"): a client connection
//! whose socket accepts no bytes for that long is failed, like nginx's
//! `send_timeout`. hyper has no send timeout of its own, and a response body
//! is simply not polled while the socket is not writable, so the deadline
//! lives here, on the connection's writes: `SendTimeout` wraps the client's
//! `TcpStream` and fails a write that has made no progress for the timeout.
//!
//! The failed write fails hyper's connection; hyper then drops the response
//! body, which releases everything the request holds (the relay cancels its
//! upstream call unless coalesced followers still read, and frees its slots).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An IO whose writes fail after `timeout` without progress.
pub(crate) struct SendTimeout<T> {
    io: T,
    timeout: Duration,
    /// Made on the first write that has to wait, then reused: a connection
    /// whose writes always go through never touches the timer wheel.
    timer: Option<Pin<Box<Sleep>>>,
    /// Writes are waiting without progress: the timer runs.
    stalled: bool,
}

impl<T> SendTimeout<T> {
    pub(crate) fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            timer: None,
            stalled: false,
        }
    }

    /// Called with the outcome of a write: progress clears the stall; a
    /// write that must wait starts (or keeps) the clock, and fails once the
    /// clock ran out.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        if !self.stalled {
            self.stalled = true;
            let deadline = Instant::now() + self.timeout;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(t) = &mut self.timer {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client accepted no response bytes within send_timeout",
                )));
            }
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_without_progress_fails_after_the_timeout() {
        // A pipe with a small buffer that nobody reads.
        let (a, _b) = tokio::io::duplex(64);
        let mut io = SendTimeout::new(a, Duration::from_millis(200));
        let start = Instant::now();
        let err = io
            .write_all(&[0u8; 1024])
            .await
            .expect_err("the write stalls");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_not_dropped() {
        let (a, mut b) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                total += b.read(&mut buf).await.expect("read");
            }
        });
        let mut io = SendTimeout::new(a, Duration::from_millis(200));
        // 16 reads 20 ms apart: longer than the timeout, never stalled that long.
        io.write_all(&[0u8; 1024])
            .await
            .expect("progress resets the clock");
        reader.await.expect("reader");
    }
}
