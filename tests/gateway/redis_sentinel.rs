//! Redis Sentinel failover under load: a primary, two replicas (so the
//! promoted one still has a replica for `WAIT`) and three Sentinels
//! (`redis-server --sentinel`) on loopback, two gateways with `backend =
//! "redis-sentinel"` and `wait_replicas = 1`. The replicas reach the primary
//! through in-test TCP links that can be frozen: the test freezes them (the
//! primary goes on appending what no replica gets, the worst moment of a
//! real crash, made wide enough to hit every time), `kill -9`s the primary
//! and cuts the links, so what was in flight is lost with it. The Sentinels
//! promote a replica and the gateways must follow it without a restart:
//! every acknowledged event is present once and in order on the new
//! primary, and every stream (one open across the failover, one resumed
//! with `Last-Event-ID` after it) saw each acknowledged event once, in
//! order, with no gap, and never an event the log then lost.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tempfile::TempDir;

use crate::common::free_port;
use crate::common::*;
use crate::redis::{gateways, redis_cli, redis_config, require, spawn_redis};

pub(crate) const MASTER: &str = "mymaster";
/// How long the gateways may take to follow a failover (Sentinel needs
/// `down-after-milliseconds` plus an election and a promotion).
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

/// A child process killed when dropped.
pub(crate) struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-server` on a free port with its data in `dir` (retried on another
/// port when the one picked was taken meanwhile).
pub(crate) fn data_server(dir: &Path, args: &[String]) -> (Proc, u16) {
    for _ in 0..20 {
        let port = free_port();
        if let Ok(child) = spawn_redis(port, dir, args) {
            return (Proc(child), port);
        }
    }
    panic!("no redis-server started");
}

/// A Sentinel watching the primary on `primary_port`: its config is a
/// writable file in `dir` (Sentinel rewrites it).
fn sentinel(dir: &Path, primary_port: u16) -> (Proc, u16) {
    for _ in 0..20 {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{port}.conf"));
        let text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
             sentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 3000\n\
             sentinel parallel-syncs {MASTER} 1\n",
            dir.display()
        );
        std::fs::write(&conf, text).expect("write sentinel config");
        let mut child = Command::new(require("redis-server"))
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break; // its port was taken: try another
            }
            let answer = redis_cli(port, &["sentinel", "get-master-addr-by-name", MASTER]);
            if answer.contains(&primary_port.to_string()) {
                return (Proc(child), port);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("no sentinel started");
}

/// Waits (up to `bound`) until `check` holds; how long it took.
pub(crate) fn wait_until(what: &str, bound: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < bound, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// A TCP link from a replica to the primary that the test can freeze (what
/// the primary sends is held, as a network that stalls) and cut (what was
/// held is dropped, the connections closed, no new ones accepted).
pub(crate) struct Link {
    pub(crate) port: u16,
    frozen: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Link {
    /// Listens on a free loopback port, forwarding to `target_port`.
    fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a link");
        let port = listener.local_addr().expect("link address").port();
        listener.set_nonblocking(true).expect("nonblocking link");
        let frozen = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (f, c, all) = (Arc::clone(&frozen), Arc::clone(&cut), Arc::clone(&sockets));
        std::thread::spawn(move || {
            while !c.load(Ordering::SeqCst) {
                let Ok((replica, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = replica.set_nonblocking(false);
                let Ok(primary) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let pair = (replica.try_clone(), primary.try_clone());
                let (Ok(replica_w), Ok(primary_w)) = pair else {
                    continue;
                };
                all.lock().unwrap().extend([
                    replica.try_clone().expect("clone"),
                    primary.try_clone().expect("clone"),
                ]);
                // Primary to replica: held while frozen, dropped once cut.
                let (f, c) = (Arc::clone(&f), Arc::clone(&c));
                std::thread::spawn(move || pump(primary, replica_w, Some((f, c))));
                // Replica to primary (its acknowledgements): always passed.
                std::thread::spawn(move || pump(replica, primary_w, None));
            }
        });
        Self {
            port,
            frozen,
            cut,
            sockets,
        }
    }

    /// From now on what the primary sends is held.
    pub(crate) fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// What the primary sends flows again (with what was held first).
    pub(crate) fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Drops what is held and closes every connection for good.
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for socket in self.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Copies `from` to `to` until either closes; with `gate`, waits while it is
/// frozen and stops (dropping what it holds) once it is cut.
fn pump(mut from: TcpStream, mut to: TcpStream, gate: Option<(Arc<AtomicBool>, Arc<AtomicBool>)>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((frozen, cut)) = &gate {
            while frozen.load(Ordering::SeqCst) && !cut.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
            }
            if cut.load(Ordering::SeqCst) {
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// A primary, two replicas and three Sentinels (quorum 2) on loopback, the
/// Sentinels agreeing and knowing both replicas (a failover can happen).
pub(crate) struct SentinelGroup {
    pub(crate) primary: Proc,
    /// The replicas' links to the first primary (see [`Link`]).
    pub(crate) links: Vec<Link>,
    pub(crate) replicas: Vec<(Proc, u16)>,
    pub(crate) sentinels: Vec<(Proc, u16)>,
    _dirs: Vec<TempDir>,
}

impl SentinelGroup {
    pub(crate) fn start() -> Self {
        let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new().unwrap()).collect();
        let aof: Vec<String> = ["--appendonly", "yes", "--appendfsync", "always"]
            .map(String::from)
            .to_vec();
        let (primary, primary_port) = data_server(dirs[0].path(), &aof);
        let links: Vec<Link> = (1..3).map(|_| Link::start(primary_port)).collect();
        let replicas: Vec<(Proc, u16)> = (1..3)
            .map(|i| {
                let mut replica_args = aof.clone();
                replica_args.extend([
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    links[i - 1].port.to_string(),
                ]);
                data_server(dirs[i].path(), &replica_args)
            })
            .collect();
        for (_, port) in &replicas {
            wait_until("the replica to sync", Duration::from_secs(10), || {
                redis_cli(*port, &["info", "replication"]).contains("master_link_status:up")
            });
        }
        let sentinels: Vec<(Proc, u16)> = (0..3)
            .map(|_| sentinel(dirs[3].path(), primary_port))
            .collect();
        // The Sentinels found each other and the replicas: a failover can happen.
        wait_until(
            "the sentinels to reach quorum",
            Duration::from_secs(15),
            || {
                let quorum = redis_cli(sentinels[0].1, &["sentinel", "ckquorum", MASTER]);
                let known = redis_cli(sentinels[0].1, &["sentinel", "replicas", MASTER]);
                quorum.contains("3 usable")
                    && replicas.iter().all(|(_, p)| known.contains(&p.to_string()))
            },
        );
        Self {
            primary,
            links,
            replicas,
            sentinels,
            _dirs: dirs,
        }
    }
}

/// The two gateways' storage section on `sentinels`.
fn sentinel_storage(sentinels: &[(Proc, u16)], wait_replicas: u32) -> String {
    let list: Vec<String> = sentinels
        .iter()
        .map(|(_, port)| format!("\"redis://127.0.0.1:{port}\""))
        .collect();
    format!(
        "backend = \"redis-sentinel\"\nsentinels = [{}]\nsentinel_master = \"{MASTER}\"\n\
         command_timeout_ms = 2000\nwait_replicas = {wait_replicas}\nwait_timeout_ms = 1000",
        list.join(", ")
    )
}

/// Freezes the replicas' links under load, lets the primary append what no
/// replica gets for `frozen`, then `kill -9`s it and cuts the links: what was
/// in flight is gone. Waits for the Sentinels to promote a replica; its port
/// and how long that took.
fn crash_primary_with_writes_in_flight(
    primary: Proc,
    links: &[Link],
    replicas: &[(Proc, u16)],
    sentinels: &[(Proc, u16)],
    frozen: Duration,
) -> (u16, Duration) {
    for link in links {
        link.freeze();
    }
    std::thread::sleep(frozen);
    let mut primary = primary;
    let _ = primary.0.kill();
    let _ = primary.0.wait();
    for link in links {
        link.cut();
    }
    let mut port = 0;
    let took = wait_until("a replica to be promoted", FAILOVER_BOUND, || {
        let named = redis_cli(
            sentinels[1].1,
            &["sentinel", "get-master-addr-by-name", MASTER],
        );
        replicas.iter().any(|(_, p)| {
            port = *p;
            named.contains(&p.to_string()) && redis_cli(*p, &["role"]).starts_with("master")
        })
    });
    (port, took)
}

/// Reads `reader` into `seen` until it ends or `stop` is set.
/// After a failover (at `since`): waits until `publishers` have 50 more
/// acknowledgements than `acked_before`, then until every node's `/readyz`
/// is 200, each within `bound` — the gateways follow the new primary with
/// no restart. Returns (publishing again, all ready), measured from `since`.
pub(crate) async fn wait_followed(
    what: &str,
    client: &reqwest::Client,
    nodes: &[GatewayProcess],
    publishers: &AckingPublishers,
    acked_before: usize,
    (since, bound): (Instant, Duration),
) -> (Duration, Duration) {
    let deadline = since + bound;
    while publishers.acked() < acked_before + 50 {
        if Instant::now() > deadline {
            let log: Vec<String> = nodes[0]
                .log
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(8)
                .cloned()
                .collect();
            panic!("{what}: publishes were not acknowledged again after the failover: {log:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publishing = since.elapsed();
    for node in nodes {
        loop {
            let ready = client
                .get(node.url("/readyz"))
                .send()
                .await
                .map(|r| r.status());
            if matches!(ready, Ok(StatusCode::OK)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: /readyz not 200 again after the failover"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (publishing, since.elapsed())
}

pub(crate) fn read_into(
    mut reader: SseReader,
    seen: Arc<Mutex<Vec<SseEvent>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !reader.ended && !stop.load(Ordering::SeqCst) {
            if let Some(event) = reader.next_event_within(Duration::from_millis(100)).await {
                seen.lock().unwrap().push(event);
            }
        }
    })
}

/// Every event of `topic` in the log of the gateway at `base`: seq → data.
pub(crate) async fn log_of(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
) -> HashMap<u64, String> {
    let (_, info) = get_json(client, &format!("{base}/topics/{topic}/info")).await;
    let stored = info["count"].as_u64().expect("count") as usize;
    let mut replay = SseReader::connect(client, &format!("{base}/topics/{topic}"), Some("0")).await;
    replay
        .take(stored)
        .await
        .into_iter()
        .map(|e| (seq_of(&e.id), e.data))
        .collect()
}

/// A stream's events are exactly the log's, from the first through `last`:
/// once each, in order, no gap, each with the log's data (nothing it saw was
/// un-said), and every acknowledged event among them.
pub(crate) fn assert_stream_matches_log(
    what: &str,
    seen: &[SseEvent],
    log: &HashMap<u64, String>,
    acked: &HashMap<String, String>,
    last: u64,
) {
    let seqs: Vec<u64> = seen.iter().map(|e| seq_of(&e.id)).collect();
    assert_eq!(seqs.first(), Some(&1), "{what}: starts at the first event");
    assert_eq!(seqs.last(), Some(&last), "{what}: reaches the last event");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: once each, in order, no gap"
    );
    for event in seen {
        assert_eq!(
            log.get(&seq_of(&event.id)),
            Some(&event.data),
            "{what}: {} was later un-said (the log holds another event under its id)",
            event.id
        );
    }
    let ids: std::collections::HashSet<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    for (id, data) in acked {
        assert!(ids.contains(id.as_str()), "{what}: acknowledged {id} seen");
        assert!(
            seen.iter().any(|e| &e.id == id && &e.data == data),
            "{what}: acknowledged {id} seen with its data"
        );
    }
    let epochs: std::collections::HashSet<&str> = seen.iter().map(|e| epoch_of(&e.id)).collect();
    assert_eq!(epochs.len(), 1, "{what}: one epoch across the failover");
}

/// The gateways' connections to the promoted primary, as `CLIENT LIST`
/// shows them (Sentinels, replicas and redis-cli itself left out).
fn gateway_connections(port: u16) -> Vec<String> {
    redis_cli(port, &["client", "list"])
        .lines()
        .filter(|l| {
            !l.contains("name=sentinel-")
                && !l.contains("cmd=client|list")
                && !l.contains("flags=S")
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_sentinel_failover_under_load_loses_no_acknowledged_event() {
    let group = SentinelGroup::start();
    let (primary, links) = (group.primary, group.links);
    let (replicas, sentinels) = (group.replicas, group.sentinels);

    let work = TempDir::new().unwrap();
    let config = redis_config(work.path(), &sentinel_storage(&sentinels, 1), "");
    let nodes = gateways(work.path(), &config, 2);
    let client = reqwest::Client::new();

    // A stream on the second node open across the failover, and one on the
    // first that is dropped at the crash and resumed after it.
    let mut live = SseReader::connect(&client, &nodes[1].url("/topics/fo"), None).await;
    live.until_blocks(1).await;
    let live_seen: Arc<Mutex<Vec<SseEvent>>> = Arc::default();
    let never = Arc::new(AtomicBool::new(false));
    let live_task = read_into(live, Arc::clone(&live_seen), Arc::clone(&never));
    let mut resumed = SseReader::connect(&client, &nodes[0].url("/topics/fo"), None).await;
    resumed.until_blocks(1).await;
    let resumed_seen: Arc<Mutex<Vec<SseEvent>>> = Arc::default();
    let drop_it = Arc::new(AtomicBool::new(false));
    let resumed_task = read_into(resumed, Arc::clone(&resumed_seen), Arc::clone(&drop_it));

    let publishers = AckingPublishers::start(&client, &nodes[0].base, "fo", 4);
    publishers.wait_for(200).await;
    let before = publishers.acked();

    // The replicas stop getting anything, the primary goes on appending
    // (WAIT now fails: 503), then dies with it.
    let crash = {
        tokio::task::block_in_place(|| {
            crash_primary_with_writes_in_flight(
                primary,
                &links,
                &replicas,
                &sentinels,
                Duration::from_millis(400),
            )
        })
    };
    let (promoted_port, promoted) = crash;
    let killed = Instant::now() - promoted;
    drop_it.store(true, Ordering::SeqCst);
    resumed_task.await.expect("resumed reader");

    // The gateways follow, without a restart: publishes are acknowledged
    // again, both ready.
    let (publishing, ready) = wait_followed(
        "sentinel",
        &client,
        &nodes,
        &publishers,
        publishers.acked(),
        (killed, FAILOVER_BOUND),
    )
    .await;

    // The dropped stream resumes from the last id it saw.
    let last_id = resumed_seen
        .lock()
        .unwrap()
        .last()
        .map(|e| e.id.clone())
        .expect("the resumed stream saw events before the crash");
    let resumed = SseReader::connect(&client, &nodes[0].url("/topics/fo"), Some(&last_id)).await;
    assert_eq!(resumed.status, StatusCode::OK);
    let resumed_task = read_into(resumed, Arc::clone(&resumed_seen), Arc::clone(&never));

    let connections = gateway_connections(promoted_port);
    println!(
        "sentinel failover: replica promoted {promoted:?} after kill -9, publishes acknowledged \
         again after {publishing:?}, /readyz 200 on both nodes after {ready:?} \
         ({before} acknowledged before the kill); {} gateway connections to the new primary \
         for 2 nodes:\n{}",
        connections.len(),
        connections.join("\n")
    );

    let acked = publishers.stop().await;
    assert!(acked.len() > before + 50);
    let mut last = 0;
    for node in &nodes {
        // A 201 precedes delivery by the commit marker's trip (the marker
        // rides the next append, or goes alone 2 ms later): let each node's
        // tail deliver the last ones.
        let info = node.url("/topics/fo/info");
        let newest = acked.keys().map(|id| seq_of(id)).max().unwrap_or(0);
        eventually("every node to deliver every acknowledged event", || async {
            let (_, info) = get_json(&client, &info).await;
            info["last_id"].as_str().map(seq_of).unwrap_or(0) >= newest
        })
        .await;
        last = assert_every_acked_event_replays(&client, &node.base, "fo", &acked).await;
    }
    let log = log_of(&client, &nodes[0].base, "fo").await;
    for (what, seen) in [
        ("the open stream", &live_seen),
        ("the resumed stream", &resumed_seen),
    ] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while seen.lock().unwrap().last().map(|e| seq_of(&e.id)) != Some(last) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} did not reach {last}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_stream_matches_log(what, &seen.lock().unwrap(), &log, &acked, last);
    }
    live_task.abort();
    resumed_task.abort();
}

/// Every event entry of the log on the Redis at `port`: seq → data.
fn events_on(port: u16) -> HashMap<u64, String> {
    let dump = redis_cli(port, &["xrange", "{sse}:log", "-", "+"]);
    let lines: Vec<&str> = dump.lines().collect();
    let mut events = HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(seq) = line.strip_suffix("-0").and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if lines.get(i + 1) != Some(&"n") {
            continue;
        }
        if let Some(at) = (i + 1..lines.len().min(i + 12)).find(|j| lines[*j] == "d") {
            events.insert(seq, lines[at + 1].to_owned());
        }
    }
    events
}

/// What `wait_replicas = 0` costs, shown: the same crash (writes in flight
/// when the primary dies) loses events that were acknowledged with `201`
/// and already delivered to subscribers. Operators who cannot lose them set
/// `wait_replicas = 1` (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_sentinel_failover_without_wait_replicas_loses_acknowledged_events() {
    let group = SentinelGroup::start();
    let (primary, links) = (group.primary, group.links);
    let (replicas, sentinels) = (group.replicas, group.sentinels);

    let work = TempDir::new().unwrap();
    let config = redis_config(work.path(), &sentinel_storage(&sentinels, 0), "");
    let nodes = gateways(work.path(), &config, 1);
    let client = reqwest::Client::new();
    let mut live = SseReader::connect(&client, &nodes[0].url("/topics/fo"), None).await;
    live.until_blocks(1).await;
    let seen: Arc<Mutex<Vec<SseEvent>>> = Arc::default();
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reading = read_into(live, Arc::clone(&seen), Arc::clone(&stop_reading));

    let publishers = AckingPublishers::start(&client, &nodes[0].base, "fo", 4);
    publishers.wait_for(200).await;
    let (promoted_port, _) = tokio::task::block_in_place(|| {
        crash_primary_with_writes_in_flight(
            primary,
            &links,
            &replicas,
            &sentinels,
            Duration::from_millis(400),
        )
    });
    let acked = publishers.stop().await;
    stop_reading.store(true, Ordering::SeqCst);
    reading.await.expect("reader");

    let kept = events_on(promoted_port);
    let lost: Vec<&String> = acked
        .iter()
        .filter(|(id, data)| kept.get(&seq_of(id)) != Some(*data))
        .map(|(id, _)| id)
        .collect();
    let seen = seen.lock().unwrap();
    let seen_lost = seen.iter().filter(|e| lost.contains(&&e.id)).count();
    println!(
        "without wait_replicas: {} of {} acknowledged events lost by the failover, {seen_lost} of \
         them already delivered to a subscriber",
        lost.len(),
        acked.len()
    );
    assert!(
        !lost.is_empty(),
        "the writes in flight at the crash were acknowledged and are lost"
    );
    assert!(
        seen_lost > 0,
        "a subscriber saw events that the log no longer has"
    );
}

/// An event appended and never confirmed (its writer died between the
/// append and its commit marker, or its replica had not got it yet) is
/// delivered to nobody while no replica has it, and without any further
/// publish once one has: the idle writer confirms it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_wait_replicas_delivers_only_replicated_events_and_confirms_when_idle() {
    let dirs: Vec<TempDir> = (0..2).map(|_| TempDir::new().unwrap()).collect();
    let (_primary, primary_port) = data_server(dirs[0].path(), &[]);
    let link = Link::start(primary_port);
    let replica_args: Vec<String> = ["--replicaof", "127.0.0.1", &link.port.to_string()]
        .map(String::from)
        .to_vec();
    let (_replica, replica_port) = data_server(dirs[1].path(), &replica_args);
    wait_until("the replica to sync", Duration::from_secs(10), || {
        redis_cli(replica_port, &["info", "replication"]).contains("master_link_status:up")
    });
    let work = TempDir::new().unwrap();
    let storage = format!(
        "{}\nwait_replicas = 1\nwait_timeout_ms = 300",
        crate::redis::single(&format!("redis://127.0.0.1:{primary_port}"))
    );
    let config = redis_config(work.path(), &storage, "");
    let nodes = gateways(work.path(), &config, 1);
    let client = reqwest::Client::new();
    let mut live = SseReader::connect(&client, &nodes[0].url("/topics/held"), None).await;
    live.until_blocks(1).await;

    // One publish: a commit marker exists.
    let first = client
        .post(nodes[0].url("/topics/held"))
        .header("content-type", "application/json")
        .body(r#"{"data":{"n":0}}"#)
        .send()
        .await
        .expect("publish");
    assert_eq!(first.status(), StatusCode::CREATED);
    let event = live.next_event_within(WAIT).await.expect("the first event");
    assert_eq!(seq_of(&event.id), 1);

    // Another writer appends with the script and never confirms: the
    // replica does not get it while the link is frozen.
    link.freeze();
    let sha = redis_cli(
        primary_port,
        &[
            "script",
            "load",
            include_str!("../../migrations/redis/v1.lua"),
        ],
    );
    let epoch = redis_cli(primary_port, &["get", "{sse}:epoch"]);
    let appended = redis_cli(
        primary_port,
        &[
            "evalsha",
            &sha,
            "1",
            "{sse}:log",
            "append",
            &epoch,
            "1000000",
            "86400000",
            "1000",
            "1",
            "1",
            "message",
            "held",
            r#"{"n":1}"#,
            "",
            "",
        ],
    );
    assert_eq!(appended, "2", "the script stored the event as 2");
    assert!(
        live.next_event_within(Duration::from_millis(2500))
            .await
            .is_none(),
        "an event no replica has is not delivered"
    );
    // Not after the tail reconnects either (it resyncs from a snapshot
    // whose head includes the event).
    let killed = redis_cli(primary_port, &["client", "kill", "type", "normal"]);
    assert_ne!(killed, "0", "the gateway's connections were dropped");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        live.next_event_within(Duration::from_millis(200))
            .await
            .is_none(),
        "an event no replica has is not delivered after a reconnect"
    );
    let mut replay = SseReader::connect(&client, &nodes[0].url("/topics/held"), Some("0")).await;
    assert_eq!(
        replay
            .next_event_within(Duration::from_millis(300))
            .await
            .map(|e| seq_of(&e.id)),
        Some(1)
    );
    assert!(
        replay
            .next_event_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nor readable by a replay"
    );
    // Nor on a node opening the log now (its replicas cannot confirm).
    let late = gateways(work.path(), &config, 1);
    let mut replay = SseReader::connect(&client, &late[0].url("/topics/held"), Some("0")).await;
    assert_eq!(
        replay.next_event_within(WAIT).await.map(|e| seq_of(&e.id)),
        Some(1)
    );
    assert!(
        replay
            .next_event_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nor readable on a node opened meanwhile"
    );
    let mut late_live =
        SseReader::connect(&client, &late[0].url("/topics/held"), Some(&event.id)).await;

    // The replica gets it; nobody publishes: the idle writer confirms it.
    link.thaw();
    let event = live
        .next_event_within(Duration::from_secs(5))
        .await
        .expect("the event is delivered once replicated, without another publish");
    assert_eq!((seq_of(&event.id), event.data.as_str()), (2, r#"{"n":1}"#));
    let event = late_live
        .next_event_within(Duration::from_secs(5))
        .await
        .expect("the late node delivers it too");
    assert_eq!((seq_of(&event.id), event.data.as_str()), (2, r#"{"n":1}"#));
    let marker = redis_cli(primary_port, &["hget", "{sse}:r", "seq"]);
    assert_eq!(marker, "2", "a commit marker covers it");
}
