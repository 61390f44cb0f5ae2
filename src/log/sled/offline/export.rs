//! `export`: a log as JSON lines, for backups, compaction and moves between
//! storage backends; [`import`](super::import()) reads it back.
//!
//! # The export format (version 1)
//!
//! JSON lines, UTF-8. The first line is a header:
//!
//! ```text
//! {"format":"sse-gateway-export","version":1,"epoch":"Xk3v9QaB","head":1234,"trimmed":{"projects:all":17}}
//! ```
//!
//! `head` is the last sequence the log ever assigned (`m/head`), which may be
//! above the newest exported event when retention removed the newest events.
//! `trimmed` is every topic's retention watermark (`w/<topic>`): the highest
//! sequence retention removed from that topic. It is optional on import (see
//! [`import`] for what happens without it). Then one line per event, in id
//! order:
//!
//! ```text
//! {"id":"Xk3v9QaB-18","event":"task_updated","topics":["projects:all","projects:tasks"],"time_ms":1700000000000,"data":{"id":7}}
//! ```
//!
//! `topics` is every topic the event was published to, `time_ms` its append
//! time (it drives `max_age` retention) and `data` the compact JSON exactly as
//! stored, embedded raw: key order, escapes and number text are the stored
//! bytes, never re-serialised.
//!
//! Version 2 adds, after the events, one line per idempotency key whose
//! window has not ended, so retries after a move still replay:
//!
//! ```text
//! {"idempotency_key":"org1:8e03978e","id":"Xk3v9QaB-18","expires_ms":1700086400000,"digest":"<64 hex digits>"}
//! ```
//!
//! `idempotency_key` is the scoped key (`<org>:<key>`, `:<key>` without
//! tenancy), `id` the event it stored (which may have been trimmed since),
//! `expires_ms` the end of its window, `digest` the SHA-256 of its request.
//! Version 1 (no key lines) is still read.

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{compact_json_text, OfflineError, OfflineLog, Progress, Unit, PROGRESS_EVERY};
use crate::idempotency;
use crate::log::sled::codec;
use crate::log::{LogError, StoredEvent};
use crate::model::{Epoch, Topic};

/// The `format` value of an export header.
pub const EXPORT_FORMAT: &str = "sse-gateway-export";
/// The export format version this build writes and the newest it reads.
pub const EXPORT_VERSION: u32 = 2;

impl OfflineLog {
    /// Writes the export of this log to `out` (module docs: the format).
    /// Fails on a record that does not decode or holds data that is not
    /// compact JSON, naming it: `check` tells what else is wrong.
    pub fn export(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn Progress,
    ) -> Result<ExportStats, OfflineError> {
        let mut writer = ExportWriter::new(out, &self.epoch, self.head, &self.trimmed()?)?;
        let range = self.event_range()?;
        progress.phase("exporting", range.map(|(a, b)| b - a + 1), Unit::Items);
        for event in self.events() {
            let event = event?;
            writer
                .event(&event, || format!("e/{}", event.seq))
                .map_err(|e| match e {
                    OfflineError::Log(LogError::Corrupt { key, what }) => {
                        OfflineError::Log(LogError::Corrupt {
                            key,
                            what: format!("{what}; run `sse-gateway check`"),
                        })
                    }
                    other => other,
                })?;
            if writer.stats.events.is_multiple_of(PROGRESS_EVERY) {
                progress.position(event.seq - range.map_or(0, |r| r.0) + 1);
            }
        }
        let now = crate::log::sled::now_ms();
        for item in self.db.scan_prefix(codec::KEY_PREFIX) {
            let (key, value) = item?;
            let scoped = codec::split_key_key(&key)?;
            let entry = codec::KeyEntry::decode(&key, &value)?;
            if entry.expires_ms <= now {
                continue;
            }
            writer.key(scoped, &entry)?;
        }
        let stats = writer.finish()?;
        progress.finish();
        Ok(stats)
    }

    /// Every idempotency key stored, expired or not: the scoped key and its entry.
    pub fn idempotency_keys(
        &self,
    ) -> impl Iterator<Item = Result<(String, codec::KeyEntry), OfflineError>> + '_ {
        self.db.scan_prefix(codec::KEY_PREFIX).map(|item| {
            let (key, value) = item?;
            let scoped = codec::split_key_key(&key)?.to_owned();
            Ok((scoped, codec::KeyEntry::decode(&key, &value)?))
        })
    }
}

/// Writes the export format (module docs) line by line, whichever backend
/// the log is read from: the header when made, then events in id order,
/// then the idempotency keys. The one place the format is written.
pub struct ExportWriter<'a> {
    out: &'a mut dyn Write,
    stats: ExportStats,
}

fn write_error(e: impl Into<std::io::Error>) -> OfflineError {
    OfflineError::Io {
        what: "cannot write the export".into(),
        error: e.into(),
    }
}

impl<'a> ExportWriter<'a> {
    /// Writes the header: the log's epoch, head and watermarks.
    pub fn new(
        out: &'a mut dyn Write,
        epoch: &Epoch,
        head: u64,
        trimmed: &BTreeMap<Topic, u64>,
    ) -> Result<Self, OfflineError> {
        let header = ExportHeader {
            format: EXPORT_FORMAT.into(),
            version: EXPORT_VERSION,
            epoch: epoch.as_str().into(),
            head,
            trimmed: Some(
                trimmed
                    .iter()
                    .map(|(t, w)| (t.as_str().to_owned(), *w))
                    .collect(),
            ),
        };
        serde_json::to_writer(&mut *out, &header).map_err(write_error)?;
        out.write_all(b"\n").map_err(write_error)?;
        Ok(Self {
            out,
            stats: ExportStats {
                epoch: epoch.clone(),
                head,
                events: 0,
                first: None,
                last: None,
                keys: 0,
            },
        })
    }

    /// Writes one event (after every event of a lower sequence). Data that is
    /// not compact JSON fails, naming `where_stored()` (the record's key).
    pub fn event(
        &mut self,
        event: &StoredEvent,
        where_stored: impl FnOnce() -> String,
    ) -> Result<(), OfflineError> {
        let id = self.stats.epoch.id(event.seq);
        let data = compact_json_text(&event.data).ok_or_else(|| {
            OfflineError::Log(LogError::Corrupt {
                key: where_stored(),
                what: format!("the data of event {id} is not compact JSON"),
            })
        })?;
        let line = ExportLine {
            id: &id,
            event: event.name.as_str(),
            topics: event.topics.iter().map(Topic::as_str).collect(),
            time_ms: event.time_ms,
            data,
        };
        serde_json::to_writer(&mut *self.out, &line).map_err(write_error)?;
        self.out.write_all(b"\n").map_err(write_error)?;
        self.stats.events += 1;
        self.stats.first.get_or_insert(event.seq);
        self.stats.last = Some(event.seq);
        Ok(())
    }

    /// Writes one idempotency key (after the events); the caller leaves out
    /// keys whose window has ended.
    pub fn key(&mut self, scoped: &str, entry: &codec::KeyEntry) -> Result<(), OfflineError> {
        let line = KeyLine {
            idempotency_key: scoped,
            id: &self.stats.epoch.id(entry.seq),
            expires_ms: entry.expires_ms,
            digest: &idempotency::hex(&entry.digest),
        };
        serde_json::to_writer(&mut *self.out, &line).map_err(write_error)?;
        self.out.write_all(b"\n").map_err(write_error)?;
        self.stats.keys += 1;
        Ok(())
    }

    /// Events written so far.
    pub fn events(&self) -> u64 {
        self.stats.events
    }

    /// Flushes the output; what was written.
    pub fn finish(self) -> Result<ExportStats, OfflineError> {
        self.out.flush().map_err(write_error)?;
        Ok(self.stats)
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportStats {
    pub epoch: Epoch,
    pub head: u64,
    pub events: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Idempotency keys written (those whose window had not ended).
    pub keys: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportHeader {
    pub(super) format: String,
    pub(super) version: u32,
    pub(super) epoch: String,
    pub(super) head: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) trimmed: Option<BTreeMap<String, u64>>,
}

/// Just enough of a header to say which format and version it is.
#[derive(Deserialize)]
pub(super) struct HeaderProbe {
    pub(super) format: Option<String>,
    pub(super) version: Option<u32>,
}

/// An idempotency key line (version 2), after the events.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyLine<'a> {
    pub(super) idempotency_key: &'a str,
    pub(super) id: &'a str,
    pub(super) expires_ms: u64,
    pub(super) digest: &'a str,
}

#[derive(Serialize)]
struct ExportLine<'a> {
    id: &'a str,
    event: &'a str,
    topics: Vec<&'a str>,
    time_ms: u64,
    data: &'a RawValue,
}
