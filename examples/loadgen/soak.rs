//! `--scenario soak`: an hour (or `--duration-s`) of mixed, steady load on a
//! running gateway, sampled every `--sample-s` seconds.
//!
//! - `--publishers` publishers over `--topics` topics (publisher `p` on topic
//!   `p % topics`), `--rate` events/s in total, paced; sizes mixed by a fixed
//!   pseudo-random draw per event: 95 % ~200 B, 4.5 % 8–64 KiB,
//!   0.5 % 128–256 KiB (all under the 1 MiB body limit).
//! - `--subscribers` long-lived streams: every 4th on two topics
//!   (`--events-url?topic=a&topic=b`), the rest on one.
//! - `--churners` streams that, every 2–8 s, drop their connection and resume
//!   with `Last-Event-ID` (half single-topic, half multi-topic).
//! - `--slow` streams with a 4 KiB receive buffer that read 4 KiB then sleep
//!   20 ms, and in every 90 s stop reading for 45 s (below the gateway's 60 s
//!   write stall), so they fall behind the live ring and catch up from the log.
//!
//! Every stream is open before the first publish, so each must receive every
//! acknowledged event of its topics' publishers exactly once and in order,
//! across reconnects (`follow.rs`). A `reset` (retention trimmed past a resume
//! id) is counted and re-baselines that stream. A stream the server ends is
//! reopened from its last id (counted as `drops`).
//!
//! Each sample: `sample t=… rss_kib=… fds=… …` (RSS and open fds of `--pid`,
//! bytes under `--data-dir`); after publishing stops, every stream must reach
//! the last acknowledged event within `--timeout-s` (what is still missing
//! counts as gaps); then one `sample phase=after` once the streams are closed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use parking_lot::Mutex;

use crate::client::{Pace, Publisher, ReadEnd, Stream, Target};
use crate::follow::Follow;
use crate::payload::{now_micros, Payload};
use crate::Args;

/// Set when the soak saw a gap, duplicate or unexpected event (exit 1).
pub static FAILED: AtomicBool = AtomicBool::new(false);

/// Counters shared by every task and read by the sampler.
#[derive(Default)]
struct Counters {
    published: AtomicU64,
    publish_bytes: AtomicU64,
    delivered: AtomicU64,
    gaps: AtomicU64,
    dups: AtomicU64,
    unexpected: AtomicU64,
    resets: AtomicU64,
    /// Planned reconnects (churners leaving and resuming).
    reconnects: AtomicU64,
    /// Streams the server ended (or broke) that were reopened.
    drops: AtomicU64,
    /// Failed publishes and failed stream opens.
    errors: AtomicU64,
    /// Streams open now.
    open: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().get_or_insert(what);
    }
}

/// Once publishing stopped: the acknowledged count per publisher.
type Final = OnceLock<Vec<u64>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Steady,
    Churn,
    Slow,
}

/// A small deterministic generator (xorshift64*): sizes and churn timing
/// repeat from run to run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// The data size of one event: mostly small, some large, a few very large.
fn event_size(rng: &mut Rng) -> usize {
    let roll = rng.range(0, 1000);
    let size = if roll < 950 {
        rng.range(150, 250)
    } else if roll < 995 {
        rng.range(8 << 10, 64 << 10)
    } else {
        rng.range(128 << 10, 256 << 10)
    };
    size as usize
}

/// Runs the soak; returns the summary fields.
pub async fn soak(args: &Args, base: &Target, run_topic: &str) -> Result<String> {
    let topics: Vec<String> = (0..args.topics.max(1))
        .map(|i| format!("{run_topic}-{i}"))
        .collect();
    let targets: Vec<Arc<Target>> = topics
        .iter()
        .map(|t| Target::new(args, t).map(Arc::new))
        .collect::<Result<_>>()?;
    let publishers = args.publishers.max(1);
    let topic_of = |p: usize| p % topics.len();
    let counters = Arc::new(Counters::default());
    let finals: Arc<Final> = Arc::new(OnceLock::new());
    let started = Instant::now();
    let publish_end = started + Duration::from_secs_f64(args.duration_s);
    let hard_end = publish_end + Duration::from_secs_f64(args.timeout_s);

    let first = sample(args, &counters, started, "start");
    println!("{}", first.line);

    // Subscribers first: all open before the first publish.
    let mut plans = Vec::new();
    for i in 0..args.subscribers {
        plans.push((Kind::Steady, i));
    }
    for i in 0..args.churners {
        plans.push((Kind::Churn, i));
    }
    for i in 0..args.slow {
        plans.push((Kind::Slow, i));
    }
    let mut readers = Vec::with_capacity(plans.len());
    let mut opened = Vec::with_capacity(plans.len());
    for (n, (kind, i)) in plans.into_iter().enumerate() {
        let a = (n * 7 + i) % topics.len();
        let multi = match kind {
            Kind::Steady => i % 4 == 3,
            Kind::Churn => i % 2 == 1,
            Kind::Slow => false,
        } && topics.len() > 1;
        let (target, mine) = if multi {
            let b = (a + 1) % topics.len();
            let url = format!(
                "{}?topic={}&topic={}",
                args.events_url, topics[a], topics[b]
            );
            (Arc::new(base.with_subscribe(&url)?), vec![a, b])
        } else {
            (Arc::clone(&targets[a]), vec![a])
        };
        let followed = (0..publishers)
            .map(|p| mine.contains(&topic_of(p)))
            .collect();
        let pace = (kind == Kind::Slow).then_some(Pace {
            chunk: 4096,
            pause: Duration::from_millis(20),
        });
        // Open now (so it precedes the first publish); the task takes it over.
        let stream = Stream::open_with(&target, None, pace).await;
        if let Err(e) = &stream {
            counters.error(format!("open: {e:#}"));
        }
        opened.push(stream.is_ok());
        let counters = Arc::clone(&counters);
        let finals = Arc::clone(&finals);
        let from_start = args.from_start_id.clone();
        readers.push(tokio::spawn(subscriber(
            kind,
            n as u64,
            target,
            stream.ok(),
            pace,
            Follow::new(followed),
            counters,
            finals,
            started,
            hard_end,
            from_start,
        )));
    }
    let opened = opened.iter().filter(|&&o| o).count();
    // Let the gateway register every subscriber (headers may precede it).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let per_publisher = args.rate / publishers as f64;
    let mut pub_tasks = Vec::new();
    for p in 0..publishers {
        let target = Arc::clone(&targets[topic_of(p)]);
        let counters = Arc::clone(&counters);
        pub_tasks.push(tokio::spawn(publish_steady(
            p,
            target,
            per_publisher,
            publish_end,
            counters,
        )));
    }

    // Sampler: one line every sample_s until every subscriber is done (aborted then).
    let sampler = {
        let counters = Arc::clone(&counters);
        let args = args.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs_f64(args.sample_s.max(1.0));
            let mut at = started + every;
            loop {
                tokio::time::sleep_until(at.into()).await;
                println!("{}", sample(&args, &counters, started, "load").line);
                at += every;
            }
        })
    };

    let mut acked = Vec::with_capacity(publishers);
    for task in pub_tasks {
        acked.push(task.await?);
    }
    let _ = finals.set(acked.clone());
    let published: u64 = acked.iter().sum();
    let drain_started = Instant::now();
    let mut missing_at_end = 0;
    let mut not_caught_up = 0;
    for reader in readers {
        let follow = reader.await?;
        let missing = follow.missing(&acked);
        if missing > 0 {
            not_caught_up += 1;
            missing_at_end += missing;
        }
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    counters.gaps.fetch_add(missing_at_end, Ordering::Relaxed);
    let end = sample(args, &counters, started, "end");
    sampler.abort();
    println!("{}", end.line);
    // Every stream is closed now (each task dropped its own); let the server see it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = sample(args, &counters, started, "after");
    println!("{}", after.line);

    let c = &counters;
    let gaps = c.gaps.load(Ordering::Relaxed);
    let dups = c.dups.load(Ordering::Relaxed);
    let unexpected = c.unexpected.load(Ordering::Relaxed);
    if gaps + dups + unexpected > 0 {
        FAILED.store(true, Ordering::Relaxed);
    }
    if let Some(e) = c.first_error.lock().as_ref() {
        eprintln!("loadgen: first error: {e}");
    }
    Ok(format!(
        "duration_s={} rate={} topics={} publishers={} subscribers={} churners={} slow={} opened={} published={} publish_mib={:.1} delivered={} gaps={} dups={} unexpected={} resets={} reconnects={} drops={} errors={} missing_at_end={} not_caught_up={} drain_s={:.1} rss_start_kib={} rss_end_kib={} rss_after_kib={} fds_start={} fds_end={} fds_after={}",
        args.duration_s,
        args.rate,
        topics.len(),
        publishers,
        args.subscribers,
        args.churners,
        args.slow,
        opened,
        published,
        c.publish_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        c.delivered.load(Ordering::Relaxed),
        gaps,
        dups,
        unexpected,
        c.resets.load(Ordering::Relaxed),
        c.reconnects.load(Ordering::Relaxed),
        c.drops.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
        missing_at_end,
        not_caught_up,
        drain_secs,
        opt(first.rss_kib),
        opt(end.rss_kib),
        opt(after.rss_kib),
        opt(first.fds),
        opt(end.fds),
        opt(after.fds),
    ))
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "na".into(), |v| v.to_string())
}

/// Publishes on `target` at `rate` events/s until `end`; returns how many
/// were acknowledged (its sequences are `0..that`).
async fn publish_steady(
    p: usize,
    target: Arc<Target>,
    rate: f64,
    end: Instant,
    counters: Arc<Counters>,
) -> u64 {
    let mut publisher = Publisher::new(Arc::clone(&target));
    let mut rng = Rng::new(p as u64 + 1);
    let start = Instant::now();
    let mut seq = 0u64;
    let mut slot = 0u64;
    loop {
        let at = start + Duration::from_secs_f64(slot as f64 / rate.max(0.001));
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        slot += 1;
        let payload = Payload {
            publisher: p as u32,
            seq,
            sent_us: now_micros(),
        };
        let body = target.body(&payload, event_size(&mut rng));
        match publisher.post(&body).await {
            Ok((status, _)) if (200..300).contains(&status) => {
                seq += 1;
                counters.published.fetch_add(1, Ordering::Relaxed);
                counters
                    .publish_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
            }
            Ok((status, answer)) => counters.error(format!(
                "publish status {status}: {}",
                String::from_utf8_lossy(&answer)
            )),
            Err(e) => {
                counters.error(format!("publish: {e:#}"));
                publisher = Publisher::new(Arc::clone(&target));
            }
        }
    }
    seq
}

/// One subscriber through all its connections; returns what it saw.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    kind: Kind,
    id: u64,
    target: Arc<Target>,
    mut stream: Option<Stream>,
    pace: Option<Pace>,
    mut follow: Follow,
    counters: Arc<Counters>,
    finals: Arc<Final>,
    started: Instant,
    hard_end: Instant,
    from_start: String,
) -> Follow {
    let mut rng = Rng::new(0x5eed + id);
    let mut last_id: Option<String> = None;
    // Slow readers: stall 45 s in every 90 s, phase spread by id.
    let stall_offset = Duration::from_secs(id % 90);
    let done = |follow: &Follow| finals.get().is_some_and(|acked| follow.caught_up(acked));
    if stream.is_some() {
        counters.open.fetch_add(1, Ordering::Relaxed);
    }
    'connections: loop {
        if done(&follow) || Instant::now() >= hard_end {
            break;
        }
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                let resume = last_id.as_deref().unwrap_or(from_start.as_str());
                match Stream::open_with(&target, Some(resume), pace).await {
                    Ok(s) => {
                        counters.open.fetch_add(1, Ordering::Relaxed);
                        s
                    }
                    Err(e) => {
                        counters.error(format!("open: {e:#}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
        };
        let leave_at = match kind {
            Kind::Churn => Instant::now() + Duration::from_millis(rng.range(2000, 8000)),
            _ => hard_end,
        };
        let end = loop {
            let now = Instant::now();
            if done(&follow) || now >= hard_end {
                break None;
            }
            if now >= leave_at {
                break Some(true);
            }
            if kind == Kind::Slow && finals.get().is_none() {
                let phase = (now - started + stall_offset).as_secs() % 90;
                if phase >= 45 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let tick = (now + Duration::from_secs(1)).min(leave_at).min(hard_end);
            let acked = finals.get();
            let result = s
                .read_for(tick, |event| {
                    if !event.id.is_empty() {
                        last_id = Some(event.id.to_string());
                    }
                    if event.event == "reset" {
                        follow.reset();
                        counters.resets.fetch_add(1, Ordering::Relaxed);
                        return true;
                    }
                    let Some(payload) = Payload::decode(&event.data) else {
                        // Not ours: comments are not events; anything else is unexpected.
                        follow.unexpected += 1;
                        counters.unexpected.fetch_add(1, Ordering::Relaxed);
                        return true;
                    };
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                    match follow.record(payload.publisher, payload.seq) {
                        crate::follow::Seen::InOrder => {}
                        crate::follow::Seen::Gap(n) => {
                            counters.gaps.fetch_add(n, Ordering::Relaxed);
                        }
                        crate::follow::Seen::Duplicate => {
                            counters.dups.fetch_add(1, Ordering::Relaxed);
                        }
                        crate::follow::Seen::Unexpected => {
                            counters.unexpected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    !acked.is_some_and(|a| follow.caught_up(a))
                })
                .await;
            match result {
                Ok(ReadEnd::Stopped) => break None,
                Ok(ReadEnd::TimedOut) => continue,
                Ok(ReadEnd::Ended) => break Some(false),
                Err(_) => break Some(false),
            }
        };
        drop(s);
        counters.open.fetch_sub(1, Ordering::Relaxed);
        match end {
            None => break 'connections,
            Some(true) => {
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.range(0, 1000))).await;
            }
            Some(false) => {
                counters.drops.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    if let Some(s) = stream.take() {
        drop(s);
        counters.open.fetch_sub(1, Ordering::Relaxed);
    }
    follow
}

/// One sample's figures and its printed line.
struct Sample {
    line: String,
    rss_kib: Option<u64>,
    fds: Option<u64>,
}

fn sample(args: &Args, c: &Counters, started: Instant, phase: &str) -> Sample {
    let rss_kib = args.pid.and_then(|pid| crate::rss_kib(&[pid]).ok());
    let fds = args.pid.and_then(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count() as u64)
    });
    let data_kib = args.data_dir.as_deref().map(|d| dir_bytes(d) / 1024);
    let line = format!(
        "sample phase={phase} t={:.0} rss_kib={} fds={} data_kib={} open={} published={} delivered={} gaps={} dups={} unexpected={} resets={} reconnects={} drops={} errors={} loadavg={}",
        started.elapsed().as_secs_f64(),
        opt(rss_kib),
        opt(fds),
        opt(data_kib),
        c.open.load(Ordering::Relaxed),
        c.published.load(Ordering::Relaxed),
        c.delivered.load(Ordering::Relaxed),
        c.gaps.load(Ordering::Relaxed),
        c.dups.load(Ordering::Relaxed),
        c.unexpected.load(Ordering::Relaxed),
        c.resets.load(Ordering::Relaxed),
        c.reconnects.load(Ordering::Relaxed),
        c.drops.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
        crate::loadavg(),
    );
    Sample { line, rss_kib, fds }
}

/// Bytes of the regular files under `dir` (recursively; errors count as 0).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
