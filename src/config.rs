//! `config.toml`: the operator's settings, with defaults and validation.
//!
//! Every table denies unknown keys so a typo is an error naming the key, not a
//! silently ignored setting. Values are checked once here (`Config::validate`)
//! so the rest of the gateway can trust them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::routes::RouteSpec;

/// What can go wrong reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub stream: StreamConfig,
    pub retention: RetentionConfig,
    pub limits: LimitsConfig,
    pub publish: PublishConfig,
    pub cors: CorsConfig,
    /// `[auth]`: absent means no auth.
    pub auth: Option<AuthConfig>,
    pub tenancy: TenancyConfig,
    /// `[tls]`: absent means plaintext HTTP/1.1 only.
    pub tls: Option<TlsConfig>,
    /// `[http2]`: settings of HTTP/2 connections (negotiated over TLS only).
    pub http2: Http2Config,
    /// `[[routes]]`: broadcast kinds → topics. Empty means the projects
    /// module's four built-in routes.
    pub routes: Vec<RouteSpec>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// How long `SIGTERM` waits for in-flight requests before giving up.
    pub drain_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            drain_timeout_ms: 10_000,
        }
    }
}

/// `storage.backend`: which log the gateway keeps its events in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum Backend {
    /// `sled`: embedded, in `data_dir` (the default).
    #[default]
    Sled,
    /// `redis`: one Redis server at `url`.
    Redis,
    /// `redis-cluster`: a Redis Cluster, some of whose nodes are `cluster_urls`.
    RedisCluster,
    /// `redis-sentinel`: the primary the `sentinels` name for `sentinel_master`
    /// (asked again on every reconnect, so a failover is followed).
    RedisSentinel,
}

impl Backend {
    /// The name as written in `config.toml` and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sled => "sled",
            Self::Redis => "redis",
            Self::RedisCluster => "redis-cluster",
            Self::RedisSentinel => "redis-sentinel",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    /// Parses a backend name; the error names the accepted ones.
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "sled" => Ok(Self::Sled),
            "redis" => Ok(Self::Redis),
            "redis-cluster" => Ok(Self::RedisCluster),
            "redis-sentinel" => Ok(Self::RedisSentinel),
            other => Err(format!(
                "storage.backend {other:?} is unknown; use \"sled\", \"redis\", \"redis-cluster\" or \"redis-sentinel\""
            )),
        }
    }
}

// Through `FromStr`, so an unknown name gets the same message from the
// config file and from `--storage-backend`.
impl TryFrom<String> for Backend {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sled` (embedded, default), `redis` (one server, `url`),
    /// `redis-cluster` (a Redis Cluster, `cluster_urls`) or `redis-sentinel`
    /// (a primary found through `sentinels`).
    pub backend: Backend,
    /// sled's data directory.
    pub data_dir: PathBuf,
    /// Redis URL for `backend = "redis"`: `redis://host:port[/db]` or
    /// `redis+unix:///path/to/redis.sock`.
    pub url: String,
    /// Some nodes of the cluster for `backend = "redis-cluster"`.
    pub cluster_urls: Vec<String>,
    /// Some of the Sentinels for `backend = "redis-sentinel"`
    /// (`redis://host:port`), asked in order for the current primary.
    pub sentinels: Vec<String>,
    /// The master name the Sentinels monitor (`sentinel monitor <name> …`).
    pub sentinel_master: String,
    /// The hash tag every Redis key of the log is under: `{<key_prefix>}:…`,
    /// and `{<key_prefix>:org:<org>}:…` for an org's log with tenancy on.
    pub key_prefix: String,
    /// Bound on every Redis command but the tailer's blocking read.
    pub command_timeout_ms: u64,
    /// After each append, `WAIT` for this many replicas (0 = do not wait).
    pub wait_replicas: u32,
    /// How long `WAIT` may take; fewer replicas by then answers 503.
    pub wait_timeout_ms: u64,
    /// Redis: how often each open log appends a delivery probe that must
    /// come back through this node's tail for `/readyz` (0 = no probe).
    pub probe_interval_ms: u64,
    /// Redis: connections per node that publishes are written through
    /// (shared by every open log; `WAIT` blocks the one it is sent on).
    pub writer_connections: usize,
    /// Redis with tenancy: an org's log with no subscriber on this node and
    /// no publish or read for this long is closed, releasing what it holds
    /// (0 = never close).
    pub idle_log_close_s: u64,
    /// sled page cache size.
    pub cache_capacity_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Sled,
            data_dir: PathBuf::from("./data"),
            url: "redis://127.0.0.1:6379".into(),
            cluster_urls: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: "mymaster".into(),
            key_prefix: "sse".into(),
            command_timeout_ms: 5_000,
            wait_replicas: 0,
            wait_timeout_ms: 1_000,
            probe_interval_ms: 1_000,
            writer_connections: 2,
            idle_log_close_s: 300,
            cache_capacity_bytes: 256 * 1024 * 1024,
        }
    }
}

impl StorageConfig {
    fn validate(&self) -> Result<(), String> {
        let redis_url = |url: &str| -> Result<(), String> {
            let ok = ["redis://", "redis+unix://", "unix://"]
                .iter()
                .any(|scheme| url.starts_with(scheme))
                && redis::Client::open(url).is_ok();
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{url:?} is not a Redis URL like redis://127.0.0.1:6379 or redis+unix:///run/redis.sock"
                ))
            }
        };
        match self.backend {
            Backend::Sled => {}
            Backend::Redis => redis_url(&self.url).map_err(|m| format!("storage.url: {m}"))?,
            Backend::RedisCluster => {
                if self.cluster_urls.is_empty() {
                    return Err(
                        "storage.backend = \"redis-cluster\" needs storage.cluster_urls = [\"redis://host:port\", …]"
                            .into(),
                    );
                }
                for url in &self.cluster_urls {
                    if !url.starts_with("redis://") {
                        return Err(format!(
                            "storage.cluster_urls: {url:?} must be a redis://host:port URL"
                        ));
                    }
                    redis_url(url).map_err(|m| format!("storage.cluster_urls: {m}"))?;
                }
            }
            Backend::RedisSentinel => {
                if self.sentinels.is_empty() {
                    return Err(
                        "storage.backend = \"redis-sentinel\" needs storage.sentinels = [\"redis://host:26379\", …]"
                            .into(),
                    );
                }
                for url in &self.sentinels {
                    if !url.starts_with("redis://") {
                        return Err(format!(
                            "storage.sentinels: {url:?} must be a redis://host:port URL"
                        ));
                    }
                    redis_url(url).map_err(|m| format!("storage.sentinels: {m}"))?;
                }
                let name_ok = !self.sentinel_master.is_empty()
                    && self.sentinel_master.len() <= 64
                    && self
                        .sentinel_master
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                if !name_ok {
                    return Err(
                        "storage.sentinel_master must be 1 to 64 characters of [A-Za-z0-9_.-]"
                            .into(),
                    );
                }
            }
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
        if !prefix_ok {
            return Err("storage.key_prefix must be 1 to 64 characters of [A-Za-z0-9_.:-]".into());
        }
        if self.command_timeout_ms == 0 {
            return Err("storage.command_timeout_ms must be greater than 0".into());
        }
        // Each probe is one script call per open log per interval: below
        // 100 ms it is load, not a check; past 10 minutes no check at all.
        if self.probe_interval_ms != 0 && !(100..=600_000).contains(&self.probe_interval_ms) {
            return Err(format!(
                "storage.probe_interval_ms = {} is out of range: 100 to 600000 (ms), or 0 for no delivery probe",
                self.probe_interval_ms
            ));
        }
        if !(1..=64).contains(&self.writer_connections) {
            return Err(format!(
                "storage.writer_connections = {} is out of range: 1 to 64",
                self.writer_connections
            ));
        }
        Ok(())
    }
}

/// `[stream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Sent as `retry:` at the start of every stream.
    pub retry_ms: u64,
    /// A `: keepalive` comment is sent after this much silence.
    pub heartbeat_ms: u64,
    /// Events the live fan-out keeps for subscribers that are momentarily
    /// behind; one further behind reads from the log instead.
    pub live_buffer_events: usize,
    /// Events read from the log per replay batch (and per socket write).
    pub replay_batch_events: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            retry_ms: 2_000,
            heartbeat_ms: 15_000,
            live_buffer_events: 4096,
            replay_batch_events: 512,
        }
    }
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Newest events kept per topic.
    pub max_events_per_topic: u64,
    /// Events older than this are trimmed from every topic.
    pub max_age_s: u64,
    /// How often the background trimmer runs.
    pub trim_interval_ms: u64,
    /// Most events removed per trim batch, so trimming never holds the log long.
    pub trim_batch_events: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_events_per_topic: 100_000,
            max_age_s: 604_800,
            trim_interval_ms: 1_000,
            trim_batch_events: 1_000,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest publish body, declared or streamed.
    pub max_body_bytes: usize,
    /// Most open SSE streams; more are shed with `200` + `retry:` + close.
    pub max_connections: usize,
    /// A stream whose socket accepts no bytes for this long is closed.
    pub write_stall_ms: u64,
    /// Streams are closed after this long to spread load (0 = never).
    pub max_stream_age_ms: u64,
    /// Deepest JSON nesting accepted in a publish body (at most 128).
    pub max_json_depth: usize,
    /// Publishes waiting for the log writer; more wait for a place.
    pub publish_queue: usize,
    /// Most events written in one group commit.
    pub max_commit_batch: usize,
    /// Most open SSE streams from one client IP; more are shed like `max_connections`.
    pub max_connections_per_ip: usize,
    /// Publishes per second allowed per token (sustained; bursts up to
    /// `publish_burst`); 0 = no limit (the default).
    pub publish_rate_per_token: u32,
    /// Publishes per second allowed per client IP; 0 = no limit (the default).
    pub publish_rate_per_ip: u32,
    /// Burst size of both publish rate limits.
    pub publish_burst: u32,
    /// Take the client IP from the last `X-Forwarded-For` entry (only behind a proxy you run).
    pub trust_forwarded_for: bool,
    /// Largest request head (request line + headers); larger gets 431 and a closed connection.
    pub max_header_bytes: usize,
    /// A client must send its whole request head within this time (slowloris).
    pub header_read_timeout_ms: u64,
    /// Longest request target (path + query); longer gets 414.
    pub max_url_bytes: usize,
    /// Most topics one `/events` stream may follow (at most 64).
    pub max_topics_per_stream: usize,
    /// Most bytes of events all replay reads together hold between the log
    /// and their connections (`replay_budget`); more reads wait their turn.
    pub replay_read_budget_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_connections: 10_000,
            write_stall_ms: 60_000,
            max_stream_age_ms: 0,
            max_json_depth: 64,
            publish_queue: 8192,
            max_commit_batch: 4096,
            max_connections_per_ip: 1_000,
            publish_rate_per_token: 0,
            publish_rate_per_ip: 0,
            publish_burst: 2_000,
            trust_forwarded_for: false,
            max_header_bytes: 16 * 1024,
            header_read_timeout_ms: 10_000,
            max_url_bytes: 8 * 1024,
            max_topics_per_stream: 64,
            replay_read_budget_bytes: 4 * 1024 * 1024,
        }
    }
}

/// `[cors]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example`) or `"*"`.
    pub allowed_origins: Vec<String>,
}

/// `[auth]`: JWT verification. Absent = no auth.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `HS256` (default when `hs256_secret` is set), `RS256` or `ES256`. Pinned:
    /// tokens signed with any other algorithm are refused.
    pub algorithm: Option<String>,
    /// Shared secret for HS256 (at least 32 bytes).
    pub hs256_secret: Option<String>,
    /// PEM public key for RS256/ES256.
    pub public_key_file: Option<PathBuf>,
    /// Topics (or `prefix*` patterns) anyone may subscribe to without a token.
    #[serde(default)]
    pub public_topics: Vec<String>,
    /// Clock skew tolerated on `exp`, in seconds.
    #[serde(default)]
    pub leeway_s: u64,
}

impl AuthConfig {
    /// The algorithm in force.
    pub fn algorithm(&self) -> &str {
        self.algorithm.as_deref().unwrap_or("HS256")
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(secret) = &self.hs256_secret {
            if PLACEHOLDER_SECRETS.contains(&secret.as_str()) {
                return Err(
                    "hs256_secret is the example from the documentation: anyone can sign tokens \
                     with it; generate one, e.g. `openssl rand -base64 48`"
                        .into(),
                );
            }
        }
        match (self.algorithm(), &self.hs256_secret, &self.public_key_file) {
            ("HS256", Some(secret), None) if secret.len() >= 32 => {}
            ("HS256", Some(_), None) => return Err("hs256_secret must be at least 32 bytes".into()),
            ("HS256", _, _) => {
                return Err("HS256 needs hs256_secret (and no public_key_file)".into())
            }
            ("RS256" | "ES256", None, Some(_)) => {}
            ("RS256" | "ES256", _, _) => {
                return Err(format!(
                    "{} needs public_key_file (and no hs256_secret)",
                    self.algorithm()
                ))
            }
            (other, _, _) => {
                return Err(format!(
                    "algorithm {other:?} is not supported; use HS256, RS256 or ES256"
                ))
            }
        }
        for pattern in &self.public_topics {
            crate::model::TopicPattern::parse(pattern)
                .map_err(|m| format!("public_topics: {m}"))?;
        }
        Ok(())
    }
}

/// The example secrets of README.md and config.toml: refused, since they are public.
const PLACEHOLDER_SECRETS: &[&str] = &[
    "a-random-secret-of-at-least-32-bytes",
    "change-me-to-at-least-32-random-bytes!!",
];

/// `[publish]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// How long an `Idempotency-Key` is remembered after its event was
    /// stored; a repeat within it replays, after it stores anew.
    pub idempotency_window_s: u64,
    /// Most events in one `POST /publish/batch` (the body limit applies too).
    pub max_batch_events: usize,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            idempotency_window_s: 86_400,
            max_batch_events: 1_000,
        }
    }
}

impl PublishConfig {
    /// `idempotency_window_s` as a duration.
    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window_s)
    }
}

/// `[tls]`: serve HTTPS, HTTP/2 and HTTP/1.1 chosen by ALPN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the two files are checked for a change (0 = only on SIGHUP).
    #[serde(default = "TlsConfig::default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

impl TlsConfig {
    fn default_reload_interval_ms() -> u64 {
        2_000
    }

    /// `reload_interval_ms` as a duration; `None` when polling is off.
    pub fn reload_interval(&self) -> Option<Duration> {
        (self.reload_interval_ms > 0).then(|| Duration::from_millis(self.reload_interval_ms))
    }
}

/// `[http2]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// Streams one connection may have open at once; more are refused
    /// (`REFUSED_STREAM`, the browser retries), the connection stays (h2
    /// closes it after 1,024 refusals: a client ignoring the limit).
    pub max_concurrent_streams: u32,
    /// Bytes a client may send on one stream before we grant more (publish
    /// bodies; SSE requests send none).
    pub stream_window_bytes: u32,
    /// Bytes a client may send on the whole connection before we grant more.
    pub connection_window_bytes: u32,
    /// Most bytes of one stream queued for a client that has not granted
    /// the window for them; past it the stream waits (and is cut after
    /// `limits.write_stall_ms`).
    pub max_send_buffer_bytes: usize,
    /// A connection with no open stream for this long is closed (`GOAWAY`,
    /// then the socket); 0 = never. Streams, heartbeats included, keep it.
    pub idle_timeout_ms: u64,
    /// A `PING` is sent when the client sent nothing for this long, and the
    /// connection is closed (its streams with it) when no answer comes
    /// within `keepalive_timeout_ms`: a peer that vanished without a FIN is
    /// found even while its streams only get heartbeats. 0 = no pings.
    pub keepalive_interval_ms: u64,
    /// How long a `PING` may go unanswered.
    pub keepalive_timeout_ms: u64,
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 256,
            stream_window_bytes: 256 * 1024,
            connection_window_bytes: 1024 * 1024,
            max_send_buffer_bytes: 64 * 1024,
            // nginx's http2_idle_timeout (before 1.19.7 folded it into
            // keepalive_timeout); Caddy's idle_timeout is 5 min.
            idle_timeout_ms: 180_000,
            // Go's HTTP/2 transport pings after 15 s of silence and waits
            // 15 s; hyper waits 20 s. A minute keeps the cost nil for
            // thousands of connections and finds a dead peer in < 90 s.
            keepalive_interval_ms: 60_000,
            keepalive_timeout_ms: 20_000,
        }
    }
}

impl Http2Config {
    fn validate(&self) -> Result<(), String> {
        // RFC 9113 6.9.2: windows above 2^31-1 are a protocol error; below
        // the default 65,535 a publish crawls.
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        if !(100..=10_000).contains(&self.max_concurrent_streams) {
            return Err("http2.max_concurrent_streams must be 100 to 10000".into());
        }
        for (name, value) in [
            ("http2.stream_window_bytes", self.stream_window_bytes),
            (
                "http2.connection_window_bytes",
                self.connection_window_bytes,
            ),
        ] {
            if !(65_535..=MAX_WINDOW).contains(&value) {
                return Err(format!("{name} must be 65535 to {MAX_WINDOW}"));
            }
        }
        if !(16_384..=16 * 1024 * 1024).contains(&self.max_send_buffer_bytes) {
            return Err("http2.max_send_buffer_bytes must be 16384 to 16777216".into());
        }
        const DAY_MS: u64 = 24 * 3600 * 1000;
        if self.idle_timeout_ms > DAY_MS || self.keepalive_interval_ms > DAY_MS {
            return Err(
                "http2.idle_timeout_ms and http2.keepalive_interval_ms must be at most 86400000 (0 = off)"
                    .into(),
            );
        }
        if !(100..=600_000).contains(&self.keepalive_timeout_ms) {
            return Err("http2.keepalive_timeout_ms must be 100 to 600000".into());
        }
        Ok(())
    }

    /// `idle_timeout_ms` as a duration; `None` when off.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms))
    }

    /// `keepalive_interval_ms` as a duration; `None` when off.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        (self.keepalive_interval_ms > 0).then(|| Duration::from_millis(self.keepalive_interval_ms))
    }
}

/// `[tenancy]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenancyConfig {
    pub enabled: bool,
}

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.listen_addr()?;
        self.storage.validate().map_err(ConfigError::Invalid)?;
        self.http2.validate().map_err(ConfigError::Invalid)?;
        if let Some(tls) = &self.tls {
            if tls.reload_interval_ms > 3_600_000 {
                return invalid("tls.reload_interval_ms must be at most 3600000".into());
            }
        }
        if let Some(auth) = &self.auth {
            auth.validate()
                .map_err(|m| ConfigError::Invalid(format!("auth: {m}")))?;
        } else if self.tenancy.enabled {
            return invalid("[tenancy] enabled = true needs [auth]: tokens carry the org".into());
        }
        let positive = [
            ("stream.heartbeat_ms", self.stream.heartbeat_ms),
            (
                "stream.live_buffer_events",
                self.stream.live_buffer_events as u64,
            ),
            (
                "stream.replay_batch_events",
                self.stream.replay_batch_events as u64,
            ),
            (
                "retention.max_events_per_topic",
                self.retention.max_events_per_topic,
            ),
            ("retention.max_age_s", self.retention.max_age_s),
            (
                "retention.trim_interval_ms",
                self.retention.trim_interval_ms,
            ),
            (
                "retention.trim_batch_events",
                self.retention.trim_batch_events as u64,
            ),
            ("limits.max_body_bytes", self.limits.max_body_bytes as u64),
            (
                "publish.idempotency_window_s",
                self.publish.idempotency_window_s,
            ),
            (
                "publish.max_batch_events",
                self.publish.max_batch_events as u64,
            ),
            ("limits.max_connections", self.limits.max_connections as u64),
            ("limits.write_stall_ms", self.limits.write_stall_ms),
            ("limits.max_json_depth", self.limits.max_json_depth as u64),
            ("limits.publish_queue", self.limits.publish_queue as u64),
            (
                "limits.max_commit_batch",
                self.limits.max_commit_batch as u64,
            ),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip as u64,
            ),
            ("limits.publish_burst", u64::from(self.limits.publish_burst)),
            (
                "limits.header_read_timeout_ms",
                self.limits.header_read_timeout_ms,
            ),
            ("limits.max_url_bytes", self.limits.max_url_bytes as u64),
            (
                "limits.max_topics_per_stream",
                self.limits.max_topics_per_stream as u64,
            ),
            (
                "limits.replay_read_budget_bytes",
                self.limits.replay_read_budget_bytes as u64,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return invalid(format!("{name} must be greater than 0"));
            }
        }
        // Every duration becomes `now + d` somewhere; past these bounds a value
        // is a typo (or an attempt to overflow a clock), not a setting.
        const DAY_MS: u64 = 24 * 3600 * 1000;
        let bounded = [
            (
                "server.drain_timeout_ms",
                self.server.drain_timeout_ms,
                DAY_MS,
            ),
            ("stream.retry_ms", self.stream.retry_ms, DAY_MS),
            ("stream.heartbeat_ms", self.stream.heartbeat_ms, DAY_MS),
            (
                "retention.trim_interval_ms",
                self.retention.trim_interval_ms,
                DAY_MS,
            ),
            ("limits.write_stall_ms", self.limits.write_stall_ms, DAY_MS),
            (
                "limits.header_read_timeout_ms",
                self.limits.header_read_timeout_ms,
                DAY_MS,
            ),
            (
                "limits.max_stream_age_ms",
                self.limits.max_stream_age_ms,
                30 * DAY_MS,
            ),
        ];
        // A key outliving a year is a typo; a window is a retry horizon, not storage.
        if self.publish.idempotency_window_s > 366 * 24 * 3600 {
            return invalid(format!(
                "publish.idempotency_window_s = {} is too long; the most is 31622400 (366 days)",
                self.publish.idempotency_window_s
            ));
        }
        // Each event of a batch is held in memory until the commit.
        if self.publish.max_batch_events > 100_000 {
            return invalid(format!(
                "publish.max_batch_events = {} is too many; the most is 100000",
                self.publish.max_batch_events
            ));
        }
        for (name, value, most) in bounded {
            if value > most {
                return invalid(format!(
                    "{name} = {value} is too long; the most is {most} ({} days)",
                    most / DAY_MS
                ));
            }
        }
        if self.limits.max_header_bytes < 8192 {
            return invalid("limits.max_header_bytes must be at least 8192".into());
        }
        if self.limits.max_topics_per_stream > crate::model::MAX_TOPICS {
            return invalid(format!(
                "limits.max_topics_per_stream must be at most {}",
                crate::model::MAX_TOPICS
            ));
        }
        if self.limits.max_json_depth > 128 {
            return invalid("limits.max_json_depth must be at most 128".into());
        }
        for origin in &self.cors.allowed_origins {
            if origin != "*" && origin.parse::<axum::http::HeaderValue>().is_err() {
                return invalid(format!(
                    "cors.allowed_origins: {origin:?} is not a valid origin"
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            route
                .validate()
                .map_err(|m| ConfigError::Invalid(format!("routes[{i}]: {m}")))?;
            if self.routes[..i]
                .iter()
                .any(|r| r.module == route.module && r.kind == route.kind)
            {
                return invalid(format!(
                    "routes[{i}]: {}/{} is defined twice",
                    route.module, route.kind
                ));
            }
        }
        Ok(())
    }

    /// The listen address: an IP and port, or a host name and port
    /// (`localhost:0`), resolved to its first address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let listen = &self.server.listen;
        if let Ok(addr) = listen.parse() {
            return Ok(addr);
        }
        use std::net::ToSocketAddrs;
        listen
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "listen address {listen:?} (server.listen, --listen or SSE_GATEWAY_LISTEN) \
                     is not host:port, e.g. 127.0.0.1:8080 or localhost:0"
                ))
            })
    }

    /// The configured routes, or the projects module's built-in four.
    pub fn effective_routes(&self) -> Vec<RouteSpec> {
        if self.routes.is_empty() {
            crate::routes::projects_routes()
        } else {
            self.routes.clone()
        }
    }
}

/// Durations in the types the runtime wants.
impl StreamConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

impl LimitsConfig {
    pub fn write_stall(&self) -> Duration {
        Duration::from_millis(self.write_stall_ms)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn max_stream_age(&self) -> Option<Duration> {
        (self.max_stream_age_ms > 0).then(|| Duration::from_millis(self.max_stream_age_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_their_bound_are_refused_not_overflowed() {
        for (section, key) in [
            ("stream", "heartbeat_ms"),
            ("limits", "max_stream_age_ms"),
            ("limits", "header_read_timeout_ms"),
            ("limits", "write_stall_ms"),
        ] {
            let err = Config::from_toml(&format!("[{section}]\n{key} = {}\n", i64::MAX))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("{section}.{key}")), "{err}");
            assert!(err.contains("too long"), "{err}");
        }
        assert!(Config::from_toml("[stream]\nheartbeat_ms = 86400000\n").is_ok());
    }

    #[test]
    fn http2_idle_and_keepalive_are_bounded_and_0_turns_them_off() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.http2.idle_timeout(), Some(Duration::from_secs(180)));
        assert_eq!(
            config.http2.keepalive_interval(),
            Some(Duration::from_secs(60))
        );
        let off =
            Config::from_toml("[http2]\nidle_timeout_ms = 0\nkeepalive_interval_ms = 0\n").unwrap();
        assert_eq!(off.http2.idle_timeout(), None);
        assert_eq!(off.http2.keepalive_interval(), None);
        for (key, value) in [
            ("idle_timeout_ms", "86400001"),
            ("keepalive_interval_ms", "86400001"),
            ("keepalive_timeout_ms", "0"),
            ("keepalive_timeout_ms", "600001"),
        ] {
            let err = Config::from_toml(&format!("[http2]\n{key} = {value}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("http2.{key}")), "{key}: {err}");
        }
    }

    #[test]
    fn the_probe_interval_is_off_or_between_100_ms_and_10_minutes() {
        assert_eq!(
            Config::from_toml("").unwrap().storage.probe_interval_ms,
            1_000
        );
        for ok in [0, 100, 600_000] {
            let text = format!("[storage]\nprobe_interval_ms = {ok}\n");
            assert!(Config::from_toml(&text).is_ok(), "{ok}");
        }
        for bad in [1, 99, 600_001] {
            let text = format!("[storage]\nprobe_interval_ms = {bad}\n");
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains("storage.probe_interval_ms"), "{err}");
        }
    }

    #[test]
    fn publish_settings_are_bounded() {
        let defaults = Config::from_toml("").unwrap().publish;
        assert_eq!(
            (defaults.idempotency_window_s, defaults.max_batch_events),
            (86_400, 1_000)
        );
        for (text, names) in [
            ("idempotency_window_s = 0", "publish.idempotency_window_s"),
            (
                "idempotency_window_s = 31622401",
                "publish.idempotency_window_s",
            ),
            ("max_batch_events = 0", "publish.max_batch_events"),
            ("max_batch_events = 100001", "publish.max_batch_events"),
            ("idempotency_window = 5", "idempotency_window"),
        ] {
            let err = Config::from_toml(&format!("[publish]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(names), "{text}: {err}");
        }
        let set =
            Config::from_toml("[publish]\nidempotency_window_s = 1\nmax_batch_events = 100000\n");
        assert!(set.is_ok());
    }

    #[test]
    fn the_example_secrets_of_the_docs_are_refused() {
        for secret in PLACEHOLDER_SECRETS {
            let err = Config::from_toml(&format!("[auth]\nhs256_secret = {secret:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("example from the documentation"), "{err}");
        }
        let own = "q".repeat(40);
        assert!(Config::from_toml(&format!("[auth]\nhs256_secret = {own:?}\n")).is_ok());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[stream]\nretry_msec = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry_msec"), "{err}");
        let err = Config::from_toml("[nope]\n").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn tls_and_http2_tables_parse_and_are_checked() {
        let config = Config::from_toml(
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[http2]\nmax_concurrent_streams = 100\n",
        )
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("c.pem"));
        assert_eq!(tls.reload_interval(), Some(Duration::from_secs(2)));
        assert_eq!(config.http2.max_concurrent_streams, 100);
        for bad in [
            "[tls]\ncert_file = \"c.pem\"\n",
            "[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nreload_interval_ms = 3600001\n",
            "[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nextra = 1\n",
            "[http2]\nmax_concurrent_streams = 99\n",
            "[http2]\nstream_window_bytes = 1000\n",
            "[http2]\nconnection_window_bytes = 2147483648\n",
            "[http2]\nmax_send_buffer_bytes = 100\n",
        ] {
            assert!(Config::from_toml(bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn shipped_config_is_valid_and_has_the_projects_routes() {
        let text = include_str!("../config.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.listen_addr().unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(config.storage.data_dir, PathBuf::from("./data"));
        let kinds: Vec<_> = config.routes.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["project", "task", "assignment", "dependency"]);
        assert_eq!(config.routes, crate::routes::projects_routes());
    }

    #[test]
    fn redis_backends_are_validated() {
        let config = Config::from_toml(
            "[storage]\nbackend = \"redis\"\nurl = \"redis+unix:///tmp/r.sock\"\n",
        )
        .unwrap();
        assert_eq!(config.storage.backend, Backend::Redis);
        let err = Config::from_toml("[storage]\nbackend = \"redis\"\nurl = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.url"), "{err}");
        let err = Config::from_toml("[storage]\nbackend = \"redis-cluster\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster_urls"), "{err}");
        let err = Config::from_toml("[storage]\nbackend = \"redis-sentinel\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.sentinels"), "{err}");
        let err = Config::from_toml(
            "[storage]\nbackend = \"redis-sentinel\"\nsentinels = [\"http://x:1\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("storage.sentinels"), "{err}");
        let err = Config::from_toml(
            "[storage]\nbackend = \"redis-sentinel\"\nsentinels = [\"redis://a:1\"]\nsentinel_master = \"\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("storage.sentinel_master"), "{err}");
        let config = Config::from_toml(
            "[storage]\nbackend = \"redis-sentinel\"\nsentinels = [\"redis://a:1\", \"redis://b:2\"]\nsentinel_master = \"main\"\n",
        )
        .unwrap();
        assert_eq!(config.storage.backend, Backend::RedisSentinel);
        assert_eq!(config.storage.sentinels.len(), 2);
        let err = Config::from_toml("[storage]\nbackend = \"nats\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis-cluster"), "{err}");
        assert!(
            err.contains(r#"storage.backend "nats" is unknown"#),
            "{err}"
        );
        assert_eq!(
            "nats".parse::<Backend>().unwrap_err(),
            r#"storage.backend "nats" is unknown; use "sled", "redis", "redis-cluster" or "redis-sentinel""#
        );
        assert_eq!("redis-cluster".parse(), Ok(Backend::RedisCluster));
        let err = Config::from_toml("[storage]\nkey_prefix = \"{x}\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key_prefix"), "{err}");
        let err = Config::from_toml("[storage]\nredis_url = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis_url"), "{err}");
    }

    #[test]
    fn zero_limits_are_refused() {
        let err = Config::from_toml("[limits]\nmax_connections = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_connections"), "{err}");
    }
}
