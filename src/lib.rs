//! sse-gateway: a Server-Sent Events HTTP gateway with a durable replay log.
//!
//! Events published over HTTP are appended to a durable log (sled by
//! default), acknowledged once on disk, and streamed to subscribers over SSE;
//! a reconnecting client resumes from its `Last-Event-ID` with no gap and no
//! duplicate. `run` is the whole server, used by `main` and by tests.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod hub;
pub mod idempotency;
pub mod json;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod model;
pub mod process_memory;
pub mod replay_budget;
pub mod routes;
pub mod sse;
pub mod subscription;
pub mod tls;

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
    #[error(transparent)]
    Auth(#[from] auth::AuthConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// What the program hosting the gateway supplies beyond its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host {
    /// Reads the global allocator's counts for `/metrics`; only the binary
    /// that installed the allocator can say which one it is.
    pub heap: Option<process_memory::HeapReader>,
}

/// Serves the gateway on `listener` until `stop` is cancelled, then drains:
/// streams end, in-flight publishes finish (bounded by
/// `server.drain_timeout_ms`), the log flushes. Returns once it is closed.
pub async fn run(
    listener: TcpListener,
    config: Config,
    stop: CancellationToken,
) -> Result<(), RunError> {
    run_hosted(listener, config, stop, Host::default()).await
}

/// [`run`], with what the hosting binary supplies.
pub async fn run_hosted(
    listener: TcpListener,
    config: Config,
    stop: CancellationToken,
    host: Host,
) -> Result<(), RunError> {
    let limits = http::server::ConnectionLimits {
        header_read_timeout: config.limits.header_read_timeout(),
        max_header_bytes: config.limits.max_header_bytes,
        drain_timeout: Duration::from_millis(config.server.drain_timeout_ms),
        http2: config.http2.clone(),
    };
    let write_stall = config.limits.write_stall();
    // Before the log opens: a bad certificate is a one-line error, not a half-started gateway.
    let tls = match &config.tls {
        Some(settings) => {
            let certificates = tls::Certificates::open(settings)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(certificates.server_config()?);
            tracing::info!(fingerprint = %certificates.fingerprint(), "TLS certificate loaded");
            Some((acceptor, certificates, settings.reload_interval()))
        }
        None => None,
    };
    let app = Arc::new(app::App::open(config, stop.clone(), host.heap).await?);
    let local = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{local}");

    let sweeper = tokio::spawn(sweep_limits(Arc::clone(&app), stop.clone()));
    let router = http::router(Arc::clone(&app));
    let listener = http::listener::GuardedListener::new(listener, write_stall);
    let (acceptor, watcher) = match tls {
        Some((acceptor, certificates, every)) => {
            let watch = tls::watch(certificates, every, stop.clone());
            (Some(acceptor), Some(tokio::spawn(watch)))
        }
        None => (None, None),
    };
    let connections = app.metrics.connections_open.clone();
    let served = http::server::serve(
        listener,
        router,
        limits,
        acceptor,
        connections,
        stop.clone(),
    )
    .await;
    sweeper.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    // Close the log last so queued publishes finish and flush.
    app.close_logs().await?;
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Drops rate-limiter state of idle clients every minute.
async fn sweep_limits(app: Arc<app::App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => app.limits.sweep(),
        }
    }
}
