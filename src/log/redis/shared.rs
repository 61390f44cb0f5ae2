//! The state an open Redis log's writer, tailer, trimmer and readers share:
//! the clients and script, the epoch, this node's durable head, the
//! per-topic stats, health and the failure latch.
//!
//! The bottom of the Redis backend besides [`connections`](super::connections)
//! and [`replies`](super::replies): the writer, the tailer, the trimmer and
//! [`RedisLog`](super::RedisLog) depend on it, never on each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Value;
use tokio::sync::watch;

use super::connections::{redis_err, Conn, RedisClients};
use super::replies::{decode_snapshot, Snapshot};
use crate::hub::Hub;
use crate::log::stats::StatsTable;
use crate::log::{LogError, RetentionPolicy};
use crate::metrics::Metrics;
use crate::model::Epoch;

/// Settings of one Redis log, gathered from the config.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The hash tag's content: every key of the log is `{<tag>}:…`.
    pub tag: String,
    /// Publishes waiting for the writer; more wait for a place.
    pub publish_queue: usize,
    /// Most events sent to Redis in one append call.
    pub max_commit_batch: usize,
    /// What to keep per topic (trimmed inside the append script).
    pub retention: RetentionPolicy,
    /// How often the age trim runs when nobody publishes.
    pub trim_interval: Duration,
    /// How long an idempotency key is remembered (its Redis TTL).
    pub key_window: Duration,
    /// `WAIT <wait_replicas> <wait_timeout>` after each append (0 = no WAIT).
    pub wait_replicas: u32,
    /// How long `WAIT` may take.
    pub wait_timeout: Duration,
    /// How often a delivery probe is appended (zero = no probe).
    pub probe_interval: Duration,
}

/// State shared by the writer, the tailer, the trimmer and readers.
pub(super) struct Shared {
    /// The deployment's connections (shared with other logs on it).
    pub clients: RedisClients,
    /// `migrations/redis/v1.lua`: every operation is one atomic call of it.
    pub script: redis::Script,
    /// `{tag}:log`: the script's only declared key (routes it on a Cluster).
    pub log_key: String,
    /// The prefix of every id this log assigns; checked by every append.
    pub epoch: Epoch,
    /// Highest sequence this node's tailer has delivered (handed to the hub;
    /// with `wait_replicas`, only once known replicated); readers never go
    /// past it.
    pub durable_head: AtomicU64,
    /// Highest sequence the tailer read but holds undelivered, waiting for a
    /// commit marker (`wait_replicas >= 1`); 0 when it holds nothing. The
    /// idle writer confirms replication when it stays above `durable_head`.
    pub held: AtomicU64,
    /// The same, for waiters ([`Log::settle`](crate::log::Log::settle)).
    pub head_tx: watch::Sender<u64>,
    /// Per-topic counts and watermarks, kept exact from the tailed entries.
    pub stats: StatsTable,
    /// Set when Redis lost the log (epoch changed, head went back): writes
    /// are refused until restart, since ids could otherwise repeat. Shared
    /// so every refusal carries the original cause.
    pub failed: Mutex<Option<Arc<LogError>>>,
    /// Redis answered the last command / tail read.
    pub healthy: AtomicBool,
    /// The writer holds a connection that answered since the last outage:
    /// the next publish would be stored (with `healthy`, what `/readyz` says).
    pub writer_ready: AtomicBool,
    /// This node's delivery probe: readiness waits for it through the tail.
    pub probe: super::probe::Probe,
    /// This node's live fan-out, fed by the tailer.
    pub hub: Arc<Hub>,
    /// Commit sizes and durations.
    pub metrics: Arc<Metrics>,
    /// The settings the log was opened with.
    pub options: RedisOptions,
}

impl Shared {
    /// Why writes are refused, if Redis lost the log.
    pub fn failure(&self) -> Option<Arc<LogError>> {
        self.failed.lock().clone()
    }

    /// Refuses writes from now on, for `cause`.
    pub fn fail(&self, cause: Arc<LogError>) {
        tracing::error!(log = %self.log_key, reason = %cause, "redis log lost; refusing writes until restart");
        self.healthy.store(false, Ordering::Release);
        *self.failed.lock() = Some(cause);
    }

    /// Marks Redis unavailable (logged once per outage); a lost log also
    /// refuses writes from now on.
    pub fn unhealthy(&self, e: &LogError) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            self.writer_ready.store(false, Ordering::Release);
            tracing::warn!(log = %self.log_key, error = %e, "redis unavailable; retrying");
        }
        if let LogError::Lost(why) = e {
            self.fail(Arc::new(LogError::Lost(why.clone())));
        }
    }

    /// Raises this node's durable head (never lowers it) and wakes waiters.
    pub fn raise_head(&self, seq: u64) {
        if seq > self.durable_head.load(Ordering::Acquire) {
            self.durable_head.store(seq, Ordering::Release);
            self.head_tx.send_replace(seq);
        }
    }
}

/// A consistent view of the log `log_key` at one instant (one script call).
pub(super) async fn snapshot(
    script: &redis::Script,
    log_key: &str,
    conn: &mut Conn,
) -> Result<Snapshot, LogError> {
    let value: Value = script
        .key(log_key)
        .arg("snapshot")
        .invoke_async(conn)
        .await
        .map_err(redis_err)?;
    decode_snapshot(log_key, value)
}
