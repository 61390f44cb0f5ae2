//! Keeps, before sled opens a data directory, the bytes its recovery may
//! rewrite, so that a refused start (`mark.rs`) loses nothing for good.
//!
//! What sled 0.34.7 rewrites at open (`pagecache/snapshot.rs`
//! `read_snapshot_or_default` → `advance_snapshot`, `iterator.rs`,
//! `segment.rs`): it reads the newest `snap.<stable lsn, 16 hex>` file
//! (written only by a previous open: `snapshot_after_ops` is a no-op in
//! 0.34.7, so the stable LSN is where the log ended at the last start), reads
//! the 20-byte header of every 512 KiB segment of `db` and replays, in LSN
//! order, the segments whose header is valid and whose LSN is at or past the
//! segment of the stable LSN, stopping at the first unreadable message. Then
//! it (1) fills the rest of the segment holding that point with zero bytes,
//! (2) zeroes every later segment of the replayed set whole, (3) writes a new
//! `snap.*` file and removes the older ones, (4) deletes `blobs/<lsn>` past
//! the stable LSN, (5) zeroes whole every segment holding no page live in the
//! recovered state (`segment.rs` `initialize_from_snapshot`), and (6)
//! truncates such segments at the end of the file. Segments before the
//! stable LSN's are otherwise only read, lazily. A segment (5) frees holds
//! only versions superseded by what precedes the damage — nothing a recovery
//! past the damage needs, and sled zeroes those at every start — so they are
//! not kept (finding them would need sled's page table; keeping them, every
//! segment). (Damage in the replayed part can also make sled 0.34 panic while
//! writing its snapshot, after (1): the copy is kept then too.) So the bytes
//! at risk are those of the segments written since the last start (valid
//! header, LSN ≥ the stable LSN's segment), of segments whose header no
//! longer reads (damage there turns them free, so truncated or reused),
//! the partial segment at the end of the file, `snap.*`, `conf` and `blobs/`.
//!
//! [`before_open`] copies exactly those into `<dir>.pre-open/` (the ranges,
//! written at their offsets into a sparse `db` of the original length, with
//! a `ranges` list; shared blocks where the filesystem can, see [`copy_range`]),
//! fsynced and renamed into place only once complete. After an open that the
//! mark accepted, [`PreOpen::discard`] deletes it; on a refusal it stays, and
//! `repair` puts it back into the copy it saves ([`restore_into`]). A
//! `<dir>.pre-open` already there (an earlier refused start) is kept as it
//! is: it holds the bytes from before the first recovery, a new copy would not.
//!
//! The cost is one read and write of what was written since the last start
//! (BENCHMARKS.md "Start: keeping what sled's recovery may rewrite"), and
//! as much free space. Failing to preserve (no room for it and
//! [`SPARE_BYTES`] more, an I/O error) is logged and does not stop the
//! start: the mark still refuses a damaged log.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// sled 0.34.7's segment size unless `conf` says otherwise.
const DEFAULT_SEGMENT_BYTES: u64 = 512 * 1024;
/// sled's segment header: crc(4) lsn(8) max_stable_lsn(8), the two LSNs
/// xored with `0x7FFF_FFFF_FFFF_FFFF`, the crc inverted.
const SEG_HEADER_LEN: u64 = 20;
const LSN_XOR: i64 = 0x7FFF_FFFF_FFFF_FFFF;
/// Free space left after the copy, at least: a start never fills the disk
/// the log is about to write to.
const SPARE_BYTES: u64 = 256 * 1024 * 1024;
/// First line of `ranges`.
const RANGES_MAGIC: &str = "sse-gateway pre-open 1";

/// The name of the preserved copy of `dir`: `<dir>.pre-open`, beside it.
pub fn preserved_path(dir: &Path) -> PathBuf {
    sibling(dir, "pre-open")
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!("{name}.{suffix}"))
}

/// A preserved copy taken (or found) before sled opened the directory.
#[derive(Debug)]
pub struct PreOpen {
    path: PathBuf,
}

impl PreOpen {
    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open was accepted: the copy is not needed. A failure is logged.
    pub fn discard(self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the pre-open copy");
        }
    }
}

/// Preserves what sled's recovery may rewrite in `dir` (module docs).
/// `None` when there is nothing to keep (no `db` yet), when the directory
/// is locked by a running gateway (the open then fails anyway), or when the
/// copy failed (logged).
pub fn before_open(dir: &Path) -> Option<PreOpen> {
    let db_path = dir.join("db");
    let db = File::open(&db_path).ok()?;
    // sled's own lock while copying: no gateway writes under our feet.
    match db.try_lock() {
        Ok(()) => {}
        Err(_) => return None,
    }
    let target = preserved_path(dir);
    if target.is_dir() {
        tracing::warn!(
            path = %target.display(),
            "keeping the bytes saved before an earlier refused start"
        );
        return Some(PreOpen { path: target });
    }
    let started = std::time::Instant::now();
    match preserve(dir, &db, &target) {
        Ok(bytes) => {
            tracing::info!(
                path = %target.display(),
                bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "saved the bytes sled's recovery may rewrite"
            );
            Some(PreOpen { path: target })
        }
        Err(e) => {
            tracing::error!(
                dir = %dir.display(),
                error = %e,
                "cannot save the bytes sled's recovery may rewrite; opening without"
            );
            None
        }
    }
}

/// Builds the copy in `<dir>.pre-open.partial`, syncs it, renames it to
/// `target`. Returns the bytes of `db` kept.
fn preserve(dir: &Path, db: &File, target: &Path) -> io::Result<u64> {
    let partial = sibling(dir, "pre-open.partial");
    match fs::remove_dir_all(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let len = db.metadata()?.len();
    let ranges = ranges_at_risk(dir, db, len)?;
    let bytes: u64 = ranges.iter().map(|(_, n)| n).sum();
    let parent = partial.parent().unwrap_or(Path::new("."));
    let free = fs2::available_space(parent)?;
    if !leaves_spare(bytes, free) {
        return Err(io::Error::other(format!(
            "{bytes} bytes to keep but {free} free beside the data directory (keeping {SPARE_BYTES} spare)"
        )));
    }
    fs::create_dir(&partial)?;
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(partial.join("db"))?;
    out.set_len(len)?;
    for &(offset, n) in &ranges {
        copy_range(db, &out, offset, n)?;
    }
    out.sync_all()?;
    let mut list = format!("{RANGES_MAGIC}\ndb-len {len}\n");
    for (offset, n) in &ranges {
        list.push_str(&format!("range {offset} {n}\n"));
    }
    let mut file = File::create(partial.join("ranges"))?;
    file.write_all(list.as_bytes())?;
    file.sync_all()?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text == "conf" || text.starts_with("snap.") {
            fs::copy(entry.path(), partial.join(&name))?;
            File::open(partial.join(&name))?.sync_all()?;
        } else if text == "blobs" && entry.file_type()?.is_dir() {
            fs::create_dir(partial.join("blobs"))?;
            for blob in fs::read_dir(entry.path())? {
                let blob = blob?;
                let to = partial.join("blobs").join(blob.file_name());
                fs::copy(blob.path(), &to)?;
                File::open(&to)?.sync_all()?;
            }
            File::open(partial.join("blobs"))?.sync_all()?;
        }
    }
    File::open(&partial)?.sync_all()?;
    fs::rename(&partial, target)?;
    if let Some(parent) = target.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(bytes)
}

/// Whether copying `bytes` into `free` bytes of space leaves at least
/// [`SPARE_BYTES`] free.
fn leaves_spare(bytes: u64, free: u64) -> bool {
    bytes
        .checked_add(SPARE_BYTES)
        .is_some_and(|needed| needed <= free)
}

/// The byte ranges of `db` sled's recovery may rewrite (module docs),
/// adjacent segments merged.
fn ranges_at_risk(dir: &Path, db: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let segment = segment_bytes(dir);
    // The replay starts at the segment of the newest snapshot's stable
    // LSN; no snapshot (or a name we cannot read): from the start.
    let from_lsn = stable_lsn(dir).map_or(0, |lsn| lsn.max(0) as u64 / segment * segment);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    while offset < len {
        let end = (offset + segment).min(len);
        let keep = if end - offset < segment {
            // The partial segment at the end of the file.
            true
        } else {
            let mut header = [0u8; SEG_HEADER_LEN as usize];
            db.read_exact_at(&mut header, offset)?;
            match decode_header(&header) {
                Some(lsn) => lsn >= 0 && lsn as u64 >= from_lsn,
                // sled shreds a segment it frees with zero bytes; any other
                // unreadable header may be damage to a segment in use.
                None => header.iter().any(|&b| b != 0),
            }
        };
        if keep {
            match ranges.last_mut() {
                Some((start, n)) if *start + *n == offset => *n += end - offset,
                _ => ranges.push((offset, end - offset)),
            }
        }
        offset = end;
    }
    Ok(ranges)
}

/// A segment header's LSN, or `None` when its crc does not match.
fn decode_header(header: &[u8; SEG_HEADER_LEN as usize]) -> Option<i64> {
    let crc = u32::from_le_bytes(header[0..4].try_into().ok()?) ^ 0xFFFF_FFFF;
    if crc32fast::hash(&header[4..20]) != crc {
        return None;
    }
    let lsn = i64::from_le_bytes(header[4..12].try_into().ok()?) ^ LSN_XOR;
    Some(lsn)
}

/// `segment_size` from sled's `conf`, else the default.
fn segment_bytes(dir: &Path) -> u64 {
    fs::read_to_string(dir.join("conf"))
        .ok()
        .and_then(|conf| {
            conf.lines()
                .find_map(|l| l.strip_prefix("segment_size:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .filter(|&n| n > SEG_HEADER_LEN)
        .unwrap_or(DEFAULT_SEGMENT_BYTES)
}

/// The stable LSN of the snapshot sled reads (the last `snap.*` name in
/// sort order, as sled picks it); `None` when there is none or a name does
/// not parse (then the whole log counts as at risk).
fn stable_lsn(dir: &Path) -> Option<i64> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap.") && !n.ends_with(".in___motion"))
        .collect();
    names.sort();
    let newest = names.pop()?;
    let hex = newest.strip_prefix("snap.")?.get(..16)?;
    u64::from_str_radix(hex, 16).ok().map(|v| v as i64)
}

/// Copies `n` bytes at `offset` of `from` to the same offset of `to`.
/// `io::copy` between two files is `copy_file_range` on Linux: in the
/// kernel, and shared blocks (a reflink) on filesystems that can (XFS,
/// Btrfs). (A whole-file `FICLONE` would need `unsafe`, which the crate forbids.)
fn copy_range(from: &File, to: &File, offset: u64, n: u64) -> io::Result<()> {
    let (mut from, mut to) = (from, to);
    from.seek(SeekFrom::Start(offset))?;
    to.seek(SeekFrom::Start(offset))?;
    let copied = io::copy(&mut from.take(n), &mut to)?;
    if copied != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Puts the bytes preserved in `preserved` back into the copy of a data
/// directory at `target` (repair's saved copy): `db` gets its original
/// length and the kept ranges, the `snap.*` files are the ones from before
/// the recovery, `conf` and `blobs/` come back. Returns the bytes put back.
pub fn restore_into(preserved: &Path, target: &Path) -> io::Result<u64> {
    let list = fs::read_to_string(preserved.join("ranges"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unreadable pre-open `ranges`");
    let mut lines = list.lines();
    if lines.next() != Some(RANGES_MAGIC) {
        return Err(bad());
    }
    let len: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("db-len "))
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    let mut ranges = Vec::new();
    for line in lines {
        let mut parts = line.strip_prefix("range ").ok_or_else(bad)?.split(' ');
        let offset: u64 = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let n: u64 = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        ranges.push((offset, n));
    }
    let from = File::open(preserved.join("db"))?;
    let to = OpenOptions::new().write(true).open(target.join("db"))?;
    to.set_len(len)?;
    for &(offset, n) in &ranges {
        copy_range(&from, &to, offset, n)?;
    }
    to.sync_all()?;
    // The snapshot files are the ones sled read before its recovery.
    for entry in fs::read_dir(target)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("snap.") {
            fs::remove_file(entry.path())?;
        }
    }
    for entry in fs::read_dir(preserved)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text == "conf" || text.starts_with("snap.") {
            fs::copy(entry.path(), target.join(&name))?;
            File::open(target.join(&name))?.sync_all()?;
        } else if text == "blobs" {
            fs::create_dir_all(target.join("blobs"))?;
            for blob in fs::read_dir(entry.path())? {
                let blob = blob?;
                let to = target.join("blobs").join(blob.file_name());
                fs::copy(blob.path(), &to)?;
                File::open(&to)?.sync_all()?;
            }
        }
    }
    File::open(target)?.sync_all()?;
    Ok(ranges.iter().map(|(_, n)| n).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(lsn: i64) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[4..12].copy_from_slice(&(lsn ^ LSN_XOR).to_le_bytes());
        // max_stable_lsn 0, xored.
        h[12..20].copy_from_slice(&LSN_XOR.to_le_bytes());
        let crc = crc32fast::hash(&h[4..20]) ^ 0xFFFF_FFFF;
        h[0..4].copy_from_slice(&crc.to_le_bytes());
        h
    }

    #[test]
    fn only_segments_since_the_snapshot_damaged_headers_and_the_tail_are_at_risk() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1024u64;
        fs::write(dir.path().join("conf"), "segment_size: 1024\n").unwrap();
        // The last start's snapshot: stable LSN in the segment of LSN 2048.
        fs::write(dir.path().join(format!("snap.{:016X}", 2100)), b"x").unwrap();
        let db = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("db"))
            .unwrap();
        // Segments at offsets 0..5: LSNs 0, 1024 (old), shredded, 3072,
        // damaged header, 2048; then a partial segment.
        db.write_all_at(&header(0), 0).unwrap();
        db.write_all_at(&header(1024), seg).unwrap();
        db.write_all_at(&header(3072), 3 * seg).unwrap();
        db.write_all_at(&[0xA5; 20], 4 * seg).unwrap();
        db.write_all_at(&header(2048), 5 * seg).unwrap();
        db.set_len(6 * seg + 100).unwrap();
        let ranges = ranges_at_risk(dir.path(), &db, 6 * seg + 100).unwrap();
        assert_eq!(ranges, vec![(3 * seg, 3 * seg + 100)]);

        // A stable LSN inside its segment: the replay starts at that
        // segment's first LSN (3072), so the older 2048 is not at risk.
        fs::rename(
            dir.path().join(format!("snap.{:016X}", 2100)),
            dir.path().join(format!("snap.{:016X}", 3100)),
        )
        .unwrap();
        let ranges = ranges_at_risk(dir.path(), &db, 6 * seg + 100).unwrap();
        assert_eq!(ranges, vec![(3 * seg, 2 * seg), (6 * seg, 100)]);
        fs::rename(
            dir.path().join(format!("snap.{:016X}", 3100)),
            dir.path().join(format!("snap.{:016X}", 2100)),
        )
        .unwrap();

        // No snapshot: every segment in use is at risk.
        fs::remove_file(dir.path().join(format!("snap.{:016X}", 2100))).unwrap();
        let ranges = ranges_at_risk(dir.path(), &db, 6 * seg + 100).unwrap();
        assert_eq!(ranges, vec![(0, 2 * seg), (3 * seg, 3 * seg + 100)]);
    }

    #[test]
    fn the_stable_lsn_is_the_newest_finished_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(stable_lsn(dir.path()), None);
        for name in ["snap.0000000000000400", "snap.0000000000000800", "zz"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        // sled writes a snapshot under this name, then renames it: one
        // still in motion is not the one sled reads.
        fs::write(dir.path().join("snap.0000000000000C00.in___motion"), b"x").unwrap();
        assert_eq!(stable_lsn(dir.path()), Some(0x800));
    }

    #[test]
    fn the_copy_is_named_beside_the_data_directory() {
        assert_eq!(
            preserved_path(Path::new("/srv/gateway/data")),
            Path::new("/srv/gateway/data.pre-open")
        );
        assert_eq!(
            preserved_path(Path::new("events")),
            Path::new("./events.pre-open")
        );
    }

    #[test]
    fn the_segment_size_is_sleds_default_unless_conf_gives_a_usable_one() {
        let dir = tempfile::tempdir().unwrap();
        // No `conf`: sled 0.34.7's default of 512 KiB.
        assert_eq!(segment_bytes(dir.path()), 524_288);
        fs::write(dir.path().join("conf"), "segment_size: 8192\n").unwrap();
        assert_eq!(segment_bytes(dir.path()), 8192);
        // A segment no longer than its header cannot hold a message.
        fs::write(dir.path().join("conf"), "segment_size: 20\n").unwrap();
        assert_eq!(segment_bytes(dir.path()), 524_288);
        fs::write(dir.path().join("conf"), "segment_size: 21\n").unwrap();
        assert_eq!(segment_bytes(dir.path()), 21);
    }

    #[test]
    fn a_copy_must_leave_256_mib_free() {
        const SPARE: u64 = 256 * 1024 * 1024;
        assert!(leaves_spare(0, SPARE));
        assert!(!leaves_spare(0, SPARE - 1));
        assert!(leaves_spare(1000, SPARE + 1000));
        assert!(!leaves_spare(1001, SPARE + 1000));
        assert!(!leaves_spare(u64::MAX, u64::MAX));
    }

    #[test]
    fn the_copy_holds_conf_snapshots_and_blobs_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        fs::create_dir_all(dir.join("blobs")).unwrap();
        fs::create_dir_all(dir.join("unrelated")).unwrap();
        fs::write(dir.join("db"), vec![7u8; 3000]).unwrap();
        fs::write(dir.join("conf"), "segment_size: 1024\n").unwrap();
        fs::write(dir.join("snap.0000000000000400"), b"snapshot").unwrap();
        fs::write(dir.join("blobs").join("1234"), b"blob one").unwrap();
        fs::write(dir.join("blobs").join("5678"), b"blob two").unwrap();
        fs::write(dir.join("unrelated").join("notes"), b"not sled's").unwrap();
        fs::write(dir.join("mark"), b"ours, not sled's").unwrap();

        let kept = before_open(&dir).expect("preserved");
        let copy = kept.path();
        let mut names: Vec<String> = fs::read_dir(copy)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["blobs", "conf", "db", "ranges", "snap.0000000000000400"]
        );
        for name in ["conf", "snap.0000000000000400", "blobs/1234", "blobs/5678"] {
            assert_eq!(
                fs::read(copy.join(name)).unwrap(),
                fs::read(dir.join(name)).unwrap(),
                "{name}"
            );
        }
        assert_eq!(fs::read_dir(copy.join("blobs")).unwrap().count(), 2);
        // All of `db` is at risk: its two whole segments (1024 bytes) have
        // headers that neither read nor are zero, the rest is partial.
        assert_eq!(fs::read(copy.join("db")).unwrap(), vec![7u8; 3000]);
        assert!(!sibling(&dir, "pre-open.partial").exists());
    }

    #[test]
    fn restore_puts_the_ranges_back_at_their_offsets() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        fs::create_dir(&dir).unwrap();
        let original: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.join("db"), &original).unwrap();
        fs::write(dir.join("snap.0000000000000010"), b"old").unwrap();
        fs::write(dir.join("conf"), "segment_size: 1024\n").unwrap();
        let kept = before_open(&dir).expect("preserved");
        assert_eq!(kept.path(), preserved_path(&dir));
        // What a recovery does: zero a tail, truncate, a new snapshot.
        let file = OpenOptions::new().write(true).open(dir.join("db")).unwrap();
        file.write_all_at(&[0; 800], 3000).unwrap();
        file.set_len(3800).unwrap();
        fs::remove_file(dir.join("snap.0000000000000010")).unwrap();
        fs::write(dir.join("snap.0000000000000BB8"), b"new").unwrap();
        let copy = root.path().join("copy");
        fs::create_dir(&copy).unwrap();
        for name in ["db", "snap.0000000000000BB8"] {
            fs::copy(dir.join(name), copy.join(name)).unwrap();
        }
        restore_into(kept.path(), &copy).unwrap();
        assert_eq!(fs::read(copy.join("db")).unwrap(), original);
        assert_eq!(
            fs::read(copy.join("snap.0000000000000010")).unwrap(),
            b"old"
        );
        assert!(!copy.join("snap.0000000000000BB8").exists());
        assert_eq!(
            fs::read(copy.join("conf")).unwrap(),
            b"segment_size: 1024\n"
        );
        // Only sled's files come back, not the copy's own `ranges` list.
        assert!(!copy.join("ranges").exists());
        // An earlier copy is kept, not replaced by the recovered bytes.
        let again = before_open(&dir).expect("kept");
        restore_into(again.path(), &copy).unwrap();
        assert_eq!(fs::read(copy.join("db")).unwrap(), original);
        again.discard();
        assert!(!preserved_path(&dir).exists());
    }
}
