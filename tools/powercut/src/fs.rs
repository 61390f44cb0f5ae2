//! The FUSE request handler: decodes each request, applies it to the shared
//! [`State`] under one lock, and answers.
//!
//! What the kernel sends (Linux, this mount: no writeback cache, no lock
//! capabilities requested):
//! - `write(2)`/`pwrite(2)` → `WRITE` before the syscall returns (write-through),
//!   so the volatile layer always has every byte a process wrote.
//! - `fsync(2)` → `FSYNC`, `fdatasync(2)` → `FSYNC` with the datasync flag;
//!   on a directory → `FSYNCDIR`. Answering `ENOSYS` would make the kernel
//!   stop sending them and report success: they are always implemented.
//! - `sync_file_range(2)` → nothing: it only writes back dirty page-cache
//!   pages, and write-through leaves none (pinned by a test).
//! - `close(2)` → `FLUSH`, the last close → `RELEASE`: neither syncs.
//! - `flock(2)`/`fcntl` locks → nothing: without `FUSE_POSIX_LOCKS` /
//!   `FUSE_FLOCK_LOCKS` the kernel keeps locks itself, per mount, so a second
//!   opener is refused as on a local filesystem (pinned by a test).
//!
//! After the cut every request fails with `EIO`, as a dead disk would.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use crate::data::PAGE;
use crate::state::{Attr, Meta, SetAttr, State};

/// How long the kernel may cache names and attributes. Every change goes
/// through this mount, so the kernel's cache can't go stale; a cut unmounts.
const TTL: Duration = Duration::from_secs(1);

/// Blocks reported by `statfs` (64 GiB of 4 KiB): room is never the issue.
const TOTAL_BLOCKS: u64 = 16 * 1024 * 1024;

/// The `fuser` filesystem: a handle on the state shared with [`crate::Mount`].
pub(crate) struct Handler {
    pub state: Arc<Mutex<State>>,
}

impl Handler {
    /// The state, unless the power was cut (`EIO`) or a panic poisoned it.
    fn state(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let state = self.state.lock().map_err(|_| Errno::EIO)?;
        if state.cut {
            return Err(Errno::EIO);
        }
        Ok(state)
    }

    /// Runs `op` on the state, mapping a model errno to a FUSE one.
    fn with<T>(&self, op: impl FnOnce(&mut State) -> Result<T, i32>) -> Result<T, Errno> {
        let mut state = self.state()?;
        op(&mut state).map_err(Errno::from_i32)
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.meta.atime,
        mtime: attr.meta.mtime,
        ctime: attr.meta.ctime,
        crtime: attr.meta.crtime,
        kind: if attr.is_dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: attr.meta.perm,
        nlink: attr.nlink,
        uid: attr.meta.uid,
        gid: attr.meta.gid,
        rdev: 0,
        blksize: PAGE as u32,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn new_meta(req: &Request, mode: u32, umask: u32) -> Meta {
    Meta::new(((mode & !umask) & 0o7777) as u16, req.uid(), req.gid())
}

/// Inode numbers are never reused: generation 0 is always right.
const GENERATION: Generation = Generation(0);

impl Filesystem for Handler {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        // Deliberately no FUSE_WRITEBACK_CACHE (writes must reach the
        // volatile layer before the syscall returns) and no lock
        // capabilities (the kernel then enforces flock/fcntl locks itself).
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with(|s| s.lookup(parent.0, name)) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|s| s.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            size,
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        match self.with(|s| s.setattr(ino.0, change)) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        let meta = new_meta(req, mode, umask);
        match self.with(|s| s.create(parent.0, name, false, meta)) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let meta = new_meta(req, mode, umask);
        match self.with(|s| s.create(parent.0, name, true, meta)) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| s.remove(parent.0, name, false)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| s.remove(parent.0, name, true)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        match self.with(|s| s.rename(parent.0, name, newparent.0, newname, flags.bits())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.with(|s| s.link(ino.0, newparent.0, newname)) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|s| s.open(ino.0)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let meta = new_meta(req, mode, umask);
        let created = self.with(|s| {
            let attr = s.create(parent.0, name, false, meta)?;
            s.open(attr.ino)?;
            Ok(attr)
        });
        match created {
            Ok(attr) => reply.created(
                &TTL,
                &file_attr(&attr),
                GENERATION,
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|s| s.read(ino.0, offset, u64::from(size))) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|s| s.write(ino.0, offset, data)) {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): makes nothing durable.
        match self.state() {
            Ok(mut state) => {
                state.stats.flushes += 1;
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            s.release(ino.0);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| s.fsync(ino.0, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.with(|s| s.readdir(ino.0)) {
            Ok(entries) => entries,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, is_dir, name)) in entries.into_iter().enumerate().skip(skip) {
            let kind = if is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| s.fsyncdir(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with(|s| Ok(s.usage())) {
            Ok((inodes, bytes)) => {
                let free = TOTAL_BLOCKS.saturating_sub(bytes / PAGE);
                reply.statfs(
                    TOTAL_BLOCKS,
                    free,
                    free,
                    1 << 32,
                    (1u64 << 32).saturating_sub(inodes),
                    PAGE as u32,
                    255,
                    PAGE as u32,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`).
        match self.with(|s| s.attr(ino.0)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| s.fallocate(ino.0, offset, length, mode)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
