//! Redis Sentinel failover under load: a primary, two replicas (so the
//! promoted one still has a replica for `WAIT`) and three Sentinels (`redis-server --sentinel`) on loopback, two gateways with
//! `backend = "redis-sentinel"` and `wait_replicas = 1`; the primary is
//! `kill -9`ed while publishers run, the Sentinels promote the replica, and
//! the gateways must follow it: publishes succeed and `/readyz` is `200`
//! again within a bound, every acknowledged event is present once and in
//! order on the new primary, and a stream open across the failover goes on
//! with no gap.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tempfile::TempDir;

use crate::common::*;
use crate::redis::{free_port, gateways, redis_cli, redis_config, require, spawn_redis};

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
fn data_server(dir: &Path, args: &[String]) -> (Proc, u16) {
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
fn wait_until(what: &str, bound: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < bound, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// A primary, two replicas and three Sentinels (quorum 2) on loopback, the
/// Sentinels agreeing and knowing both replicas (a failover can happen).
pub(crate) struct SentinelGroup {
    pub(crate) primary: Proc,
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
        let mut replica_args = aof.clone();
        replica_args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary_port.to_string(),
        ]);
        let replicas: Vec<(Proc, u16)> = (1..3)
            .map(|i| data_server(dirs[i].path(), &replica_args))
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
            replicas,
            sentinels,
            _dirs: dirs,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_sentinel_failover_under_load_loses_no_acknowledged_event() {
    let group = SentinelGroup::start();
    let primary = group.primary;
    let (replicas, sentinels) = (group.replicas, group.sentinels);

    let list: Vec<String> = sentinels
        .iter()
        .map(|(_, port)| format!("\"redis://127.0.0.1:{port}\""))
        .collect();
    let storage = format!(
        "backend = \"redis-sentinel\"\nsentinels = [{}]\nsentinel_master = \"{MASTER}\"\n\
         command_timeout_ms = 2000\nwait_replicas = 1\nwait_timeout_ms = 1000",
        list.join(", ")
    );
    let work = TempDir::new().unwrap();
    let config = redis_config(work.path(), &storage, "");
    let nodes = gateways(work.path(), &config, 2);
    let client = reqwest::Client::new();

    // A stream on the second node, open across the failover, read as it goes.
    let mut live = SseReader::connect(&client, &nodes[1].url("/topics/fo"), None).await;
    live.until_blocks(1).await;
    let seen: Arc<Mutex<Vec<SseEvent>>> = Arc::default();
    let reading = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while !live.ended {
                if let Some(event) = live.next_event_within(Duration::from_millis(200)).await {
                    seen.lock().unwrap().push(event);
                }
            }
        })
    };

    let publishers = AckingPublishers::start(&client, &nodes[0].base, "fo", 4);
    publishers.wait_for(200).await;
    let before = publishers.acked();

    // kill -9 of the primary, under load.
    let mut primary = primary;
    let _ = primary.0.kill();
    let _ = primary.0.wait();
    let killed = Instant::now();

    // The Sentinels promote a replica.
    let promoted = wait_until("a replica to be promoted", FAILOVER_BOUND, || {
        let named = redis_cli(
            sentinels[1].1,
            &["sentinel", "get-master-addr-by-name", MASTER],
        );
        replicas.iter().any(|(_, port)| {
            named.contains(&port.to_string()) && redis_cli(*port, &["role"]).starts_with("master")
        })
    });
    // The gateways follow it: publishes are acknowledged again, both ready.
    let after_kill = publishers.acked();
    let deadline = tokio::time::Instant::now() + FAILOVER_BOUND;
    while publishers.acked() < after_kill + 50 {
        if tokio::time::Instant::now() > deadline {
            let log: Vec<String> = nodes[0]
                .log
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(5)
                .cloned()
                .collect();
            panic!("publishes were not acknowledged again after the failover: {log:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publishing = killed.elapsed();
    for node in &nodes {
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
                killed.elapsed() < FAILOVER_BOUND,
                "/readyz not 200 again after the failover"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ready = killed.elapsed();
    println!(
        "sentinel failover: replica promoted {promoted:?} after kill -9, publishes acknowledged \
         again after {publishing:?}, /readyz 200 on both nodes after {ready:?} \
         ({before} acknowledged before the kill)"
    );
    assert!(ready < FAILOVER_BOUND);

    let acked = publishers.stop().await;
    assert!(acked.len() > before + 50);
    let mut last = 0;
    for node in &nodes {
        last = assert_every_acked_event_replays(&client, &node.base, "fo", &acked).await;
    }
    // The open stream got every stored event once, in order, with no gap.
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.lock().unwrap().last().map(|e| seq_of(&e.id)) != Some(last) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the open stream did not reach {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reading.abort();
    let seen = seen.lock().unwrap();
    let seqs: Vec<u64> = seen.iter().map(|e| seq_of(&e.id)).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "the open stream has no gap and no duplicate"
    );
    assert_eq!(seqs.first(), Some(&1), "the stream saw the first event");
    let epochs: std::collections::HashSet<&str> = seen.iter().map(|e| epoch_of(&e.id)).collect();
    assert_eq!(epochs.len(), 1, "one epoch across the failover");
}
