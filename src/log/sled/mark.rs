//! The acknowledged-head mark: a small file beside sled's, `acked-head`,
//! holding the highest sequence this directory ever acknowledged (at most
//! about a second behind). sled can open a damaged log "successfully" — its
//! recovery keeps what precedes the first unreadable entry and drops the rest,
//! and with its snapshot files gone it may rebuild a shorter state — and what
//! is left is consistent in itself. Only a witness outside sled can tell that
//! acknowledged events are gone, so that the gateway refuses to serve the
//! shorter log (and to hand its ids out again) instead of starting silently.
//!
//! The mark is only ever written with a sequence that is already durable in
//! sled, so after a power cut the log's head is never below it: a refusal
//! means acknowledged events are missing, never a torn tail of writes that
//! were not acknowledged.
//!
//! Layout: two 64-byte slots at offsets 0 and 4096 (different pages, so a
//! torn write damages one at most), written alternately, each
//! `magic(8) generation(8) seq(8) epoch_len(1) epoch(32) zero(3) crc32(4)`,
//! integers big-endian; the valid slot with the higher generation counts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::log::LogError;
use crate::model::Epoch;

/// The file's name in the data directory.
pub const MARK_FILE: &str = "acked-head";

const MAGIC: &[u8; 8] = b"sseack01";
const SLOT_BYTES: usize = 64;
const SLOT_OFFSETS: [u64; 2] = [0, 4096];
const MAX_EPOCH_BYTES: usize = 32;

/// What a mark says: events through `epoch-seq` were acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    pub epoch: String,
    pub seq: u64,
    generation: u64,
}

impl Marked {
    /// `<epoch>-<seq>`, as clients see ids.
    pub fn id(&self) -> String {
        format!("{}-{}", self.epoch, self.seq)
    }
}

/// Reads the mark in `dir`: `None` when there is no mark file (a directory
/// from before marks, or a new one) or no slot is readable.
pub fn read(dir: &Path) -> io::Result<Option<Marked>> {
    let file = match File::open(dir.join(MARK_FILE)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut best: Option<Marked> = None;
    for offset in SLOT_OFFSETS {
        let mut slot = [0u8; SLOT_BYTES];
        match file.read_exact_at(&mut slot, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue,
            Err(e) => return Err(e),
        }
        if let Some(marked) = decode(&slot) {
            if best
                .as_ref()
                .is_none_or(|b| marked.generation > b.generation)
            {
                best = Some(marked);
            }
        }
    }
    Ok(best)
}

/// Whether a log that opened with `epoch` and `head` holds everything the
/// mark says was acknowledged; the error says what is missing and what to do.
pub fn verify(
    marked: Option<&Marked>,
    dir: &Path,
    epoch: &Epoch,
    head: u64,
) -> Result<(), LogError> {
    let Some(marked) = marked else {
        return Ok(());
    };
    let same_epoch = marked.epoch == epoch.as_str();
    if (same_epoch && marked.seq > head) || (!same_epoch && marked.seq > 0) {
        return Err(LogError::AcknowledgedLost {
            dir: dir.to_path_buf(),
            acked: marked.id(),
            found: epoch.id(head),
            saved: String::new(),
        });
    }
    Ok(())
}

/// The open mark file of a running log.
pub struct AckMark {
    file: File,
    generation: u64,
    /// The sequence last written.
    written: u64,
}

impl AckMark {
    /// Opens the mark in `dir` (creating it durably, with `epoch-head`, when
    /// missing) after [`verify`] accepted the log.
    pub fn open(dir: &Path, found: Option<Marked>, epoch: &Epoch, head: u64) -> io::Result<Self> {
        let path = dir.join(MARK_FILE);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // Numbering goes on from the mark found, whatever its epoch: a
        // slot of an older epoch with a higher generation would otherwise
        // outrank every slot written from now on.
        let generation = found.map_or(0, |m| m.generation);
        let mut mark = Self {
            file,
            generation,
            written: 0,
        };
        mark.write(epoch, head)?;
        if created {
            // The name is durable only once the directory is synced.
            File::open(dir)?.sync_all()?;
        }
        Ok(mark)
    }

    /// The sequence last written.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Records that events through `epoch-seq` were acknowledged (and are
    /// durable in sled): writes the older slot and syncs it.
    pub fn write(&mut self, epoch: &Epoch, seq: u64) -> io::Result<()> {
        self.generation += 1;
        let slot = encode(epoch.as_str(), seq, self.generation)?;
        let offset = SLOT_OFFSETS[(self.generation % 2) as usize];
        self.file.write_all_at(&slot, offset)?;
        self.file.sync_data()?;
        self.written = seq;
        Ok(())
    }
}

/// Rewrites the mark of `dir` to `epoch-seq` (import, repair): a new file
/// synced, renamed over the old one, the directory synced.
pub fn replace(dir: &Path, epoch: &Epoch, seq: u64) -> io::Result<()> {
    let temp: PathBuf = dir.join(format!("{MARK_FILE}.new"));
    {
        let file = File::create(&temp)?;
        let slot = encode(epoch.as_str(), seq, 1)?;
        file.write_all_at(&slot, SLOT_OFFSETS[1])?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, dir.join(MARK_FILE))?;
    File::open(dir)?.sync_all()
}

fn encode(epoch: &str, seq: u64, generation: u64) -> io::Result<[u8; SLOT_BYTES]> {
    let epoch = epoch.as_bytes();
    if epoch.len() > MAX_EPOCH_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "epoch longer than the mark holds",
        ));
    }
    let mut slot = [0u8; SLOT_BYTES];
    slot[0..8].copy_from_slice(MAGIC);
    slot[8..16].copy_from_slice(&generation.to_be_bytes());
    slot[16..24].copy_from_slice(&seq.to_be_bytes());
    slot[24] = epoch.len() as u8;
    slot[25..25 + epoch.len()].copy_from_slice(epoch);
    let crc = crc32fast::hash(&slot[..60]);
    slot[60..64].copy_from_slice(&crc.to_be_bytes());
    Ok(slot)
}

fn decode(slot: &[u8; SLOT_BYTES]) -> Option<Marked> {
    if &slot[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_be_bytes(slot[60..64].try_into().ok()?);
    if crc32fast::hash(&slot[..60]) != crc {
        return None;
    }
    let generation = u64::from_be_bytes(slot[8..16].try_into().ok()?);
    let seq = u64::from_be_bytes(slot[16..24].try_into().ok()?);
    let len = usize::from(slot[24]);
    let epoch = std::str::from_utf8(slot.get(25..25 + len)?)
        .ok()?
        .to_owned();
    Some(Marked {
        epoch,
        seq,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(s: &str) -> Epoch {
        Epoch::parse(s).expect("epoch")
    }

    #[test]
    fn the_newest_readable_slot_counts_and_a_torn_one_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let e = epoch("Xk3v9QaB");
        let mut mark = AckMark::open(dir.path(), None, &e, 5).unwrap();
        mark.write(&e, 9).unwrap();
        mark.write(&e, 12).unwrap();
        let found = read(dir.path()).unwrap().unwrap();
        assert_eq!((found.epoch.as_str(), found.seq), ("Xk3v9QaB", 12));

        // A torn write of the newest slot: the other one (9) still reads.
        let newest = SLOT_OFFSETS[(found.generation % 2) as usize];
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(MARK_FILE))
            .unwrap();
        file.write_all_at(&[0xFF; 16], newest + 10).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().seq, 9);
        // Both damaged: no mark (the log is then opened without a witness).
        let other = SLOT_OFFSETS[1 - (found.generation % 2) as usize];
        file.write_all_at(&[0xFF; 16], other + 10).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_log_behind_its_mark_or_of_another_epoch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = epoch("Xk3v9QaB");
        let mark = Marked {
            epoch: "Xk3v9QaB".into(),
            seq: 300,
            generation: 7,
        };
        assert!(verify(Some(&mark), dir.path(), &e, 300).is_ok());
        assert!(verify(Some(&mark), dir.path(), &e, 301).is_ok());
        assert!(verify(None, dir.path(), &e, 0).is_ok());
        let behind = verify(Some(&mark), dir.path(), &e, 160).unwrap_err();
        let text = behind.to_string();
        assert!(
            text.contains("Xk3v9QaB-300") && text.contains("Xk3v9QaB-160"),
            "{text}"
        );
        // sled recovered an empty tree and the log started a new epoch.
        assert!(verify(Some(&mark), dir.path(), &epoch("newEpoch"), 0).is_err());
        // A mark of another epoch that acknowledged nothing is no loss.
        let nothing = Marked { seq: 0, ..mark };
        assert!(verify(Some(&nothing), dir.path(), &epoch("newEpoch"), 0).is_ok());
    }

    #[test]
    fn a_new_epoch_over_an_old_mark_outranks_it() {
        let dir = tempfile::tempdir().unwrap();
        let old = epoch("oldEpoch");
        let mut mark = AckMark::open(dir.path(), None, &old, 0).unwrap();
        for _ in 0..5 {
            mark.write(&old, 0).unwrap();
        }
        drop(mark);
        // sled recovered an empty tree: a new epoch; the old mark had
        // acknowledged nothing, so the log is accepted and marked anew.
        let new = epoch("newEpoch");
        let found = read(dir.path()).unwrap();
        verify(found.as_ref(), dir.path(), &new, 0).unwrap();
        let mut mark = AckMark::open(dir.path(), found, &new, 0).unwrap();
        // Right after the open (one slot written), the new epoch counts.
        assert_eq!(read(dir.path()).unwrap().unwrap().epoch, "newEpoch");
        mark.write(&new, 3).unwrap();
        let now = read(dir.path()).unwrap().unwrap();
        assert_eq!((now.epoch.as_str(), now.seq), ("newEpoch", 3));
    }

    #[test]
    fn no_mark_file_is_no_mark_but_an_unreadable_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None, "a new directory");
        // Not "no mark": the mark may be there and say events are missing.
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"x").unwrap();
        assert!(read(&not_a_dir).is_err(), "open fails with ENOTDIR");
        std::fs::create_dir(dir.path().join(MARK_FILE)).unwrap();
        assert!(read(dir.path()).is_err(), "reading fails with EISDIR");
    }

    #[test]
    fn a_mark_file_cut_short_after_its_first_slot_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let e = epoch("Xk3v9QaB");
        // Generation 1 (the open) goes to the second slot, 2 to the first.
        let mut mark = AckMark::open(dir.path(), None, &e, 5).unwrap();
        mark.write(&e, 9).unwrap();
        drop(mark);
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(MARK_FILE))
            .unwrap();
        file.set_len(SLOT_BYTES as u64).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().seq, 9);
    }

    #[test]
    fn the_longest_epoch_fits_and_a_longer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let longest = epoch(&"e".repeat(MAX_EPOCH_BYTES));
        let mut mark = AckMark::open(dir.path(), None, &longest, 1).unwrap();
        mark.write(&longest, 2).unwrap();
        let found = read(dir.path()).unwrap().unwrap();
        assert_eq!((found.epoch.as_str(), found.seq), (longest.as_str(), 2));
        assert!(encode(&"e".repeat(MAX_EPOCH_BYTES + 1), 1, 1).is_err());
    }

    /// On a filesystem where a name is durable only once its directory is
    /// synced (`tools/powercut`, strict), a new mark and its last write
    /// survive a power cut.
    #[test]
    fn a_new_mark_survives_a_power_cut() {
        let mountpoint = tempfile::tempdir().unwrap();
        let mount = powercut::PowerCutFs::new(powercut::Mode::Strict, None)
            .mount(mountpoint.path())
            .unwrap();
        let dir = mount.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        File::open(mount.path()).unwrap().sync_all().unwrap();
        let e = epoch("Xk3v9QaB");
        let mut mark = AckMark::open(&dir, None, &e, 5).unwrap();
        mark.write(&e, 6).unwrap();
        drop(mark);
        let image = mount.power_cut().unwrap();
        let restored = tempfile::tempdir().unwrap();
        image.write_to(restored.path()).unwrap();
        let found = read(&restored.path().join("data")).unwrap();
        assert_eq!(found.map(|m| m.seq), Some(6));
    }

    #[test]
    fn replace_writes_a_mark_that_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let e = epoch("Xk3v9QaB");
        AckMark::open(dir.path(), None, &e, 40).unwrap();
        replace(dir.path(), &e, 7).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().seq, 7);
    }
}
