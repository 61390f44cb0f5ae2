//! Key layout and record encoding of the sled log (format version 2).
//!
//! One sled tree holds everything, so one `apply_batch` is atomic across an
//! event, its index entries and the head counter:
//!
//! | key                         | value                                  |
//! |-----------------------------|----------------------------------------|
//! | `m/format`                  | format version, u32 big-endian         |
//! | `m/epoch`                   | the log's epoch, ASCII                 |
//! | `m/head`                    | last assigned sequence, u64 BE         |
//! | `e/<seq u64 BE>`            | event record (below)                   |
//! | `c/<seq u64 BE><n u32 BE>`  | piece `n` (from 1) of a long record    |
//! | `t/<topic>/<seq u64 BE>`    | empty: the topic index                 |
//! | `w/<topic>`                 | highest sequence trimmed from topic    |
//! | `x/<expires_ms u64 BE><scoped key>` | empty: the idempotency keys' expiry index |
//! | `y/<scoped key>`            | idempotency key: `seq u64 BE`, `expires_ms u64 BE`, SHA-256 digest (48 bytes) |
//!
//! A scoped key is `<org>:<client key>` (`crate::idempotency`). `x/` and
//! `y/` sort after `t/`: a commit cut short by a power cut that kept a key
//! kept its event whole and visible, so a replayed id always exists; and
//! `y/` after `x/`, so a key never outlives its expiry entry (an expiry
//! entry without its key is a leftover the trimmer removes).
//!
//! Big-endian sequences sort numerically, so range scans are in id order.
//! Topics cannot contain `/`, so `t/<topic>/` is an exact prefix.
//!
//! The record body: `time_ms u64 BE`, `name_len u8`, name, `topic_count
//! u8`, then per topic `len u8` + bytes, then the compact JSON data to the
//! end. Stored as:
//!
//! - record version 1 (format 1, still read): `1u8` + body, whole, in `e/`;
//! - record version 2: `2u8`, `pieces u32 BE`, then the body cut into pieces
//!   of at most [`MAX_VALUE_BYTES`]: the first in `e/<seq>` after that
//!   5-byte header, the rest in `c/<seq><n>`, `n` = 1..=pieces.
//!
//! Why these prefixes: sled applies a batch in key order, and after a power
//! cut it may recover only a prefix of the last batch (a sled segment
//! truncation fsyncs the file at a moment of its own choosing). Keys sort
//! `c/` < `e/` < `m/head` < `t/`, so in any prefix an event's pieces come
//! before its record, its record before the head, and the head before the
//! index entries that make it visible: a visible event is always whole.
//! Pieces without a record are leftovers of a write never acknowledged, and
//! readers ignore them.
//!
//! Why pieces: sled 0.34 writes any tree node larger than a quarter of a
//! segment (~128 KiB) to a `blobs/` file of its own, and a node holds many
//! entries, so 16 KiB values already produced blobs. Blob files are where
//! sled loses acknowledged data at a power cut (it never syncs them, and its
//! recovery trusts them). With every value at most 4 KiB, no node grows to
//! the blob threshold: the log never writes a blob (`durable.rs` refuses to
//! acknowledge if one appears anyway).

use bytes::Bytes;

use crate::log::{LogError, StoredEvent};
use crate::model::{EventName, Topic};

pub const FORMAT_KEY: &[u8] = b"m/format";
pub const EPOCH_KEY: &[u8] = b"m/epoch";
pub const HEAD_KEY: &[u8] = b"m/head";
pub const EVENT_PREFIX: &[u8] = b"e/";
pub const PIECE_PREFIX: &[u8] = b"c/";
pub const INDEX_PREFIX: &[u8] = b"t/";
pub const TRIMMED_PREFIX: &[u8] = b"w/";
pub const EXPIRY_PREFIX: &[u8] = b"x/";
pub const KEY_PREFIX: &[u8] = b"y/";

/// Record version 1: one value, any size (format 1).
const RECORD_V1: u8 = 1;
/// Record version 2: the body in pieces of at most [`MAX_VALUE_BYTES`].
const RECORD_V2: u8 = 2;
/// `2u8` + `pieces u32 BE`.
const V2_HEADER: usize = 5;

/// The largest value the log writes (format 2): small enough that no sled
/// node reaches the blob threshold (module docs).
pub const MAX_VALUE_BYTES: usize = 4096;

/// `e/<seq>`
pub fn event_key(seq: u64) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(EVENT_PREFIX);
    key[2..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// `c/<seq>`: the prefix of one record's pieces.
pub fn piece_prefix(seq: u64) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(PIECE_PREFIX);
    key[2..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// `c/<seq><n>`
pub fn piece_key(seq: u64, n: u32) -> [u8; 14] {
    let mut key = [0u8; 14];
    key[..10].copy_from_slice(&piece_prefix(seq));
    key[10..].copy_from_slice(&n.to_be_bytes());
    key
}

/// `t/<topic>/`: the prefix of one topic's index.
pub fn index_prefix(topic: &Topic) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.as_str().len() + 11);
    key.extend_from_slice(INDEX_PREFIX);
    key.extend_from_slice(topic.as_str().as_bytes());
    key.push(b'/');
    key
}

/// `t/<topic>/<seq>`
pub fn index_key(topic: &Topic, seq: u64) -> Vec<u8> {
    let mut key = index_prefix(topic);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `w/<topic>`
pub fn trimmed_key(topic: &Topic) -> Vec<u8> {
    [TRIMMED_PREFIX, topic.as_str().as_bytes()].concat()
}

/// `y/<scoped key>`
pub fn key_key(scoped: &str) -> Vec<u8> {
    [KEY_PREFIX, scoped.as_bytes()].concat()
}

/// `x/<expires_ms><scoped key>`
pub fn expiry_key(expires_ms: u64, scoped: &str) -> Vec<u8> {
    [EXPIRY_PREFIX, &expires_ms.to_be_bytes(), scoped.as_bytes()].concat()
}

/// Splits `x/<expires_ms><scoped key>` into its time and scoped key.
pub fn split_expiry_key(key: &[u8]) -> Result<(u64, &str), LogError> {
    let body = key
        .strip_prefix(EXPIRY_PREFIX)
        .filter(|b| b.len() > 8)
        .ok_or_else(|| corrupt(key, "malformed expiry key"))?;
    let expires = decode_u64(key, &body[..8])?;
    let scoped =
        std::str::from_utf8(&body[8..]).map_err(|_| corrupt(key, "expiry key is not UTF-8"))?;
    Ok((expires, scoped))
}

/// The scoped key of a `y/` key.
pub fn split_key_key(key: &[u8]) -> Result<&str, LogError> {
    key.strip_prefix(KEY_PREFIX)
        .filter(|b| !b.is_empty())
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| corrupt(key, "malformed idempotency key"))
}

/// The value of a `y/` key: which event a key stored, until when, for which request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEntry {
    pub seq: u64,
    pub expires_ms: u64,
    pub digest: [u8; 32],
}

impl KeyEntry {
    pub fn encode(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.expires_ms.to_be_bytes());
        out[16..].copy_from_slice(&self.digest);
        out
    }

    pub fn decode(key: &[u8], value: &[u8]) -> Result<Self, LogError> {
        if value.len() != 48 {
            return Err(corrupt(key, "idempotency entry is not 48 bytes"));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&value[16..]);
        Ok(Self {
            seq: decode_u64(key, &value[..8])?,
            expires_ms: decode_u64(key, &value[8..16])?,
            digest,
        })
    }

    /// Adds the key and its expiry entry to `batch`.
    pub fn insert_into(&self, batch: &mut sled::Batch, scoped: &str) {
        batch.insert(expiry_key(self.expires_ms, scoped), &[]);
        batch.insert(key_key(scoped), &self.encode()[..]);
    }
}

/// Reads a big-endian u64 value.
pub fn decode_u64(key: &[u8], value: &[u8]) -> Result<u64, LogError> {
    let bytes: [u8; 8] = value
        .try_into()
        .map_err(|_| corrupt(key, "expected an 8-byte number"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The sequence at the end of an `e/` or `t/` key.
pub fn seq_suffix(key: &[u8]) -> Result<u64, LogError> {
    let start = key
        .len()
        .checked_sub(8)
        .ok_or_else(|| corrupt(key, "key too short"))?;
    decode_u64(key, &key[start..])
}

/// Splits an index key `t/<topic>/<seq>` into topic and sequence.
pub fn split_index_key(key: &[u8]) -> Result<(Topic, u64), LogError> {
    let seq = seq_suffix(key)?;
    let body = key
        .strip_prefix(INDEX_PREFIX)
        .and_then(|k| k.get(..k.len().checked_sub(9)?))
        .ok_or_else(|| corrupt(key, "malformed index key"))?;
    let topic = std::str::from_utf8(body)
        .ok()
        .and_then(|t| Topic::parse(t).ok())
        .ok_or_else(|| corrupt(key, "index key holds an invalid topic"))?;
    Ok((topic, seq))
}

/// The topic of a watermark key `w/<topic>`.
pub fn split_trimmed_key(key: &[u8]) -> Result<Topic, LogError> {
    key.strip_prefix(TRIMMED_PREFIX)
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| Topic::parse(t).ok())
        .ok_or_else(|| corrupt(key, "watermark key holds an invalid topic"))
}

/// An encoded event record: the `e/<seq>` value and the `c/<seq><n>` pieces.
#[derive(Debug, Clone)]
pub struct Record {
    pub head: Vec<u8>,
    pub pieces: Vec<Vec<u8>>,
}

impl Record {
    /// Adds the record's keys to `batch`, so it lands atomically with the rest.
    pub fn insert_into(self, batch: &mut sled::Batch, seq: u64) {
        batch.insert(&event_key(seq), self.head);
        for (n, piece) in (1u32..).zip(self.pieces) {
            batch.insert(&piece_key(seq, n), piece);
        }
    }
}

/// Encodes an event record (version 2), cut into values of at most
/// [`MAX_VALUE_BYTES`].
pub fn encode_record(time_ms: u64, name: &EventName, topics: &[Topic], data: &str) -> Record {
    let body = encode_body(time_ms, name, topics, data);
    let first_len = body.len().min(MAX_VALUE_BYTES - V2_HEADER);
    let (first, rest) = body.split_at(first_len);
    let pieces: Vec<Vec<u8>> = rest.chunks(MAX_VALUE_BYTES).map(<[u8]>::to_vec).collect();
    let mut head = Vec::with_capacity(V2_HEADER + first.len());
    head.push(RECORD_V2);
    // At most 4 G pieces of 4 KiB: far above any body limit.
    head.extend_from_slice(&(pieces.len() as u32).to_be_bytes());
    head.extend_from_slice(first);
    Record { head, pieces }
}

/// The record body: everything but the version (module docs).
fn encode_body(time_ms: u64, name: &EventName, topics: &[Topic], data: &str) -> Vec<u8> {
    let topics_len: usize = topics.iter().map(|t| t.as_str().len() + 1).sum();
    let mut out = Vec::with_capacity(10 + name.as_str().len() + topics_len + data.len());
    out.extend_from_slice(&time_ms.to_be_bytes());
    // Lengths fit a byte: names are at most 100 bytes, topics at most 200, at most 64 topics.
    out.push(name.as_str().len() as u8);
    out.extend_from_slice(name.as_str().as_bytes());
    out.push(topics.len() as u8);
    for topic in topics {
        out.push(topic.as_str().len() as u8);
        out.extend_from_slice(topic.as_str().as_bytes());
    }
    out.extend_from_slice(data.as_bytes());
    out
}

/// Encodes a record as format 1 wrote it (one value, any size): for tests
/// of the upgrade, and nothing else.
pub fn encode_record_v1(time_ms: u64, name: &EventName, topics: &[Topic], data: &str) -> Vec<u8> {
    let mut out = vec![RECORD_V1];
    out.extend_from_slice(&encode_body(time_ms, name, topics, data));
    out
}

/// How many `c/` pieces follow the `e/<seq>` value `value` (0 for version 1).
pub fn piece_count(seq: u64, value: &[u8]) -> Result<u32, LogError> {
    match value.first() {
        Some(&RECORD_V1) => Ok(0),
        Some(&RECORD_V2) => value
            .get(1..V2_HEADER)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| corrupt(&event_key(seq), "truncated record header")),
        Some(_) => Err(corrupt(&event_key(seq), "unknown record version")),
        None => Err(corrupt(&event_key(seq), "empty record")),
    }
}

/// Removes a record's pieces in `batch`. Only after its `e/` key is gone
/// (in an earlier batch): a prefix of one batch that removed both could
/// leave a record without its pieces (module docs).
pub fn remove_pieces(batch: &mut sled::Batch, seq: u64, pieces: u32) {
    for n in 1..=pieces {
        batch.remove(&piece_key(seq, n));
    }
}

/// Reads event `seq` with all its pieces; `None` if it is not stored.
///
/// Safe against the trimmer removing the record meanwhile: it removes the
/// `e/` key before the pieces, in an earlier batch, so a piece that is gone
/// while `e/` is gone too is a concurrent trim (`None`), and only a piece
/// missing under a record that still exists is corruption.
pub fn read_record(tree: &sled::Tree, seq: u64) -> Result<Option<StoredEvent>, LogError> {
    let Some(value) = tree.get(event_key(seq))? else {
        return Ok(None);
    };
    match decode_record(tree, seq, &value) {
        Ok(event) => Ok(Some(event)),
        Err(e @ LogError::Corrupt { .. }) => match tree.get(event_key(seq))? {
            None => Ok(None),
            Some(_) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Decodes the record whose `e/<seq>` value is `value`, reading its pieces
/// from `tree`. A missing piece is corruption.
pub fn decode_record(tree: &sled::Tree, seq: u64, value: &[u8]) -> Result<StoredEvent, LogError> {
    let pieces = piece_count(seq, value)?;
    if pieces == 0 {
        let start = if value.first() == Some(&RECORD_V1) {
            1
        } else {
            V2_HEADER
        };
        let body = value.get(start..).unwrap_or_default();
        return decode_body(seq, body, Bytes::copy_from_slice);
    }
    let mut body = Vec::with_capacity(value.len() + pieces as usize * MAX_VALUE_BYTES);
    body.extend_from_slice(value.get(V2_HEADER..).unwrap_or_default());
    for n in 1..=pieces {
        let piece = tree
            .get(piece_key(seq, n))?
            .ok_or_else(|| corrupt(&event_key(seq), &format!("piece {n} of {pieces} missing")))?;
        body.extend_from_slice(&piece);
    }
    decode_body(seq, &body, Bytes::copy_from_slice)
}

/// What the trimmer needs of a record: its time, topics and piece count,
/// read without assembling the data (a long record's header is in its first
/// value, or in the first pieces when its topic list is very long).
pub struct RecordHeader {
    pub time_ms: u64,
    pub topics: Vec<Topic>,
    pub pieces: u32,
}

/// Decodes a record's header (module docs), reading pieces only as far as
/// the header reaches.
pub fn decode_header(tree: &sled::Tree, seq: u64, value: &[u8]) -> Result<RecordHeader, LogError> {
    let pieces = piece_count(seq, value)?;
    let start = if pieces == 0 && value.first() == Some(&RECORD_V1) {
        1
    } else {
        V2_HEADER
    };
    let mut body = value.get(start..).unwrap_or_default().to_vec();
    let mut next = 1;
    loop {
        match parse_header(&body) {
            Some((time_ms, _, topics, _)) => {
                return Ok(RecordHeader {
                    time_ms,
                    topics,
                    pieces,
                })
            }
            None if next <= pieces => {
                let piece = tree.get(piece_key(seq, next))?.ok_or_else(|| {
                    corrupt(
                        &event_key(seq),
                        &format!("piece {next} of {pieces} missing"),
                    )
                })?;
                body.extend_from_slice(&piece);
                next += 1;
            }
            None => return Err(corrupt(&event_key(seq), "truncated record header")),
        }
    }
}

/// Parses a body's header: time, name, topics and where the data starts.
/// `None` when it is truncated or invalid.
fn parse_header(body: &[u8]) -> Option<(u64, &str, Vec<Topic>, usize)> {
    let mut reader = Reader {
        bytes: body,
        pos: 0,
    };
    let time_ms = u64::from_be_bytes(reader.take(8)?.try_into().ok()?);
    let name_len = reader.byte()? as usize;
    let name = std::str::from_utf8(reader.take(name_len)?).ok()?;
    let topic_count = reader.byte()? as usize;
    let mut topics = Vec::with_capacity(topic_count);
    for _ in 0..topic_count {
        let len = reader.byte()? as usize;
        let topic = std::str::from_utf8(reader.take(len)?).ok()?;
        topics.push(Topic::parse(topic).ok()?);
    }
    Some((time_ms, name, topics, reader.pos))
}

/// Decodes a whole record body; any inconsistency is reported as
/// corruption, never a panic.
fn decode_body(
    seq: u64,
    body: &[u8],
    copy: impl FnOnce(&[u8]) -> Bytes,
) -> Result<StoredEvent, LogError> {
    let key = event_key(seq);
    let (time_ms, name, topics, data_start) =
        parse_header(body).ok_or_else(|| corrupt(&key, "truncated or invalid record header"))?;
    if EventName::parse(name).is_err() {
        return Err(corrupt(&key, "invalid event name"));
    }
    let name = EventName::from_log(name.to_owned());
    // One copy out of sled's buffer; the frame built from it is then shared.
    let data = copy(&body[data_start..]);
    Ok(StoredEvent {
        seq,
        time_ms,
        name,
        topics,
        data,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(slice)
    }
}

fn corrupt(key: &[u8], what: &str) -> LogError {
    LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        what: what.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_tree() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, db)
    }

    fn store(db: &sled::Db, seq: u64, record: Record) {
        let mut batch = sled::Batch::default();
        record.insert_into(&mut batch, seq);
        db.apply_batch(batch).unwrap();
    }

    #[test]
    fn record_round_trip() {
        let (_dir, db) = temp_tree();
        let name = EventName::parse("created").unwrap();
        let topics = vec![
            Topic::parse("a").unwrap(),
            Topic::parse("projects:all").unwrap(),
        ];
        store(&db, 9, encode_record(7, &name, &topics, r#"{"x":"é"}"#));
        let event = read_record(&db, 9).unwrap().unwrap();
        assert_eq!(
            (event.seq, event.time_ms, event.name.as_str()),
            (9, 7, "created")
        );
        assert_eq!(event.topics, topics);
        assert_eq!(&event.data[..], r#"{"x":"é"}"#.as_bytes());
        assert!(read_record(&db, 10).unwrap().is_none());
    }

    #[test]
    fn long_records_are_cut_into_small_values_and_read_back_whole() {
        let (_dir, db) = temp_tree();
        let name = EventName::parse("big").unwrap();
        // 64 topics of 200 bytes: even the header spans pieces.
        let topics: Vec<Topic> = (0..64)
            .map(|i| Topic::parse(&format!("{i:0>200}")).unwrap())
            .collect();
        let data = format!("\"{}\"", "x".repeat(1_000_000));
        let record = encode_record(5, &name, &topics, &data);
        assert!(record.head.len() <= MAX_VALUE_BYTES);
        assert!(record.pieces.iter().all(|p| p.len() <= MAX_VALUE_BYTES));
        assert!(record.pieces.len() > 200);
        let pieces = record.pieces.len() as u32;
        store(&db, 3, record);
        let event = read_record(&db, 3).unwrap().unwrap();
        assert_eq!((event.time_ms, event.topics.len()), (5, 64));
        assert_eq!(&event.data[..], data.as_bytes());
        let head = db.get(event_key(3)).unwrap().unwrap();
        let header = decode_header(&db, 3, &head).unwrap();
        assert_eq!((header.time_ms, header.pieces), (5, pieces));
        assert_eq!(header.topics, topics);
        // A missing piece is corruption, not a short event...
        db.remove(piece_key(3, pieces / 2)).unwrap();
        assert!(read_record(&db, 3).is_err());
        // ...unless the record itself is gone too: a trim that raced the read.
        let head_value = db.remove(event_key(3)).unwrap().unwrap();
        assert!(read_record(&db, 3).unwrap().is_none());
        db.insert(event_key(3), head_value).unwrap();
        // Removal takes every piece.
        let mut batch = sled::Batch::default();
        batch.remove(&event_key(3));
        remove_pieces(&mut batch, 3, pieces);
        db.apply_batch(batch).unwrap();
        assert_eq!(db.len(), 0);
    }

    #[test]
    fn format_1_records_are_still_read() {
        let (_dir, db) = temp_tree();
        let name = EventName::parse("old").unwrap();
        let topics = vec![Topic::parse("a").unwrap()];
        db.insert(event_key(1), encode_record_v1(9, &name, &topics, "[1]"))
            .unwrap();
        let event = read_record(&db, 1).unwrap().unwrap();
        assert_eq!((event.time_ms, &event.data[..]), (9, &b"[1]"[..]));
        let head = db.get(event_key(1)).unwrap().unwrap();
        assert_eq!(decode_header(&db, 1, &head).unwrap().pieces, 0);
    }

    #[test]
    fn truncated_records_are_corruption_not_panics() {
        let (_dir, db) = temp_tree();
        let name = EventName::parse("n").unwrap();
        let full = encode_record(1, &name, &[Topic::parse("a").unwrap()], "1").head;
        for len in 0..full.len() - 1 {
            db.insert(event_key(1), &full[..len]).unwrap();
            assert!(read_record(&db, 1).is_err(), "len {len}");
        }
        let v1 = encode_record_v1(1, &name, &[Topic::parse("a").unwrap()], "1");
        for len in 0..v1.len() - 1 {
            db.insert(event_key(1), &v1[..len]).unwrap();
            assert!(read_record(&db, 1).is_err(), "v1 len {len}");
        }
    }

    #[test]
    fn key_entries_round_trip() {
        let entry = KeyEntry {
            seq: 7,
            expires_ms: 9,
            digest: [3; 32],
        };
        assert_eq!(KeyEntry::decode(b"y/:k", &entry.encode()).unwrap(), entry);
        assert!(KeyEntry::decode(b"y/:k", &[0; 47]).is_err());
        assert_eq!(split_expiry_key(&expiry_key(5, "o:k")).unwrap(), (5, "o:k"));
        assert!(split_expiry_key(b"x/short").is_err());
        assert_eq!(split_key_key(&key_key("o:k")).unwrap(), "o:k");
    }

    /// The recovery argument of the module docs rests on this key order.
    #[test]
    fn pieces_sort_before_records_before_the_head_before_the_index() {
        let topic = Topic::parse("a").unwrap();
        let keys: Vec<Vec<u8>> = vec![
            piece_key(u64::MAX, u32::MAX).to_vec(),
            event_key(0).to_vec(),
            event_key(u64::MAX).to_vec(),
            HEAD_KEY.to_vec(),
            index_key(&topic, 0),
            trimmed_key(&topic),
            expiry_key(0, ":k"),
            key_key(":k"),
        ];
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys);
        assert!(piece_prefix(0).as_slice() < EVENT_PREFIX);
    }

    #[test]
    fn index_keys_split_back() {
        let topic = Topic::parse("projects:all").unwrap();
        let key = index_key(&topic, 77);
        assert_eq!(split_index_key(&key).unwrap(), (topic.clone(), 77));
        assert!(split_index_key(b"t/x").is_err());
        assert_eq!(split_trimmed_key(&trimmed_key(&topic)).unwrap(), topic);
        assert!(split_trimmed_key(b"w/a/b").is_err());
    }

    /// Exact bytes: a piece key is `c/`, the record's sequence, then `n`, so
    /// two records' pieces never share a key.
    #[test]
    fn piece_keys_are_c_then_the_sequence_then_the_piece_number() {
        let seq = 0x0102_0304_0506_0708;
        assert_eq!(&piece_prefix(seq), b"c/\x01\x02\x03\x04\x05\x06\x07\x08");
        assert_eq!(
            &piece_key(seq, 0x0a0b_0c0d),
            b"c/\x01\x02\x03\x04\x05\x06\x07\x08\x0a\x0b\x0c\x0d"
        );
        assert_eq!(&event_key(seq), b"e/\x01\x02\x03\x04\x05\x06\x07\x08");
        assert_ne!(piece_prefix(1), piece_prefix(2));
    }

    /// An expiry key must hold a scoped key after its 8-byte time.
    #[test]
    fn expiry_keys_without_a_scoped_key_are_corruption() {
        assert!(split_expiry_key(&expiry_key(5, "")).is_err());
        assert_eq!(
            split_expiry_key(b"x/\0\0\0\0\0\0\0\x05k").unwrap(),
            (5, "k")
        );
    }

    /// A long record fills its `e/` value and every piece but the last to
    /// exactly [`MAX_VALUE_BYTES`]: no more values than needed.
    #[test]
    fn long_records_fill_every_value_but_the_last() {
        let name = EventName::parse("big").unwrap();
        let topics = [Topic::parse("a").unwrap()];
        let data = format!("\"{}\"", "x".repeat(3 * MAX_VALUE_BYTES));
        let body_len = 8 + 1 + 3 + 1 + 1 + 1 + data.len();
        let record = encode_record(5, &name, &topics, &data);
        assert_eq!(record.head.len(), MAX_VALUE_BYTES);
        let rest = body_len - (MAX_VALUE_BYTES - V2_HEADER);
        assert_eq!(record.pieces.len(), rest.div_ceil(MAX_VALUE_BYTES));
        let (last, full) = record.pieces.split_last().unwrap();
        assert!(full.iter().all(|p| p.len() == MAX_VALUE_BYTES));
        assert_eq!(last.len(), rest - full.len() * MAX_VALUE_BYTES);
    }

    /// A short version-2 record's header is read from its `e/` value alone,
    /// and a leftover piece beyond the record's count (a write never
    /// acknowledged) is never read into it.
    #[test]
    fn headers_are_read_only_from_the_record_and_its_own_pieces() {
        let (_dir, db) = temp_tree();
        let name = EventName::parse("n").unwrap();
        let topics = vec![Topic::parse("a").unwrap(), Topic::parse("b").unwrap()];
        let record = encode_record(7, &name, &topics, "1");
        assert!(record.pieces.is_empty());
        let head = record.head.clone();
        let header = decode_header(&db, 4, &head).unwrap();
        assert_eq!((header.time_ms, header.pieces), (7, 0));
        assert_eq!(header.topics, topics);
        // The header cut after the name; the rest in a stray piece 1.
        let cut = V2_HEADER + 8 + 1 + 1;
        db.insert(piece_key(4, 1), &head[cut..]).unwrap();
        assert!(decode_header(&db, 4, &head[..cut]).is_err());
    }
}
