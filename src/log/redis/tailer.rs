//! The Redis log's tailer: how this node learns of every event, whoever
//! appended it, and hands it to the local hub.
//!
//! One tailer per open log and node, but no connection of its own: every
//! tail reads through the deployment's one reader connection (see
//! `connections`) with a non-blocking `XREAD` of its own stream, when the
//! listener says the log got entries (the append script `PUBLISH`es its
//! key), when the generation moves, and every [`TAIL_POLL`] regardless. It
//! reads until an answer is short, so it is caught up. For each event it
//! raises this node's durable head *then* hands the event to the hub, the
//! same ordering as the sled writer, so `subscription`'s no-gap/no-duplicate
//! argument holds unchanged: readers never read past the head this node has
//! delivered.
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
//! Whenever the generation moves (a new subscription: notifications may
//! have been missed; a new reader: it may talk to another server) and after
//! any failed read, it drops what it holds, re-reads from the last entry it
//! *delivered*, checks the epoch and the head against what it delivered (a
//! changed epoch or a head below it means Redis lost data: the log then
//! refuses writes until the gateway restarts and says why), reloads stats
//! and goes on, so open streams resume with no gap. When the probe's
//! watchdog says its tail went silent (see `probe`) it asks for a new reader
//! and subscription, which moves the generation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::connections::{is_broken, redis_err, Conn};
use super::replies::{apply_trim_text, decode_event, entry_fields, number, text, StreamPos};
use super::shared::{snapshot, Shared};
use crate::log::{hand_off, LogError, StoredEvent};

/// Entries taken per `XREAD`.
const TAIL_COUNT: usize = 1024;

/// How often a tail reads without being told to: covers a notification
/// lost without a reconnect (or sent by a gateway of an older version).
pub(super) const TAIL_POLL: Duration = Duration::from_secs(5);

/// Most entries held undelivered, and most bytes of event data in them.
/// Past either (a long replica outage: every publish `503`, yet stored on
/// the primary) the tail drops what comes next and reads it again once a
/// commit marker releases what it holds, so memory stays bounded.
const HOLD_MAX_ENTRIES: usize = 65_536;
const HOLD_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Where the tail stands: what it read, delivered and holds. Pure
/// bookkeeping, no I/O: `Shared` feeds it entries and delivers what it
/// releases.
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
    /// Event data bytes in `held`.
    held_bytes: usize,
    /// Entries were read past a full `held` and dropped: they are read
    /// again (from the last one held) once a marker releases some.
    dropped: bool,
    /// Most entries and bytes `held` may take.
    max: (usize, usize),
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

impl HeldEntry {
    fn bytes(&self) -> usize {
        match self {
            Self::Event(event, _) => event.data.len(),
            _ => 0,
        }
    }
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
            held_bytes: 0,
            dropped: false,
            max: (HOLD_MAX_ENTRIES, HOLD_MAX_BYTES),
        }
    }

    /// A new connection: what was held may not be on this server (a
    /// promoted replica), so it is dropped and read again from the last
    /// entry delivered.
    fn restart(&mut self) {
        self.read = self.delivered;
        self.held.clear();
        self.held_bytes = 0;
        self.dropped = false;
    }

    /// After a new connection's snapshot of a server with head `head` and
    /// replicated watermark `replicated`: a watermark there covers events
    /// it holds (it was written after them, once WAIT saw them replicated);
    /// sequences above its head are not on it, so whatever takes them next
    /// waits for a marker of its own, even if an older server's marker
    /// covered those numbers.
    fn resynced(&mut self, replicated: Option<u64>, head: u64) {
        if self.released != u64::MAX {
            self.released = self.released.max(replicated.unwrap_or(0)).min(head);
        }
    }

    /// Takes entry `id`, read from the stream; false when it was read
    /// before (the answer overlaps).
    fn advance(&mut self, id: StreamPos) -> bool {
        if id <= self.read {
            return false;
        }
        self.read = id;
        true
    }

    /// Holds an entry until a marker covers it (or drops it, to be read
    /// again, while `held` is full).
    fn hold(&mut self, id: StreamPos, what: HeldEntry, counted: bool) {
        let bytes = what.bytes();
        let full = self.held.len() >= self.max.0
            || (!self.held.is_empty() && self.held_bytes + bytes > self.max.1);
        if full && id.0 > self.released {
            self.dropped = true;
            return;
        }
        self.held_bytes += bytes;
        self.held.push_back(Held { id, what, counted });
    }

    /// A commit marker: every event up to `through` is replicated. True
    /// when entries were dropped meanwhile: the caller then releases, and
    /// reads again from [`TailState::rewind`].
    fn cover(&mut self, through: u64) -> bool {
        let raised = through > self.released;
        self.released = self.released.max(through);
        // Only a raise can release more: an old marker read again after a
        // rewind does not rewind again.
        raised && self.dropped
    }

    /// After a [`cover`](TailState::cover) that answered true: the next
    /// read starts after the last entry still held (or delivered), so the
    /// dropped ones come again.
    fn rewind(&mut self) {
        self.read = self.held.back().map_or(self.delivered, |h| h.id);
        self.dropped = false;
    }

    /// The next held entry a marker covers, in stream order.
    fn next_released(&mut self) -> Option<Held> {
        if self.held.front()?.id.0 > self.released {
            return None;
        }
        let held = self.held.pop_front()?;
        self.held_bytes -= held.what.bytes();
        self.delivered = held.id;
        Some(held)
    }

    /// After releasing: with nothing held or dropped, a reconnect may
    /// continue after the probes and markers read since. The highest
    /// sequence still held (0 when none).
    fn settle(&mut self) -> u64 {
        if self.held.is_empty() && !self.dropped {
            self.delivered = self.read;
        }
        self.held.back().map_or(0, |h| h.id.0)
    }
}

/// Follows the log until `stop`: resyncs at every generation and after
/// every failed read, then reads whenever woken.
pub(super) async fn run_tailer(shared: Arc<Shared>, mut tail: TailState, stop: CancellationToken) {
    let registration = shared.clients.register_tail(&shared.log_key);
    let wake = Arc::clone(&registration.wake);
    let mut backoff = Duration::from_millis(50);
    while !stop.is_cancelled() {
        if shared.failure().is_some() {
            return;
        }
        let (mut conn, generation) = match shared.clients.reader().await {
            Ok(found) => found,
            Err(e) => {
                shared.unhealthy(&e);
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        tail.restart();
        shared.held.store(0, Ordering::Release);
        // Trims of entries this node never saw may have happened meanwhile:
        // take fresh stats; entries up to the snapshot skip the stats update.
        let resynced = tokio::select! {
            () = stop.cancelled() => return,
            resynced = shared.resync(&mut conn, &mut tail) => resynced,
        };
        let stats_through = match resynced {
            Ok(through) => through,
            Err(e) => {
                if let LogError::Redis(re) = &e {
                    if is_broken(re) {
                        shared.clients.reader_broken(generation);
                    }
                }
                shared.unhealthy(&e);
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        shared.healthy.store(true, Ordering::Release);
        // Read until caught up, then wait to be woken; a new generation or
        // a failed read goes back to resync.
        'reading: loop {
            loop {
                if shared.clients.generation() != generation {
                    break 'reading;
                }
                let mut xread = redis::cmd("XREAD");
                xread
                    .arg("COUNT")
                    .arg(TAIL_COUNT)
                    .arg("STREAMS")
                    .arg(&shared.log_key)
                    .arg(tail.read.render());
                let read = xread.query_async::<Value>(&mut conn);
                let value = tokio::select! {
                    () = stop.cancelled() => return,
                    () = shared.probe.stale.notified() => {
                        shared.clients.renew(generation);
                        break 'reading;
                    }
                    value = read => value,
                };
                match value {
                    Ok(value) => {
                        shared.healthy.store(true, Ordering::Release);
                        let taken = shared.take_entries(&value, &mut tail, stats_through);
                        if taken < TAIL_COUNT {
                            break;
                        }
                    }
                    Err(e) => {
                        if is_broken(&e) {
                            shared.clients.reader_broken(generation);
                        }
                        shared.unhealthy(&redis_err(e));
                        break 'reading;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                // The probe's watchdog: the tail brought nothing back for two
                // probe intervals; a new reader and subscription.
                () = shared.probe.stale.notified() => {
                    shared.clients.renew(generation);
                    break 'reading;
                }
                () = wake.notified() => {}
                () = tokio::time::sleep(TAIL_POLL) => {}
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
        tail.resynced(snap.replicated, snap.head);
        // Everything up to the Redis head (with wait_replicas: up to the
        // replicated watermark) is stored or trimmed: readable now.
        self.raise_head(snap.head.min(tail.released));
        Ok(snap.last_id)
    }

    /// Feeds the entries of one `XREAD` answer to the stats, head and hub
    /// (holding, with `wait_replicas`, what no commit marker covers yet).
    /// Answers how many entries the answer had.
    fn take_entries(&self, value: &Value, tail: &mut TailState, stats_through: StreamPos) -> usize {
        let (mut taken, mut rewound) = (0, false);
        // [[key, [[id, fields], …]]] (RESP2) or {key: [[id, fields], …]} (RESP3).
        let streams: Vec<&Value> = match value {
            Value::Nil => return 0,
            Value::Array(streams) => streams
                .iter()
                .filter_map(|s| match s {
                    Value::Array(pair) => pair.get(1),
                    _ => None,
                })
                .collect(),
            Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
            _ => return 0,
        };
        for entries in streams {
            let Value::Array(entries) = entries else {
                continue;
            };
            taken += entries.len();
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
                if !tail.advance(id) {
                    continue;
                }
                if self.take_entry(id, &fields, id <= stats_through, tail) {
                    // Entries were dropped while the hold was full: what
                    // follows in this answer is read again after it.
                    self.release(tail);
                    tail.rewind();
                    rewound = true;
                    break;
                }
            }
        }
        self.release(tail);
        // Entries to read again: not caught up.
        if rewound {
            usize::MAX
        } else {
            taken
        }
    }

    /// Holds one entry (a probe or a marker is taken at once); true when
    /// a marker arrived after entries were dropped (see [`TailState::cover`]).
    fn take_entry(
        &self,
        id: StreamPos,
        fields: &HashMap<String, &Value>,
        counted: bool,
        tail: &mut TailState,
    ) -> bool {
        let trim = || fields.get("x").and_then(|v| text(v));
        let what = if id.1 != 0 {
            // A delivery probe (ours or another node's): not held, it says
            // the tail reads, not that anything is replicated.
            if let Some(node) = fields.get("p") {
                if text(node).as_deref() == Some(self.probe.node.as_str()) {
                    self.probe.returned(id);
                }
                return false;
            }
            // A commit marker: every event up to `c` is on the replicas.
            if let Some(through) = fields.get("c") {
                return match number(through) {
                    Some(c) => tail.cover(c),
                    None => {
                        tracing::error!(log = %self.log_key, "malformed commit marker; skipped");
                        false
                    }
                };
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
        tail.hold(id, what, counted);
        false
    }

    /// Delivers, in stream order, every held entry a commit marker covers
    /// (all of them with `wait_replicas = 0`).
    fn release(&self, tail: &mut TailState) {
        while let Some(held) = tail.next_released() {
            self.deliver(held);
        }
        self.held.store(tail.settle(), Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventName;

    fn event(seq: u64) -> HeldEntry {
        HeldEntry::Event(
            StoredEvent {
                seq,
                time_ms: 0,
                name: EventName::default_name(),
                topics: Vec::new(),
                data: bytes::Bytes::from_static(b"1234"),
            },
            None,
        )
    }

    /// Reads `seq-0` into `tail` as the tailer does.
    fn read(tail: &mut TailState, seq: u64) {
        assert!(tail.advance(StreamPos(seq, 0)));
        tail.hold(StreamPos(seq, 0), event(seq), false);
    }

    fn released(tail: &mut TailState) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(held) = tail.next_released() {
            out.push(held.id.0);
        }
        tail.settle();
        out
    }

    #[test]
    fn events_wait_for_a_marker_covering_them_and_go_out_in_order() {
        let mut tail = TailState::new(StreamPos(0, 0), 0);
        for seq in 1..=4 {
            read(&mut tail, seq);
        }
        assert!(released(&mut tail).is_empty(), "nothing replicated yet");
        assert!(!tail.cover(2));
        assert_eq!(released(&mut tail), [1, 2]);
        assert_eq!(tail.delivered, StreamPos(2, 0));
        assert!(!tail.cover(4));
        assert_eq!(released(&mut tail), [3, 4]);
        // Without wait_replicas everything goes out at once.
        let mut open = TailState::new(StreamPos(0, 0), u64::MAX);
        read(&mut open, 1);
        assert_eq!(released(&mut open), [1]);
    }

    #[test]
    fn a_new_connection_drops_what_is_held_and_reads_again_from_the_delivered() {
        let mut tail = TailState::new(StreamPos(0, 0), 0);
        for seq in 1..=3 {
            read(&mut tail, seq);
        }
        tail.cover(1);
        assert_eq!(released(&mut tail), [1]);
        // A probe read meanwhile does not move what was delivered.
        assert!(tail.advance(StreamPos(3, 1)));
        tail.settle();
        tail.restart();
        assert_eq!(tail.read, StreamPos(1, 0));
        assert!(tail.held.is_empty());
        // The promoted replica has 2 but not 3, then a new 3.
        read(&mut tail, 2);
        read(&mut tail, 3);
        tail.cover(3);
        assert_eq!(released(&mut tail), [2, 3]);
        // A server whose head is below what a marker covered (a promoted
        // replica that lacks the end): its next events wait for a marker.
        tail.resynced(Some(2), 2);
        assert_eq!(tail.released, 2);
        tail.resynced(None, 5);
        assert_eq!(tail.released, 2);
        tail.cover(3);
        // Without wait_replicas nothing is ever held.
        let mut open = TailState::new(StreamPos(0, 0), u64::MAX);
        open.resynced(Some(1), 1);
        assert_eq!(open.released, u64::MAX);
        // Nothing held: a reconnect continues after the last entry read.
        assert!(tail.advance(StreamPos(3, 5)));
        tail.settle();
        tail.restart();
        assert_eq!(tail.read, StreamPos(3, 5));
    }

    #[test]
    fn a_full_hold_drops_entries_and_reads_them_again_after_a_marker() {
        let mut tail = TailState::new(StreamPos(0, 0), 0);
        tail.max = (2, usize::MAX);
        for seq in 1..=4 {
            read(&mut tail, seq);
        }
        assert_eq!(tail.held.len(), 2, "3 and 4 dropped");
        // A marker for all four: 1 and 2 go out, reading restarts after 2.
        assert!(tail.cover(4));
        assert_eq!(released(&mut tail), [1, 2]);
        tail.rewind();
        assert_eq!(tail.read, StreamPos(2, 0));
        read(&mut tail, 3);
        read(&mut tail, 4);
        assert_eq!(released(&mut tail), [3, 4]);
        // An old marker read again does not rewind again.
        assert!(!tail.cover(4));
        // The byte bound too: one event always fits.
        let mut tail = TailState::new(StreamPos(0, 0), 0);
        tail.max = (usize::MAX, 6);
        read(&mut tail, 1);
        read(&mut tail, 2);
        assert_eq!(tail.held.len(), 1);
        assert!(tail.dropped);
    }
}
