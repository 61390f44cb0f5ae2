//! The Redis backend: several gateways share one log kept in Redis (a single
//! server or a Cluster), with the same guarantees as the sled log.
//!
//! **Keys.** One log lives under one hash tag, `{<tag>}` (`{sse}`, or
//! `{sse:org:<org>}` for an org's own log), so every key of it is in one
//! Cluster slot and one Lua script can touch them all atomically:
//!
//! | key                  | type   | what                                          |
//! |----------------------|--------|-----------------------------------------------|
//! | `{tag}:version`      | string | layout version (1), checked at start          |
//! | `{tag}:epoch`        | string | the log's epoch                               |
//! | `{tag}:head`         | string | last assigned sequence (`INCR`)               |
//! | `{tag}:log`          | stream | one entry `<seq>-0` per event: `n` name, `ms` time, `t` topics, `d` data, `x` trim state; trim markers `<head>-<k>` |
//! | `{tag}:t:<topic>`    | zset   | the topic index: member = score = seq         |
//! | `{tag}:w`            | hash   | topic → highest sequence trimmed              |
//! | `{tag}:rc`           | hash   | seq → topic indexes still holding the event   |
//! | `{tag}:topics`       | set    | every topic ever published to                 |
//!
//! **Script.** `migrations/redis/v1.lua` does every operation in one atomic
//! call (loaded with `SCRIPT LOAD` at start, then `EVALSHA`): `append`
//! checks the epoch, `INCR`s the head, `XADD`s the event once, indexes it per
//! topic, trims per retention (count and age) and writes the resulting trim
//! state into the entry itself, so every node's tailer keeps exact per-topic
//! stats without asking Redis.
//!
//! **Group commit.** Publishes reach one writer task through a bounded
//! channel; it takes everything queued and appends it with ONE script call
//! (one round trip, one AOF write for the batch), then acks. A `201` therefore
//! means Redis executed the script and answered (see the README for what
//! that means under each persistence setting), and, with
//! `storage.wait_replicas`, that `WAIT` saw that many replicas.
//!
//! **Live.** Each node runs one tailer per log: a blocking `XREAD` on its own
//! connection (the shared one is multiplexed and would stall; its response
//! timeout is set above the block time). For each event it raises this
//! node's durable head *then* sends the event to the local hub, the same
//! ordering as the sled writer, so `subscription`'s no-gap/no-duplicate
//! argument holds unchanged: readers never read past the head this node has
//! seen. Subscribers never talk to Redis except for replay reads.
//!
//! **Faults.** A failed command answers `503` (the script is atomic: nothing
//! half-stored). The tailer reconnects, checks the epoch and the head (a
//! changed epoch or a head that went back means Redis lost data: the log then
//! refuses writes until the gateway restarts and says why), reloads stats and
//! continues from the last entry it saw, so open streams resume with no gap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::queue::{self, Pending, WriterMsg};
use super::retention::RetentionPolicy;
use super::stats::{StatsTable, TopicStats};
use super::{
    LiveEvent, Log, LogError, NewEvent, ReadBatch, RetentionFloor, StoredEvent, TopicInfo,
};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::{Epoch, EventName, Topic};
use crate::sse;

/// The layout version this build writes; `migrations/redis/v1.md` describes it.
pub const CURRENT_LAYOUT: u32 = 1;

/// The script of [`CURRENT_LAYOUT`].
const SCRIPT_SOURCE: &str = include_str!("../../migrations/redis/v1.lua");

/// How long one blocking `XREAD` waits before it returns empty.
const TAIL_BLOCK: Duration = Duration::from_millis(1000);
/// Entries taken per `XREAD`.
const TAIL_COUNT: usize = 1024;
/// Most bytes of event data sent in one append call.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// How long a resume from an id this node has not seen yet waits for its tailer.
const SETTLE_WAIT: Duration = Duration::from_secs(3);

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`redis://host:port/db` or `redis+unix:///path`).
    Single(String),
    /// A Redis Cluster, given by some of its nodes.
    Cluster(Vec<String>),
}

/// Settings of one Redis log, gathered from the config.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The hash tag's content: every key of the log is `{<tag>}:…`.
    pub tag: String,
    /// Publishes waiting for the writer; more wait for a place.
    pub publish_queue: usize,
    /// Most events sent to Redis in one append call.
    pub max_commit_batch: usize,
    /// What to keep per topic (trimmed inside the append script).
    pub retention: RetentionPolicy,
    /// How often the age trim runs when nobody publishes.
    pub trim_interval: Duration,
    /// `WAIT <wait_replicas> <wait_timeout>` after each append (0 = no WAIT).
    pub wait_replicas: u32,
    /// How long `WAIT` may take.
    pub wait_timeout: Duration,
}

/// Connections to one Redis deployment, shared by every log on it.
#[derive(Clone)]
pub struct RedisClients {
    target: RedisTarget,
    /// Replay reads, trims, head checks: one multiplexed connection (a
    /// Cluster connection reconnects by itself; a single server's is dropped
    /// on an I/O error and made anew on next use).
    shared: Arc<Mutex<Option<Conn>>>,
    command_timeout: Duration,
    single: Option<redis::Client>,
    cluster: Option<redis::cluster::ClusterClient>,
    cluster_tail: Option<redis::cluster::ClusterClient>,
}

impl RedisClients {
    /// Connects; fails when Redis cannot be reached. `command_timeout`
    /// bounds every command but the tailer's blocking read.
    pub async fn connect(target: RedisTarget, command_timeout: Duration) -> Result<Self, LogError> {
        let connect_timeout = Duration::from_secs(2);
        match &target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(redis_err)?;
                let clients = Self {
                    target,
                    shared: Arc::new(Mutex::new(None)),
                    command_timeout,
                    single: Some(client),
                    cluster: None,
                    cluster_tail: None,
                };
                // Fail now, at start, if Redis cannot be reached.
                clients.shared().await?;
                Ok(clients)
            }
            RedisTarget::Cluster(urls) => {
                let build = |response: Duration| {
                    redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
                        .connection_timeout(connect_timeout)
                        .response_timeout(response)
                        .retries(2)
                        .build()
                        .map_err(redis_err)
                };
                let cluster = build(command_timeout)?;
                let cluster_tail = build(TAIL_BLOCK + Duration::from_secs(3))?;
                let shared = cluster.get_async_connection().await.map_err(redis_err)?;
                Ok(Self {
                    target,
                    shared: Arc::new(Mutex::new(Some(Conn::Cluster(shared)))),
                    command_timeout,
                    single: None,
                    cluster: Some(cluster),
                    cluster_tail: Some(cluster_tail),
                })
            }
        }
    }

    /// The shared connection, connecting it if needed.
    async fn shared(&self) -> Result<Conn, LogError> {
        if let Some(conn) = self.shared.lock().clone() {
            return Ok(conn);
        }
        let conn = self.dedicated(false).await?;
        *self.shared.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a single server's shared connection after an error that
    /// broke it (a Cluster connection repairs itself).
    fn broken(&self, e: &redis::RedisError) {
        if self.single.is_some() && is_broken(e) {
            *self.shared.lock() = None;
        }
    }

    /// Where these clients point.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// A new connection of its own (not multiplexed with anyone else's
    /// commands), for the writer (`WAIT`) or a tailer (blocking `XREAD`).
    async fn dedicated(&self, tail: bool) -> Result<Conn, LogError> {
        let response = if tail {
            TAIL_BLOCK + Duration::from_secs(3)
        } else {
            self.command_timeout
        };
        if let Some(client) = &self.single {
            let config = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(response))
                .set_connection_timeout(Some(Duration::from_secs(2)));
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(redis_err)?;
            return Ok(Conn::Dedicated(conn));
        }
        let client = if tail {
            self.cluster_tail.as_ref()
        } else {
            self.cluster.as_ref()
        };
        let client = client.ok_or_else(|| LogError::Redis("no Redis client".into()))?;
        let conn = client.get_async_connection().await.map_err(redis_err)?;
        Ok(Conn::Cluster(conn))
    }
}

/// Not an error reply of the server: the connection itself failed.
fn is_broken(e: &redis::RedisError) -> bool {
    e.code().is_none()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// One Redis connection of any kind the log uses.
#[derive(Clone)]
enum Conn {
    Dedicated(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Dedicated(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Dedicated(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

fn redis_err(e: redis::RedisError) -> LogError {
    if is_lost(&e) {
        LogError::Lost(e.to_string())
    } else {
        LogError::Redis(e.to_string())
    }
}

fn is_lost(e: &redis::RedisError) -> bool {
    e.to_string().contains("SSEEPOCH")
}

/// State shared by the writer, the tailer, the trimmer and readers.
struct Inner {
    clients: RedisClients,
    script: redis::Script,
    /// `{tag}:log`: the script's only declared key (routes it on a Cluster).
    log_key: String,
    epoch: Epoch,
    /// Highest sequence this node's tailer has seen (and handed to the hub);
    /// readers never go past it.
    durable_head: AtomicU64,
    /// The same, for waiters ([`Log::settle`]).
    head_tx: watch::Sender<u64>,
    stats: StatsTable,
    /// Set when Redis lost the log (epoch changed, head went back): writes
    /// are refused until restart, since ids could otherwise repeat.
    failed: Mutex<Option<String>>,
    /// Redis answered the last command / tail read.
    healthy: AtomicBool,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    options: RedisOptions,
}

/// A log kept in Redis, shared by every gateway pointed at it.
pub struct RedisLog {
    inner: Arc<Inner>,
    writer_tx: mpsc::Sender<WriterMsg>,
    closing: AtomicBool,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl RedisLog {
    /// Opens (creating it if new) the log `{options.tag}` on `clients`: loads
    /// the script, checks the layout version (refusing a newer one), reads
    /// the epoch, head and per-topic stats, and starts the writer, the tailer
    /// and the trimmer.
    pub async fn open(
        clients: RedisClients,
        options: RedisOptions,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LogError> {
        let started = Instant::now();
        let script = redis::Script::new(SCRIPT_SOURCE);
        let log_key = format!("{{{}}}:log", options.tag);
        let mut conn = clients.shared().await?;
        script
            .prepare_invoke()
            .load_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let candidate = Epoch::generate();
        let (version, epoch): (String, Option<String>) = script
            .key(&log_key)
            .arg("init")
            .arg(candidate.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let version: u32 = version.parse().map_err(|_| LogError::Corrupt {
            key: format!("{{{}}}:version", options.tag),
            what: format!("not a version: {version:?}"),
        })?;
        if version > CURRENT_LAYOUT {
            return Err(LogError::LayoutTooNew {
                found: version,
                supported: CURRENT_LAYOUT,
            });
        }
        let epoch = epoch
            .as_deref()
            .and_then(Epoch::parse)
            .ok_or_else(|| LogError::Corrupt {
                key: format!("{{{}}}:epoch", options.tag),
                what: "missing or not an epoch".into(),
            })?;
        let snapshot = snapshot(&script, &log_key, &mut conn).await?;
        if snapshot.epoch.as_deref() != Some(epoch.as_str()) {
            return Err(LogError::Lost(format!(
                "the epoch of {log_key} changed while opening it"
            )));
        }
        let head = snapshot.head;
        let stats = StatsTable::default();
        stats.replace(snapshot.topics);
        tracing::info!(
            log = %log_key,
            epoch = epoch.as_str(),
            head,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened redis log"
        );
        let (head_tx, _) = watch::channel(head);
        let inner = Arc::new(Inner {
            clients,
            script,
            log_key,
            epoch,
            durable_head: AtomicU64::new(head),
            head_tx,
            stats,
            failed: Mutex::new(None),
            healthy: AtomicBool::new(true),
            hub,
            metrics,
            options,
        });
        let stop = CancellationToken::new();
        let (writer_tx, writer_rx) = mpsc::channel(inner.options.publish_queue.max(1));
        let tasks = vec![
            tokio::spawn(run_writer(Arc::clone(&inner), writer_rx)),
            tokio::spawn(run_tailer(
                Arc::clone(&inner),
                snapshot.last_id,
                stop.clone(),
            )),
            tokio::spawn(run_trimmer(Arc::clone(&inner), stop.clone())),
        ];
        Ok(Self {
            inner,
            writer_tx,
            closing: AtomicBool::new(false),
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// The stream key of this log (`{tag}:log`).
    pub fn log_key(&self) -> &str {
        &self.inner.log_key
    }
}

/// A consistent view of a log at one instant.
struct Snapshot {
    epoch: Option<String>,
    head: u64,
    last_id: StreamPos,
    topics: HashMap<Topic, TopicStats>,
}

async fn snapshot(
    script: &redis::Script,
    log_key: &str,
    conn: &mut Conn,
) -> Result<Snapshot, LogError> {
    let value: Value = script
        .key(log_key)
        .arg("snapshot")
        .invoke_async(conn)
        .await
        .map_err(redis_err)?;
    let bad = |what: &str| LogError::Corrupt {
        key: log_key.to_owned(),
        what: format!("snapshot: {what}"),
    };
    let Value::Array(items) = value else {
        return Err(bad("not an array"));
    };
    let mut items = items.into_iter();
    let epoch = items.next().and_then(|v| text(&v));
    let head = items
        .next()
        .and_then(|v| number(&v))
        .ok_or_else(|| bad("head"))?;
    let last_id = items
        .next()
        .and_then(|v| text(&v))
        .and_then(|t| StreamPos::parse(&t))
        .ok_or_else(|| bad("last id"))?;
    let mut topics = HashMap::new();
    for item in items {
        let Value::Array(fields) = item else {
            return Err(bad("topic entry"));
        };
        let [t, count, first, last, wm] = fields.as_slice() else {
            return Err(bad("topic entry length"));
        };
        let topic = text(t)
            .and_then(|t| Topic::parse(&t).ok())
            .ok_or_else(|| bad("topic"))?;
        let num = |v: &Value| number(v).ok_or_else(|| bad("topic number"));
        topics.insert(
            topic,
            TopicStats {
                count: num(count)?,
                first: num(first)?,
                last: num(last)?,
                trimmed_through: num(wm)?,
            },
        );
    }
    Ok(Snapshot {
        epoch,
        head,
        last_id,
        topics,
    })
}

/// A stream entry id `<a>-<b>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct StreamPos(u64, u64);

impl StreamPos {
    fn parse(raw: &str) -> Option<Self> {
        let (a, b) = raw.split_once('-')?;
        Some(Self(a.parse().ok()?, b.parse().ok()?))
    }

    fn render(self) -> String {
        format!("{}-{}", self.0, self.1)
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The fields of one stream entry, `[k, v, k, v, …]` or a map.
fn entry_fields(value: &Value) -> Option<HashMap<String, &Value>> {
    let mut out = HashMap::new();
    match value {
        Value::Array(flat) => {
            for pair in flat.chunks(2) {
                if let [k, v] = pair {
                    out.insert(text(k)?, v);
                }
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                out.insert(text(k)?, v);
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Decodes an event entry `<seq>-0` back into a [`StoredEvent`].
fn decode_event(
    log_key: &str,
    seq: u64,
    fields: &HashMap<String, &Value>,
) -> Result<StoredEvent, LogError> {
    let bad = |what: &str| LogError::Corrupt {
        key: format!("{log_key} {seq}-0"),
        what: what.to_owned(),
    };
    let name = fields
        .get("n")
        .and_then(|v| text(v))
        .filter(|n| EventName::parse(n).is_ok())
        .ok_or_else(|| bad("invalid event name"))?;
    let time_ms = fields
        .get("ms")
        .and_then(|v| number(v))
        .ok_or_else(|| bad("invalid time"))?;
    let topics = fields
        .get("t")
        .and_then(|v| text(v))
        .ok_or_else(|| bad("missing topics"))?
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| Topic::parse(t).map_err(|_| bad("invalid topic")))
        .collect::<Result<Vec<_>, _>>()?;
    let data = fields
        .get("d")
        .and_then(|v| bytes_of(v))
        .ok_or_else(|| bad("missing data"))?;
    Ok(StoredEvent {
        seq,
        time_ms,
        name: EventName::from_log(name),
        topics,
        data: Bytes::copy_from_slice(data),
    })
}

/// Applies an entry's `x` field ("topic count first watermark", comma
/// separated) to the local stats.
fn apply_trim_state(stats: &StatsTable, fields: &HashMap<String, &Value>) {
    let Some(state) = fields.get("x").and_then(|v| text(v)) else {
        return;
    };
    for record in state.split(',').filter(|r| !r.is_empty()) {
        let mut parts = record.split(' ');
        let parsed = (|| {
            let topic = Topic::parse(parts.next()?).ok()?;
            let count = parts.next()?.parse().ok()?;
            let first = parts.next()?.parse().ok()?;
            let wm = parts.next()?.parse().ok()?;
            Some((topic, count, first, wm))
        })();
        match parsed {
            Some((topic, count, first, wm)) => stats.set_trimmed_state(&topic, count, first, wm),
            None => tracing::warn!(record, "malformed trim state in the redis log"),
        }
    }
}

// ---------------------------------------------------------------- writer

async fn run_writer(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriterMsg>) {
    let max = inner.options.max_commit_batch.max(1);
    let mut msgs = Vec::with_capacity(max);
    // Its own connection: `WAIT` blocks the connection it is sent on.
    let mut conn: Option<Conn> = None;
    loop {
        if rx.recv_many(&mut msgs, max).await == 0 {
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
            inner.commit(&mut conn, chunk).await;
        }
        if let Some(reply) = shutdown {
            let _ = reply.send(());
            return;
        }
    }
}

impl Inner {
    fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    fn fail(&self, why: String) {
        tracing::error!(log = %self.log_key, reason = %why, "redis log lost; refusing writes until restart");
        self.healthy.store(false, Ordering::Release);
        *self.failed.lock() = Some(why);
    }

    async fn commit(&self, conn: &mut Option<Conn>, chunk: Vec<Pending>) {
        if let Some(reason) = self.failure() {
            for (_, reply) in chunk {
                let _ = reply.send(Err(LogError::Failed(reason.clone())));
            }
            return;
        }
        let started = Instant::now();
        let result = self.append_chunk(conn, &chunk).await;
        match result {
            Ok(first) => {
                self.metrics.record_commit(chunk.len(), started.elapsed());
                for (offset, (_, reply)) in chunk.into_iter().enumerate() {
                    let _ = reply.send(Ok(first + offset as u64));
                }
            }
            Err(e) => {
                if let LogError::Lost(why) = &e {
                    self.fail(why.clone());
                } else {
                    self.healthy.store(false, Ordering::Release);
                    tracing::warn!(log = %self.log_key, error = %e, "append failed");
                }
                // A broken connection is replaced on the next commit.
                *conn = None;
                let message = e.to_string();
                let lost = matches!(e, LogError::Lost(_));
                for (_, reply) in chunk {
                    let _ = reply.send(Err(if lost {
                        LogError::Lost(message.clone())
                    } else {
                        LogError::Redis(message.clone())
                    }));
                }
            }
        }
    }

    async fn append_chunk(
        &self,
        conn: &mut Option<Conn>,
        chunk: &[Pending],
    ) -> Result<u64, LogError> {
        if conn.is_none() {
            *conn = Some(self.clients.dedicated(false).await?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(LogError::Redis("no connection".into()));
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
        let first: String = invocation.invoke_async(c).await.map_err(redis_err)?;
        let first: u64 = first
            .parse()
            .map_err(|_| LogError::Redis(format!("append answered {first:?}")))?;
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

// ---------------------------------------------------------------- tailer

async fn run_tailer(inner: Arc<Inner>, start: StreamPos, stop: CancellationToken) {
    let mut last = start;
    let mut backoff = Duration::from_millis(50);
    while !stop.is_cancelled() {
        if inner.failure().is_some() {
            return;
        }
        let mut conn = match inner.clients.dedicated(true).await {
            Ok(conn) => conn,
            Err(e) => {
                inner.unhealthy(&e);
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        // Trims of entries this node never saw may have happened meanwhile:
        // take fresh stats; entries up to the snapshot skip the stats update.
        let stats_through = match inner.resync(&mut conn).await {
            Ok(through) => through,
            Err(e) => {
                inner.unhealthy(&e);
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        inner.healthy.store(true, Ordering::Release);
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(TAIL_COUNT)
                .arg("BLOCK")
                .arg(TAIL_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&inner.log_key)
                .arg(last.render());
            let read = xread.query_async::<Value>(&mut conn);
            let value = tokio::select! {
                () = stop.cancelled() => return,
                value = read => value,
            };
            match value {
                Ok(value) => {
                    inner.healthy.store(true, Ordering::Release);
                    inner.take_entries(&value, &mut last, stats_through);
                }
                Err(e) => {
                    inner.unhealthy(&redis_err(e));
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

impl Inner {
    fn unhealthy(&self, e: &LogError) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(log = %self.log_key, error = %e, "redis unavailable; retrying");
        }
        if let LogError::Lost(why) = e {
            self.fail(why.clone());
        }
    }

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

    fn raise_head(&self, seq: u64) {
        if seq > self.durable_head.load(Ordering::Acquire) {
            self.durable_head.store(seq, Ordering::Release);
            self.head_tx.send_replace(seq);
        }
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
            // A trim marker.
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
        let frame = sse::event_frame(&self.epoch, seq, event.name.as_str(), &event.data);
        self.hub.publish(Arc::new(LiveEvent {
            seq,
            topics: event.topics,
            frame,
            durable_at: std::time::Instant::now(),
        }));
    }
}

// ---------------------------------------------------------------- trimmer

/// Age retention for quiet logs (appends also trim, as part of the script).
async fn run_trimmer(inner: Arc<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(inner.options.trim_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if inner.failure().is_some() {
            return;
        }
        let mut conn = match inner.clients.shared().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "retention pass skipped");
                continue;
            }
        };
        let pass: Result<u64, _> = inner
            .script
            .key(&inner.log_key)
            .arg("trim")
            .arg(inner.epoch.as_str())
            .arg(inner.options.retention.max_age.as_millis() as u64)
            .arg(inner.options.retention.batch_events)
            .invoke_async(&mut conn)
            .await;
        match pass {
            Ok(0) => {}
            Ok(removed) => {
                tracing::debug!(removed, log = %inner.log_key, "retention trimmed events")
            }
            Err(e) => {
                inner.clients.broken(&e);
                tracing::debug!(error = %e, log = %inner.log_key, "retention pass failed");
            }
        }
    }
}

// ---------------------------------------------------------------- reads

async fn read_range(
    inner: Arc<Inner>,
    topics: Vec<Topic>,
    after: u64,
    upto: u64,
    limit: usize,
) -> Result<ReadBatch, LogError> {
    if after >= upto || limit == 0 || topics.is_empty() {
        return Ok(ReadBatch {
            events: Vec::new(),
            through: after.max(upto),
        });
    }
    let mut conn = inner.clients.shared().await?;
    let mut invocation = inner.script.key(&inner.log_key);
    invocation
        .arg("read")
        .arg(after)
        .arg(upto)
        .arg(limit)
        .arg(topics.len());
    for topic in &topics {
        invocation.arg(topic.as_str());
    }
    // A read is idempotent: one retry on a fresh connection covers the
    // shared connection noticing a Redis restart only when it is used.
    let value: Value = match invocation.invoke_async(&mut conn).await {
        Ok(value) => value,
        Err(e) if is_broken(&e) => {
            inner.clients.broken(&e);
            let mut conn = inner.clients.shared().await?;
            invocation.invoke_async(&mut conn).await.map_err(|e| {
                inner.clients.broken(&e);
                redis_err(e)
            })?
        }
        Err(e) => return Err(redis_err(e)),
    };
    let bad = |what: &str| LogError::Corrupt {
        key: inner.log_key.clone(),
        what: format!("read: {what}"),
    };
    let Value::Array(items) = value else {
        return Err(bad("not an array"));
    };
    let mut items = items.into_iter();
    let through = items
        .next()
        .and_then(|v| number(&v))
        .ok_or_else(|| bad("through"))?;
    let Some(Value::Array(watermarks)) = items.next() else {
        return Err(bad("watermarks"));
    };
    // Raised before the caller checks its retention floor: a read that
    // missed a trimmed event always sees the trim (as with sled's trimmer).
    for (topic, wm) in topics.iter().zip(&watermarks) {
        if let Some(wm) = number(wm).filter(|w| *w > 0) {
            inner.stats.raise_trimmed(topic, wm);
        }
    }
    let mut events = Vec::with_capacity(items.len());
    for entry in items {
        let Value::Array(parts) = entry else {
            return Err(bad("entry"));
        };
        let id = parts
            .first()
            .and_then(text)
            .and_then(|t| StreamPos::parse(&t))
            .ok_or_else(|| bad("entry id"))?;
        let fields = parts
            .get(1)
            .and_then(entry_fields)
            .ok_or_else(|| bad("entry fields"))?;
        events.push(decode_event(&inner.log_key, id.0, &fields)?);
    }
    Ok(ReadBatch {
        events,
        through: through.min(upto),
    })
}

impl Log for RedisLog {
    fn epoch(&self) -> &Epoch {
        &self.inner.epoch
    }

    fn durable_head(&self) -> u64 {
        self.inner.durable_head.load(Ordering::Acquire)
    }

    fn append(&self, event: NewEvent) -> BoxFuture<'_, Result<u64, LogError>> {
        async move {
            if self.closing.load(Ordering::Acquire) {
                return Err(LogError::Closed);
            }
            if let Some(reason) = self.inner.failure() {
                return Err(LogError::Failed(reason));
            }
            queue::append(&self.writer_tx, event).await
        }
        .boxed()
    }

    fn read(
        &self,
        topics: &[Topic],
        after: u64,
        upto: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<ReadBatch, LogError>> {
        let upto = upto.min(self.durable_head());
        read_range(Arc::clone(&self.inner), topics.to_vec(), after, upto, limit).boxed()
    }

    fn retention_floor(&self, topics: &[Topic]) -> RetentionFloor {
        self.inner.stats.retention_floor(topics)
    }

    fn topic_info(&self, topic: &Topic) -> TopicInfo {
        self.inner.stats.info(topic)
    }

    fn topics(&self) -> Vec<(Topic, TopicInfo)> {
        self.inner.stats.all()
    }

    fn is_ready(&self) -> bool {
        !self.closing.load(Ordering::Acquire)
            && self.inner.failure().is_none()
            && self.inner.healthy.load(Ordering::Acquire)
    }

    fn size_on_disk(&self) -> Option<u64> {
        None
    }

    fn settle(&self, seq: u64) -> BoxFuture<'_, ()> {
        async move {
            if seq <= self.durable_head() {
                return;
            }
            // Only wait for what Redis really holds: a bogus id answers at once.
            let Ok(mut conn) = self.inner.clients.shared().await else {
                return;
            };
            let head_key = format!("{{{}}}:head", self.inner.options.tag);
            let held: Option<u64> =
                match redis::cmd("GET").arg(head_key).query_async(&mut conn).await {
                    Ok(held) => held,
                    Err(e) => {
                        self.inner.clients.broken(&e);
                        None
                    }
                };
            if held.is_none_or(|h| h < seq) {
                return;
            }
            let mut rx = self.inner.head_tx.subscribe();
            let _ = tokio::time::timeout(SETTLE_WAIT, rx.wait_for(|head| *head >= seq)).await;
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        async move {
            self.closing.store(true, Ordering::Release);
            queue::shut_down(&self.writer_tx).await;
            self.stop.cancel();
            let tasks = std::mem::take(&mut *self.tasks.lock());
            for task in tasks {
                let _ = task.await;
            }
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_positions_order_like_redis() {
        let a = StreamPos::parse("9-0").unwrap();
        let b = StreamPos::parse("9-2").unwrap();
        let c = StreamPos::parse("10-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(c.render(), "10-0");
        assert!(StreamPos::parse("x-1").is_none());
        assert!(StreamPos::parse("5").is_none());
    }

    #[test]
    fn trim_state_sets_absolute_values() {
        let stats = StatsTable::default();
        let t = Topic::parse("a").unwrap();
        stats.record_appends(
            [
                (std::slice::from_ref(&t), 1u64),
                (std::slice::from_ref(&t), 2),
            ]
            .into_iter(),
        );
        let x = Value::BulkString(b"a 1 2 1".to_vec());
        let fields: HashMap<String, &Value> = [("x".to_owned(), &x)].into_iter().collect();
        apply_trim_state(&stats, &fields);
        assert_eq!(
            stats.retention_floor(std::slice::from_ref(&t)),
            RetentionFloor {
                trimmed_through: 1,
                oldest: Some(2)
            }
        );
        assert_eq!(stats.info(&t).count, 1);
    }
}
