//! The Redis log's single writer: group commit, one script call per batch.
//!
//! Publishes reach one writer task through a bounded channel; it takes
//! everything queued and appends it with ONE `append` script call (one round
//! trip, one AOF write for the batch), then acks. A `201` therefore means
//! Redis executed the script and answered, and, with `storage.wait_replicas`,
//! that `WAIT` saw that many replicas. The writer does not hand events to the
//! hub: this node's tailer does, for events appended by any node.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::connections::{redis_err, Conn};
use super::shared::Shared;
use crate::log::queue::{Pending, WriterMsg};
use crate::log::LogError;
use crate::model::Topic;

/// Most bytes of event data sent in one append call.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// How long the writer waits idle before it checks its connection, so
/// `/readyz` turns green only once the next publish would be stored.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The writer's connection and the outage count when it was made: one made
/// before the latest outage is stale (Redis restarted under it).
type WriterConn = Option<(Conn, u64)>;

/// Commits until the queue closes or a shutdown message arrives.
pub(super) async fn run_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<WriterMsg>) {
    let max = shared.options.max_commit_batch.max(1);
    let mut msgs = Vec::with_capacity(max);
    // Its own connection: `WAIT` blocks the connection it is sent on.
    let mut conn: WriterConn = None;
    loop {
        let received = tokio::select! {
            received = rx.recv_many(&mut msgs, max) => received,
            () = tokio::time::sleep(IDLE_CHECK) => {
                shared.check_writer_connection(&mut conn).await;
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
                WriterMsg::Append(event, reply) => batch.push((event, reply)),
                WriterMsg::Shutdown(reply) => shutdown = Some(reply),
            }
        }
        // Chunks bounded in bytes, each one script call.
        while !batch.is_empty() {
            let mut bytes = 0;
            let mut take = 0;
            for (event, _) in &batch {
                if take > 0 && bytes + event.data.len() > MAX_BATCH_BYTES {
                    break;
                }
                bytes += event.data.len();
                take += 1;
            }
            let chunk: Vec<Pending> = batch.drain(..take).collect();
            shared.commit(&mut conn, chunk).await;
        }
        if let Some(reply) = shutdown {
            let _ = reply.send(());
            return;
        }
    }
}

impl Shared {
    /// While idle: replaces a stale or missing connection and PINGs it, and
    /// says in `writer_ready` whether the next publish would reach Redis.
    async fn check_writer_connection(&self, conn: &mut WriterConn) {
        let outages = self.outages.load(Ordering::Acquire);
        if conn.as_ref().is_some_and(|(_, made)| *made != outages) {
            *conn = None;
        }
        if conn.is_none() {
            match self.clients.dedicated(false).await {
                Ok(fresh) => *conn = Some((fresh, outages)),
                Err(_) => {
                    self.writer_ready.store(false, Ordering::Release);
                    return;
                }
            }
        }
        let Some((c, _)) = conn.as_mut() else { return };
        let pong: Result<String, _> = redis::cmd("PING").query_async(c).await;
        let ok = pong.is_ok();
        if !ok {
            *conn = None;
        }
        // Ready only while the tailer sees Redis too and no outage began
        // since this connection was made.
        let current = self.outages.load(Ordering::Acquire) == outages;
        self.writer_ready.store(
            ok && current && self.healthy.load(Ordering::Acquire),
            Ordering::Release,
        );
    }

    /// Appends one chunk and answers every publish in it.
    async fn commit(&self, conn: &mut WriterConn, chunk: Vec<Pending>) {
        if let Some(cause) = self.failure() {
            for (_, reply) in chunk {
                let _ = reply.send(Err(LogError::Failed(Arc::clone(&cause))));
            }
            return;
        }
        let started = Instant::now();
        let result = self.append_chunk(conn, &chunk).await;
        match result {
            Ok(first) => {
                self.writer_ready.store(true, Ordering::Release);
                self.metrics.record_commit(chunk.len(), started.elapsed());
                for (offset, (_, reply)) in chunk.into_iter().enumerate() {
                    let _ = reply.send(Ok(first + offset as u64));
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
                *conn = None;
                for (_, reply) in chunk {
                    let _ = reply.send(Err(LogError::Commit(Arc::clone(&cause))));
                }
            }
        }
    }

    /// One `append` script call (and `WAIT`); the first sequence it assigned.
    async fn append_chunk(
        &self,
        conn: &mut WriterConn,
        chunk: &[Pending],
    ) -> Result<u64, LogError> {
        let outages = self.outages.load(Ordering::Acquire);
        if conn.as_ref().is_some_and(|(_, made)| *made != outages) {
            // Made before the latest outage: Redis restarted under it.
            *conn = None;
        }
        let (c, _) = match conn {
            Some(c) => c,
            None => conn.insert((self.clients.dedicated(false).await?, outages)),
        };
        let retention = &self.options.retention;
        let mut invocation = self.script.key(&self.log_key);
        invocation
            .arg("append")
            .arg(self.epoch.as_str())
            .arg(retention.max_events_per_topic)
            .arg(retention.max_age.as_millis() as u64)
            .arg(chunk.len());
        for (event, _) in chunk {
            let topics: Vec<&str> = event.topics.iter().map(Topic::as_str).collect();
            invocation
                .arg(event.name.as_str())
                .arg(topics.join(" "))
                .arg(event.data.as_str());
        }
        // The script answers the first sequence as a string; redis-rs
        // parses it, and a reply that is not a number is a typed error.
        let first: u64 = invocation.invoke_async(c).await.map_err(redis_err)?;
        if self.options.wait_replicas > 0 {
            let acked: u64 = redis::cmd("WAIT")
                .arg(self.options.wait_replicas)
                .arg(self.options.wait_timeout.as_millis() as u64)
                .query_async(c)
                .await
                .map_err(redis_err)?;
            if acked < u64::from(self.options.wait_replicas) {
                return Err(LogError::Replication {
                    acked,
                    wanted: self.options.wait_replicas,
                });
            }
        }
        Ok(first)
    }
}
