//! Real third-party clients against the gateway: the npm `eventsource`
//! package (a WHATWG EventSource that reconnects by itself and resumes with
//! `Last-Event-ID`, pinned in `tests/js/package.json`) following a topic
//! across a `kill -9` / SIGTERM restart of the real binary on the same port
//! and data dir, and `curl -N` replaying from `Last-Event-ID: 0`.
//!
//! `node`, `curl` and `tests/js/node_modules` are installed by
//! `scripts/test.sh`; when one is missing these tests fail and say so.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::common::{
    self, collect_stderr, fresh_client, restartable_listen, start_gateway, SseEvent, SseParser,
    TestServer,
};

const SETUP_HINT: &str = "run `bash scripts/test.sh` from the repo root: it installs curl, \
     nodejs and npm (apt) and tests/js/node_modules (npm ci)";

/// How long the EventSource may take to come back after a restart: the
/// repo's `config.toml` sends `retry: 2000`, and one attempt may hit the
/// gateway while it is down.
const RECONNECT_WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- tools

/// Panics (never skips) unless `tool --version` runs.
fn require_tool(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{tool} --version` failed ({}): {}; {SETUP_HINT}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("`{tool}` is not installed or not on PATH ({e}); {SETUP_HINT}"),
    }
}

/// The follower script, after checking node and the pinned `eventsource`.
fn require_node_follower() -> PathBuf {
    require_tool("node");
    let package = common::repo_path("tests/js/node_modules/eventsource/package.json");
    assert!(
        package.is_file(),
        "{} is missing: the npm package `eventsource` is not installed; {SETUP_HINT}",
        package.display()
    );
    let script = common::repo_path("tests/js/follow.mjs");
    assert!(script.is_file(), "{} is missing", script.display());
    script
}

// ---------------------------------------------------------------- child processes

/// A child process with its stdout streamed (in chunks) to the test and its
/// stderr kept for failure messages; killed and reaped when dropped.
struct PipedChild {
    what: String,
    child: Child,
    stdout: mpsc::UnboundedReceiver<Vec<u8>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl PipedChild {
    fn spawn(what: &str, command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {what} ({e}); {SETUP_HINT}"));
        let (tx, stdout) = mpsc::unbounded_channel();
        let mut out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = collect_stderr(&mut child);
        Self {
            what: what.to_owned(),
            child,
            stdout,
            stderr,
        }
    }

    /// The next stdout chunk before `deadline`; `None` on timeout or EOF.
    async fn chunk_before(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, self.stdout.recv())
            .await
            .ok()
            .flatten()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }
}

impl Drop for PipedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `node tests/js/follow.mjs URL NAMES…`: the lines it printed, as JSON.
struct NodeFollower {
    process: PipedChild,
    partial: Vec<u8>,
    lines: Vec<Value>,
}

impl NodeFollower {
    fn spawn(url: &str, names: &[&str]) -> Self {
        let script = require_node_follower();
        let mut command = Command::new("node");
        command
            .arg(&script)
            .arg(url)
            .args(names)
            .current_dir(common::repo_path("tests/js"));
        Self {
            process: PipedChild::spawn("node tests/js/follow.mjs", &mut command),
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Reads lines until `done(lines)` holds; panics with the transcript after `wait`.
    async fn wait_until(&mut self, what: &str, wait: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + wait;
        while !done(&self.lines) {
            match self.process.chunk_before(deadline).await {
                Some(chunk) => self.feed(&chunk),
                None => {
                    let status = self.process.exited();
                    panic!(
                        "timed out after {wait:?} waiting for {what} ({} exited: {:?})\n\
                         node printed:\n{}\nnode stderr:\n{}",
                        self.process.what,
                        status,
                        self.transcript(),
                        self.process.stderr_text()
                    )
                }
            }
        }
    }

    /// Reads whatever arrives during `wait` (to catch duplicates or late extras).
    async fn settle(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Some(chunk) = self.process.chunk_before(deadline).await {
            self.feed(&chunk);
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        self.partial.extend_from_slice(chunk);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            let value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("follow.mjs printed a non-JSON line ({e}): {text:?}"));
            self.lines.push(value);
        }
    }

    fn transcript(&self) -> String {
        self.lines
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn opens(lines: &[Value]) -> usize {
    lines.iter().filter(|l| l["open"] == json!(true)).count()
}

/// The events printed, as (id, event, data).
fn events(lines: &[Value]) -> Vec<(String, String, String)> {
    lines
        .iter()
        .filter(|l| l.get("event").is_some())
        .map(|l| {
            let field = |name: &str| {
                l[name]
                    .as_str()
                    .unwrap_or_else(|| panic!("`{name}` is not a string in {l}"))
                    .to_owned()
            };
            (field("id"), field("event"), field("data"))
        })
        .collect()
}

// ---------------------------------------------------------------- gateway processes

/// Publishes `n` events to `demo` (alternating `tick` and the default
/// `message`, with data that must arrive byte-exact); their (id, event, data).
async fn publish_batch(base: &str, phase: &str, n: usize) -> Vec<(String, String, String)> {
    let client = fresh_client();
    let mut sent = Vec::new();
    for i in 0..n {
        let event = if i % 2 == 0 { "tick" } else { "message" };
        let data = json!({"phase": phase, "i": i, "text": "é \"q\" \\ </> ✓"});
        let id = common::publish(&client, base, "demo", event, data.clone()).await;
        sent.push((id, event.to_owned(), data.to_string()));
    }
    sent
}

enum Stop {
    Kill9,
    Sigterm,
}

/// The EventSource follows `/topics/demo` while the gateway is stopped by
/// `stop` and restarted on the same port and data dir: it reconnects by
/// itself, resumes with `Last-Event-ID`, and sees all 10 events exactly once,
/// in order, byte-exact.
async fn eventsource_follows_across_restart(stop: Stop) {
    require_node_follower();
    let dir = TempDir::new().expect("tempdir");
    let gateway = start_gateway(dir.path(), &restartable_listen(), None).await;
    let port = gateway.addr.port();
    let url = gateway.url("/topics/demo");

    let mut node = NodeFollower::spawn(&url, &["tick"]);
    node.wait_until("the first open", common::WAIT, |l| opens(l) >= 1)
        .await;

    let mut expected = publish_batch(&gateway.base, "before", 5).await;
    node.wait_until("the first 5 events, live", common::WAIT, |l| {
        events(l).len() >= 5
    })
    .await;
    assert_eq!(
        events(&node.lines),
        expected,
        "live events before the restart\n{}",
        node.transcript()
    );

    match stop {
        Stop::Kill9 => gateway.kill9(),
        Stop::Sigterm => {
            let status = gateway.terminate();
            assert_eq!(status.code(), Some(0), "SIGTERM exits 0, got {status}");
        }
    }

    let gateway = start_gateway(dir.path(), &format!("127.0.0.1:{port}"), None).await;
    assert_eq!(gateway.addr.port(), port, "restarted on the same port");
    let after = publish_batch(&gateway.base, "after", 5).await;
    assert_eq!(
        common::epoch_of(&after[0].0),
        common::epoch_of(&expected[0].0),
        "same data dir, same log epoch"
    );
    expected.extend(after);
    let seqs: Vec<u64> = expected.iter().map(|(id, ..)| common::seq_of(id)).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "ids grow across the restart: {expected:?}"
    );

    node.wait_until("all 10 events after the reconnect", RECONNECT_WAIT, |l| {
        events(l).len() >= 10
    })
    .await;
    node.settle(Duration::from_millis(300)).await;

    let transcript = node.transcript();
    assert_eq!(
        events(&node.lines),
        expected,
        "every event exactly once, in order, with the published ids and data\n{transcript}"
    );
    assert!(
        opens(&node.lines) >= 2,
        "the EventSource reconnected by itself\n{transcript}"
    );
    let opens_before_sixth = node
        .lines
        .iter()
        .take_while(|l| l["id"].as_str() != Some(expected[5].0.as_str()))
        .filter(|l| l["open"] == json!(true))
        .count();
    assert!(
        opens_before_sixth >= 2,
        "events after the restart came over a new connection\n{transcript}"
    );
    let gave_up: Vec<&Value> = node
        .lines
        .iter()
        .filter(|l| l["error"] == json!(true) && l["readyState"] != json!(0))
        .collect();
    assert!(
        gave_up.is_empty(),
        "the EventSource must never be made to give up (a non-200 or a wrong content type \
         during the restart is final for it): {gave_up:?}\n{transcript}"
    );
    assert!(
        node.process.exited().is_none(),
        "follow.mjs is still running\n{}",
        node.process.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn eventsource_resumes_with_last_event_id_across_kill_9_restart() {
    eventsource_follows_across_restart(Stop::Kill9).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eventsource_resumes_with_last_event_id_across_sigterm_restart() {
    eventsource_follows_across_restart(Stop::Sigterm).await;
}

// ---------------------------------------------------------------- curl -N

/// Reads `curl`'s stdout through the WHATWG parser until `n` events arrived.
async fn curl_events(curl: &mut PipedChild, parser: &mut SseParser, n: usize) -> Vec<SseEvent> {
    let deadline = Instant::now() + common::WAIT;
    let mut raw = Vec::new();
    let mut got = Vec::new();
    while got.len() < n {
        match curl.chunk_before(deadline).await {
            Some(chunk) => {
                raw.extend_from_slice(&chunk);
                got.extend(parser.feed(&chunk));
            }
            None => {
                let status = curl.exited();
                panic!(
                    "{} gave {} of {n} events (exited: {:?}); stdout:\n{}\nstderr:\n{}",
                    curl.what,
                    got.len(),
                    status,
                    String::from_utf8_lossy(&raw),
                    curl.stderr_text()
                )
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_n_with_last_event_id_0_replays_history_then_goes_live() {
    require_tool("curl");
    let server = TestServer::start(|_| {}).await;
    let published = [
        ("message", json!({"n": 1})),
        ("tick", json!("two")),
        ("projects:updated", json!({"n": 3, "s": "é\n\"x\""})),
    ];
    let mut expected = Vec::new();
    for (event, data) in published {
        let id = server.publish("demo", event, data.clone()).await;
        expected.push(SseEvent {
            id,
            event: event.to_owned(),
            data: data.to_string(),
        });
    }

    let url = server.url("/topics/demo");
    let mut curl = PipedChild::spawn(
        "curl",
        Command::new("curl").args(["-sN", "-H", "Last-Event-ID: 0", &url]),
    );
    let mut parser = SseParser::default();
    let replayed = curl_events(&mut curl, &mut parser, 3).await;
    assert_eq!(
        replayed, expected,
        "the whole history, in order, byte-exact"
    );
    assert!(
        parser.retry.is_some(),
        "the stream sends `retry:` for clients that reconnect"
    );
    assert!(
        curl.exited().is_none(),
        "the stream stays open after the replay"
    );

    // Then live, on the same connection.
    let id = server.publish("demo", "tick", json!(4)).await;
    let live = curl_events(&mut curl, &mut parser, 1).await;
    assert_eq!(
        live,
        vec![SseEvent {
            id,
            event: "tick".to_owned(),
            data: "4".to_owned()
        }]
    );
    drop(curl); // kills curl
}
