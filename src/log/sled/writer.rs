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
//! Idempotency keys are checked and stored here too, so "check, then
//! store" is one step no other append can come between: a key is looked up
//! in this commit group, then in the tree (O(log n)); a new key is written
//! with its event in the same batch. Two requests with one key therefore
//! never both store, whether they come one after the other, in one group,
//! or while the first is still in flight (the second queues behind it).
//!
//! It runs on an OS thread, not a tokio task: `flush` blocks on the disk and
//! must not hold a runtime worker.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::codec::{self, KeyEntry};
use super::durable::DiskSync;
use super::shared::{now_ms, Shared};
use crate::hub::Hub;
use crate::log::queue::{Pending, WriterMsg};
use crate::log::{hand_off, Appended, LogError, NewEvent};
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
    /// Most events in one commit (`limits.max_commit_batch`); a batch
    /// publish is never split, so one commit may hold more.
    pub max_batch: usize,
    /// How long an idempotency key is remembered (`publish.idempotency_window_s`).
    pub key_window_ms: u64,
}

impl Writer {
    /// Commits until the queue closes or a shutdown message arrives; then
    /// flushes once more and answers the shutdown.
    pub fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let mut pending: Vec<Pending> = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            let mut shutdown = None;
            let mut next = Some(first);
            let mut queued = 0usize;
            // Group commit: everything that queued while the last fsync ran.
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Append(events, reply) => {
                        queued += events.len();
                        pending.push((events, reply));
                    }
                    WriterMsg::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                if queued < self.max_batch {
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
        let mut next_seq = first_seq;
        let mut batch = sled::Batch::default();
        // Keys stored by earlier appends of this group: not in the tree yet.
        let mut group_keys: HashMap<String, KeyEntry> = HashMap::new();
        let mut outcomes: Vec<Result<Vec<Appended>, LogError>> = Vec::with_capacity(pending.len());
        for (events, _) in pending.iter() {
            let planned = self.plan(events, time_ms, next_seq, &group_keys);
            if let Ok(plan) = &planned {
                for (event, appended) in events.iter().zip(plan) {
                    if appended.replayed {
                        continue;
                    }
                    codec::encode_record(time_ms, &event.name, &event.topics, &event.data)
                        .insert_into(&mut batch, appended.seq);
                    for topic in &event.topics {
                        batch.insert(codec::index_key(topic, appended.seq), &[]);
                    }
                    if let Some(key) = &event.key {
                        let entry = KeyEntry {
                            seq: appended.seq,
                            expires_ms: time_ms.saturating_add(self.key_window_ms),
                            digest: key.digest,
                        };
                        entry.insert_into(&mut batch, &key.scoped);
                        group_keys.insert(key.scoped.clone(), entry);
                    }
                    next_seq += 1;
                }
            }
            outcomes.push(planned);
        }
        if next_seq == first_seq {
            // Nothing new: every answer comes from keys already durable
            // (the tree holds only committed, synced writes).
            for ((_, reply), outcome) in pending.drain(..).zip(outcomes) {
                let _ = reply.send(outcome);
            }
            return;
        }
        let last_seq = next_seq - 1;
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
        self.next_seq = next_seq;
        let stored = || {
            pending
                .iter()
                .zip(&outcomes)
                .filter_map(|((events, _), outcome)| {
                    Some(events.iter().zip(outcome.as_ref().ok()?))
                })
                .flatten()
                .filter(|(_, appended)| !appended.replayed)
        };
        self.shared
            .stats
            .record_appends(stored().map(|(e, a)| (&e.topics[..], a.seq)));
        // Visible to readers only now that it is on disk; before the hub so a
        // subscriber that reads the head after subscribing misses nothing.
        self.shared.durable_head.store(last_seq, Ordering::Release);
        let durable_at = Instant::now();
        self.metrics
            .record_commit((last_seq - first_seq + 1) as usize, started.elapsed());
        for (event, appended) in stored() {
            hand_off(
                &self.hub,
                &self.shared.epoch,
                appended.seq,
                &event.name,
                event.topics.clone(),
                event.data.as_bytes(),
                durable_at,
            );
        }
        for ((_, reply), outcome) in pending.drain(..).zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }

    /// What one append would do, assigning sequences from `next_seq`: each
    /// event is new, or replays the key stored with the same request (in
    /// this append, earlier in the group, or in the tree, unexpired); a key
    /// stored with another request refuses the whole append.
    fn plan(
        &self,
        events: &[NewEvent],
        now_ms: u64,
        mut next_seq: u64,
        group_keys: &HashMap<String, KeyEntry>,
    ) -> Result<Vec<Appended>, LogError> {
        let mut own: HashMap<&str, ([u8; 32], u64)> = HashMap::new();
        let mut plan = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            if let Some(key) = &event.key {
                let earlier = match (own.get(key.scoped.as_str()), group_keys.get(&key.scoped)) {
                    (Some(&(digest, seq)), _) => Some((digest, seq)),
                    (None, Some(entry)) => Some((entry.digest, entry.seq)),
                    (None, None) => self.stored_key(&key.scoped, now_ms)?,
                };
                if let Some((digest, seq)) = earlier {
                    if digest != key.digest {
                        return Err(LogError::KeyReused { index });
                    }
                    plan.push(Appended {
                        seq,
                        replayed: true,
                    });
                    continue;
                }
                own.insert(&key.scoped, (key.digest, next_seq));
            }
            plan.push(Appended {
                seq: next_seq,
                replayed: false,
            });
            next_seq += 1;
        }
        Ok(plan)
    }

    /// The unexpired key `scoped` in the tree: its digest and sequence. O(log n).
    fn stored_key(&self, scoped: &str, now_ms: u64) -> Result<Option<([u8; 32], u64)>, LogError> {
        let key = codec::key_key(scoped);
        let Some(value) = self.shared.db.get(&key)? else {
            return Ok(None);
        };
        let entry = KeyEntry::decode(&key, &value)?;
        Ok((entry.expires_ms > now_ms).then_some((entry.digest, entry.seq)))
    }
}

#[cfg(test)]
mod tests {
    //! The writer run directly on a temp dir, with its queue filled before it
    //! starts: which appends share a commit is then exact, not a race.
    use tokio::sync::oneshot;

    use super::*;
    use crate::idempotency::StoredKey;
    use crate::log::sled::format;
    use crate::model::{EventName, Topic};

    fn writer(dir: &std::path::Path, max_batch: usize, key_window_ms: u64) -> Writer {
        let (shared, disk) = Shared::open(dir, 1 << 20).unwrap();
        Writer {
            shared: Arc::new(shared),
            disk,
            hub: Arc::new(Hub::new(64)),
            metrics: Arc::new(Metrics::new()),
            next_seq: 1,
            max_batch,
            key_window_ms,
        }
    }

    fn event(data: &str, key: Option<(&str, u8)>) -> NewEvent {
        NewEvent {
            topics: vec![Topic::parse("t").unwrap()],
            name: EventName::parse("e").unwrap(),
            data: data.to_owned(),
            key: key.map(|(scoped, digest)| StoredKey {
                scoped: scoped.to_owned(),
                digest: [digest; 32],
            }),
        }
    }

    type Answer = oneshot::Receiver<Result<Vec<Appended>, LogError>>;

    /// Queues each append, then a shutdown, runs the writer to its end and
    /// returns the answers in order.
    fn run_queued(writer: Writer, appends: Vec<Vec<NewEvent>>) -> Vec<Vec<Appended>> {
        let (tx, rx) = mpsc::channel(appends.len() + 1);
        let answers: Vec<Answer> = appends
            .into_iter()
            .map(|events| {
                let (reply, answer) = oneshot::channel();
                tx.try_send(WriterMsg::Append(events, reply)).unwrap();
                answer
            })
            .collect();
        let (done_tx, mut done) = oneshot::channel();
        tx.try_send(WriterMsg::Shutdown(done_tx)).unwrap();
        writer.run(rx);
        done.try_recv().expect("the shutdown is answered");
        answers
            .into_iter()
            .map(|mut answer| answer.try_recv().unwrap().unwrap())
            .collect()
    }

    fn new(seq: u64) -> Appended {
        Appended {
            seq,
            replayed: false,
        }
    }

    /// How many group commits the metrics counted.
    fn commits(metrics: &Metrics) -> u64 {
        let text = metrics.render();
        let line = text
            .lines()
            .find(|line| line.starts_with("sse_gateway_commit_batch_events_count "))
            .unwrap_or_else(|| panic!("no commit count in:\n{text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn a_commit_takes_what_is_queued_up_to_max_batch_and_leaves_the_rest_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path(), 2, 60_000);
        let (shared, metrics) = (Arc::clone(&writer.shared), Arc::clone(&writer.metrics));
        let answers = run_queued(
            writer,
            vec![
                vec![event("a", None)],
                vec![event("b", None)],
                vec![event("c", None)],
                vec![event("d", None)],
                vec![event("e", None)],
            ],
        );
        let want: Vec<Vec<Appended>> = (1..=5).map(|seq| vec![new(seq)]).collect();
        assert_eq!(answers, want, "ids follow queue order");
        // Two, two, one: the cap holds and nothing queued waits alone.
        assert_eq!(commits(&metrics), 3, "{}", metrics.render());
        assert_eq!(
            metrics.events_published.get(),
            5,
            "events per commit sum to 5"
        );
        assert_eq!(shared.durable_head.load(Ordering::Acquire), 5);
        assert_eq!(
            format::read_head(&shared.db).unwrap(),
            5,
            "the head on disk"
        );
    }

    #[test]
    fn a_batch_over_max_batch_is_one_commit_and_counted_whole() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path(), 2, 60_000);
        let (shared, metrics) = (Arc::clone(&writer.shared), Arc::clone(&writer.metrics));
        let batch = vec![event("a", None), event("b", None), event("c", None)];
        let answers = run_queued(writer, vec![batch, vec![event("d", None)]]);
        assert_eq!(answers, vec![vec![new(1), new(2), new(3)], vec![new(4)]]);
        assert_eq!(commits(&metrics), 2, "{}", metrics.render());
        assert_eq!(metrics.events_published.get(), 4);
        assert_eq!(format::read_head(&shared.db).unwrap(), 4);
    }

    #[test]
    fn a_replayed_key_is_answered_with_its_id_and_not_handed_to_the_hub_again() {
        let dir = tempfile::tempdir().unwrap();
        // One append per commit: the replay comes from the tree.
        let writer = writer(dir.path(), 1, 60_000);
        let (shared, metrics) = (Arc::clone(&writer.shared), Arc::clone(&writer.metrics));
        let mut live = writer.hub.subscribe();
        let answers = run_queued(
            writer,
            vec![
                vec![event("a", Some((":k", 1)))],
                vec![event("a", Some((":k", 1))), event("b", None)],
            ],
        );
        let replayed = Appended {
            seq: 1,
            replayed: true,
        };
        assert_eq!(answers, vec![vec![new(1)], vec![replayed, new(2)]]);
        let handed: Vec<u64> = std::iter::from_fn(|| live.try_recv().ok())
            .map(|event| event.seq)
            .collect();
        assert_eq!(handed, vec![1, 2], "each stored event once, the replay not");
        assert_eq!(metrics.events_published.get(), 2);
        let topic = Topic::parse("t").unwrap();
        let info = shared.stats.info(&topic);
        assert_eq!((info.first, info.last, info.count), (Some(1), Some(2), 2));
    }

    #[test]
    fn a_key_is_remembered_until_its_window_ends_and_not_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), 8, 5_000);
        let (reply, mut answer) = oneshot::channel();
        writer.commit(&mut vec![(vec![event("a", Some((":k", 7)))], reply)]);
        assert_eq!(answer.try_recv().unwrap().unwrap(), vec![new(1)]);
        let key = codec::key_key(":k");
        let stored = writer.shared.db.get(&key).unwrap().unwrap();
        let expires_ms = KeyEntry::decode(&key, &stored).unwrap().expires_ms;
        assert_eq!(
            writer.stored_key(":k", expires_ms - 1).unwrap(),
            Some(([7; 32], 1)),
            "remembered in its window"
        );
        assert_eq!(
            writer.stored_key(":k", expires_ms).unwrap(),
            None,
            "expired when its window ends"
        );
        assert_eq!(writer.stored_key(":other", expires_ms - 1).unwrap(), None);
    }
}
