//! Key layout and record encoding of the sled log (format version 1).
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
//! | `t/<topic>/<seq u64 BE>`    | empty: the topic index                 |
//! | `w/<topic>`                 | highest sequence trimmed from topic    |
//!
//! Big-endian sequences sort numerically, so range scans are in id order.
//! Topics cannot contain `/`, so `t/<topic>/` is an exact prefix.
//!
//! Event record: `1u8` (record version), `time_ms u64 BE`, `name_len u8`,
//! name, `topic_count u8`, then per topic `len u8` + bytes, then the compact
//! JSON data to the end.

use bytes::Bytes;

use crate::log::{LogError, StoredEvent};
use crate::model::{EventName, Topic};

pub const FORMAT_KEY: &[u8] = b"m/format";
pub const EPOCH_KEY: &[u8] = b"m/epoch";
pub const HEAD_KEY: &[u8] = b"m/head";
pub const EVENT_PREFIX: &[u8] = b"e/";
pub const INDEX_PREFIX: &[u8] = b"t/";
pub const TRIMMED_PREFIX: &[u8] = b"w/";

const RECORD_VERSION: u8 = 1;

/// `e/<seq>`
pub fn event_key(seq: u64) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(EVENT_PREFIX);
    key[2..].copy_from_slice(&seq.to_be_bytes());
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

/// Encodes an event record.
pub fn encode_record(time_ms: u64, name: &EventName, topics: &[Topic], data: &str) -> Vec<u8> {
    let topics_len: usize = topics.iter().map(|t| t.as_str().len() + 1).sum();
    let mut out = Vec::with_capacity(11 + name.as_str().len() + topics_len + data.len());
    out.push(RECORD_VERSION);
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

/// Decodes an event record; any inconsistency is reported as corruption,
/// never a panic.
pub fn decode_record(seq: u64, value: &sled::IVec) -> Result<StoredEvent, LogError> {
    let key = event_key(seq);
    let bad = |what: &str| corrupt(&key, what);
    let mut reader = Reader {
        bytes: value,
        pos: 0,
    };
    if reader.byte().ok_or_else(|| bad("empty record"))? != RECORD_VERSION {
        return Err(bad("unknown record version"));
    }
    let time_ms = u64::from_be_bytes(
        reader
            .take(8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("truncated time"))?,
    );
    let name_len = reader.byte().ok_or_else(|| bad("truncated name"))? as usize;
    let name = reader
        .take(name_len)
        .and_then(|b| std::str::from_utf8(b).ok())
        .filter(|n| EventName::parse(n).is_ok())
        .ok_or_else(|| bad("invalid event name"))?;
    let name = EventName::from_log(name.to_owned());
    let topic_count = reader.byte().ok_or_else(|| bad("truncated topics"))? as usize;
    let mut topics = Vec::with_capacity(topic_count);
    for _ in 0..topic_count {
        let len = reader.byte().ok_or_else(|| bad("truncated topic"))? as usize;
        let topic = reader
            .take(len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|t| Topic::parse(t).ok())
            .ok_or_else(|| bad("invalid topic"))?;
        topics.push(topic);
    }
    let data_start = reader.pos;
    // One copy out of sled's buffer; the frame built from it is then shared.
    let data = Bytes::copy_from_slice(&value[data_start..]);
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

    #[test]
    fn record_round_trip() {
        let name = EventName::parse("created").unwrap();
        let topics = vec![
            Topic::parse("a").unwrap(),
            Topic::parse("projects:all").unwrap(),
        ];
        let value = sled::IVec::from(encode_record(7, &name, &topics, r#"{"x":"é"}"#));
        let event = decode_record(9, &value).unwrap();
        assert_eq!(
            (event.seq, event.time_ms, event.name.as_str()),
            (9, 7, "created")
        );
        assert_eq!(event.topics, topics);
        assert_eq!(&event.data[..], r#"{"x":"é"}"#.as_bytes());
    }

    #[test]
    fn truncated_records_are_corruption_not_panics() {
        let name = EventName::parse("n").unwrap();
        let full = encode_record(1, &name, &[Topic::parse("a").unwrap()], "1");
        for len in 0..full.len() - 1 {
            assert!(
                decode_record(1, &sled::IVec::from(&full[..len])).is_err(),
                "len {len}"
            );
        }
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
}
