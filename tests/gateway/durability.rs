//! Durability: restart, `kill -9` under publish load, SIGTERM drain, and the
//! on-disk format (opening a v1 data dir, refusing a newer one).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tempfile::TempDir;

use crate::common::*;

#[tokio::test]
async fn restart_resumes_with_no_gap_and_no_duplicate() {
    let server = TestServer::start(|_| {}).await;
    let mut stream = server.subscribe("/topics/t", None).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(server.publish("t", "e", json!(i)).await);
    }
    let seen = stream.take(5).await;
    let last_seen = seen.last().unwrap().id.clone();
    drop(stream);
    let dir = server.stop().await;

    let server = TestServer::start_in(dir, |_| {}).await;
    for i in 10..20 {
        ids.push(server.publish("t", "e", json!(i)).await);
    }
    assert_eq!(
        epoch_of(&ids[0]),
        epoch_of(&ids[19]),
        "same log, same epoch"
    );
    assert!(
        ids.windows(2).all(|w| seq_of(&w[1]) == seq_of(&w[0]) + 1),
        "ids keep growing across the restart: {ids:?}"
    );
    let mut resumed = server.subscribe("/topics/t", Some(&last_seen)).await;
    let rest = resumed.take(15).await;
    assert_eq!(
        rest.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        ids[5..]
    );
    assert_eq!(
        rest.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        (5..20).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    resumed.expect_no_event(Duration::from_millis(100)).await;
}

/// Publishers hammer the real binary; it is `kill -9`ed mid-stream; after a
/// restart every acknowledged event is there with its exact data, and new ids
/// continue above every id ever acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_acknowledged_event_and_reuses_no_id() {
    let dir = TempDir::new().unwrap();
    let gateway = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let base = gateway.base.clone();
    let client = reqwest::Client::new();
    let publishers = AckingPublishers::start(&client, &base, "crash", 8);
    publishers.wait_for(300).await;
    gateway.kill9();
    let acked = publishers.stop().await;
    assert!(acked.len() >= 300);
    let max_acked = acked.keys().map(|id| seq_of(id)).max().unwrap();

    let gateway = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let previous = assert_every_acked_event_replays(&client, &gateway.base, "crash", &acked).await;
    let new_id = publish(&client, &gateway.base, "crash", "after", json!("after")).await;
    assert!(
        seq_of(&new_id) > max_acked,
        "no id is reused: {new_id} vs max acked {max_acked}"
    );
    assert!(
        seq_of(&new_id) > previous,
        "no id is reused: {new_id} vs newest stored {previous}"
    );
}

/// SIGTERM while publishes are in flight: every `201` is on disk, streams are
/// closed (clients reconnect), and the exit code is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_publishes_closes_streams_and_exits_zero() {
    let dir = TempDir::new().unwrap();
    let gateway = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let client = reqwest::Client::new();
    let mut stream = SseReader::connect(&client, &gateway.url("/topics/t"), None).await;
    stream.until_blocks(2).await;
    let acked: Arc<Mutex<Vec<String>>> = Default::default();
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let (client, url, acked) = (client.clone(), gateway.url("/topics/t"), Arc::clone(&acked));
        publishers.push(tokio::spawn(async move {
            for i in 0..2000 {
                let Ok(response) = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(json!({"data": i}).to_string())
                    .send()
                    .await
                else {
                    break;
                };
                match response.status().as_u16() {
                    201 => {
                        let answer: serde_json::Value = response.json().await.unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .push(answer["id"].as_str().unwrap().to_owned());
                    }
                    503 => break,
                    other => panic!("unexpected {other}"),
                }
            }
        }));
    }
    let acked_ref = Arc::clone(&acked);
    eventually("publishes under way", || {
        let acked = Arc::clone(&acked_ref);
        async move { acked.lock().unwrap().len() >= 100 }
    })
    .await;
    let status = tokio::task::spawn_blocking(move || gateway.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        stream.until_closed(Duration::from_secs(5)).await,
        "the stream was closed"
    );
    // Closed by the gateway with the last chunk, not cut by the process dying.
    assert!(stream.ended_cleanly, "the stream ended with its last chunk");
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let gateway = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let mut replay = SseReader::connect(&client, &gateway.url("/topics/t"), Some("0")).await;
    let (_, info) = get_json(&client, &gateway.url("/topics/t/info")).await;
    let stored: Vec<String> = replay
        .take(info["count"].as_u64().unwrap() as usize)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    for id in &acked {
        assert!(
            stored.contains(id),
            "acknowledged {id} missing after SIGTERM"
        );
    }
}

#[tokio::test]
async fn a_data_dir_written_by_format_v1_opens_and_continues() {
    let dir = TempDir::new().unwrap();
    copy_dir(&repo_path("tests/fixtures/v1-data"), dir.path());
    // The fixture's events are from 2026-11-27 and age: past the default
    // `max_age_s` (7 days) the trimmer would remove them at start.
    let server = TestServer::start_in(dir, |c| c.retention.max_age_s = FIXTURE_AGE_LIMIT_S).await;
    let mut stream = server.subscribe("/topics/projects:all", Some("0")).await;
    let events = stream.take(4).await;
    let got: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.id.as_str(), e.event.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("ucMMIYGv-1", "created", r#"{"n":1,"text":"é \u00e9"}"#),
            ("ucMMIYGv-2", "created", r#"{"n":2,"text":"é \u00e9"}"#),
            ("ucMMIYGv-3", "created", r#"{"n":3,"text":"é \u00e9"}"#),
            ("ucMMIYGv-4", "task_updated", "[1.0,2e3]"),
        ]
    );
    let (_, tasks) = server.get_json("/topics/projects:tasks/info").await;
    assert_eq!(tasks["count"], 1);
    // Ids from before the upgrade still resume, and new ids continue the log.
    let mut resumed = server
        .subscribe("/topics/projects:all", Some("ucMMIYGv-3"))
        .await;
    assert_eq!(resumed.next_event().await.id, "ucMMIYGv-4");
    assert_eq!(
        server.publish("projects:all", "e", json!(5)).await,
        "ucMMIYGv-5"
    );
}

#[tokio::test]
async fn a_data_dir_from_a_newer_format_is_refused_with_a_clear_message() {
    let dir = TempDir::new().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert("m/format", &99u32.to_be_bytes()).unwrap();
        db.insert("m/epoch", "future").unwrap();
        db.flush().unwrap();
    }
    let (status, _, stderr) = run_binary(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("format version 99 is newer"), "{stderr}");
    // Nothing was changed: the version is still 99.
    let db = sled::open(dir.path()).unwrap();
    assert_eq!(
        db.get("m/format").unwrap().unwrap().as_ref(),
        &99u32.to_be_bytes()
    );
}

#[tokio::test]
async fn a_data_dir_with_data_but_no_format_is_refused_and_left_alone() {
    let dir = TempDir::new().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert("something", "else").unwrap();
        db.flush().unwrap();
    }
    let (status, _, stderr) = run_binary(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("no format version"), "{stderr}");
    let db = sled::open(dir.path()).unwrap();
    assert!(db.get("m/format").unwrap().is_none());
    assert_eq!(db.get("something").unwrap().unwrap().as_ref(), b"else");
}

#[tokio::test]
async fn a_second_gateway_on_the_same_data_dir_is_refused() {
    let server = TestServer::start(|_| {}).await;
    let (status, _, stderr) = run_binary(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        server.dir().to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(stderr.to_lowercase().contains("lock"), "{stderr}");
}

#[test]
fn config_errors_name_the_key_and_exit_non_zero() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[stream]\nheartbeat_msec = 5\n").unwrap();
    let (status, _, stderr) = run_binary(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!status.success());
    assert!(stderr.contains("heartbeat_msec"), "{stderr}");
    let (status, _, stderr) = run_binary(&[
        "serve",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[tokio::test]
async fn env_vars_override_listen_and_data_dir() {
    let dir = TempDir::new().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .env("SSE_GATEWAY_CONFIG", repo_path("config.toml"))
        // Another loopback address than config.toml's 127.0.0.1: the
        // listening line then shows whether the variable was used.
        .env("SSE_GATEWAY_LISTEN", "127.0.0.2:0")
        .env("SSE_GATEWAY_DATA_DIR", dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("listening on http://"))
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("gateway listened");
    assert!(
        line.contains("listening on http://127.0.0.2:"),
        "SSE_GATEWAY_LISTEN was used: {line}"
    );
    assert!(
        dir.path().join("conf").exists(),
        "sled opened in SSE_GATEWAY_DATA_DIR"
    );
}
