//! Power loss: the real binary with its data dir on a `powercut` FUSE mount,
//! which at a simulated power cut keeps only what was fsynced. Publishers of
//! small (~256 B) and large (300 KiB, once sled blob files) events run,
//! with retention trimming all the time; at a
//! seeded random moment (sometimes after publishing paused for a second)
//! the gateway is `kill -9`ed and the power cut; the surviving image is
//! mounted again and the gateway restarted. Every acknowledged (`201`) event
//! that retention did not legitimately trim must replay byte-exact, and a
//! publish after the restart must get an id above every acknowledged one.
//! The small events are published with an `Idempotency-Key`: after the
//! restart, the newest acknowledged ones are sent again with their keys and
//! must be answered with their original ids (replayed), never stored anew.
//!
//! Each mode runs as its own test: strict (names durable only by `fsync` of
//! their directory, POSIX) and journal (any fsync commits earlier names, like
//! ext4), each without and with torn writes: part of what was never synced
//! survives the cut too, every other cut in each of two ways
//! (`powercut::Torn`): *in order* (the writes made before a random point,
//! the one in flight in part, at 4 KiB: a disk without a volatile write
//! cache) and *by offset* (of each file, the unsynced pages below a random
//! offset, whenever written: a drive whose volatile cache reorders writes
//! between flushes, where a later write can survive an earlier one).
//!
//! Knobs (environment):
//! - `POWERCUT_CYCLES`: power cuts per mode (default 3, for CI: the four
//!   modes take ~15 s on 2 cores);
//! - `POWERCUT_SEED`: the seed (default: from the clock; printed, so a run
//!   can be replayed);
//! - `POWERCUT_TORN=in-order` or `by-offset`: the torn tests tear only that
//!   way (default: alternately).
//!
//! Needs `/dev/fuse` and root (or `fusermount3`). Run with
//! `POWERCUT_CYCLES=100 cargo test --test gateway power_cut -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use powercut::{EntryKind, Image, Mode, Torn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

use crate::common::*;

/// Topics the publishers write to (each keeps `RETAINED` events).
const TOPICS: [&str; 3] = ["power:0", "power:1", "power:2"];
/// A topic only for the probe publish after each restart (outside retention
/// accounting of the data topics).
const PROBE_TOPIC: &str = "power:probe";
/// `retention.max_events_per_topic`: small, so the trimmer runs during the test.
const RETAINED: usize = 60;
const SMALL_PUBLISHERS: usize = 3;
/// Bytes of padding in a small event's data (~256 B on the wire).
const SMALL_PAD: usize = 200;
/// Bytes of padding in a large event's data: over sled's blob threshold
/// (format 2 stores it in 4 KiB pieces, so no blob file is ever written).
const LARGE_PAD: usize = 300 * 1024;

/// `POWERCUT_TORN`: tear only in order, only by offset, or (unset)
/// alternately (module docs).
fn torn_only() -> Option<&'static str> {
    match std::env::var("POWERCUT_TORN").as_deref() {
        Ok("in-order") => Some("in-order"),
        Ok("by-offset") => Some("by-offset"),
        _ => None,
    }
}

/// How the cut after boot `boot` tears.
fn torn_writes(seed: u64, boot: u64) -> Torn {
    match (torn_only(), boot % 2) {
        (Some("by-offset"), _) | (None, 1) => Torn::ByOffset(seed),
        _ => Torn::InOrder(seed),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_strict_keeps_every_acknowledged_event() {
    run_mode(Mode::Strict, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_journal_keeps_every_acknowledged_event() {
    run_mode(Mode::Journal, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_torn_strict_keeps_every_acknowledged_event() {
    run_mode(Mode::Strict, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_torn_journal_keeps_every_acknowledged_event() {
    run_mode(Mode::Journal, true).await;
}

/// What one mode's run found.
#[derive(Debug, Default)]
struct Figures {
    cycles: u64,
    acked: u64,
    /// Acknowledged, not legitimately trimmed, and missing or different after a restart.
    lost: u64,
    failed_restarts: u64,
    reused_ids: u64,
    /// Acknowledged keyed publishes whose retry after the cut was not replayed with the original id.
    keys_not_replayed: u64,
    /// One line per problem, in order.
    failures: Vec<String>,
}

/// Acknowledged events still expected in the log, per topic.
#[derive(Default)]
struct History {
    epoch: Option<String>,
    /// topic → seq → (id, data)
    topics: BTreeMap<String, BTreeMap<u64, (String, String)>>,
    /// Highest sequence ever acknowledged in this epoch (a later id must be higher).
    max_seq: u64,
    /// The last cycle's acknowledged keyed publishes: (topic, key, data, id).
    keyed: Vec<(String, String, String, String)>,
}

impl History {
    fn add(&mut self, acked: Vec<Acked>) {
        self.keyed.clear();
        for event in acked {
            if let Some(key) = &event.key {
                self.keyed.push((
                    event.topic.clone(),
                    key.clone(),
                    event.data.clone(),
                    event.id.clone(),
                ));
            }
            let seq = seq_of(&event.id);
            self.max_seq = self.max_seq.max(seq);
            self.epoch
                .get_or_insert_with(|| epoch_of(&event.id).to_owned());
            self.topics
                .entry(event.topic)
                .or_default()
                .insert(seq, (event.id, event.data));
        }
    }

    /// Events that must be in the log: those with fewer than `RETAINED`
    /// newer events (acknowledged or stored) in their topic.
    fn required(&self, topic: &str, stored: &BTreeSet<u64>) -> Vec<u64> {
        let Some(acked) = self.topics.get(topic) else {
            return Vec::new();
        };
        let newer: BTreeSet<u64> = acked.keys().chain(stored.iter()).copied().collect();
        acked
            .keys()
            .copied()
            .filter(|&seq| newer.range(seq + 1..).count() < RETAINED)
            .collect()
    }

    fn clear(&mut self) {
        *self = History::default();
    }
}

async fn run_mode(mode: Mode, torn: bool) {
    let cycles: u64 = std::env::var("POWERCUT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let label = match (torn, torn_only()) {
        (false, _) => mode.to_string(),
        (true, None) => format!("{mode}+torn"),
        (true, Some(only)) => format!("{mode}+torn-{only}"),
    };
    println!("[{label}] POWERCUT_SEED={seed} POWERCUT_CYCLES={cycles}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mountpoint = TempDir::new().expect("mountpoint");
    let scratch = TempDir::new().expect("scratch dir");
    let config = scratch.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ncache_capacity_bytes = 16777216\n\
             [retention]\nmax_events_per_topic = {RETAINED}\ntrim_interval_ms = 200\n\
             [limits]\npublish_rate_per_ip = 100000\npublish_burst = 100000\n"
        ),
    )
    .expect("write config");
    let data_dir = mountpoint.path().join("data");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");

    let mut figures = Figures::default();
    let mut history = History::default();
    let mut image = Image::empty();
    for boot in 0..=cycles {
        let torn_seed = torn.then(|| torn_writes(seed.wrapping_add(boot), boot));
        let mount = image
            .mount(mode, torn_seed, mountpoint.path())
            .expect("mount the power-cut filesystem (needs /dev/fuse and root)");
        let gateway = match Gateway::start(&data_dir, &config).await {
            Ok(gateway) => gateway,
            Err(why) => {
                let lost = count_required(&history);
                figures.failed_restarts += 1;
                figures.lost += lost;
                figures.failures.push(format!(
                    "boot {boot}: the gateway did not start ({lost} acknowledged events lost \
                     with it): {why}"
                ));
                history.clear();
                let _ = mount.unmount();
                image = Image::empty();
                continue;
            }
        };
        if boot > 0 {
            verify(&client, &gateway.base, &mut history, &mut figures, boot).await;
            for line in gateway.log.lock().expect("log").iter() {
                if line.contains("ERROR") || line.contains("WARN") {
                    println!("[{label}] boot {boot} gateway: {line}");
                }
            }
        }
        if boot == cycles {
            gateway.kill9();
            mount.unmount().expect("unmount");
            break;
        }

        figures.cycles += 1;
        let publishers = Publishers::start(&client, &gateway.base, boot);
        let run_for = Duration::from_millis(rng.random_range(300..2500));
        let pause = rng.random_bool(1.0 / 3.0);
        tokio::time::sleep(run_for).await;
        let acked = if pause {
            let acked = publishers.stop().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            gateway.kill9();
            acked
        } else {
            gateway.kill9();
            publishers.stop().await
        };
        let large = acked.iter().filter(|a| a.data.len() > LARGE_PAD).count();
        figures.acked += acked.len() as u64;
        let count = acked.len();
        history.add(acked);
        image = mount.power_cut().expect("power cut");
        println!(
            "[{label}] cycle {}: {count} acknowledged ({large} large), kill -9 + cut after {} ms{}{}; \
             the disk kept: {}",
            boot + 1,
            run_for.as_millis(),
            if pause { " and a 1 s pause" } else { "" },
            match torn_seed {
                Some(Torn::InOrder(_)) => ", torn in order",
                Some(Torn::ByOffset(_)) => ", torn by offset",
                None => "",
            },
            describe(&image),
        );
    }
    let summary = format!(
        "[{label}] cycles {}, acked {}, lost {}, failed restarts {}, reused ids {}, \
         keys not replayed {} (seed {seed})",
        figures.cycles,
        figures.acked,
        figures.lost,
        figures.failed_restarts,
        figures.reused_ids,
        figures.keys_not_replayed
    );
    println!("{summary}");
    for failure in &figures.failures {
        println!("[{label}]   {failure}");
    }
    assert!(
        figures.lost == 0
            && figures.failed_restarts == 0
            && figures.reused_ids == 0
            && figures.keys_not_replayed == 0,
        "{summary}\n{}",
        figures.failures.join("\n")
    );
}

fn count_required(history: &History) -> u64 {
    TOPICS
        .iter()
        .map(|t| history.required(t, &BTreeSet::new()).len() as u64)
        .sum()
}

/// The sled files that survived: `data/` or not, `db` size, blob count.
fn describe(image: &Image) -> String {
    if image.kind("data") != Some(EntryKind::Dir) {
        return "no data dir at all".into();
    }
    let files = image.list("data").unwrap_or_default().join(" ");
    let db = match image.kind("data/db") {
        Some(EntryKind::File(size)) => format!("db {size} B"),
        _ => "no db".into(),
    };
    let blobs = image.list("data/blobs").map_or(0, |b| b.len());
    format!("data/{{{files}}}, {db}, {blobs} blobs")
}

/// After a restart: every required acknowledged event replays byte-exact
/// (counted as lost otherwise), and a new publish gets a higher id.
async fn verify(
    client: &reqwest::Client,
    base: &str,
    history: &mut History,
    figures: &mut Figures,
    boot: u64,
) {
    let probe = match try_publish(client, base, PROBE_TOPIC, "{\"probe\":true}", None).await {
        Ok((id, _)) => id,
        Err(why) => {
            figures.failures.push(format!(
                "boot {boot}: publish after the restart failed: {why}"
            ));
            return;
        }
    };
    let epoch = epoch_of(&probe).to_owned();
    if let Some(previous) = history.epoch.clone() {
        if previous != epoch {
            let lost = count_required(history);
            figures.lost += lost;
            figures.failures.push(format!(
                "boot {boot}: the log is gone: new epoch {epoch} (was {previous}), \
                 {lost} acknowledged events lost"
            ));
            history.clear();
        }
    }
    let mut missing = BTreeMap::new();
    let mut different = BTreeMap::new();
    for topic in TOPICS {
        let stored = match replay(client, base, topic).await {
            Ok(stored) => stored,
            Err(why) => {
                figures
                    .failures
                    .push(format!("boot {boot}: replay of {topic} failed: {why}"));
                BTreeMap::new()
            }
        };
        let seqs: BTreeSet<u64> = stored.keys().copied().collect();
        let required = history.required(topic, &seqs);
        let acked = history.topics.entry(topic.to_owned()).or_default();
        for seq in required {
            let (id, data) = &acked[&seq];
            match stored.get(&seq) {
                Some((stored_id, stored_data)) if stored_id == id && stored_data == data => {}
                Some(_) => {
                    *different.entry(topic).or_insert(0u64) += 1;
                    acked.remove(&seq);
                }
                None => {
                    *missing.entry(topic).or_insert(0u64) += 1;
                    acked.remove(&seq);
                }
            }
        }
        // What is neither required nor lost was trimmed legitimately.
        acked.retain(|seq, _| stored.contains_key(seq));
    }
    let lost: u64 = missing.values().chain(different.values()).sum();
    if lost > 0 {
        figures.lost += lost;
        figures.failures.push(format!(
            "boot {boot}: {lost} acknowledged events not replayed: missing {missing:?}, \
             different data {different:?}"
        ));
    }
    let probe_seq = seq_of(&probe);
    if history.epoch.as_deref() == Some(epoch.as_str()) && probe_seq <= history.max_seq {
        figures.reused_ids += 1;
        figures.failures.push(format!(
            "boot {boot}: id reused: the first publish got {probe}, \
             but {} was acknowledged before the cut",
            history.max_seq
        ));
    }
    // The newest acknowledged keyed publishes, retried with their keys: the
    // key was stored with the event, so each is replayed, not stored again.
    let keyed = std::mem::take(&mut history.keyed);
    let mut not_replayed = Vec::new();
    for (topic, key, data, id) in keyed.iter().rev().take(20) {
        match try_publish(client, base, topic, data, Some(key)).await {
            Ok((again, true)) if &again == id => {}
            Ok((again, replayed)) => {
                not_replayed.push(format!("{key}: {id} -> {again} (replayed: {replayed})"))
            }
            Err(why) => not_replayed.push(format!("{key}: {why}")),
        }
    }
    if !not_replayed.is_empty() {
        figures.keys_not_replayed += not_replayed.len() as u64;
        figures.failures.push(format!(
            "boot {boot}: keyed publishes not replayed after the cut: {not_replayed:?}"
        ));
    }
    history.epoch = Some(epoch);
    history.max_seq = history.max_seq.max(probe_seq);
}

/// Every stored event of `topic` (replay from `0`): seq → (id, data), in
/// strictly increasing id order.
async fn replay(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
) -> Result<BTreeMap<u64, (String, String)>, String> {
    let response = client
        .get(format!("{base}/topics/{topic}/info"))
        .send()
        .await
        .map_err(|e| format!("info: {e}"))?;
    let status = response.status();
    let info: Value = response
        .json()
        .await
        .map_err(|e| format!("info ({status}): {e}"))?;
    // Read up to the newest event the topic holds now. Not "count events":
    // the trimmer keeps running and may remove the oldest meanwhile, so the
    // stream delivers a suffix that always ends at `last_id`.
    let Some(last_id) = info["last_id"].as_str().map(str::to_owned) else {
        return Ok(BTreeMap::new());
    };
    let last = seq_of(&last_id);
    let mut stream = SseReader::connect(client, &format!("{base}/topics/{topic}"), Some("0")).await;
    let mut stored = BTreeMap::new();
    let mut previous = 0;
    while previous < last {
        let Some(event) = stream.next_event_within(Duration::from_secs(20)).await else {
            return Err(format!(
                "{} events replayed, then nothing before {last_id}",
                stored.len()
            ));
        };
        let seq = seq_of(&event.id);
        if seq <= previous {
            return Err(format!(
                "ids not increasing: {} after seq {previous}",
                event.id
            ));
        }
        previous = seq;
        stored.insert(seq, (event.id, event.data));
    }
    Ok(stored)
}

/// Publishes `data` to `topic`, with `Idempotency-Key: key` when given:
/// the id, and whether the answer was replayed.
async fn try_publish(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
    data: &str,
    key: Option<&str>,
) -> Result<(String, bool), String> {
    let mut request = client
        .post(format!("{base}/topics/{topic}"))
        .header("content-type", "application/json")
        .body(format!("{{\"data\":{data}}}"));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let answer: Value = response.json().await.map_err(|e| e.to_string())?;
    if status != StatusCode::CREATED {
        return Err(format!("{status}: {answer}"));
    }
    answer["id"]
        .as_str()
        .map(|id| (id.to_owned(), replayed))
        .ok_or_else(|| format!("no id in {answer}"))
}

/// One acknowledged publish.
struct Acked {
    topic: String,
    id: String,
    data: String,
    key: Option<String>,
}

/// The event data of publisher `p`'s `i`th event: compact JSON (stored and
/// replayed as sent) with `pad` pseudo-random characters, so a torn or
/// stale byte anywhere shows.
fn event_data(p: usize, i: u64, pad: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut state = (p as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i;
    let text: String = (0..pad)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ALPHABET[(state >> 33) as usize % ALPHABET.len()] as char
        })
        .collect();
    format!(r#"{{"p":{p},"i":{i},"pad":"{text}"}}"#)
}

/// `SMALL_PUBLISHERS` publishers of small events (publisher `p` on topic
/// `p % 3`) and one of large events (round robin), each publishing as fast
/// as it is answered and remembering what was acknowledged.
struct Publishers {
    running: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publishers {
    fn start(client: &reqwest::Client, base: &str, boot: u64) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let acked: Arc<Mutex<Vec<Acked>>> = Default::default();
        let tasks = (0..=SMALL_PUBLISHERS)
            .map(|p| {
                let (client, base) = (client.clone(), base.to_owned());
                let (running, acked) = (Arc::clone(&running), Arc::clone(&acked));
                let large = p == SMALL_PUBLISHERS;
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while running.load(Ordering::Relaxed) {
                        let topic = if large {
                            TOPICS[i as usize % TOPICS.len()]
                        } else {
                            TOPICS[p % TOPICS.len()]
                        };
                        let data = event_data(p, i, if large { LARGE_PAD } else { SMALL_PAD });
                        let key = (!large).then(|| format!("boot{boot}-p{p}-i{i}"));
                        i += 1;
                        match try_publish(&client, &base, topic, &data, key.as_deref()).await {
                            Ok((id, _)) => acked.lock().expect("acked lock").push(Acked {
                                topic: topic.to_owned(),
                                id,
                                data,
                                key,
                            }),
                            // The gateway was killed: expected, not counted.
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        Self {
            running,
            acked,
            tasks,
        }
    }

    async fn stop(self) -> Vec<Acked> {
        self.running.store(false, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("publisher task");
        }
        std::mem::take(&mut *self.acked.lock().expect("acked lock"))
    }
}

/// The real binary, started without panicking when it refuses to start
/// (a failed restart is a figure of this test, not a crash of it).
struct Gateway {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts `sse-gateway serve` on `data_dir`; `Err` with the end of its
    /// stderr if it exits or does not listen within a minute.
    async fn start(data_dir: &Path, config: &Path) -> Result<Self, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(rest.trim().to_owned());
                    }
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stderr_open = true;
        loop {
            if stderr_open {
                match tokio::time::timeout(Duration::from_millis(50), &mut rx).await {
                    Ok(Ok(addr)) => {
                        return Ok(Self {
                            child,
                            base: format!("http://{addr}"),
                            log,
                        })
                    }
                    // stderr closed without a listen line: the process is exiting.
                    Ok(Err(_)) => stderr_open = false,
                    Err(_) => {}
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let exited = child.try_wait().map_err(|e| e.to_string())?;
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                tokio::time::sleep(Duration::from_millis(100)).await;
                let log = log.lock().expect("log lock");
                // A panic: its message, not the end of the backtrace.
                let from = log
                    .iter()
                    .position(|l| l.contains("panicked at"))
                    .unwrap_or(log.len().saturating_sub(3));
                let tail: Vec<&str> = log.iter().skip(from).take(3).map(String::as_str).collect();
                return Err(format!(
                    "{}: {}",
                    exited.map_or("no listen line in 60 s".into(), |s| s.to_string()),
                    tail.join(" | ")
                ));
            }
        }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Long format-1 records added to the v1 fixture for the upgrade test.
const UPGRADE_EVENTS: u64 = 200;

/// A format-1 directory: the v1 fixture (`ucMMIYGv-1…4`) plus
/// `UPGRADE_EVENTS` records of 20 KiB on topic `upgrade` (ids 5…), written
/// as format 1 wrote them. Returns it and each added event's data.
fn v1_directory_with_long_records() -> (TempDir, Vec<String>) {
    use sse_gateway::log::sled::codec;
    use sse_gateway::model::{EventName, Topic};
    let dir = TempDir::new().expect("tempdir");
    copy_dir(&repo_path("tests/fixtures/v1-data"), dir.path());
    let db = sled::open(dir.path()).expect("open the fixture with sled");
    let name = EventName::parse("long").expect("name");
    let topic = Topic::parse("upgrade").expect("topic");
    let mut data = Vec::new();
    for i in 0..UPGRADE_EVENTS {
        let seq = 5 + i;
        let text = format!("{{\"i\":{i},\"pad\":\"{}\"}}", "u".repeat(20 * 1024));
        db.insert(
            codec::event_key(seq),
            codec::encode_record_v1(1, &name, std::slice::from_ref(&topic), &text),
        )
        .expect("insert a v1 record");
        db.insert(codec::index_key(&topic, seq), &[])
            .expect("insert an index entry");
        data.push(text);
    }
    db.insert(codec::HEAD_KEY, &(4 + UPGRADE_EVENTS).to_be_bytes())
        .expect("head");
    db.flush().expect("flush");
    drop(db);
    (dir, data)
}

/// Copies `from` into the mount at `to` and makes it durable (files, their
/// directory and its parent), as if it had been there for a long time.
fn copy_durably(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir on the mount");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_durably(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
            std::fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .expect("fsync a copied file");
        }
    }
    for dir in [to, to.parent().expect("parent")] {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .expect("fsync a directory");
    }
}

/// The format 1 → 2 upgrade runs at start, before the gateway listens. Cut
/// the power at random moments while it runs (`kill -9`, then the cut), a
/// few times in a row; once a start completes, every event of the format-1
/// directory replays byte-exact and new ids continue after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cuts_during_the_format_upgrade_lose_nothing() {
    let seed: u64 = std::env::var("POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("[upgrade] POWERCUT_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (v1, data) = v1_directory_with_long_records();
    let mountpoint = TempDir::new().expect("mountpoint");
    let data_dir = mountpoint.path().join("data");
    let mount = Image::empty()
        .mount(Mode::Strict, None, mountpoint.path())
        .expect("mount the power-cut filesystem (needs /dev/fuse and root)");
    copy_durably(v1.path(), &data_dir);
    let mut image = mount.power_cut().expect("power cut");
    let scratch = TempDir::new().expect("scratch");
    let config = scratch.path().join("gateway.toml");
    // No age trimming: the fixture's events (2026-11-27) and the long
    // records (written at time 1) are old, and must all be upgraded.
    std::fs::write(
        &config,
        format!(
            "[storage]\ncache_capacity_bytes = 16777216\n\
             [retention]\nmax_age_s = {FIXTURE_AGE_LIMIT_S}\n"
        ),
    )
    .expect("config");

    for cut in 0..4 {
        let mount = image
            .mount(Mode::Strict, None, mountpoint.path())
            .expect("remount");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let after = Duration::from_millis(rng.random_range(0..400));
        tokio::time::sleep(after).await;
        let _ = child.kill();
        let _ = child.wait();
        image = mount.power_cut().expect("power cut");
        println!("[upgrade] cut {} after {} ms", cut + 1, after.as_millis());
    }

    let mount = image
        .mount(Mode::Strict, None, mountpoint.path())
        .expect("remount");
    let gateway = Gateway::start(&data_dir, &config)
        .await
        .expect("the gateway starts on the upgraded (or still upgrading) directory");
    let client = reqwest::Client::new();
    let stored = replay(&client, &gateway.base, "upgrade")
        .await
        .expect("replay the long records");
    let got: Vec<&String> = stored.values().map(|(_, d)| d).collect();
    assert_eq!(got.len(), data.len(), "every long record is there");
    assert!(got.iter().zip(&data).all(|(a, b)| *a == b), "byte-exact");
    let ids: Vec<&String> = stored.values().map(|(id, _)| id).collect();
    assert_eq!(ids.first().map(|s| s.as_str()), Some("ucMMIYGv-5"));
    let (status, info) = get_json(
        &client,
        &format!("{}/topics/projects:all/info", gateway.base),
    )
    .await;
    assert_eq!((status, info["count"].as_u64()), (StatusCode::OK, Some(4)));
    let probe = try_publish(
        &client,
        &gateway.base,
        PROBE_TOPIC,
        "{\"after\":\"upgrade\"}",
        None,
    )
    .await
    .expect("publish after the upgrade")
    .0;
    assert_eq!(probe, format!("ucMMIYGv-{}", 5 + UPGRADE_EVENTS));
    gateway.kill9();
    mount.unmount().expect("unmount");
}

/// `/readyz` says whether the next publish would be stored: when the disk
/// starts failing (the power-cut filesystem answers EIO to everything once
/// cut, while the gateway still runs), the publish is refused with `503`
/// and readiness turns `503` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_turns_503_when_the_disk_fails_under_a_running_gateway() {
    let mountpoint = TempDir::new().expect("mountpoint");
    let scratch = TempDir::new().expect("scratch");
    let config = scratch.path().join("gateway.toml");
    std::fs::write(&config, "[storage]\ncache_capacity_bytes = 16777216\n").expect("config");
    let mount = Image::empty()
        .mount(Mode::Strict, None, mountpoint.path())
        .expect("mount the power-cut filesystem (needs /dev/fuse and root)");
    let data_dir = mountpoint.path().join("data");
    let gateway = Gateway::start(&data_dir, &config).await.expect("start");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let ready = |client: reqwest::Client, base: String| async move {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status())
            .ok()
    };
    try_publish(&client, &gateway.base, "disk", "{\"before\":1}", None)
        .await
        .expect("a publish on a working disk");
    assert_eq!(
        ready(client.clone(), gateway.base.clone()).await,
        Some(StatusCode::OK)
    );

    // From now on every filesystem request of the gateway fails (EIO).
    let _image = mount.power_cut().expect("cut");
    let refused = try_publish(&client, &gateway.base, "disk", "{\"after\":1}", None).await;
    assert!(
        refused.as_ref().is_err_and(|why| why.contains("503")),
        "a publish on a failed disk is refused with 503: {refused:?}"
    );
    let (client_ref, base) = (&client, gateway.base.clone());
    let base = &base;
    eventually("readyz to turn 503", || async move {
        ready(client_ref.clone(), base.clone()).await == Some(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    gateway.kill9();
}

/// The binary makes sled fsync its own log writes (`durable.rs`,
/// `fsync_every_log_write`): each commit's log write reaches the disk with
/// an `fsync` from sled itself, besides the gateway's `fdatasync`. Without
/// it sled only calls `sync_file_range`, which a drive's volatile cache may
/// reorder (the by-offset torn cuts above lose events then).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_fsyncs_every_log_write_of_the_binary() {
    let mountpoint = TempDir::new().expect("mountpoint");
    let scratch = TempDir::new().expect("scratch");
    let config = scratch.path().join("gateway.toml");
    std::fs::write(&config, "[storage]\ncache_capacity_bytes = 16777216\n").expect("config");
    let mount = Image::empty()
        .mount(Mode::Strict, None, mountpoint.path())
        .expect("mount the power-cut filesystem (needs /dev/fuse and root)");
    let gateway = Gateway::start(&mountpoint.path().join("data"), &config)
        .await
        .expect("start");
    let client = reqwest::Client::new();
    let before = mount.stats().expect("stats");
    const PUBLISHES: u64 = 20;
    for i in 0..PUBLISHES {
        try_publish(
            &client,
            &gateway.base,
            "fsync",
            &format!("{{\"i\":{i}}}"),
            None,
        )
        .await
        .expect("publish");
    }
    let after = mount.stats().expect("stats");
    let (fsyncs, fdatasyncs) = (
        after.fsyncs - before.fsyncs,
        after.fdatasyncs - before.fdatasyncs,
    );
    assert!(
        fdatasyncs >= PUBLISHES,
        "the gateway's fdatasync after each commit: {fdatasyncs}"
    );
    assert!(
        fsyncs >= PUBLISHES,
        "sled's own fsync after each log write: {fsyncs} for {PUBLISHES} commits"
    );
    gateway.kill9();
    mount.unmount().expect("unmount");
}
