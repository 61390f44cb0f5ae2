//! `check`: verifies the integrity of a data directory without writing a key.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::{compact_json_text, open_db, OfflineError, Progress, Snapshot, Unit, PROGRESS_EVERY};
use crate::log::sled::codec::{
    self, EPOCH_KEY, EVENT_PREFIX, FORMAT_KEY, HEAD_KEY, INDEX_PREFIX, PIECE_PREFIX, TRIMMED_PREFIX,
};
use crate::log::sled::format::{self, CURRENT_FORMAT};
use crate::log::LogError;
use crate::model::{Epoch, Topic};

/// `check` keeps at most this many problems in its report (it counts them all).
const MAX_KEPT_PROBLEMS: usize = 10_000;

/// One integrity problem: the key it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub what: String,
}

/// What `check` found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub format_version: Option<u32>,
    pub epoch: Option<Epoch>,
    pub head: Option<u64>,
    pub events: u64,
    pub index_entries: u64,
    /// Topics with index entries or a watermark.
    pub topics: u64,
    pub watermarks: u64,
    /// Pieces no record refers to: leftovers of a write cut short (not damage).
    pub leftover_pieces: u64,
    /// The first problems found (at most 10 000); `problem_count` counts all.
    pub problems: Vec<Problem>,
    pub problem_count: u64,
    /// False when the check stopped early: a format version it cannot read.
    pub complete: bool,
}

impl CheckReport {
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, key: impl Into<String>, what: impl Into<String>) {
        self.problem_count += 1;
        if self.problems.len() < MAX_KEPT_PROBLEMS {
            self.problems.push(Problem {
                key: key.into(),
                what: what.into(),
            });
        }
    }

    /// An id for messages: `<epoch>-<seq>`, or `#<seq>` without a readable epoch.
    fn id(&self, seq: u64) -> String {
        match &self.epoch {
            Some(epoch) => epoch.id(seq),
            None => format!("#{seq}"),
        }
    }
}

/// The `what` of a log error, without the key it already names.
fn what_of(e: LogError) -> String {
    match e {
        LogError::Corrupt { what, .. } => what,
        other => other.to_string(),
    }
}

/// A key as an operator reads it: `e/42`, `t/projects:all/42`, `w/topic`.
pub fn describe_key(key: &[u8]) -> String {
    if key.len() == 10 && key.starts_with(EVENT_PREFIX) {
        if let Ok(seq) = codec::seq_suffix(key) {
            return format!("e/{seq}");
        }
    }
    if key.starts_with(INDEX_PREFIX) {
        if let Ok((topic, seq)) = codec::split_index_key(key) {
            return format!("t/{topic}/{seq}");
        }
    }
    key.escape_ascii().to_string()
}

/// Verifies the integrity of the log in `dir` without changing anything: no
/// key is written, neither the writer nor the trimmer runs.
///
/// It checks that the format version is this build's, the epoch and head
/// are readable, every record decodes (data included: one compact JSON
/// value), every index entry `t/<topic>/<seq>` points to an existing event
/// listing that topic and lies above the topic's watermark, every event has
/// an index entry and misses one for a topic only where retention trimmed it
/// (seq ≤ the topic's watermark), every watermark is readable and not beyond
/// the head, the head is not behind the newest event, and no key lies outside
/// the layout. One ordered pass over every key plus a lookup per event topic
/// and per index entry: O(n).
pub fn check(dir: &Path, progress: &mut dyn Progress) -> Result<CheckReport, OfflineError> {
    // `_copy` lives to the end: the private copy `db` reads.
    let Snapshot { db, copy: _copy } = open_db(dir)?;
    let mut r = CheckReport::default();
    match format::read_version(&db) {
        Ok(Some(0)) => {
            r.format_version = Some(0);
            r.problem("m/format", "format version 0 does not exist");
        }
        Ok(Some(v)) if v > CURRENT_FORMAT => {
            r.format_version = Some(v);
            r.problem(
                "m/format",
                format!("format version {v} is newer than this build checks ({CURRENT_FORMAT}); use a newer sse-gateway"),
            );
            return Ok(r);
        }
        // Older versions are read as they are (format 2 reads format-1
        // records); the gateway upgrades them at its next start.
        Ok(Some(v)) => r.format_version = Some(v),
        Ok(None) if db.is_empty() => {
            r.problem(
                "m/format",
                "missing: the database is empty, not an sse-gateway log",
            );
            return Ok(r);
        }
        Ok(None) => r.problem(
            "m/format",
            "missing, though the database holds keys: the gateway refuses to open it",
        ),
        Err(e) => r.problem("m/format", what_of(e)),
    }
    match format::read_epoch(&db) {
        Ok(epoch) => r.epoch = Some(epoch),
        Err(e) => r.problem("m/epoch", what_of(e)),
    }
    match db.get(HEAD_KEY)? {
        None => r.problem("m/head", "missing"),
        Some(raw) => match codec::decode_u64(HEAD_KEY, &raw) {
            Ok(head) => r.head = Some(head),
            Err(e) => r.problem("m/head", what_of(e)),
        },
    }

    let mut topics: HashSet<Topic> = HashSet::new();
    let mut trimmed: HashMap<Topic, u64> = HashMap::new();
    for item in db.scan_prefix(TRIMMED_PREFIX) {
        let (key, value) = item?;
        r.watermarks += 1;
        let shown = key.escape_ascii().to_string();
        let topic = match codec::split_trimmed_key(&key) {
            Ok(topic) => topic,
            Err(e) => {
                r.problem(shown, what_of(e));
                continue;
            }
        };
        match codec::decode_u64(&key, &value) {
            Ok(through) => {
                if let Some(head) = r.head.filter(|head| through > *head) {
                    r.problem(
                        shown,
                        format!("trimmed through {through}, beyond the head {head}"),
                    );
                }
                trimmed.insert(topic.clone(), through);
            }
            Err(e) => r.problem(shown, what_of(e)),
        }
        topics.insert(topic);
    }

    let span = match (
        db.scan_prefix(EVENT_PREFIX).keys().next(),
        db.scan_prefix(EVENT_PREFIX).keys().next_back(),
    ) {
        (Some(first), Some(last)) => codec::seq_suffix(&first?)
            .ok()
            .zip(codec::seq_suffix(&last?).ok()),
        _ => None,
    };
    progress.phase(
        "events",
        span.map(|(a, b)| b.saturating_sub(a) + 1),
        Unit::Items,
    );
    let mut newest = None;
    let mut in_index = false;
    for item in db.iter() {
        let (key, value) = item?;
        if key.starts_with(EVENT_PREFIX) {
            if let Some(seq) = check_event(&db, &key, &value, &trimmed, &mut r)? {
                newest = Some(seq);
                if r.events % PROGRESS_EVERY == 0 {
                    progress.position(seq.saturating_sub(span.map_or(0, |s| s.0)) + 1);
                }
            }
        } else if key.starts_with(INDEX_PREFIX) {
            if !in_index {
                in_index = true;
                progress.phase("index", None, Unit::Items);
            }
            check_index(&db, &key, &value, &trimmed, &mut topics, &mut r)?;
            if r.index_entries % PROGRESS_EVERY == 0 {
                progress.position(r.index_entries);
            }
        } else if key.starts_with(PIECE_PREFIX) {
            check_piece(&db, &key, &mut r)?;
        } else if !(key.starts_with(TRIMMED_PREFIX)
            || key.starts_with(codec::KEY_PREFIX)
            || key.starts_with(codec::EXPIRY_PREFIX)
            || key == FORMAT_KEY
            || key == EPOCH_KEY
            || key == HEAD_KEY)
        {
            r.problem(
                describe_key(&key),
                "unexpected key: not part of the log's layout",
            );
        }
    }
    if let (Some(head), Some(newest)) = (r.head, newest) {
        // Records above the head without an index entry are the prefix of a
        // commit cut short and never acknowledged (`codec.rs`): the gateway
        // continues its ids after them. Only a visible one means the head
        // went back.
        if newest > head && has_index_entry(&db, newest)? {
            r.problem(
                "m/head",
                format!(
                    "head {head} is behind the newest event {}: new publishes would reuse its id",
                    r.id(newest)
                ),
            );
        }
    }
    progress.finish();
    r.topics = topics.len() as u64;
    r.complete = true;
    Ok(r)
}

/// Checks one `c/<seq><n>` piece key is well formed, and counts it as a
/// leftover when no record refers to it (a record's missing pieces are
/// reported by that record's own check).
fn check_piece(db: &sled::Db, key: &[u8], r: &mut CheckReport) -> Result<(), OfflineError> {
    let shown = key.escape_ascii().to_string();
    let parsed = key
        .get(PIECE_PREFIX.len()..)
        .filter(|rest| rest.len() == 12)
        .map(|rest| {
            let (seq, n) = rest.split_at(8);
            let seq = u64::from_be_bytes(seq.try_into().unwrap_or_default());
            let n = u32::from_be_bytes(n.try_into().unwrap_or_default());
            (seq, n)
        });
    let Some((seq, n)) = parsed else {
        r.problem(
            shown,
            "malformed piece key: expected c/, an 8-byte sequence and a 4-byte number",
        );
        return Ok(());
    };
    let pieces = match db.get(codec::event_key(seq))? {
        Some(head) => codec::piece_count(seq, &head).ok(),
        None => None,
    };
    // Pieces sort before their record, so a power cut during a commit that
    // was never acknowledged, or during a trim, can leave pieces without a
    // record (`codec.rs`). Readers ignore them: not damage.
    if !matches!(pieces, Some(count) if n >= 1 && n <= count) {
        r.leftover_pieces += 1;
    }
    Ok(())
}

/// Whether any topic of record `seq` still indexes it.
fn has_index_entry(db: &sled::Db, seq: u64) -> Result<bool, OfflineError> {
    let Some(event) = codec::read_record(db, seq).ok().flatten() else {
        return Ok(false);
    };
    for topic in &event.topics {
        if db.contains_key(codec::index_key(topic, seq))? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Checks one `e/` record; returns its sequence when the key is well formed.
fn check_event(
    db: &sled::Db,
    key: &[u8],
    value: &sled::IVec,
    trimmed: &HashMap<Topic, u64>,
    r: &mut CheckReport,
) -> Result<Option<u64>, OfflineError> {
    let shown = describe_key(key);
    if key.len() != EVENT_PREFIX.len() + 8 {
        r.problem(
            shown,
            "malformed event key: expected e/ and an 8-byte sequence",
        );
        return Ok(None);
    }
    let seq = codec::seq_suffix(key)?;
    r.events += 1;
    let id = r.id(seq);
    if seq == 0 {
        r.problem(
            &*shown,
            "sequence 0 is not an event id (sequences start at 1)",
        );
    }
    let event = match codec::decode_record(db, seq, value) {
        Ok(event) => event,
        Err(e) => {
            r.problem(shown, format!("record does not decode: {}", what_of(e)));
            return Ok(Some(seq));
        }
    };
    if compact_json_text(&event.data).is_none() {
        r.problem(
            &*shown,
            format!("the data of event {id} is not one compact JSON value"),
        );
    }
    if event.topics.is_empty() {
        r.problem(&*shown, format!("event {id} lists no topic"));
    }
    let mut seen = HashSet::new();
    let mut indexed = 0;
    for topic in &event.topics {
        if !seen.insert(topic) {
            r.problem(&*shown, format!("event {id} lists topic {topic} twice"));
            continue;
        }
        if db.contains_key(codec::index_key(topic, seq))? {
            indexed += 1;
            continue;
        }
        let through = trimmed.get(topic).copied().unwrap_or(0);
        if seq > through {
            r.problem(
                &*shown,
                format!(
                    "event {id} is in topic {topic} but has no index entry t/{topic}/{seq}, and \
                     retention trimmed {topic} only through {through}: its subscribers never get it"
                ),
            );
        }
    }
    if indexed == 0 && !event.topics.is_empty() {
        r.problem(
            shown,
            format!(
                "no index entry refers to event {id}: retention removes a record with its last \
                 index entry, so it is an orphan"
            ),
        );
    }
    Ok(Some(seq))
}

/// Checks one `t/` index entry.
fn check_index(
    db: &sled::Db,
    key: &[u8],
    value: &sled::IVec,
    trimmed: &HashMap<Topic, u64>,
    topics: &mut HashSet<Topic>,
    r: &mut CheckReport,
) -> Result<(), OfflineError> {
    r.index_entries += 1;
    let (topic, seq) = match codec::split_index_key(key) {
        Ok(split) => split,
        Err(e) => {
            r.problem(describe_key(key), what_of(e));
            return Ok(());
        }
    };
    let shown = format!("t/{topic}/{seq}");
    let id = r.id(seq);
    if !value.is_empty() {
        r.problem(
            &*shown,
            "an index entry holds a value; index entries are empty",
        );
    }
    let through = trimmed.get(&topic).copied().unwrap_or(0);
    if seq <= through {
        r.problem(
            &*shown,
            format!(
                "index entry at or below {topic}'s trim watermark {through}: it is never served \
                 (retention removes entries up to the watermark)"
            ),
        );
    }
    match db.get(codec::event_key(seq))? {
        None => r.problem(
            &*shown,
            format!("refers to event {id}, which does not exist"),
        ),
        Some(record) => {
            if let Ok(event) = codec::decode_record(db, seq, &record) {
                if !event.topics.contains(&topic) {
                    let listed: Vec<&str> = event.topics.iter().map(Topic::as_str).collect();
                    r.problem(
                        &*shown,
                        format!(
                            "refers to event {id}, which is not in topic {topic} (its topics: {})",
                            listed.join(", ")
                        ),
                    );
                }
            }
        }
    }
    topics.insert(topic);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_described_readably() {
        let topic = Topic::parse("projects:all").unwrap();
        assert_eq!(describe_key(&codec::event_key(42)), "e/42");
        assert_eq!(
            describe_key(&codec::index_key(&topic, 7)),
            "t/projects:all/7"
        );
        assert_eq!(describe_key(b"zz\x01"), "zz\\x01");
    }
}
