//! The state an open sled log's writer, trimmer and readers share: the
//! database, the epoch, the durable watermark, the per-topic stats and the
//! failure latch, and how it is loaded at start.
//!
//! This is the bottom of the sled backend: it depends on the record format
//! only, and the writer, the trimmer and [`SledLog`](super::SledLog) all
//! depend on it, never on each other.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::codec::{self, EVENT_PREFIX, INDEX_PREFIX, TRIMMED_PREFIX};
use super::durable::{self, DiskSync};
use super::format;
use crate::log::stats::{StatsTable, TopicStats};
use crate::log::LogError;
use crate::model::{Epoch, Topic};

/// State shared by the writer, the trimmer and readers.
pub(crate) struct Shared {
    /// The one tree: events, index, watermarks and meta under prefixed keys.
    pub db: sled::Db,
    /// The prefix of every id this log assigns.
    pub epoch: Epoch,
    /// Highest sequence that is fsynced; readers never go past it.
    pub durable_head: AtomicU64,
    /// Per-topic counts and watermarks (sled has no cheap count).
    pub stats: StatsTable,
    /// Set when a write or fsync failed: from then on the on-disk state is
    /// uncertain, so writes are refused (ids are never reused) until restart.
    /// Shared so every refused append carries the original cause.
    pub failed: Mutex<Option<Arc<LogError>>>,
}

impl Shared {
    /// Opens (or creates, durably) the database in `dir`, upgrading an
    /// older format, checks that the head covers every stored event, and
    /// rebuilds the per-topic stats. O(index size). Returns the handles the
    /// writer syncs with.
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<(Self, DiskSync), LogError> {
        let started = Instant::now();
        durable::create_data_dir(dir).map_err(LogError::Sync)?;
        // No periodic flusher: `db` becomes durable only at our commits
        // (`durable.rs`), never midway through sled's own work.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match is_locked(&e) {
                true => LogError::Locked(dir.to_path_buf()),
                false => LogError::from(e),
            })?;
        let mut disk = DiskSync::open(dir).map_err(LogError::Sync)?;
        // During an upgrade the tree still holds format 1's long values, so
        // sled may write blob files: they are synced, not refused, until the
        // upgrade is done (`durable.rs`).
        let epoch = format::prepare(&db, &mut || {
            db.flush()?;
            disk.sync_allowing_blobs().map_err(LogError::Sync)
        })?;
        let mut head = format::read_head(&db)?;
        if let Some(item) = db.scan_prefix(EVENT_PREFIX).next_back() {
            let (key, _) = item?;
            let newest = codec::seq_suffix(&key)?;
            if newest > head {
                // A record above the head is the prefix of a commit that was
                // never acknowledged (the head sorts after the records and
                // before the index, `codec.rs`): it is invisible, and its id
                // is not handed out again.
                tracing::warn!(
                    head,
                    newest,
                    "a write never acknowledged left records above the head; ids continue after them"
                );
                head = newest;
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
        let shared = Self {
            db,
            epoch,
            durable_head: AtomicU64::new(head),
            stats,
            failed: Mutex::new(None),
        };
        Ok((shared, disk))
    }

    /// Why writes are refused, if a write failed earlier.
    pub fn failure(&self) -> Option<Arc<LogError>> {
        self.failed.lock().clone()
    }
}

/// Whether sled failed to open a directory because another process holds
/// its lock (sled says so only in the text of an `Io` error).
pub(crate) fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
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

/// Milliseconds since the Unix epoch: an event's append time, and the clock
/// `max_age` retention compares it with.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    //! What a reopened log rebuilds: its stats, and a head that never hands
    //! an id out twice.
    use super::*;
    use crate::log::sled::tests::{open, publish_to};
    use crate::log::Log;
    use crate::model::EventName;

    fn info(log: &super::super::SledLog, name: &str) -> (Option<u64>, Option<u64>, u64) {
        let info = log.topic_info(&Topic::parse(name).unwrap());
        (info.first, info.last, info.count)
    }

    #[test]
    fn a_directory_another_log_holds_is_locked_and_other_failures_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (_held, _disk) = Shared::open(dir.path(), 1 << 20).unwrap();
        match Shared::open(dir.path(), 1 << 20) {
            Err(LogError::Locked(path)) => assert_eq!(path, dir.path()),
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("opened a held directory"),
        }
        // sled fails to open for another reason: its `db` is a directory.
        let odd = tempfile::tempdir().unwrap();
        std::fs::create_dir(odd.path().join("db")).unwrap();
        match Shared::open(odd.path(), 1 << 20) {
            Err(LogError::Locked(_)) => panic!("EISDIR reported as a lock"),
            Err(_) => {}
            Ok(_) => panic!("opened a log whose db is a directory"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reopened_log_rebuilds_its_stats_and_never_reuses_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        for _ in 0..3 {
            publish_to(&log, &["a"]).await;
        }
        assert_eq!(publish_to(&log, &["a", "b"]).await, 4);
        log.close().await.unwrap();
        drop(log);

        let log = open(dir.path());
        assert_eq!(info(&log, "a"), (Some(1), Some(4), 4));
        assert_eq!(info(&log, "b"), (Some(4), Some(4), 1));
        assert_eq!(publish_to(&log, &["b"]).await, 5);
        // The head's record gone (as if trimmed): 5 is still taken.
        log.shared.db.remove(codec::event_key(5)).unwrap();
        log.shared.db.flush().unwrap();
        log.close().await.unwrap();
        drop(log);

        let log = open(dir.path());
        assert_eq!(publish_to(&log, &["b"]).await, 6);
        // A record above the head: the start of a commit that was never
        // acknowledged. Invisible, and its id is not handed out again.
        let mut batch = sled::Batch::default();
        let name = EventName::parse("e").unwrap();
        codec::encode_record(now_ms(), &name, &[Topic::parse("b").unwrap()], "{}")
            .insert_into(&mut batch, 9);
        log.shared.db.apply_batch(batch).unwrap();
        log.shared.db.flush().unwrap();
        log.close().await.unwrap();
        drop(log);

        let log = open(dir.path());
        assert_eq!(log.durable_head(), 9);
        assert_eq!(
            info(&log, "b"),
            (Some(4), Some(6), 3),
            "9 has no index entry"
        );
        assert_eq!(publish_to(&log, &["b"]).await, 10);
        log.close().await.unwrap();
    }
}
