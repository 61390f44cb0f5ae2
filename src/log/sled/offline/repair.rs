//! `repair`: makes a data directory the gateway refused (acknowledged events
//! missing, `mark.rs`) servable again, after saving a copy of it.
//!
//! What is gone stays gone; a repair only makes that explicit. It copies the
//! directory, durably, to `<dir>.damaged-<UTC time>` (for forensics, or for
//! a specialist to recover more) before changing anything; then it opens the
//! log (sled's recovery keeps what precedes the damage), raises the head to
//! the last acknowledged sequence so that no id a client may hold is ever
//! handed out for another event, and rewrites the mark. Clients resuming
//! from a lost id continue with what comes after it.
//!
//! A refused `serve` ran sled's recovery, which rewrote the damaged bytes and
//! everything after them; it kept them first in `<dir>.pre-open`
//! (`preserve.rs`). The repair puts them back into the saved copy, which so
//! holds `db` as it was before any open, and then removes `<dir>.pre-open`.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{copy_files, io_error, lock_db, OfflineError, OFFLINE_CACHE_BYTES};
use crate::log::sled::codec::{self, EVENT_PREFIX, HEAD_KEY};
use crate::log::sled::{format, mark, preserve};
use crate::model::Epoch;

/// What a repair did.
#[derive(Debug, Clone)]
pub struct RepairReport {
    /// The copy of the directory as it was found.
    pub saved_to: PathBuf,
    /// Bytes a refused `serve` had kept before sled's recovery rewrote them
    /// (`<dir>.pre-open`), put back into `saved_to`; 0 when there were none.
    pub restored_bytes: u64,
    /// The log's epoch after the repair; `None` when sled recovered nothing
    /// (the gateway then starts a new log).
    pub epoch: Option<Epoch>,
    /// The last event the log still holds (its head before the repair).
    pub found: u64,
    /// What the mark said was acknowledged, if it had a mark (`<epoch>-<seq>`).
    pub acknowledged: Option<String>,
    /// Acknowledged sequences that are missing (0: nothing was lost).
    pub lost: u64,
}

/// Repairs `dir` (see the module docs). The gateway must be stopped.
pub fn repair(dir: &Path) -> Result<RepairReport, OfflineError> {
    let pre_open = preserve::preserved_path(dir);
    let (saved_to, restored_bytes) = {
        let _lock = lock_db(dir)?;
        let saved_to = save_copy(dir)?;
        let restored = if pre_open.is_dir() {
            preserve::restore_into(&pre_open, &saved_to).map_err(io_error(format!(
                "cannot put the bytes kept in {} back into {}",
                pre_open.display(),
                saved_to.display()
            )))?
        } else {
            0
        };
        (saved_to, restored)
    };
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(OFFLINE_CACHE_BYTES)
        .flush_every_ms(None)
        .open()?;
    let marked = mark::read(dir).map_err(io_error("cannot read the acked-head mark"))?;
    let acknowledged = marked.as_ref().map(mark::Marked::id);
    if format::read_version(&db)?.is_none() && db.is_empty() {
        // sled recovered nothing: the next start makes a new log (a new
        // epoch, so no old id is valid in it); the old mark must go.
        drop(db);
        remove_mark(dir)?;
        remove_pre_open(&pre_open)?;
        return Ok(RepairReport {
            saved_to,
            restored_bytes,
            epoch: None,
            found: 0,
            lost: marked.map_or(0, |m| m.seq),
            acknowledged,
        });
    }
    let epoch = format::read_epoch(&db)?;
    let mut found = format::read_head(&db)?;
    if let Some(item) = db.scan_prefix(EVENT_PREFIX).keys().next_back() {
        found = found.max(codec::seq_suffix(&item?)?);
    }
    let lost = match &marked {
        Some(m) if m.epoch == epoch.as_str() => m.seq.saturating_sub(found),
        Some(m) => m.seq,
        None => 0,
    };
    let head = match &marked {
        Some(m) if m.epoch == epoch.as_str() && m.seq > found => {
            // Ids up to the mark were handed out: new events come after them.
            db.insert(HEAD_KEY, &m.seq.to_be_bytes())?;
            m.seq
        }
        _ => found,
    };
    db.flush()?;
    drop(db);
    // sled's flush is not an fsync (`durable.rs`).
    File::open(dir.join("db"))
        .and_then(|f| f.sync_all())
        .map_err(io_error("cannot sync db"))?;
    mark::replace(dir, &epoch, head).map_err(io_error("cannot write the acked-head mark"))?;
    remove_pre_open(&pre_open)?;
    Ok(RepairReport {
        saved_to,
        restored_bytes,
        epoch: Some(epoch),
        found,
        acknowledged,
        lost,
    })
}

/// Copies `dir` to a new sibling `<dir>.damaged-<UTC time>`, every file and
/// directory synced, and returns its path.
fn save_copy(dir: &Path) -> Result<PathBuf, OfflineError> {
    let name = dir
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let stamp = httpdate::fmt_http_date(std::time::SystemTime::now());
    let stamp: String = stamp
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let target = parent.join(format!("{name}.damaged-{stamp}"));
    std::fs::create_dir(&target).map_err(io_error(format!(
        "cannot create {} for the copy",
        target.display()
    )))?;
    copy_files(dir, &target).map_err(io_error("cannot copy the data directory"))?;
    sync_tree(&target).map_err(io_error("cannot sync the copy"))?;
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_error("cannot sync the copy's parent directory"))?;
    Ok(target)
}

/// fsyncs every file and directory under `dir`, and `dir`.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

/// The kept bytes are in the saved copy now: `<dir>.pre-open` goes.
fn remove_pre_open(pre_open: &Path) -> Result<(), OfflineError> {
    match std::fs::remove_dir_all(pre_open) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(format!("cannot remove {}", pre_open.display()))(e)),
    }
}

fn remove_mark(dir: &Path) -> Result<(), OfflineError> {
    match std::fs::remove_file(dir.join(mark::MARK_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("cannot remove the acked-head mark")(e)),
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("cannot sync the data directory"))
}
