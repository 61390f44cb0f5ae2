//! The embedded sled backend: one writer thread with group commit, readers
//! capped at the durable watermark, and a background retention trimmer.
//!
//! Publishes reach the writer through one bounded channel. The writer takes
//! everything queued (up to `max_commit_batch`), assigns consecutive
//! sequences, writes the events, their index entries and the new head in one
//! atomic `apply_batch` and calls sled's `flush`. It then hands the batch to
//! the sync stage (`sync_stage.rs`) and goes on with the next one: the stage
//! makes it durable (the fdatasync/fsync of `durable.rs`, since sled's flush
//! alone is not power-safe) and only then, in sequence order, raises the
//! durable watermark, hands the events to the hub and acks every request. So
//! ids follow commit order, a `201` means on disk, and the cost of one
//! fdatasync is shared by every batch flushed while the previous one ran.
//!
//! The writer and the stage are OS threads, not tokio tasks: `flush` and
//! fdatasync block on the disk and must not hold a runtime worker.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::codec::{self, EVENT_PREFIX, INDEX_PREFIX, TRIMMED_PREFIX};
use super::durable::DiskSync;
use super::format;
use super::retention::{self, RetentionPolicy};
use super::stats::{StatsTable, TopicStats};
use super::sync_stage::{self, Flushed, Pending, StageMsg, SyncStage};
use super::{Log, LogError, NewEvent, ReadBatch, RetentionFloor, TopicInfo};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::{Epoch, Topic};

/// Flushed batches that may wait for the sync stage. The stage syncs all
/// waiting batches at once, so a few are enough to keep the writer busy while
/// an fdatasync runs; more would only let the writer run further ahead.
const SYNC_STAGE_DEPTH: usize = 4;

/// Settings the sled log needs, gathered from the config.
#[derive(Debug, Clone)]
pub struct SledOptions {
    pub cache_capacity_bytes: u64,
    pub publish_queue: usize,
    pub max_commit_batch: usize,
    pub retention: RetentionPolicy,
    pub trim_interval: Duration,
}

/// State shared by the writer, the trimmer and readers.
pub(crate) struct Shared {
    pub db: sled::Db,
    pub epoch: Epoch,
    /// Highest sequence that is fsynced; readers never go past it.
    pub durable_head: AtomicU64,
    pub stats: StatsTable,
    /// Set when a write or fsync failed: from then on the on-disk state is
    /// uncertain, so writes are refused (ids are never reused) until restart.
    pub failed: Mutex<Option<String>>,
}

enum WriterMsg {
    Append(NewEvent, oneshot::Sender<Result<u64, LogError>>),
    /// Finish everything queued before this, flush, and stop.
    Shutdown(oneshot::Sender<()>),
}

/// The sled-backed log.
pub struct SledLog {
    shared: Arc<Shared>,
    writer_tx: mpsc::Sender<WriterMsg>,
    closing: AtomicBool,
    trimmer_stop: CancellationToken,
    trimmer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SledLog {
    /// Opens (or creates) the log in `dir`, upgrading an older format, and
    /// starts the writer thread and the trimmer. Must run inside a tokio runtime.
    pub fn open(
        dir: &Path,
        options: SledOptions,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LogError> {
        let started = Instant::now();
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity_bytes)
            .open()?;
        let epoch = format::prepare(&db)?;
        let head = format::read_head(&db)?;
        if let Some(item) = db.scan_prefix(EVENT_PREFIX).next_back() {
            let (key, _) = item?;
            let newest = codec::seq_suffix(&key)?;
            if newest > head {
                return Err(LogError::Corrupt {
                    key: "m/head".into(),
                    what: format!("head {head} is behind stored event {newest}"),
                });
            }
        }
        let stats = load_stats(&db)?;
        tracing::info!(
            dir = %dir.display(),
            epoch = epoch.as_str(),
            head,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened sled log"
        );
        let shared = Arc::new(Shared {
            db,
            epoch,
            durable_head: AtomicU64::new(head),
            stats,
            failed: Mutex::new(None),
        });

        let (writer_tx, writer_rx) = mpsc::channel(options.publish_queue);
        let disk = DiskSync::open(dir).map_err(LogError::Sync)?;
        let (stage_tx, stage_rx) = std_mpsc::sync_channel(SYNC_STAGE_DEPTH);
        let stage = SyncStage {
            shared: Arc::clone(&shared),
            syncer: disk,
            hub,
            metrics,
        };
        let stage_thread = std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || stage.run(stage_rx))
            .map_err(|e| LogError::Task(e.to_string()))?;
        let writer = Writer {
            shared: Arc::clone(&shared),
            stage_tx,
            stage_thread,
            next_seq: head + 1,
            max_batch: options.max_commit_batch,
        };
        let writer_thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run(writer_rx))
            .map_err(|e| LogError::Task(e.to_string()))?;

        let trimmer_stop = CancellationToken::new();
        let trimmer = tokio::spawn(retention::run_trimmer(
            Arc::clone(&shared),
            options.retention,
            options.trim_interval,
            trimmer_stop.clone(),
        ));

        Ok(Self {
            shared,
            writer_tx,
            closing: AtomicBool::new(false),
            trimmer_stop,
            trimmer: Mutex::new(Some(trimmer)),
            writer_thread: Mutex::new(Some(writer_thread)),
        })
    }
}

/// Rebuilds per-topic stats from the index and the trim watermarks. O(index
/// size): sled keeps no counts of its own.
fn load_stats(db: &sled::Db) -> Result<StatsTable, LogError> {
    let mut table: HashMap<Topic, TopicStats> = HashMap::new();
    for item in db.scan_prefix(INDEX_PREFIX) {
        let (key, _) = item?;
        let (topic, seq) = codec::split_index_key(&key)?;
        let stats = table.entry(topic).or_default();
        if stats.count == 0 {
            stats.first = seq;
        }
        stats.last = seq;
        stats.count += 1;
    }
    for item in db.scan_prefix(TRIMMED_PREFIX) {
        let (key, value) = item?;
        let topic = std::str::from_utf8(&key[TRIMMED_PREFIX.len()..])
            .ok()
            .and_then(|t| Topic::parse(t).ok())
            .ok_or_else(|| LogError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                what: "invalid topic".into(),
            })?;
        table.entry(topic).or_default().trimmed_through = codec::decode_u64(&key, &value)?;
    }
    let stats = StatsTable::default();
    for (topic, topic_stats) in table {
        stats.load(topic, topic_stats);
    }
    Ok(stats)
}

/// The single writer: owns sequence assignment; the first stage of the
/// commit pipeline (encode, `apply_batch`, `flush`). The second stage
/// (`sync_stage.rs`) makes each batch power-safe and acks it.
struct Writer {
    shared: Arc<Shared>,
    /// Flushed batches go here, in sequence order. Bounded, so the writer
    /// stalls (and the publish queue fills) when syncs fall behind.
    stage_tx: std_mpsc::SyncSender<StageMsg>,
    stage_thread: std::thread::JoinHandle<()>,
    next_seq: u64,
    max_batch: usize,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let mut pending: Vec<Pending> = Vec::with_capacity(self.max_batch);
        let mut shutdown = None;
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            // Group commit: everything that queued while the last flush ran.
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Append(event, reply) => pending.push((event, reply)),
                    WriterMsg::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                if pending.len() < self.max_batch {
                    next = rx.try_recv().ok();
                }
            }
            if !pending.is_empty() {
                let batch = std::mem::replace(&mut pending, Vec::with_capacity(self.max_batch));
                self.commit(batch);
            }
            if shutdown.is_some() {
                break;
            }
        }
        // The stage handles everything sent before, then flushes and syncs
        // once more. Without a shutdown message (the log was dropped without
        // `close`) hanging up ends it the same way, minus the final sync.
        if let Some(reply) = shutdown {
            if let Err(std_mpsc::SendError(StageMsg::Shutdown(reply))) =
                self.stage_tx.send(StageMsg::Shutdown(reply))
            {
                let _ = reply.send(());
            }
        }
        drop(self.stage_tx);
        if self.stage_thread.join().is_err() {
            tracing::error!("log sync stage panicked");
        }
    }

    /// Writes one batch and flushes it, then hands it to the sync stage.
    /// Acks nothing itself.
    fn commit(&mut self, pending: Vec<Pending>) {
        if let Some(reason) = self.shared.failed.lock().clone() {
            sync_stage::fail_pending(pending, &reason);
            return;
        }
        let started = Instant::now();
        let time_ms = now_ms();
        let first_seq = self.next_seq;
        let mut batch = sled::Batch::default();
        for (offset, (event, _)) in pending.iter().enumerate() {
            let seq = first_seq + offset as u64;
            batch.insert(
                &codec::event_key(seq),
                codec::encode_record(time_ms, &event.name, &event.topics, &event.data),
            );
            for topic in &event.topics {
                batch.insert(codec::index_key(topic, seq), &[]);
            }
        }
        let last_seq = first_seq + pending.len() as u64 - 1;
        batch.insert(codec::HEAD_KEY, &last_seq.to_be_bytes());

        let written = self
            .shared
            .db
            .apply_batch(batch)
            .and_then(|()| self.shared.db.flush().map(drop));
        if let Err(e) = written {
            let e = LogError::from(e);
            tracing::error!(error = %e, "log write failed; refusing further writes until restart");
            let reason = e.to_string();
            self.shared.failed.lock().get_or_insert(reason.clone());
            sync_stage::fail_pending(pending, &reason);
            return;
        }
        self.next_seq = last_seq + 1;
        let flushed = Flushed {
            first_seq,
            events: pending,
            started,
        };
        if let Err(std_mpsc::SendError(StageMsg::Batch(batch))) =
            self.stage_tx.send(StageMsg::Batch(flushed))
        {
            // Only if the stage panicked: nobody can sync this batch.
            let reason = "the log sync stage stopped".to_owned();
            self.shared.failed.lock().get_or_insert(reason.clone());
            sync_stage::fail_pending(batch.events, &reason);
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads events of `topics` in `(after, upto]`, merged in sequence order.
///
/// Each topic contributes at most `limit` sequences from its index; the
/// smallest `limit` of their union are exactly the next `limit` events of the
/// topic set. An index entry whose event was trimmed meanwhile is skipped (the
/// caller's retention check reports it).
pub(crate) fn read_blocking(
    db: &sled::Db,
    topics: &[Topic],
    after: u64,
    upto: u64,
    limit: usize,
) -> Result<ReadBatch, LogError> {
    if after >= upto || limit == 0 {
        return Ok(ReadBatch {
            events: Vec::new(),
            through: after.max(upto),
        });
    }
    let mut seqs = BTreeSet::new();
    for topic in topics {
        let range = codec::index_key(topic, after + 1)..=codec::index_key(topic, upto);
        for item in db.range(range).take(limit) {
            let (key, _) = item?;
            seqs.insert(codec::seq_suffix(&key)?);
        }
    }
    // Fewer than `limit` in the union means every topic's range was exhausted.
    let through = if seqs.len() < limit {
        upto
    } else {
        seqs.iter().nth(limit - 1).copied().unwrap_or(upto)
    };
    let mut events = Vec::with_capacity(seqs.len().min(limit));
    for seq in seqs.into_iter().take(limit) {
        if let Some(value) = db.get(codec::event_key(seq))? {
            events.push(codec::decode_record(seq, &value)?);
        }
    }
    Ok(ReadBatch { events, through })
}

impl Log for SledLog {
    fn epoch(&self) -> &Epoch {
        &self.shared.epoch
    }

    fn durable_head(&self) -> u64 {
        self.shared.durable_head.load(Ordering::Acquire)
    }

    fn append(&self, event: NewEvent) -> BoxFuture<'_, Result<u64, LogError>> {
        async move {
            if self.closing.load(Ordering::Acquire) {
                return Err(LogError::Closed);
            }
            if let Some(reason) = self.shared.failed.lock().clone() {
                return Err(LogError::Failed(reason));
            }
            let (reply_tx, reply_rx) = oneshot::channel();
            // Waits for a place when the queue is full: backpressure on publishers.
            self.writer_tx
                .send(WriterMsg::Append(event, reply_tx))
                .await
                .map_err(|_| LogError::Closed)?;
            reply_rx.await.map_err(|_| LogError::Closed)?
        }
        .boxed()
    }

    fn read(
        &self,
        topics: &[Topic],
        after: u64,
        upto: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<ReadBatch, LogError>> {
        let db = self.shared.db.clone();
        let topics = topics.to_vec();
        let upto = upto.min(self.durable_head());
        async move {
            tokio::task::spawn_blocking(move || read_blocking(&db, &topics, after, upto, limit))
                .await
                .map_err(|e| LogError::Task(e.to_string()))?
        }
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
        !self.closing.load(Ordering::Acquire) && self.shared.failed.lock().is_none()
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.shared.db.size_on_disk().ok()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        async move {
            self.closing.store(true, Ordering::Release);
            self.trimmer_stop.cancel();
            let trimmer = self.trimmer.lock().take();
            if let Some(trimmer) = trimmer {
                let _ = trimmer.await;
            }
            let (done_tx, done_rx) = oneshot::channel();
            if self
                .writer_tx
                .send(WriterMsg::Shutdown(done_tx))
                .await
                .is_ok()
            {
                let _ = done_rx.await;
            }
            let thread = self.writer_thread.lock().take();
            if let Some(thread) = thread {
                tokio::task::spawn_blocking(move || thread.join())
                    .await
                    .map_err(|e| LogError::Task(e.to_string()))?
                    .map_err(|_| LogError::Task("log writer panicked".into()))?;
            }
            self.shared.db.flush_async().await?;
            Ok(())
        }
        .boxed()
    }
}
