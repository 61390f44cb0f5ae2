//! Memory a stream holds while its client reads nothing: bounded in bytes,
//! whatever the size of the events (issue 15), measured on the real binary.

use std::time::Duration;

use serde_json::json;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// Resident memory of a process, in bytes (`VmRSS` of `/proc/<pid>/status`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// 24 events of 1 MB; 16 clients replay them from `0` through a 4 KiB
/// receive buffer and read nothing. Each stream may hold one write's worth
/// (`MAX_CHUNK_BYTES`, or one event when that alone is larger): 16 streams
/// must cost megabytes, not the ~38 MB each that whole replay batches did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_hold_a_bounded_number_of_bytes_whatever_the_event_size() {
    const EVENTS: usize = 24;
    const STREAMS: usize = 16;
    const EVENT_BYTES: usize = 1_000_000;
    let dir = TempDir::new().unwrap();
    let gateway = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let client = reqwest::Client::new();
    let big = "x".repeat(EVENT_BYTES);
    for i in 0..EVENTS {
        publish(
            &client,
            &gateway.base,
            "big",
            "e",
            json!({"i": i, "pad": big}),
        )
        .await;
    }
    let before = rss_bytes(gateway.pid());
    let mut stalled = Vec::new();
    for _ in 0..STREAMS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut socket = socket.connect(gateway.addr).await.unwrap();
        socket
            .write_all(b"GET /topics/big HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 0\r\n\r\n")
            .await
            .unwrap();
        stalled.push(socket);
    }
    let (client_ref, info) = (&client, gateway.url("/topics/big/info"));
    let info = &info;
    eventually("every stalled stream to be subscribed", || async move {
        get_json(client_ref, info).await.1["subscribers"] == STREAMS
    })
    .await;
    // Let every stream read and encode as far as it can before it blocks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes(gateway.pid());
    let grown = after.saturating_sub(before);
    let per_stream = grown / STREAMS as u64;
    eprintln!("RSS {before} -> {after} bytes: {per_stream} bytes per stalled stream");
    assert!(
        per_stream < 4 * EVENT_BYTES as u64,
        "a stalled stream holds {per_stream} bytes; the bound is one write \
         (256 KiB, or one 1 MB event) plus transient reads"
    );
    drop(stalled);
}

/// Threads of a process (`Threads:` of `/proc/<pid>/status`).
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads")
}

/// A reconnect storm (300 streams replaying at once) must not grow the
/// process by a thread per concurrent replay read: the soak found dozens of
/// idle blocking threads, each holding a stack and a malloc arena.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_storm_uses_a_bounded_number_of_threads() {
    const STREAMS: usize = 300;
    let dir = TempDir::new().unwrap();
    let gateway = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let client = reqwest::Client::new();
    for i in 0..300 {
        publish(
            &client,
            &gateway.base,
            "storm",
            "e",
            json!({"i": i, "pad": "s".repeat(2000)}),
        )
        .await;
    }
    let mut streams = Vec::new();
    let mut most = 0;
    for _ in 0..STREAMS {
        let mut socket = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        socket
            .write_all(b"GET /topics/storm HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 0\r\n\r\n")
            .await
            .unwrap();
        streams.push(socket);
        most = most.max(threads(gateway.pid()));
    }
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        most = most.max(threads(gateway.pid()));
    }
    eprintln!("most threads during the storm: {most}");
    // 2 request + 2 stream workers, at most 8 blocking readers, the log
    // writer, sled's and tokio's own: about 22 here; 35 with the default pool.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let bound = 18 + 5 * cores;
    assert!(
        most <= bound,
        "{most} threads for {STREAMS} replaying streams (bound {bound})"
    );
    drop(streams);
}

/// More streams replaying large events at once than the replay-read budget
/// holds (`limits.replay_read_budget_bytes` = one read): the reads wait
/// their turn — counted in `sse_gateway_replay_budget_waits` — and every
/// stream still gets every event once, in order. Fails if reads skip the
/// budget (no wait is ever counted) or if a reservation is never given back
/// (the storm stalls after the first read).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_storm_larger_than_the_read_budget_waits_its_turn_and_loses_nothing() {
    const EVENTS: usize = 24;
    const STREAMS: usize = 24;
    let server = TestServer::start(|c| c.limits.replay_read_budget_bytes = 512 * 1024).await;
    let pad = "b".repeat(100_000);
    let mut ids = Vec::new();
    for i in 0..EVENTS {
        ids.push(
            server
                .publish("budget", "e", json!({"i": i, "pad": pad}))
                .await,
        );
    }
    let readers: Vec<_> = (0..STREAMS)
        .map(|_| {
            let url = server.url("/topics/budget");
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut reader = SseReader::connect(&client, &url, Some("0")).await;
                reader.take(EVENTS).await
            })
        })
        .collect();
    for reader in readers {
        let events = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("a replay storm under the budget must finish")
            .expect("reader task");
        let got: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(got, ids, "every event once, in order");
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event.json()["i"], i);
        }
    }
    let metrics = metrics_text(&reqwest::Client::new(), &server.base).await;
    let waits = metric_value(&metrics, "sse_gateway_replay_budget_waits_total");
    eprintln!("replay reads that waited for the budget: {waits}");
    assert!(
        waits > 0.0,
        "{STREAMS} streams replaying at once never waited for a one-read budget"
    );
}
