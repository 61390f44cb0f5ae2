//! Test harness: a real gateway on `127.0.0.1:0` with a temp data dir (in
//! process via `sse_gateway::run`, or the real binary for crash tests), a
//! WHATWG-conformant SSE reader over real HTTP, and publish helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use sse_gateway::Config;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default wait for anything expected to arrive.
pub const WAIT: Duration = Duration::from_secs(10);

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
    pub addr: SocketAddr,
    pub base: String,
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

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
        self.dir.take().expect("dir")
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

/// The `<seq>` of an `<epoch>-<seq>` id.
pub fn seq_of(id: &str) -> u64 {
    id.rsplit_once('-')
        .and_then(|(_, s)| s.parse().ok())
        .unwrap_or_else(|| panic!("not an id: {id}"))
}

/// The `<epoch>` of an id.
pub fn epoch_of(id: &str) -> &str {
    id.rsplit_once('-')
        .map(|(e, _)| e)
        .unwrap_or_else(|| panic!("not an id: {id}"))
}

/// One dispatched SSE event (WHATWG semantics: `id` is the last event id at dispatch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {}", self.data))
    }
}

/// An incremental SSE parser following the WHATWG "event stream
/// interpretation": lines end in CRLF, LF or CR; `:` lines are comments;
/// `id` without NUL sets the last event id (also in blocks without data);
/// events dispatch on a blank line when data is non-empty.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: String,
    event_type: String,
    pub last_event_id: String,
    pub retry: Option<u64>,
    pub comments: Vec<String>,
    /// Set when a block ended (blank line), with or without data.
    pub blocks: usize,
    pending_cr: bool,
}

impl SseParser {
    /// Feeds bytes; returns the events dispatched.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.line(&mut out),
                b'\r' => {
                    self.pending_cr = true;
                    self.line(&mut out);
                }
                _ => self.buf.push(b),
            }
        }
        out
    }

    fn line(&mut self, out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
        if line.is_empty() {
            self.blocks += 1;
            if self.data.is_empty() {
                self.event_type.clear();
                return;
            }
            if self.data.ends_with('\n') {
                self.data.pop();
            }
            let event = if self.event_type.is_empty() {
                "message".to_owned()
            } else {
                std::mem::take(&mut self.event_type)
            };
            out.push(SseEvent {
                id: self.last_event_id.clone(),
                event,
                data: std::mem::take(&mut self.data),
            });
            self.event_type.clear();
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.comments.push(comment.trim_start().to_owned());
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
            None => (line.clone(), String::new()),
        };
        match field.as_str() {
            "event" => self.event_type = value,
            "data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.last_event_id = value,
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
    }
}

/// An SSE stream over real HTTP.
pub struct SseReader {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    pub parser: SseParser,
    queue: std::collections::VecDeque<SseEvent>,
    pub ended: bool,
    /// Every byte received, for assertions on the exact wire format.
    pub raw: Vec<u8>,
}

impl SseReader {
    pub async fn connect(client: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("subscribe request");
        Self::from_response(response)
    }

    /// Wraps a response (sent however the test needs) as an SSE stream.
    pub fn from_response(response: reqwest::Response) -> Self {
        Self {
            status: response.status(),
            headers: response.headers().clone(),
            stream: Box::pin(response.bytes_stream()),
            parser: SseParser::default(),
            queue: Default::default(),
            ended: false,
            raw: Vec::new(),
        }
    }

    /// Reads more bytes; false when the stream ended or `wait` passed.
    async fn pump(&mut self, wait: Duration) -> bool {
        if self.ended {
            return false;
        }
        match tokio::time::timeout(wait, self.stream.next()).await {
            Ok(Some(Ok(bytes))) => {
                self.raw.extend_from_slice(&bytes);
                let events = self.parser.feed(&bytes);
                self.queue.extend(events);
                true
            }
            Ok(Some(Err(_))) | Ok(None) => {
                self.ended = true;
                false
            }
            Err(_) => false,
        }
    }

    /// The next event within `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || (!self.pump(left).await && self.ended) {
                return self.queue.pop_front();
            }
        }
    }

    /// The next event; panics after [`WAIT`].
    pub async fn next_event(&mut self) -> SseEvent {
        self.next_event_within(WAIT)
            .await
            .expect("an event within the wait")
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next_event().await);
        }
        events
    }

    /// Reads until `blocks` blocks (events or id-only) have arrived.
    pub async fn until_blocks(&mut self, blocks: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.parser.blocks < blocks {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "expected {blocks} blocks, got {}",
                self.parser.blocks
            );
            self.pump(left).await;
            assert!(
                !(self.ended && self.parser.blocks < blocks),
                "stream ended early: {}",
                String::from_utf8_lossy(&self.raw)
            );
        }
    }

    /// Reads until the server closes the stream (or `wait` passes: false).
    pub async fn until_closed(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.ended {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            self.pump(left).await;
        }
        true
    }

    /// Asserts nothing but comments arrive within `wait`.
    pub async fn expect_no_event(&mut self, wait: Duration) {
        if let Some(event) = self.next_event_within(wait).await {
            panic!("unexpected event {event:?}");
        }
    }
}

/// The real `sse-gateway` binary as a child process, for restart and `kill -9` tests.
pub struct GatewayProcess {
    child: Child,
    pub addr: SocketAddr,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts the binary on `data_dir`, listening on `listen` (`127.0.0.1:0` picks a port).
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        Self::start_with_config(data_dir, listen, None, extra)
    }

    pub fn start_with_config(
        data_dir: &Path,
        listen: &str,
        config: Option<&Path>,
        extra: &[&str],
    ) -> Self {
        Self::start_with_config_env(data_dir, listen, config, extra, &[])
    }

    /// Like `start_with_config`, with extra environment variables.
    pub fn start_with_config_env(
        data_dir: &Path,
        listen: &str,
        config: Option<&Path>,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir);
        match config {
            Some(path) => command.arg("--config").arg(path),
            None => command.arg("--config").arg(repo_path("config.toml")),
        };
        let mut child = command
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sse-gateway");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    if let (Some(tx), Ok(addr)) =
                        (addr_tx.take(), rest.trim().parse::<SocketAddr>())
                    {
                        let _ = tx.send(Ok(addr));
                    }
                }
                sink.lock().expect("log lock").push(line);
            }
            if let Some(tx) = addr_tx.take() {
                let _ = tx.send(Err(()));
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.kill();
                panic!("gateway did not start: {:?}", log.lock().expect("log lock"));
            }
        };
        Self {
            child,
            addr,
            base: format!("http://{addr}"),
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The child's process id (for `/proc` readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit on its own (e.g. refused to start).
    pub fn wait_exit(mut self, wait: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(100));
                let log = self.log.lock().expect("log lock").clone();
                return (status, log);
            }
            assert!(std::time::Instant::now() < deadline, "gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args`; (status, stdout, stderr).
pub fn run_binary(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args(args)
        .output()
        .expect("run sse-gateway");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Waits until `check` holds, polling; panics after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET url` as JSON: (status, body).
pub async fn get_json(client: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let response = client.get(url).send().await.expect("GET");
    (
        response.status(),
        response.json().await.expect("a JSON body"),
    )
}

/// After a crash: every acknowledged event (`id → data`) of `topic` is in the
/// log of the gateway at `base`, with its exact data, in strictly increasing
/// id order. Returns the highest sequence replayed (a later publish must get
/// a higher one: no id reused).
pub async fn assert_every_acked_event_replays(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
    acked: &std::collections::HashMap<String, String>,
) -> u64 {
    let (_, info) = get_json(client, &format!("{base}/topics/{topic}/info")).await;
    let stored = info["count"].as_u64().expect("count") as usize;
    assert!(
        stored >= acked.len(),
        "{stored} stored < {} acknowledged",
        acked.len()
    );
    let mut replay = SseReader::connect(client, &format!("{base}/topics/{topic}"), Some("0")).await;
    let events = replay.take(stored).await;
    let mut previous = 0;
    let mut found = 0;
    for event in &events {
        let seq = seq_of(&event.id);
        assert!(seq > previous, "ids strictly increase in the replay");
        previous = seq;
        if let Some(data) = acked.get(&event.id) {
            assert_eq!(&event.data, data, "exact data for {}", event.id);
            found += 1;
        }
    }
    assert_eq!(found, acked.len(), "every acknowledged event is present");
    previous
}

/// Publishers for crash tests: each posts to `["<topic>", "<topic>:<p>"]` of
/// the gateway at `base` as fast as it is answered, with unusual but valid
/// JSON (to check it survives byte-exact), and remembers every acknowledged
/// id with its exact data, until stopped. Errors (the gateway being killed)
/// are expected and not counted.
pub struct AckingPublishers {
    running: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<std::collections::HashMap<String, String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl AckingPublishers {
    pub fn start(client: &reqwest::Client, base: &str, topic: &str, publishers: usize) -> Self {
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let acked: Arc<Mutex<std::collections::HashMap<String, String>>> = Default::default();
        let tasks = (0..publishers)
            .map(|p| {
                let (client, url, topic) =
                    (client.clone(), format!("{base}/publish"), topic.to_owned());
                let (running, acked) = (Arc::clone(&running), Arc::clone(&acked));
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while running.load(std::sync::atomic::Ordering::Relaxed) {
                        let data = format!(r#"{{"p":{p},"i":{i},"t":"\u00e9\/","n":1.50}}"#);
                        let body =
                            format!(r#"{{"topics":["{topic}","{topic}:{p}"],"data":{data}}}"#);
                        let sent = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await;
                        if let Ok(response) = sent {
                            if response.status() == StatusCode::CREATED {
                                if let Ok(answer) = response.json::<Value>().await {
                                    let id = answer["id"].as_str().expect("a 201 carries the id");
                                    acked.lock().unwrap().insert(id.to_owned(), data);
                                }
                            }
                        }
                        i += 1;
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

    /// Waits until at least `count` publishes were acknowledged.
    pub async fn wait_for(&self, count: usize) {
        eventually("publishes to be acknowledged", || async {
            self.acked.lock().unwrap().len() >= count
        })
        .await;
    }

    /// Stops them; every acknowledged id with its data.
    pub async fn stop(self) -> std::collections::HashMap<String, String> {
        self.running
            .store(false, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("publisher task");
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Collects a child's stderr on a thread, for failure messages.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<Vec<u8>>> {
    use std::io::Read;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut err = child.stderr.take().expect("stderr");
    let sink = Arc::clone(&stderr);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("stderr lock")
                .extend_from_slice(&buf[..n]);
        }
    });
    stderr
}
