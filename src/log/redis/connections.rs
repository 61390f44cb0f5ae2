//! Connections to one Redis deployment (a single server, a primary found
//! through Sentinel, or a Cluster), shared by every log on it, and how Redis
//! errors become [`LogError`]s.
//!
//! With Sentinel every new connection (the writer's and a tailer's after any
//! error, the shared one after a broken command) first asks the Sentinels
//! for the current primary, so a failover is followed on the next reconnect.
//!
//! Replay reads, trims and head checks share one multiplexed connection. The
//! writer (its `WAIT` blocks the connection it is sent on) and each tailer
//! (a blocking `XREAD` would stall a shared connection) get one of their own.
//! redis-rs times async commands out after 500 ms by default: every
//! connection here sets its own response timeout instead, the tailer's above
//! its block time.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::{Backend, StorageConfig};
use crate::log::LogError;

/// How long one blocking `XREAD` of a tailer waits before it returns empty.
pub(super) const TAIL_BLOCK: Duration = Duration::from_millis(1000);
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

/// The clients a deployment needs: a Cluster needs a second one whose
/// response timeout covers a tailer's blocking read. (Boxed: a Cluster
/// client is several times the size of a single one.)
#[derive(Clone)]
enum Clients {
    Single(redis::Client),
    Cluster {
        commands: Box<ClusterClient>,
        tail: Box<ClusterClient>,
    },
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
}

impl RedisClients {
    /// Connects; fails when Redis cannot be reached. `command_timeout`
    /// bounds every command but the tailer's blocking read.
    pub async fn connect(target: RedisTarget, command_timeout: Duration) -> Result<Self, LogError> {
        match &target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(redis_err)?;
                let clients = Self {
                    target,
                    shared: Arc::new(Mutex::new(None)),
                    command_timeout,
                    probers: Arc::default(),
                    clients: Clients::Single(client),
                };
                // Fail now, at start, if Redis cannot be reached.
                clients.shared().await?;
                Ok(clients)
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let client = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    master.clone(),
                    None,
                    SentinelServerType::Master,
                )
                .map_err(redis_err)?;
                let clients = Self {
                    target,
                    shared: Arc::new(Mutex::new(None)),
                    command_timeout,
                    probers: Arc::default(),
                    clients: Clients::Sentinel(Arc::new(tokio::sync::Mutex::new(client))),
                };
                // Fail now, at start, if no Sentinel names a reachable primary.
                clients.shared().await?;
                Ok(clients)
            }
            RedisTarget::Cluster(urls) => {
                let build = |response: Duration| {
                    ClusterClient::builder(urls.iter().map(String::as_str))
                        .connection_timeout(CONNECT_TIMEOUT)
                        .response_timeout(response)
                        .retries(2)
                        .build()
                        .map_err(redis_err)
                };
                let commands = build(command_timeout)?;
                let tail = build(TAIL_BLOCK + Duration::from_secs(3))?;
                let shared = commands.get_async_connection().await.map_err(redis_err)?;
                Ok(Self {
                    target,
                    shared: Arc::new(Mutex::new(Some(Conn::Cluster(shared)))),
                    command_timeout,
                    probers: Arc::default(),
                    clients: Clients::Cluster {
                        commands: Box::new(commands),
                        tail: Box::new(tail),
                    },
                })
            }
        }
    }

    /// The shared connection, connecting it if needed.
    pub(super) async fn shared(&self) -> Result<Conn, LogError> {
        if let Some(conn) = self.shared.lock().clone() {
            return Ok(conn);
        }
        let conn = self.dedicated(false).await?;
        *self.shared.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a single server's (or Sentinel primary's) shared connection
    /// after an error that broke it (a Cluster connection repairs itself).
    pub(super) fn broken(&self, e: &redis::RedisError) {
        if !matches!(self.clients, Clients::Cluster { .. }) && is_broken(e) {
            *self.shared.lock() = None;
        }
    }

    /// Where these clients point.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// A new connection of its own (not multiplexed with anyone else's
    /// commands), for the writer (`WAIT`) or a tailer (blocking `XREAD`).
    pub(super) async fn dedicated(&self, tail: bool) -> Result<Conn, LogError> {
        let response = if tail {
            TAIL_BLOCK + Duration::from_secs(3)
        } else {
            self.command_timeout
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(response))
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
            Clients::Cluster {
                commands,
                tail: tail_client,
            } => {
                let client = if tail { tail_client } else { commands };
                let conn = client.get_async_connection().await.map_err(redis_err)?;
                Ok(Conn::Cluster(conn))
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
