//! The durable event log: the `Log` trait every storage backend implements.
//!
//! A log stores each published event once, under one sequence number, with an
//! index per topic; it acknowledges an append only once the event is durable,
//! and never lets a reader see past that durable watermark. After making a
//! batch durable it hands the events to the [`Hub`] for live
//! fan-out, in sequence order.
//!
//! Each backend lives in its own module and shares only what is here: the
//! writer queue (`queue`), the per-topic counters (`stats`) and the
//! hand-off to the hub (`hand_off`), so no backend depends on the other.

mod queue;
pub mod redis;
pub mod sled;
mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::hub::{Hub, LiveEvent};
use crate::idempotency::StoredKey;
use crate::model::{Epoch, EventName, Topic};

pub use self::redis::RedisLog;
pub use self::sled::SledLog;
pub use self::stats::TopicInfo;

/// Storage failures. Mapped to `503 unavailable` at the HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("storage error: {0}")]
    Storage(#[from] ::sled::Error),
    /// Another process (another gateway, or an offline command) holds the
    /// data directory: sled allows one at a time.
    #[error("the data directory {0} is locked: another process uses it (another sse-gateway, or an offline command); sled allows one at a time")]
    Locked(std::path::PathBuf),
    #[error("cannot sync the log to disk: {0}")]
    Sync(std::io::Error),
    #[error("the log is shutting down")]
    Closed,
    /// A write failed earlier (the cause is kept, shared by every refusal);
    /// the on-disk state is uncertain, so ids are never handed out again.
    #[error("storage failed earlier and refuses writes until restarted: {0}")]
    Failed(#[source] Arc<LogError>),
    #[error("corrupt log entry {key}: {what}")]
    Corrupt { key: String, what: String },
    #[error("data directory format version {found} is newer than this build supports ({supported}); upgrade sse-gateway")]
    TooNew { found: u32, supported: u32 },
    /// A blocking read or the writer's join did not finish (panic, cancel).
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The OS refused to start the sled writer thread.
    #[error("background task failed: cannot start the log writer: {0}")]
    Spawn(#[source] std::io::Error),
    /// The sled writer thread panicked.
    #[error("background task failed: log writer panicked")]
    WriterPanicked,
    /// Redis did not answer or refused a command (down, timeout, failover).
    #[error("redis error: {0}")]
    Redis(#[source] ::redis::RedisError),
    /// A group commit failed: every publish in it gets this one cause.
    #[error(transparent)]
    Commit(Arc<LogError>),
    /// Redis no longer holds the log this gateway opened (it lost its data).
    #[error("redis lost the log: {0}")]
    Lost(String),
    /// `WAIT` saw fewer replicas than `storage.wait_replicas` in time.
    #[error(
        "stored on the Redis primary but only {acked} of {wanted} replicas confirmed it in time"
    )]
    Replication { acked: u64, wanted: u32 },
    /// The data directory holds less than it acknowledged (its
    /// `acked-head` mark, `sled/mark.rs`): sled recovered a damaged log
    /// to what precedes the damage, or lost its state.
    #[error("the data directory {} has lost acknowledged events: events through {acked} were acknowledged, but its log now ends at {found}. The gateway does not serve a log with acknowledged events missing (nor hand their ids out again). `sse-gateway check --data-dir {}` reports what is readable; `sse-gateway repair --data-dir {}` first saves a copy of the directory, then starts the log again from what is left, with new ids after {acked}{saved}", .dir.display(), .dir.display(), .dir.display())]
    AcknowledgedLost {
        dir: std::path::PathBuf,
        acked: String,
        found: String,
        /// Where the bytes sled's recovery rewrote are kept (`sled/preserve.rs`),
        /// as a sentence appended to the message; empty where not applicable.
        saved: String,
    },
    #[error("the Redis log layout version {found} is newer than this build supports ({supported}); upgrade sse-gateway")]
    LayoutTooNew { found: u32, supported: u32 },
    /// Event `index` of an append carries an idempotency key stored (and
    /// not yet expired) with a different request. Nothing of that append
    /// was stored. `422 idempotency_key_reused` at the HTTP edge.
    #[error("idempotency key of event {index} was used before with a different request")]
    KeyReused { index: usize },
}

/// One event to append: validated topics and name, compact JSON data.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub topics: Vec<Topic>,
    pub name: EventName,
    pub data: String,
    /// The idempotency key stored with the event, in the same atomic write;
    /// an append whose key is already stored with the same digest answers
    /// the stored sequence and stores nothing.
    pub key: Option<StoredKey>,
}

/// What an append did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The event's sequence: new, or the one first stored under its key.
    pub seq: u64,
    /// `true` when its key was stored before with the same request: nothing
    /// was stored for it now.
    pub replayed: bool,
}

/// One event read back from the log.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    /// Milliseconds since the Unix epoch at append; drives `max_age` retention.
    pub time_ms: u64,
    pub name: EventName,
    pub topics: Vec<Topic>,
    pub data: Bytes,
}

/// How much one [`Log::read`] may return: at most `events` events, and no
/// more once their data reaches `bytes` (always at least one event, however
/// large). The byte bound is what keeps a replaying stream's memory
/// independent of event sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    pub events: usize,
    pub bytes: usize,
}

impl ReadBatch {
    /// Keeps the events whose data fits `bytes` (at least one); `through`
    /// then ends at the last event kept, so the next read starts after it.
    pub fn cut_to_bytes(&mut self, bytes: usize) {
        let mut total = 0usize;
        let keep = self
            .events
            .iter()
            .position(|e| {
                total = total.saturating_add(e.data.len());
                total >= bytes
            })
            .map_or(self.events.len(), |i| i + 1);
        if keep < self.events.len() {
            self.events.truncate(keep);
            if let Some(last) = self.events.last() {
                self.through = last.seq;
            }
        }
    }
}

/// The answer to one [`Log::read`].
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    pub events: Vec<StoredEvent>,
    /// Every event of the topics up to and including this sequence was
    /// considered: the next read starts after it.
    pub through: u64,
}

/// What to keep per topic; both backends trim to it.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    /// Most retained events per topic; older ones are trimmed.
    pub max_events_per_topic: u64,
    /// Events older than this are trimmed from every topic.
    pub max_age: Duration,
    /// Most events removed in one trim batch, so a trim never holds up writes for long.
    pub batch_events: usize,
}

/// What a subscriber needs to know about retention for a set of topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionFloor {
    /// Highest sequence trimmed from any of the topics (0 = none trimmed).
    pub trimmed_through: u64,
    /// Oldest retained sequence among the topics.
    pub oldest: Option<u64>,
}

/// Hands one durable event to the hub for live fan-out: the one place where
/// a log encodes an event's SSE frame, once, for every subscriber.
///
/// Both backends call it only after raising their durable head to `seq`, so
/// a subscriber that reads the head after subscribing misses nothing (see
/// `subscription`).
pub(crate) fn hand_off(
    hub: &Hub,
    epoch: &Epoch,
    seq: u64,
    name: &EventName,
    topics: Vec<Topic>,
    data: &[u8],
    durable_at: Instant,
) {
    let frame = crate::sse::event_frame(epoch, seq, name.as_str(), data);
    hub.publish(Arc::new(LiveEvent {
        seq,
        topics,
        frame,
        durable_at,
    }));
}

/// A storage backend.
pub trait Log: Send + Sync + 'static {
    /// This log's epoch, the prefix of every id it assigns.
    fn epoch(&self) -> &Epoch;

    /// The highest sequence that is durable and visible to readers (0 = none).
    fn durable_head(&self) -> u64;

    /// Appends `events` in one atomic commit, in order; resolves once they
    /// are durable, with one [`Appended`] per event. Events whose key is
    /// stored with the same request are answered from it and not stored
    /// again; a key stored with a different request refuses the whole
    /// append ([`LogError::KeyReused`]), storing none of it.
    fn append_all(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Appended>, LogError>>;

    /// Appends one event; resolves to its sequence once it is durable.
    fn append(&self, event: NewEvent) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            let appended = self.append_all(vec![event]).await?;
            appended.first().map(|a| a.seq).ok_or(LogError::Closed)
        })
    }

    /// Events of any of `topics` with `after < seq <= upto` (capped at the
    /// durable head), in sequence order, each once, within `limit`.
    fn read(
        &self,
        topics: &[Topic],
        after: u64,
        upto: u64,
        limit: ReadLimit,
    ) -> BoxFuture<'static, Result<ReadBatch, LogError>>;

    /// Retention state of a set of topics.
    fn retention_floor(&self, topics: &[Topic]) -> RetentionFloor;

    /// First/last retained id and count of one topic.
    fn topic_info(&self, topic: &Topic) -> TopicInfo;

    /// Every topic the log knows (retained events or a trim watermark), sorted.
    fn topics(&self) -> Vec<(Topic, TopicInfo)>;

    /// Open and accepting writes, and (for a log read through a tail) the
    /// tail delivering: the Redis log's delivery probe came back in time.
    fn is_ready(&self) -> bool;

    /// How far this node's tail is behind the log (the delivery probe's
    /// lag), for a log read through a tail; `None` when there is none (sled
    /// hands its writes to the hub in-process) or probing is off.
    fn tail_lag(&self) -> Option<Duration> {
        None
    }

    /// Bytes the log takes on disk, if known.
    fn size_on_disk(&self) -> Option<u64>;

    /// Resolves once this node has seen sequence `seq`, if the log holds it
    /// (a bounded wait; at once for a local log, or for an id the log does
    /// not hold). A shared log's node may not have seen an event yet that a
    /// client got acknowledged through another node; a resume from its id
    /// waits here instead of being taken for an id "ahead of the log".
    fn settle(&self, seq: u64) -> BoxFuture<'_, ()> {
        let _ = seq;
        Box::pin(std::future::ready(()))
    }

    /// Stops accepting appends, finishes those queued, flushes, stops
    /// background work. Idempotent.
    fn close(&self) -> BoxFuture<'_, Result<(), LogError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(sizes: &[usize]) -> ReadBatch {
        let events = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| StoredEvent {
                seq: i as u64 + 1,
                time_ms: 0,
                name: EventName::default_name(),
                topics: Vec::new(),
                data: Bytes::from(vec![b'x'; size]),
            })
            .collect();
        ReadBatch {
            events,
            through: 100,
        }
    }

    #[test]
    fn a_batch_is_cut_where_its_data_reaches_the_byte_bound_keeping_at_least_one() {
        let mut fits = batch(&[10, 10, 10]);
        fits.cut_to_bytes(100);
        assert_eq!((fits.events.len(), fits.through), (3, 100), "all fit");
        let mut cut = batch(&[10, 30, 10, 10]);
        cut.cut_to_bytes(40);
        assert_eq!(
            (cut.events.len(), cut.through),
            (2, 2),
            "the event reaching 40 is the last"
        );
        let mut huge = batch(&[1000, 10]);
        huge.cut_to_bytes(40);
        assert_eq!(
            (huge.events.len(), huge.through),
            (1, 1),
            "one event, however large"
        );
    }
}
