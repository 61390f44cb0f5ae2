//! On-disk format versions of the sled log and the upgrades between them.
//!
//! `m/format` holds the version a data directory was written in. At start the
//! gateway initialises a new directory, upgrades an older one in place (one
//! step per version, each described in `migrations/`), and refuses a newer one
//! rather than guess at a layout it does not know.

use super::codec::{decode_u64, EPOCH_KEY, FORMAT_KEY, HEAD_KEY};
use crate::log::LogError;
use crate::model::Epoch;

/// The format this build writes. `migrations/v1.md` describes it.
pub const CURRENT_FORMAT: u32 = 1;

/// Upgrades from version `n` to `n + 1`, indexed by `n - 1`. Empty while
/// version 1 is the only format; a v2 adds `upgrade_v1_to_v2` here.
type Upgrade = fn(&sled::Tree) -> Result<(), LogError>;
const UPGRADES: &[Upgrade] = &[];

/// Brings `tree` to [`CURRENT_FORMAT`] and returns its epoch.
pub fn prepare(tree: &sled::Tree) -> Result<Epoch, LogError> {
    match read_version(tree)? {
        None => initialise(tree),
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
                upgrade(tree)?;
                tree.insert(FORMAT_KEY, &(version + 1).to_be_bytes())?;
                tree.flush()?;
            }
            read_epoch(tree)
        }
    }
}

fn initialise(tree: &sled::Tree) -> Result<Epoch, LogError> {
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
    tree.flush()?;
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
