//! [`Mount`]: a mounted power-cut filesystem served by a thread of this
//! process, and the cut itself.
//!
//! Mounting goes through `fuser` without libfuse: as root it mounts
//! `/dev/fuse` directly, otherwise through the `fusermount3` helper (Debian
//! package `fuse3`). The session runs on its own thread; the mount is
//! unmounted when the `Mount` is cut, unmounted or dropped.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionUnmounter};

use crate::fs::Handler;
use crate::image::Image;
use crate::state::State;
use crate::{Error, PowerCutFs, Stats};

/// How long an unmount waits for the session thread before leaving it.
const JOIN_WAIT: Duration = Duration::from_secs(10);

impl PowerCutFs {
    /// Mounts the filesystem on `mountpoint` (an existing, empty directory)
    /// and serves it from a background thread.
    ///
    /// Processes that use the mount must not be the thread that serves it;
    /// any other thread of this process, or another process, is fine.
    pub fn mount(self, mountpoint: impl AsRef<Path>) -> Result<Mount, Error> {
        let path = mountpoint.as_ref().to_path_buf();
        let mount_error = |source: io::Error| Error::Mount {
            path: path.clone(),
            source,
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".into()),
            MountOption::Subtype("powercut".into()),
            MountOption::DefaultPermissions,
            MountOption::RW,
        ];
        let handler = Handler {
            state: Arc::clone(&self.state),
        };
        let mut session = fuser::Session::new(handler, &path, &config).map_err(mount_error)?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("powercut-fuse".into())
            .spawn(move || session.run())
            .map_err(mount_error)?;
        // The FUSE connection's number (for an abort after a failed unmount)
        // is the minor of the mount's device; only askable once served.
        let connection = std::fs::metadata(&path).ok().map(|m| libc::minor(m.dev()));
        Ok(Mount {
            state: self.state,
            path,
            unmounter: Some(unmounter),
            thread: Some(thread),
            connection,
        })
    }
}

/// A mounted [`PowerCutFs`]. Dropping it unmounts (nothing is cut: use
/// [`Mount::power_cut`] for that).
pub struct Mount {
    state: Arc<Mutex<State>>,
    path: PathBuf,
    unmounter: Option<SessionUnmounter>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// `/sys/fs/fuse/connections/<n>`, if known.
    connection: Option<u32>,
}

impl Mount {
    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cuts the power: from this instant every request fails with `EIO` and
    /// nothing more becomes durable; the filesystem is unmounted and what the
    /// disk kept is returned. Mount it again with [`Image::mount`].
    ///
    /// Kill the processes using the mount first (a live process would get
    /// `EIO`s; an open file makes the unmount lazy).
    pub fn power_cut(mut self) -> Result<Image, Error> {
        let image = {
            let mut state = self.state.lock().map_err(|_| Error::Poisoned)?;
            state.cut = true;
            state.durable_image(true)
        };
        self.teardown()?;
        Ok(image)
    }

    /// What a power cut right now would keep, without tearing writes and
    /// without cutting anything.
    pub fn snapshot(&self) -> Result<Image, Error> {
        let state = self.state.lock().map_err(|_| Error::Poisoned)?;
        Ok(state.durable_image(false))
    }

    /// Counts of the requests the kernel sent so far.
    pub fn stats(&self) -> Result<Stats, Error> {
        Ok(self.state.lock().map_err(|_| Error::Poisoned)?.stats)
    }

    /// Unmounts without a cut (as a clean shutdown would, the volatile state
    /// is simply dropped with the mount).
    pub fn unmount(mut self) -> Result<(), Error> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), Error> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        if let Err(busy) = unmounter.unmount() {
            // Still in use (a file open, a process's cwd there): detach it
            // now. The session thread ends when the last user lets go (all
            // it gets meanwhile after a cut is EIO), or at once if the
            // connection can be aborted through fusectl.
            nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH)
                .or_else(|e| match e {
                    nix::errno::Errno::EINVAL => Ok(()),
                    e => Err(e),
                })
                .map_err(|e| Error::Unmount {
                    path: self.path.clone(),
                    source: io::Error::new(busy.kind(), format!("{busy}; lazy unmount: {e}")),
                })?;
            if let Some(connection) = self.connection {
                let abort = format!("/sys/fs/fuse/connections/{connection}/abort");
                let _ = std::fs::write(abort, "1");
            }
            self.thread = None;
            return Ok(());
        }
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + JOIN_WAIT;
        while !thread.is_finished() {
            if Instant::now() > deadline {
                // Unmounted, yet the kernel keeps the connection: leave the
                // thread rather than hang the caller.
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Session(e)),
            Err(_) => Err(Error::Session(io::Error::other(
                "the FUSE session thread panicked",
            ))),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}
