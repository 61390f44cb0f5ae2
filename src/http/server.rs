//! The accept loop: hyper HTTP/1.1 connections with the limits axum's
//! `serve` does not expose, and a bounded graceful drain.
//!
//! Per connection: the request head must arrive within
//! `limits.header_read_timeout` (slowloris) and fit `limits.max_header_bytes`
//! (hyper answers 431 and closes otherwise); the peer address is put in the
//! request extensions as `ConnectInfo` for per-IP limits. On `stop` the loop
//! stops accepting, every connection is told to finish its in-flight request
//! and close, and the drain is bounded by `server.drain_timeout_ms`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::listener::GuardedListener;

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

/// Serves `router` until `stop`, then drains (bounded).
pub async fn serve(
    mut listener: GuardedListener,
    router: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(request.map(Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = limits.drain_timeout.as_millis() as u64,
            "drain timed out; closing with requests still open"
        );
    }
}
