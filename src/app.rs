//! `App`: everything a request handler needs, opened and closed in order.
//!
//! Open: metrics → hub → log (which starts its writer and trimmer). Close:
//! the server stops first (streams end on `stop`), then the log finishes the
//! publishes it queued and flushes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::Gate;
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::ClientLimits;
use crate::log::retention::RetentionPolicy;
use crate::log::sled_log::SledOptions;
use crate::log::{Log, LogError, SledLog};
use crate::metrics::Metrics;
use crate::routes::RouteSpec;
use crate::subscription::{StreamContext, StreamSettings};

/// Shared application state.
pub struct App {
    pub config: Config,
    pub log: Arc<dyn Log>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// `(module, kind)` → route.
    routes: HashMap<(String, String), RouteSpec>,
    /// One permit per open SSE stream (`limits.max_connections`), held by the
    /// stream body until it ends, not just until the headers are sent.
    pub stream_permits: Arc<Semaphore>,
    /// Cancelled on shutdown: streams end, publishes are refused.
    pub stop: CancellationToken,
    /// Token verification and access decisions.
    pub gate: Gate,
    /// Per-IP stream slots and publish rate limits.
    pub limits: ClientLimits,
}

/// Why the app could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
}

impl From<OpenError> for crate::RunError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Log(e) => Self::Log(e),
            OpenError::Auth(e) => Self::Auth(e),
        }
    }
}

impl App {
    /// Opens storage and builds the state. Must run inside a tokio runtime.
    pub fn open(config: Config, stop: CancellationToken) -> Result<Self, OpenError> {
        // Keys first: a bad key file should not leave a log open behind it.
        let gate = Gate::from_config(config.auth.as_ref(), config.tenancy.enabled)?;
        let limits = ClientLimits::new(&config.limits);
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(config.stream.live_buffer_events));
        let options = SledOptions {
            cache_capacity_bytes: config.storage.cache_capacity_bytes,
            publish_queue: config.limits.publish_queue,
            max_commit_batch: config.limits.max_commit_batch,
            retention: RetentionPolicy {
                max_events_per_topic: config.retention.max_events_per_topic,
                max_age: Duration::from_secs(config.retention.max_age_s),
                batch_events: config.retention.trim_batch_events,
            },
            trim_interval: Duration::from_millis(config.retention.trim_interval_ms),
        };
        let log: Arc<dyn Log> = Arc::new(SledLog::open(
            &config.storage.data_dir,
            options,
            Arc::clone(&hub),
            Arc::clone(&metrics),
        )?);
        let routes = config
            .effective_routes()
            .into_iter()
            .map(|r| ((r.module.clone(), r.kind.clone()), r))
            .collect();
        Ok(Self {
            stream_permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            config,
            log,
            hub,
            metrics,
            routes,
            stop,
            gate,
            limits,
        })
    }

    /// The broadcast route for `/{module}/broadcast/{kind}`.
    pub fn route(&self, module: &str, kind: &str) -> Option<&RouteSpec> {
        self.routes.get(&(module.to_owned(), kind.to_owned()))
    }

    /// `module/kind` of every route, sorted, for error messages.
    pub fn route_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .routes
            .keys()
            .map(|(m, k)| format!("{m}/{k}"))
            .collect();
        names.sort();
        names
    }

    pub fn stream_context(&self) -> StreamContext {
        StreamContext {
            log: Arc::clone(&self.log),
            hub: Arc::clone(&self.hub),
            metrics: Arc::clone(&self.metrics),
            stop: self.stop.clone(),
        }
    }

    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            retry_ms: self.config.stream.retry_ms,
            heartbeat: self.config.stream.heartbeat(),
            batch: self.config.stream.replay_batch_events,
            max_age: self.config.limits.max_stream_age(),
        }
    }
}
