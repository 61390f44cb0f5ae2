//! `App`: everything a request handler needs, opened and closed in order.
//!
//! Open: metrics → hub → log (which starts its writer and trimmer). Close:
//! the server stops first (streams end on `stop`), then the log finishes the
//! publishes it queued and flushes.
//!
//! A request's topics live in one [`Shard`] (a log and the hub fed by it).
//! There is one shard, except on Redis with tenancy on: there each org has its
//! own log under its own hash tag (`{sse:org:<org>}`), so orgs spread over a
//! Cluster's shards; an org's log is opened on first use on this node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::{Gate, Scope};
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::ClientLimits;
use crate::log::redis::{RedisClients, RedisOptions, RedisTarget};
use crate::log::sled::SledOptions;
use crate::log::{Log, LogError, RedisLog, RetentionPolicy, SledLog};
use crate::metrics::Metrics;
use crate::process_memory::HeapReader;
use crate::replay_budget::ReplayBudget;
use crate::routes::RouteSpec;
use crate::subscription::{StreamContext, StreamSettings};

/// One log and the hub its durable events are fanned out through.
#[derive(Clone)]
pub struct Shard {
    pub log: Arc<dyn Log>,
    pub hub: Arc<Hub>,
}

/// The per-org Redis logs of a tenancy deployment, opened on first use.
struct OrgLogs {
    clients: RedisClients,
    /// Options of the default log; each org's log differs in its tag only.
    options: RedisOptions,
    /// One cell per org: opening an org's log (Redis round trips) makes only
    /// that org's requests wait, never another org's.
    open: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Shard>>>>,
}

/// Shared application state.
pub struct App {
    pub config: Config,
    /// The default shard's log (the only one unless orgs have their own).
    pub log: Arc<dyn Log>,
    /// The default shard's hub.
    pub hub: Arc<Hub>,
    /// Per-org logs (Redis with tenancy on), else `None`.
    orgs: Option<OrgLogs>,
    pub metrics: Arc<Metrics>,
    /// `(module, kind)` → route.
    routes: HashMap<(String, String), RouteSpec>,
    /// One permit per open SSE stream (`limits.max_connections`), held by the
    /// stream body until it ends, not just until the headers are sent.
    pub stream_permits: Arc<Semaphore>,
    /// Bytes all replay reads together may hold (`limits.replay_read_budget_bytes`).
    pub replay_budget: Arc<ReplayBudget>,
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
    /// `heap` reads the installed allocator's counts for `/metrics`.
    pub async fn open(
        config: Config,
        stop: CancellationToken,
        heap: Option<HeapReader>,
    ) -> Result<Self, OpenError> {
        // Keys first: a bad key file should not leave a log open behind it.
        let gate = Gate::from_config(config.auth.as_ref(), config.tenancy.enabled)?;
        let limits = ClientLimits::new(&config.limits);
        let metrics = Arc::new(Metrics::with_heap(heap));
        let hub = Arc::new(Hub::new(config.stream.live_buffer_events));
        let retention = RetentionPolicy {
            max_events_per_topic: config.retention.max_events_per_topic,
            max_age: Duration::from_secs(config.retention.max_age_s),
            batch_events: config.retention.trim_batch_events,
        };
        let trim_interval = Duration::from_millis(config.retention.trim_interval_ms);
        let redis_target = RedisTarget::from_config(&config.storage);
        let (log, orgs): (Arc<dyn Log>, Option<OrgLogs>) = match redis_target {
            None => {
                let options = SledOptions {
                    cache_capacity_bytes: config.storage.cache_capacity_bytes,
                    publish_queue: config.limits.publish_queue,
                    max_commit_batch: config.limits.max_commit_batch,
                    retention,
                    trim_interval,
                    key_window: config.publish.idempotency_window(),
                };
                let log = SledLog::open(
                    &config.storage.data_dir,
                    options,
                    Arc::clone(&hub),
                    Arc::clone(&metrics),
                )?;
                (Arc::new(log), None)
            }
            Some(target) => {
                let storage = &config.storage;
                let clients = RedisClients::connect(
                    target,
                    Duration::from_millis(storage.command_timeout_ms),
                )
                .await?;
                let options = RedisOptions {
                    tag: storage.key_prefix.clone(),
                    publish_queue: config.limits.publish_queue,
                    max_commit_batch: config.limits.max_commit_batch,
                    retention,
                    trim_interval,
                    key_window: config.publish.idempotency_window(),
                    wait_replicas: storage.wait_replicas,
                    wait_timeout: Duration::from_millis(storage.wait_timeout_ms),
                    probe_interval: Duration::from_millis(storage.probe_interval_ms),
                };
                let log = RedisLog::open(
                    clients.clone(),
                    options.clone(),
                    Arc::clone(&hub),
                    Arc::clone(&metrics),
                )
                .await?;
                let orgs = config.tenancy.enabled.then(|| OrgLogs {
                    clients,
                    options,
                    open: parking_lot::Mutex::new(HashMap::new()),
                });
                (Arc::new(log), orgs)
            }
        };
        let routes = config
            .effective_routes()
            .into_iter()
            .map(|r| ((r.module.clone(), r.kind.clone()), r))
            .collect();
        Ok(Self {
            stream_permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            replay_budget: Arc::new(ReplayBudget::new(
                config.limits.replay_read_budget_bytes,
                metrics.replay_budget_waits.clone(),
            )),
            config,
            log,
            hub,
            orgs,
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

    /// The shard holding `scope`'s topics, opening an org's log on first use.
    /// Whether the log a `scope` reads also holds other orgs' events (tenancy
    /// on one shared log, as with sled), so its head must not be shown.
    pub fn log_is_shared_with_other_orgs(&self, scope: &Scope) -> bool {
        matches!(scope, Scope::Org(_)) && self.orgs.is_none()
    }

    pub async fn shard(&self, scope: &Scope) -> Result<Shard, LogError> {
        let default = || Shard {
            log: Arc::clone(&self.log),
            hub: Arc::clone(&self.hub),
        };
        let (Some(orgs), Scope::Org(org)) = (&self.orgs, scope) else {
            return Ok(default());
        };
        // The map lock is held only to find the org's cell, never across an await.
        let cell = Arc::clone(orgs.open.lock().entry(org.clone()).or_default());
        let shard = cell
            .get_or_try_init(|| async {
                let hub = Arc::new(Hub::new(self.config.stream.live_buffer_events));
                let mut options = orgs.options.clone();
                options.tag = format!("{}:org:{org}", options.tag);
                let log = RedisLog::open(
                    orgs.clients.clone(),
                    options,
                    Arc::clone(&hub),
                    Arc::clone(&self.metrics),
                )
                .await?;
                Ok::<_, LogError>(Shard {
                    log: Arc::new(log),
                    hub,
                })
            })
            .await?;
        // A failed open leaves the cell empty: the next request tries again.
        Ok(shard.clone())
    }

    /// Every log open on this node is ready (orgs' logs that are being
    /// opened right now are not counted).
    pub fn logs_ready(&self) -> bool {
        if !self.log.is_ready() {
            return false;
        }
        match &self.orgs {
            Some(orgs) => orgs
                .open
                .lock()
                .values()
                .filter_map(|cell| cell.get())
                .all(|s| s.log.is_ready()),
            None => true,
        }
    }

    /// The largest tail lag among the open logs (0 when none has a tail).
    pub fn tail_lag(&self) -> Duration {
        let mut lag = self.log.tail_lag().unwrap_or_default();
        if let Some(orgs) = &self.orgs {
            for shard in orgs.open.lock().values().filter_map(|cell| cell.get()) {
                lag = lag.max(shard.log.tail_lag().unwrap_or_default());
            }
        }
        lag
    }

    /// Closes every log: queued publishes finish first.
    pub async fn close_logs(&self) -> Result<(), LogError> {
        if let Some(orgs) = &self.orgs {
            let shards: Vec<Shard> = orgs
                .open
                .lock()
                .values()
                .filter_map(|cell| cell.get().cloned())
                .collect();
            for shard in shards {
                shard.log.close().await?;
            }
        }
        self.log.close().await
    }

    /// What a stream of `shard` needs.
    pub fn stream_context_for(&self, shard: &Shard) -> StreamContext {
        StreamContext {
            log: Arc::clone(&shard.log),
            hub: Arc::clone(&shard.hub),
            metrics: Arc::clone(&self.metrics),
            replay_budget: Arc::clone(&self.replay_budget),
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
