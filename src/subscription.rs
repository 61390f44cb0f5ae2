//! One subscriber's stream: resume point → replay from the log → live, with
//! lag catch-up, retention resets, keepalives and a bounded lifetime.
//!
//! The whole no-gap/no-duplicate argument rests on one ordering:
//!
//! 1. the log writer raises the durable head *before* it sends the events to
//!    the hub;
//! 2. a subscription subscribes to the hub *before* it reads the head.
//!
//! So every event above the head it read arrives on its hub receiver, and
//! every event at or below it is in the log. The subscription keeps one
//! `cursor` (everything up to it has been considered, in id order); replay
//! reads `(cursor, head]` from the log in batches, then live events are taken
//! from the receiver, skipping any at or below the cursor. A subscriber that
//! falls off the hub's ring (`Lagged`) drops its receiver, subscribes anew,
//! reads the new head and replays from its cursor: same ordering, same
//! argument. Memory per subscriber is a cursor and a receiver position; a
//! slow client's backlog lives in the log, not in a queue.
//!
//! No task per subscriber: the stream is a state machine polled by the
//! connection that sends it. Its timers are armed once and re-armed only when
//! they fire (a heartbeat is due at most once per interval), so a live event
//! costs a subscriber no timer-wheel or waiter-list traffic beyond the
//! broadcast receive itself.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::hub::{Hub, LiveEvent, SubscriberGuard};
use crate::limits::IpSlot;
use crate::log::{Log, LogError, ReadLimit};
use crate::metrics::Metrics;
use crate::model::{ResumePoint, Topic};
use crate::replay_budget::ReplayBudget;
use crate::sse::{self, ResetReason};

/// Longest requested id echoed back in a `reset` (ids come from clients).
const MAX_ECHOED_ID: usize = 256;

/// Most bytes of events in one write, and so the most a stream whose client
/// reads nothing holds while its write waits (`limits.write_stall`): one
/// event, if that event alone is larger. Counts are not enough: 512 events
/// of 1 MB in one replay write held half a gigabyte per stalled stream.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// Per-stream settings from the config.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    pub retry_ms: u64,
    pub heartbeat: Duration,
    /// Events per replay read and most frames per write.
    pub batch: usize,
    /// Close the stream after this long (the client reconnects and resumes).
    pub max_age: Option<Duration>,
}

/// What a stream needs from the app.
#[derive(Clone)]
pub struct StreamContext {
    pub log: Arc<dyn Log>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// The gateway-wide budget every replay read reserves first.
    pub replay_budget: Arc<ReplayBudget>,
    pub stop: CancellationToken,
}

/// One subscriber's state.
pub struct Subscription {
    ctx: StreamContext,
    topics: Vec<Topic>,
    feed: broadcast::Receiver<Arc<LiveEvent>>,
    /// Every event up to and including this sequence has been considered.
    cursor: u64,
    /// `Some(head)` while catching up from the log up to `head`.
    replay_upto: Option<u64>,
    /// Events per replay read: `settings.batch`, smaller while events are
    /// so large that a batch would not fit one write (`MAX_CHUNK_BYTES`).
    read_limit: usize,
    /// The highest retention watermark of the topics the client was already
    /// told about in a `reset` (or that it accepted by asking for `0`): a
    /// later reset is sent only when more was trimmed than this.
    reported_trim: u64,
    /// `retry:`, the priming id or a reset: written before anything else.
    prelude: Option<Bytes>,
    settings: StreamSettings,
    last_write: Instant,
    deadline: Option<Instant>,
    /// Fires at the next heartbeat or the deadline, whichever is first.
    timer: Pin<Box<Sleep>>,
    /// Resolves when the gateway shuts down.
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    _subscriber: SubscriberGuard,
    _open: OpenGauge,
    /// Connection-limit slots, released when the stream ends.
    _guards: StreamGuards,
}

/// What a stream holds for its whole life, and when it must end.
pub struct StreamGuards {
    /// The global `limits.max_connections` permit.
    pub permit: OwnedSemaphorePermit,
    /// The per-IP slot (`limits.max_connections_per_ip`).
    pub ip_slot: Option<IpSlot>,
    /// The stream ends after this long (the caller's token expires).
    pub ends_in: Option<Duration>,
}

impl Subscription {
    /// Starts a subscription at `resume`. `mode` labels metrics (`topic`/`events`).
    pub fn start(
        ctx: StreamContext,
        topics: Vec<Topic>,
        resume: ResumePoint,
        settings: StreamSettings,
        guards: StreamGuards,
        mode: &'static str,
    ) -> Self {
        // Order matters: subscribe, then read the head (module docs).
        let feed = ctx.hub.subscribe();
        let head = ctx.log.durable_head();
        let epoch = ctx.log.epoch().clone();
        let mut prelude = sse::retry_block(settings.retry_ms);
        let mut reset =
            |reason: ResetReason, continue_from: u64, requested: &str, oldest: Option<u64>| {
                ctx.metrics
                    .resets
                    .get_or_create(&Metrics::label("reason", reason.as_str()))
                    .inc();
                let oldest = oldest.map(|seq| epoch.id(seq));
                prelude.push_str(&sse::reset_block(
                    &epoch.id(continue_from),
                    reason,
                    requested,
                    oldest.as_deref(),
                ));
            };
        let floor = ctx.log.retention_floor(&topics);
        let (cursor, replay_upto) = match resume {
            ResumePoint::Live => {
                prelude.push_str(&sse::id_block(&epoch.id(head)));
                (head, None)
            }
            // "Whatever there is": every retained event of every topic, from
            // the start of the log (the per-topic index makes that no dearer
            // than starting at a watermark), never a reset.
            ResumePoint::Everything => (0, Some(head)),
            ResumePoint::After(seq) if seq > head => {
                reset(ResetReason::UnknownId, head, &epoch.id(seq), floor.oldest);
                (head, None)
            }
            ResumePoint::After(seq) => {
                if floor.trimmed_through > seq {
                    let from = skip_trimmed(seq, floor.trimmed_through, &topics);
                    reset(ResetReason::Retention, from, &epoch.id(seq), floor.oldest);
                    (from, Some(head))
                } else {
                    (seq, Some(head))
                }
            }
            ResumePoint::Unknown(raw) => {
                reset(ResetReason::UnknownId, head, truncate(&raw), floor.oldest);
                (head, None)
            }
        };
        ctx.metrics
            .streams_total
            .get_or_create(&Metrics::label("mode", mode))
            .inc();
        let open = OpenGauge::new(
            ctx.metrics
                .streams_open
                .get_or_create(&Metrics::label("mode", mode))
                .clone(),
        );
        let subscriber = ctx.hub.track(&topics);
        let now = Instant::now();
        // The earlier of the stream age limit and the token's expiry.
        let deadline = [settings.max_age, guards.ends_in]
            .into_iter()
            .flatten()
            .min()
            .map(|d| later(now, d));
        let first_heartbeat = later(now, settings.heartbeat);
        let first_wake = deadline.map_or(first_heartbeat, |d| d.min(first_heartbeat));
        Self {
            deadline,
            timer: Box::pin(tokio::time::sleep_until(first_wake)),
            stopping: Box::pin(ctx.stop.clone().cancelled_owned()),
            ctx,
            topics,
            feed,
            cursor,
            replay_upto,
            read_limit: settings.batch,
            reported_trim: floor.trimmed_through,
            prelude: Some(Bytes::from(prelude)),
            settings,
            last_write: now,
            _subscriber: subscriber,
            _open: open,
            _guards: guards,
        }
    }

    /// The SSE body: chunks of one or more complete blocks.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut sub| async move {
            let chunk = sub.next_chunk().await?;
            Some((Ok(chunk), sub))
        })
    }

    /// The next bytes to write, or `None` when the stream ends (shutdown,
    /// max age, storage error). Cancel-safe: state changes only after the
    /// awaits they depend on, so it may be raced against the socket.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        let chunk = self.produce().await;
        if chunk.is_some() {
            self.last_write = Instant::now();
        }
        chunk
    }

    async fn produce(&mut self) -> Option<Bytes> {
        if let Some(prelude) = self.prelude.take() {
            return Some(prelude);
        }
        loop {
            if self.deadline.is_some_and(|d| d <= Instant::now()) {
                return None;
            }
            if let Some(upto) = self.replay_upto {
                // Checked here, not on every live wake-up: it takes a lock
                // that every subscriber would contend on; live waits watch
                // `stopping` instead.
                if self.ctx.stop.is_cancelled() {
                    return None;
                }
                if self.cursor >= upto {
                    self.replay_upto = None;
                    continue;
                }
                match self.replay_batch(upto).await {
                    Ok(Some(chunk)) => return Some(chunk),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "replay read failed; closing stream so the client resumes");
                        return None;
                    }
                }
            }
            tokio::select! {
                biased;
                () = &mut self.stopping => return None,
                () = &mut self.timer => {
                    if let Some(keepalive) = self.on_timer() {
                        return Some(keepalive);
                    }
                }
                received = self.feed.recv() => match received {
                    Ok(event) => {
                        if let Some(chunk) = self.take_live(event) {
                            return Some(chunk);
                        }
                    }
                    Err(RecvError::Lagged(_)) => self.fall_back_to_log(),
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }

    /// The timer fired: a keepalive if nothing was written for a heartbeat
    /// interval, then re-armed for the next heartbeat or the deadline. (At
    /// the deadline the loop in `produce` ends the stream.)
    fn on_timer(&mut self) -> Option<Bytes> {
        let now = Instant::now();
        let mut next_heartbeat = later(self.last_write, self.settings.heartbeat);
        let keepalive = (next_heartbeat <= now).then(|| {
            next_heartbeat = later(now, self.settings.heartbeat);
            Bytes::from_static(sse::KEEPALIVE)
        });
        let wake = self
            .deadline
            .map_or(next_heartbeat, |d| d.min(next_heartbeat));
        self.timer.as_mut().reset(wake);
        keepalive
    }

    /// Reads the next batch of `(cursor, upto]`. `Ok(None)` means nothing to
    /// write yet (the cursor moved past events of other topics).
    async fn replay_batch(&mut self, upto: u64) -> Result<Option<Bytes>, LogError> {
        // The read's worst case: its events, then their encoded copy, both
        // alive until the chunk is built. Held to the end of this function;
        // the chunk itself is the stream's own bounded buffer from there.
        let _reserved = self.ctx.replay_budget.reserve(2 * MAX_CHUNK_BYTES).await;
        let batch = self
            .ctx
            .log
            .read(
                &self.topics,
                self.cursor,
                upto,
                ReadLimit {
                    events: self.read_limit,
                    bytes: MAX_CHUNK_BYTES,
                },
            )
            .await?;
        self.ctx.metrics.replay_reads.inc();
        self.ctx
            .metrics
            .replay_events
            .inc_by(batch.events.len() as u64);
        // Checked after the read: the trimmer raises the watermark before it
        // removes anything, so a read that missed a trimmed event sees it here.
        let floor = self.ctx.log.retention_floor(&self.topics);
        if floor.trimmed_through > self.cursor.max(self.reported_trim) {
            let epoch = self.ctx.log.epoch();
            let oldest = floor.oldest.map(|seq| epoch.id(seq));
            let from = skip_trimmed(self.cursor, floor.trimmed_through, &self.topics);
            let block = sse::reset_block(
                &epoch.id(from),
                ResetReason::Retention,
                &epoch.id(self.cursor),
                oldest.as_deref(),
            );
            self.ctx
                .metrics
                .resets
                .get_or_create(&Metrics::label("reason", ResetReason::Retention.as_str()))
                .inc();
            // The batch just read is dropped: the next read starts again
            // at the (possibly moved) cursor, after the reset in the stream.
            self.cursor = from;
            self.reported_trim = floor.trimmed_through;
            return Ok(Some(Bytes::from(block)));
        }
        let epoch = self.ctx.log.epoch();
        let mut buf = BytesMut::new();
        let mut sent = 0usize;
        let start = self.cursor;
        let mut last = start;
        let mut cut = false;
        for event in batch.events.iter().filter(|e| e.seq > start) {
            let before = buf.len();
            sse::put_event(&mut buf, epoch, event.seq, event.name.as_str(), &event.data);
            if buf.len() > MAX_CHUNK_BYTES && before > 0 {
                // Over the write's budget: this event starts the next write.
                buf.truncate(before);
                cut = true;
                break;
            }
            last = event.seq;
            sent += 1;
        }
        if cut {
            // The rest of the batch is read again: fewer per read from now.
            self.cursor = last;
            self.read_limit = sent.max(1);
        } else {
            self.cursor = last.max(batch.through);
            if batch.events.len() >= self.read_limit {
                self.read_limit = (self.read_limit * 2).min(self.settings.batch);
            }
        }
        self.ctx.metrics.events_delivered.inc_by(sent as u64);
        Ok((!buf.is_empty()).then(|| buf.freeze()))
    }

    /// Takes `first` and whatever else is already waiting on the receiver
    /// (up to one batch) into one chunk of this subscriber's events.
    fn take_live(&mut self, first: Arc<LiveEvent>) -> Option<Bytes> {
        let oldest = first.durable_at;
        let mut chunk = Chunk::default();
        let mut next = Some(first);
        let mut fall_back = false;
        while let Some(event) = next.take() {
            if event.seq > self.cursor {
                if event.seq != self.cursor + 1 {
                    // Cannot happen while the writer publishes every durable
                    // event in order; if it ever does, the log has the truth.
                    tracing::warn!(
                        cursor = self.cursor,
                        seq = event.seq,
                        "gap in live feed; catching up from the log"
                    );
                    fall_back = true;
                    break;
                }
                if event.topics.iter().any(|t| self.topics.contains(t)) {
                    if chunk.frames > 0 && chunk.len() + event.frame.len() > MAX_CHUNK_BYTES {
                        // Over the write's budget: this one and what follows
                        // come from the log, read within the budget.
                        fall_back = true;
                        break;
                    }
                    chunk.push(&event.frame);
                }
                self.cursor = event.seq;
            }
            if chunk.frames >= self.settings.batch {
                break;
            }
            match self.feed.try_recv() {
                Ok(event) => next = Some(event),
                Err(TryRecvError::Lagged(_)) => fall_back = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => {}
            }
        }
        if fall_back {
            self.fall_back_to_log();
        }
        if chunk.frames > 0 {
            self.ctx
                .metrics
                .events_delivered
                .inc_by(chunk.frames as u64);
            // The oldest event of the write: one observation per write, not per frame.
            self.ctx
                .metrics
                .delivery_latency
                .observe(oldest.elapsed().as_secs_f64());
        }
        chunk.into_bytes()
    }

    /// Leaves the live ring and catches up from the log from the cursor.
    fn fall_back_to_log(&mut self) {
        self.feed = self.ctx.hub.subscribe();
        self.replay_upto = Some(self.ctx.log.durable_head());
        self.ctx.metrics.lag_fallbacks.inc();
    }
}

/// `at + wait`, or a century from `at` when that would overflow: a token
/// whose `exp` is near `u64::MAX` means "never", not a panic.
fn later(at: Instant, wait: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    at.checked_add(wait.min(CENTURY))
        .or_else(|| at.checked_add(CENTURY))
        .unwrap_or(at)
}

/// Where a stream goes on after a retention reset at `cursor` when its
/// topics were trimmed through `trimmed_through`.
///
/// With one topic, everything of it up to the watermark is gone, so the
/// stream (and the reset's id, which a reconnect resumes from) skips to the
/// watermark. With several topics the highest watermark belongs to one of
/// them: another may still retain events below it, so the cursor stays and
/// the reads that follow send every retained event after it. A client that
/// reconnects from such a reset's id before the next event gets the reset
/// again: repeating a notice is better than dropping data.
fn skip_trimmed(cursor: u64, trimmed_through: u64, topics: &[Topic]) -> u64 {
    if topics.len() == 1 {
        cursor.max(trimmed_through)
    } else {
        cursor
    }
}

fn truncate(raw: &str) -> &str {
    if raw.len() <= MAX_ECHOED_ID {
        return raw;
    }
    let mut end = MAX_ECHOED_ID;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    &raw[..end]
}

/// The frames of one write. The common case, one frame, is the shared
/// `Bytes` itself (a reference count, no allocation); only a backlog of
/// several frames is copied into one buffer, so it goes out in one write.
#[derive(Default)]
struct Chunk {
    single: Option<Bytes>,
    joined: Option<BytesMut>,
    frames: usize,
}

impl Chunk {
    fn len(&self) -> usize {
        self.joined
            .as_ref()
            .map_or_else(|| self.single.as_ref().map_or(0, Bytes::len), BytesMut::len)
    }

    fn push(&mut self, frame: &Bytes) {
        self.frames += 1;
        if let Some(joined) = &mut self.joined {
            joined.extend_from_slice(frame);
        } else if let Some(first) = self.single.take() {
            // Room for a few more small frames, never past the write budget.
            let room = ((first.len() + frame.len()) * 4).min(MAX_CHUNK_BYTES);
            let mut joined = BytesMut::with_capacity(room.max(first.len() + frame.len()));
            joined.extend_from_slice(&first);
            joined.extend_from_slice(frame);
            self.joined = Some(joined);
        } else {
            self.single = Some(frame.clone());
        }
    }

    fn into_bytes(self) -> Option<Bytes> {
        self.joined.map(BytesMut::freeze).or(self.single)
    }
}

/// A subscription on its way from the handler to whoever sends it.
///
/// The subscribe handler answers with a body that takes the subscription
/// from this slot when first polled (hyper sends it), and puts the same slot
/// in the response extensions: a connection writer that serves the stream on
/// the raw socket takes it first, and the body then ends empty.
#[derive(Clone)]
pub struct Handoff(Arc<Mutex<Option<Subscription>>>);

impl Handoff {
    /// The slot and the body that sends it unless someone takes it first.
    pub fn new(
        subscription: Subscription,
    ) -> (Self, impl Stream<Item = Result<Bytes, Infallible>> + Send) {
        use futures_util::StreamExt;
        let slot = Arc::new(Mutex::new(Some(subscription)));
        let body_slot = Arc::clone(&slot);
        let body = futures_util::stream::once(async move { body_slot.lock().take() })
            .filter_map(std::future::ready)
            .flat_map(Subscription::into_stream);
        (Self(slot), body)
    }

    /// The subscription, if the body has not started sending it.
    pub fn take(&self) -> Option<Subscription> {
        self.0.lock().take()
    }
}

/// Counts a stream in `streams_open` while it lives.
struct OpenGauge(Gauge);

impl OpenGauge {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_frame_is_shared_not_copied_and_several_are_joined_in_order() {
        let a = Bytes::from_static(b"id: e-1\n\n");
        let b = Bytes::from_static(b"id: e-2\n\n");
        let mut one = Chunk::default();
        one.push(&a);
        let out = one.into_bytes().unwrap();
        assert_eq!(out.as_ptr(), a.as_ptr(), "the shared frame itself");
        let mut two = Chunk::default();
        for frame in [&a, &b, &a] {
            two.push(frame);
        }
        assert_eq!(two.frames, 3);
        assert_eq!(
            &two.into_bytes().unwrap()[..],
            b"id: e-1\n\nid: e-2\n\nid: e-1\n\n"
        );
        assert!(Chunk::default().into_bytes().is_none());
    }
}
