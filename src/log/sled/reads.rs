//! Replay reads of the sled log: the events of a set of topics in a range of
//! sequences, merged in sequence order from the per-topic index.
//!
//! Blocking (sled reads can hit the disk): callers run it on a blocking
//! thread, and cap `upto` at the durable watermark first.

use std::collections::BTreeSet;

use super::codec;
use crate::log::{LogError, ReadBatch, ReadLimit};
use crate::model::Topic;

/// Reads events of `topics` in `(after, upto]`, merged in sequence order.
///
/// Each topic contributes at most `limit.events` sequences from its index;
/// the smallest of their union are exactly the next events of the topic set.
/// Events are fetched in order until their data reaches `limit.bytes`, so a
/// read never holds more than that (or one event). An index entry whose
/// event was trimmed meanwhile is skipped (the caller's retention check
/// reports it).
pub(crate) fn read_blocking(
    db: &sled::Db,
    topics: &[Topic],
    after: u64,
    upto: u64,
    limit: ReadLimit,
) -> Result<ReadBatch, LogError> {
    let ReadLimit {
        events: limit,
        bytes: max_bytes,
    } = limit;
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
    let mut through = if seqs.len() < limit {
        upto
    } else {
        seqs.iter().nth(limit - 1).copied().unwrap_or(upto)
    };
    let mut events = Vec::with_capacity(seqs.len().min(limit));
    let mut bytes = 0usize;
    for seq in seqs.into_iter().take(limit) {
        if let Some(event) = codec::read_record(db, seq)? {
            bytes = bytes.saturating_add(event.data.len());
            events.push(event);
            if bytes >= max_bytes {
                through = through.min(seq);
                break;
            }
        }
    }
    Ok(ReadBatch { events, through })
}
