//! The operator CLI, run as the real binary: `publish` and `tail` against a
//! running gateway (a `kill -9` and restart included), and the offline
//! `inspect`, `export`/`import`, `check` on data directories, locked ones too.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sse_gateway::log::sled::codec;
use sse_gateway::model::Topic;
use tempfile::TempDir;

use crate::common::*;

/// What one run of the binary left: exit status, stdout, stderr.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    /// The single stderr line of a failed run: `sse-gateway: …`.
    fn error_line(&self) -> &str {
        assert!(
            !self.status.success(),
            "expected a failure: {}",
            self.stdout
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one error line: {:?}", self.stderr);
        assert!(lines[0].starts_with("sse-gateway: "), "{}", lines[0]);
        lines[0]
    }
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("SSE_GATEWAY_URL")
        .env_remove("SSE_GATEWAY_TOKEN")
        .env_remove("SSE_GATEWAY_DATA_DIR")
        .env_remove("SSE_GATEWAY_CONFIG");
    command
}

/// Runs the binary to completion (off the async runtime: in-process gateways
/// must keep answering meanwhile), `stdin` fed to it.
async fn cli_with_input(args: &[&str], stdin: &str) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sse-gateway");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin.as_bytes()).expect("write stdin");
        drop(input);
        let output = child.wait_with_output().expect("run sse-gateway");
        Output {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

async fn cli(args: &[&str]) -> Output {
    cli_with_input(args, "").await
}

/// A long-running CLI child (`tail`) with its output lines collected.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn spawn(args: &[&str]) -> Self {
        let mut child = command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sse-gateway");
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().expect("stdout")));
        let stderr = collect(Box::new(child.stderr.take().expect("stderr")));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stdout holds at least `n` lines.
    async fn wait_lines(&self, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let lines = self.stdout();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} lines, got {lines:?}; stderr {:?}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until some stdout line contains `text`.
    async fn wait_for(&self, text: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let lines = self.stdout();
            if lines.iter().any(|l| l.contains(text)) {
                return lines;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {text:?} in {lines:?}; stderr {:?}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A copy of the format v1 fixture (ucMMIYGv-1…4, `projects:all` ×4, `projects:tasks` ×1).
fn fixture_copy() -> TempDir {
    let dir = TempDir::new().unwrap();
    copy_dir(&repo_path("tests/fixtures/v1-data"), dir.path());
    dir
}

/// Replays `path` from `Last-Event-ID: 0`: (id, event, data) of the first `n` events.
async fn replay(server: &TestServer, path: &str, n: usize) -> Vec<(String, String, String)> {
    let mut stream = server.subscribe(path, Some("0")).await;
    let events = stream.take(n).await;
    stream.expect_no_event(Duration::from_millis(100)).await;
    events
        .into_iter()
        .map(|e| (e.id, e.event, e.data))
        .collect()
}

#[tokio::test]
async fn publish_from_the_cli_is_delivered_over_http_as_sent() {
    let server = TestServer::start(|_| {}).await;
    let url = server.base.clone();
    let data = r#"{"z": 1.0, "a": "\u00e9 é", "n": [1e2, -0]}"#;
    let one = cli(&[
        "publish",
        "projects:all",
        "--event",
        "created",
        "--data",
        data,
        "--url",
        &url,
    ])
    .await;
    assert!(one.status.success(), "{}", one.stderr);
    let one_id = one.stdout.trim().to_owned();
    let many = cli_with_input(
        &[
            "publish", "a", "b", "a", "--event", "fan_out", "--data", "-", "--url", &url,
        ],
        "{\"from\": \"stdin\"}\n",
    )
    .await;
    assert!(many.status.success(), "{}", many.stderr);
    let many_id = many.stdout.trim().to_owned();
    assert_eq!(seq_of(&many_id), seq_of(&one_id) + 1);

    let got = replay(&server, "/topics/projects:all", 1).await;
    assert_eq!(
        got,
        [(
            one_id,
            "created".into(),
            r#"{"z":1.0,"a":"\u00e9 é","n":[1e2,-0]}"#.into()
        )]
    );
    // Several topics: one event, one id, in each of them.
    for topic in ["a", "b"] {
        let got = replay(&server, &format!("/topics/{topic}"), 1).await;
        assert_eq!(
            got,
            [(
                many_id.clone(),
                "fan_out".into(),
                r#"{"from":"stdin"}"#.into()
            )]
        );
    }

    // Refused before anything is sent, or by the gateway: one clear line, non-zero.
    let bad_topic = cli(&["publish", "a/b", "--data", "1", "--url", &url]).await;
    assert!(bad_topic.error_line().contains("invalid topic"));
    let bad_json = cli(&["publish", "a", "--data", "{nope", "--url", &url]).await;
    assert!(bad_json.error_line().contains("--data is not JSON"));
    let reserved = cli(&[
        "publish", "a", "--event", "reset", "--data", "1", "--url", &url,
    ])
    .await;
    assert!(reserved.error_line().contains("reserved"));
    let (_, info) = server.get_json("/topics/a/info").await;
    assert_eq!(info["count"], 1, "refused publishes stored nothing");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let down = cli(&["publish", "a", "--data", "1", "--url", &gone]).await;
    assert!(
        down.error_line().contains("cannot reach the gateway"),
        "{}",
        down.stderr
    );
}

#[tokio::test]
async fn tail_prints_events_readably_follows_several_topics_and_highlights_resets() {
    let server = TestServer::start(|_| {}).await;
    let url = server.base.clone();
    let first = server
        .publish("a", "created", json!({"k": [1, 2], "s": "x"}))
        .await;
    let second = server.publish("b", "updated", json!([])).await;
    let other = server.publish("c", "elsewhere", json!(0)).await;

    let tail = Running::spawn(&["tail", "a", "b", "--from", "0", "--url", &url]);
    tail.wait_for(&second).await;
    let live = server.publish("a", "live", json!({"n": 3})).await;
    tail.wait_for(&live).await;
    let lines = tail.wait_lines(16).await;
    let text = lines.join("\n");
    let expected = format!(
        "{first}  created\n  {{\n    \"k\": [\n      1,\n      2\n    ],\n    \"s\": \"x\"\n  }}\n\n\
         {second}  updated\n  []\n\n\
         {live}  live\n  {{\n    \"n\": 3\n  }}"
    );
    assert!(text.starts_with(&expected), "{text}");
    assert!(!text.contains(&other), "topic c is not followed: {text}");

    let reset = Running::spawn(&["tail", "a", "--from", "garbage-5", "--url", &url]);
    let lines = reset.wait_for("RESET").await;
    assert!(
        lines[0].contains("RESET (unknown_id)")
            && lines[0].contains("cannot resume after garbage-5"),
        "{lines:?}"
    );
    assert!(
        lines[0].starts_with(&format!("{}-{}", epoch_of(&live), seq_of(&live))),
        "the reset says where following goes on: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_survives_a_gateway_kill_and_restart_printing_every_event_once() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("fast-retry.toml");
    std::fs::write(&config, "[stream]\nretry_ms = 150\n").unwrap();
    let data = dir.path().join("data");
    let gateway =
        GatewayProcess::start_with_config(&data, &restartable_listen(), Some(&config), &[]);
    let addr = gateway.addr;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    ids.push(publish(&client, &gateway.base, "t", "e", json!(0)).await);

    let tail = Running::spawn(&["tail", "t", "--from", "0", "--json", "--url", &gateway.base]);
    for i in 1..3 {
        ids.push(publish(&client, &gateway.base, "t", "e", json!(i)).await);
    }
    tail.wait_lines(3).await;
    gateway.kill9();

    let gateway = GatewayProcess::start_with_config(&data, &addr.to_string(), Some(&config), &[]);
    publish(&client, &gateway.base, "other", "e", json!("not followed")).await;
    for i in 3..6 {
        ids.push(publish(&client, &gateway.base, "t", "e", json!(i)).await);
    }
    tail.wait_lines(6).await;
    // One more after everything the reconnect replayed: a duplicate would show before it.
    ids.push(publish(&client, &gateway.base, "t", "last", json!(6)).await);
    tail.wait_lines(7).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = tail.stdout();
    let printed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let printed_ids: Vec<&str> = printed.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(printed_ids, ids, "every event once, in order");
    assert_eq!(
        printed
            .iter()
            .map(|v| v["data"].clone())
            .collect::<Vec<_>>(),
        (0..7).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert_eq!(printed[6]["event"], "last");
    let stderr = tail.stderr().join("\n");
    assert!(
        stderr.contains(&format!("reconnected; resuming after {}", ids[2])),
        "{stderr}"
    );
}

#[tokio::test]
async fn inspect_summarises_a_data_dir_with_known_content() {
    let dir = fixture_copy();
    let out = cli(&["inspect", "--data-dir", path(dir.path())]).await;
    assert!(out.status.success(), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    for expected in [
        "format version  1",
        "epoch           ucMMIYGv",
        "head            ucMMIYGv-4 (the next publish gets ucMMIYGv-5)",
        "events          4",
        "oldest id       ucMMIYGv-1",
        "newest id       ucMMIYGv-4",
        "index entries   5",
        "topics          2",
    ] {
        assert!(lines.contains(&expected), "{expected:?} in\n{}", out.stdout);
    }
    let rows: Vec<Vec<&str>> = lines
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.last().is_some_and(|t| t.starts_with("projects:")))
        .collect();
    assert_eq!(
        rows,
        [
            vec!["4", "ucMMIYGv-1", "ucMMIYGv-4", "-", "projects:all"],
            vec!["1", "ucMMIYGv-4", "ucMMIYGv-4", "-", "projects:tasks"],
        ]
    );
    assert!(lines.iter().any(|l| l.starts_with("bytes on disk")));

    let top = cli(&["inspect", "--data-dir", path(dir.path()), "--top", "1"]).await;
    assert!(top.stdout.contains("top 1 of 2 topics"), "{}", top.stdout);
    assert!(!top.stdout.contains("projects:tasks"), "{}", top.stdout);

    let json_out = cli(&["inspect", "--json", "--data-dir", path(dir.path())]).await;
    let summary: Value = serde_json::from_str(&json_out.stdout).unwrap();
    assert_eq!(summary["events"], 4);
    assert_eq!(summary["topic_count"], 2);
    assert_eq!(summary["oldest_id"], "ucMMIYGv-1");
    assert_eq!(summary["newest_id"], "ucMMIYGv-4");
    assert_eq!(summary["topics"][0]["topic"], "projects:all");
    assert_eq!(summary["topics"][0]["count"], 4);
    assert!(summary["bytes_on_disk"].as_u64().unwrap() > 0);
}

/// A log where retention trimmed: `busy` kept to its 3 newest, one event in
/// both topics kept only for `quiet`, sequences missing from the middle.
async fn trimmed_source() -> (TempDir, Vec<String>) {
    let trim = |c: &mut sse_gateway::Config| {
        c.retention.max_events_per_topic = 3;
        c.retention.trim_interval_ms = 20;
    };
    let server = TestServer::start(trim).await;
    let mut ids = vec![String::new()]; // ids[seq]
    let (status, answer) = server
        .post_raw(
            "/topics/quiet",
            r#"{"event": "kept", "data": {"dup": 1, "dup": 2, "x": 1.50}}"#,
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
    ids.push(answer["id"].as_str().unwrap().to_owned());
    for i in 0..6 {
        ids.push(server.publish("busy", "tick", json!(i)).await);
    }
    let (status, answer) = server
        .post_raw(
            "/publish",
            r#"{"topics": ["busy", "quiet"], "event": "both", "data": "\u00e9\/é"}"#,
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
    ids.push(answer["id"].as_str().unwrap().to_owned());
    for i in 6..9 {
        ids.push(server.publish("busy", "tick", json!(i)).await);
    }
    let first = ids[9].clone();
    let server_ref = &server;
    eventually("busy to be trimmed to its 3 newest", || {
        let first = first.clone();
        async move {
            let (_, info) = server_ref.get_json("/topics/busy/info").await;
            info["count"] == 3 && info["first_id"] == first.as_str()
        }
    })
    .await;
    (server.stop().await, ids)
}

#[tokio::test]
async fn export_then_import_keeps_every_event_id_and_watermark() {
    let (source, ids) = trimmed_source().await;
    let epoch = epoch_of(&ids[1]).to_owned();
    let work = TempDir::new().unwrap();
    let export = work.path().join("export.jsonl");
    let out = cli(&[
        "export",
        "--data-dir",
        path(source.path()),
        "--out",
        path(&export),
    ])
    .await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.is_empty(),
        "a file export writes nothing to stdout"
    );
    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            r#"{{"format":"sse-gateway-export","version":2,"epoch":"{epoch}","head":11,"trimmed":{{"busy":8}}}}"#
        )
    );
    let exported: Vec<Value> = lines[1..]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exported_ids: Vec<&str> = exported.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        exported_ids,
        [&ids[1], &ids[8], &ids[9], &ids[10], &ids[11]]
    );
    assert!(
        lines[1].ends_with(r#","data":{"dup":1,"dup":2,"x":1.50}}"#),
        "data embedded raw, as stored: {}",
        lines[1]
    );
    assert_eq!(exported[1]["topics"], json!(["busy", "quiet"]));

    // Into a directory that does not exist yet.
    let imported = work.path().join("imported");
    let out = cli(&[
        "import",
        "--data-dir",
        path(&imported),
        "--in",
        path(&export),
    ])
    .await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("new publishes continue at"),
        "{}",
        out.stderr
    );
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no staging directory left: {leftovers:?}"
    );
    let check = cli(&["check", "--data-dir", path(&imported)]).await;
    assert!(check.status.success(), "{}", check.stdout);

    // Exporting the import gives the same bytes back: times, topics, data, watermarks.
    let again = cli(&["export", "--data-dir", path(&imported)]).await;
    assert!(again.status.success(), "{}", again.stderr);
    assert_eq!(again.stdout, text);

    // Into an existing empty directory too; a gateway then serves it exactly
    // as the original, byte for byte.
    let copy_dir = TempDir::new().unwrap();
    let out = cli(&[
        "import",
        "--data-dir",
        path(copy_dir.path()),
        "--in",
        path(&export),
    ])
    .await;
    assert!(out.status.success(), "{}", out.stderr);
    let original = TestServer::start_in(source, |_| {}).await;
    let copy = TestServer::start_in(copy_dir, |_| {}).await;
    for (path, n) in [
        ("/topics/busy", 3),
        ("/topics/quiet", 2),
        // Several topics replay every retained event of each (quiet's two
        // older events too: never from the highest watermark among them).
        ("/events?topic=busy&topic=quiet", 5),
    ] {
        let want = replay(&original, path, n).await;
        assert_eq!(replay(&copy, path, n).await, want, "{path}");
    }
    assert_eq!(
        replay(&copy, "/topics/quiet", 2).await[1],
        (ids[8].clone(), "both".into(), r#""\u00e9\/é""#.into())
    );
    for topic in ["busy", "quiet"] {
        let info = format!("/topics/{topic}/info");
        // The replay streams above close asynchronously; `subscribers` drops
        // within a heartbeat (API.md), so wait for both to agree.
        let (copy, original, info) = (&copy, &original, &info);
        eventually("the copy's info to equal the original's", || async move {
            let theirs = copy.get_json(info).await;
            theirs == original.get_json(info).await && theirs.1["subscribers"] == 0
        })
        .await;
    }
    // Resuming from a trimmed id is a reset in both, the same one.
    for server in [&original, &copy] {
        let mut stream = server.subscribe("/topics/busy", Some(&ids[3])).await;
        let reset = stream.next_event().await;
        assert_eq!(reset.event, "reset");
        assert_eq!(reset.id, ids[8]);
        assert_eq!(
            reset.json(),
            json!({"reason": "retention", "requested": ids[3], "oldest": ids[9]})
        );
        // From an id above the watermark: no reset, nothing missed.
        let mut stream = server.subscribe("/topics/busy", Some(&ids[8])).await;
        assert_eq!(stream.next_event().await.id, ids[9]);
    }
    // New ids continue after the exported head, never reusing one.
    let next = copy.publish("quiet", "new", json!(true)).await;
    assert_eq!(next, format!("{epoch}-12"));
}

#[tokio::test]
async fn import_refuses_a_non_empty_dir_and_a_corrupt_export_leaving_nothing() {
    let source = fixture_copy();
    let work = TempDir::new().unwrap();
    let export = work.path().join("good.jsonl");
    let out = cli(&[
        "export",
        "--data-dir",
        path(source.path()),
        "--out",
        path(&export),
    ])
    .await;
    assert!(out.status.success(), "{}", out.stderr);
    let good = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    assert_eq!(lines.len(), 5, "{good}");

    // A directory that holds anything is refused, and left as it was.
    let occupied = work.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep.txt"), "mine").unwrap();
    let out = cli(&[
        "import",
        "--data-dir",
        path(&occupied),
        "--in",
        path(&export),
    ])
    .await;
    assert!(out.error_line().contains("not empty"), "{}", out.stderr);
    assert_eq!(std::fs::read_dir(&occupied).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_to_string(occupied.join("keep.txt")).unwrap(),
        "mine"
    );

    let with_line = |n: usize, line: &str| {
        let mut copy: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        copy[n - 1] = line.to_owned();
        copy.join("\n") + "\n"
    };
    let swapped = {
        let mut copy: Vec<&str> = lines.clone();
        copy.swap(2, 3);
        copy.join("\n") + "\n"
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not JSON",
            with_line(3, "{\"id\": "),
            "line 3: not an event line",
        ),
        (
            "ids out of order",
            swapped,
            "line 4: id ucMMIYGv-2 does not follow ucMMIYGv-3",
        ),
        (
            "another epoch",
            with_line(5, &lines[4].replace("ucMMIYGv-4", "Other-4")),
            "line 5: id \"Other-4\" is not of the header's epoch",
        ),
        (
            "bad topic",
            with_line(2, &lines[1].replace("projects:all", "projects all")),
            "line 2: invalid topic",
        ),
        (
            "reserved event name",
            with_line(2, &lines[1].replace("\"created\"", "\"reset\"")),
            "line 2: the event name \"reset\" is reserved",
        ),
        (
            "truncated",
            good[..good.len() - 10].to_owned(),
            "line 5: not an event line",
        ),
        (
            "not an export",
            with_line(1, r#"{"format":"something-else","version":1}"#),
            "line 1: not an export header",
        ),
        (
            "beyond the head",
            with_line(1, &lines[0].replace("\"head\":4", "\"head\":3")),
            "line 5: id ucMMIYGv-4 is beyond the header's head",
        ),
    ];
    for (what, text, expected) in cases {
        let input = work.path().join("bad.jsonl");
        std::fs::write(&input, &text).unwrap();
        let target = work.path().join("target");
        let out = cli(&["import", "--data-dir", path(&target), "--in", path(&input)]).await;
        let line = out.error_line();
        assert!(line.contains(expected), "{what}: {line}");
        assert!(!target.exists(), "{what}: nothing is left under the target");
        let mut left: Vec<String> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["bad.jsonl", "good.jsonl", "occupied"],
            "{what}: no staging left"
        );
    }
    // Through standard input as well.
    let target = work.path().join("from-stdin");
    let out = cli_with_input(&["import", "--data-dir", path(&target)], &good).await;
    assert!(out.status.success(), "{}", out.stderr);
    let check = cli(&["check", "--data-dir", path(&target)]).await;
    assert!(check.status.success(), "{}", check.stdout);
}

#[tokio::test]
async fn check_passes_a_clean_dir_and_names_the_damage_in_a_broken_one() {
    let server = TestServer::start(|_| {}).await;
    let first = server.publish("a", "e", json!(1)).await;
    let (status, answer) = server
        .post_raw("/publish", r#"{"topics": ["a", "b"], "data": 2}"#)
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED);
    let both = answer["id"].as_str().unwrap().to_owned();
    server.publish("b", "e", json!(3)).await;
    let dir = server.stop().await;

    let clean = cli(&["check", "--data-dir", path(dir.path())]).await;
    assert_eq!(clean.status.code(), Some(0), "{}", clean.stdout);
    assert!(
        clean.stdout.contains("3 events, 4 index entries, 2 topics"),
        "{}",
        clean.stdout
    );
    assert!(
        clean.stdout.contains("no problems found"),
        "{}",
        clean.stdout
    );

    {
        let db = sled::open(dir.path()).unwrap();
        // The record both index entries of event 2 point to goes.
        db.remove(codec::event_key(seq_of(&both))).unwrap();
        // An index entry for a topic event 1 is not in.
        db.insert(
            codec::index_key(&Topic::parse("c").unwrap(), seq_of(&first)),
            &[],
        )
        .unwrap();
        db.flush().unwrap();
    }
    let damaged = cli(&["check", "--data-dir", path(dir.path())]).await;
    assert_eq!(damaged.status.code(), Some(1), "{}", damaged.stdout);
    for expected in [
        format!("problem: t/a/2: refers to event {both}, which does not exist"),
        format!("problem: t/b/2: refers to event {both}, which does not exist"),
        format!("problem: t/c/1: refers to event {first}, which is not in topic c (its topics: a)"),
        "3 problems found".to_owned(),
    ] {
        assert!(
            damaged.stdout.contains(&expected),
            "{expected:?} in\n{}",
            damaged.stdout
        );
    }
    // Read only: the damage is still there for the operator to look at.
    let db = sled::open(dir.path()).unwrap();
    assert!(db.get(codec::event_key(seq_of(&both))).unwrap().is_none());
}

#[tokio::test]
async fn offline_commands_on_a_dir_locked_by_a_running_gateway_say_so_in_one_line() {
    let server = TestServer::start(|_| {}).await;
    server.publish("a", "e", json!(1)).await;
    let dir = path(server.dir()).to_owned();
    for args in [
        vec!["inspect", "--data-dir", &dir],
        vec!["check", "--data-dir", &dir],
        vec!["export", "--data-dir", &dir],
    ] {
        let out = cli(&args).await;
        let line = out.error_line();
        assert!(
            line.contains("locked by a running gateway"),
            "{args:?}: {line}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
        if args[0] == "check" {
            assert_eq!(out.status.code(), Some(2), "check could not run: exit 2");
        }
    }
    let out = cli_with_input(&["import", "--data-dir", &dir], "").await;
    assert!(out.error_line().contains("not empty"), "{}", out.stderr);
    // The gateway was not disturbed.
    let got = replay(&server, "/topics/a", 1).await;
    assert_eq!(got[0].2, "1");
}

#[test]
fn offline_commands_on_a_missing_dir_are_one_clear_error() {
    let dir = TempDir::new().unwrap();
    let missing: PathBuf = dir.path().join("nope");
    let (status, stdout, stderr) = run_binary(&["inspect", "--data-dir", path(&missing)]);
    assert!(!status.success(), "{stdout}");
    assert!(stderr.contains("not a data directory"), "{stderr}");
    assert!(!missing.exists(), "inspect creates nothing");
}

// ------------------------------------------------ rough edges (issue 14)

/// An error and its cause are said once, on one line.
#[test]
fn a_missing_config_file_is_one_clear_line() {
    let (status, _, stderr) = run_binary(&["serve", "--config", "/nonexistent/gateway.toml"]);
    assert!(!status.success());
    assert!(stderr.contains("/nonexistent/gateway.toml"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file").count(),
        1,
        "the cause is said once: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A second gateway on a data directory in use says so in words, once.
#[tokio::test]
async fn a_second_gateway_on_a_data_dir_in_use_says_it_is_locked() {
    let dir = TempDir::new().unwrap();
    let first = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let config = repo_path("config.toml");
    let (status, _, stderr) = run_binary(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!status.success());
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("is locked: another process uses it"),
        "{stderr}"
    );
    assert!(!last.contains("WouldBlock"), "no raw OS error: {last}");
    assert_eq!(last.matches("is locked").count(), 1, "{last}");
    first.kill9();
}

/// `--listen` takes a host name, like every other server.
#[tokio::test]
async fn listen_takes_a_host_name() {
    let dir = TempDir::new().unwrap();
    let gateway = GatewayProcess::start(dir.path(), "localhost:0", &[]);
    assert!(gateway.addr.ip().is_loopback(), "{}", gateway.addr);
    let (status, _) = get_json(&reqwest::Client::new(), &gateway.url("/healthz")).await;
    assert_eq!(status, 200);
    gateway.kill9();
    let (status, _, stderr) = run_binary(&["serve", "--listen", "no-such-host.invalid:x"]);
    assert!(!status.success());
    assert!(stderr.contains("--listen"), "names the flag too: {stderr}");
}

/// A token that grants nothing is refused instead of printed.
#[test]
fn the_token_command_refuses_a_token_that_grants_nothing() {
    let secret = "s".repeat(40);
    let (status, stdout, stderr) = run_binary(&["token", "--secret", &secret]);
    assert!(!status.success());
    assert!(stdout.is_empty(), "no token printed: {stdout}");
    assert!(stderr.contains("grant nothing"), "{stderr}");
    let (status, stdout, _) = run_binary(&["token", "--secret", &secret, "--subscribe", "t"]);
    assert!(status.success());
    assert_eq!(stdout.trim().split('.').count(), 3, "a JWT: {stdout}");
}

/// With tenancy, public topics cannot work (anonymous callers have no org):
/// the gateway says so at start instead of silently ignoring them.
#[tokio::test]
async fn public_topics_with_tenancy_get_a_start_up_warning() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nhs256_secret = \"{}\"\npublic_topics = [\"projects:all\"]\n[tenancy]\nenabled = true\n",
            "k".repeat(40)
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let gateway = GatewayProcess::start_with_config(&data, "127.0.0.1:0", Some(&config), &[]);
    let log = gateway.log.lock().unwrap().join("\n");
    assert!(log.contains("public_topics has no effect"), "{log}");
    gateway.kill9();
}

/// Every file of `dir` (recursively) with its bytes.
fn file_contents(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            files.extend(file_contents(&entry.path()));
        } else {
            files.insert(entry.path(), std::fs::read(entry.path()).unwrap());
        }
    }
    files
}

/// Issue 14: sled's open runs its recovery, which rewrote a damaged `db`
/// (70,790 bytes in the report) under `check`. The offline commands work on
/// a private copy: the directory they read stays byte for byte as it was,
/// damaged or not, and no copy is left behind.
#[tokio::test]
async fn offline_commands_never_write_to_the_directory_they_read() {
    let server = TestServer::start(|_| {}).await;
    for i in 0..300 {
        server
            .publish("t", "e", json!({"i": i, "pad": "p".repeat(400)}))
            .await;
    }
    let served = server.stop().await;
    // In a parent of its own, so "nothing left beside it" can be checked.
    let root = TempDir::new().unwrap();
    let data = root.path().join("data");
    copy_dir(served.path(), &data);
    let dir = &data;
    let db = dir.join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 64].fill(0xA5);
    std::fs::write(&db, &bytes).unwrap();
    let before = file_contents(dir);
    let parent = root.path().to_path_buf();
    let siblings_before = std::fs::read_dir(&parent).unwrap().count();
    let out_file = TempDir::new().unwrap();
    let export_to = out_file.path().join("out.jsonl");
    for args in [
        vec!["inspect", "--data-dir", path(dir)],
        vec!["check", "--data-dir", path(dir)],
        vec!["export", "--data-dir", path(dir), "--out", path(&export_to)],
    ] {
        let _ = cli(&args).await;
        assert!(
            file_contents(dir) == before,
            "{args:?} changed the directory it read"
        );
    }
    assert_eq!(
        std::fs::read_dir(&parent).unwrap().count(),
        siblings_before,
        "no private copy left behind"
    );
}

/// Issue 14: `--storage-backend redis` (flag or environment) on an offline
/// command used to export the sled `./data` and exit 0; the sled-only ones
/// refuse it (`export` and `import` work on Redis: tests/gateway/transfer.rs).
#[test]
fn offline_commands_refuse_a_redis_backend_flag_instead_of_reading_sled() {
    let dir = TempDir::new().unwrap();
    let (status, stdout, stderr) = run_binary(&[
        "check",
        "--storage-backend",
        "redis",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!status.success(), "{stdout}");
    assert!(stderr.contains("sled data directories only"), "{stderr}");
    let output = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args(["inspect", "--data-dir", dir.path().to_str().unwrap()])
        .env("SSE_GATEWAY_STORAGE_BACKEND", "redis-cluster")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sled data directories only"), "{stderr}");
}
