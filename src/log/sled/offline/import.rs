//! `import`: an export written into a new data directory, all or nothing.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead};
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::export::{ExportHeader, HeaderProbe, KeyLine, EXPORT_FORMAT, EXPORT_VERSION};
use super::{io_error, OfflineError, Progress, Unit, OFFLINE_CACHE_BYTES};
use crate::log::sled::codec::{self, EPOCH_KEY, FORMAT_KEY, HEAD_KEY};
use crate::log::sled::format::CURRENT_FORMAT;
use crate::model::{Epoch, EventName, Topic, MAX_TOPICS};

/// Deepest JSON nesting accepted on import (the most `limits.max_json_depth` allows).
const MAX_IMPORT_DEPTH: usize = 128;
/// Import writes one atomic batch per this many events or bytes.
const IMPORT_BATCH_EVENTS: usize = 1024;
const IMPORT_BATCH_BYTES: usize = 8 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine<'a> {
    id: String,
    event: String,
    topics: Vec<String>,
    time_ms: u64,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportStats {
    pub epoch: Epoch,
    pub head: u64,
    pub events: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Topics with imported events or a watermark.
    pub topics: usize,
    /// Idempotency keys imported (export version 2).
    pub keys: u64,
    /// True when the export carried the watermarks (`trimmed`) and they were
    /// restored exactly; false when they were reconstructed ([`import`]).
    pub exact_watermarks: bool,
}

/// Imports an export (the `export` module's docs: the format) into `dir`, which must not
/// exist or must be an empty directory.
///
/// # Nothing half-imported is left behind
///
/// Everything is written into a staging directory beside `dir`
/// (`.<name>.import-<pid>-<nanos>`), the format key `m/format` last, flushed and
/// closed; only then is the staging directory renamed to `dir`. An import
/// that fails (a bad line, a full disk) removes the staging directory and
/// leaves `dir` as it was; one that is killed leaves at most a staging
/// directory without a format key, which the gateway refuses to open.
///
/// # Validation
///
/// Every line is checked and the first bad one fails the import, naming its
/// number: the header (format, a version this build reads, a valid epoch and
/// watermarks), then per event the JSON shape (no missing, unknown or repeated
/// field), the id (`<epoch>-<seq>` of the header's epoch, canonical, strictly
/// above the previous one, not above `head`), the event name and topics (the
/// publish rules: 1 to 64 valid topics, no repeat) and the data (valid JSON,
/// compacted like a publish: an export's data is already compact, so it stays
/// byte-identical).
///
/// # What is preserved
///
/// The epoch, every sequence (so every id a client holds stays valid), append
/// times, topics, data bytes, and the head: new publishes continue after the
/// exported head, even when retention had removed the newest events, so an id
/// is never given twice.
///
/// # Watermarks and the index
///
/// Retention removes a prefix of each topic (its oldest entries by count, or
/// the oldest events of the whole log by age) and raises the topic's
/// watermark `w/<topic>` to the highest sequence it removed. So a topic's index
/// holds exactly its events above its watermark, and an event's record stays
/// while any of its topics holds it, still listing every topic it was published
/// to. A client resuming a topic from below the watermark gets a `reset`, and
/// `Last-Event-ID: 0` replays from the watermark on.
///
/// - With `trimmed` in the header (every export this build writes), both are
///   rebuilt exactly: each watermark is restored and an event is indexed under
///   each of its topics whose watermark is below it. Resumes, resets and
///   replays behave as on the exported directory.
/// - Without it (a hand-made export), the import cannot tell an event trimmed
///   from one of its topics but kept for another, nor which topics the wholly
///   trimmed events (the sequences missing from the export) belonged to. It
///   indexes every event under every listed topic and sets each topic's
///   watermark to the highest missing sequence below the topic's first
///   exported event, if any: a client resuming from before that gap gets a
///   `reset` rather than silently missing an event that may have been there.
///   A log that was never trimmed has no missing sequence and gets no
///   watermark, so no spurious `reset`, which the simpler "first exported
///   sequence − 1" would send to every client of a topic whose first event
///   merely came late. Sequences missing *between* a topic's exported events,
///   and topics none of whose events were exported, cannot be accounted for
///   without the watermarks, which is why the export writes them.
pub fn import(
    dir: &Path,
    input: &mut dyn BufRead,
    input_len: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<ImportStats, OfflineError> {
    let absolute =
        std::path::absolute(dir).map_err(io_error(format!("cannot resolve {}", dir.display())))?;
    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(OfflineError::Io {
            what: format!("cannot import into {}", dir.display()),
            error: io::Error::new(io::ErrorKind::InvalidInput, "name a directory to create"),
        });
    };
    let target = parent.join(name);
    ensure_empty(&target)?;
    std::fs::create_dir_all(parent)
        .map_err(io_error(format!("cannot create {}", parent.display())))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let staging = parent.join(format!(
        ".{}.import-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let imported = import_into(&staging, input, input_len, progress).and_then(|stats| {
        // Checked again: something may have appeared meanwhile.
        ensure_empty(&target)?;
        if target.exists() {
            std::fs::remove_dir(&target)
                .map_err(io_error(format!("cannot replace {}", target.display())))?;
        }
        std::fs::rename(&staging, &target).map_err(io_error(format!(
            "cannot move {} to {}",
            staging.display(),
            target.display()
        )))?;
        Ok(stats)
    });
    if imported.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    imported
}

/// Ok when `dir` does not exist or is an empty directory.
fn ensure_empty(dir: &Path) -> Result<(), OfflineError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            Some(_) => Err(OfflineError::NotEmpty(dir.to_path_buf())),
            None => Ok(()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OfflineError::Io {
            what: format!("cannot use {} as a data directory", dir.display()),
            error: e,
        }),
    }
}

/// Reads an export line by line, counting lines and bytes.
struct Lines<'a> {
    input: &'a mut dyn BufRead,
    buf: Vec<u8>,
    number: u64,
    bytes: u64,
}

impl Lines<'_> {
    /// Reads the next line; false at the end of the input.
    fn advance(&mut self) -> Result<bool, OfflineError> {
        self.buf.clear();
        let n = self
            .input
            .read_until(b'\n', &mut self.buf)
            .map_err(io_error("cannot read the export"))?;
        if n == 0 {
            return Ok(false);
        }
        self.number += 1;
        self.bytes += n as u64;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        }
        Ok(true)
    }

    /// The current line, without its end.
    fn text(&self) -> Result<&str, OfflineError> {
        std::str::from_utf8(&self.buf).map_err(|e| OfflineError::Import {
            line: self.number,
            what: format!("not UTF-8 (after byte {})", e.valid_up_to()),
        })
    }
}

/// A serde_json error without its "at line 1 column N" (the line is ours).
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let message = text.rsplit_once(" at line ").map_or(&*text, |(m, _)| m);
    format!("{message} (column {})", e.column())
}

/// A validated export header.
struct Header {
    epoch: Epoch,
    head: u64,
    /// The exported watermarks, when the export has them.
    trimmed: Option<HashMap<Topic, u64>>,
}

fn parse_header(text: &str) -> Result<Header, String> {
    let probe: HeaderProbe = serde_json::from_str(text)
        .map_err(|e| format!("not an export header: {}", json_error(&e)))?;
    if probe.format.as_deref() != Some(EXPORT_FORMAT) {
        return Err(format!(
            "not an export header: expected {{\"format\":\"{EXPORT_FORMAT}\",\"version\":{EXPORT_VERSION},…}}"
        ));
    }
    match probe.version {
        Some(v) if v > EXPORT_VERSION => {
            return Err(format!(
                "export format version {v} is newer than this build reads ({EXPORT_VERSION}); use a newer sse-gateway"
            ))
        }
        Some(v) if v >= 1 => {}
        _ => return Err("the header needs a \"version\" of 1 or more".into()),
    }
    let header: ExportHeader = serde_json::from_str(text)
        .map_err(|e| format!("invalid export header: {}", json_error(&e)))?;
    let epoch = Epoch::parse(&header.epoch).ok_or_else(|| {
        format!(
            "invalid epoch {:?}: an epoch is 1 to 32 ASCII letters and digits",
            header.epoch
        )
    })?;
    let trimmed = match header.trimmed {
        None => None,
        Some(raw) => {
            let mut trimmed = HashMap::with_capacity(raw.len());
            for (topic, through) in raw {
                let topic = Topic::parse(&topic).map_err(|e| format!("trimmed: {e}"))?;
                if through > header.head {
                    return Err(format!(
                        "trimmed: {topic} is trimmed through {through}, beyond the head {}",
                        header.head
                    ));
                }
                trimmed.insert(topic, through);
            }
            Some(trimmed)
        }
    };
    Ok(Header {
        epoch,
        head: header.head,
        trimmed,
    })
}

/// The sequence of an exported id, which must be of `epoch`.
fn parse_id(id: &str, epoch: &Epoch) -> Result<u64, String> {
    let (epoch_part, seq_part) = id
        .rsplit_once('-')
        .ok_or_else(|| format!("invalid id {id:?}: expected <epoch>-<seq>"))?;
    if epoch_part != epoch.as_str() {
        return Err(format!(
            "id {id:?} is not of the header's epoch {}",
            epoch.as_str()
        ));
    }
    match crate::model::parse_canonical_u64(seq_part) {
        Some(0) => Err(format!(
            "id {id:?} is not an event id (sequences start at 1)"
        )),
        Some(seq) => Ok(seq),
        None => Err(format!(
            "invalid id {id:?}: the sequence must be a decimal number without leading zeros"
        )),
    }
}

/// One validated event line.
struct ImportedEvent {
    seq: u64,
    time_ms: u64,
    name: EventName,
    topics: Vec<Topic>,
    data: String,
}

fn parse_event(text: &str, epoch: &Epoch) -> Result<ImportedEvent, String> {
    let line: ImportLine<'_> =
        serde_json::from_str(text).map_err(|e| format!("not an event line: {}", json_error(&e)))?;
    let seq = parse_id(&line.id, epoch)?;
    let name = EventName::parse(&line.event).map_err(|e| e.to_string())?;
    if line.topics.is_empty() || line.topics.len() > MAX_TOPICS {
        return Err(format!(
            "an event has 1 to {MAX_TOPICS} topics; this one lists {}",
            line.topics.len()
        ));
    }
    let mut topics: Vec<Topic> = Vec::with_capacity(line.topics.len());
    for raw in &line.topics {
        let topic = Topic::parse(raw).map_err(|e| e.to_string())?;
        if topics.contains(&topic) {
            return Err(format!("topic {topic} is listed twice"));
        }
        topics.push(topic);
    }
    let data = crate::json::compact(line.data.get(), MAX_IMPORT_DEPTH)
        .map_err(|e| format!("data: {e}"))?;
    Ok(ImportedEvent {
        seq,
        time_ms: line.time_ms,
        name,
        topics,
        data,
    })
}

/// An idempotency key line (export version 2): `None` when the line is not
/// one at all, else the scoped key and its entry, or what is wrong with it.
fn parse_key_line(
    text: &str,
    epoch: &Epoch,
    head: u64,
) -> Option<Result<(String, codec::KeyEntry), String>> {
    let line: KeyLine<'_> = serde_json::from_str(text).ok()?;
    Some((|| {
        let scoped = line.idempotency_key;
        // `<org>:<key>`: the org part as tokens carry it, the key visible ASCII.
        let valid = scoped.split_once(':').is_some_and(|(org, key)| {
            org.len() <= 64
                && org
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                && !key.is_empty()
                && key.len() <= 2 * crate::idempotency::MAX_KEY_LEN
                && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
        });
        if !valid {
            return Err(format!("invalid idempotency key {scoped:?}"));
        }
        let seq = parse_id(line.id, epoch)?;
        if seq > head {
            return Err(format!(
                "idempotency key {scoped:?} names an id beyond the head"
            ));
        }
        let digest = crate::idempotency::parse_hex(line.digest)
            .ok_or_else(|| format!("idempotency key {scoped:?}: digest is not 64 hex digits"))?;
        Ok((
            scoped.to_owned(),
            codec::KeyEntry {
                seq,
                expires_ms: line.expires_ms,
                digest,
            },
        ))
    })())
}

fn import_into(
    staging: &Path,
    input: &mut dyn BufRead,
    input_len: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<ImportStats, OfflineError> {
    let db = sled::Config::new()
        .path(staging)
        .cache_capacity(OFFLINE_CACHE_BYTES)
        .flush_every_ms(None)
        .create_new(true)
        .open()?;
    let mut lines = Lines {
        input,
        buf: Vec::new(),
        number: 0,
        bytes: 0,
    };
    if !lines.advance()? {
        return Err(OfflineError::Import {
            line: 1,
            what: "the input is empty; expected an export header".into(),
        });
    }
    let Header {
        epoch,
        head,
        trimmed: exact,
    } = parse_header(lines.text()?).map_err(|what| OfflineError::Import { line: 1, what })?;
    progress.phase("importing", input_len, Unit::Bytes);

    let mut stats = ImportStats {
        epoch: epoch.clone(),
        head,
        events: 0,
        first: None,
        last: None,
        topics: 0,
        keys: 0,
        exact_watermarks: exact.is_some(),
    };
    let mut topics_seen: HashSet<Topic> = HashSet::new();
    // Without exported watermarks: topic → highest missing sequence below its first event.
    let mut gap_before: HashMap<Topic, u64> = HashMap::new();
    let mut highest_gap = 0u64;
    let mut previous = 0u64;
    let mut batch = sled::Batch::default();
    let (mut batch_events, mut batch_bytes) = (0usize, 0usize);
    while lines.advance()? {
        let line = lines.number;
        let bad = |what: String| OfflineError::Import { line, what };
        let text = lines.text()?;
        let event = match parse_event(text, &epoch) {
            Ok(event) if stats.keys == 0 => event,
            Ok(_) => return Err(bad("an event line after the idempotency key lines".into())),
            Err(what) => match parse_key_line(text, &epoch, head) {
                Some(Ok((scoped, entry))) => {
                    entry.insert_into(&mut batch, &scoped);
                    stats.keys += 1;
                    if stats.keys.is_multiple_of(IMPORT_BATCH_EVENTS as u64) {
                        db.apply_batch(std::mem::take(&mut batch))?;
                    }
                    continue;
                }
                Some(Err(what)) => return Err(bad(what)),
                None => return Err(bad(what)),
            },
        };
        let id = epoch.id(event.seq);
        if event.seq <= previous {
            return Err(bad(format!(
                "id {id} does not follow {}: ids must strictly increase",
                epoch.id(previous)
            )));
        }
        if event.seq > head {
            return Err(bad(format!(
                "id {id} is beyond the header's head {}",
                epoch.id(head)
            )));
        }
        if event.seq > previous + 1 {
            highest_gap = event.seq - 1;
        }
        previous = event.seq;

        let mut indexed = 0;
        for topic in &event.topics {
            let keep = match &exact {
                Some(trimmed) => event.seq > trimmed.get(topic).copied().unwrap_or(0),
                None => {
                    gap_before.entry(topic.clone()).or_insert(highest_gap);
                    true
                }
            };
            if keep {
                batch.insert(codec::index_key(topic, event.seq), &[]);
                indexed += 1;
            }
            if !topics_seen.contains(topic) {
                topics_seen.insert(topic.clone());
            }
        }
        if indexed == 0 {
            return Err(bad(format!(
                "event {id} is at or below the trim watermark of every one of its topics; \
                 the export is inconsistent (an event is kept only while a topic holds it)"
            )));
        }
        let record = codec::encode_record(event.time_ms, &event.name, &event.topics, &event.data);
        batch_bytes += record.head.len() + record.pieces.iter().map(Vec::len).sum::<usize>();
        record.insert_into(&mut batch, event.seq);
        batch_events += 1;
        stats.events += 1;
        stats.first.get_or_insert(event.seq);
        stats.last = Some(event.seq);
        if batch_events >= IMPORT_BATCH_EVENTS || batch_bytes >= IMPORT_BATCH_BYTES {
            db.apply_batch(std::mem::take(&mut batch))?;
            (batch_events, batch_bytes) = (0, 0);
            progress.position(lines.bytes);
        }
    }

    let watermarks: Vec<(Topic, u64)> = match exact {
        Some(trimmed) => trimmed.into_iter().collect(),
        None => gap_before.into_iter().filter(|(_, gap)| *gap > 0).collect(),
    };
    for (topic, through) in watermarks {
        batch.insert(codec::trimmed_key(&topic), &through.to_be_bytes());
        topics_seen.insert(topic);
    }
    batch.insert(EPOCH_KEY, epoch.as_str().as_bytes());
    batch.insert(HEAD_KEY, &head.to_be_bytes());
    db.apply_batch(batch)?;
    db.flush()?;
    // Last: without it no gateway opens the directory.
    db.insert(FORMAT_KEY, &CURRENT_FORMAT.to_be_bytes())?;
    db.flush()?;
    progress.position(lines.bytes);
    progress.finish();
    stats.topics = topics_seen.len();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::sled::offline::{check, NoProgress, OfflineLog};

    const EPOCH: &str = "abc";

    fn line(seq: u64, topics: &[&str], data: &str) -> String {
        let topics: Vec<String> = topics.iter().map(|t| format!("\"{t}\"")).collect();
        format!(
            r#"{{"id":"{EPOCH}-{seq}","event":"e","topics":[{}],"time_ms":{seq}000,"data":{data}}}"#,
            topics.join(",")
        )
    }

    fn import_text(dir: &Path, text: &str) -> Result<ImportStats, OfflineError> {
        let mut input = text.as_bytes();
        import(dir, &mut input, None, &mut NoProgress)
    }

    fn watermarks(dir: &Path) -> Vec<(String, u64)> {
        let log = OfflineLog::open(dir).unwrap();
        let trimmed = log.trimmed().unwrap();
        trimmed
            .into_iter()
            .map(|(t, w)| (t.as_str().to_owned(), w))
            .collect()
    }

    #[test]
    fn exported_watermarks_are_restored_and_rule_the_index() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let text = [
            format!(r#"{{"format":"{EXPORT_FORMAT}","version":1,"epoch":"{EPOCH}","head":9,"trimmed":{{"x":5}}}}"#),
            line(3, &["x", "y"], r#"{"b":1,"a":1.0}"#),
            line(6, &["x"], "[]"),
        ]
        .join("\n")
            + "\n";
        let stats = import_text(&dir, &text).unwrap();
        assert!(stats.exact_watermarks);
        assert_eq!((stats.events, stats.topics, stats.head), (2, 2, 9));
        assert_eq!(watermarks(&dir), [("x".into(), 5)]);
        let report = check(&dir, &mut NoProgress).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        // Event 3 stays listed in x but is indexed only under y (3 ≤ x's watermark 5).
        assert_eq!(report.index_entries, 2);
        let log = OfflineLog::open(&dir).unwrap();
        let mut out = Vec::new();
        log.export(&mut out, &mut NoProgress).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            text,
            "a round trip is byte-exact"
        );
    }

    #[test]
    fn without_exported_watermarks_each_topic_is_trimmed_through_the_gap_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let header =
            format!(r#"{{"format":"{EXPORT_FORMAT}","version":1,"epoch":"{EPOCH}","head":10}}"#);
        // Sequences 1, 2 and 5 are gone: trimmed, from topics nobody can tell.
        let text = [
            header.clone(),
            line(3, &["x"], "1"),
            line(4, &["y"], "2"),
            line(6, &["x", "y"], "3"),
            line(7, &["z"], "4"),
        ]
        .join("\n");
        let stats = import_text(&dir, &text).unwrap();
        assert!(!stats.exact_watermarks);
        assert_eq!(
            watermarks(&dir),
            [("x".into(), 2), ("y".into(), 2), ("z".into(), 5)]
        );
        assert!(check(&dir, &mut NoProgress).unwrap().is_clean());

        // A log that was never trimmed gets no watermark (no spurious reset).
        let untrimmed = tmp.path().join("untrimmed");
        let text = [header, line(1, &["x"], "1"), line(2, &["y"], "2")].join("\n");
        import_text(&untrimmed, &text).unwrap();
        assert!(watermarks(&untrimmed).is_empty());
    }

    #[test]
    fn an_event_trimmed_from_every_topic_is_an_inconsistent_export() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let text = [
            format!(r#"{{"format":"{EXPORT_FORMAT}","version":1,"epoch":"{EPOCH}","head":9,"trimmed":{{"x":6}}}}"#),
            line(6, &["x"], "1"),
        ]
        .join("\n");
        let error = import_text(&dir, &text).unwrap_err().to_string();
        assert!(
            error.starts_with("line 2: event abc-6 is at or below"),
            "{error}"
        );
        assert!(!dir.exists());
    }

    #[test]
    fn headers_are_validated() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        for (header, expected) in [
            ("", "the input is empty"),
            ("[]", "not an export header"),
            (
                r#"{"format":"sse-gateway-export","version":2,"epoch":"a","head":1}"#,
                "version 2 is newer",
            ),
            (
                r#"{"format":"sse-gateway-export","version":1,"epoch":"a-b","head":1}"#,
                "invalid epoch",
            ),
            (
                r#"{"format":"sse-gateway-export","version":1,"epoch":"a","head":1,"x":1}"#,
                "unknown field `x`",
            ),
            (
                r#"{"format":"sse-gateway-export","version":1,"epoch":"a","head":1,"trimmed":{"t":2}}"#,
                "beyond the head",
            ),
        ] {
            let error = import_text(&dir, header).unwrap_err().to_string();
            assert!(
                error.starts_with("line 1: ") && error.contains(expected),
                "{header}: {error}"
            );
            assert!(!dir.exists());
        }
        // A header alone is an empty log that keeps its epoch and head.
        import_text(
            &dir,
            r#"{"format":"sse-gateway-export","version":1,"epoch":"a","head":7}"#,
        )
        .unwrap();
        let log = OfflineLog::open(&dir).unwrap();
        assert_eq!((log.epoch().as_str(), log.head()), ("a", 7));
    }
}
