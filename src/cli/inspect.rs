//! `sse-gateway inspect`: what a data directory holds, offline.
//!
//! Format version, epoch, head, events (oldest and newest id), index
//! entries, topics (the busiest first, `--all` for every one), bytes on disk.
//! Two full scans (sled keeps no counts); the gateway must be stopped.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use sse_gateway::log::sled::offline::OfflineLog;

use super::{human_bytes, Bar};

/// `inspect [--top N | --all] [--json]`
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// List this many topics, most events first.
    #[arg(long, value_name = "N", default_value_t = 10)]
    top: usize,
    /// List every topic.
    #[arg(long)]
    all: bool,
    /// Print one JSON object instead (every topic), for scripts.
    #[arg(long)]
    json: bool,
}

/// Prints the summary of the log in `dir`.
pub fn run(args: InspectArgs, dir: &Path) -> anyhow::Result<()> {
    let log = OfflineLog::open(dir)?;
    let summary = log.summary(&mut Bar::new())?;
    let epoch = &summary.epoch;
    let id = |seq: Option<u64>| seq.map(|s| epoch.id(s));
    let mut out = std::io::stdout().lock();
    if args.json {
        let topics: Vec<_> = summary
            .topics
            .iter()
            .map(|(topic, t)| {
                json!({
                    "topic": topic.as_str(),
                    "count": t.count,
                    "first_id": id(t.first),
                    "last_id": id(t.last),
                    "trimmed_through": t.trimmed_through,
                })
            })
            .collect();
        let value = json!({
            "data_dir": dir.display().to_string(),
            "format_version": summary.format_version,
            "epoch": epoch.as_str(),
            "head": summary.head,
            "head_id": epoch.id(summary.head),
            "events": summary.events,
            "oldest_id": id(summary.oldest),
            "newest_id": id(summary.newest),
            "index_entries": summary.index_entries,
            "topic_count": summary.topics.len(),
            "bytes_on_disk": summary.bytes_on_disk,
            "topics": topics,
        });
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let none = || "none".to_owned();
    writeln!(out, "data directory  {}", dir.display())?;
    writeln!(out, "format version  {}", summary.format_version)?;
    writeln!(out, "epoch           {}", epoch.as_str())?;
    writeln!(
        out,
        "head            {} (the next publish gets {})",
        epoch.id(summary.head),
        epoch.id(summary.head + 1)
    )?;
    writeln!(out, "events          {}", summary.events)?;
    writeln!(
        out,
        "oldest id       {}",
        id(summary.oldest).unwrap_or_else(none)
    )?;
    writeln!(
        out,
        "newest id       {}",
        id(summary.newest).unwrap_or_else(none)
    )?;
    writeln!(out, "index entries   {}", summary.index_entries)?;
    writeln!(out, "topics          {}", summary.topics.len())?;
    writeln!(
        out,
        "bytes on disk   {} ({} bytes)",
        human_bytes(summary.bytes_on_disk),
        summary.bytes_on_disk
    )?;
    if summary.topics.is_empty() {
        return Ok(());
    }
    let shown = if args.all {
        summary.topics.len()
    } else {
        args.top.min(summary.topics.len())
    };
    writeln!(out)?;
    if shown < summary.topics.len() {
        writeln!(
            out,
            "top {shown} of {} topics by events (--all for every topic):",
            summary.topics.len()
        )?;
    } else {
        writeln!(out, "topics by events:")?;
    }
    let id_width = epoch.as_str().len() + summary.head.to_string().len() + 1;
    writeln!(
        out,
        "  {:>10}  {:<w$}  {:<w$}  {:<w$}  topic",
        "events",
        "first id",
        "last id",
        "trimmed thru",
        w = id_width.max(12)
    )?;
    for (topic, t) in summary.topics.iter().take(shown) {
        let trimmed = match t.trimmed_through {
            0 => "-".to_owned(),
            seq => epoch.id(seq),
        };
        writeln!(
            out,
            "  {:>10}  {:<w$}  {:<w$}  {:<w$}  {topic}",
            t.count,
            id(t.first).unwrap_or_else(|| "-".into()),
            id(t.last).unwrap_or_else(|| "-".into()),
            trimmed,
            w = id_width.max(12)
        )?;
    }
    Ok(())
}
