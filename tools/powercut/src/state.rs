//! The two-layer model: what processes see (volatile) and what a power cut
//! keeps (durable). No FUSE here, so every rule is testable without a mount.
//!
//! **Volatile layer** (`live`): every inode as processes see it right now.
//! Every write lands here first (write-through: the mount has no writeback
//! cache, so the kernel sends each `write` to us before it returns).
//!
//! **Durable layer** (`durable`): inodes as the "disk" holds them, indexed by
//! the same inode numbers. A file's pages and size reach it only through
//! `fsync`/`fdatasync` of that file; a directory's entries only through
//! `fsyncdir` of that directory ([`Mode::Strict`]) or any sync at all
//! ([`Mode::Journal`]). A durable inode may exist without a durable name (a
//! file whose data was synced but whose directory was not): it becomes
//! reachable when a synced directory names it. A cut keeps what is reachable
//! from the durable root, nothing else.
//!
//! Inode numbers are never reused, so "the same inode in both layers" is
//! always well defined. A live inode is freed when it has no name and no open
//! handle; a durable one when no durable directory names it and it is gone
//! from the live layer (nothing could sync or name it again).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::SystemTime;

use crate::data::{FileData, Page, PAGE};
use crate::image::{Image, ImageNode};
use crate::{Mode, Stats, Torn};

/// The root directory's inode number (FUSE's `FUSE_ROOT_ID`).
pub(crate) const ROOT: u64 = 1;

/// An errno value (`libc::E*`).
pub(crate) type Errno = i32;

/// What an inode holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    File(FileData),
    Dir(BTreeMap<OsString, u64>),
}

impl Body {
    /// An empty body of the same kind: what a cut keeps of an inode whose
    /// name was synced but whose contents never were.
    fn empty_like(&self) -> Body {
        match self {
            Body::File(_) => Body::File(FileData::default()),
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
        }
    }
}

/// Inode metadata other than size and link count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
}

impl Meta {
    pub fn new(perm: u16, uid: u32, gid: u32) -> Self {
        let now = SystemTime::now();
        Meta {
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        }
    }
}

/// An inode of the volatile layer.
#[derive(Debug)]
struct Live {
    body: Body,
    meta: Meta,
    /// Names pointing here (+1 for `.` and one per subdirectory's `..`).
    nlink: u32,
    /// The directory holding a directory (for `..`); unused for files.
    parent: u64,
    /// Open handles: an unlinked file lives on while it is open.
    open: u32,
    /// Pages written, truncated or punched since the last sync of this file.
    dirty: BTreeSet<u64>,
}

/// An inode of the durable layer.
#[derive(Debug)]
struct Durable {
    body: Body,
    meta: Meta,
    /// Durable directory entries naming it.
    refs: u32,
}

/// One change to a file's data since its last sync, as the disk would be
/// asked to store it (kept only for [`Torn::InOrder`]).
#[derive(Debug)]
struct Write {
    ino: u64,
    /// Page index → the page's contents right after this change (`None`:
    /// a hole), in offset order.
    pages: Vec<(u64, Option<Page>)>,
    /// The file's size right after this change.
    size: u64,
}

/// Attributes handed to the FUSE layer.
#[derive(Clone, Debug)]
pub(crate) struct Attr {
    pub ino: u64,
    pub is_dir: bool,
    pub size: u64,
    pub nlink: u32,
    pub meta: Meta,
}

/// A change to apply with `setattr`.
#[derive(Default)]
pub(crate) struct SetAttr {
    pub size: Option<u64>,
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// The whole filesystem: both layers, the rules that move data between
/// them, and the counters of what the kernel sent.
pub(crate) struct State {
    mode: Mode,
    /// Torn writes and their seed; `None`: a cut keeps exactly the durable layer.
    torn: Option<Torn>,
    /// Every change to file data not yet synced, in the order it was made
    /// (only with [`Torn::InOrder`]).
    writes: Vec<Write>,
    live: HashMap<u64, Live>,
    durable: HashMap<u64, Durable>,
    /// Directories whose live entries changed since they were last persisted
    /// (journal mode persists them all at any sync).
    dirty_dirs: BTreeSet<u64>,
    next_ino: u64,
    /// Set at the power cut: from then on every request fails with `EIO`.
    pub cut: bool,
    pub stats: Stats,
}

impl State {
    /// An empty filesystem whose root is owned by `uid:gid`.
    pub fn new(mode: Mode, torn: Option<Torn>, uid: u32, gid: u32) -> Self {
        let root = ImageNode {
            body: Body::Dir(BTreeMap::new()),
            meta: Meta::new(0o755, uid, gid),
        };
        let image = Image {
            nodes: BTreeMap::from([(ROOT, root)]),
        };
        Self::from_image(&image, mode, torn)
    }

    /// A filesystem whose durable and volatile layers both equal `image`.
    pub fn from_image(image: &Image, mode: Mode, torn: Option<Torn>) -> Self {
        let mut refs: HashMap<u64, u32> = HashMap::new();
        let mut parents: HashMap<u64, u64> = HashMap::from([(ROOT, ROOT)]);
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        for (&ino, node) in &image.nodes {
            if let Body::Dir(entries) = &node.body {
                for &child in entries.values() {
                    *refs.entry(child).or_default() += 1;
                    if matches!(image.nodes.get(&child).map(|n| &n.body), Some(Body::Dir(_))) {
                        parents.entry(child).or_insert(ino);
                        *subdirs.entry(ino).or_default() += 1;
                    }
                }
            }
        }
        let mut live = HashMap::new();
        let mut durable = HashMap::new();
        for (&ino, node) in &image.nodes {
            let nlink = match node.body {
                Body::Dir(_) => 2 + subdirs.get(&ino).copied().unwrap_or(0),
                Body::File(_) => refs.get(&ino).copied().unwrap_or(0),
            };
            live.insert(
                ino,
                Live {
                    body: node.body.clone(),
                    meta: node.meta.clone(),
                    nlink,
                    parent: parents.get(&ino).copied().unwrap_or(ROOT),
                    open: 0,
                    dirty: BTreeSet::new(),
                },
            );
            durable.insert(
                ino,
                Durable {
                    body: node.body.clone(),
                    meta: node.meta.clone(),
                    refs: refs.get(&ino).copied().unwrap_or(0),
                },
            );
        }
        let next_ino = image.nodes.keys().max().copied().unwrap_or(ROOT) + 1;
        State {
            mode,
            torn,
            writes: Vec::new(),
            live,
            durable,
            dirty_dirs: BTreeSet::new(),
            next_ino,
            cut: false,
            stats: Stats::default(),
        }
    }

    fn node(&self, ino: u64) -> Result<&Live, Errno> {
        self.live.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Live, Errno> {
        self.live.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.node(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.node_mut(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    /// Attributes of a live inode.
    pub fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        let (is_dir, size) = match &node.body {
            Body::File(data) => (false, data.size),
            Body::Dir(entries) => (true, entries.len() as u64),
        };
        Ok(Attr {
            ino,
            is_dir,
            size,
            nlink: node.nlink,
            meta: node.meta.clone(),
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        self.attr(ino)
    }

    /// Creates a file (`dir == false`) or directory named `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        meta: Meta,
    ) -> Result<Attr, Errno> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let (body, nlink) = if dir {
            (Body::Dir(BTreeMap::new()), 2)
        } else {
            (Body::File(FileData::default()), 1)
        };
        self.live.insert(
            ino,
            Live {
                body,
                meta,
                nlink,
                parent,
                open: 0,
                dirty: BTreeSet::new(),
            },
        );
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        let parent_node = self.node_mut(parent)?;
        if dir {
            parent_node.nlink += 1;
        }
        touch(&mut parent_node.meta);
        self.dirty_dirs.insert(parent);
        self.stats.creates += 1;
        self.attr(ino)
    }

    /// Removes the name `name` from `parent` (`dir`: rmdir semantics).
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        match (&self.node(ino)?.body, dir) {
            (Body::Dir(_), false) => return Err(libc::EISDIR),
            (Body::File(_), true) => return Err(libc::ENOTDIR),
            (Body::Dir(entries), true) if !entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.unlinked(parent, ino)?;
        self.stats.unlinks += 1;
        Ok(())
    }

    /// Bookkeeping after the name of `ino` in `parent` went away.
    fn unlinked(&mut self, parent: u64, ino: u64) -> Result<(), Errno> {
        let node = self.node_mut(ino)?;
        let is_dir = matches!(node.body, Body::Dir(_));
        if is_dir {
            node.nlink = 0;
        } else {
            node.nlink = node.nlink.saturating_sub(1);
        }
        node.meta.ctime = SystemTime::now();
        let parent_node = self.node_mut(parent)?;
        if is_dir {
            parent_node.nlink = parent_node.nlink.saturating_sub(1);
        }
        touch(&mut parent_node.meta);
        self.dirty_dirs.insert(parent);
        self.maybe_free(ino);
        Ok(())
    }

    /// `rename(2)` with `RENAME_NOREPLACE` / `RENAME_EXCHANGE`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        if new_name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let src = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        let dst = self.entries(new_parent)?.get(new_name).copied();
        let src_is_dir = matches!(self.node(src)?.body, Body::Dir(_));
        if src_is_dir && self.is_ancestor_or_self(src, new_parent) {
            return Err(libc::EINVAL);
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(libc::ENOENT)?;
            let dst_is_dir = matches!(self.node(dst)?.body, Body::Dir(_));
            if dst_is_dir && self.is_ancestor_or_self(dst, parent) {
                return Err(libc::EINVAL);
            }
            self.entries_mut(parent)?.insert(name.to_owned(), dst);
            self.entries_mut(new_parent)?
                .insert(new_name.to_owned(), src);
            if parent != new_parent {
                if src_is_dir {
                    self.reparent_dir(src, parent, new_parent)?;
                }
                if dst_is_dir {
                    self.reparent_dir(dst, new_parent, parent)?;
                }
            }
        } else {
            if let Some(dst) = dst {
                if dst == src {
                    return Ok(());
                }
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(libc::EEXIST);
                }
                match (&self.node(dst)?.body, src_is_dir) {
                    (Body::Dir(_), false) => return Err(libc::EISDIR),
                    (Body::File(_), true) => return Err(libc::ENOTDIR),
                    (Body::Dir(entries), true) if !entries.is_empty() => {
                        return Err(libc::ENOTEMPTY)
                    }
                    _ => {}
                }
                self.entries_mut(new_parent)?.remove(new_name);
                self.unlinked(new_parent, dst)?;
            }
            self.entries_mut(parent)?.remove(name);
            self.entries_mut(new_parent)?
                .insert(new_name.to_owned(), src);
            if src_is_dir && parent != new_parent {
                self.reparent_dir(src, parent, new_parent)?;
            }
        }
        for dir in [parent, new_parent] {
            touch(&mut self.node_mut(dir)?.meta);
            self.dirty_dirs.insert(dir);
        }
        self.node_mut(src)?.meta.ctime = SystemTime::now();
        self.stats.renames += 1;
        Ok(())
    }

    fn reparent_dir(&mut self, dir: u64, from: u64, to: u64) -> Result<(), Errno> {
        self.node_mut(dir)?.parent = to;
        let from = self.node_mut(from)?;
        from.nlink = from.nlink.saturating_sub(1);
        self.node_mut(to)?.nlink += 1;
        Ok(())
    }

    /// Whether `ancestor` is `dir` or one of its ancestors (live layer).
    fn is_ancestor_or_self(&self, ancestor: u64, mut dir: u64) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == ROOT {
                return false;
            }
            match self.live.get(&dir) {
                Some(node) => dir = node.parent,
                None => return false,
            }
        }
    }

    /// A hard link `new_parent/new_name` to the file `ino`.
    pub fn link(&mut self, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<Attr, Errno> {
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            return Err(libc::EPERM);
        }
        if self.entries(new_parent)?.contains_key(new_name) {
            return Err(libc::EEXIST);
        }
        self.entries_mut(new_parent)?
            .insert(new_name.to_owned(), ino);
        let node = self.node_mut(ino)?;
        node.nlink += 1;
        node.meta.ctime = SystemTime::now();
        touch(&mut self.node_mut(new_parent)?.meta);
        self.dirty_dirs.insert(new_parent);
        self.attr(ino)
    }

    pub fn open(&mut self, ino: u64) -> Result<(), Errno> {
        self.node_mut(ino)?.open += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: u64) {
        if let Some(node) = self.live.get_mut(&ino) {
            node.open = node.open.saturating_sub(1);
            self.maybe_free(ino);
        }
        self.stats.releases += 1;
    }

    pub fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        match &self.node(ino)?.body {
            Body::File(data) => Ok(data.read(offset, len)),
            Body::Dir(_) => Err(libc::EISDIR),
        }
    }

    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<u32, Errno> {
        let written = u32::try_from(bytes.len()).map_err(|_| libc::EINVAL)?;
        offset.checked_add(bytes.len() as u64).ok_or(libc::EFBIG)?;
        let node = self.node_mut(ino)?;
        let Body::File(data) = &mut node.body else {
            return Err(libc::EISDIR);
        };
        let pages = data.write(offset, bytes);
        node.dirty.extend(pages.clone());
        let now = SystemTime::now();
        node.meta.mtime = now;
        node.meta.ctime = now;
        self.record(ino, pages);
        self.stats.writes += 1;
        self.stats.bytes_written += bytes.len() as u64;
        Ok(written)
    }

    pub fn setattr(&mut self, ino: u64, change: SetAttr) -> Result<Attr, Errno> {
        let node = self.node_mut(ino)?;
        if let Some(size) = change.size {
            let Body::File(data) = &mut node.body else {
                return Err(libc::EISDIR);
            };
            let pages = data.set_len(size);
            node.dirty.extend(pages.iter().copied());
            node.meta.mtime = SystemTime::now();
            self.record(ino, pages);
            self.stats.truncates += 1;
        }
        let node = self.node_mut(ino)?;
        if let Some(perm) = change.perm {
            node.meta.perm = perm;
        }
        if let Some(uid) = change.uid {
            node.meta.uid = uid;
        }
        if let Some(gid) = change.gid {
            node.meta.gid = gid;
        }
        if let Some(atime) = change.atime {
            node.meta.atime = atime;
        }
        if let Some(mtime) = change.mtime {
            node.meta.mtime = mtime;
        }
        node.meta.ctime = SystemTime::now();
        self.attr(ino)
    }

    /// `fallocate(2)`: plain (extends the size), `KEEP_SIZE` (nothing to
    /// model), `PUNCH_HOLE | KEEP_SIZE` and `ZERO_RANGE`; others `EOPNOTSUPP`.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        let node = self.node_mut(ino)?;
        let Body::File(data) = &mut node.body else {
            return Err(libc::EISDIR);
        };
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let mut changed = Vec::new();
        if rest == libc::FALLOC_FL_PUNCH_HOLE {
            if !keep_size {
                return Err(libc::EINVAL);
            }
            changed = data.zero(offset, len);
        } else if rest == libc::FALLOC_FL_ZERO_RANGE {
            changed = data.zero(offset, len);
        } else if rest != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        if !keep_size && end > data.size {
            changed.extend(data.set_len(end));
        }
        node.dirty.extend(changed.iter().copied());
        self.record(ino, changed);
        self.stats.fallocates += 1;
        Ok(())
    }

    /// Remembers a change to `pages` of file `ino` (as they are now) for
    /// in-order torn writes.
    fn record(&mut self, ino: u64, pages: impl IntoIterator<Item = u64>) {
        if !matches!(self.torn, Some(Torn::InOrder(_))) {
            return;
        }
        let Some(Live {
            body: Body::File(data),
            ..
        }) = self.live.get(&ino)
        else {
            return;
        };
        let mut pages: Vec<(u64, Option<Page>)> = pages
            .into_iter()
            .map(|index| (index, data.pages.get(&index).cloned()))
            .collect();
        pages.sort_by_key(|(index, _)| *index);
        pages.dedup_by_key(|(index, _)| *index);
        self.writes.push(Write {
            ino,
            pages,
            size: data.size,
        });
    }

    /// `fsync` (`datasync == false`) or `fdatasync` of a file: its pages and
    /// size become durable (with `fsync` also its other metadata). In journal
    /// mode every earlier name change goes with it.
    pub fn fsync(&mut self, ino: u64, datasync: bool) -> Result<(), Errno> {
        if datasync {
            self.stats.fdatasyncs += 1;
        } else {
            self.stats.fsyncs += 1;
        }
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            self.persist_dir(ino);
        } else if let Some(live) = self.live.get_mut(&ino) {
            let durable = self.durable.entry(ino).or_insert_with(|| Durable {
                body: Body::File(FileData::default()),
                meta: live.meta.clone(),
                refs: 0,
            });
            if let (Body::File(target), Body::File(data)) = (&mut durable.body, &live.body) {
                for &page in &live.dirty {
                    target.copy_page_from(data, page);
                }
                target.size = data.size;
            }
            if !datasync {
                durable.meta = live.meta.clone();
            }
            live.dirty.clear();
            self.writes.retain(|w| w.ino != ino);
        }
        if self.mode == Mode::Journal {
            self.persist_all_dirs();
        }
        Ok(())
    }

    /// `fsync` of a directory: its entries become durable (in journal mode
    /// every directory's).
    pub fn fsyncdir(&mut self, ino: u64) -> Result<(), Errno> {
        self.stats.fsyncdirs += 1;
        self.entries(ino)?;
        self.persist_dir(ino);
        if self.mode == Mode::Journal {
            self.persist_all_dirs();
        }
        Ok(())
    }

    fn persist_all_dirs(&mut self) {
        for dir in std::mem::take(&mut self.dirty_dirs) {
            self.persist_dir(dir);
        }
    }

    /// Copies the live entries of `dir` to the durable layer. Inodes named
    /// there for the first time become durable with empty contents (their
    /// data was never synced) unless a sync already put them there.
    fn persist_dir(&mut self, dir: u64) {
        self.dirty_dirs.remove(&dir);
        let Some(Live {
            body: Body::Dir(entries),
            meta,
            ..
        }) = self.live.get(&dir)
        else {
            return;
        };
        let entries = entries.clone();
        let meta = meta.clone();
        for &child in entries.values() {
            if !self.durable.contains_key(&child) {
                if let Some(node) = self.live.get(&child) {
                    self.durable.insert(
                        child,
                        Durable {
                            body: node.body.empty_like(),
                            meta: node.meta.clone(),
                            refs: 0,
                        },
                    );
                }
            }
        }
        for &child in entries.values() {
            if let Some(node) = self.durable.get_mut(&child) {
                node.refs += 1;
            }
        }
        let node = self.durable.entry(dir).or_insert_with(|| Durable {
            body: Body::Dir(BTreeMap::new()),
            meta: meta.clone(),
            refs: 0,
        });
        node.meta = meta;
        let old = std::mem::replace(&mut node.body, Body::Dir(entries));
        let mut orphans = Vec::new();
        if let Body::Dir(old) = old {
            for child in old.into_values() {
                if let Some(node) = self.durable.get_mut(&child) {
                    node.refs = node.refs.saturating_sub(1);
                    if node.refs == 0 {
                        orphans.push(child);
                    }
                }
            }
        }
        self.collect_durable(orphans);
    }

    /// Frees a live inode with no name and no open handle.
    fn maybe_free(&mut self, ino: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.live.get(&ino) {
            if node.nlink == 0 && node.open == 0 {
                self.live.remove(&ino);
                self.dirty_dirs.remove(&ino);
                self.collect_durable(vec![ino]);
            }
        }
    }

    /// Drops durable inodes that no durable directory names and that are
    /// gone from the live layer, and what only they named.
    fn collect_durable(&mut self, mut candidates: Vec<u64>) {
        while let Some(ino) = candidates.pop() {
            if ino == ROOT || self.live.contains_key(&ino) {
                continue;
            }
            if self.durable.get(&ino).is_some_and(|n| n.refs == 0) {
                if let Some(Durable {
                    body: Body::Dir(entries),
                    ..
                }) = self.durable.remove(&ino)
                {
                    for child in entries.into_values() {
                        if let Some(node) = self.durable.get_mut(&child) {
                            node.refs = node.refs.saturating_sub(1);
                            if node.refs == 0 {
                                candidates.push(child);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Entries of a live directory with `.` and `..`, as (ino, is_dir, name).
    pub fn readdir(&self, dir: u64) -> Result<Vec<(u64, bool, OsString)>, Errno> {
        let node = self.node(dir)?;
        let Body::Dir(entries) = &node.body else {
            return Err(libc::ENOTDIR);
        };
        let mut out = vec![
            (dir, true, OsString::from(".")),
            (node.parent, true, OsString::from("..")),
        ];
        for (name, &ino) in entries {
            let is_dir = matches!(self.live.get(&ino).map(|n| &n.body), Some(Body::Dir(_)));
            out.push((ino, is_dir, name.clone()));
        }
        Ok(out)
    }

    /// (inodes in use, bytes in pages) of the live layer, for `statfs`.
    pub fn usage(&self) -> (u64, u64) {
        let bytes = self
            .live
            .values()
            .map(|n| match &n.body {
                Body::File(data) => data.allocated(),
                Body::Dir(_) => 0,
            })
            .sum();
        (self.live.len() as u64, bytes)
    }

    /// What a power cut now would keep, with torn writes if `tear` and a seed
    /// were given.
    pub fn durable_image(&self, tear: bool) -> Image {
        let mut nodes = BTreeMap::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if nodes.contains_key(&ino) {
                continue;
            }
            let Some(node) = self.durable.get(&ino) else {
                continue;
            };
            if let Body::Dir(entries) = &node.body {
                stack.extend(entries.values().copied());
            }
            nodes.insert(
                ino,
                ImageNode {
                    body: node.body.clone(),
                    meta: node.meta.clone(),
                },
            );
        }
        // A name whose inode was never made durable cannot happen (naming
        // makes it durable), but keep the image self-consistent regardless.
        let present: BTreeSet<u64> = nodes.keys().copied().collect();
        for node in nodes.values_mut() {
            if let Body::Dir(entries) = &mut node.body {
                entries.retain(|_, child| present.contains(child));
            }
        }
        match (tear, self.torn) {
            (true, Some(Torn::InOrder(seed))) => {
                tear_in_order(&mut nodes, &self.writes, &mut SplitMix64(seed));
            }
            (true, Some(Torn::ByOffset(seed))) => {
                let mut rng = SplitMix64(seed);
                for (ino, node) in nodes.iter_mut() {
                    let (Body::File(kept), Some(live)) = (&mut node.body, self.live.get(ino))
                    else {
                        continue;
                    };
                    if let Body::File(current) = &live.body {
                        tear_file(kept, current, &live.dirty, &mut rng);
                    }
                }
            }
            _ => {}
        }
        Image { nodes }
    }
}

/// Updates a directory's mtime and ctime after a change of its entries.
fn touch(meta: &mut Meta) {
    let now = SystemTime::now();
    meta.mtime = now;
    meta.ctime = now;
}

/// In-order torn writes: the disk stored the unsynced changes (of every
/// file, in the order they were made) up to a random one, which is torn: a
/// random number of its pages, in offset order, made it. `writes` are
/// applied to the durable `nodes` they name (files no durable name reaches
/// are not in `nodes` and stay lost).
///
/// A change that grew the file and is torn grows it up to its first page
/// that did not make it; a torn change that shrank it leaves the size as it
/// was.
fn tear_in_order(nodes: &mut BTreeMap<u64, ImageNode>, writes: &[Write], rng: &mut SplitMix64) {
    let kept = rng.below(writes.len() as u64 + 1) as usize;
    let mut touched = BTreeSet::new();
    for (i, write) in writes.iter().enumerate().take(kept + 1) {
        let Some(ImageNode {
            body: Body::File(data),
            ..
        }) = nodes.get_mut(&write.ino)
        else {
            continue;
        };
        let applied = if i < kept {
            write.pages.len()
        } else {
            rng.below(write.pages.len() as u64 + 1) as usize
        };
        for (index, page) in &write.pages[..applied] {
            match page {
                Some(page) => {
                    data.pages.insert(*index, Arc::clone(page));
                }
                None => {
                    data.pages.remove(index);
                }
            }
        }
        data.size = match write.pages.get(applied) {
            None => write.size,
            Some(&(missing, _)) if write.size > data.size => {
                data.size.max(write.size.min(missing * PAGE))
            }
            Some(_) => data.size,
        };
        touched.insert(write.ino);
    }
    for ino in touched {
        if let Some(ImageNode {
            body: Body::File(data),
            ..
        }) = nodes.get_mut(&ino)
        {
            data.clip();
        }
    }
}

/// Torn writes by offset (a drive that reorders): of the unsynced changes
/// of one file, a 4 KiB-aligned prefix (in file order) reaches the disk. `kept` is the durable data,
/// `current` the volatile one, `dirty` the pages that differ. A cut offset
/// `c` is drawn among the page boundaries from the first change to the end;
/// the file keeps the volatile bytes before `c` and the durable ones from
/// `c` on, and its size follows the prefix: the volatile size once `c` passed
/// it, else the larger of `c` and the durable size.
fn tear_file(kept: &mut FileData, current: &FileData, dirty: &BTreeSet<u64>, rng: &mut SplitMix64) {
    let size_changed = kept.size != current.size;
    let Some(first) = dirty
        .first()
        .copied()
        .into_iter()
        .chain(size_changed.then(|| kept.size.min(current.size) / PAGE))
        .min()
    else {
        return;
    };
    let last = kept.size.max(current.size).div_ceil(PAGE).max(first);
    let pages = rng.below(last - first + 1) + first;
    let cut = pages * PAGE;
    for &page in dirty.range(..pages) {
        kept.copy_page_from(current, page);
    }
    kept.size = if cut >= current.size {
        current.size
    } else {
        cut.max(kept.size)
    };
    kept.clip();
}

/// A tiny deterministic RNG (SplitMix64): the same seed tears the same way
/// on every platform and every version of this crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}
