//! The `sse-gateway` binary: CLI, logging, config, signals, exit codes.
//!
//! `serve` (the default) runs the gateway; the operator subcommands live in
//! `cli/`, one file each: this file only parses and dispatches.

mod cli;

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use sse_gateway::config::{Backend, ConfigError};
use sse_gateway::Config;

/// jemalloc rather than glibc's malloc. Measured in the one-hour soak
/// (BENCHMARKS.md "Soak"): with glibc the live heap stayed flat (40–50 MB,
/// heaptrack) while RSS climbed 65 → 102 MiB — freed memory kept in per-thread
/// arenas that many runtime threads touch. jemalloc returns dirty pages to the
/// kernel on a timer, so RSS follows the heap.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: freed pages go back to the kernel
/// after about a second instead of ten (`dirty_decay_ms`), and are released
/// outright rather than kept "muzzy". The one-hour soak with the defaults
/// had no growth (slope -0.3 MiB/h) but RSS swung ±12 % around its mean
/// with the transient buffers of large events; RSS is what an operator's
/// memory limit sees. NUL-terminated: jemalloc reads a C string.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: &[u8] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// The reader of the allocator this binary installed, for `/metrics`.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
fn installed_heap_reader() -> Option<sse_gateway::process_memory::HeapReader> {
    Some(jemalloc_heap)
}

#[cfg(not(all(feature = "jemalloc", not(target_env = "msvc"))))]
fn installed_heap_reader() -> Option<sse_gateway::process_memory::HeapReader> {
    None
}

/// jemalloc's counts now.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
fn jemalloc_heap() -> Option<sse_gateway::process_memory::HeapReading> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // jemalloc refreshes its statistics only when the epoch advances;
    // without this every scrape would repeat the first reading.
    epoch::advance().ok()?;
    let bytes = |value: usize| u64::try_from(value).unwrap_or(u64::MAX);
    Some(sse_gateway::process_memory::HeapReading {
        allocated: bytes(stats::allocated::read().ok()?),
        active: bytes(stats::active::read().ok()?),
        resident: bytes(stats::resident::read().ok()?),
        retained: bytes(stats::retained::read().ok()?),
    })
}

#[derive(Parser)]
#[command(
    name = "sse-gateway",
    version,
    about = "Server-Sent Events gateway with a durable replay log"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve(ServeArgs),
    /// Publish one event to a running gateway and print its id.
    Publish(cli::publish::PublishArgs),
    /// Follow topics of a running gateway; reconnects and resumes by itself.
    Tail(cli::tail::TailArgs),
    /// Summarise a data directory (offline: the gateway must be stopped).
    Inspect(cli::inspect::InspectArgs),
    /// Write every event of a log (sled directory or Redis) as JSON lines (offline).
    Export(cli::transfer::ExportArgs),
    /// Load an export into a new, empty data directory or a new Redis log (offline).
    Import(cli::transfer::ImportArgs),
    /// Verify a data directory without changing it (offline). Exit 0 clean, 1 problems, 2 error.
    Check(cli::check::CheckArgs),
    /// After `serve` refused a directory that lost acknowledged events: save a
    /// copy of it, then make it servable again from what is left (offline).
    Repair(cli::repair::RepairArgs),
    /// Mint an HS256 development token from the configured secret.
    Token(cli::token::TokenArgs),
}

#[derive(clap::Args, Clone, Default)]
struct ServeArgs {
    /// Config file (default ./config.toml; built-in defaults if that is missing).
    #[arg(long, env = "SSE_GATEWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Listen address, overriding server.listen (e.g. 127.0.0.1:8080; port 0 picks one).
    #[arg(long, env = "SSE_GATEWAY_LISTEN", global = true)]
    listen: Option<String>,
    /// sled data directory, overriding storage.data_dir.
    #[arg(long, env = "SSE_GATEWAY_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Storage backend, overriding storage.backend: sled, redis or redis-cluster.
    #[arg(long, env = "SSE_GATEWAY_STORAGE_BACKEND", global = true)]
    storage_backend: Option<String>,
    /// Redis URL, overriding storage.url (redis://host:port or redis+unix:///path);
    /// with redis-cluster, a comma-separated list overriding storage.cluster_urls.
    #[arg(long, env = "SSE_GATEWAY_STORAGE_URL", global = true)]
    storage_url: Option<String>,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1) with a self-signed certificate for
    /// localhost, made under <data_dir>/dev-tls/ and reused; prints its path
    /// and SHA-256 fingerprint. For development only; overrides [tls].
    #[arg(long)]
    dev_tls: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, None | Some(Command::Serve(_)));
    // The operator commands speak on stderr themselves; logs only for warnings.
    let default_filter = if serving { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // `--config` and `--data-dir` are global: they land in `cli.serve` wherever they were given.
    let global = cli.serve;
    // `check` tells "could not check" (2) from "problems found" (1).
    let error_code = match cli.command {
        Some(Command::Check(_)) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    };
    match dispatch(cli.command, global) {
        Ok(code) => code,
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sse-gateway: {}", one_line(&e));
            error_code
        }
    }
}

/// The error and its causes on one line, each said once: many of our
/// errors already quote their source in their own message, and `{:#}`
/// would print it a second time.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn dispatch(command: Option<Command>, global: ServeArgs) -> anyhow::Result<ExitCode> {
    let data_dir = || {
        cli::data_dir(
            global.data_dir.as_deref(),
            global.config.as_deref(),
            global.storage_backend.as_deref(),
        )
    };
    let store = |org: Option<&str>| {
        cli::store(
            global.data_dir.as_deref(),
            global.config.as_deref(),
            global.storage_backend.as_deref(),
            global.storage_url.as_deref(),
            org,
        )
    };
    let done = |()| ExitCode::SUCCESS;
    match command {
        None => serve(global.clone()).map(done),
        Some(Command::Serve(args)) => serve(args).map(done),
        Some(Command::Publish(args)) => cli::publish::run(args).map(done),
        Some(Command::Tail(args)) => cli::tail::run(args).map(done),
        Some(Command::Inspect(args)) => cli::inspect::run(args, &data_dir()?).map(done),
        Some(Command::Export(args)) => {
            let store = store(args.org.as_deref())?;
            cli::transfer::export(args, &store).map(done)
        }
        Some(Command::Import(args)) => {
            let store = store(args.org.as_deref())?;
            cli::transfer::import(args, &store).map(done)
        }
        Some(Command::Check(args)) => cli::check::run(args, &data_dir()?),
        Some(Command::Repair(args)) => cli::repair::run(args, &data_dir()?).map(done),
        Some(Command::Token(args)) => cli::token::run(args, global.config.as_deref()).map(done),
    }
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => {
            let default = PathBuf::from("config.toml");
            if default.exists() {
                Config::from_file(&default)?
            } else {
                tracing::warn!("no ./config.toml; using built-in defaults");
                Config::default()
            }
        }
    };
    if let Some(listen) = &args.listen {
        config.server.listen = listen.clone();
    }
    if let Some(dir) = &args.data_dir {
        config.storage.data_dir = dir.clone();
    }
    if let Some(backend) = &args.storage_backend {
        config.storage.backend = backend.parse().map_err(ConfigError::Invalid)?;
    }
    if let Some(url) = &args.storage_url {
        let list = || url.split(',').map(|u| u.trim().to_owned()).collect();
        if config.storage.backend == Backend::RedisCluster {
            config.storage.cluster_urls = list();
        } else if config.storage.backend == Backend::RedisSentinel {
            config.storage.sentinels = list();
        } else {
            config.storage.url = url.clone();
        }
    }
    config.validate()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = load_config(&args)?;
    if args.dev_tls {
        use_dev_certificate(&mut config)?;
    }
    // A bad certificate is the operator's one-line error, before anything starts.
    if let Some(tls) = &config.tls {
        sse_gateway::tls::load(&tls.cert_file, &tls.key_file)?;
    }
    // Before any thread starts: sled's own log writes fsynced (durable.rs).
    #[cfg(target_os = "linux")]
    if config.storage.backend == Backend::Sled {
        if let Err(e) = sse_gateway::log::sled::fsync_every_log_write() {
            tracing::warn!(
                error = %e,
                "cannot install the seccomp filter that makes sled fsync its own log writes: \
                 on a drive with a volatile write cache and no power-loss protection, a power \
                 cut may lose acknowledged events (README, \"Power loss\")"
            );
        }
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = config.listen_addr()?;
        let listener = listen(addr).with_context(|| format!("cannot listen on {addr}"))?;
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone()));
        let host = sse_gateway::Host {
            heap: installed_heap_reader(),
        };
        sse_gateway::run_hosted(listener, config, stop, host)
            .await
            .context("gateway stopped with an error")
    })
}

/// `--dev-tls`: serves the development certificate (made when missing)
/// and tells the operator where it is and how to trust it.
fn use_dev_certificate(config: &mut Config) -> anyhow::Result<()> {
    let cert = sse_gateway::tls::dev::ensure(&config.storage.data_dir)?;
    let path = std::path::absolute(&cert.cert_file).unwrap_or_else(|_| cert.cert_file.clone());
    if config.tls.is_some() {
        tracing::warn!("--dev-tls replaces the certificate of [tls]");
    }
    let reload_interval_ms = config.tls.as_ref().map_or(2_000, |t| t.reload_interval_ms);
    config.tls = Some(sse_gateway::config::TlsConfig {
        cert_file: cert.cert_file.clone(),
        key_file: cert.key_file.clone(),
        reload_interval_ms,
    });
    let made = if cert.created { "made" } else { "reused" };
    let port = match config.listen_addr().map(|a| a.port()) {
        Ok(0) => "<port>".to_owned(),
        Ok(port) => port.to_string(),
        Err(_) => "8080".to_owned(),
    };
    // Not `println!`: a closed stdout (`| head`) must not stop the gateway.
    let _ = writeln!(
        std::io::stdout(),
        "dev TLS: self-signed certificate for localhost, 127.0.0.1 and ::1 ({made})\n\
         \x20 certificate: {}\n\
         \x20 SHA-256 fingerprint: {}\n\
         \x20 try: curl --cacert {} https://localhost:{port}/healthz\n\
         \x20 browsers: trust that file, or accept the warning once (development only)",
        path.display(),
        cert.fingerprint,
        path.display(),
    );
    Ok(())
}

/// Binds `addr` with a listen backlog of [`LISTEN_BACKLOG`] (tokio's `bind`
/// uses 1,024): thousands of `EventSource`s reconnecting at once after a
/// restart would otherwise overflow the accept queue and wait for SYN
/// retransmits (1 s, 3 s, …).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Pending connections the kernel queues for us (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Cancels `stop` on SIGTERM or Ctrl-C.
async fn stop_on_signal(stop: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupt: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
    stop.cancel();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
