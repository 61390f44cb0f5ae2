//! The gateway in process: [`TestServer`] runs `sse_gateway::run` on
//! `127.0.0.1:0` with a temp data dir, and the HTTP helpers tests publish and
//! query with.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sse_gateway::Config;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::sse::SseReader;

/// A config suited to tests: data in `dir`, fast heartbeats.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.storage.data_dir = dir.to_path_buf();
    config.storage.cache_capacity_bytes = 16 * 1024 * 1024;
    config.stream.retry_ms = 250;
    config
}

/// An in-process gateway.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub base: String,
    /// A client for it (keep-alive).
    pub client: reqwest::Client,
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<(), sse_gateway::RunError>>>,
    dir: Option<TempDir>,
}

impl TestServer {
    /// Starts a gateway on a fresh temp dir; `tweak` adjusts the config.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(TempDir::new().expect("tempdir"), tweak).await
    }

    /// Starts a gateway on an existing data dir (restarts).
    pub async fn start_in(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        config.validate().expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let handle = tokio::spawn(sse_gateway::run(listener, config, stop.clone()));
        let server = Self {
            addr,
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            stop,
            handle: Some(handle),
            dir: Some(dir),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("gateway did not become ready");
    }

    /// `<base><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Its data dir.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// Stops the gateway (as SIGTERM would) and hands back its data dir.
    pub async fn stop(mut self) -> TempDir {
        self.stop.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("gateway stops within the drain bound")
            .expect("join")
            .expect("gateway exits cleanly");
        let dir = self.dir.take().expect("dir");
        wait_until_released(dir.path()).await;
        dir
    }

    /// Cancels the stop token without waiting (to observe shutdown).
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    /// POSTs JSON text with `Content-Type: application/json`.
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        post_raw(&self.client, &self.url(path), body).await
    }

    /// Publishes `data` to one topic; panics unless 201. Returns the id.
    pub async fn publish(&self, topic: &str, event: &str, data: Value) -> String {
        publish(&self.client, &self.base, topic, event, data).await
    }

    /// `GET path` as an SSE stream, optionally with `Last-Event-ID`.
    pub async fn subscribe(&self, path: &str, last_event_id: Option<&str>) -> SseReader {
        SseReader::connect(&self.client, &self.url(path), last_event_id).await
    }

    /// `GET path` as JSON (`null` when the body is not JSON).
    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// POSTs `body` as `application/json`; (status, body as JSON or as a string).
pub async fn post_raw(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Publishes `data` as `event` to `topic` of the gateway at `base`; panics
/// unless 201. Returns the id.
pub async fn publish(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
    event: &str,
    data: Value,
) -> String {
    let body = serde_json::json!({ "event": event, "data": data }).to_string();
    let (status, answer) = post_raw(client, &format!("{base}/topics/{topic}"), body).await;
    assert_eq!(status, StatusCode::CREATED, "publish answered {answer}");
    answer["id"].as_str().expect("id").to_owned()
}

/// `GET url` as JSON: (status, body).
pub async fn get_json(client: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let response = client.get(url).send().await.expect("GET");
    (
        response.status(),
        response.json().await.expect("a JSON body"),
    )
}

/// How many streams `/topics/{topic}/info` counts; panics unless it answers 200.
pub async fn subscribers(server: &TestServer, topic: &str) -> u64 {
    let (status, info) = server.get_json(&format!("/topics/{topic}/info")).await;
    assert_eq!(status, StatusCode::OK, "info for {topic}: {info}");
    info["subscribers"]
        .as_u64()
        .unwrap_or_else(|| panic!("subscribers in {info}"))
}

/// `GET {base}/metrics` as text.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    let response = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    response.text().await.expect("metrics text")
}

/// The value of the first sample of `name` (labelled or not) in Prometheus
/// text; panics when there is none.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

/// Waits until no one holds sled's lock on `dir`'s `db`. `run` returns once
/// the log is closed, but the in-process gateway's last tasks (a connection
/// still winding down, a read in flight) drop their handles on the log a
/// moment later, and only then does sled's `Db` release the lock: a test
/// that opened the directory at once sometimes got `WouldBlock` (CI,
/// 2026-12-04). A process that exits has no such window.
async fn wait_until_released(dir: &Path) {
    let Ok(db) = std::fs::File::open(dir.join("db")) else {
        return; // no sled log here (another backend)
    };
    for _ in 0..1000 {
        match db.try_lock() {
            Ok(()) => return, // dropped with `db` at the end of this function
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!(
        "{}: sled's lock still held 10 s after the gateway stopped",
        dir.display()
    );
}
