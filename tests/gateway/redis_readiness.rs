//! Readiness by delivery on the Redis backend: `/readyz` goes `503` when this
//! node's tail of the log is silent although Redis still takes writes (the
//! failure of centrifugo#1189), and `200` again on its own.
//!
//! A real `redis-server` and a real gateway process, with a TCP proxy in
//! between that can blackhole only the tailer's connections: it sniffs the
//! client→server bytes of each connection for `XREAD` and, on command, stops
//! forwarding bytes in both directions on those connections without closing
//! them, so writes still succeed while the tail hears nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;
use crate::redis::{gateways, redis_cli, redis_config, single, token, RedisServer, SECRET};

/// The probe interval the gateway runs with here.
const PROBE: Duration = Duration::from_millis(300);

/// One proxied connection's switches.
#[derive(Default)]
struct Link {
    /// Its client sent `XREAD`: a tailer's connection.
    tail: AtomicBool,
    /// Frozen on its own (the connections that were tails at one moment).
    frozen: AtomicBool,
    /// The bytes that carried its first `XREAD` (which stream it tails).
    xread: Mutex<String>,
}

/// A loopback TCP proxy in front of one Redis.
struct TailProxy {
    port: u16,
    /// Every tail connection, present and future, is frozen.
    blackhole: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
}

impl TailProxy {
    async fn start(redis_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let (hole, all) = (Arc::clone(&blackhole), Arc::clone(&links));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                let link = Arc::new(Link::default());
                all.lock().push(Arc::clone(&link));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(
                    client_read,
                    server_write,
                    Arc::clone(&link),
                    Arc::clone(&hole),
                    true,
                ));
                tokio::spawn(pump(
                    server_read,
                    client_write,
                    link,
                    Arc::clone(&hole),
                    false,
                ));
            }
        });
        Self {
            port,
            blackhole,
            links,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Silences every tail connection, including ones opened from now on.
    fn blackhole_tails(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    /// Silences the tail connections open now only (a new one works): what
    /// a connection left on a demoted primary looks like.
    fn freeze_current_tails(&self) -> usize {
        self.freeze_current_tails_of("")
    }

    /// The same, for the tail connections of one stream only.
    fn freeze_current_tails_of(&self, stream: &str) -> usize {
        let links = self.links.lock();
        let tails: Vec<_> = links
            .iter()
            .filter(|l| l.tail.load(Ordering::SeqCst) && l.xread.lock().contains(stream))
            .collect();
        for link in &tails {
            link.frozen.store(true, Ordering::SeqCst);
        }
        tails.len()
    }

    fn tail_connections(&self) -> usize {
        self.links
            .lock()
            .iter()
            .filter(|l| l.tail.load(Ordering::SeqCst))
            .count()
    }
}

/// Copies one direction of a link, holding bytes while the link is silenced.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    blackhole: Arc<AtomicBool>,
    client_to_server: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if client_to_server
            && buf[..n]
                .windows(5)
                .any(|w| w.eq_ignore_ascii_case(b"XREAD"))
        {
            let mut xread = link.xread.lock();
            if xread.is_empty() {
                *xread = String::from_utf8_lossy(&buf[..n]).into_owned();
            }
            link.tail.store(true, Ordering::SeqCst);
        }
        while link.frozen.load(Ordering::SeqCst)
            || (blackhole.load(Ordering::SeqCst) && link.tail.load(Ordering::SeqCst))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn ready(client: &reqwest::Client, node: &GatewayProcess) -> StatusCode {
    client
        .get(node.url("/readyz"))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

/// Polls `/readyz` until it answers `want`; how long that took.
async fn time_until(client: &reqwest::Client, node: &GatewayProcess, want: StatusCode) -> Duration {
    let started = Instant::now();
    while ready(client, node).await != want {
        assert!(
            started.elapsed() < WAIT,
            "/readyz never answered {want} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

async fn tail_lag(client: &reqwest::Client, node: &GatewayProcess) -> f64 {
    metric_value(
        &metrics_text(client, &node.base).await,
        "sse_gateway_tail_lag_seconds",
    )
}

async fn publish(client: &reqwest::Client, node: &GatewayProcess, data: Value) -> String {
    let response = client
        .post(node.url("/topics/r"))
        .header("content-type", "application/json")
        .body(json!({ "data": data }).to_string())
        .send()
        .await
        .expect("publish");
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::CREATED, "publish answered {answer}");
    answer["id"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_readyz_turns_503_when_the_tail_is_silent_and_200_again_on_its_own() {
    let redis = RedisServer::start();
    let proxy = TailProxy::start(redis.port).await;
    let dir = TempDir::new().unwrap();
    let storage = format!(
        "{}\nprobe_interval_ms = {}",
        single(&proxy.url()),
        PROBE.as_millis()
    );
    let config = redis_config(dir.path(), &storage, "");
    let node = gateways(dir.path(), &config, 1).remove(0);
    let client = reqwest::Client::new();
    let slack = Duration::from_millis(600);

    let mut ids = vec![publish(&client, &node, json!("before")).await];
    let mut reader = SseReader::connect(&client, &node.url("/topics/r"), Some("0")).await;
    assert_eq!(reader.next_event().await.id, ids[0]);
    time_until(&client, &node, StatusCode::OK).await;
    tokio::time::sleep(PROBE * 3).await;
    assert_eq!(ready(&client, &node).await, StatusCode::OK, "tail delivers");
    let lag = tail_lag(&client, &node).await;
    assert!(lag < PROBE.as_secs_f64(), "a delivering tail lags {lag}s");
    assert!(
        proxy.tail_connections() >= 1,
        "the proxy saw the tailer's XREAD"
    );

    // 1. Every tail connection silent, Redis still writable.
    proxy.blackhole_tails(true);
    let took = time_until(&client, &node, StatusCode::SERVICE_UNAVAILABLE).await;
    eprintln!("silent tail: 503 after {took:?}");
    assert!(
        took <= PROBE * 2 + slack,
        "503 {took:?} after the tail went silent (probe every {PROBE:?})"
    );
    for i in 0..3 {
        ids.push(publish(&client, &node, json!(i)).await);
    }
    let first = tail_lag(&client, &node).await;
    tokio::time::sleep(PROBE * 2).await;
    let second = tail_lag(&client, &node).await;
    eprintln!("tail lag while silent: {first}s, then {second}s");
    assert!(
        first >= PROBE.as_secs_f64() && second > first,
        "the tail lag grows while silent: {first}s then {second}s"
    );
    assert_eq!(
        ready(&client, &node).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "stays 503 while silent (reconnects find a silent tail too)"
    );
    proxy.blackhole_tails(false);
    let took = time_until(&client, &node, StatusCode::OK).await;
    eprintln!("tail back: 200 after {took:?}");
    assert!(took <= PROBE * 2 + slack, "200 again {took:?} after");
    let events = reader.take(3).await;
    let got: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got, ids[1..], "events of the silence arrive, no gap");

    // 2. Only the tail connections of now go silent (a failover's leftover):
    //    the watchdog replaces them and /readyz recovers with no help.
    assert!(proxy.freeze_current_tails() >= 1);
    time_until(&client, &node, StatusCode::SERVICE_UNAVAILABLE).await;
    let during = publish(&client, &node, json!("during")).await;
    let took = time_until(&client, &node, StatusCode::OK).await;
    eprintln!("frozen tail replaced by the watchdog: 200 after {took:?}");
    assert!(
        took <= PROBE * 4 + slack,
        "the watchdog's new tail connection made it ready {took:?} after the 503"
    );
    assert_eq!(
        reader.next_event().await.id,
        during,
        "no gap after the watchdog"
    );
    reader.expect_no_event(Duration::from_millis(200)).await;

    // The probe is nobody's topic, and the log keeps only a few of them.
    let topics: Value = client
        .get(node.url("/topics"))
        .send()
        .await
        .expect("topics")
        .json()
        .await
        .expect("topics json");
    let names: Vec<&str> = topics["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .filter_map(|t| t["topic"].as_str())
        .collect();
    assert_eq!(names, ["r"], "{topics}");
    let length: usize = redis_cli(redis.port, &["XLEN", "{sse}:log"])
        .parse()
        .expect("XLEN");
    assert!(
        length <= 5 + 4,
        "5 events and at most 4 probes in the stream, not {length}"
    );
}

/// With tenancy every org's log is tailed through the node's one reader
/// connection (not one per org): silencing it turns `/readyz` `503` with the
/// org's log open, the worst log's lag shows, and the watchdog's new reader
/// makes it ready again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_readyz_covers_the_tail_of_every_open_org_log() {
    let redis = RedisServer::start();
    let proxy = TailProxy::start(redis.port).await;
    let dir = TempDir::new().unwrap();
    let storage = format!(
        "{}\nprobe_interval_ms = {}",
        single(&proxy.url()),
        PROBE.as_millis()
    );
    let extra = format!("[auth]\nhs256_secret = \"{SECRET}\"\n[tenancy]\nenabled = true\n");
    let config = redis_config(dir.path(), &storage, &extra);
    let node = gateways(dir.path(), &config, 1).remove(0);
    let client = reqwest::Client::new();
    let acme = token("acme");
    let response = client
        .post(node.url("/topics/r"))
        .bearer_auth(&acme)
        .header("content-type", "application/json")
        .body(r#"{"data":"opens acme's log"}"#)
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::CREATED);
    time_until(&client, &node, StatusCode::OK).await;
    tokio::time::sleep(PROBE * 3).await;
    assert_eq!(ready(&client, &node).await, StatusCode::OK);

    let frozen = proxy.freeze_current_tails();
    assert_eq!(frozen, 1, "the default and acme's log share one reader");
    let took = time_until(&client, &node, StatusCode::SERVICE_UNAVAILABLE).await;
    eprintln!("silent reader: 503 after {took:?}");
    assert!(took <= PROBE * 2 + Duration::from_millis(600), "{took:?}");
    let lag = tail_lag(&client, &node).await;
    assert!(
        lag >= PROBE.as_secs_f64(),
        "the worst log's lag shows: {lag}s"
    );
    // The watchdog replaces the reader: ready again by itself.
    time_until(&client, &node, StatusCode::OK).await;
    let response = client
        .post(node.url("/topics/r"))
        .bearer_auth(&acme)
        .header("content-type", "application/json")
        .body(r#"{"data":"after"}"#)
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::CREATED);
}
