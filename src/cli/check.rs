//! `sse-gateway check`: verifies a data directory without changing it.
//!
//! Read only: no key is written, neither the log writer nor the retention
//! trimmer starts ([`sse_gateway::log::sled::offline::check`] says what is
//! verified). Exit status: 0 when clean, 1 when problems were found (each is
//! printed), 2 when the check could not run (`main` maps errors to 2).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use sse_gateway::log::sled::offline;

use super::Bar;

/// `check [--max-problems N]`
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print at most this many problems (all are counted).
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_problems: usize,
}

/// Checks the log in `dir`; prints a summary and every problem found.
pub fn run(args: CheckArgs, dir: &Path) -> anyhow::Result<ExitCode> {
    let report = offline::check(dir, &mut Bar::new())?;
    let mut out = std::io::stdout().lock();
    let epoch = report.epoch.as_ref().map_or("?", |e| e.as_str());
    let format = report
        .format_version
        .map_or_else(|| "?".to_owned(), |v| v.to_string());
    let head = report
        .head
        .map_or_else(|| "?".to_owned(), |h| format!("{epoch}-{h}"));
    writeln!(
        out,
        "checked {}: format version {format}, epoch {epoch}, head {head}",
        dir.display()
    )?;
    if report.complete {
        writeln!(
            out,
            "  {} events, {} index entries, {} topics, {} trim watermarks",
            report.events, report.index_entries, report.topics, report.watermarks
        )?;
        if report.leftover_pieces > 0 {
            writeln!(
                out,
                "  {} leftover record pieces from a write cut short (never acknowledged; not damage)",
                report.leftover_pieces
            )?;
        }
    } else {
        writeln!(out, "  stopped early: this build cannot read the rest")?;
    }
    for problem in report.problems.iter().take(args.max_problems) {
        writeln!(out, "problem: {}: {}", problem.key, problem.what)?;
    }
    let shown = report.problems.len().min(args.max_problems) as u64;
    if report.problem_count > shown {
        writeln!(
            out,
            "… and {} more problems (--max-problems to list more)",
            report.problem_count - shown
        )?;
    }
    if report.is_clean() {
        writeln!(out, "no problems found")?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(
            out,
            "{} problem{} found",
            report.problem_count,
            if report.problem_count == 1 { "" } else { "s" }
        )?;
        Ok(ExitCode::from(1))
    }
}
