//! HTTP/2 connections (negotiated by ALPN over TLS): served by hyper's h2
//! with the same router, so every request, SSE streams included, gets the
//! same auth, limits, CORS and resume handling as over HTTP/1.1.
//!
//! Settings: up to `http2.max_concurrent_streams` streams per connection
//! (more are refused one by one, the connection stays: no GOAWAY, until a
//! client that ignores the limit was refused 1,024 times; below), our
//! receive windows from `[http2]` (SSE requests upload nothing; publishes
//! do), and a request's header list bounded by `limits.max_header_bytes`
//! as an HTTP/1.1 head is.
//!
//! Idle and dead connections. A connection with no open stream for
//! `http2.idle_timeout_ms` is closed gracefully (`GOAWAY`, like the drain
//! at shutdown): hyper has no idle timeout of its own, so [`Activity`]
//! counts the connection's open requests (a stream's count ends when its
//! response body is dropped). hyper's keep-alive `PING`s
//! (`http2.keepalive_interval_ms`) find a peer that vanished without a FIN:
//! no answer within `keepalive_timeout_ms` closes the connection and ends
//! its streams, which heartbeats alone would only do once the socket
//! buffer filled and `write_stall` passed.
//!
//! Locally sent resets. h2 closes a connection (`GOAWAY
//! ENHANCE_YOUR_CALM`) after 1,024 resets it counts as the server's own
//! errors (hyper's `max_local_error_reset_streams`): refused streams over
//! `max_concurrent_streams` and protocol errors count; the write-stall
//! resets below do not (dropping a stream schedules an implicit `CANCEL`,
//! which h2 does not count; a test holds it), so a long-lived connection
//! survives any number of stalled streams.
//!
//! Write stall. A client that stops reading a whole connection fills the
//! socket, and the socket guard (`listener`) closes it. But HTTP/2 has
//! per-stream flow control: a client can stop granting window to one stream
//! while reading others, and then hyper just stops polling that stream's
//! body; nothing would ever end it. So every stream runs under a watch
//! ([`StreamExecutor`]): its body ([`StallBody`]) notes when it handed
//! hyper data, and when hyper has not come back for more within
//! `limits.write_stall_ms` (it waits for window before polling again), the
//! stream's task is dropped, which resets the stream (`RST_STREAM`
//! `CANCEL`) and frees its subscription. An idle stream is never affected:
//! after data is taken hyper polls the body again at once while it has
//! window, and waits on the body, not on the client.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use super::listener::StallGuardedStream;
use super::raw::Shared;
use super::server::Counted;
use crate::config::Http2Config;

tokio::task_local! {
    /// The watch of the stream whose task is running.
    static WATCH: Arc<StallWatch>;
}

/// hyper's HTTP/2 settings (module docs).
pub fn builder(
    config: &Http2Config,
    max_header_bytes: usize,
    executor: StreamExecutor,
) -> http2::Builder<StreamExecutor> {
    let mut builder = http2::Builder::new(executor);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.max_concurrent_streams)
        .initial_stream_window_size(config.stream_window_bytes)
        .initial_connection_window_size(config.connection_window_bytes)
        .adaptive_window(false)
        .max_send_buf_size(config.max_send_buffer_bytes)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(config.keepalive_interval())
        .keep_alive_timeout(Duration::from_millis(config.keepalive_timeout_ms));
    builder
}

/// Serves one HTTP/2 connection until it closes, is idle for
/// `idle_timeout` or the gateway stops (both: `GOAWAY`, open streams
/// finish). `_counted` is held as long as the connection.
pub async fn serve<S>(
    io: S,
    peer: SocketAddr,
    shared: &Shared,
    idle_timeout: Option<Duration>,
    _counted: Counted,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = shared.router.clone();
    let activity = Arc::new(Activity::default());
    let requests = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request
            .extensions_mut()
            .insert(ConnectInfo::<SocketAddr>(peer));
        let open = OpenRequest::new(&requests);
        let answer = router.clone().oneshot(request.map(Body::new));
        async move {
            let response = answer.await?;
            Ok::<_, std::convert::Infallible>(
                response.map(|body| Body::new(StallBody::new(body, open))),
            )
        }
    });
    let io = StallGuardedStream::new(io, shared.write_stall);
    let mut connection = pin!(shared.h2.serve_connection(TokioIo::new(io), service));
    let idle = async {
        match idle_timeout {
            Some(after) => activity.idle_for(after).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = shared.stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = idle => {
            tracing::debug!(%peer, "HTTP/2 connection idle for http2.idle_timeout; GOAWAY");
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, %peer, "HTTP/2 connection ended with an error");
    }
}

/// The open requests of one connection, for its idle timeout.
#[derive(Default)]
struct Activity {
    open: AtomicUsize,
    /// Requests ever started: a request that came and went while the idle
    /// timer ran restarts it.
    started: AtomicU64,
    /// Told when `open` drops to 0.
    emptied: Notify,
}

impl Activity {
    /// Returns once no request was open for `after` in one go.
    async fn idle_for(&self, after: Duration) {
        loop {
            let emptied = self.emptied.notified();
            if self.open.load(Ordering::Acquire) > 0 {
                emptied.await;
                continue;
            }
            let started = self.started.load(Ordering::Acquire);
            tokio::time::sleep(after).await;
            if self.open.load(Ordering::Acquire) == 0
                && self.started.load(Ordering::Acquire) == started
            {
                return;
            }
        }
    }
}

/// One open request of a connection: counted from the call until its
/// response body is dropped (sent, reset, or the request failed).
struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::AcqRel);
        activity.open.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(activity))
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_one();
        }
    }
}

/// Runs each HTTP/2 stream as a task on the stream runtime, under its
/// stall watch.
#[derive(Clone)]
pub struct StreamExecutor {
    streams: Handle,
    stall: Duration,
}

impl StreamExecutor {
    pub fn new(streams: Handle, stall: Duration) -> Self {
        Self { streams, stall }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let watch = Arc::new(StallWatch {
            stall: self.stall,
            handed_at: Mutex::new(None),
        });
        self.streams.spawn(Watched {
            stream: Box::pin(stream),
            watch,
            timer: None,
        });
    }
}

/// When the stream's body last handed hyper data that hyper has not come
/// back after.
struct StallWatch {
    stall: Duration,
    handed_at: Mutex<Option<Instant>>,
}

/// One stream's task: ends the stream once its body waited `stall` for hyper.
struct Watched<F> {
    stream: Pin<Box<F>>,
    watch: Arc<StallWatch>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let stream = &mut this.stream;
        if WATCH
            .sync_scope(Arc::clone(&this.watch), || stream.as_mut().poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        // The timer is armed once and moved only when it fires early (like
        // the subscription's heartbeat): a chunk costs no allocation and no
        // timer-wheel traffic. `handed_at` only grows, so an armed deadline
        // is never later than the one that counts.
        let Some(handed_at) = *this.watch.handed_at.lock() else {
            return Poll::Pending;
        };
        let deadline = handed_at + this.watch.stall;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                tracing::debug!("HTTP/2 stream got no window for limits.write_stall; resetting it");
                // Dropping the stream's future resets it (RST_STREAM CANCEL).
                return Poll::Ready(());
            }
            // Armed for an earlier hand-off that hyper took since.
            timer.as_mut().reset(deadline);
            let _registered = timer.as_mut().poll(cx);
        }
        Poll::Pending
    }
}

/// A response body that tells its stream's watch when hyper takes data
/// and when it comes back.
pub struct StallBody {
    inner: Body,
    /// Looked up at the first poll (which runs in the stream's task).
    watch: Option<Option<Arc<StallWatch>>>,
    /// Keeps the connection from idling while the body lives.
    _open: OpenRequest,
}

impl StallBody {
    fn new(inner: Body, open: OpenRequest) -> Self {
        Self {
            inner,
            watch: None,
            _open: open,
        }
    }
}

impl http_body::Body for StallBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let watch = this
            .watch
            .get_or_insert_with(|| WATCH.try_with(Arc::clone).ok());
        if let Some(watch) = watch {
            *watch.handed_at.lock() = None;
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(watch), Poll::Ready(Some(Ok(frame)))) = (watch, &polled) {
            if frame.is_data() {
                *watch.handed_at.lock() = Some(Instant::now());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
