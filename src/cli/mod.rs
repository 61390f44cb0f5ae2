//! The operator subcommands beside `serve`.
//!
//! `publish` and `tail` talk to a running gateway over HTTP (its public API,
//! nothing more). `inspect`, `export`, `import` and `check` work offline on a
//! data directory through [`sse_gateway::log::sled::offline`], which owns the
//! on-disk layout; the gateway must not be running on it (sled locks it).
//! `export` and `import` also work on a Redis log ([`Store`], through
//! [`sse_gateway::log::redis::offline`]).
//! Each subcommand returns an error for `main` to print as one line.

pub mod check;
pub mod inspect;
pub mod pretty;
pub mod publish;
pub mod repair;
pub mod tail;
pub mod token;
pub mod transfer;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sse_gateway::config::Backend;
use sse_gateway::log::redis::RedisTarget;
use sse_gateway::log::sled::offline::{OfflineError, Progress, Unit};
use sse_gateway::Config;

/// Where the gateway is, for the HTTP subcommands.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// Base URL of the running gateway.
    #[arg(
        long,
        env = "SSE_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    pub url: String,
    /// Bearer token sent in `Authorization`, when the gateway requires auth.
    #[arg(
        long,
        env = "SSE_GATEWAY_TOKEN",
        hide_env_values = true,
        value_name = "JWT"
    )]
    pub token: Option<String>,
}

impl GatewayArgs {
    /// The base URL without a trailing slash; only `http://` (this build has no TLS).
    pub fn base(&self) -> anyhow::Result<String> {
        let url = self.url.trim_end_matches('/');
        if url.starts_with("https://") {
            bail!("--url {url}: this build speaks plain HTTP only; use http:// (TLS ends at the proxy in front of the gateway)");
        }
        if !url.starts_with("http://") {
            bail!("--url {url}: expected http://HOST:PORT");
        }
        Ok(url.to_owned())
    }

    /// Adds the bearer token, if any.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// The data directory for an offline subcommand: `--data-dir` (or its env),
/// else `storage.data_dir` of the config file (`--config`, else
/// `./config.toml` when present), else `./data` — what `serve` would open.
pub fn data_dir(
    explicit: Option<&Path>,
    config: Option<&Path>,
    backend_flag: Option<&str>,
) -> anyhow::Result<PathBuf> {
    // `--storage-backend` / SSE_GATEWAY_STORAGE_BACKEND: honoured, so a
    // Redis flag never silently reads the sled `./data` instead.
    if let Some(flag) = backend_flag {
        let backend: Backend = flag.parse().map_err(anyhow::Error::msg)?;
        if backend != Backend::Sled {
            bail!(
                "--storage-backend {:?}: inspect, check and repair work on sled data directories \
                 only (export and import work on Redis too: `export` a Redis log, `import` it \
                 into a sled directory, and inspect that)",
                backend.as_str()
            );
        }
    }
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    let config = match config {
        Some(path) => Config::from_file(path)?,
        None if Path::new("config.toml").exists() => Config::from_file(Path::new("config.toml"))?,
        None => Config::default(),
    };
    if config.storage.backend != Backend::Sled {
        bail!(
            "storage.backend is {:?}: inspect, check and repair work on sled data directories \
             only; pass --data-dir (export and import work on Redis too)",
            config.storage.backend.as_str()
        );
    }
    Ok(config.storage.data_dir)
}

/// Where `export` reads or `import` writes a log.
pub enum Store {
    /// A sled data directory.
    Sled(PathBuf),
    /// The log `{tag}` on a single Redis server.
    Redis {
        target: RedisTarget,
        tag: String,
        command_timeout: Duration,
    },
}

/// The store of `export` / `import`: the backend from `--storage-backend`
/// (or its env), else `storage.backend` of the config; for sled the data
/// directory as [`data_dir`] finds it; for Redis `--storage-url` (or its env)
/// else `storage.url`, and the log of `storage.key_prefix` (of `org` when
/// given, as the gateway names an org's log with tenancy on).
pub fn store(
    explicit_dir: Option<&Path>,
    config: Option<&Path>,
    backend_flag: Option<&str>,
    url_flag: Option<&str>,
    org: Option<&str>,
) -> anyhow::Result<Store> {
    let mut config = match config {
        Some(path) => Config::from_file(path)?,
        None if Path::new("config.toml").exists() => Config::from_file(Path::new("config.toml"))?,
        None => Config::default(),
    };
    if let Some(flag) = backend_flag {
        config.storage.backend = flag.parse().map_err(anyhow::Error::msg)?;
    }
    match config.storage.backend {
        Backend::Sled => {
            if org.is_some() {
                bail!("--org selects an org's Redis log; a sled data directory holds every org's events in one log");
            }
            if url_flag.is_some() {
                bail!("--storage-url is for the Redis backends; this reads a sled data directory (pass --storage-backend redis to use Redis)");
            }
            Ok(Store::Sled(match explicit_dir {
                Some(dir) => dir.to_path_buf(),
                None => config.storage.data_dir,
            }))
        }
        Backend::RedisCluster => bail!(
            "--storage-backend \"redis-cluster\": export and import work on a single Redis \
             server only in this release (finding the idempotency keys needs SCAN on the right \
             node); point --storage-backend redis --storage-url at the node that holds the log's \
             slot, or run a gateway on the cluster and replay it"
        ),
        Backend::RedisSentinel => bail!(
            "--storage-backend \"redis-sentinel\": export and import take the primary's address \
             in this release; ask a Sentinel (SENTINEL get-master-addr-by-name <name>) and pass \
             --storage-backend redis --storage-url redis://<primary>"
        ),
        Backend::Redis => {
            if explicit_dir.is_some() {
                bail!(
                    "--data-dir is for the sled backend, and the backend is redis (--storage-backend \
                     or storage.backend): the Redis log is named by --storage-url and \
                     storage.key_prefix; pass --storage-backend sled to use a directory"
                );
            }
            if let Some(url) = url_flag {
                config.storage.url = url.to_owned();
            }
            config.validate()?;
            let mut tag = config.storage.key_prefix.clone();
            if let Some(org) = org {
                let valid = !org.is_empty()
                    && org.len() <= 64
                    && org
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !valid {
                    bail!("--org {org:?}: an org is 1 to 64 characters of [A-Za-z0-9_-]");
                }
                tag = format!("{tag}:org:{org}");
            }
            Ok(Store::Redis {
                target: RedisTarget::Single(config.storage.url.clone()),
                tag,
                command_timeout: Duration::from_millis(config.storage.command_timeout_ms),
            })
        }
    }
}

/// A current-thread runtime for the HTTP subcommands.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The innermost cause of an HTTP client error ("Connection refused …"),
/// which says more than reqwest's "error sending request".
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A progress bar on stderr for long offline runs; draws nothing when stderr
/// is not a terminal (scripts, CI, tests).
pub struct Bar {
    bar: Option<ProgressBar>,
    visible: bool,
}

impl Bar {
    pub fn new() -> Self {
        Self {
            bar: None,
            visible: std::io::stderr().is_terminal(),
        }
    }
}

impl Progress for Bar {
    fn phase(&mut self, name: &str, total: Option<u64>, unit: Unit) {
        self.finish();
        if !self.visible {
            return;
        }
        let bar = match total {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        let template = match (total.is_some(), unit) {
            (true, Unit::Bytes) => {
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)"
            }
            (true, Unit::Items) => "{msg:>10} [{bar:40}] {percent:>3}% ({eta} left)",
            (false, Unit::Bytes) => "{spinner} {msg} {bytes} ({bytes_per_sec})",
            (false, Unit::Items) => "{spinner} {msg} {human_pos} ({per_sec})",
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(name.to_owned());
        if total.is_none() {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        self.bar = Some(bar);
    }

    fn position(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Whether `error` is a write to a closed pipe (`tail … | head`): the reader
/// is gone, so the command ends quietly instead of reporting it.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let io = cause.downcast_ref::<std::io::Error>().or_else(|| {
            match cause.downcast_ref::<OfflineError>() {
                Some(OfflineError::Io { error, .. }) => Some(error),
                _ => None,
            }
        });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
