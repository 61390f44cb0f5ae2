//! The sled log's background retention: trims events past `max_age` and topics past
//! `max_events_per_topic`, in bounded batches, off the publish path.
//!
//! The trimmer never takes the writer's lock or channel: it only removes keys
//! the writer no longer touches (old index entries and records), in batches of
//! at most `trim_batch_events`, so publishes never wait for it. An event
//! record is removed when no topic's index refers to it any more.
//!
//! It also forgets idempotency keys whose window ended (`trim_keys_batch`).
//!
//! Each trim raises the topic's trimmed watermark in memory *before* the keys
//! go (and persists it in the same batch as the removal), so a reader that
//! misses an event because it was trimmed always sees that it fell behind and
//! sends a `reset`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::codec::{self, EVENT_PREFIX};
use super::shared::{now_ms, Shared};
use crate::log::{LogError, RetentionPolicy};
use crate::model::Topic;

/// Runs trim passes every `interval` until `stop`.
pub(crate) async fn run_trimmer(
    shared: Arc<Shared>,
    policy: RetentionPolicy,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let shared = Arc::clone(&shared);
        let pass = tokio::task::spawn_blocking(move || trim_pass(&shared, &policy, now_ms())).await;
        match pass {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::debug!(removed, "retention trimmed index entries"),
            Ok(Err(e)) => tracing::error!(error = %e, "retention pass failed"),
            Err(e) => tracing::error!(error = %e, "retention task failed"),
        }
    }
}

/// One pass: age first, then per-topic counts. Returns events and index entries visited for removal.
pub(crate) fn trim_pass(
    shared: &Shared,
    policy: &RetentionPolicy,
    now_ms: u64,
) -> Result<u64, LogError> {
    let mut removed = 0;
    let cutoff = now_ms.saturating_sub(policy.max_age.as_millis() as u64);
    loop {
        let n = trim_old_batch(shared, cutoff, policy.batch_events)?;
        removed += n;
        if n == 0 {
            break;
        }
    }
    for (topic, over) in shared.stats.over_limit(policy.max_events_per_topic) {
        let mut left = over;
        while left > 0 {
            let n = trim_topic_batch(
                shared,
                &topic,
                left.min(policy.batch_events as u64) as usize,
            )?;
            if n == 0 {
                break;
            }
            removed += n;
            left = left.saturating_sub(n);
        }
    }
    while trim_keys_batch(shared, now_ms, policy.batch_events)? > 0 {}
    Ok(removed)
}

/// Forgets up to `limit` idempotency keys whose window ended by `now_ms`,
/// oldest first, from the time-ordered expiry index: O(log n) to find them.
///
/// The writer may store the same key anew meanwhile (an expired key counts
/// as absent), so a key is removed only if it still holds the entry this
/// expiry belongs to (compare-and-swap); a stale expiry entry just goes.
/// Returns the expiry entries removed.
pub(crate) fn trim_keys_batch(shared: &Shared, now_ms: u64, limit: usize) -> Result<u64, LogError> {
    let end = codec::expiry_key(now_ms, "");
    let mut expired = Vec::new();
    for item in shared
        .db
        .range(codec::EXPIRY_PREFIX.to_vec()..end)
        .keys()
        .take(limit)
    {
        expired.push(item?);
    }
    let mut batch = sled::Batch::default();
    for key in &expired {
        let (expires_ms, scoped) = codec::split_expiry_key(key)?;
        let stored = codec::key_key(scoped);
        if let Some(value) = shared.db.get(&stored)? {
            if codec::KeyEntry::decode(&stored, &value)?.expires_ms == expires_ms {
                // Err(CompareAndSwapError): the writer stored it anew; keep it.
                let _ = shared
                    .db
                    .compare_and_swap(&stored, Some(value), None::<&[u8]>)?;
            }
        }
        batch.remove(key.clone());
    }
    if !expired.is_empty() {
        shared.db.apply_batch(batch)?;
    }
    Ok(expired.len() as u64)
}

/// Removes up to `limit` events older than `cutoff_ms` from every topic.
fn trim_old_batch(shared: &Shared, cutoff_ms: u64, limit: usize) -> Result<u64, LogError> {
    let head = shared.durable_head.load(Ordering::Acquire);
    let mut victims = Vec::new();
    for item in shared.db.scan_prefix(EVENT_PREFIX).take(limit) {
        let (key, value) = item?;
        let seq = codec::seq_suffix(&key)?;
        if seq > head {
            break;
        }
        let header = codec::decode_header(&shared.db, seq, &value)?;
        if header.time_ms >= cutoff_ms {
            break;
        }
        victims.push((seq, header));
    }
    let mut trim = TrimBatch::default();
    for (seq, header) in &victims {
        trim.remove_record(*seq, header.pieces);
        for topic in &header.topics {
            let present = shared.db.contains_key(codec::index_key(topic, *seq))?;
            trim.remove_index(topic, *seq, present);
        }
    }
    trim.apply(shared)?;
    Ok(victims.len() as u64)
}

/// Removes the `limit` oldest index entries of `topic`, and the events no
/// other topic still refers to.
fn trim_topic_batch(shared: &Shared, topic: &Topic, limit: usize) -> Result<u64, LogError> {
    let mut seqs = Vec::with_capacity(limit);
    for item in shared
        .db
        .scan_prefix(codec::index_prefix(topic))
        .keys()
        .take(limit)
    {
        seqs.push(codec::seq_suffix(&item?)?);
    }
    let mut trim = TrimBatch::default();
    for &seq in &seqs {
        trim.remove_index(topic, seq, true);
        let Some(value) = shared.db.get(codec::event_key(seq))? else {
            continue;
        };
        let header = codec::decode_header(&shared.db, seq, &value)?;
        let mut still_needed = false;
        for other in header.topics.iter().filter(|t| *t != topic) {
            if shared.db.contains_key(codec::index_key(other, seq))? {
                still_needed = true;
                break;
            }
        }
        if !still_needed {
            trim.remove_record(seq, header.pieces);
        }
    }
    trim.apply(shared)?;
    Ok(seqs.len() as u64)
}

/// Removals gathered for one trim, with per-topic bookkeeping.
///
/// Applied as three batches, in this order, because after a power cut sled
/// may recover only a prefix of a batch, in key order (`codec.rs`): the
/// watermarks first (a subscriber that misses a trimmed event is always told),
/// then the index entries and records (`e/` sorts before `t/`: a prefix may
/// leave an index entry whose record is gone, which readers skip), then the
/// pieces (a record never loses its pieces while it exists).
#[derive(Default)]
struct TrimBatch {
    /// Index entries and records.
    batch: sled::Batch,
    /// Pieces of the removed records.
    pieces: sled::Batch,
    /// Topic → (index entries removed, highest sequence trimmed).
    topics: HashMap<Topic, (u64, u64)>,
    removed: HashSet<(Topic, u64)>,
}

impl TrimBatch {
    fn remove_record(&mut self, seq: u64, pieces: u32) {
        self.batch.remove(&codec::event_key(seq));
        codec::remove_pieces(&mut self.pieces, seq, pieces);
    }

    fn remove_index(&mut self, topic: &Topic, seq: u64, present: bool) {
        let entry = self.topics.entry(topic.clone()).or_default();
        entry.1 = entry.1.max(seq);
        if present && self.removed.insert((topic.clone(), seq)) {
            self.batch.remove(codec::index_key(topic, seq));
            entry.0 += 1;
        }
    }

    fn apply(self, shared: &Shared) -> Result<(), LogError> {
        if self.topics.is_empty() {
            return Ok(());
        }
        let mut watermarks = sled::Batch::default();
        for (topic, (_, trimmed_through)) in &self.topics {
            shared.stats.raise_trimmed(topic, *trimmed_through);
            watermarks.insert(codec::trimmed_key(topic), &trimmed_through.to_be_bytes());
        }
        shared.db.apply_batch(watermarks)?;
        shared.db.apply_batch(self.batch)?;
        shared.db.apply_batch(self.pieces)?;
        for (topic, (count, _)) in &self.topics {
            let first = match shared
                .db
                .scan_prefix(codec::index_prefix(topic))
                .keys()
                .next()
            {
                Some(key) => Some(codec::seq_suffix(&key?)?),
                None => None,
            };
            shared.stats.record_trim(topic, *count, first);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Trim passes run directly on a log written by the real writer, so what
    //! a pass leaves is exact, not a race with the trimmer's interval.
    use super::*;
    use crate::log::sled::tests::{open, open_with, publish_to};
    use crate::log::Log;

    fn topic(name: &str) -> Topic {
        Topic::parse(name).unwrap()
    }

    fn policy(max_events_per_topic: u64, max_age: Duration) -> RetentionPolicy {
        RetentionPolicy {
            max_events_per_topic,
            max_age,
            // Small, so a pass takes several batches.
            batch_events: 2,
        }
    }

    fn has_record(shared: &Shared, seq: u64) -> bool {
        shared.db.contains_key(codec::event_key(seq)).unwrap()
    }

    fn has_index(shared: &Shared, name: &str, seq: u64) -> bool {
        shared
            .db
            .contains_key(codec::index_key(&topic(name), seq))
            .unwrap()
    }

    fn time_of(shared: &Shared, seq: u64) -> u64 {
        let value = shared.db.get(codec::event_key(seq)).unwrap().unwrap();
        codec::decode_header(&shared.db, seq, &value)
            .unwrap()
            .time_ms
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idempotency_keys_are_forgotten_once_their_window_ends() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        for scoped in [":k1", ":k2", ":k3"] {
            log.append(crate::log::NewEvent {
                topics: vec![topic("a")],
                name: crate::model::EventName::parse("e").unwrap(),
                data: "{}".into(),
                key: Some(crate::idempotency::StoredKey {
                    scoped: scoped.into(),
                    digest: [1; 32],
                }),
            })
            .await
            .unwrap();
        }
        let shared = &log.shared;
        let keys = |shared: &Shared| {
            let stored = [":k1", ":k2", ":k3"]
                .iter()
                .filter(|k| shared.db.contains_key(codec::key_key(k)).unwrap())
                .count();
            let expiries = shared.db.scan_prefix(codec::EXPIRY_PREFIX).count();
            (stored, expiries)
        };
        let keep_all = policy(u64::MAX / 2, Duration::from_secs(3600));
        trim_pass(shared, &keep_all, now_ms()).unwrap();
        assert_eq!(keys(shared), (3, 3), "within the window (60 s here)");
        // Past the window: all three go, in batches of 2.
        trim_pass(shared, &keep_all, now_ms() + 120_000).unwrap();
        assert_eq!(keys(shared), (0, 0));
        assert_eq!(log.topic_info(&topic("a")).count, 3, "the events stay");
        log.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_trimmer_enforces_retention() {
        let dir = tempfile::tempdir().unwrap();
        let keep_two = policy(2, Duration::from_secs(3600));
        let log = open_with(dir.path(), keep_two, Duration::from_millis(20));
        for _ in 0..5 {
            publish_to(&log, &["a"]).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while log.topic_info(&topic("a")).count > 2 {
            assert!(tokio::time::Instant::now() < deadline, "never trimmed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(log.retention_floor(&[topic("a")]).trimmed_through, 3);
        log.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trims_count_then_age_and_frees_a_record_only_when_no_topic_refers_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        for _ in 0..5 {
            publish_to(&log, &["a"]).await; // 1..=5
        }
        assert_eq!(publish_to(&log, &["a", "b"]).await, 6);
        // A later millisecond, so an age cutoff can fall between 6 and 7.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(publish_to(&log, &["a"]).await, 7);
        let shared = &log.shared;
        let keep_all_ages = Duration::from_secs(365 * 86_400);

        // `a` holds 7, keeps 2: five index entries go, in batches of 2.
        assert_eq!(
            trim_pass(shared, &policy(2, keep_all_ages), now_ms()).unwrap(),
            5
        );
        assert!((1..=5).all(|seq| !has_record(shared, seq) && !has_index(shared, "a", seq)));
        assert!(has_record(shared, 6) && has_record(shared, 7));
        let a = log.topic_info(&topic("a"));
        assert_eq!((a.first, a.last, a.count), (Some(6), Some(7), 2));
        assert_eq!(log.retention_floor(&[topic("a")]).trimmed_through, 5);

        // `a` keeps 1: its entry for 6 goes, but `b` still refers to 6.
        assert_eq!(
            trim_pass(shared, &policy(1, keep_all_ages), now_ms()).unwrap(),
            1
        );
        assert!(!has_index(shared, "a", 6) && has_index(shared, "b", 6));
        assert!(has_record(shared, 6), "record 6 is still `b`'s");
        assert_eq!(log.topic_info(&topic("b")).count, 1);

        // Age: everything older than 7 goes: record 6 and `b`'s entry; `a`'s
        // entry for 6 is already gone and is not counted twice.
        let cutoff = time_of(shared, 7);
        assert!(time_of(shared, 6) < cutoff);
        assert_eq!(
            trim_pass(shared, &policy(1, Duration::ZERO), cutoff).unwrap(),
            1
        );
        assert!(!has_record(shared, 6) && !has_index(shared, "b", 6));
        let a = log.topic_info(&topic("a"));
        assert_eq!((a.first, a.count), (Some(7), 1));
        assert_eq!(log.topic_info(&topic("b")).count, 0);
        assert_eq!(log.retention_floor(&[topic("b")]).trimmed_through, 6);

        // All of it old, the head too.
        assert_eq!(
            trim_pass(shared, &policy(1, Duration::ZERO), cutoff + 1).unwrap(),
            1
        );
        assert!(!has_record(shared, 7) && !has_index(shared, "a", 7));
        assert_eq!(log.topic_info(&topic("a")).count, 0);
        // Nothing left to trim.
        assert_eq!(
            trim_pass(shared, &policy(1, Duration::ZERO), cutoff + 1).unwrap(),
            0
        );
        log.close().await.unwrap();
    }
}
