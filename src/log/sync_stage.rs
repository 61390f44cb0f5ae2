//! The second stage of the sled commit pipeline: makes flushed batches
//! power-safe, then, strictly in sequence order, raises the durable head,
//! hands the events to the hub and acks them.
//!
//! The writer (`sled_log.rs`) assigns sequences, applies a batch and calls
//! sled's `flush`, then passes the batch here and goes on with the next one.
//! This thread takes every batch that is waiting and runs one
//! fdatasync/fsync (`durable.rs`) for all of them. That is sound because a
//! batch only arrives here after its `flush` returned, i.e. after its bytes
//! were written to the `db` file, and an fdatasync that *starts* after a write
//! returned covers that write. So the fdatasync of batch N overlaps the
//! encoding, `apply_batch` and `flush` of batch N+1, and one fdatasync may
//! cover several batches. Nothing is acked, made visible to readers or sent
//! to the hub before that sync returned.
//!
//! Failure: once a write or sync failed (`Shared::failed`), the on-disk state
//! is uncertain, so this stage acks nothing more: every batch it holds or gets
//! later is answered with `LogError::Failed`, and its events never become
//! visible. (A batch whose bytes did reach the disk is then refused although
//! stored; a refused publish may have been stored, never the reverse.)

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::oneshot;

use super::durable::DiskSync;
use super::sled_log::Shared;
use super::{LiveEvent, LogError, NewEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::sse;

/// One publish waiting for its sequence (or its error).
pub(crate) type Pending = (NewEvent, oneshot::Sender<Result<u64, LogError>>);

/// Makes everything sled has written so far survive power loss.
pub(crate) trait Syncer: Send + 'static {
    /// Syncs what earlier `Db::flush` calls wrote; an error means some of it
    /// may not be on disk.
    fn sync(&mut self) -> io::Result<()>;
}

impl Syncer for DiskSync {
    fn sync(&mut self) -> io::Result<()> {
        DiskSync::sync(self)
    }
}

/// A batch the writer applied and flushed (not yet synced).
pub(crate) struct Flushed {
    /// Sequence of `events[0]`; the others follow consecutively.
    pub first_seq: u64,
    pub events: Vec<Pending>,
    /// When the writer took the batch off the queue: the start of
    /// `commit_duration_seconds`.
    pub started: Instant,
}

/// What the writer sends to this stage.
pub(crate) enum StageMsg {
    Batch(Flushed),
    /// Everything sent before is handled; flush and sync once more, reply, stop.
    Shutdown(oneshot::Sender<()>),
}

/// The sync stage; runs on its own thread (`run` blocks on the disk).
pub(crate) struct SyncStage<S> {
    pub shared: Arc<Shared>,
    pub syncer: S,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
}

impl<S: Syncer> SyncStage<S> {
    /// Handles batches until a `Shutdown` or until the writer hangs up.
    pub fn run(mut self, rx: mpsc::Receiver<StageMsg>) {
        let mut group: Vec<Flushed> = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut shutdown = None;
            let mut next = Some(first);
            // Every batch already flushed is covered by the one sync below.
            while let Some(msg) = next.take() {
                match msg {
                    StageMsg::Batch(batch) => group.push(batch),
                    StageMsg::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                next = rx.try_recv().ok();
            }
            if !group.is_empty() {
                self.sync_and_ack(&mut group);
            }
            if let Some(reply) = shutdown {
                self.final_sync();
                let _ = reply.send(());
                return;
            }
        }
    }

    fn sync_and_ack(&mut self, group: &mut Vec<Flushed>) {
        if let Some(reason) = self.shared.failed.lock().clone() {
            fail_all(group, &reason);
            return;
        }
        if let Err(e) = self.syncer.sync() {
            let e = LogError::Sync(e);
            tracing::error!(error = %e, "log sync failed; refusing further writes until restart");
            let reason = e.to_string();
            self.shared.failed.lock().get_or_insert(reason.clone());
            fail_all(group, &reason);
            return;
        }
        for batch in group.drain(..) {
            self.ack(batch);
        }
    }

    /// Publishes one synced batch. Called in sequence order.
    fn ack(&self, batch: Flushed) {
        let Flushed {
            first_seq,
            events,
            started,
        } = batch;
        if events.is_empty() {
            return;
        }
        let last_seq = first_seq + events.len() as u64 - 1;
        self.shared.stats.record_appends(
            events
                .iter()
                .enumerate()
                .map(|(i, (e, _))| (&e.topics[..], first_seq + i as u64)),
        );
        // Visible to readers only now that it is on disk; before the hub so a
        // subscriber that reads the head after subscribing misses nothing.
        self.shared.durable_head.store(last_seq, Ordering::Release);
        let durable_at = Instant::now();
        self.metrics
            .record_commit(events.len(), durable_at.duration_since(started));
        for (offset, (event, reply)) in events.into_iter().enumerate() {
            let seq = first_seq + offset as u64;
            let frame = sse::event_frame(
                &self.shared.epoch,
                seq,
                event.name.as_str(),
                event.data.as_bytes(),
            );
            self.hub.publish(Arc::new(LiveEvent {
                seq,
                topics: event.topics,
                frame,
                durable_at,
            }));
            let _ = reply.send(Ok(seq));
        }
    }

    /// At shutdown: whatever sled still buffers (the trimmer's last batch)
    /// goes to disk too.
    fn final_sync(&mut self) {
        let flushed = self.shared.db.flush().map_err(LogError::from);
        if let Err(e) = flushed.and_then(|_| self.syncer.sync().map_err(LogError::Sync)) {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

/// Answers every publish of `group` with the failure.
pub(crate) fn fail_all(group: &mut Vec<Flushed>, reason: &str) {
    for batch in group.drain(..) {
        fail_pending(batch.events, reason);
    }
}

/// Answers publishes that will never be acked.
pub(crate) fn fail_pending(events: impl IntoIterator<Item = Pending>, reason: &str) {
    for (_, reply) in events {
        let _ = reply.send(Err(LogError::Failed(reason.to_owned())));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

    use parking_lot::Mutex;
    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;
    use crate::model::{Epoch, EventName, Topic};

    /// A syncer the test steps through: it reports each call on `entered`,
    /// then waits for the result to return on `results`.
    struct GatedSyncer {
        entered: SyncSender<()>,
        results: Receiver<io::Result<()>>,
    }

    impl Syncer for GatedSyncer {
        fn sync(&mut self) -> io::Result<()> {
            let _ = self.entered.send(());
            self.results
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("test ended")))
        }
    }

    struct Harness {
        shared: Arc<Shared>,
        hub_rx: tokio::sync::broadcast::Receiver<Arc<LiveEvent>>,
        stage_tx: SyncSender<StageMsg>,
        entered: Receiver<()>,
        results: SyncSender<io::Result<()>>,
        thread: std::thread::JoinHandle<()>,
    }

    fn harness() -> Harness {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let shared = Arc::new(Shared {
            db,
            epoch: Epoch::parse("test").unwrap(),
            durable_head: AtomicU64::new(0),
            stats: Default::default(),
            failed: Mutex::new(None),
        });
        let hub = Arc::new(Hub::new(64));
        let hub_rx = hub.subscribe();
        let (entered_tx, entered) = sync_channel(16);
        let (results, results_rx) = sync_channel(16);
        let stage = SyncStage {
            shared: Arc::clone(&shared),
            syncer: GatedSyncer {
                entered: entered_tx,
                results: results_rx,
            },
            hub,
            metrics: Arc::new(Metrics::new()),
        };
        let (stage_tx, stage_rx) = sync_channel(8);
        let thread = std::thread::spawn(move || stage.run(stage_rx));
        Harness {
            shared,
            hub_rx,
            stage_tx,
            entered,
            results,
            thread,
        }
    }

    type Replies = Vec<oneshot::Receiver<Result<u64, LogError>>>;

    fn batch(first_seq: u64, count: usize) -> (StageMsg, Replies) {
        let mut events = Vec::new();
        let mut replies = Vec::new();
        for _ in 0..count {
            let (tx, rx) = oneshot::channel();
            let event = NewEvent {
                topics: vec![Topic::parse("t").unwrap()],
                name: EventName::default_name(),
                data: "1".into(),
            };
            events.push((event, tx));
            replies.push(rx);
        }
        let flushed = Flushed {
            first_seq,
            events,
            started: Instant::now(),
        };
        (StageMsg::Batch(flushed), replies)
    }

    fn seqs(replies: Replies) -> Vec<u64> {
        replies
            .into_iter()
            .map(|rx| rx.blocking_recv().unwrap().unwrap())
            .collect()
    }

    fn is_failed(reply: oneshot::Receiver<Result<u64, LogError>>) -> bool {
        matches!(reply.blocking_recv(), Ok(Err(LogError::Failed(_))))
    }

    #[test]
    fn nothing_is_acked_visible_or_live_before_the_sync_returns() {
        let mut h = harness();
        let (msg, mut replies) = batch(1, 2);
        h.stage_tx.send(msg).unwrap();
        h.entered.recv().unwrap();
        // The sync is running: nothing may have happened yet.
        for reply in &mut replies {
            assert!(matches!(
                reply.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ));
        }
        assert_eq!(h.shared.durable_head.load(Ordering::Acquire), 0);
        assert!(matches!(h.hub_rx.try_recv(), Err(TryRecvError::Empty)));

        h.results.send(Ok(())).unwrap();
        assert_eq!(seqs(replies), vec![1, 2]);
        assert_eq!(h.shared.durable_head.load(Ordering::Acquire), 2);
        drop(h.stage_tx);
        h.thread.join().unwrap();
    }

    #[test]
    fn batches_are_acked_and_sent_live_in_sequence_order() {
        let mut h = harness();
        let (first, first_replies) = batch(1, 3);
        h.stage_tx.send(first).unwrap();
        h.entered.recv().unwrap();
        // Two more batches queue while the first sync runs: one sync covers both.
        let (second, second_replies) = batch(4, 1);
        let (third, third_replies) = batch(5, 2);
        h.stage_tx.send(second).unwrap();
        h.stage_tx.send(third).unwrap();
        h.results.send(Ok(())).unwrap();
        h.entered.recv().unwrap();
        h.results.send(Ok(())).unwrap();

        assert_eq!(seqs(first_replies), vec![1, 2, 3]);
        assert_eq!(seqs(second_replies), vec![4]);
        assert_eq!(seqs(third_replies), vec![5, 6]);
        let live: Vec<u64> = (0..6).map(|_| h.hub_rx.try_recv().unwrap().seq).collect();
        assert_eq!(live, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(h.shared.durable_head.load(Ordering::Acquire), 6);
        drop(h.stage_tx);
        h.thread.join().unwrap();
    }

    #[test]
    fn a_failed_sync_acks_nothing_and_fails_every_later_batch() {
        let mut h = harness();
        let (first, first_replies) = batch(1, 2);
        h.stage_tx.send(first).unwrap();
        h.entered.recv().unwrap();
        let (second, second_replies) = batch(3, 1);
        h.stage_tx.send(second).unwrap();
        h.results.send(Err(io::Error::other("disk gone"))).unwrap();
        // Whether the second batch shared the failed sync or came after it,
        // it is refused, and no later sync is attempted.
        assert!(first_replies.into_iter().all(is_failed));
        assert!(second_replies.into_iter().all(is_failed));
        let (third, third_replies) = batch(4, 1);
        h.stage_tx.send(third).unwrap();
        assert!(third_replies.into_iter().all(is_failed));

        assert!(h.shared.failed.lock().is_some());
        assert_eq!(h.shared.durable_head.load(Ordering::Acquire), 0);
        assert!(matches!(h.hub_rx.try_recv(), Err(TryRecvError::Empty)));
        assert!(matches!(
            h.entered.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        ));
        drop(h.stage_tx);
        h.thread.join().unwrap();
    }

    #[test]
    fn a_write_failure_flagged_by_the_writer_stops_acks() {
        let h = harness();
        *h.shared.failed.lock() = Some("flush failed".into());
        let (msg, replies) = batch(1, 2);
        h.stage_tx.send(msg).unwrap();
        assert!(replies.into_iter().all(is_failed));
        assert_eq!(h.shared.durable_head.load(Ordering::Acquire), 0);
        drop(h.stage_tx);
        h.thread.join().unwrap();
    }

    #[test]
    fn shutdown_acks_earlier_batches_then_syncs_once_more_before_replying() {
        let h = harness();
        let (msg, replies) = batch(1, 1);
        h.stage_tx.send(msg).unwrap();
        let (done_tx, mut done_rx) = oneshot::channel();
        h.stage_tx.send(StageMsg::Shutdown(done_tx)).unwrap();
        h.entered.recv().unwrap();
        h.results.send(Ok(())).unwrap();
        assert_eq!(seqs(replies), vec![1]);
        // The final sync is running: no reply yet.
        h.entered.recv().unwrap();
        assert!(matches!(
            done_rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        h.results.send(Ok(())).unwrap();
        done_rx.blocking_recv().unwrap();
        h.thread.join().unwrap();
    }
}
