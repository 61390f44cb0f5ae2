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
    let mut sent = Vec::new();
    // Two runs: the second start writes sled's snapshot, so what the third
    // (damaged) start's recovery replays and may rewrite is the second
    // run's part of `db` only; the first run's segments must stay as they are.
    for run in 0..2 {
        let gateway = start_gateway(&data, "127.0.0.1:0", None).await;
        for i in run * PUBLISHED / 2..(run + 1) * PUBLISHED / 2 {
            // Large enough that `db` spans several of sled's 512 KiB segments.
            let data = json!({ "i": i, "pad": "x".repeat(3000) });
            let id = publish(&client, &gateway.base, "orders", "placed", data.clone()).await;
            assert_eq!(seq_of(&id), i + 1);
            sent.push(data.to_string());
        }
        assert!(gateway.terminate().success(), "clean stop");
    }

    // What an operator reported (issue 14): 64 bytes overwritten in `db`,
    // here in the second run's part: the middle of the segment before the
    // last in sled's log order (in the last, they may fall past its end;
    // earlier, sled 0.34 may panic at open instead of dropping the rest).
    // sled's recovery keeps what precedes the damage.
    let db = data.join("db");
    let len = std::fs::metadata(&db).expect("db").len();
    assert!(len > 2 * SEGMENT, "several segments: {len}");
    let damage_at = second_newest_segment(&data.join("db")) + SEGMENT / 2;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open db");
    file.seek(SeekFrom::Start(damage_at)).expect("seek");
    file.write_all(&[0xA5; 64]).expect("damage");
    file.sync_all().expect("sync");
    drop(file);
    // The directory as the operator left it, before anything opens it.
    let damaged = std::fs::read(&db).expect("read db");
    let snaps_before = snap_files(&data);

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
    // sled's recovery rewrote `db` from the damage on before the refusal...
    assert_ne!(
        std::fs::read(&db).expect("read db"),
        damaged,
        "sled's recovery rewrote db (else there is nothing to keep)"
    );
    // ...but the bytes it rewrote were kept first, byte for byte, and the
    // message says where.
    let pre_open = dir.path().join("data.pre-open");
    assert!(
        stderr.contains(&pre_open.display().to_string()),
        "serve says where the bytes are: {stderr}"
    );
    assert_preserved(&pre_open, &damaged, damage_at);
    // A second refused start keeps them (it would only see rewritten bytes).
    let (status, _) = serve_until_exit(&data).expect("refused again");
    assert!(!status.success());
    assert_preserved(&pre_open, &damaged, damage_at);

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
    // The copy keeps the mark that says what was acknowledged.
    let saved_mark = std::fs::read(saved[0].path().join("acked-head")).expect("saved mark");
    assert!(!saved_mark.is_empty());
    // The copy holds `db` as it was before any open: the refused start kept
    // what sled's recovery rewrote, and `repair` put it back (then removed
    // the kept bytes). Except the segments sled found holding no live page
    // (every version in them superseded before the damage) and zeroed whole
    // at open, as it does at every start (`preserve.rs`).
    let saved_db = std::fs::read(saved[0].path().join("db")).expect("saved db");
    assert_eq!(saved_db.len(), damaged.len(), "the original length");
    let damaged_segment = damage_at / SEGMENT * SEGMENT;
    let differing = differing_segments(&saved_db, &damaged);
    for &(offset, _) in &differing {
        let segment = &saved_db[offset as usize..(offset + SEGMENT) as usize];
        assert!(
            segment.iter().all(|&b| b == 0) && offset != damaged_segment,
            "the saved copy differs from the original in segment {offset}, which sled did not free: {differing:?}"
        );
    }
    assert_eq!(
        snap_files(&saved[0].path()),
        snaps_before,
        "sled's snapshots as they were"
    );
    assert!(stdout.contains("put back"), "{stdout}");
    assert!(!pre_open.exists(), "repair removed the kept bytes");

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

/// sled 0.34.7's segment size.
const SEGMENT: u64 = 512 * 1024;

/// The offset of the segment with the second-highest LSN in `db`: each
/// segment starts with `crc(4) lsn(8) max_stable_lsn(8)`, little-endian, the
/// crc inverted and the LSNs xored with `0x7FFF_FFFF_FFFF_FFFF`.
fn second_newest_segment(db: &Path) -> u64 {
    let bytes = std::fs::read(db).expect("read db");
    let mut segments: Vec<(i64, u64)> = bytes
        .chunks(SEGMENT as usize)
        .enumerate()
        .filter(|(_, s)| s.len() >= 20)
        .filter_map(|(i, s)| {
            let crc = u32::from_le_bytes(s[0..4].try_into().unwrap()) ^ 0xFFFF_FFFF;
            let lsn = i64::from_le_bytes(s[4..12].try_into().unwrap()) ^ 0x7FFF_FFFF_FFFF_FFFF;
            (crc32fast::hash(&s[4..20]) == crc).then_some((lsn, i as u64 * SEGMENT))
        })
        .collect();
    segments.sort();
    assert!(segments.len() >= 2, "segments: {segments:?}");
    segments[segments.len() - 2].1
}

/// The offsets of the segments where `a` and `b` differ, with how many bytes.
fn differing_segments(a: &[u8], b: &[u8]) -> Vec<(u64, usize)> {
    a.chunks(SEGMENT as usize)
        .zip(b.chunks(SEGMENT as usize))
        .enumerate()
        .map(|(i, (x, y))| {
            (
                i as u64 * SEGMENT,
                x.iter().zip(y).filter(|(p, q)| p != q).count(),
            )
        })
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// `(name, contents)` of sled's `snap.*` files in `dir`.
fn snap_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
        .map(|e| {
            let bytes = std::fs::read(e.path()).expect("read snap");
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

/// `pre_open` (`<dir>.pre-open`) holds `original`'s length and, byte for
/// byte, the ranges its `ranges` list names, which cover the damage.
fn assert_preserved(pre_open: &Path, original: &[u8], damage: u64) {
    let list = std::fs::read_to_string(pre_open.join("ranges"))
        .unwrap_or_else(|e| panic!("no kept bytes in {}: {e}", pre_open.display()));
    let kept = std::fs::read(pre_open.join("db")).expect("kept db");
    let mut lines = list.lines().skip(1);
    let len: usize = lines
        .next()
        .and_then(|l| l.strip_prefix("db-len "))
        .and_then(|v| v.parse().ok())
        .expect("db-len");
    assert_eq!(len, original.len(), "the original length");
    let mut covered = Vec::new();
    for line in lines {
        let mut parts = line["range ".len()..].split(' ');
        let offset: usize = parts.next().and_then(|v| v.parse().ok()).expect("offset");
        let n: usize = parts.next().and_then(|v| v.parse().ok()).expect("len");
        assert!(
            kept[offset..offset + n] == original[offset..offset + n],
            "kept bytes {offset}+{n} differ from the original"
        );
        covered.push((offset, offset + n));
    }
    assert!(
        covered
            .iter()
            .any(|&(a, b)| a as u64 <= damage && damage + 64 <= b as u64),
        "the damaged bytes are among those kept: {list}"
    );
}

/// Nothing of the preservation is left beside `data`.
fn assert_nothing_left(data: &Path) {
    let parent = data.parent().expect("parent");
    let left: Vec<_> = std::fs::read_dir(parent)
        .expect("read parent")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("pre-open"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_nothing_before_opening() {
    let dir = TempDir::new().expect("tempdir");
    let data = dir.path().join("data");
    let client = fresh_client();
    let gateway = start_gateway(&data, "127.0.0.1:0", None).await;
    for i in 0..50 {
        publish(
            &client,
            &gateway.base,
            "orders",
            "placed",
            json!({ "i": i }),
        )
        .await;
    }
    assert!(gateway.terminate().success());
    let gateway = start_gateway(&data, "127.0.0.1:0", None).await;
    // Ready: the open was accepted and the kept bytes are gone already.
    assert_nothing_left(&data);
    let next = publish(&client, &gateway.base, "orders", "placed", json!("after")).await;
    assert_eq!(seq_of(&next), 51);
    assert!(gateway.terminate().success());
    assert_nothing_left(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_is_no_damage_and_keeps_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let data = dir.path().join("data");
    let client = fresh_client();
    let gateway = start_gateway(&data, "127.0.0.1:0", None).await;
    // A publisher running flat out while the gateway is killed: a torn
    // tail of writes never acknowledged, not damage.
    let base = gateway.base.clone();
    let publisher = tokio::spawn({
        let client = client.clone();
        async move {
            let mut acked = 0u64;
            loop {
                let response = client
                    .post(format!("{base}/topics/orders"))
                    .json(&json!({ "event": "placed", "data": { "pad": "x".repeat(500) } }))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => acked += 1,
                    _ => return acked,
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.kill9();
    let acked = publisher.await.expect("publisher");
    assert!(acked > 0, "something was acknowledged before the kill");
    let gateway = start_gateway(&data, "127.0.0.1:0", None).await;
    assert_nothing_left(&data);
    let (_, info) = get_json(&client, &gateway.url("/topics/orders/info")).await;
    assert!(
        info["count"].as_u64().expect("count") >= acked,
        "every acknowledged event is there: {info} vs {acked}"
    );
    assert!(gateway.terminate().success());
    assert_nothing_left(&data);
}
