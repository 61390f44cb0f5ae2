//! The single writer of the sled log: sequence assignment and group commit.
//!
//! The writer takes everything queued (up to `max_commit_batch`), assigns
//! consecutive sequences, writes the events, their index entries and the new
//! head in one atomic `apply_batch`, makes it durable once (`Db::flush`, then
//! the fdatasync/fsync of `durable.rs`, since sled's flush alone is not
//! power-safe) and only then acks every request, raises the durable
//! watermark and hands the events to the hub. So ids follow commit order, a
//! `201` means on disk, and the fsync cost is shared by everything that
//! queued while the previous one ran.
//!
//! It runs on an OS thread, not a tokio task: `flush` blocks on the disk and
//! must not hold a runtime worker.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::codec;
use super::durable::DiskSync;
use super::shared::{now_ms, Shared};
use crate::hub::Hub;
use crate::log::queue::{Pending, WriterMsg};
use crate::log::{hand_off, LogError};
use crate::metrics::Metrics;

/// The single writer: owns sequence assignment.
pub(crate) struct Writer {
    /// The database, head and stats it commits into.
    pub shared: Arc<Shared>,
    /// fdatasync/fsync after sled's flush, which alone is not power-safe.
    pub disk: DiskSync,
    /// Where committed events go for live fan-out.
    pub hub: Arc<Hub>,
    /// Commit sizes and durations.
    pub metrics: Arc<Metrics>,
    /// The sequence the next event gets: one above the durable head.
    pub next_seq: u64,
    /// Most events in one commit (`limits.max_commit_batch`).
    pub max_batch: usize,
}

impl Writer {
    /// Commits until the queue closes or a shutdown message arrives; then
    /// flushes once more and answers the shutdown.
    pub fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let mut pending: Vec<Pending> = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            let mut shutdown = None;
            let mut next = Some(first);
            // Group commit: everything that queued while the last fsync ran.
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Append(event, reply) => pending.push((event, reply)),
                    WriterMsg::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                if pending.len() < self.max_batch {
                    next = rx.try_recv().ok();
                }
            }
            if !pending.is_empty() {
                self.commit(&mut pending);
            }
            if let Some(reply) = shutdown {
                let flushed = self.shared.db.flush().map_err(LogError::from);
                if let Err(e) = flushed.and_then(|_| self.disk.sync().map_err(LogError::Sync)) {
                    tracing::error!(error = %e, "final flush failed");
                }
                let _ = reply.send(());
                return;
            }
        }
    }

    fn commit(&mut self, pending: &mut Vec<Pending>) {
        if let Some(cause) = self.shared.failure() {
            for (_, reply) in pending.drain(..) {
                let _ = reply.send(Err(LogError::Failed(Arc::clone(&cause))));
            }
            return;
        }
        let started = Instant::now();
        let time_ms = now_ms();
        let first_seq = self.next_seq;
        let mut batch = sled::Batch::default();
        for (offset, (event, _)) in pending.iter().enumerate() {
            let seq = first_seq + offset as u64;
            codec::encode_record(time_ms, &event.name, &event.topics, &event.data)
                .insert_into(&mut batch, seq);
            for topic in &event.topics {
                batch.insert(codec::index_key(topic, seq), &[]);
            }
        }
        let last_seq = first_seq + pending.len() as u64 - 1;
        batch.insert(codec::HEAD_KEY, &last_seq.to_be_bytes());

        let written = self
            .shared
            .db
            .apply_batch(batch)
            .and_then(|()| self.shared.db.flush().map(drop))
            .map_err(LogError::from)
            .and_then(|()| self.disk.sync().map_err(LogError::Sync));
        if let Err(e) = written {
            tracing::error!(error = %e, "log write failed; refusing further writes until restart");
            let cause = Arc::new(e);
            *self.shared.failed.lock() = Some(Arc::clone(&cause));
            for (_, reply) in pending.drain(..) {
                let _ = reply.send(Err(LogError::Failed(Arc::clone(&cause))));
            }
            return;
        }
        self.next_seq = last_seq + 1;
        self.shared.stats.record_appends(
            pending
                .iter()
                .enumerate()
                .map(|(i, (e, _))| (&e.topics[..], first_seq + i as u64)),
        );
        // Visible to readers only now that it is on disk; before the hub so a
        // subscriber that reads the head after subscribing misses nothing.
        self.shared.durable_head.store(last_seq, Ordering::Release);
        let durable_at = Instant::now();
        self.metrics.record_commit(pending.len(), started.elapsed());
        for (offset, (event, reply)) in pending.drain(..).enumerate() {
            let seq = first_seq + offset as u64;
            hand_off(
                &self.hub,
                &self.shared.epoch,
                seq,
                &event.name,
                event.topics,
                event.data.as_bytes(),
                durable_at,
            );
            let _ = reply.send(Ok(seq));
        }
    }
}
