//! `export` from and `import` into a Redis log, for the operator CLI: the
//! same JSON-lines format as a sled data directory's (written by
//! [`ExportWriter`], read and validated by the sled import), so a log moves
//! between backends keeping its epoch, ids, head, watermarks and unexpired
//! idempotency keys.
//!
//! **Export** reads the version, epoch and head first, then the watermarks,
//! then the stream up to that head, then the idempotency keys (`SCAN`). It is
//! a consistent snapshot only while no gateway writes the log: a publish
//! meanwhile is left out (it is above the head read at the start) but a
//! retention trim meanwhile may remove events the export has not reached.
//!
//! **Import** refuses a log that exists (any key under its hash tag), then
//! validates the whole export by importing it into a temporary sled
//! directory (the sled import's rules and index reconstruction, once), then
//! writes the layout of `migrations/redis/v1.md` from it: the epoch and head
//! first, the events, indexes and keys, and the version key last. The
//! gateway's `init` refuses keys without a version key, so an import that
//! fails part way leaves nothing a gateway would take for a log; it also
//! deletes what it wrote, as far as Redis still answers.
//!
//! A single server only: finding the idempotency keys needs `SCAN`, which a
//! Cluster answers per node (the CLI refuses `redis-cluster` for now).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, Write};

use redis::Value;

use super::connections::{redis_err, Conn, RedisClients};
use super::replies::{decode_event, entry_fields, text, StreamPos};
use super::CURRENT_LAYOUT;
use crate::log::sled::codec::KeyEntry;
use crate::log::sled::offline::{
    self, ExportStats, ExportWriter, ImportStats, OfflineError, OfflineLog, Progress, Unit,
};
use crate::model::{Epoch, Topic};

/// Stream entries read, or events written, per round trip.
const CHUNK: usize = 1000;

/// The key prefix of the log `{tag}`: `{tag}:`.
fn prefix(tag: &str) -> String {
    format!("{{{tag}}}:")
}

fn redis_error(e: redis::RedisError) -> OfflineError {
    OfflineError::Log(redis_err(e))
}

async fn query<T: redis::FromRedisValue>(
    cmd: &redis::Cmd,
    conn: &mut Conn,
) -> Result<T, OfflineError> {
    cmd.query_async(conn).await.map_err(redis_error)
}

/// Up to `limit` keys matching `pattern` (a full `SCAN`, stopping early).
async fn scan(conn: &mut Conn, pattern: &str, limit: usize) -> Result<Vec<String>, OfflineError> {
    let mut found = BTreeSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = query(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(CHUNK),
            conn,
        )
        .await?;
        found.extend(keys);
        if next == 0 || found.len() >= limit {
            return Ok(found.into_iter().take(limit).collect());
        }
        cursor = next;
    }
}

/// Writes the export of the log `{tag}` to `out`.
pub async fn export(
    clients: &RedisClients,
    tag: &str,
    out: &mut dyn Write,
    progress: &mut dyn Progress,
) -> Result<ExportStats, OfflineError> {
    let p = prefix(tag);
    let mut conn = clients.shared().await?;
    let (version, epoch, head): (Option<String>, Option<String>, Option<String>) = query(
        redis::cmd("MGET")
            .arg(format!("{p}version"))
            .arg(format!("{p}epoch"))
            .arg(format!("{p}head")),
        &mut conn,
    )
    .await?;
    let Some(version) = version else {
        let keys = scan(&mut conn, &format!("{p}*"), 1).await?;
        return Err(OfflineError::Redis(if keys.is_empty() {
            format!(
                "Redis holds no log under {p}* (check --storage-url, storage.key_prefix and --org)"
            )
        } else {
            format!("Redis holds keys under {p}* but no {p}version: not a complete log (an interrupted import?)")
        }));
    };
    if version.parse::<u32>().ok() != Some(CURRENT_LAYOUT) {
        return Err(OfflineError::Redis(format!(
            "{p}version is {version:?}: this build exports layout {CURRENT_LAYOUT} only"
        )));
    }
    let epoch = epoch
        .as_deref()
        .and_then(Epoch::parse)
        .ok_or_else(|| OfflineError::Redis(format!("{p}epoch is missing or not an epoch")))?;
    let head: u64 = head
        .as_deref()
        .and_then(|h| h.parse().ok())
        .ok_or_else(|| OfflineError::Redis(format!("{p}head is missing or not a number")))?;

    let raw: std::collections::HashMap<String, u64> =
        query(redis::cmd("HGETALL").arg(format!("{p}w")), &mut conn)
            .await
            .map_err(|_| OfflineError::Redis(format!("{p}w: not a hash of topic → sequence")))?;
    let mut trimmed = BTreeMap::new();
    for (topic, through) in raw {
        let topic = Topic::parse(&topic)
            .map_err(|e| OfflineError::Redis(format!("{p}w: {topic:?}: {e}")))?;
        trimmed.insert(topic, through.min(head));
    }

    let mut writer = ExportWriter::new(out, &epoch, head, &trimmed)?;
    progress.phase("exporting", Some(head), Unit::Items);
    let log_key = format!("{p}log");
    let mut start = "-".to_owned();
    loop {
        let value: Value = query(
            redis::cmd("XRANGE")
                .arg(&log_key)
                .arg(&start)
                .arg(head)
                .arg("COUNT")
                .arg(CHUNK),
            &mut conn,
        )
        .await?;
        let bad = |what: &str| {
            OfflineError::Redis(format!("{log_key}: {what}; not an sse-gateway stream"))
        };
        let Value::Array(entries) = value else {
            return Err(bad("XRANGE did not answer a list"));
        };
        let count = entries.len();
        for entry in entries {
            let Value::Array(parts) = entry else {
                return Err(bad("an entry is not [id, fields]"));
            };
            let pos = parts
                .first()
                .and_then(text)
                .and_then(|t| StreamPos::parse(&t))
                .ok_or_else(|| bad("an entry id is not <a>-<b>"))?;
            start = StreamPos(pos.0, pos.1 + 1).render();
            if pos.1 != 0 {
                continue; // a trim marker, not an event
            }
            let fields = parts
                .get(1)
                .and_then(entry_fields)
                .ok_or_else(|| bad("entry fields"))?;
            let event = decode_event(&log_key, pos.0, &fields)?;
            writer.event(&event, || format!("{log_key} {}", pos.render()))?;
            progress.position(pos.0);
        }
        if count < CHUNK {
            break;
        }
    }

    let keys_prefix = format!("{p}i:");
    let names = scan(&mut conn, &format!("{keys_prefix}*"), usize::MAX).await?;
    let now = crate::log::sled::now_ms();
    for chunk in names.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for name in chunk {
            pipe.cmd("GET").arg(name).cmd("PTTL").arg(name);
        }
        let values: Vec<(Option<String>, i64)> = pipe
            .query_async::<Vec<Value>>(&mut conn)
            .await
            .map_err(redis_error)?
            .chunks(2)
            .map(|pair| {
                let value = pair.first().and_then(text);
                let ttl = pair.get(1).and_then(text).and_then(|t| t.parse().ok());
                (value, ttl.unwrap_or(-2))
            })
            .collect();
        for (name, (value, ttl)) in chunk.iter().zip(values) {
            // Gone meanwhile (-2), or no expiry (-1: not a key the gateway wrote).
            let (Some(value), Ok(ttl)) = (value, u64::try_from(ttl)) else {
                continue;
            };
            let scoped = name.strip_prefix(&keys_prefix).unwrap_or(name);
            let entry = value
                .split_once(' ')
                .and_then(|(seq, digest)| {
                    Some(KeyEntry {
                        seq: seq.parse().ok()?,
                        expires_ms: now + ttl,
                        digest: crate::idempotency::parse_hex(digest)?,
                    })
                })
                .ok_or_else(|| {
                    OfflineError::Redis(format!("{name}: not \"<seq> <digest hex>\""))
                })?;
            // Stored by a publish after the head this export read.
            if entry.seq > head || ttl == 0 {
                continue;
            }
            writer.key(scoped, &entry)?;
        }
    }
    let stats = writer.finish()?;
    progress.finish();
    Ok(stats)
}

/// Imports an export into the log `{tag}`, which must not exist (no key
/// under its hash tag). Module docs: how.
pub async fn import(
    clients: &RedisClients,
    tag: &str,
    input: &mut dyn BufRead,
    input_len: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<ImportStats, OfflineError> {
    let p = prefix(tag);
    let mut conn = clients.shared().await?;
    ensure_absent(&mut conn, &p).await?;

    let staging = tempfile::Builder::new()
        .prefix("sse-gateway-import-")
        .tempdir()
        .map_err(|error| OfflineError::Io {
            what: "cannot make a temporary directory to validate the export in".into(),
            error,
        })?;
    let dir = staging.path().join("log");
    let stats = offline::import(&dir, input, input_len, progress)?;
    let log = OfflineLog::open_owned(&dir, staging)?;

    let mut written = Written::default();
    let result = write_log(&mut conn, &p, &log, &stats, &mut written, progress).await;
    if result.is_err() {
        // Best effort: the missing version key already keeps gateways off it.
        for chunk in written.keys().chunks(CHUNK) {
            let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
    }
    result.map(|()| stats)
}

/// Refuses a log with any key under the prefix, naming some of them.
async fn ensure_absent(conn: &mut Conn, p: &str) -> Result<(), OfflineError> {
    const NAMED: usize = 5;
    let found = scan(conn, &format!("{p}*"), NAMED + 1).await?;
    if found.is_empty() {
        return Ok(());
    }
    let more = if found.len() > NAMED { ", …" } else { "" };
    let named: Vec<&str> = found.iter().take(NAMED).map(String::as_str).collect();
    Err(OfflineError::Exists(format!(
        "Redis already holds a log under {p}* ({}{more}): import only into a log that does not \
         exist (another storage.key_prefix, or delete those keys first)",
        named.join(", ")
    )))
}

/// The keys an import wrote, to delete them if it fails.
#[derive(Default)]
struct Written {
    fixed: Vec<String>,
    topics: HashSet<String>,
    keys: Vec<String>,
}

impl Written {
    fn keys(&self) -> Vec<String> {
        self.fixed
            .iter()
            .chain(&self.topics)
            .chain(&self.keys)
            .cloned()
            .collect()
    }
}

async fn write_log(
    conn: &mut Conn,
    p: &str,
    log: &OfflineLog,
    stats: &ImportStats,
    written: &mut Written,
    progress: &mut dyn Progress,
) -> Result<(), OfflineError> {
    let key = |name: &str| format!("{p}{name}");
    // First, and only if no one made the log since it was checked (else
    // nothing of it is ours to delete): keys without a version key are
    // refused by every gateway's `init`.
    let claimed: Option<String> = query(
        redis::cmd("SET")
            .arg(key("epoch"))
            .arg(log.epoch().as_str())
            .arg("NX"),
        conn,
    )
    .await?;
    if claimed.is_none() {
        return Err(OfflineError::Exists(format!(
            "{p}epoch appeared while importing: another import or a gateway made the log {p}*; \
             nothing was written"
        )));
    }
    written.fixed = ["epoch", "head", "log", "rc", "w", "topics", "version"]
        .iter()
        .map(|name| key(name))
        .collect();
    query::<()>(redis::cmd("SET").arg(key("head")).arg(log.head()), conn).await?;

    let trimmed = log.trimmed()?;
    progress.phase("writing to redis", Some(stats.events), Unit::Items);
    let mut pipe = redis::pipe();
    let mut queued = 0usize;
    let mut done = 0u64;
    for event in log.events() {
        let event = event?;
        let seq = event.seq;
        let mut indexed = 0u64;
        for topic in &event.topics {
            let name = topic.as_str();
            pipe.cmd("SADD").arg(key("topics")).arg(name).ignore();
            if seq > trimmed.get(topic).copied().unwrap_or(0) {
                let index = key(&format!("t:{name}"));
                pipe.cmd("ZADD").arg(&index).arg(seq).arg(seq).ignore();
                written.topics.insert(index);
                indexed += 1;
            }
        }
        let topics: Vec<&str> = event.topics.iter().map(Topic::as_str).collect();
        pipe.cmd("HSET")
            .arg(key("rc"))
            .arg(seq)
            .arg(indexed)
            .ignore()
            .cmd("XADD")
            .arg(key("log"))
            .arg(format!("{seq}-0"))
            .arg("n")
            .arg(event.name.as_str())
            .arg("ms")
            .arg(event.time_ms)
            .arg("t")
            .arg(topics.join(" "))
            .arg("d")
            .arg(&event.data[..])
            .arg("x")
            .arg("")
            .ignore();
        queued += 1;
        if queued >= CHUNK {
            pipe.query_async::<()>(conn).await.map_err(redis_error)?;
            pipe = redis::pipe();
            done += queued as u64;
            queued = 0;
            progress.position(done);
        }
    }
    for (topic, through) in &trimmed {
        pipe.cmd("HSET")
            .arg(key("w"))
            .arg(topic.as_str())
            .arg(*through)
            .ignore()
            .cmd("SADD")
            .arg(key("topics"))
            .arg(topic.as_str())
            .ignore();
    }
    let now = crate::log::sled::now_ms();
    for item in log.idempotency_keys() {
        let (scoped, entry) = item?;
        let Some(window) = entry.expires_ms.checked_sub(now).filter(|w| *w > 0) else {
            continue; // its window ended since the export
        };
        let name = key(&format!("i:{scoped}"));
        pipe.cmd("SET")
            .arg(&name)
            .arg(format!(
                "{} {}",
                entry.seq,
                crate::idempotency::hex(&entry.digest)
            ))
            .arg("PX")
            .arg(window)
            .ignore();
        written.keys.push(name);
        queued += 1;
        if queued >= CHUNK {
            pipe.query_async::<()>(conn).await.map_err(redis_error)?;
            pipe = redis::pipe();
            queued = 0;
        }
    }
    if !pipe.is_empty() {
        pipe.query_async::<()>(conn).await.map_err(redis_error)?;
    }
    // Last: only now is it a log a gateway opens.
    query::<()>(
        redis::cmd("SET").arg(key("version")).arg(CURRENT_LAYOUT),
        conn,
    )
    .await?;
    progress.finish();
    Ok(())
}
