//! A FUSE filesystem that loses, at a simulated power cut, everything that
//! was never fsynced: a harness for power-loss tests.
//!
//! ```no_run
//! use powercut::{Mode, PowerCutFs};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let mount = PowerCutFs::new(Mode::Strict, None).mount(dir.path())?;
//! std::fs::write(dir.path().join("f"), b"never synced")?;
//! let image = mount.power_cut()?; // what the disk kept
//! assert!(!image.exists("f"));
//! let _next_boot = image.mount(Mode::Strict, None, dir.path())?;
//! # Ok(()) }
//! ```
//!
//! # Model
//! Two layers, both in memory (test data dirs are small; a passthrough to a
//! backing directory would have to emulate the volatile layer anyway, and the
//! kernel's own page cache and the backing filesystem's syncs would blur
//! what is durable). See `state.rs` for the rules:
//! - file data and size become durable only by `fsync`/`fdatasync` of that
//!   file; `close`, `sync_file_range` and unmounting make nothing durable;
//! - names (create, mkdir, rename, unlink, rmdir, link) only by `fsync` of
//!   the directory holding them ([`Mode::Strict`]), or by any `fsync` at all
//!   ([`Mode::Journal`], like ext4's journal);
//! - with torn writes ([`Torn`], seeded, deterministic), a cut keeps part of
//!   the unsynced changes too: [`Torn::InOrder`], those made before a random
//!   point in time and a 4 KiB-aligned part of the one in flight (a disk that
//!   stores writes in the order it is given them);
//!   [`Torn::ByOffset`], of each file a random 4 KiB-aligned prefix *by
//!   offset* of its unsynced pages (a drive whose volatile cache reorders
//!   writes between flushes: a later write may survive an earlier one).
//!
//! The kernel handles `flock`/`fcntl` locks on the mount itself (the
//! filesystem asks for no lock capability), so a second opener is refused
//! as on any local filesystem; locks do not survive a cut (nothing does).
#![forbid(unsafe_code)]

mod data;
mod fs;
mod image;
mod mount;
mod state;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

pub use data::PAGE;
pub use image::{EntryKind, Image};
pub use mount::Mount;

use state::State;

/// When a name change (create, rename, unlink, …) becomes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Only by `fsync` of the directory that holds the name (POSIX: a
    /// file's `fsync` says nothing about its directory entry).
    Strict,
    /// By any `fsync` or `fdatasync`, of any file or directory: a journaling
    /// filesystem commits every earlier metadata change with it (ext4,
    /// `data=ordered`). File data still needs its own file's sync.
    Journal,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Strict => "strict",
            Mode::Journal => "journal",
        })
    }
}

impl FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "strict" => Ok(Mode::Strict),
            "journal" => Ok(Mode::Journal),
            other => Err(Error::UnknownMode(other.to_owned())),
        }
    }
}

/// Torn writes at a power cut: which of the changes made since a file's last
/// `fsync`/`fdatasync` the disk kept anyway. Each carries the seed of the
/// cut's random choices.
///
/// `sync_file_range(2)` never reaches a FUSE filesystem (see `fs.rs`), so
/// neither model can tell data a process asked the kernel to write back
/// from data it merely wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Torn {
    /// The disk stores writes in the order the kernel issues them, and the
    /// power failed in the middle of one: every change made before a random
    /// point survives, of the change in flight a random number of its 4 KiB
    /// pages (in offset order), nothing after it. Across all files, in the
    /// order the requests reached the filesystem. What a disk without a
    /// volatile write cache (or with power-loss protection) does, and what
    /// every write-ahead log's recovery is built for.
    InOrder(u64),
    /// Of each file's unsynced pages, those below a random 4 KiB-aligned
    /// offset survive, whenever they were written: a later write can
    /// survive an earlier one. What a drive with a volatile write cache may
    /// do between two cache flushes.
    ByOffset(u64),
}

impl Torn {
    /// The seed of the cut's random choices.
    pub fn seed(self) -> u64 {
        match self {
            Torn::InOrder(seed) | Torn::ByOffset(seed) => seed,
        }
    }
}

/// Counts of the requests the kernel sent to the filesystem (to check what
/// a syscall turns into, and that a workload synced at all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `WRITE` requests and the bytes they carried.
    pub writes: u64,
    pub bytes_written: u64,
    /// `FSYNC` without / with the datasync flag.
    pub fsyncs: u64,
    pub fdatasyncs: u64,
    /// `FSYNCDIR`.
    pub fsyncdirs: u64,
    /// `FLUSH` (every `close`) and `RELEASE` (the last close).
    pub flushes: u64,
    pub releases: u64,
    /// `SETATTR` with a size, `FALLOCATE`.
    pub truncates: u64,
    pub fallocates: u64,
    /// Files and directories created, names removed, renames.
    pub creates: u64,
    pub unlinks: u64,
    pub renames: u64,
}

/// Errors of mounting, cutting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot mount the power-cut filesystem on {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot unmount {path}: {source}")]
    Unmount { path: PathBuf, source: io::Error },
    #[error("the FUSE session ended with an error: {0}")]
    Session(io::Error),
    #[error("the filesystem state is poisoned (a request handler panicked)")]
    Poisoned,
    #[error("unknown mode {0:?} (strict or journal)")]
    UnknownMode(String),
}

/// A power-cut filesystem, not yet mounted.
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

impl PowerCutFs {
    /// An empty filesystem (its root owned by the calling user). `torn`:
    /// torn writes at the cut, `None` for none.
    pub fn new(mode: Mode, torn: Option<Torn>) -> Self {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        Self::with_state(State::new(mode, torn, uid, gid))
    }

    /// A filesystem whose durable and current contents are `image` (the
    /// boot after a cut).
    pub fn from_image(image: &Image, mode: Mode, torn: Option<Torn>) -> Self {
        Self::with_state(State::from_image(image, mode, torn))
    }

    fn with_state(state: State) -> Self {
        PowerCutFs {
            state: Arc::new(Mutex::new(state)),
        }
    }
}
