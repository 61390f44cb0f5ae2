//! The Redis log's delivery probe: readiness means this node's tail delivers.
//!
//! Every `storage.probe_interval_ms` the prober appends a probe to the log
//! (the script's `probe`: a marker entry `<head>-<n>` carrying this log
//! instance's random probe id, no sequence, no topic, so no client can see,
//! subscribe to or publish it; the script keeps the last [`PROBES_KEPT`] per
//! node). The tailer hands every probe carrying our id back here. A probe
//! still outstanding one interval after it was appended makes the log not
//! ready (`/readyz` `503`), so a silent or lagging tail is reported within
//! two intervals, and readiness returns as soon as one comes back.
//!
//! Cost: one small script call per open log per interval, but at most
//! [`PROBE_BUDGET`] per interval for all the logs of a node together: with
//! more logs open, each probes less often (every `interval × ⌈logs /
//! budget⌉`, and is late after that much), so 10,000 idle org logs cost 100
//! calls a second, not 10,000, and an org log's silent tail shows within two
//! of its (longer) intervals.
//!
//! A probe outstanding for two intervals also wakes the tailer's watchdog:
//! it has the node replace its reader connection and its subscription (at
//! most once per two intervals per log, and once a second per node), which
//! is what follows a failover that left a connection on a server no one
//! writes to any more; every tail then reads again from what it delivered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::connections::redis_err;
use super::replies::StreamPos;
use super::shared::Shared;

/// Most probes one node sends per interval over all its open logs.
const PROBE_BUDGET: usize = 100;

/// Probes of one node the stream keeps; older ones are deleted.
const PROBES_KEPT: u32 = 4;

/// Outstanding probes remembered; while the tail is silent only the oldest
/// (its age is the lag) and the newest matter, so past this the one after
/// the oldest makes room.
const OUTSTANDING_KEPT: usize = 64;

/// Probes remembered as back before their append answered (one, normally).
const EARLY_KEPT: usize = 8;

/// The probe state of one open Redis log on this node.
pub(super) struct Probe {
    /// The configured interval; zero when probing is off (readiness then
    /// ignores the tail).
    pub interval: Duration,
    /// The interval this log probes at now (`interval` stretched to share
    /// the node's budget), in ms: lateness is judged against it.
    current_ms: AtomicU64,
    /// This log instance's probe id: random per open, so two gateways (or
    /// two opens of one log) never take each other's probes for their own.
    pub node: String,
    /// Wakes the tailer to replace a silent connection.
    pub stale: Notify,
    state: Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    /// Appended probes not yet seen through the tail, oldest first.
    outstanding: VecDeque<(StreamPos, Instant)>,
    /// Own probes the tail brought back before their append's reply
    /// reached the prober (a few, newest last).
    early: VecDeque<StreamPos>,
    /// Append-to-tail time of the last probe that came back.
    last_lag: Duration,
    /// When the watchdog last woke the tailer.
    kicked: Option<Instant>,
}

impl Probe {
    /// A probe state for one log; `interval` zero turns probing off.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            current_ms: AtomicU64::new(interval.as_millis() as u64),
            node: crate::model::Epoch::generate().as_str().to_owned(),
            stale: Notify::new(),
            state: Mutex::new(ProbeState::default()),
        }
    }

    /// The interval this log probes at now.
    fn current(&self) -> Duration {
        Duration::from_millis(self.current_ms.load(Ordering::Relaxed))
    }

    /// Records a probe appended as `id`, `at` just before the append.
    fn sent(&self, id: StreamPos, at: Instant) {
        let mut state = self.state.lock();
        if let Some(index) = state.early.iter().position(|seen| *seen == id) {
            // The tail was faster than the append's reply: this probe, the
            // newest, is back, and so is every one sent before it.
            state.early.remove(index);
            state.outstanding.clear();
            state.last_lag = at.elapsed();
        } else {
            if state.outstanding.len() >= OUTSTANDING_KEPT {
                state.outstanding.remove(1);
            }
            state.outstanding.push_back((id, at));
        }
    }

    /// Called by the tailer for each probe of ours it reads: it and every
    /// probe sent before it are done with (those may have been deleted
    /// unread, or lost by a Redis restart that kept the head, after which
    /// new probe ids can sort below a lost one: so the order that counts is
    /// the sending order, the queue's, not the ids').
    pub fn returned(&self, id: StreamPos) {
        let mut state = self.state.lock();
        match state.outstanding.iter().position(|(sent, _)| *sent == id) {
            Some(index) => {
                let (_, at) = state.outstanding[index];
                state.last_lag = at.elapsed();
                state.outstanding.drain(..=index);
            }
            None => {
                if state.early.len() >= EARLY_KEPT {
                    state.early.pop_front();
                }
                state.early.push_back(id);
            }
        }
    }

    /// Time from a probe's append to its arrival through the tail: the last
    /// one's, or while one is outstanding the age of the oldest, if larger.
    /// `None` when probing is off.
    pub fn lag(&self) -> Option<Duration> {
        if self.interval.is_zero() {
            return None;
        }
        let state = self.state.lock();
        let waiting = state
            .outstanding
            .front()
            .map_or(Duration::ZERO, |(_, at)| at.elapsed());
        Some(state.last_lag.max(waiting))
    }

    /// A probe has been outstanding longer than one interval: the tail is
    /// silent or behind.
    pub fn is_late(&self) -> bool {
        !self.interval.is_zero()
            && self
                .state
                .lock()
                .outstanding
                .front()
                .is_some_and(|(_, at)| at.elapsed() > self.current())
    }

    /// Whether the watchdog should replace the tail connection now: a probe
    /// outstanding two intervals, and no kick in the last two intervals.
    fn due_for_kick(&self) -> bool {
        let twice = self.current() * 2;
        let mut state = self.state.lock();
        let stale = state
            .outstanding
            .front()
            .is_some_and(|(_, at)| at.elapsed() > twice);
        let rested = state.kicked.is_none_or(|k| k.elapsed() > twice);
        if stale && rested {
            state.kicked = Some(Instant::now());
        }
        stale && rested
    }
}

/// Appends a probe every interval until `stop` (nothing when probing is off)
/// and wakes the tailer when its tail has gone silent.
pub(super) async fn run_prober(shared: Arc<Shared>, stop: CancellationToken) {
    let probe = &shared.probe;
    if probe.interval.is_zero() {
        return;
    }
    let _running = Running::start(&shared.clients.probers);
    let mut next = tokio::time::Instant::now();
    loop {
        let every = stretched(
            probe.interval,
            shared.clients.probers.load(Ordering::Relaxed),
        );
        probe
            .current_ms
            .store(every.as_millis() as u64, Ordering::Relaxed);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        // A fixed rhythm (a slow call does not stretch it), never a burst.
        next = (next + every).max(tokio::time::Instant::now());
        if shared.failure().is_some() {
            return;
        }
        if probe.due_for_kick() {
            tracing::warn!(
                log = %shared.log_key,
                lag_ms = probe.lag().unwrap_or_default().as_millis() as u64,
                "the tail brought back no probe for two intervals; replacing its connection"
            );
            probe.stale.notify_waiters();
        }
        let mut conn = match shared.clients.shared().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "probe skipped");
                continue;
            }
        };
        let at = Instant::now();
        // The list of this node's probes outlives several of them, so it
        // only expires once the node (or this log on it) is gone.
        let ttl_ms = every
            .saturating_mul(10)
            .max(Duration::from_secs(60))
            .as_millis() as u64;
        let sent: Result<String, _> = shared
            .script
            .key(&shared.log_key)
            .arg("probe")
            .arg(shared.epoch.as_str())
            .arg(&probe.node)
            .arg(PROBES_KEPT)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await;
        match sent {
            Ok(id) => match StreamPos::parse(&id) {
                Some(id) => probe.sent(id, at),
                None => tracing::warn!(id, "the probe script answered no stream id"),
            },
            // Not the tail's fault: the writer's health covers a Redis
            // that refuses commands.
            Err(e) => {
                shared.clients.broken(&e);
                tracing::debug!(error = %redis_err(e), log = %shared.log_key, "probe append failed");
            }
        }
    }
}

/// Each log's interval when `probers` logs share the node's budget.
pub(super) fn stretched(interval: Duration, probers: usize) -> Duration {
    let share = probers.div_ceil(PROBE_BUDGET).max(1);
    interval.saturating_mul(u32::try_from(share).unwrap_or(u32::MAX))
}

/// Counts a running prober for as long as it lives.
pub(super) struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    pub(super) fn start(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_late_after_one_interval_and_back_when_a_later_one_returns() {
        let probe = Probe::new(Duration::from_millis(30));
        let t0 = Instant::now();
        probe.sent(StreamPos(5, 1), t0);
        assert!(!probe.is_late(), "just sent");
        std::thread::sleep(Duration::from_millis(40));
        assert!(probe.is_late(), "outstanding past one interval");
        assert!(probe.lag().unwrap() >= Duration::from_millis(40));
        probe.sent(StreamPos(6, 1), Instant::now());
        probe.returned(StreamPos(6, 1));
        assert!(!probe.is_late(), "a later probe clears older ones");
        assert!(probe.lag().unwrap() < Duration::from_millis(30));
    }

    #[test]
    fn a_probe_seen_before_its_append_answered_is_not_outstanding() {
        let probe = Probe::new(Duration::from_millis(10));
        probe.returned(StreamPos(3, 2));
        probe.sent(StreamPos(3, 2), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!probe.is_late());
    }

    #[test]
    fn a_later_probe_with_a_lower_id_clears_the_ones_sent_before_it() {
        let probe = Probe::new(Duration::from_millis(10));
        probe.sent(StreamPos(7, 5), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        // Redis restarted without the entry 7-5 but with head 7.
        probe.sent(StreamPos(7, 1), Instant::now());
        assert!(probe.is_late());
        probe.returned(StreamPos(7, 1));
        assert!(!probe.is_late(), "the lost probe does not keep it late");
    }

    #[test]
    fn a_long_silence_keeps_the_oldest_and_the_newest_probe() {
        let probe = Probe::new(Duration::from_millis(10));
        let first = Instant::now();
        for k in 1..=(OUTSTANDING_KEPT as u64 + 10) {
            probe.sent(StreamPos(1, k), first);
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(probe.lag().unwrap() >= Duration::from_millis(20));
        probe.returned(StreamPos(1, OUTSTANDING_KEPT as u64 + 10));
        assert!(!probe.is_late());
    }

    #[test]
    fn many_open_logs_share_the_budget_by_probing_less_often() {
        let second = Duration::from_secs(1);
        assert_eq!(stretched(second, 1), second);
        assert_eq!(stretched(second, PROBE_BUDGET), second);
        assert_eq!(stretched(second, PROBE_BUDGET + 1), second * 2);
        assert_eq!(stretched(second, 10_000), second * 100);
    }

    #[test]
    fn probing_off_never_reports_late() {
        let probe = Probe::new(Duration::ZERO);
        probe.sent(StreamPos(1, 1), Instant::now());
        assert!(!probe.is_late());
        assert_eq!(probe.lag(), None);
    }
}
