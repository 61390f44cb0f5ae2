//! The embedded sled backend: one writer thread with group commit, readers
//! capped at the durable watermark, and a background retention trimmer.
//!
//! Publishes reach the writer through one bounded channel. The writer takes
//! everything queued (up to `max_commit_batch`), assigns consecutive
//! sequences, writes the events, their index entries and the new head in one
//! atomic `apply_batch`, makes it durable once (`Db::flush`, then the
//! fdatasync/fsync of `durable.rs`, since sled's flush alone is not
//! power-safe) and only then acks every
//! request, raises the durable watermark and hands the events to the hub. So
//! ids follow commit order, a `201` means on disk, and the fsync cost is
//! shared by everything that queued while the previous one ran.
//!
//! The writer is an OS thread, not a tokio task: `flush` blocks on the disk
//! and must not hold a runtime worker.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::codec::{self, EVENT_PREFIX, INDEX_PREFIX, TRIMMED_PREFIX};
use super::durable::DiskSync;
use super::format;
use super::queue::{self, Pending, WriterMsg};
use super::retention::{self, RetentionPolicy};
use super::stats::{StatsTable, TopicStats};
use super::{LiveEvent, Log, LogError, NewEvent, ReadBatch, RetentionFloor, TopicInfo};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::{Epoch, Topic};
use crate::sse;

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
        let writer = Writer {
            shared: Arc::clone(&shared),
            disk,
            hub,
            metrics,
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

/// The single writer: owns sequence assignment.
struct Writer {
    shared: Arc<Shared>,
    /// fdatasync/fsync after sled's flush, which alone is not power-safe.
    disk: DiskSync,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    next_seq: u64,
    max_batch: usize,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let mut pending: Vec<Pending> = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            let mut shutdown = None;
            let mut next = Some(first);
            // Group commit: everything that queued while the last fsync ran.
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
                self.commit(&mut pending);
            }
            if let Some(reply) = shutdown {
                let flushed = self.shared.db.flush().map_err(LogError::from);
                if let Err(e) = flushed.and_then(|_| self.disk.sync().map_err(LogError::Sync)) {
                    tracing::error!(error = %e, "final flush failed");
                }
                let _ = reply.send(());
                return;
            }
        }
    }

    fn commit(&mut self, pending: &mut Vec<Pending>) {
        if let Some(reason) = self.shared.failed.lock().clone() {
            for (_, reply) in pending.drain(..) {
                let _ = reply.send(Err(LogError::Failed(reason.clone())));
            }
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
            .and_then(|()| self.shared.db.flush().map(drop))
            .map_err(LogError::from)
            .and_then(|()| self.disk.sync().map_err(LogError::Sync));
        if let Err(e) = written {
            tracing::error!(error = %e, "log write failed; refusing further writes until restart");
            *self.shared.failed.lock() = Some(e.to_string());
            for (_, reply) in pending.drain(..) {
                let _ = reply.send(Err(LogError::Failed(e.to_string())));
            }
            return;
        }
        self.next_seq = last_seq + 1;
        self.shared.stats.record_appends(
            pending
                .iter()
                .enumerate()
                .map(|(i, (e, _))| (&e.topics[..], first_seq + i as u64)),
        );
        // Visible to readers only now that it is on disk; before the hub so a
        // subscriber that reads the head after subscribing misses nothing.
        self.shared.durable_head.store(last_seq, Ordering::Release);
        let durable_at = Instant::now();
        self.metrics.record_commit(pending.len(), started.elapsed());
        for (offset, (event, reply)) in pending.drain(..).enumerate() {
            let seq = first_seq + offset as u64;
            let frame = sse::event_frame(
                &self.shared.epoch,
                seq,
                event.name.as_str(),
                event.data.as_bytes(),
            );
            self.hub.publish(Arc::new(LiveEvent {
                seq,
                topics: event.topics,
                frame,
                durable_at,
            }));
            let _ = reply.send(Ok(seq));
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
            queue::append(&self.writer_tx, event).await
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
            queue::shut_down(&self.writer_tx).await;
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
