//! The TCP listener: `TCP_NODELAY` on every connection, and the write-stall
//! guard that closes a socket which takes no bytes for `limits.write_stall`.
//!
//! Connections served by hyper get the guard as an IO wrapper; streams
//! written on the raw socket (`http::raw`) time their own writes.
//!
//! hyper stops polling a response body while the socket is full, so a stalled
//! client cannot be noticed from inside the SSE stream. It is noticed here,
//! at the socket: a write that stays `Pending` for the whole stall time fails
//! with `TimedOut`, hyper drops the connection, the stream ends and its
//! subscriber slot is freed. An idle socket (nothing to write) is never
//! affected: the timer only runs while a write is waiting.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// The listening socket; every accepted connection gets `TCP_NODELAY`.
pub struct GuardedListener {
    inner: TcpListener,
    write_stall: Duration,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, write_stall: Duration) -> Self {
        Self { inner, write_stall }
    }

    /// How long a write may make no progress before the connection is closed.
    pub fn write_stall(&self) -> Duration {
        self.write_stall
    }

    /// The next connection. Never fails: accept errors are logged and retried.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    return (stream, addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// A stream whose writes fail after `stall` without progress.
pub struct StallGuardedStream<S> {
    inner: S,
    stall: Duration,
    /// Running while a write is pending; cleared by any progress.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuardedStream<S> {
    pub fn new(inner: S, stall: Duration) -> Self {
        Self {
            inner,
            stall,
            timer: None,
        }
    }

    /// Wraps a pending write: arms the timer, and fails once it fires.
    fn on_pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stall = self.stall;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client took no bytes for limits.write_stall",
        )))
    }

    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.on_pending(cx),
            ready => {
                self.timer = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuardedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuardedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
