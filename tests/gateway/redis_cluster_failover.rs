//! Redis Cluster failover under load: three primaries with one replica each
//! (`cluster-node-timeout 1000`, AOF `always`) on loopback, two gateways
//! with `backend = "redis-cluster"` and `wait_replicas = 1`. The primary
//! that owns the log's slot is replaced while publishers run, either
//! gracefully (`CLUSTER FAILOVER` on its replica) or by `kill -9` (the
//! cluster promotes the replica after the node timeout). The gateways must
//! follow the new owner of the slot without a restart: every acknowledged
//! event is present exactly once and in order, every stream (one open
//! across the failover, one resumed with `Last-Event-ID` after it) saw each
//! acknowledged event once, in order, with no gap and nothing un-said, and
//! `/readyz` is 200 again on its own. The test prints how long each step
//! took and the connections each cluster node holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tempfile::TempDir;

use crate::common::*;
use crate::redis::{gateways, redis_cli, redis_config, require};
use crate::redis_sentinel::{
    assert_stream_matches_log, data_server, log_of, read_into, wait_followed, wait_until, Proc,
};

/// How long the gateways may take to follow a failover.
const FAILOVER_BOUND: Duration = Duration::from_secs(15);
/// The log's stream key without tenancy (one slot).
const LOG_KEY: &str = "{sse}:log";

/// Six `redis-server`s in cluster mode: three primaries, a replica each.
struct ReplicatedCluster {
    /// Per node: its process (taken when killed) and port.
    nodes: Vec<(Option<Proc>, u16)>,
    /// Every node's arguments.
    args: Vec<String>,
    _dirs: Vec<TempDir>,
}

impl ReplicatedCluster {
    fn start() -> Self {
        let dirs: Vec<TempDir> = (0..6).map(|_| TempDir::new().unwrap()).collect();
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "1000",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        .map(String::from)
        .to_vec();
        let nodes: Vec<(Option<Proc>, u16)> = dirs
            .iter()
            .map(|d| {
                let (proc, port) = data_server(d.path(), &args);
                (Some(proc), port)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect();
        let output = std::process::Command::new(require("redis-cli"))
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self {
            nodes,
            args,
            _dirs: dirs,
        };
        cluster.wait_ok(Duration::from_secs(20));
        // Every replica has synced: a failover can happen.
        for (_, port) in &cluster.nodes {
            wait_until("replicas to sync", Duration::from_secs(20), || {
                let role = redis_cli(*port, &["role"]);
                role.starts_with("master") || role.contains("connected")
            });
        }
        cluster
    }

    /// Waits until every live node says the cluster is ok.
    fn wait_ok(&self, bound: Duration) -> Duration {
        wait_until("the cluster to be ok", bound, || {
            self.nodes
                .iter()
                .filter(|(p, _)| p.is_some())
                .all(|(_, port)| {
                    redis_cli(*port, &["cluster", "info"]).contains("cluster_state:ok")
                })
        })
    }

    /// The port of the primary serving `key`'s slot now (the live node
    /// that is a master and does not answer MOVED).
    fn owner(&self, key: &str) -> u16 {
        let owners: Vec<u16> = self
            .nodes
            .iter()
            .filter(|(p, _)| p.is_some())
            .map(|(_, port)| *port)
            .filter(|port| {
                redis_cli(*port, &["role"]).starts_with("master")
                    && !redis_cli(*port, &["exists", key]).contains("MOVED")
            })
            .collect();
        assert_eq!(owners.len(), 1, "one primary serves {key}: {owners:?}");
        owners[0]
    }

    /// The replicas of the primary on `primary`.
    fn replicas_of(&self, primary: u16) -> Vec<u16> {
        let replicas: Vec<u16> = self
            .nodes
            .iter()
            .filter(|(p, _)| p.is_some())
            .map(|(_, port)| *port)
            .filter(|port| {
                let role = redis_cli(*port, &["role"]);
                let lines: Vec<&str> = role.lines().collect();
                lines.first() == Some(&"slave") && lines.get(2) == Some(&&*primary.to_string())
            })
            .collect();
        assert!(!replicas.is_empty(), "{primary} has a replica");
        replicas
    }

    /// Adds a node as another replica of the primary on `primary` (so its
    /// shard keeps a replica for `WAIT` once one is promoted).
    fn add_replica(&mut self, primary: u16) {
        let dir = TempDir::new().unwrap();
        let (proc, port) = data_server(dir.path(), &self.args);
        self._dirs.push(dir);
        self.nodes.push((Some(proc), port));
        let id = redis_cli(primary, &["cluster", "myid"]);
        redis_cli(
            port,
            &["cluster", "meet", "127.0.0.1", &primary.to_string()],
        );
        wait_until(
            "the new node to know the primary",
            Duration::from_secs(10),
            || redis_cli(port, &["cluster", "nodes"]).contains(&id),
        );
        assert_eq!(redis_cli(port, &["cluster", "replicate", &id]), "OK");
        wait_until("the new replica to sync", Duration::from_secs(10), || {
            redis_cli(port, &["info", "replication"]).contains("master_link_status:up")
        });
        self.wait_ok(Duration::from_secs(10));
    }

    /// `kill -9` of the node on `port`.
    fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|(_, p)| *p == port);
        if let Some((proc, _)) = node {
            drop(proc.take());
        }
    }

    /// Per live node: its role and how many client connections it holds
    /// (replication links and redis-cli itself left out).
    fn connections(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(p, _)| p.is_some())
            .map(|(_, port)| {
                let role = redis_cli(*port, &["role"]);
                let role = role.lines().next().unwrap_or("?").to_owned();
                let clients = redis_cli(*port, &["client", "list"])
                    .lines()
                    .filter(|l| {
                        !l.contains("cmd=client|list")
                            && !l.contains("flags=S")
                            && !l.contains("flags=M")
                    })
                    .count();
                format!("{port} {role}: {clients}")
            })
            .collect()
    }
}

/// How the owner of the log's slot goes away.
#[derive(Clone, Copy, Debug)]
enum Failover {
    /// `CLUSTER FAILOVER` on its replica (graceful, no write lost).
    Graceful,
    /// `kill -9`; the cluster promotes the replica after the node timeout.
    Kill,
}

fn cluster_storage(ports: &[u16]) -> String {
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("\"redis://127.0.0.1:{p}\""))
        .collect();
    format!(
        "backend = \"redis-cluster\"\ncluster_urls = [{}]\ncommand_timeout_ms = 2000\n\
         wait_replicas = 1\nwait_timeout_ms = 1000",
        urls.join(", ")
    )
}

async fn failover_under_load(how: Failover) {
    let mut cluster = ReplicatedCluster::start();
    let work = TempDir::new().unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|(_, p)| *p).collect();
    let config = redis_config(work.path(), &cluster_storage(&ports), "");
    let nodes = gateways(work.path(), &config, 2);
    let client = reqwest::Client::new();
    let owner = cluster.owner(LOG_KEY);
    if matches!(how, Failover::Kill) {
        // With one replica, the promoted primary would have none left to
        // acknowledge `WAIT`: its shard gets a second one.
        cluster.add_replica(owner);
    }
    let replicas = cluster.replicas_of(owner);
    let before_conns = cluster.connections();

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

    // First a primary of another shard dies, and its shard is left without
    // a replica: this log's `WAIT` goes to its own slot's primary only, so
    // its publishes go on being acknowledged, before and after the failover
    // of its own slot (which makes the gateways' cluster clients refresh
    // their view of the cluster, and see the shard without a replica).
    let mut other_shard = String::new();
    if matches!(how, Failover::Kill) {
        let other = tokio::task::block_in_place(|| {
            let other = cluster
                .nodes
                .iter()
                .filter(|(p, _)| p.is_some())
                .map(|(_, port)| *port)
                .find(|&p| p != owner && redis_cli(p, &["role"]).starts_with("master"))
                .expect("another primary");
            let other_replica = cluster.replicas_of(other)[0];
            cluster.kill(other);
            wait_until(
                "the other shard's replica to be promoted",
                FAILOVER_BOUND,
                || redis_cli(other_replica, &["role"]).starts_with("master"),
            );
            cluster.wait_ok(FAILOVER_BOUND);
            other
        });
        let killed = Instant::now();
        let after = publishers.acked();
        while publishers.acked() < after + 50 {
            assert!(
                killed.elapsed() < FAILOVER_BOUND,
                "publishes not acknowledged after the primary {other} of another shard died"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        other_shard = format!(
            "; primary {other} of another shard killed: 50 more acknowledged {:?} after its replica took over",
            killed.elapsed()
        );
    }

    let started = Instant::now();
    let mut replica = replicas[0];
    let promoted = tokio::task::block_in_place(|| {
        match how {
            Failover::Graceful => {
                let answer = redis_cli(replica, &["cluster", "failover"]);
                assert_eq!(answer, "OK", "CLUSTER FAILOVER accepted");
            }
            Failover::Kill => cluster.kill(owner),
        }
        wait_until("a replica to own the slot", FAILOVER_BOUND, || {
            replicas.iter().any(|&r| {
                replica = r;
                redis_cli(r, &["role"]).starts_with("master")
                    && !redis_cli(r, &["exists", LOG_KEY]).contains("MOVED")
            })
        })
    });
    drop_it.store(true, Ordering::SeqCst);
    resumed_task.await.expect("resumed reader");

    // The gateways follow without a restart: publishes acknowledged again.
    let (publishing, ready) = wait_followed(
        &format!("{how:?}"),
        &client,
        &nodes,
        &publishers,
        publishers.acked(),
        (started, FAILOVER_BOUND),
    )
    .await;

    let last_id = resumed_seen
        .lock()
        .unwrap()
        .last()
        .map(|e| e.id.clone())
        .expect("the resumed stream saw events before the failover");
    let resumed = SseReader::connect(&client, &nodes[0].url("/topics/fo"), Some(&last_id)).await;
    assert_eq!(resumed.status, StatusCode::OK);
    let resumed_task = read_into(resumed, Arc::clone(&resumed_seen), Arc::clone(&never));

    let acked = publishers.stop().await;
    assert!(acked.len() > before + 50);
    let newest = acked.keys().map(|id| seq_of(id)).max().unwrap_or(0);
    let mut last = 0;
    for node in &nodes {
        let info = node.url("/topics/fo/info");
        eventually("every node to deliver every acknowledged event", || async {
            let (_, info) = get_json(&client, &info).await;
            info["last_id"].as_str().map(seq_of).unwrap_or(0) >= newest
        })
        .await;
        last = assert_every_acked_event_replays(&client, &node.base, "fo", &acked).await;
    }
    // Exactly once: no acknowledged event stored twice (under two ids).
    let log = log_of(&client, &nodes[0].base, "fo").await;
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for data in log.values() {
        *copies.entry(data.as_str()).or_default() += 1;
    }
    for (id, data) in &acked {
        assert_eq!(copies.get(data.as_str()), Some(&1), "{id} stored once");
    }
    for (what, seen) in [
        ("the open stream", &live_seen),
        ("the resumed stream", &resumed_seen),
    ] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while seen.lock().unwrap().last().map(|e| seq_of(&e.id)) != Some(last) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{how:?}: {what} did not reach {last}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_stream_matches_log(what, &seen.lock().unwrap(), &log, &acked, last);
    }
    println!(
        "cluster failover ({how:?}): slot owner {owner} -> {replica} after {promoted:?}, \
         publishes acknowledged again after {publishing:?}, /readyz 200 on both nodes after \
         {ready:?} ({before} acknowledged before, {} in all{other_shard}); client connections per node \
         (2 gateways, 1 log) before: {before_conns:?}, after: {:?}",
        acked.len(),
        cluster.connections()
    );
    live_task.abort();
    resumed_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_graceful_failover_under_load_loses_no_acknowledged_event() {
    failover_under_load(Failover::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_kill_of_the_slot_owner_under_load_loses_no_acknowledged_event() {
    failover_under_load(Failover::Kill).await;
}
