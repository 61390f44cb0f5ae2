//! The `sse-gateway` binary: CLI, logging, config, signals, exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use sse_gateway::Config;

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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sse-gateway: {e:#}");
            ExitCode::FAILURE
        }
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
    config.validate()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = config.listen_addr().context("server.listen")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone()));
        sse_gateway::run(listener, config, stop)
            .await
            .context("gateway stopped with an error")
    })
}

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
