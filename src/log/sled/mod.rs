//! The embedded sled backend: one writer thread with group commit, readers
//! capped at the durable watermark, and a background retention trimmer.
//!
//! Publishes reach the `writer` through one bounded channel; it makes each
//! batch durable (`durable.rs` adds the fsync sled's flush lacks) before it
//! acks, raises the watermark and hands the events to the hub. `reads`
//! serve replays, the `trimmer` enforces retention, and all three share one
//! `shared::Shared` state and never call each other. The key layout and
//! record encoding are [`codec`]'s, the format versions [`format`](mod@format)'s, and
//! [`offline`] works on a directory no gateway has open (the operator CLI).

pub mod codec;
mod durable;
#[cfg(target_os = "linux")]
pub use durable::fsync_every_log_write;
pub mod format;
pub mod mark;
pub mod offline;
pub mod preserve;
mod reads;
mod shared;
mod trimmer;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::mark::AckMark;
pub(crate) use self::shared::now_ms;
use self::shared::Shared;
use self::writer::Writer;
use super::queue::{self, WriterMsg};
use super::{
    Appended, Log, LogError, NewEvent, ReadBatch, ReadLimit, RetentionFloor, RetentionPolicy,
    TopicInfo,
};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::{Epoch, Topic};

/// Settings the sled log needs, gathered from the config.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache, in bytes.
    pub cache_capacity_bytes: u64,
    /// Publishes waiting for the writer; more wait for a place.
    pub publish_queue: usize,
    /// Most events written in one atomic batch (one fsync).
    pub max_commit_batch: usize,
    /// What the trimmer keeps per topic.
    pub retention: RetentionPolicy,
    /// How often the trimmer runs.
    pub trim_interval: Duration,
    /// How long an idempotency key is remembered.
    pub key_window: Duration,
}

/// The sled-backed log.
pub struct SledLog {
    shared: Arc<Shared>,
    writer_tx: mpsc::Sender<WriterMsg>,
    closing: AtomicBool,
    trimmer_stop: CancellationToken,
    trimmer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Keeps the `acked-head` mark (`mark.rs`) about a second behind the
    /// durable head; returns it for the last write at close.
    marker: Mutex<Option<tokio::task::JoinHandle<Option<AckMark>>>>,
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
        // sled's recovery rewrites damaged bytes before we can refuse the
        // log: keep them first (`preserve.rs`), drop them once accepted.
        let pre_open = preserve::before_open(dir);
        let (shared, disk) = Shared::open(dir, options.cache_capacity_bytes)?;
        let shared = Arc::new(shared);
        let head = shared.durable_head.load(Ordering::Acquire);
        let marked = mark::read(dir).map_err(LogError::Sync)?;
        match mark::verify(marked.as_ref(), dir, &shared.epoch, head) {
            Err(LogError::AcknowledgedLost {
                dir, acked, found, ..
            }) => {
                let saved = pre_open.as_ref().map_or_else(
                    || "; the bytes sled's recovery rewrote could not be kept (see the log above)".to_owned(),
                    |kept| format!(
                        ". The bytes of `db` as they were before sled's recovery rewrote them (from the damage on) are kept in {}; `repair` puts them back into the copy it saves, so nothing is lost for good",
                        kept.path().display()
                    ),
                );
                return Err(LogError::AcknowledgedLost {
                    dir,
                    acked,
                    found,
                    saved,
                });
            }
            Err(e) => return Err(e),
            Ok(()) => {
                if let Some(kept) = pre_open {
                    kept.discard();
                }
            }
        }
        let ack_mark = AckMark::open(dir, marked, &shared.epoch, head).map_err(LogError::Sync)?;

        let (writer_tx, writer_rx) = mpsc::channel(options.publish_queue);
        let writer = Writer {
            shared: Arc::clone(&shared),
            disk,
            hub,
            metrics,
            next_seq: head + 1,
            max_batch: options.max_commit_batch,
            key_window_ms: options.key_window.as_millis() as u64,
        };
        let writer_thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run(writer_rx))
            .map_err(LogError::Spawn)?;

        let trimmer_stop = CancellationToken::new();
        let trimmer = tokio::spawn(trimmer::run_trimmer(
            Arc::clone(&shared),
            options.retention,
            options.trim_interval,
            trimmer_stop.clone(),
        ));
        let marker = tokio::spawn(run_marker(
            Arc::clone(&shared),
            ack_mark,
            trimmer_stop.clone(),
        ));

        Ok(Self {
            shared,
            writer_tx,
            closing: AtomicBool::new(false),
            trimmer_stop,
            trimmer: Mutex::new(Some(trimmer)),
            marker: Mutex::new(Some(marker)),
            writer_thread: Mutex::new(Some(writer_thread)),
        })
    }
}

/// How far the `acked-head` mark may trail the durable head. A loss of
/// acknowledged events newer than the mark goes unnoticed at the next open,
/// so this is short; each write is one small fdatasync.
const MARK_INTERVAL: Duration = Duration::from_secs(1);

/// Writes the durable head into the mark every [`MARK_INTERVAL`] while it
/// moves, until `stop`; hands the mark back for the last write at close
/// (`None` if a write's blocking task was lost, e.g. to a panic).
async fn run_marker(
    shared: Arc<Shared>,
    mut ack_mark: AckMark,
    stop: CancellationToken,
) -> Option<AckMark> {
    let mut tick = tokio::time::interval(MARK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Some(ack_mark),
            _ = tick.tick() => {}
        }
        if shared.durable_head.load(Ordering::Acquire) == ack_mark.written() {
            continue;
        }
        let task_shared = Arc::clone(&shared);
        match tokio::task::spawn_blocking(move || {
            mark_durable_head(&task_shared, &mut ack_mark);
            ack_mark
        })
        .await
        {
            Ok(back) => ack_mark = back,
            // The task that held the mark is gone (a panic, or the runtime
            // shutting down): stop marking rather than hang `close`.
            Err(e) => {
                tracing::error!(error = %e, "the acked-head mark writer stopped");
                return None;
            }
        }
    }
}

/// One mark write of the current durable head (never more than is durable:
/// the writer raises `durable_head` only after its fsync). A failure is
/// logged, not fatal: the mark detects damage, it does not make anything
/// durable, and a failing disk fails the commits themselves.
fn mark_durable_head(shared: &Shared, ack_mark: &mut AckMark) {
    let head = shared.durable_head.load(Ordering::Acquire);
    if head == ack_mark.written() {
        return;
    }
    if let Err(e) = ack_mark.write(&shared.epoch, head) {
        tracing::error!(error = %e, "cannot write the acked-head mark");
    }
}

impl Log for SledLog {
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
        let db = self.shared.db.clone();
        let topics = topics.to_vec();
        let upto = upto.min(self.durable_head());
        async move {
            tokio::task::spawn_blocking(move || {
                reads::read_blocking(&db, &topics, after, upto, limit)
            })
            .await?
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
                    .await?
                    .map_err(|_| LogError::WriterPanicked)?;
            }
            self.shared.db.flush_async().await?;
            // The writer is gone: the mark gets the final durable head.
            let marker = self.marker.lock().take();
            let ack_mark = match marker {
                Some(marker) => marker.await?,
                None => None,
            };
            if let Some(mut ack_mark) = ack_mark {
                let shared = Arc::clone(&self.shared);
                tokio::task::spawn_blocking(move || mark_durable_head(&shared, &mut ack_mark))
                    .await?;
            }
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    //! The open log: the `acked-head` mark as it keeps it (`mark.rs` tests
    //! the file itself), readiness, topics and size; and the helpers the
    //! other sled tests open and write logs with.
    use super::*;
    use crate::model::EventName;

    /// A log whose own trimmer keeps everything: tests trim explicitly.
    pub(crate) fn open(dir: &Path) -> SledLog {
        let keep_all = RetentionPolicy {
            max_events_per_topic: u64::MAX / 2,
            max_age: Duration::from_secs(365 * 86_400),
            batch_events: 100,
        };
        open_with(dir, keep_all, Duration::from_secs(3600))
    }

    /// A log whose trimmer runs `retention` every `trim_interval`.
    pub(crate) fn open_with(
        dir: &Path,
        retention: RetentionPolicy,
        trim_interval: Duration,
    ) -> SledLog {
        let options = SledOptions {
            cache_capacity_bytes: 1 << 20,
            publish_queue: 16,
            max_commit_batch: 16,
            retention,
            trim_interval,
            key_window: Duration::from_secs(60),
        };
        SledLog::open(
            dir,
            options,
            Arc::new(Hub::new(16)),
            Arc::new(Metrics::new()),
        )
        .expect("open the log")
    }

    /// Appends one event to `topics`; its sequence.
    pub(crate) async fn publish_to(log: &SledLog, topics: &[&str]) -> u64 {
        log.append(NewEvent {
            topics: topics.iter().map(|t| Topic::parse(t).unwrap()).collect(),
            name: EventName::parse("e").unwrap(),
            data: "{}".into(),
            key: None,
        })
        .await
        .expect("append")
    }

    async fn publish(log: &SledLog) -> u64 {
        publish_to(log, &["t"]).await
    }

    fn marked_seq(dir: &Path) -> u64 {
        mark::read(dir).unwrap().map_or(0, |m| m.seq)
    }

    /// Polls until the mark says `seq`, for at most a few mark intervals.
    async fn wait_for_mark(dir: &Path, seq: u64) {
        let deadline = tokio::time::Instant::now() + 5 * MARK_INTERVAL;
        while marked_seq(dir) != seq {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the mark stayed at {} (head {seq})",
                marked_seq(dir)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_mark_follows_the_durable_head_while_open_and_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        assert_eq!(marked_seq(dir.path()), 0, "a new log is marked at 0");
        // The first event too: the mark must not take seq 1 for "written".
        assert_eq!(publish(&log).await, 1);
        wait_for_mark(dir.path(), 1).await;
        for _ in 0..3 {
            publish(&log).await;
        }
        // Closed before the next tick: the close writes the last head.
        log.close().await.unwrap();
        assert_eq!(marked_seq(dir.path()), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_until_a_write_fails_or_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        assert!(log.is_ready());
        *log.shared.failed.lock() = Some(Arc::new(LogError::Closed));
        assert!(!log.is_ready(), "a failed write latches not ready");
        let refused = log.append_all(Vec::new()).await;
        assert!(
            matches!(refused, Err(LogError::Failed(_))),
            "appends are refused with the cause: {refused:?}"
        );
        *log.shared.failed.lock() = None;
        assert!(log.is_ready());
        log.close().await.unwrap();
        assert!(!log.is_ready(), "closed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lists_its_topics_and_reports_its_size_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        publish_to(&log, &["b", "a"]).await;
        publish_to(&log, &["a"]).await;
        let topics: Vec<(String, u64)> = log
            .topics()
            .into_iter()
            .map(|(topic, info)| (topic.to_string(), info.count))
            .collect();
        assert_eq!(topics, [("a".to_owned(), 2), ("b".to_owned(), 1)]);
        // 1 MiB of events later, the files hold at least that much.
        let data = format!("\"{}\"", "x".repeat(4000));
        for _ in 0..16 {
            let events: Vec<NewEvent> = (0..16)
                .map(|_| NewEvent {
                    topics: vec![Topic::parse("a").unwrap()],
                    name: EventName::parse("e").unwrap(),
                    data: data.clone(),
                    key: None,
                })
                .collect();
            log.append_all(events).await.unwrap();
        }
        let size = log.size_on_disk().expect("sled knows its size");
        assert!(size >= 1 << 20, "{size} bytes");
        log.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_log_does_not_rewrite_its_mark() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        publish(&log).await;
        wait_for_mark(dir.path(), 1).await;
        // Each write raises the slot's generation, which `Marked` compares.
        let before = mark::read(dir.path()).unwrap();
        tokio::time::sleep(MARK_INTERVAL * 5 / 2).await;
        assert_eq!(
            mark::read(dir.path()).unwrap(),
            before,
            "one fsync per second, forever"
        );
        log.close().await.unwrap();
    }
}
