//! The Redis log's single writer: group commit, one script call per batch.
//!
//! Publishes reach one writer task through a bounded channel; it takes
//! everything queued and appends it with ONE `append` script call (one round
//! trip, one AOF write for the batch), then acks. A `201` therefore means
//! Redis executed the script and answered, and, with `storage.wait_replicas`,
//! that `WAIT` saw that many replicas. The writer does not hand events to the
//! hub: this node's tailer does, for events appended by any node.
//!
//! With `wait_replicas >= 1`, once `WAIT` succeeded the publishes get their
//! `201` and the chunk's highest sequence becomes a commit marker in the
//! stream, which lets every node's tailer deliver the events up to it
//! (replication is one ordered stream, so the replicas then hold every
//! earlier entry too, whoever appended it). The next append carries the
//! marker (the script writes it first, in the same call and fsync); when
//! the queue is empty it is written alone (`commit`), so under load a
//! marker costs no extra call or fsync. A marker that is lost (the
//! primary died right after the `WAIT`) is covered by the next one; when
//! this node's tailer holds events and no publish came for [`IDLE_CHECK`],
//! the idle writer confirms: `confirm` (one write, answering the head),
//! `WAIT`, then `commit` of that head. So an acknowledged event is delivered
//! even when its own marker was lost and nobody publishes again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::connections::{redis_err, Conn, Pooled};
use super::shared::Shared;
use crate::idempotency;
use crate::log::queue::{Pending, WriterMsg};
use crate::log::{Appended, LogError};
use crate::model::{Epoch, Topic};

/// Most bytes of event data sent in one append call.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// How long the writer waits idle before it checks its connection, so
/// `/readyz` turns green only once the next publish would be stored.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// How long a commit marker waits for an append to carry it before it is
/// written alone: an extra write costs Redis an extra fsync (with
/// `appendfsync always`), and a publisher that just got its `201` usually
/// sends again within this. Subscribers get the events that much later when
/// publishes are sparse.
const MARKER_LINGER: Duration = Duration::from_millis(2);

/// The writer's connection from the pool and the generation it was made at:
/// one made before the generation moved is stale (Redis may have restarted
/// or failed over under it).
type WriterConn = Option<Pooled>;

/// Commits until the queue closes or a shutdown message arrives.
pub(super) async fn run_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<WriterMsg>) {
    let max = shared.options.max_commit_batch.max(1);
    let mut msgs = Vec::with_capacity(max);
    // A connection of the pool, always the same slot for this log: a `WAIT`
    // covers this log's appends sent on it before.
    let mut conn: WriterConn = None;
    // The last successful WAIT's commit marker, not written yet: the next
    // append carries it, or it is written alone after MARKER_LINGER without
    // one.
    let mut marker: Option<u64> = None;
    loop {
        let idle = if marker.is_some() {
            MARKER_LINGER
        } else {
            IDLE_CHECK
        };
        let received = tokio::select! {
            received = rx.recv_many(&mut msgs, max) => received,
            () = tokio::time::sleep(idle) => {
                if marker.is_some() {
                    shared.flush_marker(&mut conn, &mut marker).await;
                } else {
                    shared.check_writer_connection(&mut conn).await;
                }
                continue;
            }
        };
        if received == 0 {
            return;
        }
        let mut shutdown = None;
        let mut batch: Vec<Pending> = Vec::with_capacity(msgs.len());
        for msg in msgs.drain(..) {
            match msg {
                WriterMsg::Append(events, reply) => batch.push((events, reply)),
                WriterMsg::Shutdown(reply) => shutdown = Some(reply),
            }
        }
        // Chunks bounded in bytes, each one script call; an append (a batch
        // publish) is never split.
        while !batch.is_empty() {
            let mut bytes = 0;
            let mut take = 0;
            for (events, _) in &batch {
                let size: usize = events.iter().map(|e| e.data.len()).sum();
                if take > 0 && bytes + size > MAX_BATCH_BYTES {
                    break;
                }
                bytes += size;
                take += 1;
            }
            let chunk: Vec<Pending> = batch.drain(..take).collect();
            shared.commit(&mut conn, chunk, &mut marker).await;
        }
        if let Some(reply) = shutdown {
            shared.flush_marker(&mut conn, &mut marker).await;
            let _ = reply.send(());
            return;
        }
    }
}

impl Shared {
    /// While idle: replaces a stale or missing connection and PINGs it
    /// (only then, or while not ready: a ready writer's connection is
    /// shared with other logs and checked by their use), and says in
    /// `writer_ready` whether the next publish would reach Redis.
    async fn check_writer_connection(&self, conn: &mut WriterConn) {
        let generation = self.clients.generation();
        if conn.as_ref().is_some_and(|p| p.generation != generation) {
            *conn = None;
        }
        let held = self.held.load(Ordering::Acquire);
        let confirm =
            self.options.wait_replicas > 0 && held > self.durable_head.load(Ordering::Acquire);
        if conn.is_some() && self.writer_ready.load(Ordering::Acquire) && !confirm {
            return;
        }
        if conn.is_none() {
            match self.clients.writer(&self.log_key).await {
                Ok(fresh) => *conn = Some(fresh),
                Err(_) => {
                    self.writer_ready.store(false, Ordering::Release);
                    return;
                }
            }
        }
        let Some(pooled) = conn.as_mut() else { return };
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut pooled.conn).await;
        let mut ok = pong.is_ok();
        if ok && confirm {
            // Held events no marker covered (their marker was lost in a
            // failover, or their writer died after WAIT): confirm them.
            if let Err(e) = self.confirm(&mut pooled.conn).await {
                tracing::debug!(log = %self.log_key, error = %e, "replication confirm failed");
                ok = !matches!(e, LogError::Redis(_));
            }
        }
        if !ok {
            self.drop_writer(conn).await;
        }
        // Ready only while the tailer sees Redis too and no outage began
        // since this connection was made.
        let current = self.clients.generation() == generation;
        self.writer_ready.store(
            ok && current && self.healthy.load(Ordering::Acquire),
            Ordering::Release,
        );
    }

    /// Gives up the writer's connection, and tells the pool to make its
    /// slot anew (a broken connection fails every log that uses it).
    async fn drop_writer(&self, conn: &mut WriterConn) {
        if let Some(pooled) = conn.take() {
            self.clients.writer_broken(&pooled).await;
        }
    }

    /// Appends one chunk and answers every publish in it.
    async fn commit(&self, conn: &mut WriterConn, chunk: Vec<Pending>, marker: &mut Option<u64>) {
        if let Some(cause) = self.failure() {
            for (_, reply) in chunk {
                let _ = reply.send(Err(LogError::Failed(Arc::clone(&cause))));
            }
            return;
        }
        let started = Instant::now();
        let result = self
            .append_chunk(conn, &chunk, marker)
            .await
            .and_then(|answers| outcomes(&chunk, &answers));
        match result {
            Ok(outcomes) => {
                self.writer_ready.store(true, Ordering::Release);
                let stored = outcomes
                    .iter()
                    .filter_map(|o| o.as_ref().ok())
                    .flatten()
                    .filter(|a| !a.replayed)
                    .count();
                if stored > 0 {
                    self.metrics.record_commit(stored, started.elapsed());
                }
                for ((_, reply), outcome) in chunk.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                let cause = Arc::new(e);
                if let LogError::Lost(_) = *cause {
                    self.fail(Arc::clone(&cause));
                } else {
                    self.healthy.store(false, Ordering::Release);
                    self.writer_ready.store(false, Ordering::Release);
                    tracing::warn!(log = %self.log_key, error = %cause, "append failed");
                }
                // A broken connection is replaced on the next commit.
                // Any error reply may come from a server that is no longer
                // the primary (READONLY after a failover): the slot is made
                // anew, as the writer's own connection used to be.
                match &*cause {
                    LogError::Redis(_) => self.drop_writer(conn).await,
                    _ => *conn = None,
                }
                for (_, reply) in chunk {
                    let _ = reply.send(Err(LogError::Commit(Arc::clone(&cause))));
                }
            }
        }
    }

    /// One `append` script call (and `WAIT`); its answer per event. The
    /// call carries `marker` (the previous WAIT's commit marker) and, after
    /// a successful WAIT, leaves this one's there.
    async fn append_chunk(
        &self,
        conn: &mut WriterConn,
        chunk: &[Pending],
        marker: &mut Option<u64>,
    ) -> Result<Vec<String>, LogError> {
        let generation = self.clients.generation();
        if conn.as_ref().is_some_and(|p| p.generation != generation) {
            // Made before the generation moved: Redis may have restarted
            // or failed over under it.
            *conn = None;
        }
        let c = match conn {
            Some(pooled) => &mut pooled.conn,
            None => &mut conn.insert(self.clients.writer(&self.log_key).await?).conn,
        };
        let retention = &self.options.retention;
        let mut invocation = self.script.key(&self.log_key);
        invocation
            .arg("append")
            .arg(self.epoch.as_str())
            .arg(retention.max_events_per_topic)
            .arg(retention.max_age.as_millis() as u64)
            .arg(self.options.key_window.as_millis().max(1) as u64)
            .arg(chunk.len());
        for (events, _) in chunk {
            invocation.arg(events.len());
            for event in events {
                let topics: Vec<&str> = event.topics.iter().map(Topic::as_str).collect();
                let (key, digest) = match &event.key {
                    Some(key) => (key.scoped.as_str(), idempotency::hex(&key.digest)),
                    None => ("", String::new()),
                };
                invocation
                    .arg(event.name.as_str())
                    .arg(topics.join(" "))
                    .arg(event.data.as_str())
                    .arg(key)
                    .arg(digest);
            }
        }
        // The script writes the carried marker first, in the same atomic
        // call (one fsync for both); if the call fails, nothing of it was
        // written and the marker is carried again.
        let carried = marker.take();
        invocation.arg(carried.unwrap_or(0));
        let answers: Vec<String> = match invocation.invoke_async(c).await {
            Ok(answers) => answers,
            Err(e) => {
                *marker = carried;
                return Err(redis_err(e));
            }
        };
        if self.options.wait_replicas > 0 {
            self.wait_replicas(c).await?;
            // The highest sequence answered (stored now or earlier: a
            // replayed key's event is older still); `c…` answers are no
            // sequence and do not parse. The publishes get their 201 now;
            // subscribers get the events once the marker is written.
            *marker = answers
                .iter()
                .filter_map(|a| a.strip_prefix('r').unwrap_or(a).parse::<u64>().ok())
                .max();
        }
        Ok(answers)
    }

    /// Writes the pending commit marker alone (the queue is empty, so no
    /// append will carry it soon). On failure it stays pending (a broken
    /// connection is replaced); the next append carries it.
    async fn flush_marker(&self, conn: &mut WriterConn, marker: &mut Option<u64>) {
        let Some(through) = *marker else { return };
        let Some(pooled) = conn.as_mut() else { return };
        match self.commit_marker(&mut pooled.conn, through).await {
            Ok(()) => *marker = None,
            Err(e) => {
                tracing::warn!(log = %self.log_key, error = %e, through, "commit marker not written");
                if matches!(e, LogError::Redis(_)) {
                    self.drop_writer(conn).await;
                }
            }
        }
    }

    /// `WAIT` for `storage.wait_replicas` replicas to hold every write sent
    /// on `c` so far.
    async fn wait_replicas(&self, c: &mut Conn) -> Result<(), LogError> {
        let (n, timeout) = (self.options.wait_replicas, self.options.wait_timeout);
        wait_for_replicas(c, &self.log_key, n, timeout).await
    }

    /// The script's `commit`: every event up to `through` is replicated.
    async fn commit_marker(&self, c: &mut Conn, through: u64) -> Result<(), LogError> {
        commit_marker(&self.script, &self.log_key, &self.epoch, c, through).await
    }

    /// Confirms that everything up to the current head is replicated and
    /// says so with a commit marker (`confirm`, `WAIT`, `commit`).
    async fn confirm(&self, c: &mut Conn) -> Result<u64, LogError> {
        let options = &self.options;
        let (n, timeout) = (options.wait_replicas, options.wait_timeout);
        confirm(&self.script, &self.log_key, &self.epoch, (n, timeout), c).await
    }
}

/// `WAIT n timeout` on `c`: every write sent on it so far (to the primary
/// of `log_key`) is on `n` replicas.
async fn wait_for_replicas(
    c: &mut Conn,
    log_key: &str,
    n: u32,
    timeout: Duration,
) -> Result<(), LogError> {
    let acked = c
        .wait(log_key, n, timeout.as_millis() as u64)
        .await
        .map_err(redis_err)?;
    if acked < u64::from(n) {
        return Err(LogError::Replication { acked, wanted: n });
    }
    Ok(())
}

/// The script's `commit`: every event up to `through` is replicated.
async fn commit_marker(
    script: &redis::Script,
    log_key: &str,
    epoch: &Epoch,
    c: &mut Conn,
    through: u64,
) -> Result<(), LogError> {
    let _: String = script
        .key(log_key)
        .arg("commit")
        .arg(epoch.as_str())
        .arg(through)
        .invoke_async(c)
        .await
        .map_err(redis_err)?;
    Ok(())
}

/// `confirm`, `WAIT n timeout`, `commit`: marks every event up to the head
/// as replicated, and answers that head. Also used when a log is opened.
pub(super) async fn confirm(
    script: &redis::Script,
    log_key: &str,
    epoch: &Epoch,
    (n, timeout): (u32, Duration),
    c: &mut Conn,
) -> Result<u64, LogError> {
    let head: String = script
        .key(log_key)
        .arg("confirm")
        .arg(epoch.as_str())
        .invoke_async(c)
        .await
        .map_err(redis_err)?;
    let head: u64 = head.parse().map_err(|_| LogError::Corrupt {
        key: log_key.to_owned(),
        what: format!("confirm answered {head:?}"),
    })?;
    wait_for_replicas(c, log_key, n, timeout).await?;
    commit_marker(script, log_key, epoch, c, head).await?;
    Ok(head)
}

/// Splits the script's answers (one per event: `<seq>`, `r<seq>` or
/// `c<index>`, see the script) into each append's outcome. An answer that
/// does not fit is a broken script: the whole chunk fails.
fn outcomes(
    chunk: &[Pending],
    answers: &[String],
) -> Result<Vec<Result<Vec<Appended>, LogError>>, LogError> {
    let total: usize = chunk.iter().map(|(events, _)| events.len()).sum();
    let broken = |what: &str| LogError::Corrupt {
        key: "append".into(),
        what: format!("the append script answered {what}"),
    };
    if answers.len() != total {
        return Err(broken(&format!(
            "{} answers for {total} events",
            answers.len()
        )));
    }
    let mut answers = answers.iter();
    let mut out = Vec::with_capacity(chunk.len());
    for (events, _) in chunk {
        let mut appended = Vec::with_capacity(events.len());
        let mut refused = None;
        for answer in answers.by_ref().take(events.len()) {
            let (replayed, number) = match answer.as_bytes().first() {
                Some(b'r') => (true, &answer[1..]),
                Some(b'c') => (false, &answer[1..]),
                _ => (false, answer.as_str()),
            };
            let n: u64 = number.parse().map_err(|_| broken(answer))?;
            if answer.starts_with('c') {
                refused = Some(n as usize);
            } else {
                appended.push(Appended { seq: n, replayed });
            }
        }
        out.push(match refused {
            Some(index) => Err(LogError::KeyReused { index }),
            None => Ok(appended),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventName;
    use tokio::sync::oneshot;

    fn append(events: usize) -> Pending {
        let event = crate::log::NewEvent {
            topics: Vec::new(),
            name: EventName::default_name(),
            data: "1".into(),
            key: None,
        };
        (vec![event; events], oneshot::channel().0)
    }

    #[test]
    fn script_answers_split_into_each_appends_outcome() {
        let chunk = [append(2), append(1), append(3)];
        let answers: Vec<String> = ["7", "r3", "c0", "c1", "c1", "c1"]
            .map(String::from)
            .to_vec();
        let out = outcomes(&chunk, &answers).unwrap();
        assert_eq!(
            out[0].as_ref().unwrap(),
            &[
                Appended {
                    seq: 7,
                    replayed: false
                },
                Appended {
                    seq: 3,
                    replayed: true
                }
            ]
        );
        assert!(matches!(out[1], Err(LogError::KeyReused { index: 0 })));
        assert!(matches!(out[2], Err(LogError::KeyReused { index: 1 })));
        // A count or a number that does not fit is a broken script, never a panic.
        assert!(outcomes(&chunk, &answers[..5]).is_err());
        let bad: Vec<String> = ["x", "1", "2", "3", "4", "5"].map(String::from).to_vec();
        assert!(outcomes(&chunk, &bad).is_err());
    }
}
