//! The Redis backend across nodes (API.md guarantees with publishers and
//! subscribers on different gateways): real `redis-server` processes on free
//! loopback ports in temp dirs (`appendonly yes`, `appendfsync always`) and
//! real gateway processes pointed at them. `redis-server` and `redis-cli`
//! must be installed (`scripts/test.sh` installs Debian's `redis-server`);
//! without them these tests fail, they never skip.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::*;

pub(crate) const SECRET: &str = "redis-tests-secret-0123456789abcdefghijkl";

pub(crate) fn require(binary: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let path = Path::new(dir).join(binary);
        if path.is_file() {
            return path;
        }
    }
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let path = Path::new(dir).join(binary);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "{binary} is not installed: the Redis backend tests need it. \
         Run `bash scripts/test.sh` (installs Debian's redis-server) or `apt-get install redis-server`."
    );
}

/// One `redis-server` process on a loopback port, data in a temp dir.
pub(crate) struct RedisServer {
    child: Option<Child>,
    pub(crate) port: u16,
    dir: TempDir,
    args: Vec<String>,
}

impl RedisServer {
    /// A durable server: AOF with an fsync before every reply.
    pub(crate) fn start() -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    pub(crate) fn start_with(extra: &[&str]) -> Self {
        let dir = TempDir::new().expect("tempdir");
        let mut server = Self {
            child: None,
            port: free_port(),
            dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn(true);
        server
    }

    /// Starts `redis-server` on `self.port`. The port was free when picked
    /// but released since, so another process may have taken it (or, in
    /// cluster mode, its bus port +10000): a first start then moves to
    /// another port (`may_move`); a restart must keep its port and waits
    /// for it.
    fn spawn(&mut self, may_move: bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match spawn_redis(self.port, self.dir.path(), &self.args) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "redis-server did not start on port {}: {why}",
                        self.port
                    );
                    if may_move {
                        self.port = free_port();
                    } else {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: with `appendfsync always` nothing acknowledged is lost.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and directory.
    fn restart(&mut self) {
        self.kill();
        self.spawn(false);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new(require("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.trim().to_owned()
}

/// Spawns `redis-server` on `port` with its data in `dir` (plus `args`) and
/// waits until it answers: it, not another server that took the port since
/// it was picked (`CONFIG GET dir` must be `dir`). `Err` when it exited (its
/// port, or its cluster bus port, was taken) or did not answer in 10 s.
pub(crate) fn spawn_redis(port: u16, dir: &Path, args: &[String]) -> Result<Child, String> {
    let mut child = Command::new(require("redis-server"))
        .arg("--port")
        .arg(port.to_string())
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--protected-mode",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn redis-server: {e}"))?;
    let own_dir = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited ({status}): its port is taken"));
        }
        let answer = redis_cli(port, &["config", "get", "dir"]);
        if answer.lines().any(|line| Path::new(line.trim()) == own_dir) {
            return Ok(child);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "no answer from our redis-server in 10 s (last: {answer})"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a gateway config for the Redis backend.
pub(crate) fn redis_config(dir: &Path, storage: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("config-{}.toml", free_port()));
    let text =
        format!("[storage]\n{storage}\n[stream]\nretry_ms = 250\nheartbeat_ms = 1000\n{extra}");
    std::fs::write(&path, text).expect("write config");
    path
}

pub(crate) fn single(url: &str) -> String {
    format!("backend = \"redis\"\nurl = \"{url}\"\ncommand_timeout_ms = 2000")
}

/// `n` gateway processes sharing `config`.
pub(crate) fn gateways(dir: &Path, config: &Path, n: usize) -> Vec<GatewayProcess> {
    (0..n)
        .map(|i| {
            let data = dir.join(format!("unused-data-{i}"));
            GatewayProcess::start_with_config(&data, "127.0.0.1:0", Some(config), &[])
        })
        .collect()
}

pub(crate) async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Value,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("publish request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn publish_to(
    client: &reqwest::Client,
    node: &GatewayProcess,
    topic: &str,
    data: Value,
) -> String {
    let (status, answer) = post(
        client,
        &node.url(&format!("/topics/{topic}")),
        json!({ "data": data }),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "publish answered {answer}");
    answer["id"].as_str().expect("id").to_owned()
}

async fn status_of(client: &reqwest::Client, url: &str) -> Option<StatusCode> {
    client.get(url).send().await.ok().map(|r| r.status())
}

async fn wait_status(client: &reqwest::Client, url: &str, want: StatusCode) {
    eventually(&format!("{url} answers {want}"), || async move {
        status_of(client, url).await == Some(want)
    })
    .await;
}

/// Reads `n` events and checks ids and data.
async fn expect_events(reader: &mut SseReader, ids: &[String], what: &str) {
    let events = reader.take(ids.len()).await;
    let got: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let want: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(got, want, "{what}: every event once, in id order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_event_published_on_one_node_reaches_every_other_node_once_in_order() {
    let redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(dir.path(), &single(&redis.url()), "");
    let nodes = gateways(dir.path(), &config, 3);
    let client = reqwest::Client::new();
    let mut on_b = SseReader::connect(&client, &nodes[1].url("/topics/t"), None).await;
    let mut on_c =
        SseReader::connect(&client, &nodes[2].url("/events?topic=t&topic=u"), None).await;
    on_b.until_blocks(2).await;
    on_c.until_blocks(2).await;

    let mut t_ids = Vec::new();
    let mut tu_ids = Vec::new();
    for i in 0..30 {
        // Publishers on A and C, single and multi-topic events.
        let node = &nodes[if i % 3 == 0 { 2 } else { 0 }];
        let id = if i % 2 == 0 {
            publish_to(&client, node, "t", json!({ "i": i })).await
        } else {
            let (status, answer) = post(
                &client,
                &node.url("/publish"),
                json!({"topics": ["t", "u"], "data": { "i": i }}),
                None,
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{answer}");
            answer["id"].as_str().unwrap().to_owned()
        };
        t_ids.push(id.clone());
        tu_ids.push(id);
    }
    let u_only = publish_to(&client, &nodes[0], "u", json!("u only")).await;
    tu_ids.push(u_only);
    assert!(
        t_ids.windows(2).all(|w| seq_of(&w[1]) == seq_of(&w[0]) + 1),
        "one id sequence across nodes: {t_ids:?}"
    );
    expect_events(&mut on_b, &t_ids, "node B, /topics/t").await;
    expect_events(
        &mut on_c,
        &tu_ids,
        "node C, /events t+u (multi-topic events once)",
    )
    .await;
    on_b.expect_no_event(Duration::from_millis(300)).await;
    on_c.expect_no_event(Duration::from_millis(300)).await;

    // Every node reports the same topic state.
    for node in &nodes {
        let url = node.url("/topics/t/info");
        eventually("info converges", || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let info: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
                info["count"] == 30
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_resumes_on_another_node_with_no_gap_and_no_duplicate() {
    let redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(dir.path(), &single(&redis.url()), "");
    let nodes = gateways(dir.path(), &config, 3);
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(publish_to(&client, &nodes[i % 2], "r", json!(i)).await);
    }
    let mut first = SseReader::connect(&client, &nodes[0].url("/topics/r"), Some("0")).await;
    let seen = first.take(7).await;
    drop(first);
    let last = seen.last().unwrap().id.clone();

    // The client's node died; it comes back to B with its Last-Event-ID.
    let mut resumed = SseReader::connect(&client, &nodes[1].url("/topics/r"), Some(&last)).await;
    expect_events(&mut resumed, &ids[7..], "resume on node B").await;
    resumed.expect_no_event(Duration::from_millis(200)).await;
    assert!(
        !String::from_utf8_lossy(&resumed.raw).contains("reset"),
        "a valid id of the shared log never resets"
    );

    // An id acknowledged through A, resumed on C right away: C may not have
    // seen it yet, and still must not call it "ahead of the log".
    let fresh = publish_to(&client, &nodes[0], "r", json!("fresh")).await;
    let mut at_c = SseReader::connect(&client, &nodes[2].url("/topics/r"), Some(&fresh)).await;
    let next = publish_to(&client, &nodes[1], "r", json!("next")).await;
    let event = at_c.next_event().await;
    assert_eq!(
        (event.id.as_str(), event.event.as_str()),
        (next.as_str(), "message")
    );

    // Reset semantics are the same: another epoch is an unknown id.
    let mut bad = SseReader::connect(&client, &nodes[2].url("/topics/r"), Some("Zz9-3")).await;
    let reset = bad.next_event().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.json()["reason"], "unknown_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_answers_503_then_resumes_with_nothing_lost() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(dir.path(), &single(&redis.url()), "");
    let nodes = gateways(dir.path(), &config, 2);
    let client = reqwest::Client::new();
    let mut live = SseReader::connect(&client, &nodes[1].url("/topics/r"), None).await;
    live.until_blocks(2).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(publish_to(&client, &nodes[0], "r", json!(i)).await);
    }

    redis.kill();
    for node in &nodes {
        wait_status(
            &client,
            &node.url("/readyz"),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
    }
    let (status, answer) = post(
        &client,
        &nodes[0].url("/topics/r"),
        json!({"data": "lost?"}),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable");
    // A failed write cannot know whether Redis applied it: the answer must
    // not promise that nothing was stored.
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("may or may not have been stored"),
        "{answer}"
    );

    redis.restart();
    for node in &nodes {
        wait_status(&client, &node.url("/readyz"), StatusCode::OK).await;
    }
    for i in 10..20 {
        ids.push(publish_to(&client, &nodes[0], "r", json!(i)).await);
    }
    // The open stream stayed open and continues without gap or duplicate.
    expect_events(&mut live, &ids, "stream open across the Redis restart").await;
    live.expect_no_event(Duration::from_millis(300)).await;
    assert!(!live.ended);
    // And the refused publish stored nothing.
    let mut replay = SseReader::connect(&client, &nodes[1].url("/topics/r"), Some("0")).await;
    let mut events = Vec::new();
    while let Some(event) = replay.next_event_within(WAIT).await {
        events.push(event);
        if events.len() == 20 {
            break;
        }
    }
    assert_eq!(
        events.len(),
        20,
        "replay after the restart: {} / {:?}",
        String::from_utf8_lossy(&replay.raw),
        nodes[1].log.lock().unwrap()
    );
    assert!(events.iter().all(|e| e.data != "\"lost?\""));
    replay.expect_no_event(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_lost_its_data_is_detected_and_writes_are_refused() {
    // No persistence at all: a restart comes back empty.
    let mut redis = RedisServer::start_with(&["--appendonly", "no"]);
    let dir = TempDir::new().unwrap();
    let config = redis_config(dir.path(), &single(&redis.url()), "");
    let node = gateways(dir.path(), &config, 1).remove(0);
    let client = reqwest::Client::new();
    let id = publish_to(&client, &node, "r", json!(1)).await;
    redis.restart();
    let readyz = node.url("/readyz");
    wait_status(&client, &readyz, StatusCode::SERVICE_UNAVAILABLE).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status_of(&client, &readyz).await,
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "stays unready: ids of the old epoch must never be reused"
    );
    let (status, _) = post(&client, &node.url("/topics/r"), json!({"data": 2}), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let log = node.log.lock().unwrap().join("\n");
    assert!(log.contains("lost its data"), "the gateway says why: {log}");
    assert_eq!(seq_of(&id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_kill_9_of_a_gateway_under_load_loses_no_acknowledged_event() {
    let redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(dir.path(), &single(&redis.url()), "");
    let mut nodes = gateways(dir.path(), &config, 2);
    let survivor = nodes.pop().unwrap();
    let victim = nodes.pop().unwrap();
    let client = reqwest::Client::new();
    let publishers = AckingPublishers::start(&client, &victim.base, "crash", 6);
    publishers.wait_for(200).await;
    victim.kill9();
    let acked = publishers.stop().await;

    // Its clients come back to the survivor and find every acknowledged event.
    let previous = assert_every_acked_event_replays(&client, &survivor.base, "crash", &acked).await;
    let next = publish_to(&client, &survivor, "crash", json!("after")).await;
    assert!(seq_of(&next) > previous, "no id is reused");
}

/// A 3-primary Redis Cluster on loopback.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl Cluster {
    pub(crate) fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new(require("redis-cli"))
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !redis_cli(node.port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cluster did not become ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// The `[storage]` lines of a gateway on this cluster.
    pub(crate) fn storage(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!(
            "backend = \"redis-cluster\"\ncluster_urls = [{}]\ncommand_timeout_ms = 3000",
            urls.join(", ")
        )
    }

    /// The node (index) serving `key`'s slot.
    fn owner_of(&self, key: &str) -> usize {
        let owners: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| redis_cli(self.nodes[i].port, &["exists", key]) == "1")
            .collect();
        assert_eq!(
            owners.len(),
            1,
            "{key} lives on exactly one node: {owners:?}"
        );
        owners[0]
    }

    /// The node serving `key`'s slot (the one that does not answer MOVED).
    fn slot_node(&self, key: &str) -> usize {
        let owners: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !redis_cli(self.nodes[i].port, &["get", key]).contains("MOVED"))
            .collect();
        assert_eq!(owners.len(), 1, "one node serves the slot of {key}");
        owners[0]
    }
}

pub(crate) fn token(org: &str) -> String {
    org_token(SECRET, org)
}

pub(crate) async fn subscribe_as(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    last: Option<&str>,
) -> SseReader {
    let mut request = client.get(url).bearer_auth(token);
    if let Some(id) = last {
        request = request.header("last-event-id", id);
    }
    SseReader::from_response(request.send().await.expect("subscribe"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_spreads_orgs_over_shards_and_keeps_them_isolated() {
    let cluster = Cluster::start();
    // Two orgs whose logs hash to different primaries.
    let org_a = "acme".to_owned();
    let node_a = cluster.slot_node(&format!("{{sse:org:{org_a}}}:log"));
    let org_b = (0..200)
        .map(|i| format!("org{i}"))
        .find(|o| cluster.slot_node(&format!("{{sse:org:{o}}}:log")) != node_a)
        .expect("an org on another shard");
    let dir = TempDir::new().unwrap();
    let storage = cluster.storage();
    let extra = format!("[auth]\nhs256_secret = \"{SECRET}\"\n[tenancy]\nenabled = true\n");
    let config = redis_config(dir.path(), &storage, &extra);
    let nodes = gateways(dir.path(), &config, 2);
    let client = reqwest::Client::new();
    let (ta, tb) = (token(&org_a), token(&org_b));

    let mut sub_a = subscribe_as(&client, &nodes[1].url("/topics/projects:all"), &ta, None).await;
    let mut sub_b = subscribe_as(&client, &nodes[1].url("/topics/projects:all"), &tb, None).await;
    sub_a.until_blocks(2).await;
    sub_b.until_blocks(2).await;
    let mut ids_a = Vec::new();
    let mut ids_b = Vec::new();
    for i in 0..5 {
        for (token, ids, org) in [(&ta, &mut ids_a, &org_a), (&tb, &mut ids_b, &org_b)] {
            let (status, answer) = post(
                &client,
                &nodes[0].url("/topics/projects:all"),
                json!({"data": {"org": org, "i": i}}),
                Some(token),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{answer}");
            ids.push(answer["id"].as_str().unwrap().to_owned());
        }
    }
    assert_ne!(
        epoch_of(&ids_a[0]),
        epoch_of(&ids_b[0]),
        "each org has its own log"
    );
    for (sub, ids, org) in [(&mut sub_a, &ids_a, &org_a), (&mut sub_b, &ids_b, &org_b)] {
        let events = sub.take(5).await;
        assert_eq!(
            events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
            *ids
        );
        assert!(
            events.iter().all(|e| e.json()["org"] == json!(org)),
            "only its own org's events"
        );
        sub.expect_no_event(Duration::from_millis(300)).await;
    }
    // An id of one org's log means nothing in the other's.
    let mut cross = subscribe_as(
        &client,
        &nodes[1].url("/topics/projects:all"),
        &tb,
        Some(&ids_a[4]),
    )
    .await;
    let reset = cross.next_event().await;
    assert_eq!(
        (reset.event.as_str(), reset.json()["reason"].clone()),
        ("reset", json!("unknown_id"))
    );
    // Resume on the other node, within the org.
    let mut resumed = subscribe_as(
        &client,
        &nodes[0].url("/topics/projects:all"),
        &ta,
        Some(&ids_a[1]),
    )
    .await;
    assert_eq!(
        resumed
            .take(3)
            .await
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        ids_a[2..]
    );
    // The two orgs' logs live on different primaries.
    let shard_a = cluster.owner_of(&format!("{{sse:org:{org_a}}}:log"));
    let shard_b = cluster.owner_of(&format!("{{sse:org:{org_b}}}:log"));
    assert_ne!(shard_a, shard_b, "orgs spread over shards");
    // Nothing of either org in the other's keys.
    let keys_a = redis_cli(cluster.nodes[shard_a].port, &["keys", "*"]);
    assert!(!keys_a.contains(&format!("org:{org_b}}}")), "{keys_a}");
    let seen: HashSet<&str> = ids_a.iter().chain(&ids_b).map(String::as_str).collect();
    assert_eq!(seen.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_retention_resets_are_the_same_on_every_node() {
    let redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(
        dir.path(),
        &single(&redis.url()),
        "[retention]\nmax_events_per_topic = 3\n",
    );
    let nodes = gateways(dir.path(), &config, 2);
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(publish_to(&client, &nodes[0], "k", json!(i)).await);
    }
    // The trim happened inside the append script; B learns it from the log.
    let info_url = nodes[1].url("/topics/k/info");
    let first = ids[3].clone();
    eventually("B sees the trimmed topic", || {
        let (client, url, first) = (client.clone(), info_url.clone(), first.clone());
        async move {
            let info: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
            info["count"] == 3 && info["first_id"] == json!(first)
        }
    })
    .await;
    let mut behind = SseReader::connect(&client, &nodes[1].url("/topics/k"), Some(&ids[0])).await;
    let reset = behind.next_event().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id, ids[2], "continues from the trimmed watermark");
    let data = reset.json();
    assert_eq!(data["reason"], "retention");
    assert_eq!(data["requested"], json!(ids[0]));
    assert_eq!(data["oldest"], json!(ids[3]));
    expect_events(
        &mut behind,
        &ids[3..],
        "the retained events after the reset",
    )
    .await;
    // Everything ("0") never resets; an id at the watermark resumes cleanly.
    let mut all = SseReader::connect(&client, &nodes[1].url("/topics/k"), Some("0")).await;
    expect_events(&mut all, &ids[3..], "replay of all retained history").await;
    assert!(!String::from_utf8_lossy(&all.raw).contains("reset"));
    let mut at_mark = SseReader::connect(&client, &nodes[0].url("/topics/k"), Some(&ids[2])).await;
    expect_events(&mut at_mark, &ids[3..], "resume at the watermark").await;
    assert!(!String::from_utf8_lossy(&at_mark.raw).contains("reset"));
}

/// `redis+unix://`: two gateways share a Redis reached over a unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_a_unix_socket_serves_two_nodes() {
    let socket_dir = TempDir::new().unwrap();
    let socket = socket_dir.path().join("redis.sock");
    let socket_text = socket.to_str().unwrap().to_owned();
    let redis = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--unixsocket",
        &socket_text,
        "--unixsocketperm",
        "700",
    ]);
    let dir = TempDir::new().unwrap();
    let config = redis_config(
        dir.path(),
        &single(&format!("redis+unix://{socket_text}")),
        "",
    );
    let nodes = gateways(dir.path(), &config, 2);
    let client = reqwest::Client::new();
    let mut on_b = SseReader::connect(&client, &nodes[1].url("/topics/sock"), Some("0")).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(publish_to(&client, &nodes[0], "sock", json!({ "i": i })).await);
    }
    expect_events(&mut on_b, &ids, "node B over the unix socket").await;
    // The events really are in the Redis behind the socket (also reachable over TCP here).
    let keys = redis_cli(redis.port, &["--scan", "--pattern", "*"]);
    assert!(keys.contains(":log"), "log stream stored in Redis: {keys}");
}

/// Issue 14: `/readyz` is `200` only when the next publish would be stored.
/// Redis restarts while nobody publishes (so no failed publish has replaced
/// the writer's connection): once ready again, the very next publish on every
/// node must be stored. After a `FLUSHALL` the log is gone: readiness stays
/// red and the answer says a restart, not a retry, is what helps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_after_a_redis_restart_means_the_next_publish_is_stored() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(dir.path(), &single(&redis.url()), "");
    let nodes = gateways(dir.path(), &config, 2);
    let client = reqwest::Client::new();
    for node in &nodes {
        publish_to(&client, node, "r", json!("before")).await;
    }

    redis.restart();
    for node in &nodes {
        wait_status(
            &client,
            &node.url("/readyz"),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
    }
    for node in &nodes {
        wait_status(&client, &node.url("/readyz"), StatusCode::OK).await;
        // First try, no retry: ready meant it.
        publish_to(&client, node, "r", json!("after")).await;
    }

    redis_cli(redis.port, &["FLUSHALL"]);
    let (status, answer) = loop {
        let (status, answer) = post(
            &client,
            &nodes[0].url("/topics/r"),
            json!({"data": "lost?"}),
            None,
        )
        .await;
        if status != StatusCode::CREATED {
            break (status, answer);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("restart the gateways"), "{answer}");
    wait_status(
        &client,
        &nodes[0].url("/readyz"),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
}

/// POSTs `body` to `url` with `Idempotency-Key: key`: (status, replayed, body).
async fn post_keyed(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: Value,
) -> (StatusCode, bool, Value) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .await
        .expect("publish request");
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_key_used_on_one_node_replays_on_another_and_stores_once_under_a_race() {
    let redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(dir.path(), &single(&redis.url()), "");
    let nodes = gateways(dir.path(), &config, 2);
    let client = reqwest::Client::new();
    let (a, b) = (nodes[0].url("/topics/t"), nodes[1].url("/topics/t"));

    let (status, replayed, first) = post_keyed(&client, &a, "k", json!({"data": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert!(!replayed);
    let (status, replayed, again) = post_keyed(&client, &b, "k", json!({"data": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert!(replayed, "node B replays node A's key");
    assert_eq!(again, first);
    let (status, _, reused) = post_keyed(&client, &b, "k", json!({"data": 2})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reused}");
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");

    // One key sent to both nodes at once, many times: stored once.
    let racers = (0..16).map(|i| {
        let url = if i % 2 == 0 { a.clone() } else { b.clone() };
        let client = client.clone();
        async move { post_keyed(&client, &url, "race", json!({"data": "r"})).await }
    });
    let answers = futures_util::future::join_all(racers).await;
    let ids: HashSet<String> = answers
        .iter()
        .map(|(status, _, body)| {
            assert_eq!(*status, StatusCode::CREATED, "{body}");
            body["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        answers.iter().filter(|(_, r, _)| !r).count(),
        1,
        "one stored"
    );

    // A batch through node B: a replayed item and a new one; then the whole batch again on A.
    let batch = json!({"events": [
        {"topics": ["t"], "data": 1, "idempotency_key": "k"},
        {"topics": ["u"], "data": 3, "idempotency_key": "k3"},
    ]});
    let (status, replayed, mixed) = post_keyed(
        &client,
        &nodes[1].url("/publish/batch"),
        "unused",
        batch.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{mixed}");
    assert!(!replayed);
    assert_eq!(mixed["ids"][0], first["id"]);
    let (status, replayed, whole) =
        post_keyed(&client, &nodes[0].url("/publish/batch"), "unused", batch).await;
    assert_eq!(status, StatusCode::CREATED, "{whole}");
    assert!(replayed);
    assert_eq!(whole, mixed);

    // The keys live in the log's hash tag, with the window as their TTL.
    let ttl: i64 = redis_cli(redis.port, &["PTTL", "{sse}:i::k"])
        .parse()
        .unwrap();
    assert!(ttl > 86_000_000 && ttl <= 86_400_000, "TTL {ttl}");
    for node in &nodes {
        let url = node.url("/topics/t/info");
        eventually("t holds 2 events on every node", || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let info: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
                info["count"] == 2
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_expire_with_the_window_and_then_store_anew() {
    let redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let config = redis_config(
        dir.path(),
        &single(&redis.url()),
        "[publish]\nidempotency_window_s = 1\n",
    );
    let nodes = gateways(dir.path(), &config, 1);
    let client = reqwest::Client::new();
    let url = nodes[0].url("/topics/t");
    let (status, _, first) = post_keyed(&client, &url, "short", json!({"data": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (_, replayed, _) = post_keyed(&client, &url, "short", json!({"data": 1})).await;
    assert!(replayed, "within the window");
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(
        redis_cli(redis.port, &["EXISTS", "{sse}:i::short"]),
        "0",
        "expired by its TTL"
    );
    let (status, replayed, later) = post_keyed(&client, &url, "short", json!({"data": 2})).await;
    assert_eq!(status, StatusCode::CREATED, "{later}");
    assert!(!replayed);
    assert_ne!(later["id"], first["id"]);
}

/// The harness itself: a port picked free but taken since by another
/// server is noticed (the test would otherwise talk to the wrong Redis).
#[test]
fn a_redis_port_taken_by_another_server_is_not_mistaken_for_ours() {
    let other = RedisServer::start();
    let dir = TempDir::new().expect("tempdir");
    let refused = spawn_redis(other.port, dir.path(), &[]).expect_err("the port is taken");
    assert!(refused.contains("exited"), "{refused}");
    // A first start moves to another port instead.
    let mut moved = RedisServer {
        child: None,
        port: other.port,
        dir,
        args: Vec::new(),
    };
    moved.spawn(true);
    assert_ne!(moved.port, other.port);
    assert_eq!(redis_cli(moved.port, &["ping"]), "PONG");
}
