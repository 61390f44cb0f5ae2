//! sled 0.34.7 alone on a power-cut mount: the minimal reproduction of what
//! torn writes do to it (issue 15), without the gateway.
//!
//! ```text
//! cargo run -p powercut --example sled_cuts -- [strict|journal] [torn|torn-by-offset] \
//!     [fsync-log-writes] CYCLES SEED
//! ```
//! A child process (this program, `work` subcommand) writes keys `0, 1, …`
//! (values of 100 B … 4 KiB derived from the key) in batches of 8 keys, and
//! every fourth one of 150 (`LARGE`), with the
//! gateway's rules — `apply_batch`, `Db::flush`, `fdatasync` of `db`, then
//! "acked" on stdout — while a second thread removes keys older than the
//! newest acked minus `WINDOW` (retention: makes sled clean and reuse
//! segments). The parent kills it (`kill -9`) at a random moment, cuts the
//! power, mounts what survived and starts the child again, which first
//! checks every acked key that was never eligible for removal. A start
//! that fails (an error or a panic in sled's recovery) counts as a failed
//! open, and the next cycle starts on an empty disk.
//!
//! Findings (README, "Power loss"): with `torn` (in order) nothing is lost;
//! with `torn-by-offset` sled's recovery sometimes panics (`index out of
//! bounds` in `SegmentAccountant::initial_segments`) or loses keys, because
//! it treats data written with `sync_file_range` as durable. With
//! `fsync-log-writes` the child first installs the gateway's fix (a seccomp
//! filter that makes `sync_file_range` fail with `ENOSYS`, so sled `fsync`s
//! each log buffer instead).
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use powercut::{Image, Mode, Torn};

/// Keys kept behind the newest acked one (older ones may be removed).
const WINDOW: u64 = 3000;
/// Keys per commit.
const BATCH: u64 = 8;
/// Keys in every fourth commit (~300 KiB, like a large event of the
/// gateway in 4 KiB pieces); `LARGE=0` for none. Large commits are what
/// make sled move to a new segment, and reuse freed ones, between syncs.
const LARGE: u64 = 150;

fn value(key: u64) -> Vec<u8> {
    let len = 100 + (key.wrapping_mul(2_654_435_761) % 3996) as usize;
    let mut state = key ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

fn open(dir: &std::path::Path) -> sled::Db {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(4 << 20)
        .flush_every_ms(None)
        .open()
        .unwrap_or_else(|e| {
            println!("open-failed {e}");
            std::process::exit(3)
        });
    for name in ["db", "conf"] {
        std::fs::File::open(dir.join(name))
            .and_then(|f| f.sync_all())
            .expect("sync");
    }
    for d in [dir, dir.parent().expect("parent")] {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .expect("sync dir");
    }
    db
}

/// The gateway's fix (`src/log/sled/durable.rs`): `sync_file_range` fails
/// with `ENOSYS` in this process, and sled falls back to `fsync`.
fn fsync_log_writes() {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let filter = SeccompFilter::new(
        std::collections::BTreeMap::from([(libc::SYS_sync_file_range, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::try_from(std::env::consts::ARCH).expect("arch"),
    )
    .expect("filter");
    let program: seccompiler::BpfProgram = filter.try_into().expect("compile");
    seccompiler::apply_filter_all_threads(&program).expect("install the filter");
}

/// `work DIR ACKED`: check, then write until killed.
fn work(dir: &std::path::Path, acked: Option<u64>) {
    if std::env::var("FSYNC_LOG_WRITES").is_ok_and(|v| v == "1") {
        fsync_log_writes();
    }
    let db = open(dir);
    let mut lost = 0u64;
    let mut detail = String::new();
    if let Some(acked) = acked {
        let (mut missing, mut different, mut errors) = (Vec::new(), 0, 0);
        for key in acked.saturating_sub(WINDOW - 1)..=acked {
            match db.get(key.to_be_bytes()) {
                Ok(Some(v)) if v.as_ref() == value(key).as_slice() => {}
                Ok(Some(_)) => different += 1,
                Ok(None) => missing.push(key),
                Err(e) => {
                    if errors == 0 {
                        detail.push_str(&format!(" first-error=({e})"));
                    }
                    errors += 1;
                }
            }
        }
        lost = missing.len() as u64 + different + errors;
        if lost > 0 {
            detail.push_str(&format!(
                " missing={} ({:?}..{:?}) different={different} errors={errors} len={}",
                missing.len(),
                missing.first(),
                missing.last(),
                db.len()
            ));
        }
    }
    let next = match db.iter().next_back() {
        Some(Ok((k, _))) => u64::from_be_bytes(k.as_ref().try_into().expect("key")) + 1,
        Some(Err(e)) => {
            println!("iter-error {e}");
            0
        }
        None => 0,
    };
    let next = next.max(acked.map_or(0, |a| a + 1));
    println!("checked lost={lost} next={next}{detail}");
    std::io::stdout().flush().expect("stdout");
    let db_file = std::fs::File::open(dir.join("db")).expect("db file");
    let floor = Arc::new(AtomicU64::new(0));
    {
        let (db, floor) = (db.clone(), Arc::clone(&floor));
        std::thread::spawn(move || {
            let mut removed = 0u64;
            loop {
                let upto = floor.load(Ordering::Acquire);
                let mut batch = sled::Batch::default();
                let mut n = 0;
                for item in db
                    .range(removed.to_be_bytes()..upto.to_be_bytes())
                    .keys()
                    .take(64)
                {
                    let Ok(k) = item else { break };
                    batch.remove(k);
                    n += 1;
                }
                if n == 0 {
                    removed = removed.max(upto.saturating_sub(1));
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let _ = db.apply_batch(batch);
            }
        });
    }
    let mut key = next;
    let large: u64 = std::env::var("LARGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LARGE);
    let mut commit = 0u64;
    loop {
        commit += 1;
        let n = if large > 0 && commit.is_multiple_of(4) {
            large
        } else {
            BATCH
        };
        let mut batch = sled::Batch::default();
        for k in key..key + n {
            batch.insert(&k.to_be_bytes(), value(k));
        }
        db.apply_batch(batch).expect("apply");
        db.flush().expect("flush");
        db_file.sync_data().expect("fdatasync");
        key += n;
        println!("acked {}", key - 1);
        floor.store((key - 1).saturating_sub(WINDOW), Ordering::Release);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("work") {
        let acked = args.get(2).and_then(|a| a.parse().ok());
        work(std::path::Path::new(&args[1]), acked);
        return;
    }
    let mode: Mode = args
        .first()
        .map_or("strict", String::as_str)
        .parse()
        .expect("mode");
    let by_offset = args.iter().any(|a| a == "torn-by-offset");
    let torn = by_offset || args.iter().any(|a| a == "torn");
    let fsync = args.iter().any(|a| a == "fsync-log-writes");
    let nums: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let cycles = nums.first().copied().unwrap_or(20);
    let seed = nums.get(1).copied().unwrap_or(1);
    let mountpoint = tempfile::tempdir().expect("tempdir");
    let dir = mountpoint.path().join("data");
    let mut image = Image::empty();
    let mut acked: Option<u64> = None;
    let (mut total_lost, mut failed, mut total_acked) = (0, 0, 0);
    let mut rng = seed;
    let mut next_rand = move || {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        rng >> 33
    };
    for cycle in 0..=cycles {
        let mount = image
            .mount(
                mode,
                torn.then(|| match by_offset {
                    true => Torn::ByOffset(seed.wrapping_add(cycle)),
                    false => Torn::InOrder(seed.wrapping_add(cycle)),
                }),
                mountpoint.path(),
            )
            .expect("mount");
        if !dir.exists() {
            std::fs::create_dir(&dir).expect("mkdir");
            for d in [&dir, &mountpoint.path().to_path_buf()] {
                std::fs::File::open(d)
                    .and_then(|f| f.sync_all())
                    .expect("sync");
            }
        }
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .arg("work")
            .arg(&dir)
            .env("FSYNC_LOG_WRITES", if fsync { "1" } else { "0" })
            .args(acked.map(|a| a.to_string()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stderr = child.stderr.take().expect("stderr");
        let panic = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            let mut lines = text.lines().skip_while(|l| !l.contains("panicked at"));
            lines
                .next()
                .map(|at| format!("{at} {}", lines.next().unwrap_or_default()))
        });
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let run_for = Duration::from_millis(200 + next_rand() % 1500);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut started = None;
        let mut before = acked;
        let mut report = String::new();
        let mut checked = false;
        loop {
            let deadline = started.map_or(Duration::from_secs(60), |s: Instant| {
                run_for.saturating_sub(s.elapsed())
            });
            match rx.recv_timeout(deadline) {
                Ok(line) if line.starts_with("acked ") => {
                    acked = line[6..].parse().ok();
                }
                Ok(line) if line.starts_with("checked") => {
                    report = line.clone();
                    checked = true;
                    if let Some(lost) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("lost="))
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        total_lost += lost;
                    }
                    started = Some(Instant::now());
                }
                Ok(line) => report = line.clone(),
                // Killed (after `run_for`), or dead: it panicked or failed
                // to open (a failed open: start again on an empty disk).
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        // What it printed before it died was acknowledged too.
        for line in rx.iter() {
            if let Some(n) = line.strip_prefix("acked ") {
                acked = n.parse().ok();
            }
        }
        if cycle == cycles {
            let _ = mount.unmount();
            println!("cycle {cycle}: {report}");
            break;
        }
        image = mount.power_cut().expect("cut");
        if !checked {
            failed += 1;
            acked = None;
            image = Image::empty();
            let panic = panic.join().ok().flatten().unwrap_or_default();
            report = format!("failed to open: {report}{panic}");
        } else {
            total_acked += acked.unwrap_or(0) - before.take().unwrap_or(0);
        }
        println!("cycle {cycle}: {report}; acked up to {acked:?}");
    }
    println!(
        "[{mode}{}{}] cycles {cycles}, acked {total_acked}, lost {total_lost}, failed opens {failed} \
         (seed {seed})",
        match (torn, by_offset) {
            (true, true) => "+torn-by-offset",
            (true, false) => "+torn",
            _ => "",
        },
        if fsync { ", fsync-log-writes" } else { "" }
    );
}
