//! In-memory per-topic counters of the log: first/last retained sequence,
//! count, and how far retention has trimmed.
//!
//! Shared by both backends. Kept in memory because neither store counts
//! cheaply (sled's `Tree::len` and prefix counts are full scans; the Redis log
//! reports absolute trim state in its entries): the sled log rebuilds it from
//! its index at start, the Redis log from a snapshot and its tailer. Only a
//! log's writer, tailer and trimmer change it, each under one short lock per
//! batch.

use std::collections::HashMap;

use parking_lot::Mutex;
use serde::Serialize;

use super::RetentionFloor;
use crate::model::Topic;

/// What `/topics/{topic}/info` reports about the log side of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TopicInfo {
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub count: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TopicStats {
    /// Oldest retained sequence (meaningful when `count > 0`).
    pub first: u64,
    /// Newest retained sequence (meaningful when `count > 0`).
    pub last: u64,
    pub count: u64,
    /// Highest sequence trimmed from this topic; a resume point below it has
    /// lost events.
    pub trimmed_through: u64,
}

/// Per-topic stats behind one lock.
#[derive(Debug, Default)]
pub(crate) struct StatsTable {
    topics: Mutex<HashMap<Topic, TopicStats>>,
}

impl StatsTable {
    /// Records appended events: `(topics, seq)` in sequence order.
    pub fn record_appends<'a>(&self, events: impl Iterator<Item = (&'a [Topic], u64)>) {
        let mut table = self.topics.lock();
        for (topics, seq) in events {
            for topic in topics {
                let stats = table.entry(topic.clone()).or_default();
                if stats.count == 0 {
                    stats.first = seq;
                }
                stats.last = seq;
                stats.count += 1;
            }
        }
    }

    /// Raises a topic's trimmed watermark. Called *before* the trim is applied
    /// so a reader that misses a trimmed event always sees the watermark.
    pub fn raise_trimmed(&self, topic: &Topic, seq: u64) {
        let mut table = self.topics.lock();
        let stats = table.entry(topic.clone()).or_default();
        stats.trimmed_through = stats.trimmed_through.max(seq);
    }

    /// Records index entries removed from a topic; `new_first` is the oldest
    /// entry left, if any.
    pub fn record_trim(&self, topic: &Topic, removed: u64, new_first: Option<u64>) {
        let mut table = self.topics.lock();
        if let Some(stats) = table.get_mut(topic) {
            stats.count = stats.count.saturating_sub(removed);
            if let Some(first) = new_first {
                stats.first = first;
            }
        }
    }

    /// Sets a topic's retained range and watermark to what the Redis log
    /// reported after a trim (absolute values; `first` 0 = none retained).
    pub fn set_trimmed_state(&self, topic: &Topic, count: u64, first: u64, trimmed_through: u64) {
        let mut table = self.topics.lock();
        let stats = table.entry(topic.clone()).or_default();
        stats.count = count;
        if count > 0 {
            stats.first = first;
        }
        stats.trimmed_through = stats.trimmed_through.max(trimmed_through);
    }

    /// Replaces the whole table (a fresh snapshot of a shared log).
    pub fn replace(&self, table: HashMap<Topic, TopicStats>) {
        *self.topics.lock() = table;
    }

    /// Loads one topic's state at start.
    pub fn load(&self, topic: Topic, stats: TopicStats) {
        self.topics.lock().insert(topic, stats);
    }

    /// Topics holding more than `max` events, with how many are over.
    pub fn over_limit(&self, max: u64) -> Vec<(Topic, u64)> {
        let table = self.topics.lock();
        table
            .iter()
            .filter(|(_, s)| s.count > max)
            .map(|(t, s)| (t.clone(), s.count - max))
            .collect()
    }

    pub fn retention_floor(&self, topics: &[Topic]) -> RetentionFloor {
        let table = self.topics.lock();
        let mut floor = RetentionFloor::default();
        for stats in topics.iter().filter_map(|t| table.get(t)) {
            floor.trimmed_through = floor.trimmed_through.max(stats.trimmed_through);
            if stats.count > 0 {
                floor.oldest = Some(
                    floor
                        .oldest
                        .map_or(stats.first, |o: u64| o.min(stats.first)),
                );
            }
        }
        floor
    }

    /// Every known topic with its info, sorted by name.
    pub fn all(&self) -> Vec<(Topic, TopicInfo)> {
        let table = self.topics.lock();
        let mut all: Vec<(Topic, TopicInfo)> = table
            .keys()
            .map(|t| (t.clone(), Self::info_of(table.get(t))))
            .collect();
        drop(table);
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn info_of(stats: Option<&TopicStats>) -> TopicInfo {
        match stats {
            Some(s) if s.count > 0 => TopicInfo {
                first: Some(s.first),
                last: Some(s.last),
                count: s.count,
            },
            _ => TopicInfo::default(),
        }
    }

    pub fn info(&self, topic: &Topic) -> TopicInfo {
        Self::info_of(self.topics.lock().get(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Topic {
        Topic::parse(name).unwrap()
    }

    fn info(table: &StatsTable, name: &str) -> (Option<u64>, Option<u64>, u64) {
        let info = table.info(&t(name));
        (info.first, info.last, info.count)
    }

    /// `a` holds 1, 2, 3 and `b` holds 2.
    fn table() -> StatsTable {
        let table = StatsTable::default();
        let (a, ab) = ([t("a")], [t("a"), t("b")]);
        table.record_appends([(&a[..], 1), (&ab[..], 2), (&a[..], 3)].into_iter());
        table
    }

    #[test]
    fn appends_count_each_topic_with_its_first_and_last() {
        let table = table();
        assert_eq!(info(&table, "a"), (Some(1), Some(3), 3));
        assert_eq!(info(&table, "b"), (Some(2), Some(2), 1));
        assert_eq!(info(&table, "never"), (None, None, 0));
        let names: Vec<String> = table.all().iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(table.all()[1].1, table.info(&t("b")));
    }

    #[test]
    fn over_limit_names_only_topics_above_it_and_by_how_much() {
        let table = table();
        let mut over = table.over_limit(1);
        over.sort();
        assert_eq!(over, [(t("a"), 2)]);
        assert_eq!(table.over_limit(2), [(t("a"), 1)]);
        assert!(
            table.over_limit(3).is_empty(),
            "at the limit is not over it"
        );
    }

    #[test]
    fn the_floor_is_the_highest_watermark_and_the_oldest_retained_event() {
        let table = table();
        table.raise_trimmed(&t("a"), 5);
        table.raise_trimmed(&t("a"), 3);
        // `a` loses 1 and 2; `b` loses its only event (its `first` is stale).
        table.record_trim(&t("a"), 2, Some(3));
        table.record_trim(&t("b"), 1, None);
        assert_eq!(info(&table, "a"), (Some(3), Some(3), 1));
        assert_eq!(
            info(&table, "b"),
            (None, None, 0),
            "an empty topic has no range"
        );
        let floor = table.retention_floor(&[t("a"), t("b"), t("never")]);
        assert_eq!(floor.trimmed_through, 5);
        assert_eq!(
            floor.oldest,
            Some(3),
            "an empty topic's stale first is no floor"
        );
        assert_eq!(table.retention_floor(&[t("b")]), RetentionFloor::default());
    }

    #[test]
    fn a_reported_trim_state_replaces_counts_and_only_raises_the_watermark() {
        let table = table();
        // The Redis trimmer removed 1 and 2 of `a`; then an older report.
        table.set_trimmed_state(&t("a"), 1, 3, 2);
        table.set_trimmed_state(&t("a"), 1, 3, 1);
        assert_eq!(info(&table, "a"), (Some(3), Some(3), 1));
        assert_eq!(table.retention_floor(&[t("a")]).trimmed_through, 2);
        table.set_trimmed_state(&t("c"), 0, 0, 6);
        assert_eq!(info(&table, "c"), (None, None, 0));
        assert_eq!(table.retention_floor(&[t("c")]).trimmed_through, 6);
    }

    #[test]
    fn replace_and_load_set_whole_entries() {
        let table = table();
        let stats = TopicStats {
            first: 10,
            last: 12,
            count: 3,
            trimmed_through: 9,
        };
        table.replace(HashMap::from([(t("x"), stats)]));
        assert_eq!(info(&table, "a"), (None, None, 0), "replaced, not merged");
        assert_eq!(info(&table, "x"), (Some(10), Some(12), 3));
        table.load(t("y"), stats);
        assert_eq!(info(&table, "y"), (Some(10), Some(12), 3));
        assert_eq!(table.retention_floor(&[t("y")]).trimmed_through, 9);
    }
}
