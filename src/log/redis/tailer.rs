//! The Redis log's tailer: how this node learns of every event, whoever
//! appended it, and hands it to the local hub.
//!
//! One tailer per log and node: a blocking `XREAD` on its own connection (the
//! shared one is multiplexed and would stall; its response timeout is set
//! above the block time). For each event it raises this node's durable head
//! *then* hands the event to the hub, the same ordering as the sled writer,
//! so `subscription`'s no-gap/no-duplicate argument holds unchanged: readers
//! never read past the head this node has delivered.
//!
//! **Replicated delivery.** With `storage.wait_replicas = 0` an event is
//! delivered as soon as it is read. With `wait_replicas >= 1` the tailer
//! delivers (to the hub, and as the durable head replay reads stop at) only
//! events known to be on that many replicas: it holds what it reads until a
//! commit marker covering it arrives (an entry `<head>-<n>` with field `c`,
//! written by a writer after its `WAIT` succeeded, see `writer`). So an event
//! that a failover loses (its `WAIT` failed, its publisher got a `503`) was
//! never shown to anyone, and the promoted primary reusing its sequence
//! un-says nothing. Events, trim markers and markers are released in stream
//! order.
//!
//! After a reconnect it drops what it holds, re-reads from the last entry it
//! *delivered*, checks the epoch and the head against what it delivered (a
//! changed epoch or a head below it means Redis lost data: the log then
//! refuses writes until the gateway restarts and says why), reloads stats
//! and goes on, so open streams resume with no gap. It does the same when the
//! probe's watchdog says its tail went silent (see `probe`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::connections::{redis_err, Conn, TAIL_BLOCK};
use super::replies::{apply_trim_text, decode_event, entry_fields, number, text, StreamPos};
use super::shared::{snapshot, Shared};
use crate::log::{hand_off, LogError, StoredEvent};

/// Entries taken per `XREAD`.
const TAIL_COUNT: usize = 1024;

/// Where the tail stands: what it read, delivered and holds.
pub(super) struct TailState {
    /// The last entry read: the next `XREAD` continues after it.
    read: StreamPos,
    /// The last entry delivered: a new connection re-reads from here, since
    /// what was held may not be on a promoted replica.
    delivered: StreamPos,
    /// Events up to this sequence are known replicated and are delivered as
    /// soon as read (`u64::MAX` with `wait_replicas = 0`: no holding).
    released: u64,
    /// Read, not yet covered by a commit marker; stream order.
    held: VecDeque<Held>,
}

/// One entry read and held.
struct Held {
    id: StreamPos,
    what: HeldEntry,
    /// Already counted in the stats (read before the last stats snapshot).
    counted: bool,
}

enum HeldEntry {
    /// An event and its entry's trim state.
    Event(StoredEvent, Option<String>),
    /// A trim marker's state.
    Trim(Option<String>),
    /// An event entry that did not decode: only moves the head.
    Skip,
}

impl TailState {
    /// A tail that starts after `start`, with events up to `released`
    /// known replicated.
    pub fn new(start: StreamPos, released: u64) -> Self {
        Self {
            read: start,
            delivered: start,
            released,
            held: VecDeque::new(),
        }
    }
}

/// Follows the log until `stop`: reconnects with backoff, resyncs, then
/// blocks in `XREAD` for new entries.
pub(super) async fn run_tailer(shared: Arc<Shared>, mut tail: TailState, stop: CancellationToken) {
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
        // What was held may not be on this server (a promoted replica):
        // read it again from what was delivered.
        tail.read = tail.delivered;
        tail.held.clear();
        shared.held.store(0, Ordering::Release);
        // Trims of entries this node never saw may have happened meanwhile:
        // take fresh stats; entries up to the snapshot skip the stats update.
        let stats_through = match shared.resync(&mut conn, &mut tail).await {
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
                .arg(tail.read.render());
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
                    shared.take_entries(&value, &mut tail, stats_through);
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
    async fn resync(&self, conn: &mut Conn, tail: &mut TailState) -> Result<StreamPos, LogError> {
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
        // What this node delivered, not what it read: with wait_replicas an
        // unreplicated event read from a primary that then died was never
        // delivered, and a promoted replica may rightly not have it.
        let delivered = self.durable_head.load(Ordering::Acquire);
        if snap.head < delivered {
            return Err(LogError::Lost(format!(
                "the head of {} went back from {delivered} to {}: Redis lost events this node \
                 delivered (persistence off, appendfsync everysec/no and a crash, or a failover \
                 to a replica that did not have them: see storage.wait_replicas); restart the \
                 gateways",
                self.log_key, snap.head
            )));
        }
        self.stats.replace(snap.topics);
        // A watermark on this server covers events it holds (it was written
        // after them, once WAIT saw them replicated).
        tail.released = tail.released.max(snap.replicated.unwrap_or(0));
        // Everything up to the Redis head (with wait_replicas: up to the
        // replicated watermark) is stored or trimmed: readable now.
        self.raise_head(snap.head.min(tail.released));
        Ok(snap.last_id)
    }

    /// Feeds the entries of one `XREAD` answer to the stats, head and hub
    /// (holding, with `wait_replicas`, what no commit marker covers yet).
    fn take_entries(&self, value: &Value, tail: &mut TailState, stats_through: StreamPos) {
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
                if id <= tail.read {
                    continue;
                }
                tail.read = id;
                self.take_entry(id, &fields, id <= stats_through, tail);
            }
        }
        self.release(tail);
    }

    fn take_entry(
        &self,
        id: StreamPos,
        fields: &HashMap<String, &Value>,
        counted: bool,
        tail: &mut TailState,
    ) {
        let trim = || fields.get("x").and_then(|v| text(v));
        let what = if id.1 != 0 {
            // A delivery probe (ours or another node's): not held, it says
            // the tail reads, not that anything is replicated.
            if let Some(node) = fields.get("p") {
                if text(node).as_deref() == Some(self.probe.node.as_str()) {
                    self.probe.returned(id);
                }
                return;
            }
            // A commit marker: every event up to `c` is on the replicas.
            if let Some(through) = fields.get("c") {
                match number(through) {
                    Some(c) => tail.released = tail.released.max(c),
                    None => {
                        tracing::error!(log = %self.log_key, "malformed commit marker; skipped")
                    }
                }
                return;
            }
            // A trim marker.
            HeldEntry::Trim(trim())
        } else {
            match decode_event(&self.log_key, id.0, fields) {
                Ok(event) => HeldEntry::Event(event, trim()),
                Err(e) => {
                    tracing::error!(error = %e, "undecodable event in the redis log; skipped");
                    HeldEntry::Skip
                }
            }
        };
        tail.held.push_back(Held { id, what, counted });
    }

    /// Delivers, in stream order, every held entry a commit marker covers
    /// (all of them with `wait_replicas = 0`).
    fn release(&self, tail: &mut TailState) {
        while tail.held.front().is_some_and(|h| h.id.0 <= tail.released) {
            let Some(held) = tail.held.pop_front() else {
                break;
            };
            tail.delivered = held.id;
            self.deliver(held);
        }
        if tail.held.is_empty() {
            // Nothing waits: a reconnect may continue after probes and markers.
            tail.delivered = tail.read;
        }
        let holding = tail.held.back().map_or(0, |h| h.id.0);
        self.held.store(holding, Ordering::Release);
    }

    fn deliver(&self, held: Held) {
        let seq = held.id.0;
        match held.what {
            HeldEntry::Trim(state) => {
                if let (false, Some(state)) = (held.counted, state) {
                    apply_trim_text(&self.stats, &state);
                }
            }
            HeldEntry::Skip => self.raise_head(seq),
            HeldEntry::Event(event, state) => {
                if !held.counted {
                    self.stats
                        .record_appends(std::iter::once((&event.topics[..], seq)));
                    if let Some(state) = state {
                        apply_trim_text(&self.stats, &state);
                    }
                }
                // Head first, then the hub: a subscriber that reads the head
                // after subscribing misses nothing (see `subscription`).
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
    }
}
