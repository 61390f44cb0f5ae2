//! Makes sled's writes durable against power loss, not just against a crash.
//!
//! sled 0.34.7's `Db::flush` writes its log with `sync_file_range(WAIT_BEFORE |
//! WRITE | WAIT_AFTER)` on Linux (`pagecache/iobuf.rs`), which neither flushes
//! the drive's write cache nor the file's metadata (its size, after an
//! append). The rules this module and its callers follow, each of which a
//! power-cut test showed to be needed (issue 15; `tools/powercut`):
//!
//! - after every commit, `Db::flush` **then** `fdatasync` of `db`: only then
//!   is a `201` sent ("on disk" in the sense of docs/API.md);
//! - sled's own periodic flusher is off (`flush_every_ms(None)`, in
//!   `shared.rs`), so `db` is made durable only at our commits, never midway
//!   through sled's own background work;
//! - the data directory is created durably (every new directory and its
//!   parent fsynced: [`create_data_dir`]), and after sled opened it `conf`,
//!   `db`, the directory and its parent are fsynced ([`DiskSync::open`]);
//! - sled's own log writes are fsynced too ([`fsync_every_log_write`], which
//!   the binary calls at start): sled treats what `sync_file_range` wrote as
//!   durable, frees and overwrites segments on that basis, and a drive cache
//!   that reorders writes can then keep the overwrite and lose what it
//!   replaced (torn writes by offset, README "Power loss");
//! - **no blob files**: sled writes a tree node larger than a quarter of a
//!   segment (~128 KiB) to `blobs/<lsn>`, never syncs it, and trusts it at
//!   recovery. Format 2 keeps every value at most 4 KiB (`codec.rs`), so no
//!   node reaches that size; blobs present at open (a format-1 directory's)
//!   are synced once, and a blob file appearing after that is an alarm:
//!   the commit is refused, not acknowledged ([`DiskSync::sync`]).
//!
//! This relies on sled's file layout (`<dir>/conf`, `<dir>/db`,
//! `<dir>/blobs/`), which is why sled is pinned to `=0.34.7`; `open` refuses
//! a directory without `db`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Handles for syncing one sled directory.
pub(crate) struct DiskSync {
    db_file: File,
    blobs_dir: PathBuf,
    /// Blob files present (and synced) at open: a format-1 directory may
    /// hold some. Any other blob file is an alarm (module docs).
    known_blobs: HashSet<OsString>,
}

impl DiskSync {
    /// Opens the handles and makes sled's files and their directory entries
    /// durable; the directory must be an opened sled database.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let db_file = File::open(dir.join("db"))?;
        db_file.sync_all()?;
        match File::open(dir.join("conf")) {
            Ok(conf) => conf.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let blobs_dir = dir.join("blobs");
        let mut known_blobs = HashSet::new();
        for (name, path) in list_blobs(&blobs_dir)? {
            File::open(path)?.sync_all()?;
            known_blobs.insert(name);
        }
        if blobs_dir.is_dir() {
            sync_dir(&blobs_dir)?;
        }
        // The entries of `db`, `conf` and `blobs`, and the directory's own.
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(Self {
            db_file,
            blobs_dir,
            known_blobs,
        })
    }

    /// Makes everything sled wrote so far durable. Call right after
    /// `Db::flush`. Fails, so the caller refuses to acknowledge, when sled
    /// wrote a blob file since open (module docs).
    pub fn sync(&mut self) -> io::Result<()> {
        self.db_file.sync_data()?;
        // Listed after the fdatasync: a blob written before it is seen here.
        for (name, path) in list_blobs(&self.blobs_dir)? {
            if !self.known_blobs.contains(&name) {
                return Err(io::Error::other(format!(
                    "sled wrote a blob file ({}), which it never syncs: refusing to acknowledge \
                     (a value over 4 KiB reached the tree; this is a bug, please report it)",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

impl DiskSync {
    /// Like [`sync`](Self::sync), but a blob file that appeared is made
    /// durable (the file, then the `blobs` directory, before `db` can point
    /// to it durably) and accepted. Only for the format 1 → 2 upgrade: its
    /// trees still hold the long values it is rewriting, so sled may write
    /// blobs until it is done.
    pub fn sync_allowing_blobs(&mut self) -> io::Result<()> {
        let mut new_blob = false;
        for (name, path) in list_blobs(&self.blobs_dir)? {
            if self.known_blobs.contains(&name) {
                continue;
            }
            match File::open(&path) {
                Ok(file) => file.sync_all()?,
                // Rewritten meanwhile: nothing left to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            self.known_blobs.insert(name);
            new_blob = true;
        }
        if new_blob {
            sync_dir(&self.blobs_dir)?;
        }
        self.db_file.sync_data()
    }
}

/// Makes every log write of sled durable before sled relies on it, for the
/// whole process: `sync_file_range(2)` fails with `ENOSYS` from now on (a
/// seccomp filter on every thread, inherited by threads started later), so
/// sled 0.34.7 takes its own fallback and `fsync`s after each log buffer it
/// writes (`pagecache/iobuf.rs`, `write_to_log`).
///
/// Why: sled counts a buffer as stable once `sync_file_range` returned, and
/// acts on it — it frees the segments whose pages moved, writes new data
/// over them, and records that "stable" point in the next segment header,
/// where recovery trusts it. `sync_file_range` does not flush a drive's
/// volatile write cache, which may then keep the overwrite and lose the
/// moved pages at a power cut: acknowledged events lost, or a log that no
/// longer opens ("Read corrupted data at file offset", panics in recovery).
/// `tools/powercut`'s `Torn::ByOffset` shows it (README, "Power loss").
///
/// Call once, early (the binary does, before its runtime starts). Nothing
/// else in the gateway uses `sync_file_range`. Installing a filter without
/// privileges sets the process's `no_new_privs` (no privileges gained
/// through `exec`, which the gateway never does); both are inherited by
/// child processes. Fails where seccomp is not available; the caller
/// decides whether to go on.
#[cfg(target_os = "linux")]
pub fn fsync_every_log_write() -> Result<(), seccompiler::Error> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    use std::collections::BTreeMap;
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_sync_file_range, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    seccompiler::apply_filter_all_threads(&program)
}

/// The files in sled's `blobs` directory (none when it does not exist).
fn list_blobs(blobs_dir: &Path) -> io::Result<Vec<(OsString, PathBuf)>> {
    let entries = match std::fs::read_dir(blobs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut blobs = Vec::new();
    for entry in entries {
        let entry = entry?;
        blobs.push((entry.file_name(), entry.path()));
    }
    Ok(blobs)
}

/// Creates `dir` (and missing ancestors) so that it survives a power cut:
/// each directory created here is fsynced, and so is its parent, whose
/// entry for it is otherwise volatile. An existing directory is left alone.
pub(crate) fn create_data_dir(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(path.to_path_buf());
        at = path.parent();
    }
    std::fs::create_dir_all(dir)?;
    // Deepest first: each new directory, then the parent holding its entry.
    for path in &missing {
        sync_dir(path)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_file_written_after_open_refuses_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .unwrap();
        let mut sync = DiskSync::open(dir.path()).unwrap();
        db.insert("small", vec![1u8; 4096]).unwrap();
        db.flush().unwrap();
        sync.sync().expect("small values make no blob");
        // A value far over the blob threshold lands in blobs/: the alarm.
        db.insert("big", vec![7u8; 1 << 20]).unwrap();
        db.flush().unwrap();
        let err = sync.sync().expect_err("a new blob refuses the commit");
        assert!(err.to_string().contains("blob"), "{err}");
        // Present at open (a format-1 directory's blobs): synced and allowed.
        drop(sync);
        let mut reopened = DiskSync::open(dir.path()).unwrap();
        reopened.sync().expect("known blobs are no alarm");
    }

    #[test]
    fn a_new_data_dir_is_created_with_its_ancestors() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/data");
        create_data_dir(&dir).unwrap();
        assert!(dir.is_dir());
        // Existing: nothing to do, no error.
        create_data_dir(&dir).unwrap();
    }

    #[test]
    fn conf_may_be_missing_but_not_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"").unwrap();
        DiskSync::open(dir.path()).expect("no `conf`: nothing to sync");
        // A `conf` that exists but cannot be opened is not "no conf".
        std::os::unix::fs::symlink("conf", dir.path().join("conf")).unwrap();
        assert!(
            DiskSync::open(dir.path()).is_err(),
            "a symlink loop (ELOOP)"
        );
    }

    /// A mount of the strict power-cut filesystem (`tools/powercut`): a name
    /// is durable only once its directory is synced.
    fn strict_mount(mountpoint: &Path) -> powercut::Mount {
        powercut::PowerCutFs::new(powercut::Mode::Strict, None)
            .mount(mountpoint)
            .unwrap()
    }

    #[test]
    fn a_created_data_dir_survives_a_power_cut() {
        let mountpoint = tempfile::tempdir().unwrap();
        let mount = strict_mount(mountpoint.path());
        create_data_dir(&mount.path().join("a/b/data")).unwrap();
        let image = mount.power_cut().unwrap();
        assert!(image.exists("a/b/data"), "kept: {:?}", image.walk());
    }

    #[test]
    fn a_relative_data_dir_is_created() {
        // Relative to the working directory (the package root under cargo
        // test), with its top new directory right there: that one's parent
        // is "", which means ".". A fresh random name, free again at once.
        let top = {
            let reserved = tempfile::tempdir_in(".").unwrap();
            PathBuf::from(reserved.path().file_name().unwrap())
        };
        let created = create_data_dir(&top.join("data"));
        let is_dir = top.join("data").is_dir();
        std::fs::remove_dir_all(&top).unwrap();
        created.unwrap();
        assert!(is_dir);
    }

    /// A data directory an operator made beforehand and never synced: once
    /// sled opened it, `DiskSync::open` makes it and sled's files durable.
    #[test]
    fn an_opened_data_dir_survives_a_power_cut() {
        let mountpoint = tempfile::tempdir().unwrap();
        let mount = strict_mount(mountpoint.path());
        let made = mount.path().join("made");
        std::fs::create_dir(&made).unwrap();
        let db = sled::Config::new()
            .path(&made)
            .flush_every_ms(None)
            .open()
            .unwrap();
        assert!(made.join("conf").exists() && made.join("db").exists());
        let sync = DiskSync::open(&made).unwrap();
        drop((sync, db));
        let image = mount.power_cut().unwrap();
        let kept = image.walk();
        for path in ["made/db", "made/conf"] {
            assert!(image.exists(path), "{path} lost at the cut; kept: {kept:?}");
        }
    }

    #[test]
    fn a_blobs_entry_that_is_not_a_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"").unwrap();
        std::fs::write(dir.path().join("blobs"), b"").unwrap();
        assert!(
            DiskSync::open(dir.path()).is_err(),
            "ENOTDIR is not \"no blobs\""
        );
    }

    #[test]
    fn during_the_upgrade_a_vanished_blob_is_skipped_but_an_unreadable_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"").unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        let mut sync = DiskSync::open(dir.path()).unwrap();
        // Listed, then gone before it could be opened (sled rewrote it).
        std::os::unix::fs::symlink("gone", blobs.join("1")).unwrap();
        sync.sync_allowing_blobs().expect("nothing left to keep");
        std::fs::remove_file(blobs.join("1")).unwrap();
        std::os::unix::fs::symlink("2", blobs.join("2")).unwrap();
        assert!(
            sync.sync_allowing_blobs().is_err(),
            "a symlink loop (ELOOP)"
        );
    }

    /// On the strict power-cut filesystem: a blob sled writes during the
    /// upgrade is durable once `sync_allowing_blobs` returns, and so is the
    /// `db` that points to it; afterwards it is a known blob, no alarm.
    #[test]
    fn blobs_written_during_the_upgrade_survive_a_power_cut() {
        let mountpoint = tempfile::tempdir().unwrap();
        let mount = strict_mount(mountpoint.path());
        let dir = mount.path().join("data");
        create_data_dir(&dir).unwrap();
        let db = sled::Config::new()
            .path(&dir)
            .flush_every_ms(None)
            .open()
            .unwrap();
        let mut sync = DiskSync::open(&dir).unwrap();
        db.insert("big", vec![7u8; 1 << 20]).unwrap();
        db.flush().unwrap();
        sync.sync_allowing_blobs().unwrap();
        sync.sync()
            .expect("a blob synced during the upgrade is known");
        let written = std::fs::read_dir(dir.join("blobs")).unwrap().count();
        assert!(written > 0, "the value went to a blob file");
        let db_len = std::fs::metadata(dir.join("db")).unwrap().len();
        drop((sync, db));
        let image = mount.power_cut().unwrap();
        assert_eq!(image.list("data/blobs").map(|b| b.len()), Some(written));
        assert_eq!(image.read("data/db").map(|d| d.len() as u64), Some(db_len));
    }

    #[test]
    fn refuses_a_directory_that_is_not_sled() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DiskSync::open(dir.path()).is_err());
    }
}
