//! Connections to one Redis deployment (a single server, a primary found
//! through Sentinel, or a Cluster), shared by every log on it, and how Redis
//! errors become [`LogError`]s.
//!
//! Their number is bounded by the deployment, never by the logs open on it
//! (one per org with tenancy): per gateway node, on each Redis node it
//! talks to, one shared multiplexed connection (replay reads, trims,
//! probes, snapshots), one reader that every log's tail reads new entries
//! through (non-blocking `XREAD`, see `tailer`), up to
//! `storage.writer_connections` writer connections that every log's writer
//! appends through (a log always uses the same one, so its `WAIT` covers its
//! own appends; `WAIT` blocks the connection it runs on, so more of them let
//! more overlap), and on one node of the deployment one pub/sub subscriber.
//!
//! **Notifications.** The append script `PUBLISH`es the log's stream key on
//! [`NOTIFY_CHANNEL`] whenever it adds entries (a Cluster forwards a classic
//! `PUBLISH` to every node, so one subscriber hears every shard). The
//! listener wakes the tail of that log if it is open here. Pub/sub is lossy
//! across a reconnect: each (re)subscription, and each replaced reader,
//! raises the [`generation`](RedisClients::generation), on which every open
//! tail drops what it holds and reads again from what it delivered; a tail
//! also reads every [`TAIL_POLL`](super::tailer) on its own, and its
//! delivery probe (see `probe`) turns `/readyz` red when nothing comes.
//!
//! With Sentinel every new connection first asks the Sentinels for the
//! current primary, so a failover is followed on the next reconnect.
//! redis-rs times async commands out after 500 ms by default: every
//! connection here sets its own response timeout instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::Notify;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::{Backend, StorageConfig};
use crate::log::LogError;

/// The pub/sub channel the script announces new entries on: the message is
/// the stream key of the log that got them.
pub const NOTIFY_CHANNEL: &str = "sse-gateway:appended";
/// How often the listener checks that anyone still uses it.
const LISTEN_TICK: Duration = Duration::from_secs(1);
/// Least time between two renewals of the reader or the subscriber asked
/// for by tails whose probes went unanswered.
const RENEW_REST: Duration = Duration::from_secs(1);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long asking the Sentinels for the primary may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`redis://host:port/db` or `redis+unix:///path`).
    Single(String),
    /// A Redis Cluster, given by some of its nodes.
    Cluster(Vec<String>),
    /// The primary that some Sentinels (`redis://host:port`) name for
    /// `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl RedisTarget {
    /// Where `[storage]` points for the Redis backends; `None` for sled.
    pub fn from_config(storage: &StorageConfig) -> Option<Self> {
        match storage.backend {
            Backend::Sled => None,
            Backend::Redis => Some(Self::Single(storage.url.clone())),
            Backend::RedisCluster => Some(Self::Cluster(storage.cluster_urls.clone())),
            Backend::RedisSentinel => Some(Self::Sentinel {
                sentinels: storage.sentinels.clone(),
                master: storage.sentinel_master.clone(),
            }),
        }
    }
}

/// The client of a deployment. (Boxed: a Cluster client is several times
/// the size of a single one.)
#[derive(Clone)]
enum Clients {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
    /// Asked for the current primary before each new connection (its
    /// discovery takes `&mut`, hence the lock).
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
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
    clients: Clients,
    /// Delivery probers running on this deployment (one per open log):
    /// they share one probe budget per interval (see `probe`).
    pub(super) probers: Arc<AtomicUsize>,
    /// Age trimmers running on this deployment (one per open log): they
    /// share one trim budget per interval the same way.
    pub(super) trimmers: Arc<AtomicUsize>,
    /// The script was loaded (`SCRIPT LOAD`) by a log opened on these
    /// clients: later opens skip it (a server that lost it answers
    /// `NOSCRIPT`, on which the call loads it again).
    pub(super) script_loaded: Arc<AtomicBool>,
    /// The tails' reader (replaced when it fails or falls silent).
    reader: Arc<Mutex<Option<Conn>>>,
    /// The writers' connections; a log always uses the same slot.
    writers: Arc<Vec<tokio::sync::Mutex<Option<Pooled>>>>,
    /// The open tails, woken by the listener.
    tails: Arc<Tails>,
}

/// A writer connection taken from the pool.
#[derive(Clone)]
pub(super) struct Pooled {
    pub conn: Conn,
    /// Its slot in the pool.
    slot: usize,
    /// The generation it was made at: stale once that moves.
    pub generation: u64,
    /// Tells it apart from a later connection of the same slot.
    serial: u64,
}

/// The tails open on this node, for the listener to wake.
#[derive(Default)]
struct Tails {
    /// Stream key → the wake-up of its tail.
    open: Mutex<HashMap<String, Arc<Notify>>>,
    /// Raised whenever notifications may have been lost or the reader was
    /// replaced: every tail then reads again from what it delivered.
    generation: AtomicU64,
    /// The listener is subscribed now.
    listening: AtomicBool,
    /// Wakes the listener to subscribe again on a new connection.
    renew: Notify,
    /// When a tail last asked for a renewal.
    renewed: Mutex<Option<Instant>>,
    /// Numbers the connections made.
    serial: AtomicU64,
}

impl Tails {
    /// Raises the generation and wakes every tail, so each reads again
    /// from what it delivered.
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for wake in self.open.lock().values() {
            wake.notify_one();
        }
    }
}

/// Unregisters a tail from the listener when it ends.
pub(super) struct TailRegistration {
    tails: Arc<Tails>,
    key: String,
    pub wake: Arc<Notify>,
}

impl Drop for TailRegistration {
    fn drop(&mut self) {
        let mut open = self.tails.open.lock();
        if open
            .get(&self.key)
            .is_some_and(|w| Arc::ptr_eq(w, &self.wake))
        {
            open.remove(&self.key);
        }
    }
}

impl RedisClients {
    /// Connects; fails when Redis cannot be reached. `command_timeout`
    /// bounds every command; `writer_connections` is the writer pool's size.
    /// Starts the listener, which runs while any clone of these clients lives.
    pub async fn connect(
        target: RedisTarget,
        command_timeout: Duration,
        writer_connections: usize,
    ) -> Result<Self, LogError> {
        let (clients, shared, source) = match &target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(redis_err)?;
                (
                    Clients::Single(client.clone()),
                    None,
                    Source::Single(client),
                )
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let client = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    master.clone(),
                    None,
                    SentinelServerType::Master,
                )
                .map_err(redis_err)?;
                let client = Arc::new(tokio::sync::Mutex::new(client));
                (
                    Clients::Sentinel(Arc::clone(&client)),
                    None,
                    Source::Sentinel(client),
                )
            }
            RedisTarget::Cluster(urls) => {
                let commands = ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(command_timeout)
                    .retries(2)
                    .build()
                    .map_err(redis_err)?;
                let shared = commands.get_async_connection().await.map_err(redis_err)?;
                (
                    Clients::Cluster(Box::new(commands)),
                    Some(Conn::Cluster(shared)),
                    Source::Cluster(urls.clone()),
                )
            }
        };
        let has_shared = shared.is_some();
        let writers = (0..writer_connections.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        let this = Self {
            target,
            shared: Arc::new(Mutex::new(shared)),
            command_timeout,
            probers: Arc::default(),
            trimmers: Arc::default(),
            script_loaded: Arc::default(),
            clients,
            reader: Arc::default(),
            writers: Arc::new(writers),
            tails: Arc::default(),
        };
        if !has_shared {
            // Fail now, at start, if Redis cannot be reached.
            this.shared().await?;
        }
        tokio::spawn(listen(source, Arc::downgrade(&this.tails)));
        Ok(this)
    }

    /// The shared connection, connecting it if needed.
    pub(super) async fn shared(&self) -> Result<Conn, LogError> {
        if let Some(conn) = self.shared.lock().clone() {
            return Ok(conn);
        }
        let conn = self.dedicated().await?;
        *self.shared.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a single server's (or Sentinel primary's) shared connection
    /// after an error that broke it (a Cluster connection repairs itself).
    pub(super) fn broken(&self, e: &redis::RedisError) {
        if !matches!(self.clients, Clients::Cluster(_)) && is_broken(e) {
            *self.shared.lock() = None;
        }
    }

    /// Where these clients point.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The current generation: it moves when notifications may have been
    /// lost or the reader was replaced.
    pub(super) fn generation(&self) -> u64 {
        self.tails.generation.load(Ordering::Acquire)
    }

    /// The listener is subscribed (new entries wake their tails at once).
    pub(super) fn listening(&self) -> bool {
        self.tails.listening.load(Ordering::Acquire)
    }

    /// Registers the tail of `log_key`: the listener wakes it when the log
    /// gets entries or the generation moves, until the registration drops.
    pub(super) fn register_tail(&self, log_key: &str) -> TailRegistration {
        let wake = Arc::new(Notify::new());
        self.tails
            .open
            .lock()
            .insert(log_key.to_owned(), Arc::clone(&wake));
        TailRegistration {
            tails: Arc::clone(&self.tails),
            key: log_key.to_owned(),
            wake,
        }
    }

    /// The reader every tail reads through (made when missing), with the
    /// current generation.
    pub(super) async fn reader(&self) -> Result<(Conn, u64), LogError> {
        let generation = self.generation();
        if let Some(conn) = self.reader.lock().clone() {
            return Ok((conn, generation));
        }
        let conn = self.dedicated().await?;
        let mut reader = self.reader.lock();
        // Another tail may have made one meanwhile: use that.
        let conn = reader.get_or_insert(conn).clone();
        Ok((conn, generation))
    }

    /// The reader of `generation` failed: replace it (once, whichever tail
    /// reports it first), and make every tail read again.
    pub(super) fn reader_broken(&self, generation: u64) {
        if self
            .tails
            .generation
            .compare_exchange(
                generation,
                generation + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            *self.reader.lock() = None;
            for wake in self.tails.open.lock().values() {
                wake.notify_one();
            }
        }
    }

    /// A tail's probe went unanswered for two intervals: the reader or the
    /// subscription may be silent without an error (a connection left on a
    /// demoted server, a blackholed link). Replaces the reader of
    /// `generation` (once, however many tails ask) and the subscription (at
    /// most once per [`RENEW_REST`]).
    pub(super) fn renew(&self, generation: u64) {
        self.reader_broken(generation);
        let mut renewed = self.tails.renewed.lock();
        if renewed.is_some_and(|at| at.elapsed() < RENEW_REST) {
            return;
        }
        *renewed = Some(Instant::now());
        self.tails.renew.notify_one();
    }

    /// The writer connection of `log_key`'s slot, made anew when missing or
    /// made before the current generation.
    pub(super) async fn writer(&self, log_key: &str) -> Result<Pooled, LogError> {
        let slot = slot_of(log_key, self.writers.len());
        let generation = self.generation();
        let mut cell = self.writers[slot].lock().await;
        if let Some(pooled) = &*cell {
            if pooled.generation == generation {
                return Ok(pooled.clone());
            }
        }
        let pooled = Pooled {
            conn: self.dedicated().await?,
            slot,
            generation,
            serial: self.tails.serial.fetch_add(1, Ordering::Relaxed),
        };
        *cell = Some(pooled.clone());
        Ok(pooled)
    }

    /// `pooled` failed in a way that broke it: its slot makes a new one on
    /// next use (unless another writer replaced it already).
    pub(super) async fn writer_broken(&self, pooled: &Pooled) {
        let mut cell = self.writers[pooled.slot].lock().await;
        if cell.as_ref().is_some_and(|p| p.serial == pooled.serial) {
            *cell = None;
        }
    }

    /// A new connection (multiplexed: commands may be pipelined on it).
    async fn dedicated(&self) -> Result<Conn, LogError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.command_timeout))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        match &self.clients {
            Clients::Single(client) => {
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(redis_err)?;
                Ok(Conn::Dedicated(conn))
            }
            Clients::Sentinel(sentinel) => {
                let client = current_primary(sentinel).await?;
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(redis_err)?;
                Ok(Conn::Dedicated(conn))
            }
            Clients::Cluster(client) => {
                let conn = client.get_async_connection().await.map_err(redis_err)?;
                Ok(Conn::Cluster(conn))
            }
        }
    }
}

/// The writer slot of `log_key`: stable, spread over `slots`.
fn slot_of(log_key: &str, slots: usize) -> usize {
    // FNV-1a: stable across runs and builds (the std hasher is seeded).
    let hash = log_key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % slots.max(1) as u64) as usize
}

/// Where the listener subscribes.
enum Source {
    Single(redis::Client),
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
    /// Any node of a Cluster hears every `PUBLISH`: the first that answers.
    Cluster(Vec<String>),
}

impl Source {
    /// A subscription to [`NOTIFY_CHANNEL`] on a new connection.
    async fn subscribe(&self) -> Result<redis::aio::PubSub, LogError> {
        let clients: Vec<redis::Client> = match self {
            Self::Single(client) => vec![client.clone()],
            Self::Sentinel(sentinel) => vec![current_primary(sentinel).await?],
            Self::Cluster(urls) => urls
                .iter()
                .filter_map(|url| redis::Client::open(url.as_str()).ok())
                .collect(),
        };
        let mut last = None;
        for client in clients {
            let attempt = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(NOTIFY_CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(e)) => last = Some(redis_err(e)),
                Err(_) => {
                    last = Some(LogError::Redis(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "subscribing to the notification channel timed out",
                    ))))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            LogError::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no Redis node to subscribe on",
            )))
        }))
    }
}

/// The listener: one subscription for the whole deployment; wakes the tail
/// of each log a message names. Each new subscription raises the
/// generation (messages may have been missed meanwhile). Ends once every
/// clone of the clients is gone.
async fn listen(source: Source, tails: Weak<Tails>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(renew) = tails.upgrade() else { return };
        let pubsub = source.subscribe().await;
        let mut stream = match pubsub {
            Ok(pubsub) => pubsub.into_on_message(),
            Err(e) => {
                renew.listening.store(false, Ordering::Release);
                tracing::debug!(error = %e, "notification subscription failed; retrying");
                drop(renew);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        renew.listening.store(true, Ordering::Release);
        renew.bump();
        drop(renew);
        loop {
            let Some(live) = tails.upgrade() else { return };
            let message = tokio::select! {
                message = stream.next() => message,
                () = live.renew.notified() => {
                    tracing::warn!("a tail heard nothing; subscribing again on a new connection");
                    break;
                }
                () = tokio::time::sleep(LISTEN_TICK) => continue,
            };
            let Some(message) = message else {
                live.listening.store(false, Ordering::Release);
                tracing::warn!("the notification subscription ended; subscribing again");
                break;
            };
            if let Ok(key) = std::str::from_utf8(message.get_payload_bytes()) {
                if let Some(wake) = live.open.lock().get(key) {
                    wake.notify_one();
                }
            }
        }
    }
}

/// Asks the Sentinels (in order, the first that answers) which server is the
/// primary now; the crate checks that server's `ROLE` says master.
async fn current_primary(
    sentinel: &tokio::sync::Mutex<SentinelClient>,
) -> Result<redis::Client, LogError> {
    let mut sentinel = sentinel.lock().await;
    match tokio::time::timeout(DISCOVERY_TIMEOUT, sentinel.async_get_client()).await {
        Ok(found) => found.map_err(redis_err),
        Err(_) => Err(LogError::Redis(redis::RedisError::from((
            redis::ErrorKind::Io,
            "no Sentinel named a reachable primary in time",
        )))),
    }
}

/// Not an error reply of the server: the connection itself failed.
pub(super) fn is_broken(e: &redis::RedisError) -> bool {
    e.code().is_none()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// One Redis connection of any kind the log uses.
#[derive(Clone)]
pub(super) enum Conn {
    Dedicated(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    /// `WAIT n timeout_ms` for the writes this connection sent to the
    /// primary holding `key`: how many replicas acknowledged them. A
    /// Cluster client would send a keyless `WAIT` to every primary and
    /// answer the least count, so one shard without a replica (its primary
    /// died, its replica was promoted) would fail every log's `WAIT`; it is
    /// routed to the primary of `key`'s slot instead, on the connection the
    /// log's writes to that node went through.
    pub(super) async fn wait(&mut self, key: &str, n: u32, timeout_ms: u64) -> RedisResult<u64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(n).arg(timeout_ms);
        match self {
            Self::Dedicated(c) => wait.query_async(c).await,
            Self::Cluster(c) => {
                let slot = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(slot));
                let value = c.route_command(wait, routing).await?;
                redis::from_redis_value(value).map_err(Into::into)
            }
        }
    }
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

/// A Redis error as a [`LogError`]: the script's `SSEEPOCH` refusal means
/// Redis no longer holds the log we opened; anything else keeps its source.
pub(super) fn redis_err(e: redis::RedisError) -> LogError {
    if is_lost(&e) {
        LogError::Lost(e.to_string())
    } else {
        LogError::Redis(e)
    }
}

fn is_lost(e: &redis::RedisError) -> bool {
    e.to_string().contains("SSEEPOCH")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_backend() {
        let mut storage = StorageConfig::default();
        assert_eq!(RedisTarget::from_config(&storage), None);
        storage.backend = Backend::Redis;
        assert_eq!(
            RedisTarget::from_config(&storage),
            Some(RedisTarget::Single(storage.url.clone()))
        );
        storage.backend = Backend::RedisCluster;
        storage.cluster_urls = vec!["redis://a:1".into()];
        assert_eq!(
            RedisTarget::from_config(&storage),
            Some(RedisTarget::Cluster(vec!["redis://a:1".into()]))
        );
        storage.backend = Backend::RedisSentinel;
        storage.sentinels = vec!["redis://s:26379".into()];
        assert_eq!(
            RedisTarget::from_config(&storage),
            Some(RedisTarget::Sentinel {
                sentinels: vec!["redis://s:26379".into()],
                master: "mymaster".into(),
            })
        );
    }
}
