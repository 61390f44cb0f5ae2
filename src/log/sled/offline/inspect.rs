//! `inspect`: a summary of a data directory (events, index entries, per-topic
//! figures, bytes on disk), read without writing a key.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::{io_error, OfflineError, OfflineLog, Progress, Unit, PROGRESS_EVERY};
use crate::log::sled::codec::{self, EVENT_PREFIX, INDEX_PREFIX};
use crate::model::{Epoch, Topic};

impl OfflineLog {
    /// Counts everything: events, index entries, per-topic figures, bytes on
    /// disk. Two full scans.
    pub fn summary(&self, progress: &mut dyn Progress) -> Result<Summary, OfflineError> {
        let range = self.event_range()?;
        progress.phase("events", range.map(|(a, b)| b - a + 1), Unit::Items);
        let mut events = 0u64;
        for key in self.db.scan_prefix(EVENT_PREFIX).keys() {
            let seq = codec::seq_suffix(&key?)?;
            events += 1;
            if events.is_multiple_of(PROGRESS_EVERY) {
                progress.position(seq - range.map_or(0, |r| r.0) + 1);
            }
        }
        progress.phase("index", None, Unit::Items);
        let mut topics: BTreeMap<Topic, TopicSummary> = BTreeMap::new();
        let mut index_entries = 0u64;
        for key in self.db.scan_prefix(INDEX_PREFIX).keys() {
            let (topic, seq) = codec::split_index_key(&key?)?;
            index_entries += 1;
            if index_entries.is_multiple_of(PROGRESS_EVERY) {
                progress.position(index_entries);
            }
            let entry = topics.entry(topic).or_default();
            entry.first.get_or_insert(seq);
            entry.last = Some(seq);
            entry.count += 1;
        }
        for (topic, through) in self.trimmed()? {
            topics.entry(topic).or_default().trimmed_through = through;
        }
        progress.finish();
        let mut topics: Vec<(Topic, TopicSummary)> = topics.into_iter().collect();
        topics.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
        Ok(Summary {
            format_version: self.format_version(),
            epoch: self.epoch.clone(),
            head: self.head,
            events,
            oldest: range.map(|r| r.0),
            newest: range.map(|r| r.1),
            index_entries,
            topics,
            bytes_on_disk: dir_size(&self.dir).map_err(io_error("cannot measure the directory"))?,
        })
    }
}

/// Total size of the files under `dir` (what `du --apparent-size` says).
fn dir_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// What `inspect` shows.
#[derive(Debug, Clone)]
pub struct Summary {
    pub format_version: u32,
    pub epoch: Epoch,
    /// Last assigned sequence.
    pub head: u64,
    /// Stored event records.
    pub events: u64,
    pub oldest: Option<u64>,
    pub newest: Option<u64>,
    /// `t/` entries: an event counts once per topic that still holds it.
    pub index_entries: u64,
    /// Every topic with retained events or a watermark, most events first.
    pub topics: Vec<(Topic, TopicSummary)>,
    pub bytes_on_disk: u64,
}

/// One topic's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicSummary {
    pub count: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Highest sequence retention removed from the topic (0 = none).
    pub trimmed_through: u64,
}
