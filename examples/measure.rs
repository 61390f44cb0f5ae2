//! End-to-end measurements of a real gateway over real HTTP.
//!
//! Starts `sse_gateway::run` in-process on `127.0.0.1:0` with a temp data dir
//! (its own tokio runtime, so server and clients do not share a scheduler;
//! they do share the machine's cores), then drives it with reqwest over
//! keep-alive connections and prints one summary line per scenario:
//!
//! - `publish`: durable publish throughput and latency with 1 and with
//!   `--publishers` concurrent keep-alive publishers, 256-byte JSON events.
//! - `replay`: `--replay-events` events published to one topic, then one
//!   client reads them all back with `Last-Event-ID: 0`; every id is checked
//!   (exactly the acknowledged ids, each once, in order).
//! - `fanout`: `--subscribers` live subscribers on one topic, `--fanout-events`
//!   published; every subscriber must receive every event, in order. The
//!   send time travels in the payload, so latency is publish-to-delivery.
//!
//! Run: `cargo run --release --example measure -- [--publishers 32] [--events N] …`
//! (`--backend redis --redis-url redis://127.0.0.1:6379` measures through Redis)
//! (`--help` lists every option). See BENCHMARKS.md for figures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use sse_gateway::sse::decode::{Decoder, Event, Item};
use sse_gateway::Config;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// What to measure and how much.
#[derive(Debug, Clone, Parser)]
#[command(about = "Measures a real in-process sse-gateway over HTTP")]
struct Args {
    /// Concurrent keep-alive publishers in the concurrent publish scenario
    /// (also used to load the replay and fan-out topics).
    #[arg(long, default_value_t = 32)]
    publishers: usize,
    /// Events published in the concurrent publish scenario.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Events published in the single-publisher scenario.
    #[arg(long, default_value_t = 2_000)]
    single_events: usize,
    /// Events published to the replay topic and read back.
    #[arg(long, default_value_t = 100_000)]
    replay_events: usize,
    /// Live subscribers in the fan-out scenario.
    #[arg(long, default_value_t = 200)]
    subscribers: usize,
    /// Events published in the fan-out scenario.
    #[arg(long, default_value_t = 2_000)]
    fanout_events: usize,
    /// Size of each event's JSON data, in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Worker threads of the gateway's runtime (the client runtime gets the same).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Storage backend: `sled` (temp data dir) or `redis` (`--redis-url`).
    #[arg(long, default_value = "sled")]
    backend: String,
    /// Redis to use with `--backend redis`; each run writes a fresh log under
    /// its own key prefix (`bench-<pid>-<time>`), left in place afterwards.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.payload_bytes >= 64,
        "--payload-bytes must be at least 64"
    );
    print_machine(&args);

    let dir = TempDir::new()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .thread_name("gateway")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .thread_name("client")
        .enable_all()
        .build()?;

    let (mut config, limits_note) = bench_config();
    println!("config: defaults, {limits_note}");
    config.storage.data_dir = dir.path().to_path_buf();
    let storage_note = match args.backend.as_str() {
        "sled" => format!(
            "data dir {} (sled; a publish is acked after one apply_batch + Db::flush + fdatasync per group commit)",
            dir.path().display()
        ),
        "redis" => {
            config.storage.backend = sse_gateway::config::Backend::Redis;
            config.storage.url = args.redis_url.clone();
            config.storage.key_prefix = format!(
                "bench-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            );
            format!(
                "redis {} key prefix {} (a publish is acked after one append script call per group commit; durability per the server's appendfsync)",
                args.redis_url, config.storage.key_prefix
            )
        }
        other => anyhow::bail!("--backend {other:?}: use sled or redis"),
    };
    // The replay topic must hold every event it is sent (default keeps 100,000).
    config.retention.max_events_per_topic = config
        .retention
        .max_events_per_topic
        .max(args.replay_events as u64);
    config.validate()?;
    let listener = server_rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server = server_rt.spawn(sse_gateway::run(listener, config, stop.clone()));
    println!("gateway: {base}, {storage_note}");

    let result = client_rt.block_on(scenarios(&args, &base));

    stop.cancel();
    let stopped =
        server_rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), server).await });
    match stopped {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => println!("gateway stopped with an error: {e}"),
        Ok(Err(e)) => println!("gateway task failed: {e}"),
        Err(_) => println!("gateway did not stop within 20 s"),
    }
    shutdown(server_rt);
    shutdown(client_rt);
    result
}

/// Per-client publish rate limits and per-IP stream caps exist to stop one
/// hostile client; every benchmark client is 127.0.0.1, so they are lifted.
/// Builds that predate them refuse the keys (unknown keys are errors): those
/// run with the defaults.
const LIFTED_CLIENT_LIMITS: &str = "[limits]
max_connections_per_ip = 100000
publish_rate_per_ip = 1000000000
publish_rate_per_token = 1000000000
publish_burst = 1000000000
";

fn bench_config() -> (Config, &'static str) {
    match Config::from_toml(LIFTED_CLIENT_LIMITS) {
        Ok(config) => (
            config,
            "per-client rate limits lifted (all clients are 127.0.0.1)",
        ),
        Err(_) => (
            Config::default(),
            "this build has no per-client rate limits",
        ),
    }
}

fn shutdown(rt: Runtime) {
    rt.shutdown_timeout(Duration::from_secs(5));
}

async fn scenarios(args: &Args, base: &str) -> anyhow::Result<()> {
    wait_ready(base).await?;
    let origin = Instant::now();

    // (a) durable publish throughput.
    for (publishers, events) in [(1, args.single_events), (args.publishers, args.events)] {
        let before = scrape(base).await?;
        let run = publish_many(
            base,
            &format!("bench:publish:{publishers}"),
            publishers,
            events,
            args.payload_bytes,
            origin,
        )
        .await?;
        let after = scrape(base).await?;
        let mut latencies: Vec<u64> = run.acks.iter().map(|a| a.latency_us).collect();
        println!(
            "publish  publishers={publishers:<3} events={events:<6} {:>8.0} events/s  p50 {:>7.2} ms  p99 {:>7.2} ms  | {}  | loadavg {}",
            events as f64 / run.seconds,
            percentile(&mut latencies, 0.50) as f64 / 1e3,
            percentile(&mut latencies, 0.99) as f64 / 1e3,
            commit_summary(&before, &after),
            loadavg(),
        );
    }

    // (b) replay of one topic from the start.
    let topic = "bench:replay";
    let before = scrape(base).await?;
    let load = publish_many(
        base,
        topic,
        args.publishers,
        args.replay_events,
        args.payload_bytes,
        origin,
    )
    .await?;
    let after = scrape(base).await?;
    let expected = contiguous_seqs(&load.acks)?;
    println!(
        "load     publishers={:<3} events={:<6} {:>8.0} events/s  (filling the replay topic)  | {}  | loadavg {}",
        args.publishers,
        args.replay_events,
        args.replay_events as f64 / load.seconds,
        commit_summary(&before, &after),
        loadavg(),
    );
    let client = reqwest::Client::new();
    let started = Instant::now();
    let response = client
        .get(format!("{base}/topics/{topic}"))
        .header("Last-Event-ID", "0")
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 200,
        "replay GET answered {}",
        response.status()
    );
    let mut reader = SseReader::new(response);
    let mut next = *expected.start();
    let mut replay_bytes = 0;
    while next <= *expected.end() {
        let event = reader
            .next_event()
            .await?
            .ok_or_else(|| anyhow::anyhow!("replay stream ended at seq {next}"))?;
        anyhow::ensure!(event.name != "reset", "replay got a reset: {}", event.data);
        anyhow::ensure!(
            event.seq == next,
            "replay: expected seq {next}, got {} (gap or duplicate)",
            event.seq
        );
        next += 1;
        replay_bytes = reader.bytes;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(reader);
    println!(
        "replay   events={:<6} {:>8.0} events/s  {:>6.2} s  {:>6.1} MB/s  ids {}..={} exact: 0 gaps, 0 duplicates  | loadavg {}",
        args.replay_events,
        args.replay_events as f64 / seconds,
        seconds,
        replay_bytes as f64 / seconds / 1e6,
        expected.start(),
        expected.end(),
        loadavg(),
    );

    // (c) fan-out to many live subscribers.
    fanout(args, base, origin).await
}

async fn fanout(args: &Args, base: &str, origin: Instant) -> anyhow::Result<()> {
    let topic = "bench:fanout";
    let client = reqwest::Client::new();
    let mut readers = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let response = client.get(format!("{base}/topics/{topic}")).send().await?;
        anyhow::ensure!(
            response.status() == 200,
            "subscribe answered {}",
            response.status()
        );
        let mut reader = SseReader::new(response);
        // A live-only stream starts with `retry:` and an id-only block; once
        // it arrived the subscription is registered with the hub.
        reader.until_blocks(1).await?;
        readers.push(reader);
    }
    let info: serde_json::Value = client
        .get(format!("{base}/topics/{topic}/info"))
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(
        info["subscribers"] == args.subscribers,
        "expected {} subscribers, /info says {}",
        args.subscribers,
        info["subscribers"]
    );

    let events = args.fanout_events;
    let subscribers: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(events);
                let mut seqs = Vec::with_capacity(events);
                while seqs.len() < events {
                    let event = reader.next_event().await?.ok_or_else(|| {
                        anyhow::anyhow!("fan-out stream ended after {} events", seqs.len())
                    })?;
                    let received = origin.elapsed().as_micros() as u64;
                    anyhow::ensure!(event.name != "reset", "fan-out got a reset: {}", event.data);
                    let sent = sent_at(&event.data)
                        .ok_or_else(|| anyhow::anyhow!("no t_us in {}", event.data))?;
                    latencies.push(received.saturating_sub(sent));
                    seqs.push(event.seq);
                }
                Ok::<_, anyhow::Error>((seqs, latencies, origin.elapsed()))
            })
        })
        .collect();

    let before = scrape(base).await?;
    let started = origin.elapsed();
    let published = publish_many(
        base,
        topic,
        args.publishers,
        events,
        args.payload_bytes,
        origin,
    )
    .await?;
    let after = scrape(base).await?;
    let expected = contiguous_seqs(&published.acks)?;
    let mut all_latencies = Vec::with_capacity(events * args.subscribers);
    let mut last_delivery = started;
    for subscriber in subscribers {
        let (seqs, latencies, done) = subscriber.await??;
        anyhow::ensure!(
            seqs.iter().copied().eq(expected.clone()),
            "a subscriber's ids are not exactly {}..={} in order",
            expected.start(),
            expected.end()
        );
        all_latencies.extend(latencies);
        last_delivery = last_delivery.max(done);
    }
    let seconds = (last_delivery - started).as_secs_f64();
    let deliveries = events * args.subscribers;
    println!(
        "fanout   subscribers={} events={events} publishers={} {:>8.0} deliveries/s  {:>5.2} s  e2e p50 {:>7.2} ms  p99 {:>7.2} ms  all in order, none missing  | {}  | loadavg {}",
        args.subscribers,
        args.publishers,
        deliveries as f64 / seconds,
        seconds,
        percentile(&mut all_latencies, 0.50) as f64 / 1e3,
        percentile(&mut all_latencies, 0.99) as f64 / 1e3,
        commit_summary(&before, &after),
        loadavg(),
    );
    Ok(())
}

/// One acknowledged publish.
struct Ack {
    seq: u64,
    latency_us: u64,
}

struct PublishRun {
    acks: Vec<Ack>,
    seconds: f64,
}

/// Publishes `events` events to `topic` from `publishers` concurrent
/// keep-alive connections (one client with one connection each).
async fn publish_many(
    base: &str,
    topic: &str,
    publishers: usize,
    events: usize,
    payload_bytes: usize,
    origin: Instant,
) -> anyhow::Result<PublishRun> {
    let url = Arc::new(format!("{base}/topics/{topic}"));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..publishers)
        .map(|_| {
            let url = Arc::clone(&url);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .tcp_nodelay(true)
                    .build()?;
                let mut acks = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= events {
                        return Ok::<_, anyhow::Error>(acks);
                    }
                    let sent = Instant::now();
                    let body = event_body(i, origin.elapsed().as_micros() as u64, payload_bytes);
                    let response = client
                        .post(url.as_str())
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await?;
                    let status = response.status();
                    let answer = response.bytes().await?;
                    anyhow::ensure!(
                        status == 201,
                        "publish answered {status}: {}",
                        String::from_utf8_lossy(&answer)
                    );
                    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
                    let id = answer["id"].as_str().unwrap_or_default();
                    let seq = seq_of(id).ok_or_else(|| anyhow::anyhow!("bad id {id:?}"))?;
                    acks.push(Ack {
                        seq,
                        latency_us: sent.elapsed().as_micros() as u64,
                    });
                }
            })
        })
        .collect();
    let mut acks = Vec::with_capacity(events);
    for worker in workers {
        acks.extend(worker.await??);
    }
    Ok(PublishRun {
        acks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `{"event":"tick","data":{"i":…,"t_us":…,"pad":"xx…"}}` with the data
/// exactly `payload_bytes` long.
fn event_body(i: usize, t_us: u64, payload_bytes: usize) -> String {
    let head = format!(r#"{{"i":{i},"t_us":{t_us},"pad":""#);
    let pad = payload_bytes.saturating_sub(head.len() + 2);
    format!(r#"{{"event":"tick","data":{head}{}"}}}}"#, "x".repeat(pad))
}

/// The send time carried in an event's data.
fn sent_at(data: &str) -> Option<u64> {
    let rest = &data[data.find(r#""t_us":"#)? + 7..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// The sequence of an `<epoch>-<seq>` id.
fn seq_of(id: &str) -> Option<u64> {
    id.rsplit_once('-')?.1.parse().ok()
}

/// The acknowledged sequences, checked to be one contiguous range (nothing
/// else publishes meanwhile, so one topic's events are consecutive).
fn contiguous_seqs(acks: &[Ack]) -> anyhow::Result<std::ops::RangeInclusive<u64>> {
    let mut seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    seqs.sort_unstable();
    let (first, last) = (seqs[0], seqs[seqs.len() - 1]);
    anyhow::ensure!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "acknowledged ids are not contiguous ({first}..={last}, {} acks)",
        seqs.len()
    );
    Ok(first..=last)
}

/// One parsed SSE event.
struct SseEvent {
    seq: u64,
    name: String,
    data: String,
}

/// An SSE stream read with the library's WHATWG decoder.
struct SseReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    decoder: Decoder,
    /// Events decoded and not handed out yet.
    ready: std::collections::VecDeque<Event>,
    /// Bytes received so far.
    bytes: usize,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            decoder: Decoder::new(),
            ready: Default::default(),
            bytes: 0,
        }
    }

    /// The next event (id-only, `retry:` and comment blocks are not events);
    /// `None` at the end of the stream. Its id must be one of ours.
    async fn next_event(&mut self) -> anyhow::Result<Option<SseEvent>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                let seq = seq_of(&event.id)
                    .ok_or_else(|| anyhow::anyhow!("bad id {:?} for {}", event.id, event.data))?;
                return Ok(Some(SseEvent {
                    seq,
                    name: event.event,
                    data: event.data,
                }));
            }
            if !self.read().await? {
                return Ok(None);
            }
        }
    }

    /// Reads until `n` blocks ended, events or not (`retry:`, id-only).
    async fn until_blocks(&mut self, n: u64) -> anyhow::Result<()> {
        while self.decoder.blocks_ended() < n {
            anyhow::ensure!(self.read().await?, "the stream ended before {n} blocks");
        }
        Ok(())
    }

    /// Decodes the next bytes received; false at the end of the stream.
    async fn read(&mut self) -> anyhow::Result<bool> {
        let Some(chunk) = self.body.next().await else {
            return Ok(false);
        };
        let chunk = chunk?;
        self.bytes += chunk.len();
        let ready = &mut self.ready;
        self.decoder.feed(&chunk, |item| {
            if let Item::Event(event) = item {
                ready.push_back(event);
            }
        });
        Ok(true)
    }
}

/// The `p`-quantile (nearest rank) of `values`, in their unit.
fn percentile(values: &mut [u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

async fn wait_ready(base: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..500 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("gateway did not become ready")
}

/// The gateway's `/metrics` text.
async fn scrape(base: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?)
}

/// Group commits between two scrapes: how many, mean size, mean duration.
fn commit_summary(before: &str, after: &str) -> String {
    let delta = |name: &str| metric_value(after, name) - metric_value(before, name);
    let commits = delta("sse_gateway_commit_batch_events_count");
    let events = delta("sse_gateway_commit_batch_events_sum");
    let seconds = delta("sse_gateway_commit_duration_seconds_sum");
    format!(
        "{commits:.0} commits, mean group {:.1} events, mean commit {:.2} ms",
        events / commits.max(1.0),
        seconds * 1e3 / commits.max(1.0)
    )
}

/// The value of an unlabelled sample in Prometheus text.
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

fn print_machine(args: &Args) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "machine: nproc {cores}, kernel {kernel}, loadavg {}",
        loadavg()
    );
    println!(
        "inputs: publishers={} events={} single_events={} replay_events={} subscribers={} fanout_events={} payload_bytes={} threads={} (gateway) + {} (clients), one process",
        args.publishers,
        args.events,
        args.single_events,
        args.replay_events,
        args.subscribers,
        args.fanout_events,
        args.payload_bytes,
        args.threads,
        args.threads,
    );
    println!("peer: Nchan side-by-side not yet measured (bench/compare.sh is separate work)");
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
