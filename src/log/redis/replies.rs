//! Decoding of what Redis answers: stream entries, entry fields, script
//! replies, the events and trim state stored in entries.
//!
//! Pure functions over [`redis::Value`], RESP2 and RESP3 alike; anything
//! malformed is `None` or [`LogError::Corrupt`], never a panic.

use std::collections::HashMap;

use bytes::Bytes;
use redis::Value;

use crate::log::stats::{StatsTable, TopicStats};
use crate::log::{LogError, StoredEvent};
use crate::model::{EventName, Topic};

/// A consistent view of a log at one instant.
pub(super) struct Snapshot {
    /// `{tag}:epoch`, if Redis still holds one.
    pub epoch: Option<String>,
    /// `{tag}:head`: the last assigned sequence.
    pub head: u64,
    /// The newest stream entry: where a tailer continues from.
    pub last_id: StreamPos,
    /// `{tag}:r` `seq`: every event up to it is known to be on
    /// `wait_replicas` replicas (`None`: no commit marker was ever written).
    pub replicated: Option<u64>,
    /// Every topic's counts and watermark at that instant.
    pub topics: HashMap<Topic, TopicStats>,
}

/// Decodes the script's `snapshot` answer: epoch, head, last stream id, the
/// replicated watermark (or nil), then one `[topic, count, first, last,
/// watermark]` per topic.
pub(super) fn decode_snapshot(log_key: &str, value: Value) -> Result<Snapshot, LogError> {
    let bad = |what: &str| LogError::Corrupt {
        key: log_key.to_owned(),
        what: format!("snapshot: {what}"),
    };
    let Value::Array(items) = value else {
        return Err(bad("not an array"));
    };
    let mut items = items.into_iter();
    let epoch = items.next().and_then(|v| text(&v));
    let head = items
        .next()
        .and_then(|v| number(&v))
        .ok_or_else(|| bad("head"))?;
    let last_id = items
        .next()
        .and_then(|v| text(&v))
        .and_then(|t| StreamPos::parse(&t))
        .ok_or_else(|| bad("last id"))?;
    let replicated = match items.next() {
        Some(Value::Nil) | Some(Value::Boolean(false)) => None,
        Some(v) => Some(number(&v).ok_or_else(|| bad("replicated watermark"))?),
        None => return Err(bad("replicated watermark missing")),
    };
    let mut topics = HashMap::new();
    for item in items {
        let Value::Array(fields) = item else {
            return Err(bad("topic entry"));
        };
        let [t, count, first, last, wm] = fields.as_slice() else {
            return Err(bad("topic entry length"));
        };
        let topic = text(t)
            .and_then(|t| Topic::parse(&t).ok())
            .ok_or_else(|| bad("topic"))?;
        let num = |v: &Value| number(v).ok_or_else(|| bad("topic number"));
        topics.insert(
            topic,
            TopicStats {
                count: num(count)?,
                first: num(first)?,
                last: num(last)?,
                trimmed_through: num(wm)?,
            },
        );
    }
    Ok(Snapshot {
        epoch,
        head,
        last_id,
        replicated,
        topics,
    })
}

/// A stream entry id `<a>-<b>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(super) struct StreamPos(pub u64, pub u64);

impl StreamPos {
    /// Parses `<a>-<b>`.
    pub fn parse(raw: &str) -> Option<Self> {
        let (a, b) = raw.split_once('-')?;
        Some(Self(a.parse().ok()?, b.parse().ok()?))
    }

    /// The id as Redis writes it.
    pub fn render(self) -> String {
        format!("{}-{}", self.0, self.1)
    }
}

/// A string reply (or an integer, as text).
pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A non-negative integer reply, as an integer or as text.
pub(super) fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// The raw bytes of a string reply.
pub(super) fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The fields of one stream entry, `[k, v, k, v, …]` or a map.
pub(super) fn entry_fields(value: &Value) -> Option<HashMap<String, &Value>> {
    let mut out = HashMap::new();
    match value {
        Value::Array(flat) => {
            for pair in flat.chunks(2) {
                if let [k, v] = pair {
                    out.insert(text(k)?, v);
                }
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                out.insert(text(k)?, v);
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Decodes an event entry `<seq>-0` back into a [`StoredEvent`].
pub(super) fn decode_event(
    log_key: &str,
    seq: u64,
    fields: &HashMap<String, &Value>,
) -> Result<StoredEvent, LogError> {
    let bad = |what: &str| LogError::Corrupt {
        key: format!("{log_key} {seq}-0"),
        what: what.to_owned(),
    };
    let name = fields
        .get("n")
        .and_then(|v| text(v))
        .filter(|n| EventName::parse(n).is_ok())
        .ok_or_else(|| bad("invalid event name"))?;
    let time_ms = fields
        .get("ms")
        .and_then(|v| number(v))
        .ok_or_else(|| bad("invalid time"))?;
    let topics = fields
        .get("t")
        .and_then(|v| text(v))
        .ok_or_else(|| bad("missing topics"))?
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| Topic::parse(t).map_err(|_| bad("invalid topic")))
        .collect::<Result<Vec<_>, _>>()?;
    let data = fields
        .get("d")
        .and_then(|v| bytes_of(v))
        .ok_or_else(|| bad("missing data"))?;
    Ok(StoredEvent {
        seq,
        time_ms,
        name: EventName::from_log(name),
        topics,
        data: Bytes::copy_from_slice(data),
    })
}

/// Applies an entry's `x` field ("topic count first watermark", comma
/// separated) to the local stats.
pub(super) fn apply_trim_text(stats: &StatsTable, state: &str) {
    for record in state.split(',').filter(|r| !r.is_empty()) {
        let mut parts = record.split(' ');
        let parsed = (|| {
            let topic = Topic::parse(parts.next()?).ok()?;
            let count = parts.next()?.parse().ok()?;
            let first = parts.next()?.parse().ok()?;
            let wm = parts.next()?.parse().ok()?;
            Some((topic, count, first, wm))
        })();
        match parsed {
            Some((topic, count, first, wm)) => stats.set_trimmed_state(&topic, count, first, wm),
            None => tracing::warn!(record, "malformed trim state in the redis log"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::RetentionFloor;

    #[test]
    fn stream_positions_order_like_redis() {
        let a = StreamPos::parse("9-0").unwrap();
        let b = StreamPos::parse("9-2").unwrap();
        let c = StreamPos::parse("10-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(c.render(), "10-0");
        assert!(StreamPos::parse("x-1").is_none());
        assert!(StreamPos::parse("5").is_none());
    }

    #[test]
    fn trim_state_sets_absolute_values() {
        let stats = StatsTable::default();
        let t = Topic::parse("a").unwrap();
        stats.record_appends(
            [
                (std::slice::from_ref(&t), 1u64),
                (std::slice::from_ref(&t), 2),
            ]
            .into_iter(),
        );
        apply_trim_text(&stats, "a 1 2 1");
        assert_eq!(
            stats.retention_floor(std::slice::from_ref(&t)),
            RetentionFloor {
                trimmed_through: 1,
                oldest: Some(2)
            }
        );
        assert_eq!(stats.info(&t).count, 1);
    }
}
