//! The accept loop: one task per connection, the limits axum's `serve` does
//! not expose, and a bounded graceful drain.
//!
//! Per connection: the request head must arrive within
//! `limits.header_read_timeout` (slowloris) and fit `limits.max_header_bytes`
//! (hyper answers 431 and closes otherwise); the peer address is put in the
//! request extensions as `ConnectInfo` for per-IP limits. A connection whose
//! first request is a stream is served by `raw` on the raw socket;
//! every other one by hyper.
//!
//! With `[tls]` every connection first completes a TLS handshake (within
//! `limits.header_read_timeout`); ALPN `h2` is served by hyper's HTTP/2
//! (`h2`), anything else as HTTP/1.x exactly as above, over the TLS
//! session. Cleartext HTTP/2 (h2c) is not spoken.
//!
//! Streams are sent from their own runtime (one worker per core), not the
//! one that accepts and serves requests. Why: a publish fans out to every
//! subscriber at once, and on a shared runtime the publisher's acknowledgement
//! waits in the run queue behind all of those writes, which throttles
//! publishing to the speed of the slowest fan-out and leaves every write
//! carrying one event. Apart, the OS scheduler shares the cores between the
//! two: acks stay prompt under any fan-out load, and subscribers that fall
//! behind take several events per write.
//!
//! Every connection is counted in `sse_gateway_connections_open{protocol}`
//! (`http1`, `h2`) while it is open, a stream's included; a TLS connection
//! once its handshake chose the protocol.
//!
//! On `stop` the loop stops accepting, hyper connections are told to finish
//! their in-flight request and close, streams end on their own (they watch
//! the same token), and the drain of both is bounded by
//! `server.drain_timeout_ms`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Handle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::hop::{Hop, Socket};
use super::listener::{GuardedListener, StallGuardedStream};
use super::raw::{self, Next, Rewind};
use super::table::StreamRoutes;
use crate::metrics::{Labels, Metrics};

/// Blocking threads (log reads) of the stream runtime per core.
const BLOCKING_THREADS_PER_CORE: usize = 4;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
    pub http2: crate::config::Http2Config,
}

/// One open connection of `protocol`, counted in `connections` until dropped.
pub struct Counted(Gauge);

impl Counted {
    fn new(connections: &Family<Labels, Gauge>, protocol: &'static str) -> Self {
        let gauge = connections
            .get_or_create(&Metrics::label("protocol", protocol))
            .clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `router` until `stop`, then drains (bounded); open connections
/// are counted in `connections`. Fails only when the stream runtime cannot
/// be started.
pub async fn serve(
    mut listener: GuardedListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    connections: Family<Labels, Gauge>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        // Replay reads of the sled log run here (`spawn_blocking`). tokio's
        // default allows 512 such threads: a reconnect storm grew the pool to
        // dozens of idle threads (each with its stack and malloc arena, the
        // soak's RSS growth) for reads that are CPU-bound on these cores anyway.
        .max_blocking_threads(BLOCKING_THREADS_PER_CORE * workers)
        .thread_name("sse-streams")
        .enable_all()
        .build()?;
    let streams = runtime.handle().clone();
    let stream_runtime = StreamRuntime(Some(runtime));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let executor = super::h2::StreamExecutor::new(streams.clone(), listener.write_stall());
    let h2 = super::h2::builder(&limits.http2, limits.max_header_bytes, executor);
    let shared = Arc::new(raw::Shared {
        router,
        http,
        h2,
        h2_idle_timeout: limits.http2.idle_timeout(),
        tls,
        header_read_timeout: limits.header_read_timeout,
        max_header_bytes: limits.max_header_bytes,
        write_stall: listener.write_stall(),
        stop: stop.clone(),
        stream_routes: StreamRoutes::new(),
    });
    let graceful = GracefulShutdown::new();
    let tasks = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let shared = Arc::clone(&shared);
        let watcher = graceful.watcher();
        let streams = streams.clone();
        let tracker = tasks.clone();
        let counts = connections.clone();
        tasks.spawn(async move {
            match &shared.tls {
                None => {
                    let counted = Counted::new(&counts, "http1");
                    serve_http1(tcp, peer, &shared, watcher, &streams, &tracker, counted).await;
                }
                Some(acceptor) => {
                    let handshake = acceptor.accept(Socket::new(tcp));
                    let tls =
                        match tokio::time::timeout(shared.header_read_timeout, handshake).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, %peer, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        let counted = Counted::new(&counts, "h2");
                        let idle = shared.h2_idle_timeout;
                        Box::pin(super::h2::serve(tls, peer, &shared, idle, counted)).await;
                    } else {
                        let counted = Counted::new(&counts, "http1");
                        serve_http1(tls, peer, &shared, watcher, &streams, &tracker, counted).await;
                    }
                }
            }
        });
    }
    drop(listener);
    tasks.close();
    let drained = async {
        graceful.shutdown().await;
        tasks.wait().await;
    };
    if tokio::time::timeout(limits.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = limits.drain_timeout.as_millis() as u64,
            "drain timed out; closing with requests still open"
        );
    }
    drop(stream_runtime);
    Ok(())
}

/// The stream runtime, shut down without blocking however `serve` ends
/// (returning, or its future dropped with the outer runtime): dropping a
/// runtime blocks, which an async context must not.
struct StreamRuntime(Option<tokio::runtime::Runtime>);

impl Drop for StreamRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One HTTP/1.x connection: its first request read by `raw`, a stream
/// pumped on the stream runtime, anything else served by hyper.
async fn serve_http1<S>(
    mut io: S,
    peer: SocketAddr,
    shared: &raw::Shared,
    watcher: hyper_util::server::graceful::Watcher,
    streams: &Handle,
    tracker: &TaskTracker,
    counted: Counted,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + Hop + 'static,
{
    match Box::pin(raw::serve_first(&mut io, peer, shared)).await {
        Next::Close => {}
        Next::Stream(stream) => {
            // Moves the socket to the stream runtime (module docs).
            let detached = match io.detach() {
                Ok(detached) => detached,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot hand the stream over");
                    return;
                }
            };
            let stall = shared.write_stall;
            // Boxed: an idle stream pays for its pump and nothing else.
            tracker.spawn_on(
                async move {
                    let _counted = counted;
                    match S::attach(detached) {
                        Ok(mut io) => Box::pin(raw::pump(&mut io, *stream, stall)).await,
                        Err(e) => tracing::debug!(error = %e, "cannot register the stream"),
                    }
                },
                streams,
            );
        }
        Next::Hyper(prefix) => {
            Box::pin(serve_with_hyper(io, prefix, peer, shared, watcher)).await;
        }
    }
}

async fn serve_with_hyper<S>(
    io: S,
    prefix: bytes::Bytes,
    peer: SocketAddr,
    shared: &raw::Shared,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = shared.router.clone();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request
            .extensions_mut()
            .insert(ConnectInfo::<SocketAddr>(peer));
        router.clone().oneshot(request.map(Body::new))
    });
    let io = StallGuardedStream::new(Rewind::new(prefix, io), shared.write_stall);
    let connection = watcher.watch(shared.http.serve_connection(TokioIo::new(io), service));
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}
