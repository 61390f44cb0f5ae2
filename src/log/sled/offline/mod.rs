//! Offline access to a sled data directory, for the operator CLI: a summary
//! (`inspect`), an integrity check (`check`), and a JSON-lines `export` /
//! `import` used for backups, compaction and moves between storage backends.
//!
//! "Offline" means no gateway runs on the directory. sled locks it, so every
//! function here fails with [`OfflineError::Locked`] while a gateway holds it.
//! Nothing here starts the log writer or the retention trimmer, and
//! `inspect`, `check` and `export` never write a key. The key layout and the
//! record encoding are [`codec`]'s and the format rules
//! [`format`](mod@format)'s: this module only walks them.
//!
//! Every operation is a full scan, O(size of the log): sled keeps no counts.
//!
//! One file per command: [`inspect`](OfflineLog::summary), [`export`](OfflineLog::export)
//! (whose docs hold the export format), [`import()`] and [`check()`]. This
//! module holds what they share: opening a directory, the error type and the
//! progress reporting the CLI draws.

mod check;
mod export;
mod import;
mod inspect;
mod repair;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::value::RawValue;

use super::codec::{self, EVENT_PREFIX, TRIMMED_PREFIX};
use super::format::{self, CURRENT_FORMAT};
use crate::log::{LogError, StoredEvent};
use crate::model::{Epoch, Topic};

pub use check::{check, describe_key, CheckReport, Problem};
pub use export::{ExportStats, ExportWriter, EXPORT_FORMAT, EXPORT_VERSION};
pub use import::{import, ImportStats};
pub use inspect::{Summary, TopicSummary};
pub use repair::{repair, RepairReport};

/// sled page cache for offline runs: they scan once, a big cache buys nothing.
const OFFLINE_CACHE_BYTES: u64 = 64 * 1024 * 1024;
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
    /// The Redis import target already holds keys of a log.
    #[error("{0}")]
    Exists(String),
    /// A Redis log could not be read as an export needs it.
    #[error("{0}")]
    Redis(String),
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

/// How often, and how far apart, a held lock is tried again before the
/// directory is reported locked (about a second in all).
const LOCK_ATTEMPTS: u32 = 10;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// A private copy of a data directory, opened with sled.
///
/// sled 0.34 has no read-only open: opening runs its recovery, which
/// truncates and rewrites `db` where it finds damage. An operator's read-only
/// command must never do that to the directory it was pointed at, so it
/// works on a copy, taken while holding sled's own lock on the original (no
/// gateway can start writing meanwhile) and removed when done. The copy
/// costs one read of the directory (a reflink where the filesystem can).
pub(crate) struct Snapshot {
    /// Declared before `_copy`: closed before the copy is removed.
    pub db: sled::Db,
    pub copy: tempfile::TempDir,
}

/// Opens a copy of the sled database in `dir` (never `dir` itself, see
/// [`Snapshot`]): no background flush, a small cache. A held lock is
/// [`OfflineError::Locked`].
fn open_db(dir: &Path) -> Result<Snapshot, OfflineError> {
    let copy = {
        // sled's lock, held while copying: no gateway writes the directory
        // under our feet.
        let _lock = lock_db(dir)?;
        let copy = copy_target(dir).map_err(io_error("cannot make a private copy"))?;
        copy_files(dir, copy.path()).map_err(io_error("cannot copy the data directory"))?;
        copy
    };
    let db = sled::Config::new()
        .path(copy.path())
        .cache_capacity(OFFLINE_CACHE_BYTES)
        .flush_every_ms(None)
        .open()?;
    Ok(Snapshot { db, copy })
}

/// Takes sled's own lock on the database in `dir` (an flock on `db`), so
/// no gateway can open it while held. A lock still held after about a
/// second is [`OfflineError::Locked`].
pub(super) fn lock_db(dir: &Path) -> Result<std::fs::File, OfflineError> {
    let db_file = dir.join("db");
    if !db_file.is_file() {
        return Err(OfflineError::NotADataDir(dir.to_path_buf()));
    }
    let lock = std::fs::File::open(&db_file).map_err(io_error("cannot open db"))?;
    // A little patience: a sled database closed a moment ago (a gateway
    // that is stopping, or an import in this process) releases its lock
    // from a background thread.
    let mut attempts = 0;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(std::fs::TryLockError::WouldBlock) if attempts < LOCK_ATTEMPTS => {
                attempts += 1;
                std::thread::sleep(LOCK_RETRY);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OfflineError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("cannot lock db")(e)),
        }
    }
}

/// A temporary directory beside `dir` (same filesystem: a fast copy), or in
/// the system's temp directory when the parent is not writable.
fn copy_target(dir: &Path) -> io::Result<tempfile::TempDir> {
    let beside = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".sse-gateway-read-")
        .tempdir_in(beside)
        .or_else(|_| {
            tempfile::Builder::new()
                .prefix("sse-gateway-read-")
                .tempdir()
        })
}

/// Copies the files of `from` (and its subdirectories: `blobs/`) into `to`.
fn copy_files(from: &Path, to: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_files(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// A data directory opened for reading, with its format checked.
pub struct OfflineLog {
    db: sled::Db,
    /// The private copy `db` reads (see [`Snapshot`]); removed after `db` closes.
    _copy: tempfile::TempDir,
    /// The directory's format version (this build's, or an older one it reads).
    format: u32,
    dir: PathBuf,
    epoch: Epoch,
    head: u64,
}

impl OfflineLog {
    /// Opens the log in `dir` for reading. Refuses a directory that is not a
    /// log, holds another format version than this build's, or is locked.
    pub fn open(dir: &Path) -> Result<Self, OfflineError> {
        Self::from_snapshot(dir, open_db(dir)?)
    }

    /// Opens `dir`, inside `owner`, a temporary directory this process made
    /// (an import's staging log): no private copy is taken, and `owner` is
    /// removed when the log is dropped.
    pub(crate) fn open_owned(dir: &Path, owner: tempfile::TempDir) -> Result<Self, OfflineError> {
        // The import that made it released sled's lock from a background
        // thread: wait until it is free (only this process uses the directory).
        drop(lock_db(dir)?);
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(OFFLINE_CACHE_BYTES)
            .flush_every_ms(None)
            .open()?;
        Self::from_snapshot(dir, Snapshot { db, copy: owner })
    }

    fn from_snapshot(dir: &Path, snapshot: Snapshot) -> Result<Self, OfflineError> {
        let Snapshot { db, copy } = snapshot;
        let not_a_log = |what: String| OfflineError::NotALog {
            dir: dir.to_path_buf(),
            what,
        };
        let found = match format::read_version(&db)? {
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
            Some(0) => return Err(not_a_log("format version 0 does not exist".into())),
            // Format 1 is read as it is: format 2 reads its records, and
            // offline commands never write (the gateway upgrades it).
            Some(found) => found,
        };
        let epoch = format::read_epoch(&db)?;
        let head = format::read_head(&db)?;
        Ok(Self {
            db,
            _copy: copy,
            format: found,
            dir: dir.to_path_buf(),
            epoch,
            head,
        })
    }

    /// The directory's format version.
    pub fn format_version(&self) -> u32 {
        self.format
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
            Ok(codec::decode_record(&self.db, seq, &value)?)
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
