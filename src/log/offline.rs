//! Offline access to a sled data directory, for the operator CLI: a summary
//! (`inspect`), an integrity check (`check`), and a JSON-lines `export` /
//! `import` used for backups, compaction and moves between storage backends.
//!
//! "Offline" means no gateway runs on the directory. sled locks it, so every
//! function here fails with [`OfflineError::Locked`] while a gateway holds it.
//! Nothing here starts the log writer or the retention trimmer, and
//! `inspect`, `check` and `export` never write a key. The key layout and the
//! record encoding are [`codec`]'s and the format rules [`format`]'s: this
//! module only walks them.
//!
//! Every operation is a full scan, O(size of the log): sled keeps no counts.
//!
//! # The export format (version 1)
//!
//! JSON lines, UTF-8. The first line is a header:
//!
//! ```text
//! {"format":"sse-gateway-export","version":1,"epoch":"Xk3v9QaB","head":1234,"trimmed":{"projects:all":17}}
//! ```
//!
//! `head` is the last sequence the log ever assigned (`m/head`), which may be
//! above the newest exported event when retention removed the newest events.
//! `trimmed` is every topic's retention watermark (`w/<topic>`): the highest
//! sequence retention removed from that topic. It is optional on import (see
//! [`import`] for what happens without it). Then one line per event, in id
//! order:
//!
//! ```text
//! {"id":"Xk3v9QaB-18","event":"task_updated","topics":["projects:all","projects:tasks"],"time_ms":1700000000000,"data":{"id":7}}
//! ```
//!
//! `topics` is every topic the event was published to, `time_ms` its append
//! time (it drives `max_age` retention) and `data` the compact JSON exactly as
//! stored, embedded raw: key order, escapes and number text are the stored
//! bytes, never re-serialised.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::codec::{
    self, EPOCH_KEY, EVENT_PREFIX, FORMAT_KEY, HEAD_KEY, INDEX_PREFIX, TRIMMED_PREFIX,
};
use super::format::{self, CURRENT_FORMAT};
use super::{LogError, StoredEvent};
use crate::model::{Epoch, EventName, Topic, MAX_TOPICS};

/// The `format` value of an export header.
pub const EXPORT_FORMAT: &str = "sse-gateway-export";
/// The export format version this build writes and the newest it reads.
pub const EXPORT_VERSION: u32 = 1;

/// Deepest JSON nesting accepted on import (the most `limits.max_json_depth` allows).
const MAX_IMPORT_DEPTH: usize = 128;
/// sled page cache for offline runs: they scan once, a big cache buys nothing.
const OFFLINE_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Import writes one atomic batch per this many events or bytes.
const IMPORT_BATCH_EVENTS: usize = 1024;
const IMPORT_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// `check` keeps at most this many problems in its report (it counts them all).
const MAX_KEPT_PROBLEMS: usize = 10_000;
/// Progress is reported every this many items.
const PROGRESS_EVERY: u64 = 256;

/// Why an offline operation could not run.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// No sled database in the directory (offline tools never create one).
    #[error("{}: not a data directory (no sled database in it); check --data-dir", .0.display())]
    NotADataDir(PathBuf),
    /// A gateway runs on the directory.
    #[error("{} is locked by a running gateway (sled holds the directory's lock); stop the gateway first, or work on a copy taken while it was stopped", .0.display())]
    Locked(PathBuf),
    /// A sled database, but not a log this build reads.
    #[error("{}: {what}", dir.display())]
    NotALog { dir: PathBuf, what: String },
    /// Reading or decoding the log failed.
    #[error("{0}")]
    Log(LogError),
    /// The import target holds something.
    #[error("{}: not empty; import only into a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    /// A bad line in an export; nothing was imported.
    #[error("line {line}: {what}")]
    Import { line: u64, what: String },
    /// A file or stream could not be read or written.
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
}

impl From<LogError> for OfflineError {
    fn from(e: LogError) -> Self {
        Self::Log(e)
    }
}

impl From<sled::Error> for OfflineError {
    fn from(e: sled::Error) -> Self {
        Self::Log(LogError::Storage(e))
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> OfflineError {
    let what = what.into();
    move |error| OfflineError::Io { what, error }
}

/// What a long offline run is counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Events, index entries: drawn as a count or a fraction of the id range.
    Items,
    /// Bytes of input.
    Bytes,
}

/// Told how a long offline run progresses; the CLI draws a progress bar.
pub trait Progress {
    /// A new phase: its name, how much there is in all if known, and in what.
    fn phase(&mut self, _name: &str, _total: Option<u64>, _unit: Unit) {}
    /// How much of the current phase is done.
    fn position(&mut self, _done: u64) {}
    /// The run is over.
    fn finish(&mut self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

/// Opens the sled database in `dir` without creating one, for offline use:
/// no background flush, a small cache. A held lock is [`OfflineError::Locked`].
fn open_db(dir: &Path) -> Result<sled::Db, OfflineError> {
    if !dir.join("db").is_file() {
        return Err(OfflineError::NotADataDir(dir.to_path_buf()));
    }
    sled::Config::new()
        .path(dir)
        .cache_capacity(OFFLINE_CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .map_err(|e| match &e {
            // sled reports a held lock only in the text of an `Io` error.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                OfflineError::Locked(dir.to_path_buf())
            }
            _ => OfflineError::from(e),
        })
}

/// A data directory opened for reading, with its format checked.
pub struct OfflineLog {
    db: sled::Db,
    dir: PathBuf,
    epoch: Epoch,
    head: u64,
}

impl OfflineLog {
    /// Opens the log in `dir` for reading. Refuses a directory that is not a
    /// log, holds another format version than this build's, or is locked.
    pub fn open(dir: &Path) -> Result<Self, OfflineError> {
        let db = open_db(dir)?;
        let not_a_log = |what: String| OfflineError::NotALog {
            dir: dir.to_path_buf(),
            what,
        };
        match format::read_version(&db)? {
            None if db.is_empty() => {
                return Err(not_a_log(
                    "an empty database, not an sse-gateway log".into(),
                ))
            }
            None => return Err(not_a_log(
                "holds keys but no format version (m/format); not an sse-gateway log, or damaged"
                    .into(),
            )),
            Some(found) if found > CURRENT_FORMAT => {
                return Err(LogError::TooNew {
                    found,
                    supported: CURRENT_FORMAT,
                }
                .into())
            }
            Some(found) if found < CURRENT_FORMAT => {
                return Err(not_a_log(format!(
                    "format version {found} is older than this build's ({CURRENT_FORMAT}); \
                     start the gateway on it once to upgrade it in place"
                )))
            }
            Some(_) => {}
        }
        let epoch = format::read_epoch(&db)?;
        let head = format::read_head(&db)?;
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            epoch,
            head,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log's epoch.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The last assigned sequence (`m/head`).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Every stored event in id order. O(n): reads every record.
    pub fn events(&self) -> impl Iterator<Item = Result<StoredEvent, OfflineError>> + '_ {
        self.db.scan_prefix(EVENT_PREFIX).map(|item| {
            let (key, value) = item?;
            let seq = codec::seq_suffix(&key)?;
            Ok(codec::decode_record(seq, &value)?)
        })
    }

    /// Sequences of the oldest and newest stored events.
    pub fn event_range(&self) -> Result<Option<(u64, u64)>, OfflineError> {
        let mut events = self.db.scan_prefix(EVENT_PREFIX).keys();
        let Some(first) = events.next() else {
            return Ok(None);
        };
        let first = codec::seq_suffix(&first?)?;
        let last = match events.next_back() {
            Some(key) => codec::seq_suffix(&key?)?,
            None => first,
        };
        Ok(Some((first, last)))
    }

    /// Every topic's retention watermark (`w/<topic>`).
    pub fn trimmed(&self) -> Result<BTreeMap<Topic, u64>, OfflineError> {
        let mut trimmed = BTreeMap::new();
        for item in self.db.scan_prefix(TRIMMED_PREFIX) {
            let (key, value) = item?;
            let topic = codec::split_trimmed_key(&key)?;
            trimmed.insert(topic, codec::decode_u64(&key, &value)?);
        }
        Ok(trimmed)
    }

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
            format_version: CURRENT_FORMAT,
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

    /// Writes the export of this log to `out` (module docs: the format).
    /// Fails on a record that does not decode or holds data that is not
    /// compact JSON, naming it: `check` tells what else is wrong.
    pub fn export(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn Progress,
    ) -> Result<ExportStats, OfflineError> {
        let trimmed = self.trimmed()?;
        let header = ExportHeader {
            format: EXPORT_FORMAT.into(),
            version: EXPORT_VERSION,
            epoch: self.epoch.as_str().into(),
            head: self.head,
            trimmed: Some(
                trimmed
                    .into_iter()
                    .map(|(t, w)| (t.as_str().to_owned(), w))
                    .collect(),
            ),
        };
        let write_error = io_error("cannot write the export");
        serde_json::to_writer(&mut *out, &header).map_err(|e| OfflineError::Io {
            what: "cannot write the export".into(),
            error: e.into(),
        })?;
        out.write_all(b"\n").map_err(write_error)?;

        let range = self.event_range()?;
        progress.phase("exporting", range.map(|(a, b)| b - a + 1), Unit::Items);
        let mut stats = ExportStats {
            epoch: self.epoch.clone(),
            head: self.head,
            events: 0,
            first: None,
            last: None,
        };
        for event in self.events() {
            let event = event?;
            let id = self.epoch.id(event.seq);
            let data = compact_json_text(&event.data).ok_or_else(|| {
                OfflineError::Log(LogError::Corrupt {
                    key: format!("e/{}", event.seq),
                    what: format!(
                        "the data of event {id} is not compact JSON; run `sse-gateway check`"
                    ),
                })
            })?;
            let line = ExportLine {
                id: &id,
                event: event.name.as_str(),
                topics: event.topics.iter().map(Topic::as_str).collect(),
                time_ms: event.time_ms,
                data,
            };
            serde_json::to_writer(&mut *out, &line).map_err(|e| OfflineError::Io {
                what: "cannot write the export".into(),
                error: e.into(),
            })?;
            out.write_all(b"\n")
                .map_err(io_error("cannot write the export"))?;
            stats.events += 1;
            stats.first.get_or_insert(event.seq);
            stats.last = Some(event.seq);
            if stats.events.is_multiple_of(PROGRESS_EVERY) {
                progress.position(event.seq - range.map_or(0, |r| r.0) + 1);
            }
        }
        out.flush().map_err(io_error("cannot write the export"))?;
        progress.finish();
        Ok(stats)
    }
}

/// The stored data as a `RawValue` when it is one compact JSON value.
fn compact_json_text(data: &[u8]) -> Option<&RawValue> {
    let text = std::str::from_utf8(data).ok()?;
    if text.bytes().any(|b| b == b'\n' || b == b'\r') {
        return None;
    }
    let raw: &RawValue = serde_json::from_str(text).ok()?;
    (raw.get().len() == text.len()).then_some(raw)
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

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportStats {
    pub epoch: Epoch,
    pub head: u64,
    pub events: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportHeader {
    format: String,
    version: u32,
    epoch: String,
    head: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trimmed: Option<BTreeMap<String, u64>>,
}

/// Just enough of a header to say which format and version it is.
#[derive(Deserialize)]
struct HeaderProbe {
    format: Option<String>,
    version: Option<u32>,
}

#[derive(Serialize)]
struct ExportLine<'a> {
    id: &'a str,
    event: &'a str,
    topics: Vec<&'a str>,
    time_ms: u64,
    data: &'a RawValue,
}

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
    /// True when the export carried the watermarks (`trimmed`) and they were
    /// restored exactly; false when they were reconstructed ([`import`]).
    pub exact_watermarks: bool,
}

/// Imports an export (module docs: the format) into `dir`, which must not
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
        let event = parse_event(lines.text()?, &epoch).map_err(bad)?;
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
        batch_bytes += record.len();
        batch.insert(&codec::event_key(event.seq), record);
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
    let db = open_db(dir)?;
    let mut r = CheckReport::default();
    match format::read_version(&db) {
        Ok(Some(0)) => {
            r.format_version = Some(0);
            r.problem("m/format", "format version 0 does not exist");
        }
        Ok(Some(v)) if v != CURRENT_FORMAT => {
            r.format_version = Some(v);
            let what = if v > CURRENT_FORMAT {
                format!("format version {v} is newer than this build checks ({CURRENT_FORMAT}); use a newer sse-gateway")
            } else {
                format!("format version {v} is older than this build checks ({CURRENT_FORMAT}); start the gateway once to upgrade it")
            };
            r.problem("m/format", what);
            return Ok(r);
        }
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
        } else if !(key.starts_with(TRIMMED_PREFIX)
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
        if newest > head {
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
    let event = match codec::decode_record(seq, value) {
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
            if let Ok(event) = codec::decode_record(seq, &record) {
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
