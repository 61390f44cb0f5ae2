//! Micro benches of the gateway's hot paths, through the library's public API.
//!
//! - `sse_frame`: encoding one event block for a 256-byte JSON payload, into
//!   fresh `Bytes` (`event_frame`, what the log writer does once per event) and
//!   into a reused buffer (`put_event`, what replay does per event).
//! - `json_compact`: `json::compact` of the same payload, already compact and
//!   pretty-printed (what every publish pays).
//! - `sled_append`: `Log::append` on a real `SledLog` in a temp dir, N appends
//!   issued concurrently and awaited together so the writer thread can commit
//!   them as one group (one `apply_batch`, `Db::flush` and the `fdatasync`
//!   of `log/sled/durable.rs`: exactly what a publish waits for). Throughput is
//!   per event. The writer forms the groups itself, so after each group size
//!   the bench prints the groups it actually formed (from the log's metrics).
//! - `log_read`: `Log::read` of 512 events from one topic, and from 4 topics
//!   merged in sequence order (the replay path, `spawn_blocking` included).
//!
//! Run: `cargo bench --bench hot_paths`. Measurement times are short on
//! purpose; see BENCHMARKS.md for figures and the machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;
use sse_gateway::hub::Hub;
use sse_gateway::log::sled::SledOptions;
use sse_gateway::log::{Log, NewEvent, RetentionPolicy, SledLog};
use sse_gateway::metrics::Metrics;
use sse_gateway::model::{Epoch, EventName, Topic};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// A 256-byte compact JSON object, shaped like a real broadcast payload.
fn payload_256() -> String {
    let head = r#"{"uuid":"3f1c2a9e-8b7d-4c6e-9f10-2a3b4c5d6e7f","kind":"task","title":"Review the quarterly roadmap","status":"in_progress","assignee":"a.lovelace","seq":12345,"tags":["q3","roadmap"],"note":""#;
    let tail = r#""}"#;
    let filler = 256 - head.len() - tail.len();
    let json = format!("{head}{}{tail}", "x".repeat(filler));
    assert_eq!(json.len(), 256);
    serde_json::from_str::<serde_json::Value>(&json).expect("valid JSON");
    json
}

/// The same payload pretty-printed (whitespace to strip), key order kept.
fn payload_pretty() -> String {
    let value: serde_json::Value =
        serde_json::from_str(&payload_256()).expect("payload is valid JSON");
    serde_json::to_string_pretty(&value).expect("serialises")
}

fn sse_frame(c: &mut Criterion) {
    let epoch = Epoch::parse("k3Xq9Zp2").expect("epoch");
    let data = payload_256();
    let mut group = c.benchmark_group("sse_frame");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));
    group.bench_function("event_frame_256B", |b| {
        let mut seq = 1_000_000u64;
        b.iter(|| {
            seq += 1;
            black_box(sse_gateway::sse::event_frame(
                &epoch,
                seq,
                "message",
                black_box(data.as_bytes()),
            ))
        })
    });
    group.bench_function("put_event_256B_reused_buf", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        let mut seq = 1_000_000u64;
        b.iter(|| {
            seq += 1;
            buf.clear();
            sse_gateway::sse::put_event(
                &mut buf,
                &epoch,
                seq,
                "message",
                black_box(data.as_bytes()),
            );
            black_box(buf.len())
        })
    });
    group.finish();
}

fn json_compact(c: &mut Criterion) {
    let compact = payload_256();
    let pretty = payload_pretty();
    let mut group = c.benchmark_group("json_compact");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes(compact.len() as u64));
    group.bench_function("already_compact_256B", |b| {
        b.iter(|| sse_gateway::json::compact(black_box(&compact), 64).expect("valid"))
    });
    group.throughput(Throughput::Bytes(pretty.len() as u64));
    group.bench_function(format!("pretty_{}B", pretty.len()), |b| {
        b.iter(|| sse_gateway::json::compact(black_box(&pretty), 64).expect("valid"))
    });
    group.finish();
}

/// A real sled log in a temp dir, with its runtime and metrics.
struct BenchLog {
    rt: Runtime,
    log: SledLog,
    metrics: Arc<Metrics>,
    /// Kept so the data dir lives as long as the log.
    _dir: TempDir,
}

impl BenchLog {
    fn open() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = TempDir::new().expect("tempdir");
        let metrics = Arc::new(Metrics::new());
        let options = SledOptions {
            key_window: std::time::Duration::from_secs(86_400),
            cache_capacity_bytes: 64 * 1024 * 1024,
            publish_queue: 8192,
            max_commit_batch: 4096,
            retention: RetentionPolicy {
                max_events_per_topic: u64::MAX / 2,
                max_age: Duration::from_secs(30 * 24 * 3600),
                batch_events: 1000,
            },
            // Keep the trimmer out of the measurements.
            trim_interval: Duration::from_secs(3600),
        };
        let log = {
            let _guard = rt.enter();
            SledLog::open(
                dir.path(),
                options,
                Arc::new(Hub::new(4096)),
                Arc::clone(&metrics),
            )
            .expect("open sled log")
        };
        Self {
            rt,
            log,
            metrics,
            _dir: dir,
        }
    }

    /// Issues `n` appends at once and waits for every ack.
    fn append_group(&self, topics: &[Topic], n: usize, data: &str) {
        let name = EventName::default_name();
        self.rt.block_on(async {
            let acks = join_all((0..n).map(|i| {
                self.log.append(NewEvent {
                    topics: vec![topics[i % topics.len()].clone()],
                    name: name.clone(),
                    data: data.to_owned(),
                    key: None,
                })
            }))
            .await;
            for ack in acks {
                ack.expect("append");
            }
        });
    }

    /// (commits, events) the writer has made so far.
    fn commits(&self) -> (u64, u64) {
        let text = self.metrics.render();
        let count = metric_value(&text, "sse_gateway_commit_batch_events_count");
        let events = metric_value(&text, "sse_gateway_commit_batch_events_sum");
        (count as u64, events as u64)
    }

    /// Seconds spent in group commits (write + fsync) so far.
    fn commit_seconds(&self) -> f64 {
        metric_value(
            &self.metrics.render(),
            "sse_gateway_commit_duration_seconds_sum",
        )
    }

    fn close(self) {
        self.rt.block_on(self.log.close()).expect("close");
    }
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

fn sled_append(c: &mut Criterion) {
    let data = payload_256();
    let topic = Topic::parse("bench:append").expect("topic");
    let topics = [topic];
    let mut group = c.benchmark_group("sled_append");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(10);
    for n in [1usize, 16, 256] {
        let bench_log = BenchLog::open();
        group.throughput(Throughput::Elements(n as u64));
        let before = bench_log.commits();
        let commit_secs_before = bench_log.commit_seconds();
        let started = Instant::now();
        group.bench_function(format!("group_of_{n}"), |b| {
            b.iter(|| bench_log.append_group(&topics, n, &data))
        });
        let wall = started.elapsed().as_secs_f64();
        let (commits, events) = bench_log.commits();
        let (commits, events) = (commits - before.0, events - before.1);
        let commit_secs = bench_log.commit_seconds() - commit_secs_before;
        // Nothing to say when a filter skipped this size.
        if events > 0 {
            println!(
                "sled_append/group_of_{n}: writer formed {commits} commits for {events} events \
             (mean group {:.1}); mean commit (apply_batch + Db::flush + fdatasync) {:.3} ms; \
             {:.0}% of wall time inside commits; loadavg {}",
                events as f64 / commits.max(1) as f64,
                commit_secs * 1e3 / commits.max(1) as f64,
                100.0 * commit_secs / wall,
                loadavg(),
            );
        }
        bench_log.close();
    }

    group.finish();
}

fn log_read(c: &mut Criterion) {
    const PER_TOPIC: usize = 2048;
    const LIMIT: usize = 512;
    const READ_LIMIT: sse_gateway::log::ReadLimit = sse_gateway::log::ReadLimit {
        events: LIMIT,
        bytes: usize::MAX,
    };
    let data = payload_256();
    let bench_log = BenchLog::open();
    let single = [Topic::parse("read:single").expect("topic")];
    let merged: Vec<Topic> = (0..4)
        .map(|i| Topic::parse(&format!("read:merged:{i}")).expect("topic"))
        .collect();
    // Interleave so the 4 merged topics' events alternate in the log, and the
    // single topic's events are spread between them too.
    for _ in 0..PER_TOPIC / 256 {
        bench_log.append_group(&single, 256, &data);
        bench_log.append_group(&merged, 1024, &data);
    }
    let head = bench_log.log.durable_head();
    let mut group = c.benchmark_group("log_read");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(LIMIT as u64));
    for (name, topics) in [
        ("512_of_1_topic", &single[..]),
        ("512_of_4_topics_merged", &merged[..]),
    ] {
        let check = bench_log
            .rt
            .block_on(bench_log.log.read(topics, 0, head, READ_LIMIT))
            .expect("read");
        assert_eq!(check.events.len(), LIMIT, "{name}");
        assert!(check.events.windows(2).all(|w| w[0].seq < w[1].seq));
        group.bench_function(name, |b| {
            b.iter(|| {
                let batch = bench_log
                    .rt
                    .block_on(bench_log.log.read(topics, 0, head, READ_LIMIT))
                    .expect("read");
                black_box(batch.events.len())
            })
        });
    }
    group.finish();
    println!("log_read: log of {head} events; loadavg {}", loadavg());
    bench_log.close();
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

criterion_group!(benches, sse_frame, json_compact, sled_append, log_read);
criterion_main!(benches);
