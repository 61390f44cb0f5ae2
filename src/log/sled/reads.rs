//! Replay reads of the sled log: the events of a set of topics in a range of
//! sequences, merged in sequence order from the per-topic index.
//!
//! Blocking (sled reads can hit the disk): callers run it on a blocking
//! thread, and cap `upto` at the durable watermark first.

use std::collections::BTreeSet;

use super::codec;
use crate::log::{LogError, ReadBatch};
use crate::model::Topic;

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
