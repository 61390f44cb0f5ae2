//! Tailing by shard, not by org: with tenancy on Redis, a gateway's Redis
//! connections are bounded by the deployment (a few per Redis node), not by
//! the orgs it serves, and an org's log that goes idle is closed.
//!
//! Real `redis-server` processes (one server; a 3-primary Cluster), two real
//! gateway processes, 2,000 orgs each publishing and streaming through them;
//! `CLIENT LIST` on every Redis node counts the connections. Also: an idle
//! org log closes and reopens with no gap, and a renewed notification
//! subscription makes every tail catch up (through a loopback proxy that
//! silences, then cuts, the gateway's pub/sub connection).

use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tempfile::TempDir;

use crate::common::*;
use crate::redis::{
    gateways, post, redis_cli, redis_config, single, subscribe_as, token, Cluster, RedisServer,
    SECRET,
};

/// Orgs publishing and streaming at once.
const ORGS: usize = 2_000;
/// Events each org publishes (then one more, its end mark).
const ROUNDS: usize = 2;
/// Connections one gateway may hold on one Redis node: shared, reader,
/// `writer_connections` (2) and the subscriber, plus slack for one that is
/// being replaced.
const PER_GATEWAY: usize = 6;
/// Requests in flight at once from the test.
const PARALLEL: usize = 64;

/// Client connections on the Redis at `port` (not counting this `redis-cli`).
fn clients_on(port: u16) -> usize {
    redis_cli(port, &["client", "list"])
        .lines()
        .filter(|l| l.contains("addr="))
        .count()
        .saturating_sub(1)
}

/// Publishes with an `Idempotency-Key`, retrying a request the connection
/// lost (a kept-alive connection the server closed as it was reused): the
/// key makes the retry store nothing twice.
async fn publish_keyed(
    client: &reqwest::Client,
    url: &str,
    data: &serde_json::Value,
    token: &str,
    key: &str,
) -> (StatusCode, serde_json::Value) {
    let mut attempts = 0;
    loop {
        let sent = client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(data.to_string())
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status();
                return (status, response.json().await.unwrap_or_default());
            }
            Err(e) if attempts < 3 => {
                attempts += 1;
                eprintln!("{key}: {e}; retrying with the same key");
            }
            Err(e) => panic!("{key}: {e}"),
        }
    }
}

/// The gateway's `/metrics` value of `name` (a gauge without labels).
async fn gauge(client: &reqwest::Client, node: &GatewayProcess, name: &str) -> f64 {
    metric_value(&metrics_text(client, &node.base).await, name)
}

/// 2,000 orgs through 2 gateways on the Redis deployment `storage` whose
/// nodes listen on `ports`: each org streams from one gateway and publishes
/// through the other; every event arrives once, in order, at its own org's
/// stream only, and each Redis node holds a few connections per gateway.
async fn many_orgs(storage: &str, ports: &[u16]) {
    let dir = TempDir::new().unwrap();
    let storage = format!("{storage}\nwriter_connections = 2\nprobe_interval_ms = 1000");
    let extra = format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\n[tenancy]\nenabled = true\n\
         [limits]\nmax_connections_per_ip = 10000\n"
    );
    let config = redis_config(dir.path(), &storage, &extra);
    let nodes = gateways(dir.path(), &config, 2);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(PARALLEL)
        .build()
        .expect("client");
    let orgs: Vec<(String, String)> = (0..ORGS)
        .map(|i| {
            let org = format!("o{i}");
            let token = token(&org);
            (org, token)
        })
        .collect();
    let url = |i: usize, node: usize| nodes[(i + node) % 2].url("/topics/projects:all");
    // What the gateways warned about, for a failure message.
    let warnings = || -> Vec<String> {
        nodes
            .iter()
            .flat_map(|n| {
                let log = n.log.lock().expect("log lock");
                log.iter()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    };

    // Org i streams from gateway i % 2, from the start of its log.
    let started = std::time::Instant::now();
    let mut readers: Vec<SseReader> = stream::iter(0..ORGS)
        .map(|i| {
            let (client, url, token) = (&client, url(i, 0), &orgs[i].1);
            async move { subscribe_as(client, &url, token, Some("0")).await }
        })
        .buffered(PARALLEL)
        .collect()
        .await;
    eprintln!(
        "{ORGS} streams open after {:?}; Redis clients per node: {:?}",
        started.elapsed(),
        ports.iter().map(|&p| clients_on(p)).collect::<Vec<_>>()
    );

    // Each org publishes ROUNDS events through the other gateway, in order.
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); ORGS];
    for round in 0..=ROUNDS {
        let answers: Vec<(usize, String)> = stream::iter(0..ORGS)
            .map(|i| {
                let (client, url, (org, token)) = (&client, url(i, 1), &orgs[i]);
                let warnings = &warnings;
                async move {
                    let data = json!({ "data": { "org": org, "round": round } });
                    let key = format!("{org}-{round}");
                    let (status, answer) = publish_keyed(client, &url, &data, token, &key).await;
                    if status != StatusCode::CREATED {
                        panic!("{org}: {status} {answer}; gateways said {:#?}", warnings());
                    }
                    (i, answer["id"].as_str().expect("id").to_owned())
                }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (i, id) in answers {
            ids[i].push(id);
        }
        if round == 0 {
            eprintln!("first round published after {:?}", started.elapsed());
        }
    }
    eprintln!(
        "{} events published after {:?}",
        ORGS * (ROUNDS + 1),
        started.elapsed()
    );

    // Every stream gets its own org's events, once each, in order, up to its
    // end mark: nothing of another org and no repeat in between.
    let checked: Vec<usize> = stream::iter(readers.iter_mut().enumerate())
        .map(|(i, reader)| {
            let (want, org) = (&ids[i], &orgs[i].0);
            async move {
                let events = reader.take(ROUNDS + 1).await;
                let got: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
                assert_eq!(got, *want, "{org}: every event once, in order");
                for (round, event) in events.iter().enumerate() {
                    let data = event.json();
                    assert_eq!(
                        (data["org"].as_str(), data["round"].as_u64()),
                        (Some(org.as_str()), Some(round as u64)),
                        "{org} got {data}"
                    );
                }
                i
            }
        })
        .buffer_unordered(PARALLEL * 4)
        .collect()
        .await;
    assert_eq!(checked.len(), ORGS);
    eprintln!("all delivered after {:?}", started.elapsed());

    let counts: Vec<usize> = ports.iter().map(|&p| clients_on(p)).collect();
    eprintln!(
        "Redis client connections per Redis node with {ORGS} orgs and 2 gateways: {counts:?}"
    );
    for (port, count) in ports.iter().zip(&counts) {
        assert!(
            (2..=2 * PER_GATEWAY).contains(count),
            "the Redis on {port} has {count} clients: bounded by gateways × {PER_GATEWAY}, \
             not by {ORGS} orgs"
        );
    }
    // Both gateways serve every org (each streams half and publishes half).
    for node in &nodes {
        let open = gauge(&client, node, "sse_gateway_open_logs").await;
        assert!(open > ORGS as f64, "{open} logs open, want {}", ORGS + 1);
    }
    // Nothing more arrives on any stream.
    stream::iter(readers.iter_mut())
        .for_each_concurrent(PARALLEL * 4, |reader| async move {
            reader.expect_no_event(Duration::from_millis(300)).await;
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_2000_orgs_on_one_redis_take_a_few_connections_per_gateway() {
    let redis = RedisServer::start();
    many_orgs(&single(&redis.url()), &[redis.port]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_2000_orgs_take_a_few_connections_per_gateway_on_each_primary() {
    let cluster = Cluster::start();
    let storage = cluster.storage();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    many_orgs(&storage, &ports).await;
}

/// An org's log with no stream and no request for `idle_log_close_s` is
/// closed (the open-logs gauge drops, its probes stop); one with a stream
/// stays open; the next request opens it again and a client resumes with no
/// gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_idle_org_log_closes_and_opens_again_with_no_gap() {
    let redis = RedisServer::start();
    let dir = TempDir::new().unwrap();
    let storage = format!(
        "{}\nidle_log_close_s = 2\nprobe_interval_ms = 200",
        single(&redis.url())
    );
    let extra = format!("[auth]\nhs256_secret = \"{SECRET}\"\n[tenancy]\nenabled = true\n");
    let config = redis_config(dir.path(), &storage, &extra);
    let node = gateways(dir.path(), &config, 1).remove(0);
    let client = reqwest::Client::new();
    let topic = node.url("/topics/projects:all");
    const IDLE_ORGS: usize = 20;
    let mut last = Vec::new();
    let answers: Vec<(StatusCode, serde_json::Value)> =
        futures_util::future::join_all((0..IDLE_ORGS).map(|i| {
            let (client, topic) = (&client, &topic);
            async move {
                let org = format!("idle{i}");
                post(client, topic, json!({ "data": i }), Some(&token(&org))).await
            }
        }))
        .await;
    for (status, answer) in answers {
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        last.push(answer["id"].as_str().expect("id").to_owned());
    }
    // One org keeps a stream open: its log stays.
    let kept = token("kept");
    let (status, answer) = post(&client, &topic, json!({"data": "k"}), Some(&kept)).await;
    assert_eq!(status, StatusCode::CREATED);
    let k = answer["id"].as_str().expect("id").to_owned();
    let mut follower = subscribe_as(&client, &topic, &kept, Some(&k)).await;
    follower.until_blocks(1).await;
    // Default + kept + the idle ones not closed yet (all of them, unless
    // the machine is so loaded that a second passed since their publish).
    let open = gauge(&client, &node, "sse_gateway_open_logs").await;
    assert!(
        (3.0..=(IDLE_ORGS + 2) as f64).contains(&open),
        "default + kept + up to {IDLE_ORGS} idle: {open}"
    );
    let connections = clients_on(redis.port);

    // After the idle time (closes run every quarter of it) only the
    // default log and the followed one are open.
    eventually("idle org logs close", || async {
        gauge(&client, &node, "sse_gateway_open_logs").await == 2.0
    })
    .await;
    // Their probes stopped: no new probe entry in an idle org's stream.
    let probes = |org: &str| {
        redis_cli(
            redis.port,
            &[
                "xrevrange",
                &format!("{{sse:org:{org}}}:log"),
                "+",
                "-",
                "count",
                "1",
            ],
        )
    };
    let before = probes("idle0");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(probes("idle0"), before, "a closed log probes no more");
    let now = clients_on(redis.port);
    assert!(
        now <= PER_GATEWAY,
        "{now} connections after closing (before: {connections}): bounded per gateway"
    );
    assert_eq!(
        ready_status(&client, &node).await,
        StatusCode::OK,
        "ready with the idle logs closed"
    );

    // The followed org still streams live.
    let (status, answer) = post(&client, &topic, json!({"data": "live"}), Some(&kept)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        follower.next_event().await.id,
        answer["id"].as_str().expect("id")
    );

    // An idle org comes back: a client resuming from its last id before the
    // close gets the next event, nothing skipped, nothing repeated.
    let org0 = token("idle0");
    let mut resumed = subscribe_as(&client, &topic, &org0, Some(&last[0])).await;
    let (status, answer) = post(&client, &topic, json!({"data": "again"}), Some(&org0)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let event = resumed.next_event().await;
    assert_eq!(event.id, answer["id"].as_str().expect("id"));
    assert_eq!(event.json(), json!("again"));
    resumed.expect_no_event(Duration::from_millis(300)).await;
    assert_eq!(
        gauge(&client, &node, "sse_gateway_open_logs").await,
        3.0,
        "idle0's log is open again"
    );
}

async fn ready_status(client: &reqwest::Client, node: &GatewayProcess) -> StatusCode {
    client
        .get(node.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .status()
}

/// One proxied connection's switches.
#[derive(Default)]
struct SubLink {
    /// Its client sent `SUBSCRIBE`: the gateway's listener.
    subscriber: std::sync::atomic::AtomicBool,
    /// Bytes are held, in both directions.
    frozen: std::sync::atomic::AtomicBool,
    /// Both directions are closed.
    closed: std::sync::atomic::AtomicBool,
}

/// A loopback TCP proxy in front of one Redis that can silence, then cut,
/// the gateway's pub/sub connection.
struct SubProxy {
    port: u16,
    links: std::sync::Arc<parking_lot::Mutex<Vec<std::sync::Arc<SubLink>>>>,
}

impl SubProxy {
    async fn start(redis_port: u16) -> Self {
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let links: Arc<parking_lot::Mutex<Vec<Arc<SubLink>>>> = Arc::default();
        let all = Arc::clone(&links);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let link = Arc::new(SubLink::default());
                all.lock().push(Arc::clone(&link));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(sub_pump(client_read, server_write, Arc::clone(&link), true));
                tokio::spawn(sub_pump(server_read, client_write, link, false));
            }
        });
        Self { port, links }
    }

    /// Holds the bytes of the subscriber connections open now; how many.
    fn freeze_subscribers(&self) -> usize {
        use std::sync::atomic::Ordering;
        let links = self.links.lock();
        let subscribers: Vec<_> = links
            .iter()
            .filter(|l| l.subscriber.load(Ordering::SeqCst) && !l.closed.load(Ordering::SeqCst))
            .collect();
        for link in &subscribers {
            link.frozen.store(true, Ordering::SeqCst);
        }
        subscribers.len()
    }

    /// Cuts the frozen connections (what they held is lost).
    fn cut_frozen(&self) {
        use std::sync::atomic::Ordering;
        for link in self.links.lock().iter() {
            if link.frozen.load(Ordering::SeqCst) {
                link.closed.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Copies one direction of a link, holding bytes while it is frozen and
/// stopping (closing its side) once it is cut.
async fn sub_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: std::sync::Arc<SubLink>,
    client_to_server: bool,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    'copy: loop {
        if link.closed.load(Ordering::SeqCst) {
            break;
        }
        let n = match tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        if client_to_server
            && buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
        {
            link.subscriber.store(true, Ordering::SeqCst);
        }
        while link.frozen.load(Ordering::SeqCst) {
            if link.closed.load(Ordering::SeqCst) {
                break 'copy;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Pub/sub loses what is published while the subscription is down: after
/// the listener subscribes again, every open tail reads from what it
/// delivered, so an event announced only on the lost connection arrives at
/// once, not at the next periodic read (5 s). No probe here, so nothing
/// else wakes the tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tails_catch_up_when_the_notification_subscription_is_renewed() {
    let redis = RedisServer::start();
    let proxy = SubProxy::start(redis.port).await;
    let dir = TempDir::new().unwrap();
    let storage = format!(
        "{}\nprobe_interval_ms = 0",
        single(&format!("redis://127.0.0.1:{}", proxy.port))
    );
    let config = redis_config(dir.path(), &storage, "");
    let node = gateways(dir.path(), &config, 1).remove(0);
    let client = reqwest::Client::new();
    let topic = node.url("/topics/n");
    let publish = |data: &'static str| {
        let (client, topic) = (&client, &topic);
        async move {
            let (status, answer) = post(client, topic, json!({ "data": data }), None).await;
            assert_eq!(status, StatusCode::CREATED, "{answer}");
            answer["id"].as_str().expect("id").to_owned()
        }
    };
    let mut reader = SseReader::connect(&client, &topic, Some("0")).await;
    let first = publish("first").await;
    assert_eq!(reader.next_event().await.id, first, "live through pub/sub");

    assert_eq!(
        proxy.freeze_subscribers(),
        1,
        "one subscription per gateway"
    );
    let lost = publish("announced on the lost connection").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut_frozen();
    let cut = std::time::Instant::now();
    let event = reader
        .next_event_within(Duration::from_secs(3))
        .await
        .expect("the event announced while the subscription was down");
    eprintln!("caught up {:?} after the cut", cut.elapsed());
    assert_eq!(event.id, lost);
    assert!(
        cut.elapsed() < Duration::from_secs(2),
        "caught up on resubscription, not by the periodic read"
    );
    let after = publish("after").await;
    assert_eq!(reader.next_event().await.id, after, "live again");
    reader.expect_no_event(Duration::from_millis(200)).await;
}
