//! `sse-gateway repair`: makes a data directory the gateway refused to serve
//! (acknowledged events missing) servable again, after saving a copy of it
//! ([`sse_gateway::log::sled::offline::repair`] says exactly what it does).

use std::io::Write;
use std::path::Path;

use sse_gateway::log::sled::offline;

/// `repair` (no options: the directory comes from `--data-dir` or the config).
#[derive(clap::Args, Debug)]
pub struct RepairArgs {}

/// Repairs `dir` and says what was saved, kept and lost.
pub fn run(_args: RepairArgs, dir: &Path) -> anyhow::Result<()> {
    let report = offline::repair(dir)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "saved a copy of {} as it was in {}",
        dir.display(),
        report.saved_to.display()
    )?;
    if report.restored_bytes > 0 {
        writeln!(
            out,
            "put back into it the {} bytes of db that sled's recovery had rewritten at the refused start (kept before it ran); the copy holds db as it was before any open",
            report.restored_bytes
        )?;
    }
    match (&report.epoch, &report.acknowledged) {
        (None, acked) => writeln!(
            out,
            "sled recovered no event; the next start begins a new log (clients get a reset){}",
            acked.as_ref().map_or(String::new(), |a| format!(
                "; acknowledged through {a}: all lost"
            ))
        )?,
        (Some(epoch), Some(acked)) if report.lost > 0 => writeln!(
            out,
            "the log ends at {}; acknowledged through {acked}: {} acknowledged events lost; new events get ids after {acked}",
            epoch.id(report.found),
            report.lost
        )?,
        (Some(epoch), _) => writeln!(
            out,
            "the log ends at {}; nothing acknowledged is missing",
            epoch.id(report.found)
        )?,
    }
    Ok(())
}
