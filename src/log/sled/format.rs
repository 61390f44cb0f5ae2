//! On-disk format versions of the sled log and the upgrades between them.
//!
//! `m/format` holds the version a data directory was written in. At start the
//! gateway initialises a new directory, upgrades an older one in place (one
//! step per version, each described in `migrations/`), and refuses a newer one
//! rather than guess at a layout it does not know.

use super::codec::{self, decode_u64, EPOCH_KEY, EVENT_PREFIX, FORMAT_KEY, HEAD_KEY};
use crate::log::LogError;
use crate::model::Epoch;

/// The format this build writes. `migrations/v2.md` describes it.
pub const CURRENT_FORMAT: u32 = 2;

/// Makes everything written so far durable (sled's flush, then the fsyncs
/// of `durable.rs`): every step of an upgrade is made durable before the
/// next, so a crash or power cut at any point leaves a directory the next
/// start resumes from.
pub type MakeDurable<'a> = &'a mut dyn FnMut() -> Result<(), LogError>;

/// Upgrades from version `n` to `n + 1`, indexed by `n - 1`.
type Upgrade = fn(&sled::Tree, MakeDurable<'_>) -> Result<(), LogError>;
const UPGRADES: &[Upgrade] = &[upgrade_v1_to_v2];

/// Records rewritten per atomic batch during the v1 → v2 upgrade.
const UPGRADE_BATCH: usize = 64;

/// Brings `tree` to [`CURRENT_FORMAT`] and returns its epoch.
pub fn prepare(tree: &sled::Tree, durable: MakeDurable<'_>) -> Result<Epoch, LogError> {
    match read_version(tree)? {
        None => initialise(tree, durable),
        Some(found) => {
            if found > CURRENT_FORMAT {
                return Err(LogError::TooNew {
                    found,
                    supported: CURRENT_FORMAT,
                });
            }
            if found == 0 {
                return Err(LogError::Corrupt {
                    key: "m/format".into(),
                    what: "version 0".into(),
                });
            }
            for version in found..CURRENT_FORMAT {
                let upgrade =
                    UPGRADES
                        .get(version as usize - 1)
                        .ok_or_else(|| LogError::Corrupt {
                            key: "m/format".into(),
                            what: format!("no upgrade from version {version}"),
                        })?;
                tracing::info!(
                    from = version,
                    to = version + 1,
                    "upgrading data directory format"
                );
                upgrade(tree, durable)?;
                tree.insert(FORMAT_KEY, &(version + 1).to_be_bytes())?;
                durable()?;
            }
            read_epoch(tree)
        }
    }
}

/// Format 1 → 2: every record longer than [`codec::MAX_VALUE_BYTES`] is
/// rewritten in pieces (`migrations/v2.md`); shorter ones stay as they are
/// (format 2 reads record version 1). Each batch of rewrites is atomic and
/// durable; the version is raised only after the last one, so an
/// interrupted upgrade resumes at the next start and finds the records
/// already rewritten in version 2.
fn upgrade_v1_to_v2(tree: &sled::Tree, durable: MakeDurable<'_>) -> Result<(), LogError> {
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    let mut rewritten = 0u64;
    for item in tree.scan_prefix(EVENT_PREFIX) {
        let (key, value) = item?;
        if value.len() <= codec::MAX_VALUE_BYTES {
            continue;
        }
        let seq = codec::seq_suffix(&key)?;
        let event = codec::decode_record(tree, seq, &value)?;
        let data = std::str::from_utf8(&event.data).map_err(|_| LogError::Corrupt {
            key: format!("e/{seq}"),
            what: "data is not UTF-8".into(),
        })?;
        codec::encode_record(event.time_ms, &event.name, &event.topics, data)
            .insert_into(&mut batch, seq);
        in_batch += 1;
        rewritten += 1;
        if in_batch == UPGRADE_BATCH {
            tree.apply_batch(std::mem::take(&mut batch))?;
            durable()?;
            in_batch = 0;
        }
    }
    if in_batch > 0 {
        tree.apply_batch(batch)?;
        durable()?;
    }
    tracing::info!(rewritten, "records longer than 4 KiB rewritten in pieces");
    Ok(())
}

fn initialise(tree: &sled::Tree, durable: MakeDurable<'_>) -> Result<Epoch, LogError> {
    if tree.iter().next().is_some() {
        return Err(LogError::Corrupt {
            key: "m/format".into(),
            what: "data directory holds keys but no format version; refusing to guess".into(),
        });
    }
    let epoch = Epoch::generate();
    let mut batch = sled::Batch::default();
    batch.insert(FORMAT_KEY, &CURRENT_FORMAT.to_be_bytes());
    batch.insert(EPOCH_KEY, epoch.as_str().as_bytes());
    batch.insert(HEAD_KEY, &0u64.to_be_bytes());
    tree.apply_batch(batch)?;
    durable()?;
    tracing::info!(
        epoch = epoch.as_str(),
        format = CURRENT_FORMAT,
        "initialised a new log"
    );
    Ok(epoch)
}

/// The format version stored in `tree` (`m/format`), `None` when it holds none.
pub fn read_version(tree: &sled::Tree) -> Result<Option<u32>, LogError> {
    let Some(raw) = tree.get(FORMAT_KEY)? else {
        return Ok(None);
    };
    let bytes: [u8; 4] = raw.as_ref().try_into().map_err(|_| LogError::Corrupt {
        key: "m/format".into(),
        what: "expected a 4-byte version".into(),
    })?;
    Ok(Some(u32::from_be_bytes(bytes)))
}

/// The log's epoch (`m/epoch`); missing or malformed is corruption.
pub fn read_epoch(tree: &sled::Tree) -> Result<Epoch, LogError> {
    let raw = tree.get(EPOCH_KEY)?.ok_or_else(|| LogError::Corrupt {
        key: "m/epoch".into(),
        what: "missing".into(),
    })?;
    std::str::from_utf8(&raw)
        .ok()
        .and_then(Epoch::parse)
        .ok_or_else(|| LogError::Corrupt {
            key: "m/epoch".into(),
            what: "not an epoch".into(),
        })
}

/// The last assigned sequence.
pub fn read_head(tree: &sled::Tree) -> Result<u64, LogError> {
    match tree.get(HEAD_KEY)? {
        Some(raw) => decode_u64(HEAD_KEY, &raw),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventName, Topic};

    /// A format-1 tree: `count` events, every third one longer than 4 KiB.
    fn v1_tree(count: u64) -> (tempfile::TempDir, sled::Db, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let name = EventName::parse("e").unwrap();
        let topic = Topic::parse("t").unwrap();
        let mut data = Vec::new();
        for seq in 1..=count {
            let text = if seq % 3 == 0 {
                format!("\"{}\"", "x".repeat(10_000 + seq as usize))
            } else {
                seq.to_string()
            };
            db.insert(
                codec::event_key(seq),
                codec::encode_record_v1(seq, &name, std::slice::from_ref(&topic), &text),
            )
            .unwrap();
            db.insert(codec::index_key(&topic, seq), &[]).unwrap();
            data.push(text);
        }
        db.insert(FORMAT_KEY, &1u32.to_be_bytes()).unwrap();
        db.insert(EPOCH_KEY, "ucMMIYGv").unwrap();
        db.insert(HEAD_KEY, &count.to_be_bytes()).unwrap();
        (dir, db, data)
    }

    fn assert_upgraded(db: &sled::Db, data: &[String]) {
        assert_eq!(read_version(db).unwrap(), Some(CURRENT_FORMAT));
        for (seq, text) in (1..).zip(data) {
            let event = codec::read_record(db, seq).unwrap().unwrap();
            assert_eq!(&event.data[..], text.as_bytes(), "event {seq}");
        }
        for item in db.iter() {
            let (key, value) = item.unwrap();
            assert!(
                value.len() <= codec::MAX_VALUE_BYTES,
                "{} is {} bytes",
                key.escape_ascii(),
                value.len()
            );
        }
    }

    #[test]
    fn format_1_is_upgraded_in_place_and_no_value_stays_over_4_kib() {
        let (_dir, db, data) = v1_tree(300);
        let mut syncs = 0;
        let epoch = prepare(&db, &mut || {
            syncs += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(epoch.as_str(), "ucMMIYGv");
        assert!(syncs >= 2, "each batch and the version are made durable");
        assert_upgraded(&db, &data);
    }

    #[test]
    fn an_interrupted_upgrade_resumes_at_the_next_start() {
        let (_dir, db, data) = v1_tree(300);
        let mut batches = 0;
        let interrupted = prepare(&db, &mut || {
            batches += 1;
            if batches == 1 {
                Ok(())
            } else {
                Err(LogError::Closed)
            }
        });
        assert!(interrupted.is_err());
        assert_eq!(read_version(&db).unwrap(), Some(1), "not raised midway");
        // Whatever was rewritten reads back; the rest is still version 1.
        for seq in 1..=300 {
            assert!(codec::read_record(&db, seq).unwrap().is_some());
        }
        prepare(&db, &mut || Ok(())).unwrap();
        assert_upgraded(&db, &data);
    }

    #[test]
    fn an_upgrade_makes_each_full_batch_durable_once_and_then_the_version() {
        // 192 events, every third long: exactly one batch of 64 rewrites.
        let (_dir, db, data) = v1_tree(3 * UPGRADE_BATCH as u64);
        let mut syncs = 0;
        prepare(&db, &mut || {
            syncs += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(syncs, 2, "one full batch, no empty one, then the version");
        assert_upgraded(&db, &data);
    }

    #[test]
    fn a_current_directory_opens_again_with_its_epoch_and_head() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let epoch = prepare(&db, &mut || Ok(())).unwrap();
        assert_eq!(read_head(&db).unwrap(), 0);
        let again = prepare(&db, &mut || Ok(())).expect("the current format opens");
        assert_eq!(again, epoch);
        let (_dir, v1, _) = v1_tree(7);
        assert_eq!(read_head(&v1).unwrap(), 7);
    }

    #[test]
    fn a_newer_format_is_refused() {
        let (_dir, db, _) = v1_tree(1);
        db.insert(FORMAT_KEY, &(CURRENT_FORMAT + 1).to_be_bytes())
            .unwrap();
        assert!(matches!(
            prepare(&db, &mut || Ok(())),
            Err(LogError::TooNew { .. })
        ));
    }
}
