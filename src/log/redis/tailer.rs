//! The Redis log's tailer: how this node learns of every event, whoever
//! appended it, and hands it to the local hub.
//!
//! One tailer per log and node: a blocking `XREAD` on its own connection (the
//! shared one is multiplexed and would stall; its response timeout is set
//! above the block time). For each event it raises this node's durable head
//! *then* hands the event to the hub, the same ordering as the sled writer,
//! so `subscription`'s no-gap/no-duplicate argument holds unchanged: readers
//! never read past the head this node has seen.
//!
//! After a reconnect it checks the epoch and the head (a changed epoch or a
//! head that went back means Redis lost data: the log then refuses writes
//! until the gateway restarts and says why), reloads stats and continues
//! from the last entry it saw, so open streams resume with no gap. It does the
//! same when the probe's watchdog says its tail went silent (see `probe`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::connections::{redis_err, Conn, TAIL_BLOCK};
use super::replies::{apply_trim_state, decode_event, entry_fields, text, StreamPos};
use super::shared::{snapshot, Shared};
use crate::log::{hand_off, LogError};

/// Entries taken per `XREAD`.
const TAIL_COUNT: usize = 1024;

/// Follows the log until `stop`: reconnects with backoff, resyncs, then
/// blocks in `XREAD` for new entries.
pub(super) async fn run_tailer(shared: Arc<Shared>, start: StreamPos, stop: CancellationToken) {
    let mut last = start;
    let mut backoff = Duration::from_millis(50);
    while !stop.is_cancelled() {
        if shared.failure().is_some() {
            return;
        }
        let mut conn = match shared.clients.dedicated(true).await {
            Ok(conn) => conn,
            Err(e) => {
                shared.unhealthy(&e);
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        // Trims of entries this node never saw may have happened meanwhile:
        // take fresh stats; entries up to the snapshot skip the stats update.
        let stats_through = match shared.resync(&mut conn).await {
            Ok(through) => through,
            Err(e) => {
                shared.unhealthy(&e);
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        shared.healthy.store(true, Ordering::Release);
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(TAIL_COUNT)
                .arg("BLOCK")
                .arg(TAIL_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&shared.log_key)
                .arg(last.render());
            let read = xread.query_async::<Value>(&mut conn);
            let value = tokio::select! {
                () = stop.cancelled() => return,
                // The probe's watchdog: the tail brought nothing back for two
                // probe intervals; a new connection, from where we were.
                () = shared.probe.stale.notified() => break,
                value = read => value,
            };
            match value {
                Ok(value) => {
                    shared.healthy.store(true, Ordering::Release);
                    shared.take_entries(&value, &mut last, stats_through);
                }
                Err(e) => {
                    shared.unhealthy(&redis_err(e));
                    break;
                }
            }
        }
    }
}

async fn sleep_or_stop(stop: &CancellationToken, wait: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(wait) => {}
    }
}

impl Shared {
    /// Checks the log is still the one we opened and reloads stats. Returns
    /// the stream position the stats include.
    async fn resync(&self, conn: &mut Conn) -> Result<StreamPos, LogError> {
        let snap = snapshot(&self.script, &self.log_key, conn).await?;
        if snap.epoch.as_deref() != Some(self.epoch.as_str()) {
            return Err(LogError::Lost(format!(
                "Redis no longer holds log {} of epoch {} (it has {}): it lost its data; \
                 restart the gateways to start a new log (clients then get a reset)",
                self.log_key,
                self.epoch.as_str(),
                snap.epoch.as_deref().unwrap_or("none"),
            )));
        }
        let seen = self.durable_head.load(Ordering::Acquire);
        if snap.head < seen {
            return Err(LogError::Lost(format!(
                "the head of {} went back from {seen} to {}: Redis lost acknowledged events \
                 (persistence off, or appendfsync everysec/no and a crash); restart the gateways",
                self.log_key, snap.head
            )));
        }
        self.stats.replace(snap.topics);
        // Everything up to the Redis head is stored or trimmed: readable now.
        self.raise_head(snap.head);
        Ok(snap.last_id)
    }

    /// Feeds the entries of one `XREAD` answer to the stats, head and hub.
    fn take_entries(&self, value: &Value, last: &mut StreamPos, stats_through: StreamPos) {
        // [[key, [[id, fields], …]]] (RESP2) or {key: [[id, fields], …]} (RESP3).
        let streams: Vec<&Value> = match value {
            Value::Nil => return,
            Value::Array(streams) => streams
                .iter()
                .filter_map(|s| match s {
                    Value::Array(pair) => pair.get(1),
                    _ => None,
                })
                .collect(),
            Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
            _ => return,
        };
        for entries in streams {
            let Value::Array(entries) = entries else {
                continue;
            };
            for entry in entries {
                let Value::Array(parts) = entry else { continue };
                let (Some(id), Some(fields)) = (
                    parts
                        .first()
                        .and_then(text)
                        .and_then(|t| StreamPos::parse(&t)),
                    parts.get(1).and_then(entry_fields),
                ) else {
                    tracing::error!(log = %self.log_key, "malformed entry in the redis log; skipped");
                    continue;
                };
                if id <= *last {
                    continue;
                }
                *last = id;
                self.take_entry(id, &fields, id <= stats_through);
            }
        }
    }

    fn take_entry(&self, id: StreamPos, fields: &HashMap<String, &Value>, counted: bool) {
        if id.1 != 0 {
            // A delivery probe (ours or another node's), or a trim marker.
            if let Some(node) = fields.get("p") {
                if text(node).as_deref() == Some(self.probe.node.as_str()) {
                    self.probe.returned(id);
                }
                return;
            }
            if !counted {
                apply_trim_state(&self.stats, fields);
            }
            return;
        }
        let seq = id.0;
        let event = match decode_event(&self.log_key, seq, fields) {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(error = %e, "undecodable event in the redis log; skipped");
                self.raise_head(seq);
                return;
            }
        };
        if !counted {
            self.stats
                .record_appends(std::iter::once((&event.topics[..], seq)));
            apply_trim_state(&self.stats, fields);
        }
        // Head first, then the hub: a subscriber that reads the head after
        // subscribing misses nothing (see `subscription`).
        self.raise_head(seq);
        hand_off(
            &self.hub,
            &self.epoch,
            seq,
            &event.name,
            event.topics,
            &event.data,
            Instant::now(),
        );
    }
}
