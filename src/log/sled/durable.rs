//! Makes sled's flush durable against power loss, not just against a crash.
//!
//! sled 0.34.7's `Db::flush` writes its log with `sync_file_range(WAIT_BEFORE |
//! WRITE | WAIT_AFTER)` on Linux (`pagecache/iobuf.rs`), which neither flushes
//! the drive's write cache nor the file's metadata (its size, after an
//! append); only its 500 ms background flusher calls `fsync`. And values that
//! make a node larger than segment_size / 4 go to `blobs/<lsn>` files that sled
//! writes and never syncs at all. So after every `flush` the writer also calls
//! `fdatasync` on the `db` file and `fsync` on every blob file it has not
//! synced yet (and on the `blobs` directory when one appeared). Only then is a
//! `201` sent: "on disk" in the sense of API.md.
//!
//! The `blobs` directory is listed on every sync, although it is almost
//! always empty. Skipping the listing is not safe: blobs are written by any
//! thread that logs a large enough node (the writer, the retention trimmer,
//! sled's own background GC), not only for large events, so the batch
//! contents do not bound them, and the directory's mtime has the kernel's
//! coarse clock granularity, so an unchanged mtime does not prove that no
//! file was created since. Measured, the listing (openat, fstat, two
//! getdents64, close) costs ~10–30 µs of a commit's ~0.7 ms: not worth a
//! window in which a blob could be acked unsynced.
//!
//! This relies on sled's file layout (`<dir>/db`, `<dir>/blobs/`), which is
//! why sled is pinned to `=0.34.7`; `open` refuses a directory without it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Handles for syncing one sled directory.
pub(crate) struct DiskSync {
    db_file: File,
    blobs_dir: PathBuf,
    /// Blob files already synced, with their length then. Blobs are immutable
    /// once complete; one that grew since (sled was still writing it when we
    /// looked) is synced again.
    synced_blobs: HashMap<OsString, u64>,
}

impl DiskSync {
    /// Opens the handles; the directory must be an opened sled database.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let db_file = File::open(dir.join("db"))?;
        // The directory entries of `db` and `blobs` must survive too (once).
        sync_dir(dir)?;
        let mut sync = Self {
            db_file,
            blobs_dir: dir.join("blobs"),
            synced_blobs: HashMap::new(),
        };
        sync.sync_blobs()?;
        Ok(sync)
    }

    /// Syncs everything sled wrote so far. Call right after `Db::flush`.
    pub fn sync(&mut self) -> io::Result<()> {
        self.sync_blobs()?;
        self.db_file.sync_data()
    }

    fn sync_blobs(&mut self) -> io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashMap::new();
        let mut new_blob = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let len = match entry.metadata() {
                Ok(metadata) => metadata.len(),
                // sled removed it meanwhile (a rewritten node): nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if self.synced_blobs.get(&name) != Some(&len) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_all()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new_blob = true;
            }
            present.insert(name, len);
        }
        if new_blob {
            sync_dir(&self.blobs_dir)?;
        }
        // Forget blobs sled has deleted, so the set stays bounded.
        self.synced_blobs = present;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_db_and_new_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut sync = DiskSync::open(dir.path()).unwrap();
        // A value far over the blob threshold lands in blobs/.
        db.insert("big", vec![7u8; 1 << 20]).unwrap();
        db.flush().unwrap();
        sync.sync().unwrap();
        assert!(
            !sync.synced_blobs.is_empty(),
            "the blob file was found and synced"
        );
        db.insert("small", "x").unwrap();
        db.flush().unwrap();
        sync.sync().unwrap();
    }

    #[test]
    fn refuses_a_directory_that_is_not_sled() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DiskSync::open(dir.path()).is_err());
    }
}
