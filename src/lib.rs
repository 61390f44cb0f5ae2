//! sse-gateway: a Server-Sent Events HTTP gateway with a durable replay log.
//!
//! Events published over HTTP are appended to a durable log (sled by
//! default), acknowledged once on disk, and streamed to subscribers over SSE;
//! a reconnecting client resumes from its `Last-Event-ID` with no gap and no
//! duplicate. `run` is the whole server, used by `main` and by tests.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod http;
pub mod hub;
pub mod json;
pub mod log;
pub mod metrics;
pub mod model;
pub mod routes;
pub mod sse;
pub mod subscription;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the gateway on `listener` until `stop` is cancelled, then drains:
/// streams end, in-flight publishes finish (bounded by
/// `server.drain_timeout_ms`), the log flushes. Returns once it is closed.
pub async fn run(
    listener: TcpListener,
    config: Config,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let drain_timeout = Duration::from_millis(config.server.drain_timeout_ms);
    let write_stall = config.limits.write_stall();
    let app = Arc::new(app::App::open(config, stop.clone())?);
    let local = listener.local_addr()?;
    tracing::info!("listening on http://{local}");

    let router = http::router(Arc::clone(&app));
    let listener = http::listener::GuardedListener::new(listener, write_stall);
    let server =
        axum::serve(listener, router).with_graceful_shutdown(stop.clone().cancelled_owned());
    let mut server = std::pin::pin!(server.into_future());
    let served = tokio::select! {
        result = &mut server => result,
        () = stop.cancelled() => match tokio::time::timeout(drain_timeout, &mut server).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(timeout_ms = drain_timeout.as_millis() as u64, "drain timed out; closing with requests still open");
                Ok(())
            }
        },
    };
    // Whatever happened to the server, close the log so queued publishes finish and flush.
    let closed = app.log.close().await;
    served?;
    closed?;
    tracing::info!("stopped");
    Ok(())
}
