//! `sse-gateway export` and `import`: a log as JSON lines and back, for
//! backups, compaction (export, import into a new directory, swap) and moves
//! between storage backends: a sled data directory or a Redis log
//! ([`super::Store`]). The format and what an import keeps are documented in
//! [`sse_gateway::log::sled::offline`]; the Redis side is
//! [`sse_gateway::log::redis::offline`].
//!
//! An export to a file is written beside it (`FILE.partial`) and renamed when
//! complete, so a failed export never leaves a truncated file under the
//! name, and an older file under that name stays until the new one is whole.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sse_gateway::log::redis::offline as redis_offline;
use sse_gateway::log::redis::{RedisClients, RedisTarget};
use sse_gateway::log::sled::offline::{self, OfflineLog};

use super::{Bar, Store};

/// `export [--out FILE|-]`
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Where to write the export; `-` is standard output.
    #[arg(long, value_name = "FILE", default_value = "-")]
    out: PathBuf,
    /// With Redis and tenancy: export this org's log instead of the default one.
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,
}

/// `import [--in FILE|-]`
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The export to read; `-` is standard input.
    #[arg(long = "in", value_name = "FILE", default_value = "-")]
    input: PathBuf,
    /// With Redis and tenancy: import into this org's log instead of the default one.
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,
}

/// Writes the export of `store`'s log to `out` (`sled`: the directory,
/// already opened).
fn write_export(
    store: &Store,
    sled: Option<&OfflineLog>,
    out: &mut dyn Write,
    bar: &mut Bar,
) -> anyhow::Result<offline::ExportStats> {
    match (store, sled) {
        (_, Some(log)) => Ok(log.export(out, bar)?),
        (Store::Sled(dir), None) => Ok(OfflineLog::open(dir)?.export(out, bar)?),
        (
            Store::Redis {
                target,
                tag,
                command_timeout,
            },
            None,
        ) => super::runtime()?.block_on(async {
            let clients = RedisClients::connect(target.clone(), *command_timeout, 1).await?;
            Ok(redis_offline::export(&clients, tag, out, bar).await?)
        }),
    }
}

/// What to call `store` in messages.
fn describe(store: &Store) -> String {
    match store {
        Store::Sled(dir) => dir.display().to_string(),
        Store::Redis { target, tag, .. } => match target {
            RedisTarget::Single(url) => format!("the Redis log {{{tag}}} on {url}"),
            RedisTarget::Cluster(_) | RedisTarget::Sentinel { .. } => {
                format!("the Redis log {{{tag}}}")
            }
        },
    }
}

/// Exports the log of `store`.
pub fn export(args: ExportArgs, store: &Store) -> anyhow::Result<()> {
    // Opened first: no output is created when the directory is not a log.
    let sled = match store {
        Store::Sled(dir) => Some(OfflineLog::open(dir)?),
        Store::Redis { .. } => None,
    };
    let mut bar = Bar::new();
    let (stats, written_to) = if args.out.as_os_str() == "-" {
        let mut out = BufWriter::new(std::io::stdout().lock());
        (
            write_export(store, sled.as_ref(), &mut out, &mut bar)?,
            "standard output".to_owned(),
        )
    } else {
        let partial = partial_path(&args.out);
        let exported = (|| {
            let file = File::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            let mut out = BufWriter::new(file);
            let stats = write_export(store, sled.as_ref(), &mut out, &mut bar)?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
                .with_context(|| format!("cannot write {}", partial.display()))?;
            std::fs::rename(&partial, &args.out).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    partial.display(),
                    args.out.display()
                )
            })?;
            anyhow::Ok(stats)
        })();
        if exported.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        (exported?, args.out.display().to_string())
    };
    let range = match (stats.first, stats.last) {
        (Some(first), Some(last)) => {
            format!(" ({} … {})", stats.epoch.id(first), stats.epoch.id(last))
        }
        _ => String::new(),
    };
    eprintln!(
        "sse-gateway: exported {} events{range} of epoch {}, head {}, and {} idempotency keys, to {written_to}",
        stats.events,
        stats.epoch.as_str(),
        stats.epoch.id(stats.head),
        stats.keys,
    );
    Ok(())
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Reads `input` into `store`'s log, which must not exist yet.
fn read_import(
    store: &Store,
    input: &mut dyn BufRead,
    len: Option<u64>,
    bar: &mut Bar,
) -> anyhow::Result<offline::ImportStats> {
    match store {
        Store::Sled(dir) => Ok(offline::import(dir, input, len, bar)?),
        Store::Redis {
            target,
            tag,
            command_timeout,
        } => super::runtime()?.block_on(async {
            let clients = RedisClients::connect(target.clone(), *command_timeout, 1).await?;
            Ok(redis_offline::import(&clients, tag, input, len, bar).await?)
        }),
    }
}

/// Imports an export into `store`: a new or empty directory, or a Redis
/// log that does not exist yet.
pub fn import(args: ImportArgs, store: &Store) -> anyhow::Result<()> {
    let mut bar = Bar::new();
    let stats = if args.input.as_os_str() == "-" {
        if std::io::stdin().is_terminal() {
            bail!("reading the export from standard input, which is a terminal: pass --in FILE or pipe it in");
        }
        let mut input = BufReader::new(std::io::stdin().lock());
        read_import(store, &mut input, None, &mut bar)
    } else {
        let file = File::open(&args.input)
            .with_context(|| format!("cannot open {}", args.input.display()))?;
        let len = file.metadata().ok().map(|m| m.len());
        let mut input = BufReader::with_capacity(1 << 16, file);
        read_import(store, &mut input, len, &mut bar)
    };
    let stats = stats.with_context(|| {
        format!(
            "import into {} failed, nothing was written",
            describe(store)
        )
    })?;
    drop(bar);
    let watermarks = if stats.exact_watermarks {
        "retention watermarks restored from the export"
    } else {
        "no watermarks in the export: reconstructed conservatively"
    };
    let mut out = std::io::stderr().lock();
    writeln!(
        out,
        "sse-gateway: imported {} events in {} topics and {} idempotency keys into {}: epoch {}, head {}; new publishes continue at {} ({watermarks})",
        stats.events,
        stats.topics,
        stats.keys,
        describe(store),
        stats.epoch.as_str(),
        stats.epoch.id(stats.head),
        stats.epoch.id(stats.head + 1),
    )?;
    Ok(())
}
