//! A load generator for any SSE server: ours, Nchan, or another, over loopback.
//!
//! Subscribers and publishers speak raw HTTP/1.1 over tokio TCP (`client.rs`,
//! no HTTP client library), so 10,000 streams cost a socket and a small task
//! each. `https://` URLs go over TLS (`--ca-file`); with `--sub-http2` the
//! streams are HTTP/2 streams, `--h2-streams-per-connection` per connection.
//! Client sockets are bound to `127.0.0.2 … 127.0.0.<1+source_ips>` before
//! connecting, so large connection counts do not run out of ephemeral ports
//! of one source address. The soft open-files limit is raised to the hard one.
//!
//! Every event's data is `{"p":<publisher>,"seq":<n>,"ts":<µs>,"pad":"x…"}`
//! of `--payload-bytes` (`payload.rs`); every stream is parsed by the
//! library's WHATWG decoder (`sse_gateway::sse::decode`) and checked for gaps,
//! duplicates and per-publisher order (`tracker.rs`); latency is receive time − `ts`
//! (same machine, same clock) into `hdrhistogram`s. Each run prints one line
//! starting with `summary` (key=value pairs; `bench/compare.sh` parses it).
//!
//! Scenarios (`--scenario`):
//! - `publish`: `--publishers` keep-alive publishers send `--events` events.
//! - `fanout`: `--subscribers` streams on one topic; `--publishers` publish
//!   `--events` as fast as acks allow; deliveries/s and latency.
//! - `latency`: like fanout, but published at `--rate` events/s.
//! - `idle`: `--subscribers` idle streams; with `--rss-pids`, server memory
//!   per stream (RSS after − before, ÷ streams).
//! - `replay`: `--events` published, then one client reads them all from the
//!   start (`--from-start-id`, or nothing when the server starts at the oldest).
//! - `storm`: one marker event, then `--behind` events, then `--subscribers`
//!   clients resume at once from the marker's id; time until all caught up.
//! - `batch` (ours only): from ONE connection, `--events` single publishes
//!   to `--pub-url`, then the same count in `POST /publish/batch` requests of
//!   `--batch-size` events (`--batch-url`), then again with an
//!   `idempotency_key` per item; events/s of each and the ratio.
//! - `soak`: `--duration-s` of steady mixed load (publishers at `--rate`,
//!   long-lived, churning and slow subscribers over `--topics` topics),
//!   sampling the server's RSS and fds (`--pid`) every `--sample-s`; exits 1 on
//!   any gap or duplicate (`soak.rs`, `follow.rs`).
//!
//! Servers differ only in URLs and bodies:
//! - ours: `--pub-url 'http://127.0.0.1:8080/topics/{topic}' --pub-body '{"data":{payload}}'
//!   --sub-url 'http://127.0.0.1:8080/topics/{topic}' --from-start-id 0`
//! - Nchan: `--pub-url 'http://127.0.0.1:8081/pub?id={topic}' --sub-url
//!   'http://127.0.0.1:8081/sub/{topic}'` (body = payload; ids `<time>:<tag>`
//!   echoed back verbatim as `Last-Event-ID`, or `--resume query`).

mod chunked;
mod client;
mod follow;
mod payload;
mod soak;
mod tracker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use client::{clone_target, Publisher, Stream, Target};
use payload::{now_micros, Payload};
use tracker::SeqTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Publish,
    Fanout,
    Latency,
    Idle,
    Replay,
    Storm,
    Soak,
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ResumeVia {
    /// `Last-Event-ID: <id>` request header.
    Header,
    /// `?<resume-query-name>=<id>` appended to the subscribe URL.
    Query,
}

/// Drives an SSE server over loopback and prints one `summary` line.
#[derive(Debug, Clone, Parser)]
#[command(about = "Load generator for SSE servers (ours, Nchan, …)")]
struct Args {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Name of the server in the summary line.
    #[arg(long, default_value = "server")]
    label: String,
    /// Publish URL; `{topic}` is replaced by the run's topic.
    #[arg(long, default_value = "http://127.0.0.1:8080/topics/{topic}")]
    pub_url: String,
    /// Publish body; `{payload}` is replaced by the event's JSON data.
    #[arg(long, default_value = r#"{"data":{payload}}"#)]
    pub_body: String,
    /// Publish `Content-Type`.
    #[arg(long, default_value = "application/json")]
    pub_content_type: String,
    /// Subscribe URL; `{topic}` is replaced by the run's topic.
    #[arg(long, default_value = "http://127.0.0.1:8080/topics/{topic}")]
    sub_url: String,
    /// How a resume id is sent.
    #[arg(long, value_enum, default_value_t = ResumeVia::Header)]
    resume: ResumeVia,
    /// Query parameter name for `--resume query`.
    #[arg(long, default_value = "last_event_id")]
    resume_query_name: String,
    /// Resume id meaning "all history" for `replay` (ours: `0`); empty sends
    /// none (Nchan with `nchan_subscriber_first_message oldest`).
    #[arg(long, default_value = "")]
    from_start_id: String,
    /// Topic prefix; a per-run suffix keeps runs apart.
    #[arg(long, default_value = "bench")]
    topic: String,
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 32)]
    publishers: usize,
    /// Events to publish (publish, fanout, replay; latency: computed from rate × duration).
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,
    /// Events per second for `latency`.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of publishing for `latency` and `soak`.
    #[arg(long, default_value_t = 5.0)]
    duration_s: f64,
    /// `soak`: topics (publisher `p` publishes on topic `p % topics`).
    #[arg(long, default_value_t = 6)]
    topics: usize,
    /// `soak`: subscribers that leave and resume with `Last-Event-ID` every 2–8 s.
    #[arg(long, default_value_t = 40)]
    churners: usize,
    /// `soak`: subscribers that read slowly (small buffer, pauses, 45 s stalls).
    #[arg(long, default_value_t = 4)]
    slow: usize,
    /// `soak`: seconds between samples.
    #[arg(long, default_value_t = 30.0)]
    sample_s: f64,
    /// `soak`: the server's process id, whose RSS and open fds are sampled.
    #[arg(long)]
    pid: Option<u32>,
    /// `soak`: the server's data directory, whose size is sampled.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// `soak`: the multi-topic stream URL (`?topic=a&topic=b` is appended).
    #[arg(long, default_value = "http://127.0.0.1:8080/events")]
    events_url: String,
    /// Events each storm client is behind.
    #[arg(long, default_value_t = 1_000)]
    behind: u64,
    /// Client source addresses 127.0.0.2 … 127.0.0.(1+N).
    #[arg(long, default_value_t = 200)]
    source_ips: u8,
    /// Server process ids whose RSS `idle` measures (comma-separated).
    #[arg(long, value_delimiter = ',')]
    rss_pids: Vec<u32>,
    /// Seconds `idle` holds the streams open after measuring.
    #[arg(long, default_value_t = 1.0)]
    hold_s: f64,
    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// `batch`: events per `POST /publish/batch` request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// `batch`: the batch route.
    #[arg(long, default_value = "http://127.0.0.1:8080/publish/batch")]
    batch_url: String,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// PEM CA certificate(s) to trust for `https://` URLs (e.g. the
    /// gateway's `<data-dir>/dev-tls/cert.pem`).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Subscribe over HTTP/2 (`https://` `--sub-url`): streams multiplexed,
    /// `--h2-streams-per-connection` per connection. Publishers stay HTTP/1.1.
    #[arg(long)]
    sub_http2: bool,
    /// Streams per HTTP/2 connection (at most the server's
    /// `http2.max_concurrent_streams`).
    #[arg(long, default_value_t = 100)]
    h2_streams_per_connection: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let summary = rt.block_on(run(Arc::new(args.clone())))?;
    println!(
        "summary scenario={:?} label={} {} loadavg={}",
        args.scenario,
        args.label,
        summary,
        loadavg()
    );
    // Do not wait for thousands of sockets to be torn down one by one.
    rt.shutdown_timeout(Duration::from_millis(100));
    if soak::FAILED.load(Ordering::Relaxed) {
        eprintln!("loadgen: soak saw gaps, duplicates or unexpected events");
        std::process::exit(1);
    }
    Ok(())
}

fn raise_nofile() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

async fn run(args: Arc<Args>) -> Result<String> {
    let topic = format!(
        "{}-{:?}-{}",
        args.topic,
        args.scenario,
        now_micros() % 1_000_000_000
    )
    .to_lowercase();
    let target = Target::new(&args, &topic)?;
    match args.scenario {
        Scenario::Publish => publish(&args, &target).await,
        Scenario::Fanout => live(&args, &target, None).await,
        Scenario::Latency => live(&args, &target, Some(args.rate)).await,
        Scenario::Idle => idle(&args, &target).await,
        Scenario::Replay => replay(&args, &target).await,
        Scenario::Storm => storm(&args, &target).await,
        Scenario::Soak => soak::soak(&args, &target, &topic).await,
        Scenario::Batch => batch(&args, &target, &topic).await,
    }
}

/// Singles vs batches from one connection, one after the other, same run.
async fn batch(args: &Args, target: &Target, topic: &str) -> Result<String> {
    let events = args.events;
    let size = args.payload_bytes;
    let batch_size = args.batch_size.max(1) as u64;
    let payload = |seq: u64| Payload {
        publisher: 0,
        seq,
        sent_us: now_micros(),
    };
    let check = |(status, body): (u16, Vec<u8>)| -> Result<()> {
        if (200..300).contains(&status) {
            Ok(())
        } else {
            bail!("status {status}: {}", String::from_utf8_lossy(&body))
        }
    };
    let singles_target = Arc::new(clone_target(target));
    let mut publisher = Publisher::new(Arc::clone(&singles_target));
    let started = Instant::now();
    for seq in 0..events {
        check(
            publisher
                .post(&singles_target.body(&payload(seq), size))
                .await?,
        )?;
    }
    let singles = events as f64 / started.elapsed().as_secs_f64();

    let batch_target = Arc::new(target.with_publish(&args.batch_url)?);
    let mut rates = Vec::new();
    for keyed in [false, true] {
        let mut publisher = Publisher::new(Arc::clone(&batch_target));
        let started = Instant::now();
        let mut seq = 0;
        while seq < events {
            let n = batch_size.min(events - seq);
            let items: Vec<String> = (seq..seq + n)
                .map(|s| {
                    let key = if keyed {
                        format!(r#","idempotency_key":"{topic}-{s}""#)
                    } else {
                        String::new()
                    };
                    format!(
                        r#"{{"topics":["{topic}"],"data":{}{key}}}"#,
                        payload(events + s).encode(size)
                    )
                })
                .collect();
            let body = format!(r#"{{"events":[{}]}}"#, items.join(","));
            check(publisher.post(&body).await?)?;
            seq += n;
        }
        rates.push(events as f64 / started.elapsed().as_secs_f64());
    }
    Ok(format!(
        "connections=1 events={events} payload_bytes={size} batch_size={batch_size} \
         single_events_per_s={singles:.0} batch_events_per_s={:.0} keyed_batch_events_per_s={:.0} \
         batch_over_single={:.1}",
        rates[0],
        rates[1],
        rates[0] / singles
    ))
}

/// What one stream saw.
#[derive(Default)]
struct StreamReport {
    tracker: SeqTracker,
    latency: Option<Histogram<u64>>,
    resets: u64,
    foreign: u64,
    finished_at: Option<Instant>,
    error: Option<String>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// Reads `stream` until `want` distinct events arrived (or timeout),
/// tracking sequences and latency.
async fn consume(mut stream: Stream, want: u64, deadline: Instant) -> StreamReport {
    let mut report = StreamReport {
        latency: Some(histogram()),
        ..Default::default()
    };
    if want == 0 {
        report.finished_at = Some(Instant::now());
        return report;
    }
    let result = stream
        .read_until(deadline, |event| {
            if event.event == "reset" {
                report.resets += 1;
                return true;
            }
            match Payload::decode(&event.data) {
                Some(p) => {
                    let now = now_micros();
                    report.tracker.record(p.publisher, p.seq);
                    if let Some(h) = report.latency.as_mut() {
                        let _ = h.record(now.saturating_sub(p.sent_us).max(1));
                    }
                }
                None => report.foreign += 1,
            }
            report.tracker.distinct() < want
        })
        .await;
    match result {
        Ok(true) => report.finished_at = Some(Instant::now()),
        Ok(false) => report.error = Some("ended or timed out before all events".into()),
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    report
}

/// Sums what many streams saw against the expected ranges.
#[derive(Default)]
struct Totals {
    streams: usize,
    caught_up: usize,
    delivered: u64,
    missing: u64,
    duplicates: u64,
    out_of_order: u64,
    unexpected: u64,
    resets: u64,
    foreign: u64,
    errors: usize,
    latency: Option<Histogram<u64>>,
    last_finish: Option<Instant>,
    first_error: Option<String>,
}

impl Totals {
    fn add(&mut self, report: StreamReport, ranges: &[std::ops::Range<u64>]) {
        self.streams += 1;
        self.delivered += report.tracker.received;
        self.missing += report.tracker.missing(ranges);
        self.unexpected += report.tracker.unexpected(ranges);
        self.duplicates += report.tracker.duplicates;
        self.out_of_order += report.tracker.out_of_order;
        self.resets += report.resets;
        self.foreign += report.foreign;
        if let Some(h) = report.latency {
            match self.latency.as_mut() {
                Some(total) => total.add(&h).expect("same bounds"),
                None => self.latency = Some(h),
            }
        }
        if let Some(at) = report.finished_at {
            self.caught_up += 1;
            self.last_finish = Some(self.last_finish.map_or(at, |l| l.max(at)));
        }
        if let Some(e) = report.error {
            self.errors += 1;
            self.first_error.get_or_insert(e);
        }
    }

    fn checks(&self) -> String {
        format!(
            "streams={} caught_up={} delivered={} gaps={} dups={} out_of_order={} unexpected={} resets={} foreign={} stream_errors={}{}",
            self.streams,
            self.caught_up,
            self.delivered,
            self.missing,
            self.duplicates,
            self.out_of_order,
            self.unexpected,
            self.resets,
            self.foreign,
            self.errors,
            self.first_error
                .as_ref()
                .map(|e| format!(" first_error={:?}", e))
                .unwrap_or_default()
        )
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// `<prefix>p50_ms=… <prefix>p99_ms=… <prefix>max_ms=…`
fn percentiles(prefix: &str, h: &Histogram<u64>) -> String {
    format!(
        "{prefix}p50_ms={} {prefix}p99_ms={} {prefix}max_ms={}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// Publishes `per_publisher[p]` events from each publisher `p` (sequences
/// `first_seq..`), paced at `rate` events/s in total when given. Returns
/// the acknowledged count, errors, ack latency, and the first error.
async fn publish_all(
    args: &Args,
    target: &Arc<Target>,
    publishers: usize,
    total: u64,
    rate: Option<f64>,
) -> Result<(Vec<std::ops::Range<u64>>, u64, Histogram<u64>)> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let target = Arc::clone(target);
        let next = Arc::clone(&next);
        let errors = Arc::clone(&errors);
        let first_error = Arc::clone(&first_error);
        let size = args.payload_bytes;
        tasks.push(tokio::spawn(async move {
            let mut publisher = Publisher::new(Arc::clone(&target));
            let mut acks = histogram();
            let mut seq = 0u64;
            loop {
                let slot = next.fetch_add(1, Ordering::Relaxed);
                if slot >= total {
                    break;
                }
                if let Some(rate) = rate {
                    let at = start + Duration::from_secs_f64(slot as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let payload = Payload {
                    publisher: p as u32,
                    seq,
                    sent_us: now_micros(),
                };
                let sent = Instant::now();
                match publisher.post(&target.body(&payload, size)).await {
                    Ok((status, _)) if (200..300).contains(&status) => {
                        let _ = acks.record(sent.elapsed().as_micros().max(1) as u64);
                        seq += 1;
                    }
                    Ok((status, body)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().get_or_insert_with(|| {
                            format!("status {status}: {}", String::from_utf8_lossy(&body))
                        });
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().get_or_insert_with(|| format!("{e:#}"));
                        publisher = Publisher::new(Arc::clone(&target));
                    }
                }
            }
            (seq, acks)
        }));
    }
    let mut ranges = Vec::new();
    let mut acks = histogram();
    for task in tasks {
        let (sent, h) = task.await?;
        ranges.push(0..sent);
        acks.add(&h).expect("same bounds");
    }
    let errors = errors.load(Ordering::Relaxed);
    if let Some(e) = first_error.lock().as_ref() {
        eprintln!("loadgen: {errors} publish errors; first: {e}");
    }
    Ok((ranges, errors, acks))
}

async fn publish(args: &Args, target: &Target) -> Result<String> {
    let target = Arc::new(clone_target(target));
    let started = Instant::now();
    let (ranges, errors, acks) =
        publish_all(args, &target, args.publishers, args.events, None).await?;
    let secs = started.elapsed().as_secs_f64();
    let acked: u64 = ranges.iter().map(|r| r.end).sum();
    Ok(format!(
        "publishers={} payload_bytes={} acked={} errors={} secs={:.2} events_per_s={:.0} {}",
        args.publishers,
        args.payload_bytes,
        acked,
        errors,
        secs,
        acked as f64 / secs,
        percentiles("ack_", &acks)
    ))
}

/// Opens `n` streams, at most `parallel` connecting at once.
async fn open_many(target: &Arc<Target>, n: usize, resume: Option<String>) -> Result<Vec<Stream>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(512));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let target = Arc::clone(target);
        let gate = Arc::clone(&gate);
        let resume = resume.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            Stream::open(&target, resume.as_deref()).await
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for task in tasks {
        streams.push(task.await??);
    }
    Ok(streams)
}

/// fanout (rate `None`) and latency (rate `Some`).
async fn live(args: &Args, target: &Target, rate: Option<f64>) -> Result<String> {
    let target = Arc::new(clone_target(target));
    let total = match rate {
        Some(rate) => (rate * args.duration_s).round().max(1.0) as u64,
        None => args.events,
    };
    let publishers = match rate {
        // Enough connections that acks never hold back the schedule.
        Some(rate) => ((rate / 100.0).ceil() as usize).clamp(1, args.publishers),
        None => args.publishers,
    };
    let streams = open_many(&target, args.subscribers, None).await?;
    let transport = match (args.sub_url.starts_with("https://"), args.sub_http2) {
        (true, true) => format!("transport=h2 h2_connections={}", target.h2_connections()),
        (true, false) => "transport=tls-http1".to_owned(),
        (false, _) => "transport=http1".to_owned(),
    };
    // Let servers finish registering the subscribers (headers may precede it).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout_s);
    let readers: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(consume(s, total, deadline)))
        .collect();
    let started = Instant::now();
    let (ranges, errors, acks) = publish_all(args, &target, publishers, total, rate).await?;
    let acked: u64 = ranges.iter().map(|r| r.end).sum();
    let mut totals = Totals::default();
    for reader in readers {
        totals.add(reader.await?, &ranges);
    }
    let secs = totals.last_finish.map_or_else(
        || started.elapsed().as_secs_f64(),
        |at| (at - started).as_secs_f64(),
    );
    let latency = totals.latency.take().unwrap_or_else(histogram);
    Ok(format!(
        "{transport} subscribers={} publishers={} rate={} payload_bytes={} acked={} publish_errors={} secs={:.2} deliveries_per_s={:.0} events_per_s={:.1} {} {} {}",
        args.subscribers,
        publishers,
        rate.map_or("max".to_string(), |r| r.to_string()),
        args.payload_bytes,
        acked,
        errors,
        secs,
        totals.delivered as f64 / secs,
        acked as f64 / secs,
        percentiles("e2e_", &latency),
        percentiles("ack_", &acks),
        totals.checks()
    ))
}

fn rss_kib(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
        total += line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?;
    }
    Ok(total)
}

async fn idle(args: &Args, target: &Target) -> Result<String> {
    let target = Arc::new(clone_target(target));
    let before = if args.rss_pids.is_empty() {
        None
    } else {
        Some(rss_kib(&args.rss_pids)?)
    };
    let started = Instant::now();
    let streams = open_many(&target, args.subscribers, None).await?;
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = if args.rss_pids.is_empty() {
        None
    } else {
        Some(rss_kib(&args.rss_pids)?)
    };
    tokio::time::sleep(Duration::from_secs_f64(args.hold_s)).await;
    let memory = match (before, after) {
        (Some(b), Some(a)) => format!(
            "rss_before_kib={b} rss_after_kib={a} bytes_per_stream={:.0}",
            (a.saturating_sub(b) * 1024) as f64 / streams.len() as f64
        ),
        _ => "bytes_per_stream=unmeasured".into(),
    };
    Ok(format!(
        "streams={} open_secs={:.2} {}",
        streams.len(),
        open_secs,
        memory
    ))
}

async fn replay(args: &Args, target: &Target) -> Result<String> {
    let target = Arc::new(clone_target(target));
    let fill_started = Instant::now();
    let (ranges, errors, _) =
        publish_all(args, &target, args.publishers, args.events, None).await?;
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let acked: u64 = ranges.iter().map(|r| r.end).sum();
    let started = Instant::now();
    let stream = Stream::open(&target, Some(&args.from_start_id)).await?;
    let deadline = started + Duration::from_secs_f64(args.timeout_s);
    let report = consume(stream, acked, deadline).await;
    let mut totals = Totals::default();
    totals.add(report, &ranges);
    let secs = totals.last_finish.map_or_else(
        || started.elapsed().as_secs_f64(),
        |at| (at - started).as_secs_f64(),
    );
    Ok(format!(
        "events={} fill_events_per_s={:.0} publish_errors={} secs={:.2} replay_events_per_s={:.0} {}",
        acked,
        acked as f64 / fill_secs,
        errors,
        secs,
        totals.delivered as f64 / secs,
        totals.checks()
    ))
}

async fn storm(args: &Args, target: &Target) -> Result<String> {
    let target = Arc::new(clone_target(target));
    // The marker's id is the resume point: learn it from a live stream.
    let mut probe = Stream::open(&target, None).await?;
    let marker_publisher = args.publishers as u32;
    let marker = Payload {
        publisher: marker_publisher,
        seq: 0,
        sent_us: now_micros(),
    };
    let mut publisher = Publisher::new(Arc::clone(&target));
    let (status, body) = publisher
        .post(&target.body(&marker, args.payload_bytes))
        .await?;
    if !(200..300).contains(&status) {
        bail!(
            "marker publish answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let mut marker_id = None;
    probe
        .read_until(Instant::now() + Duration::from_secs(10), |event| {
            if Payload::decode(&event.data).map(|p| p.publisher) == Some(marker_publisher) {
                marker_id = Some(event.id.clone());
                return false;
            }
            true
        })
        .await?;
    drop(probe);
    let marker_id = marker_id.ok_or_else(|| anyhow!("the marker event never arrived"))?;
    let (mut ranges, errors, _) =
        publish_all(args, &target, args.publishers, args.behind, None).await?;
    let acked: u64 = ranges.iter().map(|r| r.end).sum();
    // The marker itself must not come again: an empty range for its publisher.
    ranges.push(0..0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.timeout_s);
    let mut tasks = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let target = Arc::clone(&target);
        let marker_id = marker_id.clone();
        tasks.push(tokio::spawn(async move {
            match Stream::open(&target, Some(&marker_id)).await {
                Ok(stream) => consume(stream, acked, deadline).await,
                Err(e) => StreamReport {
                    error: Some(format!("open: {e:#}")),
                    ..Default::default()
                },
            }
        }));
    }
    let mut totals = Totals::default();
    let mut catch_up = histogram();
    for task in tasks {
        let report = task.await?;
        if let Some(at) = report.finished_at {
            let _ = catch_up.record((at - started).as_micros().max(1) as u64);
        }
        totals.add(report, &ranges);
    }
    let secs = totals.last_finish.map_or_else(
        || started.elapsed().as_secs_f64(),
        |at| (at - started).as_secs_f64(),
    );
    totals.latency = None;
    Ok(format!(
        "clients={} behind={} publish_errors={} secs={:.2} deliveries_per_s={:.0} {} {}",
        args.subscribers,
        acked,
        errors,
        secs,
        totals.delivered as f64 / secs,
        percentiles("catchup_", &catch_up),
        totals.checks()
    ))
}
