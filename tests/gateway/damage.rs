//! A data directory that lost acknowledged events (damaged on disk after a
//! clean stop): `serve` refuses it and says what to do, `check` reports it,
//! `repair` saves a copy and makes it servable with no id handed out twice.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use crate::common::*;

/// Events published before the damage.
const PUBLISHED: u64 = 300;

/// Runs `serve` on `data` and waits up to 30 s for it to exit: `Ok` with its
/// status and stderr, or `Err` if it is still running (it started serving).
fn serve_until_exit(data: &Path) -> Result<(ExitStatus, String), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(repo_path("config.toml"))
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = collect_stderr(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            std::thread::sleep(Duration::from_millis(100));
            let text = String::from_utf8_lossy(&stderr.lock().expect("stderr")).into_owned();
            return Ok((status, text));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let text = String::from_utf8_lossy(&stderr.lock().expect("stderr")).into_owned();
            return Err(text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_lost_acknowledged_events_is_refused_until_repaired() {
    let dir = TempDir::new().expect("tempdir");
    let data = dir.path().join("data");
    let client = fresh_client();
    let gateway = start_gateway(&data, "127.0.0.1:0", None).await;
    let mut sent = Vec::new();
    for i in 0..PUBLISHED {
        let data = json!({ "i": i, "pad": "x".repeat(200) });
        let id = publish(&client, &gateway.base, "orders", "placed", data.clone()).await;
        assert_eq!(seq_of(&id), i + 1);
        sent.push(data.to_string());
    }
    assert!(gateway.terminate().success(), "clean stop");

    // What an operator reported (issue 14): 64 bytes overwritten in the
    // middle of `db`. sled's recovery keeps what precedes the damage.
    let db = data.join("db");
    let len = std::fs::metadata(&db).expect("db").len();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open db");
    file.seek(SeekFrom::Start(len / 2)).expect("seek");
    file.write_all(&[0xA5; 64]).expect("damage");
    file.sync_all().expect("sync");
    drop(file);

    // `serve` refuses, names what is missing and the two commands.
    let (status, stderr) = serve_until_exit(&data)
        .unwrap_or_else(|log| panic!("serve started on a damaged directory:\n{log}"));
    assert!(!status.success(), "serve must refuse: {stderr}");
    // sled opened it "successfully" with the events after the damage gone:
    // only the mark tells.
    assert!(
        stderr.contains("lost acknowledged events")
            && stderr.contains(&format!("-{PUBLISHED} were acknowledged"))
            && stderr.contains("sse-gateway check")
            && stderr.contains("sse-gateway repair"),
        "serve says what is missing and what to do: {stderr}"
    );

    // `check` (read-only, on a copy) reports the loss: exit 1.
    let data_arg = data.to_str().expect("utf-8 path");
    let (status, stdout, stderr) = run_binary(&["check", "--data-dir", data_arg]);
    assert_eq!(
        status.code(),
        Some(1),
        "check finds the damage:\n{stdout}{stderr}"
    );
    assert!(
        stdout.contains("acked-head") || stdout.contains("problem"),
        "{stdout}"
    );

    // `repair` saves a copy first, then makes the directory servable.
    let (status, stdout, stderr) = run_binary(&["repair", "--data-dir", data_arg]);
    assert!(status.success(), "repair:\n{stdout}{stderr}");
    let saved: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read tempdir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("data.damaged-"))
        .collect();
    assert_eq!(saved.len(), 1, "one saved copy: {stdout}");
    // The copy keeps the mark that says what was acknowledged. (It is the
    // directory after sled's recovery: sled 0.34 has no read-only open, so
    // the refused `serve` above already ran it — see the README.)
    let saved_mark = std::fs::read(saved[0].path().join("acked-head")).expect("saved mark");
    assert!(!saved_mark.is_empty());
    assert!(saved[0].path().join("db").is_file());

    // It starts; what is left replays in order with its exact data; the
    // next id comes after every acknowledged one.
    let gateway = start_gateway(&data, "127.0.0.1:0", None).await;
    let (_, info) = get_json(&client, &gateway.url("/topics/orders/info")).await;
    let kept = info["count"].as_u64().expect("count");
    assert!(kept < PUBLISHED, "the damage cost events: {info}");
    let mut replay = SseReader::connect(&client, &gateway.url("/topics/orders"), Some("0")).await;
    let mut previous = 0;
    for event in replay.take(kept as usize).await {
        let seq = seq_of(&event.id);
        assert!(seq > previous, "in order");
        previous = seq;
        assert_eq!(
            event.data,
            sent[(seq - 1) as usize],
            "exact data of {}",
            event.id
        );
    }
    let next = publish(&client, &gateway.base, "orders", "placed", json!("after")).await;
    assert_eq!(
        seq_of(&next),
        PUBLISHED + 1,
        "no acknowledged id is handed out again"
    );
    assert!(gateway.terminate().success());

    // A clean directory: `repair` changes nothing that matters and `check` is clean.
    let (status, stdout, _) = run_binary(&["check", "--data-dir", data_arg]);
    assert_eq!(status.code(), Some(0), "{stdout}");
}
