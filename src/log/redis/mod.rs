//! The Redis backend: several gateways share one log kept in Redis (a single
//! server, a primary found through Sentinel, or a Cluster), with the same
//! guarantees as the sled log.
//!
//! **Keys.** One log lives under one hash tag, `{<tag>}` (`{sse}`, or
//! `{sse:org:<org>}` for an org's own log), so every key of it is in one
//! Cluster slot and one Lua script can touch them all atomically:
//!
//! | key                  | type   | what                                          |
//! |----------------------|--------|-----------------------------------------------|
//! | `{tag}:version`      | string | layout version (1), checked at start          |
//! | `{tag}:epoch`        | string | the log's epoch                               |
//! | `{tag}:head`         | string | last assigned sequence (`INCR`)               |
//! | `{tag}:log`          | stream | one entry `<seq>-0` per event: `n` name, `ms` time, `t` topics, `d` data, `x` trim state; trim markers, probes and commit markers `<head>-<k>` |
//! | `{tag}:t:<topic>`    | zset   | the topic index: member = score = seq         |
//! | `{tag}:w`            | hash   | topic → highest sequence trimmed              |
//! | `{tag}:rc`           | hash   | seq → topic indexes still holding the event   |
//! | `{tag}:topics`       | set    | every topic ever published to                 |
//! | `{tag}:p:<node>`     | list   | a node's last delivery probes (see `probe`)   |
//! | `{tag}:r`            | hash   | replicated watermark: `seq` (every event up to it seen by `WAIT` on the replicas), `id` (the newest commit marker), `confirms` |
//! | `{tag}:i:<org>:<key>`| string | idempotency key: `<seq> <digest hex>`, TTL `publish.idempotency_window_s` |
//!
//! **Script.** `migrations/redis/v1.lua` does every operation in one atomic
//! call (loaded with `SCRIPT LOAD` at start, then `EVALSHA`): `append`
//! checks the epoch, `INCR`s the head, `XADD`s the event once, indexes it per
//! topic, trims per retention (count and age) and writes the resulting trim
//! state into the entry itself, and checks and stores idempotency keys in
//! the same call (so of two nodes sending one key only one stores), so every node's tailer keeps exact per-topic
//! stats without asking Redis.
//!
//! **Parts.** The `writer` appends publishes in groups, one script call
//! each (see the README for what a `201` means under each persistence
//! setting). The `tailer` follows the stream (reading when the script's
//! `PUBLISH` says it grew) and hands every event, whoever appended it, to
//! this node's hub; subscribers never talk to Redis except
//! for replay reads.
//!
//! **What a `201` means across a failover.** With `wait_replicas = 0`: the
//! primary executed the append; a replica promoted before it got the event
//! lacks it, although subscribers may have seen it. With `wait_replicas =
//! N ≥ 1`: `WAIT` also saw N replicas hold it, and no node delivers an event
//! (to its hub or to replay reads) before a commit marker says it is
//! replicated: after each successful `WAIT` the writer's next append
//! carries one (or `commit` writes it alone), and an idle writer whose tail holds events confirms them
//! (`confirm`, `WAIT`, `commit`), which covers a marker lost in a failover
//! or a writer that died between its `WAIT` and its marker. A failover then
//! loses nothing acknowledged (if Sentinel promotes a replica `WAIT` counted)
//! and un-says nothing delivered: the tails drop what they held and read
//! again from what they delivered, and sequences of lost, never delivered
//! events are reused safely. The `trimmer` applies age retention to quiet logs.
//! They share `shared::Shared` and never call each other; `connections`
//! and `replies` are below them all.
//!
//! **Faults.** A failed command answers `503` (the script is atomic: nothing
//! half-stored). The tailer reconnects, and a Redis that lost the log (its
//! epoch changed, or its head is below what this node delivered) makes it
//! refuse writes until the gateway restarts (see `tailer`).
//!
//! **Connections** (size Redis `maxclients` by them): per node a fixed
//! set, whatever the number of open logs (one per org with tenancy): one
//! shared multiplexed connection (replay reads, trims, probes), one reader
//! every log's tail reads through, a pool of `storage.writer_connections`
//! every log's writer appends through (`WAIT` blocks the one it is sent on),
//! and one pub/sub subscriber that tells tails when their log got entries
//! (see `connections`). On a Cluster each but the subscriber is a Cluster
//! connection (one TCP connection per primary). With `wait_replicas`, a
//! Cluster's `WAIT` goes to the primary of the log's slot (see `Conn::wait`).
//! The `probe` checks delivery itself: a probe appended every interval must
//! come back through this node's tail, or the log is not ready and the node
//! replaces its reader and subscription.

mod connections;
pub mod offline;
mod probe;
mod replies;
mod shared;
mod tailer;
mod trimmer;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use redis::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::connections::{is_broken, redis_err};
use self::replies::{decode_event, entry_fields, number, text, StreamPos};
use self::shared::{snapshot, Shared};
use super::queue::{self, WriterMsg};
use super::stats::StatsTable;
use super::{Appended, Log, LogError, NewEvent, ReadBatch, ReadLimit, RetentionFloor, TopicInfo};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::{Epoch, Topic};

pub use self::connections::{RedisClients, RedisTarget};
pub use self::shared::RedisOptions;

/// The layout version this build writes; `migrations/redis/v1.md` describes it.
pub const CURRENT_LAYOUT: u32 = 1;

/// The script of [`CURRENT_LAYOUT`].
const SCRIPT_SOURCE: &str = include_str!("../../../migrations/redis/v1.lua");

/// How long a resume from an id this node has not seen yet waits for its tailer.
const SETTLE_WAIT: Duration = Duration::from_secs(3);

/// A log kept in Redis, shared by every gateway pointed at it.
pub struct RedisLog {
    shared: Arc<Shared>,
    writer_tx: mpsc::Sender<WriterMsg>,
    closing: AtomicBool,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl RedisLog {
    /// Opens (creating it if new) the log `{options.tag}` on `clients`: loads
    /// the script, checks the layout version (refusing a newer one), reads
    /// the epoch, head and per-topic stats, and starts the writer, the tailer
    /// and the trimmer.
    pub async fn open(
        clients: RedisClients,
        options: RedisOptions,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LogError> {
        let started = Instant::now();
        let script = redis::Script::new(SCRIPT_SOURCE);
        let log_key = format!("{{{}}}:log", options.tag);
        let mut conn = clients.shared().await?;
        if !clients.script_loaded.load(Ordering::Acquire) {
            script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(redis_err)?;
            clients.script_loaded.store(true, Ordering::Release);
        }
        let candidate = Epoch::generate();
        let (version, epoch): (String, Option<String>) = script
            .key(&log_key)
            .arg("init")
            .arg(candidate.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let version: u32 = version.parse().map_err(|_| LogError::Corrupt {
            key: format!("{{{}}}:version", options.tag),
            what: format!("not a version: {version:?}"),
        })?;
        if version > CURRENT_LAYOUT {
            return Err(LogError::LayoutTooNew {
                found: version,
                supported: CURRENT_LAYOUT,
            });
        }
        let epoch = epoch
            .as_deref()
            .and_then(Epoch::parse)
            .ok_or_else(|| LogError::Corrupt {
                key: format!("{{{}}}:epoch", options.tag),
                what: "missing or not an epoch".into(),
            })?;
        let snapshot = snapshot(&script, &log_key, &mut conn).await?;
        if snapshot.epoch.as_deref() != Some(epoch.as_str()) {
            return Err(LogError::Lost(format!(
                "the epoch of {log_key} changed while opening it"
            )));
        }
        // With wait_replicas, events above the replicated watermark are not
        // delivered yet: the tail starts below them and holds them until a
        // commit marker covers them (see `tailer`). Confirming first makes
        // that nothing, normally (replicas up).
        let mut replicated = snapshot.replicated;
        let gated = options.wait_replicas > 0;
        if gated && replicated.is_none_or(|r| r < snapshot.head) {
            let limits = (options.wait_replicas, options.wait_timeout);
            let confirmed = match clients.writer(&log_key).await {
                Ok(mut c) => writer::confirm(&script, &log_key, &epoch, limits, &mut c.conn).await,
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(head) => replicated = Some(head),
                Err(e) => tracing::warn!(
                    log = %log_key,
                    error = %e,
                    "replicas did not confirm the log at open; events not known replicated are held"
                ),
            }
        }
        let (head, tail) = match replicated {
            Some(replicated) if gated && replicated < snapshot.head => (
                replicated,
                tailer::TailState::new(StreamPos(replicated, 0), replicated),
            ),
            // No marker was ever written (a log used without wait_replicas,
            // whose replicas do not answer now): nothing known to hold.
            _ => {
                let released = match gated {
                    true => replicated.unwrap_or(0).max(snapshot.head),
                    false => u64::MAX,
                };
                (
                    snapshot.head,
                    tailer::TailState::new(snapshot.last_id, released),
                )
            }
        };
        let stats = StatsTable::default();
        stats.replace(snapshot.topics);
        tracing::info!(
            log = %log_key,
            epoch = epoch.as_str(),
            head,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened redis log"
        );
        let (head_tx, _) = watch::channel(head);
        let shared = Arc::new(Shared {
            clients,
            script,
            log_key,
            epoch,
            durable_head: AtomicU64::new(head),
            held: AtomicU64::new(0),
            head_tx,
            stats,
            failed: Mutex::new(None),
            healthy: AtomicBool::new(true),
            writer_ready: AtomicBool::new(true),
            probe: probe::Probe::new(options.probe_interval),
            hub,
            metrics,
            options,
        });
        let stop = CancellationToken::new();
        let (writer_tx, writer_rx) = mpsc::channel(shared.options.publish_queue.max(1));
        let tasks = vec![
            tokio::spawn(writer::run_writer(Arc::clone(&shared), writer_rx)),
            tokio::spawn(tailer::run_tailer(Arc::clone(&shared), tail, stop.clone())),
            tokio::spawn(trimmer::run_trimmer(Arc::clone(&shared), stop.clone())),
            tokio::spawn(probe::run_prober(Arc::clone(&shared), stop.clone())),
        ];
        Ok(Self {
            shared,
            writer_tx,
            closing: AtomicBool::new(false),
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// The stream key of this log (`{tag}:log`).
    pub fn log_key(&self) -> &str {
        &self.shared.log_key
    }
}

/// Reads events of `topics` in `(after, upto]` with one `read` script call,
/// which also answers the topics' trim watermarks.
async fn read_range(
    shared: Arc<Shared>,
    topics: Vec<Topic>,
    after: u64,
    upto: u64,
    limit: ReadLimit,
) -> Result<ReadBatch, LogError> {
    if after >= upto || limit.events == 0 || topics.is_empty() {
        return Ok(ReadBatch {
            events: Vec::new(),
            through: after.max(upto),
        });
    }
    let mut conn = shared.clients.shared().await?;
    let mut invocation = shared.script.key(&shared.log_key);
    invocation
        .arg("read")
        .arg(after)
        .arg(upto)
        .arg(limit.events)
        .arg(topics.len());
    for topic in &topics {
        invocation.arg(topic.as_str());
    }
    // A read is idempotent: one retry on a fresh connection covers the
    // shared connection noticing a Redis restart only when it is used.
    let value: Value = match invocation.invoke_async(&mut conn).await {
        Ok(value) => value,
        Err(e) if is_broken(&e) => {
            shared.clients.broken(&e);
            let mut conn = shared.clients.shared().await?;
            invocation.invoke_async(&mut conn).await.map_err(|e| {
                shared.clients.broken(&e);
                redis_err(e)
            })?
        }
        Err(e) => return Err(redis_err(e)),
    };
    let bad = |what: &str| LogError::Corrupt {
        key: shared.log_key.clone(),
        what: format!("read: {what}"),
    };
    let Value::Array(items) = value else {
        return Err(bad("not an array"));
    };
    let mut items = items.into_iter();
    let through = items
        .next()
        .and_then(|v| number(&v))
        .ok_or_else(|| bad("through"))?;
    let Some(Value::Array(watermarks)) = items.next() else {
        return Err(bad("watermarks"));
    };
    // Raised before the caller checks its retention floor: a read that
    // missed a trimmed event always sees the trim (as with sled's trimmer).
    for (topic, wm) in topics.iter().zip(&watermarks) {
        if let Some(wm) = number(wm).filter(|w| *w > 0) {
            shared.stats.raise_trimmed(topic, wm);
        }
    }
    let mut events = Vec::with_capacity(items.len());
    for entry in items {
        let Value::Array(parts) = entry else {
            return Err(bad("entry"));
        };
        let id = parts
            .first()
            .and_then(text)
            .and_then(|t| StreamPos::parse(&t))
            .ok_or_else(|| bad("entry id"))?;
        let fields = parts
            .get(1)
            .and_then(entry_fields)
            .ok_or_else(|| bad("entry fields"))?;
        events.push(decode_event(&shared.log_key, id.0, &fields)?);
    }
    let mut batch = ReadBatch {
        events,
        through: through.min(upto),
    };
    // The script counts events only; the byte bound is applied here (the
    // reply itself is transient, what a stream keeps is bounded).
    batch.cut_to_bytes(limit.bytes);
    Ok(batch)
}

impl Log for RedisLog {
    fn epoch(&self) -> &Epoch {
        &self.shared.epoch
    }

    fn durable_head(&self) -> u64 {
        self.shared.durable_head.load(Ordering::Acquire)
    }

    fn append_all(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Appended>, LogError>> {
        async move {
            if self.closing.load(Ordering::Acquire) {
                return Err(LogError::Closed);
            }
            if let Some(cause) = self.shared.failure() {
                return Err(LogError::Failed(cause));
            }
            queue::append(&self.writer_tx, events).await
        }
        .boxed()
    }

    fn read(
        &self,
        topics: &[Topic],
        after: u64,
        upto: u64,
        limit: ReadLimit,
    ) -> BoxFuture<'static, Result<ReadBatch, LogError>> {
        let upto = upto.min(self.durable_head());
        read_range(
            Arc::clone(&self.shared),
            topics.to_vec(),
            after,
            upto,
            limit,
        )
        .boxed()
    }

    fn retention_floor(&self, topics: &[Topic]) -> RetentionFloor {
        self.shared.stats.retention_floor(topics)
    }

    fn topic_info(&self, topic: &Topic) -> TopicInfo {
        self.shared.stats.info(topic)
    }

    fn topics(&self) -> Vec<(Topic, TopicInfo)> {
        self.shared.stats.all()
    }

    fn is_ready(&self) -> bool {
        !self.closing.load(Ordering::Acquire)
            && self.shared.failure().is_none()
            && self.shared.healthy.load(Ordering::Acquire)
            && self.shared.writer_ready.load(Ordering::Acquire)
            && self.shared.clients.listening()
            && !self.shared.probe.is_late()
    }

    fn tail_lag(&self) -> Option<Duration> {
        self.shared.probe.lag()
    }

    fn size_on_disk(&self) -> Option<u64> {
        None
    }

    fn settle(&self, seq: u64) -> BoxFuture<'_, ()> {
        async move {
            if seq <= self.durable_head() {
                return;
            }
            // Only wait for what Redis really holds: a bogus id answers at once.
            let Ok(mut conn) = self.shared.clients.shared().await else {
                return;
            };
            let head_key = format!("{{{}}}:head", self.shared.options.tag);
            let held: Option<u64> =
                match redis::cmd("GET").arg(head_key).query_async(&mut conn).await {
                    Ok(held) => held,
                    Err(e) => {
                        self.shared.clients.broken(&e);
                        None
                    }
                };
            if held.is_none_or(|h| h < seq) {
                return;
            }
            let mut rx = self.shared.head_tx.subscribe();
            let _ = tokio::time::timeout(SETTLE_WAIT, rx.wait_for(|head| *head >= seq)).await;
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        async move {
            self.closing.store(true, Ordering::Release);
            queue::shut_down(&self.writer_tx).await;
            self.stop.cancel();
            let tasks = std::mem::take(&mut *self.tasks.lock());
            for task in tasks {
                let _ = task.await;
            }
            Ok(())
        }
        .boxed()
    }
}
