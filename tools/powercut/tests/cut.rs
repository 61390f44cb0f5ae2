//! What a power cut keeps and drops, through a real FUSE mount and real
//! syscalls (`std::fs`, `fsync`, `fdatasync`, `sync_file_range`, `flock`,
//! `fallocate`), as a database on the mount would issue them.
//!
//! Most tests first make something durable and then check both halves: the
//! synced part survived, the unsynced part did not. So each fails if syncing
//! did nothing, and each fails if something else (close, `sync_file_range`, a
//! file's fsync for its name) made data durable too.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use powercut::{EntryKind, Image, Mode, Mount, PowerCutFs, Torn, PAGE};
use tempfile::TempDir;

/// A fresh mount on a temp dir. Keep the `TempDir` alive longer than the
/// mount (declare it first).
fn mounted(mode: Mode, torn: Option<Torn>) -> (TempDir, Mount) {
    let dir = TempDir::new().expect("temp dir");
    let mount = PowerCutFs::new(mode, torn)
        .mount(dir.path())
        .expect("mount (needs /dev/fuse and root or fusermount3)");
    (dir, mount)
}

fn fsync_dir(path: &Path) {
    File::open(path)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
}

/// Creates `path` with `bytes`, syncs its data and its name: durable.
fn durable_file(path: &Path, bytes: &[u8]) {
    let mut file = File::create(path).expect("create");
    file.write_all(bytes).expect("write");
    file.sync_all().expect("fsync");
    fsync_dir(path.parent().expect("parent"));
}

#[test]
fn written_but_unsynced_data_is_dropped_synced_data_kept() {
    let (dir, mount) = mounted(Mode::Strict, None);
    let root = dir.path();
    durable_file(&root.join("f"), b"version one");
    let file = OpenOptions::new()
        .write(true)
        .open(root.join("f"))
        .expect("open");
    file.write_all_at(b"VERSION TWO, longer", 0).expect("write");
    drop(file); // close: FLUSH + RELEASE, which make nothing durable
    assert_eq!(
        std::fs::read(root.join("f")).expect("read"),
        b"VERSION TWO, longer",
        "processes see the volatile layer"
    );
    let stats = mount.stats().expect("stats");
    assert!(stats.flushes >= 1, "close sent FLUSH: {stats:?}");
    let image = mount.power_cut().expect("cut");
    assert_eq!(image.read("f").as_deref(), Some(&b"version one"[..]));
}

#[test]
fn fdatasync_makes_data_and_a_grown_size_durable() {
    let (dir, mount) = mounted(Mode::Strict, None);
    let root = dir.path();
    durable_file(&root.join("log"), b"");
    let file = OpenOptions::new()
        .write(true)
        .open(root.join("log"))
        .expect("open");
    file.write_all_at(&[1u8; 10_000], 0).expect("write");
    file.sync_data().expect("fdatasync");
    file.write_all_at(&[2u8; 5_000], 10_000)
        .expect("write after the sync");
    let stats = mount.stats().expect("stats");
    assert_eq!(
        stats.fdatasyncs, 1,
        "fdatasync is FSYNC(datasync): {stats:?}"
    );
    let image = mount.power_cut().expect("cut");
    assert_eq!(image.read("log"), Some(vec![1u8; 10_000]));
}

/// sled 0.34 "flushes" with `sync_file_range(WAIT_BEFORE | WRITE |
/// WAIT_AFTER)`: on this mount (write-through, no dirty pages) the kernel
/// sends nothing for it, and nothing becomes durable.
#[test]
fn sync_file_range_and_close_make_nothing_durable() {
    let (dir, mount) = mounted(Mode::Journal, None);
    let root = dir.path();
    durable_file(&root.join("db"), &[0u8; 8192]);
    let before = mount.stats().expect("stats");
    let file = OpenOptions::new()
        .write(true)
        .open(root.join("db"))
        .expect("open");
    file.write_all_at(&[9u8; 4096], 4096).expect("write");
    sync_file_range(&file, 0, 8192);
    drop(file);
    let after = mount.stats().expect("stats");
    assert_eq!(
        (after.fsyncs, after.fdatasyncs, after.fsyncdirs),
        (before.fsyncs, before.fdatasyncs, before.fsyncdirs),
        "sync_file_range sent no sync request"
    );
    let image = mount.power_cut().expect("cut");
    assert_eq!(image.read("db"), Some(vec![0u8; 8192]));
}

#[allow(unsafe_code)]
fn sync_file_range(file: &File, offset: i64, len: i64) {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    let ret = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    assert_eq!(
        ret,
        0,
        "sync_file_range: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn a_new_file_with_synced_data_vanishes_in_strict_mode_unless_its_dir_is_synced() {
    let (dir, mount) = mounted(Mode::Strict, None);
    let root = dir.path();
    durable_file(&root.join("named"), b"data and name synced");
    durable_file(&root.join("other"), b"o");
    std::fs::remove_file(root.join("other")).expect("unlink, never synced");
    let mut file = File::create(root.join("new")).expect("create");
    file.write_all(b"data").expect("write");
    file.sync_all().expect("fsync the file, not its directory");
    let image = mount.power_cut().expect("cut");
    assert_eq!(
        image.read("named").as_deref(),
        Some(&b"data and name synced"[..])
    );
    assert_eq!(
        image.read("other").as_deref(),
        Some(&b"o"[..]),
        "unlink unsynced"
    );
    assert!(
        !image.exists("new"),
        "created after the last fsync of its directory: gone though its data was synced\n{image}"
    );
}

#[test]
fn in_journal_mode_any_later_fsync_persists_earlier_names() {
    let (dir, mount) = mounted(Mode::Journal, None);
    let root = dir.path();
    std::fs::create_dir(root.join("d")).expect("mkdir");
    let mut synced = File::create(root.join("d/synced")).expect("create");
    synced.write_all(b"data").expect("write");
    synced
        .sync_all()
        .expect("fsync: the journal commits d and d/synced too");
    let mut unsynced = File::create(root.join("d/empty")).expect("create");
    unsynced.write_all(b"lost").expect("write");
    std::fs::rename(root.join("d/empty"), root.join("d/renamed")).expect("rename");
    // Any fsync, of an unrelated file: commits the create and the rename,
    // not the data of d/renamed.
    durable_file(&root.join("x"), b"x");
    File::create(root.join("after")).expect("a name created after the last sync");
    let image = mount.power_cut().expect("cut");
    assert_eq!(image.read("d/synced").as_deref(), Some(&b"data"[..]));
    assert!(!image.exists("d/empty"));
    assert_eq!(
        image.read("d/renamed").as_deref(),
        Some(&b""[..]),
        "name durable, data not"
    );
    assert!(!image.exists("after"));
}

#[test]
fn in_strict_mode_a_new_dir_needs_its_parent_synced() {
    // The gateway's case: a data dir created under a directory nobody syncs.
    for (mode, survives) in [(Mode::Strict, false), (Mode::Journal, true)] {
        let (dir, mount) = mounted(mode, None);
        let root = dir.path();
        durable_file(&root.join("control"), b"c");
        std::fs::create_dir(root.join("data")).expect("mkdir");
        durable_file(&root.join("data/db"), b"events");
        let image = mount.power_cut().expect("cut");
        assert_eq!(image.read("control").as_deref(), Some(&b"c"[..]), "{mode}");
        assert_eq!(image.exists("data/db"), survives, "{mode}:\n{image}");
    }
}

#[test]
fn rename_over_a_file_reverts_without_a_dir_fsync_in_strict_mode() {
    for sync_dir_after in [false, true] {
        let (dir, mount) = mounted(Mode::Strict, None);
        let root = dir.path();
        durable_file(&root.join("conf"), b"old");
        let mut tmp = File::create(root.join("conf.tmp")).expect("create");
        tmp.write_all(b"new").expect("write");
        tmp.sync_all().expect("fsync");
        std::fs::rename(root.join("conf.tmp"), root.join("conf")).expect("rename");
        assert_eq!(std::fs::read(root.join("conf")).expect("read"), b"new");
        if sync_dir_after {
            fsync_dir(root);
        }
        let image = mount.power_cut().expect("cut");
        let expected: &[u8] = if sync_dir_after { b"new" } else { b"old" };
        assert_eq!(image.read("conf").as_deref(), Some(expected));
        assert!(!image.exists("conf.tmp"), "{image}");
    }
}

#[test]
fn unlink_reverts_without_a_dir_fsync() {
    for sync_dir_after in [false, true] {
        let (dir, mount) = mounted(Mode::Strict, None);
        let root = dir.path();
        std::fs::create_dir(root.join("blobs")).expect("mkdir");
        fsync_dir(root);
        durable_file(&root.join("blobs/1"), b"blob one");
        std::fs::remove_file(root.join("blobs/1")).expect("unlink");
        std::fs::remove_dir(root.join("blobs")).expect("rmdir");
        if sync_dir_after {
            fsync_dir(root);
        }
        let image = mount.power_cut().expect("cut");
        if sync_dir_after {
            assert!(!image.exists("blobs"), "{image}");
        } else {
            assert_eq!(image.read("blobs/1").as_deref(), Some(&b"blob one"[..]));
        }
    }
}

#[test]
fn truncation_is_durable_only_after_fsync() {
    for sync in [false, true] {
        let (dir, mount) = mounted(Mode::Strict, None);
        let root = dir.path();
        durable_file(&root.join("f"), &[5u8; 10_000]);
        let file = OpenOptions::new()
            .write(true)
            .open(root.join("f"))
            .expect("open");
        file.set_len(100).expect("truncate");
        file.set_len(6000)
            .expect("extend again: zeros, not old bytes");
        if sync {
            file.sync_all().expect("fsync");
        }
        let mut expected = vec![5u8; 10_000];
        if sync {
            expected = [vec![5u8; 100], vec![0u8; 5900]].concat();
        }
        assert_eq!(
            std::fs::read(root.join("f")).expect("read"),
            [vec![5u8; 100], vec![0u8; 5900]].concat()
        );
        let stats = mount.stats().expect("stats");
        assert!(stats.truncates >= 2, "{stats:?}");
        let image = mount.power_cut().expect("cut");
        assert_eq!(image.read("f"), Some(expected), "synced: {sync}");
    }
}

#[test]
fn fallocate_grows_the_file_durably_only_after_fsync() {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (dir, mount) = mounted(Mode::Strict, None);
    let root = dir.path();
    durable_file(&root.join("a"), b"a");
    durable_file(&root.join("b"), b"b");
    for (name, sync) in [("a", true), ("b", false)] {
        let file = OpenOptions::new()
            .write(true)
            .open(root.join(name))
            .expect("open");
        fallocate(&file, FallocateFlags::empty(), 0, 3 * PAGE as i64).expect("fallocate");
        assert_eq!(file.metadata().expect("stat").len(), 3 * PAGE);
        if sync {
            file.sync_all().expect("fsync");
        }
    }
    assert_eq!(mount.stats().expect("stats").fallocates, 2);
    let image = mount.power_cut().expect("cut");
    assert_eq!(image.kind("a"), Some(EntryKind::File(3 * PAGE)));
    assert_eq!(image.read("b").as_deref(), Some(&b"b"[..]));
}

/// What [`Torn::ByOffset`] must produce for a cut offset `cut`.
fn torn_by_offset(durable: &[u8], live: &[u8], cut: usize) -> Vec<u8> {
    let size = if cut >= live.len() {
        live.len()
    } else {
        cut.max(durable.len())
    };
    (0..size)
        .map(|i| {
            if i < cut {
                live[i]
            } else {
                durable.get(i).copied().unwrap_or(0)
            }
        })
        .collect()
}

/// Two durable pages of `a`; then, unsynced, ten pages and 100 bytes of `b`
/// appended, and *after that* page 0 overwritten with `c`. Returns
/// (durable, volatile, image).
fn torn_scenario(torn: Option<Torn>) -> (Vec<u8>, Vec<u8>, Image) {
    let (dir, mount) = mounted(Mode::Strict, torn);
    let root = dir.path();
    let page = PAGE as usize;
    let durable = vec![b'a'; 2 * page];
    durable_file(&root.join("log"), &durable);
    durable_file(&root.join("quiet"), b"untouched");
    let file = OpenOptions::new()
        .write(true)
        .open(root.join("log"))
        .expect("open");
    file.write_all_at(&vec![b'b'; 10 * page + 100], 2 * page as u64)
        .expect("append");
    file.write_all_at(&vec![b'c'; page], 0).expect("overwrite");
    drop(file);
    let live = std::fs::read(root.join("log")).expect("read");
    let image = mount.power_cut().expect("cut");
    assert_eq!(image.read("quiet").as_deref(), Some(&b"untouched"[..]));
    (durable, live, image)
}

#[test]
fn no_seed_no_tearing() {
    let (durable, _, image) = torn_scenario(None);
    assert_eq!(image.read("log"), Some(durable));
}

/// In order: the append survives in part (whole pages, the size following
/// them) or whole, and the later overwrite of page 0 only with all of it.
#[test]
fn torn_in_order_keeps_the_writes_before_a_point_and_part_of_the_one_in_flight() {
    let page = PAGE as usize;
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let (durable, live, image) = torn_scenario(Some(Torn::InOrder(seed)));
        let kept = image.read("log").expect("log survives");
        let appended = (0..=11)
            .map(|pages| {
                let mut bytes = durable.clone();
                bytes.resize(2 * page + (pages * page).min(10 * page + 100), b'b');
                bytes
            })
            .position(|state| state == kept);
        let outcome = match appended {
            Some(pages) => pages,
            None if kept == live => 12,
            None => panic!(
                "seed {seed}: {} bytes kept, starting {:?}: not a prefix in time \
                 of the writes",
                kept.len(),
                &kept[..8]
            ),
        };
        outcomes.insert(outcome);
        let (_, _, again) = torn_scenario(Some(Torn::InOrder(seed)));
        assert_eq!(again, image, "seed {seed} tears the same way every time");
    }
    assert!(
        outcomes.len() >= 3,
        "the seeds tear at different places: {outcomes:?}"
    );
}

/// By offset: a prefix of the file's changed pages, whenever written: the
/// overwrite of page 0 can survive without the earlier append.
#[test]
fn torn_by_offset_keeps_a_4k_aligned_prefix_of_the_unsynced_changes() {
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let (durable, live, image) = torn_scenario(Some(Torn::ByOffset(seed)));
        let kept = image.read("log").expect("log survives");
        let cut = (0..=live.len().div_ceil(PAGE as usize))
            .map(|pages| pages * PAGE as usize)
            .find(|&cut| torn_by_offset(&durable, &live, cut) == kept);
        let cut = cut.unwrap_or_else(|| {
            panic!(
                "seed {seed}: {} bytes kept are no aligned prefix of the changes",
                kept.len()
            )
        });
        outcomes.insert(cut);
        let (_, _, again) = torn_scenario(Some(Torn::ByOffset(seed)));
        assert_eq!(again, image, "seed {seed} tears the same way every time");
    }
    assert!(
        outcomes.len() >= 3,
        "the seeds tear at different places: {outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|&cut| cut > 0 && cut <= 2 * PAGE as usize),
        "some seed keeps the later overwrite without the earlier append: {outcomes:?}"
    );
}

#[test]
fn the_image_mounts_again_as_the_next_boot() {
    let (dir, mount) = mounted(Mode::Strict, None);
    let root = dir.path();
    std::fs::create_dir(root.join("data")).expect("mkdir");
    fsync_dir(root);
    durable_file(&root.join("data/db"), b"first boot");
    std::fs::write(root.join("data/lost"), b"lost").expect("write");
    let image = mount.power_cut().expect("cut");

    let mount = image
        .mount(Mode::Strict, None, root)
        .expect("mount the image");
    assert_eq!(
        std::fs::read(root.join("data/db")).expect("read"),
        b"first boot"
    );
    assert!(!root.join("data/lost").exists());
    let mut names: Vec<_> = std::fs::read_dir(root.join("data"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["db"]);
    let file = OpenOptions::new()
        .append(true)
        .open(root.join("data/db"))
        .expect("open");
    (&file).write_all(b", second").expect("append");
    file.sync_data().expect("fdatasync");
    std::fs::remove_file(root.join("data/db")).expect("unlink, never synced");
    let image = mount.power_cut().expect("second cut");
    assert_eq!(
        image.read("data/db").as_deref(),
        Some(&b"first boot, second"[..])
    );
}

/// sled locks its `db` file with `flock(LOCK_EX | LOCK_NB)` (fs2) so that a
/// second process can't open the same database. The mount asks for no lock
/// capability, so the kernel enforces locks locally as on ext4.
#[test]
fn an_exclusive_flock_refuses_a_second_opener() {
    use nix::fcntl::{Flock, FlockArg};
    let (dir, _mount) = mounted(Mode::Strict, None);
    let path = dir.path().join("db");
    File::create(&path).expect("create");
    let first = Flock::lock(
        File::open(&path).expect("open"),
        FlockArg::LockExclusiveNonblock,
    )
    .expect("first lock");
    let second = Flock::lock(
        File::open(&path).expect("open"),
        FlockArg::LockExclusiveNonblock,
    );
    match second {
        Err((_, errno)) => assert_eq!(errno, nix::errno::Errno::EWOULDBLOCK),
        Ok(_) => panic!("a second exclusive flock was granted"),
    }
    drop(first);
    Flock::lock(
        File::open(&path).expect("open"),
        FlockArg::LockExclusiveNonblock,
    )
    .expect("free again after the first closed");
}

#[test]
fn after_the_cut_nothing_more_becomes_durable() {
    let (dir, mount) = mounted(Mode::Journal, None);
    let root = dir.path();
    durable_file(&root.join("f"), b"before");
    let snapshot = mount.snapshot().expect("snapshot");
    assert_eq!(snapshot.read("f").as_deref(), Some(&b"before"[..]));
    let image = mount.power_cut().expect("cut");
    assert_eq!(
        image, snapshot,
        "no torn writes: the cut keeps the snapshot"
    );
    assert!(
        std::fs::read(root.join("f")).is_err() || !root.join("f").exists(),
        "the mount is gone"
    );
}
