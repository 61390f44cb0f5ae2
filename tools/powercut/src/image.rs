//! [`Image`]: what survived a power cut, to inspect in asserts and to mount
//! again as the next boot's disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::data::FileData;
use crate::mount::Mount;
use crate::state::{Body, Meta, ROOT};
use crate::{Error, Mode, PowerCutFs, Torn};

/// The durable contents of a filesystem at a power cut: only what was
/// reachable from the root through synced directory entries, with the data
/// that was synced (plus a torn prefix of the rest, with torn writes on).
///
/// Paths given to its methods are relative to the filesystem root (a leading
/// `/` is ignored). An inode named in several directories (a hard link, or
/// a rename synced only on its new side) shows under each name.
#[derive(Clone)]
pub struct Image {
    /// Inode number → inode; `ROOT` is the root directory.
    pub(crate) nodes: BTreeMap<u64, ImageNode>,
}

/// One inode of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ImageNode {
    pub body: Body,
    pub meta: Meta,
}

/// What a path names in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file of this many bytes.
    File(u64),
    /// A directory.
    Dir,
}

impl Image {
    fn resolve(&self, path: &Path) -> Option<&ImageNode> {
        let mut ino = ROOT;
        for component in path.components() {
            match component {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => match &self.nodes.get(&ino)?.body {
                    Body::Dir(entries) => ino = *entries.get(name)?,
                    Body::File(_) => return None,
                },
                Component::ParentDir | Component::Prefix(_) => return None,
            }
        }
        self.nodes.get(&ino)
    }

    /// The contents of the file at `path`, if there is one.
    pub fn read(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        match &self.resolve(path.as_ref())?.body {
            Body::File(data) => Some(data.to_vec()),
            Body::Dir(_) => None,
        }
    }

    /// The names in the directory at `path`, sorted, if there is one.
    pub fn list(&self, path: impl AsRef<Path>) -> Option<Vec<String>> {
        match &self.resolve(path.as_ref())?.body {
            Body::Dir(entries) => Some(
                entries
                    .keys()
                    .map(|name| name.to_string_lossy().into_owned())
                    .collect(),
            ),
            Body::File(_) => None,
        }
    }

    /// What `path` names, if anything.
    pub fn kind(&self, path: impl AsRef<Path>) -> Option<EntryKind> {
        Some(match &self.resolve(path.as_ref())?.body {
            Body::File(data) => EntryKind::File(data.size),
            Body::Dir(_) => EntryKind::Dir,
        })
    }

    /// Whether `path` names a file or directory.
    pub fn exists(&self, path: impl AsRef<Path>) -> bool {
        self.resolve(path.as_ref()).is_some()
    }

    /// Every path below the root (depth first, sorted by name) with its kind.
    pub fn walk(&self) -> Vec<(PathBuf, EntryKind)> {
        let mut out = Vec::new();
        let mut on_path = BTreeSet::from([ROOT]);
        self.walk_from(ROOT, PathBuf::new(), &mut on_path, &mut out);
        out
    }

    fn walk_from(
        &self,
        dir: u64,
        prefix: PathBuf,
        on_path: &mut BTreeSet<u64>,
        out: &mut Vec<(PathBuf, EntryKind)>,
    ) {
        let Some(ImageNode {
            body: Body::Dir(entries),
            ..
        }) = self.nodes.get(&dir)
        else {
            return;
        };
        for (name, &ino) in entries {
            let Some(node) = self.nodes.get(&ino) else {
                continue;
            };
            let path = prefix.join(name);
            match &node.body {
                Body::File(data) => out.push((path, EntryKind::File(data.size))),
                Body::Dir(_) => {
                    out.push((path.clone(), EntryKind::Dir));
                    // A rename synced on one side only can make a durable
                    // directory its own ancestor: show it, don't recurse.
                    if on_path.insert(ino) {
                        self.walk_from(ino, path, on_path, out);
                        on_path.remove(&ino);
                    }
                }
            }
        }
    }

    /// Writes the image as real files under `dir` (created if missing), e.g.
    /// to open a surviving data dir with other tools.
    pub fn write_to(&self, dir: impl AsRef<Path>) -> io::Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        for (path, kind) in self.walk() {
            let target = dir.join(&path);
            match kind {
                EntryKind::Dir => std::fs::create_dir_all(&target)?,
                EntryKind::File(_) => {
                    let bytes = self.read(&path).unwrap_or_default();
                    std::fs::write(&target, bytes)?;
                }
            }
        }
        Ok(())
    }

    /// Mounts this image as the durable (and current) state of a new power-cut
    /// filesystem: the next boot after a cut.
    pub fn mount(
        &self,
        mode: Mode,
        torn: Option<Torn>,
        mountpoint: impl AsRef<Path>,
    ) -> Result<Mount, Error> {
        PowerCutFs::from_image(self, mode, torn).mount(mountpoint)
    }

    /// Bytes in all files (each inode once).
    pub fn total_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|node| match &node.body {
                Body::File(FileData { size, .. }) => *size,
                Body::Dir(_) => 0,
            })
            .sum()
    }

    /// An image with only an empty root directory.
    pub fn empty() -> Self {
        crate::state::State::new(Mode::Strict, None, 0, 0).durable_image(false)
    }
}

/// Equal when the same names hold the same bytes (inode numbers and times
/// aside): two cuts of the same history compare equal.
impl PartialEq for Image {
    fn eq(&self, other: &Self) -> bool {
        let (mine, theirs) = (self.walk(), other.walk());
        mine == theirs
            && mine
                .iter()
                .all(|(path, _)| self.read(path) == other.read(path))
    }
}

impl Eq for Image {}

/// The listing of [`Display`](fmt::Display) (not megabytes of page dumps).
impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Image {{\n{self}}}")
    }
}

/// One line per path: `path/` for directories, `path  N bytes` for files.
impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.walk();
        if entries.is_empty() {
            return writeln!(f, "(empty)");
        }
        for (path, kind) in entries {
            match kind {
                EntryKind::Dir => writeln!(f, "{}/", path.display())?,
                EntryKind::File(size) => writeln!(f, "{}  {size} bytes", path.display())?,
            }
        }
        Ok(())
    }
}
