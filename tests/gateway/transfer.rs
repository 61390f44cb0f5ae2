//! Moving a log between backends with `export` / `import` (issue 14), run as
//! the real binary against real `redis-server` processes: sled → Redis and
//! Redis → sled keep every id, event, topic, watermark and idempotency key,
//! so clients resume across the move with no gap and no reset; and the
//! refusals (an existing Redis log, an unknown backend) say what is wrong and
//! change nothing.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::*;
use crate::redis::{redis_cli, redis_config, single, RedisServer};

/// Every topic keeps its 3 newest events, on both backends.
const RETENTION: &str = "[retention]\nmax_events_per_topic = 3\ntrim_interval_ms = 20\n";

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs the binary off the async runtime; panics with its stderr unless it succeeds.
async fn ok(args: &[&str]) -> String {
    let (status, stdout, stderr) = run(args).await;
    assert!(status.success(), "{args:?}: {stderr}");
    stdout
}

async fn run(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_binary(&args)
    })
    .await
    .expect("run the binary")
}

/// A config naming nothing but what the test gives (not the repo's).
fn config(dir: &Path, text: &str) -> std::path::PathBuf {
    let file = dir.join(format!("cli-{}.toml", crate::common::free_port()));
    std::fs::write(&file, text).expect("write config");
    file
}

/// A publish with an optional `Idempotency-Key`: status, replayed, body.
async fn post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (StatusCode, bool, Value) {
    let mut request = client
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("publish");
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.json().await.unwrap_or(Value::Null);
    (status, replayed, body)
}

const KEYED_BODY: &str = r#"{"event": "kept", "data": {"dup": 1, "dup": 2, "x": 1.50}}"#;
const BOTH_BODY: &str = r#"{"topics": ["busy", "quiet"], "event": "both", "data": "\u00e9\/é"}"#;

/// Publishes the same history on any gateway: ids[seq], head 11. `busy`
/// keeps 9..=11 (watermark 8); event 8 stays for `quiet` only; 2..=7 are
/// gone; event 1 was published with `Idempotency-Key: k-1`.
async fn publish_history(client: &reqwest::Client, base: &str) -> Vec<String> {
    let mut ids = vec![String::new()];
    let (status, _, answer) = post(client, base, "/topics/quiet", Some("k-1"), KEYED_BODY).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    ids.push(answer["id"].as_str().unwrap().to_owned());
    for i in 0..6 {
        ids.push(publish(client, base, "busy", "tick", json!(i)).await);
    }
    let (status, _, answer) = post(client, base, "/publish", None, BOTH_BODY).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    ids.push(answer["id"].as_str().unwrap().to_owned());
    for i in 6..9 {
        ids.push(publish(client, base, "busy", "tick", json!(i)).await);
    }
    let first = ids[9].clone();
    eventually("busy to be trimmed to its 3 newest", || {
        let first = first.clone();
        async move {
            let (_, info) = get_json(client, &format!("{base}/topics/busy/info")).await;
            info["count"] == 3 && info["first_id"] == first.as_str()
        }
    })
    .await;
    ids
}

/// Replays `path` from `Last-Event-ID: 0`: (id, event, data) of the first `n`, and no more.
async fn replay(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    n: usize,
) -> Vec<(String, String, String)> {
    let mut stream = SseReader::connect(client, &format!("{base}{path}"), Some("0")).await;
    let events = stream.take(n).await;
    stream.expect_no_event(Duration::from_millis(200)).await;
    events
        .into_iter()
        .map(|e| (e.id, e.event, e.data))
        .collect()
}

/// The moved log (`copy`) serves what the original serves, resumes without a
/// gap or reset, replays the key, and continues at head + 1.
async fn assert_moved(client: &reqwest::Client, original: &str, copy: &str, ids: &[String]) {
    for (path, n) in [
        ("/topics/busy", 3),
        ("/topics/quiet", 2),
        ("/events?topic=busy&topic=quiet", 5),
    ] {
        let want = replay(client, original, path, n).await;
        assert_eq!(replay(client, copy, path, n).await, want, "{path}");
    }
    let quiet = replay(client, copy, "/topics/quiet", 2).await;
    assert_eq!(
        quiet,
        [
            (
                ids[1].clone(),
                "kept".into(),
                r#"{"dup":1,"dup":2,"x":1.50}"#.into()
            ),
            (ids[8].clone(), "both".into(), r#""\u00e9\/é""#.into()),
        ],
        "ids, names and data bytes as published"
    );
    for topic in ["busy", "quiet"] {
        let url = |base: &str| format!("{base}/topics/{topic}/info");
        let (_, theirs) = get_json(client, &url(copy)).await;
        let (_, ours) = get_json(client, &url(original)).await;
        for field in ["count", "first_id", "last_id"] {
            assert_eq!(theirs[field], ours[field], "{topic} {field}");
        }
    }
    // Resuming from an id of the old log: the next event, no reset, no gap.
    let mut stream =
        SseReader::connect(client, &format!("{copy}/topics/busy"), Some(&ids[9])).await;
    let next: Vec<String> = stream.take(2).await.into_iter().map(|e| e.id).collect();
    assert_eq!(next, [ids[10].clone(), ids[11].clone()]);
    let mut stream =
        SseReader::connect(client, &format!("{copy}/topics/quiet"), Some(&ids[1])).await;
    let event = stream.next_event().await;
    assert_eq!(
        (event.event.as_str(), event.id.as_str()),
        ("both", &*ids[8])
    );
    // From a trimmed id: the same reset as the original's.
    for base in [original, copy] {
        let mut stream =
            SseReader::connect(client, &format!("{base}/topics/busy"), Some(&ids[3])).await;
        let reset = stream.next_event().await;
        assert_eq!(
            (reset.event.as_str(), reset.id.as_str()),
            ("reset", &*ids[8])
        );
        assert_eq!(
            reset.json(),
            json!({"reason": "retention", "requested": ids[3], "oldest": ids[9]})
        );
    }
    // The key replays the event it stored, storing nothing.
    let (status, replayed, answer) =
        post(client, copy, "/topics/quiet", Some("k-1"), KEYED_BODY).await;
    assert!(status.is_success() && replayed, "{status} {answer}");
    assert_eq!(answer["id"], ids[1].as_str());
    // New ids continue after the exported head.
    let next = publish(client, copy, "quiet", "new", json!(true)).await;
    assert_eq!(next, format!("{}-12", epoch_of(&ids[1])));
}

/// Lines of an export, with each key line's `expires_ms` (recomputed from
/// Redis's remaining TTL, so off by the milliseconds the move took) apart.
fn export_lines(text: &str) -> (Vec<String>, Vec<u64>) {
    let mut lines = Vec::new();
    let mut expiries = Vec::new();
    for line in text.lines() {
        let mut value: Value = serde_json::from_str(line).expect("export line is JSON");
        if let Some(expires) = value.get("expires_ms").and_then(Value::as_u64) {
            expiries.push(expires);
            value["expires_ms"] = json!(0);
            lines.push(value.to_string());
        } else {
            lines.push(line.to_owned());
        }
    }
    (lines, expiries)
}

fn assert_same_export(a: &str, b: &str, keys: usize) {
    let (lines_a, expiries_a) = export_lines(a);
    let (lines_b, expiries_b) = export_lines(b);
    assert_eq!(lines_a, lines_b, "the same export, line for line");
    assert_eq!(expiries_a.len(), keys, "idempotency keys: {a}");
    for (x, y) in expiries_a.iter().zip(&expiries_b) {
        assert!(x.abs_diff(*y) < 5_000, "key windows {x} vs {y}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_log_moves_to_redis_keeping_ids_topics_watermarks_and_keys() {
    let retain = |c: &mut sse_gateway::Config| {
        c.retention.max_events_per_topic = 3;
        c.retention.trim_interval_ms = 20;
    };
    let source = TestServer::start(retain).await;
    let ids = publish_history(&source.client, &source.base).await;
    let source_dir = source.stop().await;

    let work = TempDir::new().unwrap();
    let export = work.path().join("sled.jsonl");
    let sled_config = config(work.path(), "");
    ok(&[
        "export",
        "--config",
        path(&sled_config),
        "--data-dir",
        path(source_dir.path()),
        "--out",
        path(&export),
    ])
    .await;

    let redis = RedisServer::start();
    let url = redis.url();
    let stderr = run(&[
        "import",
        "--config",
        path(&sled_config),
        "--storage-backend",
        "redis",
        "--storage-url",
        &url,
        "--in",
        path(&export),
    ])
    .await;
    assert!(stderr.0.success(), "{}", stderr.2);
    assert!(stderr.2.contains("imported 5 events"), "{}", stderr.2);

    // Exported back from Redis: the same file (times, topics, data bytes, watermarks, key).
    let again = ok(&[
        "export",
        "--config",
        path(&sled_config),
        "--storage-backend",
        "redis",
        "--storage-url",
        &url,
    ])
    .await;
    assert_same_export(&std::fs::read_to_string(&export).unwrap(), &again, 1);

    let gateway_config = redis_config(work.path(), &single(&url), RETENTION);
    let gateway_dir = TempDir::new().unwrap();
    let gateway = GatewayProcess::start_with_config(
        gateway_dir.path(),
        "127.0.0.1:0",
        Some(&gateway_config),
        &[],
    );
    let original = TestServer::start_in(source_dir, retain).await;
    assert_moved(&original.client, &original.base, &gateway.base, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_log_moves_to_sled_keeping_ids_topics_watermarks_and_keys() {
    let redis = RedisServer::start();
    let url = redis.url();
    let work = TempDir::new().unwrap();
    let gateway_config = redis_config(work.path(), &single(&url), RETENTION);
    let gateway_dir = TempDir::new().unwrap();
    let gateway = GatewayProcess::start_with_config(
        gateway_dir.path(),
        "127.0.0.1:0",
        Some(&gateway_config),
        &[],
    );
    let client = reqwest::Client::new();
    let ids = publish_history(&client, &gateway.base).await;

    // From the environment this time; the config says sled.
    let sled_config = config(work.path(), "");
    let export = work.path().join("redis.jsonl");
    let (status, _, stderr) = tokio::task::spawn_blocking({
        let (export, sled_config, url) = (export.clone(), sled_config.clone(), url.clone());
        move || {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
                .args(["export", "--config", path(&sled_config), "--out"])
                .arg(&export)
                .env("SSE_GATEWAY_STORAGE_BACKEND", "redis")
                .env("SSE_GATEWAY_STORAGE_URL", &url)
                .output()
                .expect("run export");
            (
                output.status,
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("exported 5 events") && stderr.contains("and 1 idempotency keys"),
        "{stderr}"
    );

    let target = TempDir::new().unwrap();
    let dir = target.path().join("moved");
    ok(&[
        "import",
        "--config",
        path(&sled_config),
        "--data-dir",
        path(&dir),
        "--in",
        path(&export),
    ])
    .await;
    let again = ok(&[
        "export",
        "--config",
        path(&sled_config),
        "--data-dir",
        path(&dir),
    ])
    .await;
    assert_same_export(&std::fs::read_to_string(&export).unwrap(), &again, 1);

    let holder = TempDir::new().unwrap();
    std::fs::remove_dir(holder.path()).unwrap();
    std::fs::rename(&dir, holder.path()).unwrap();
    let copy = TestServer::start_in(holder, |c| {
        c.retention.max_events_per_topic = 3;
        c.retention.trim_interval_ms = 20;
    })
    .await;
    assert_moved(&client, &gateway.base, &copy.base, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_into_redis_refuses_an_existing_log_and_leaves_nothing_when_it_fails() {
    let source = TestServer::start(|_| {}).await;
    let first = source.publish("t", "e", json!(1)).await;
    source.publish("t", "e", json!(2)).await;
    let source_dir = source.stop().await;
    let work = TempDir::new().unwrap();
    let export = work.path().join("small.jsonl");
    let sled_config = config(work.path(), "");
    ok(&[
        "export",
        "--config",
        path(&sled_config),
        "--data-dir",
        path(source_dir.path()),
        "--out",
        path(&export),
    ])
    .await;
    let redis = RedisServer::start();
    let url = redis.url();
    let redis_args = |prefix: &str| {
        config(
            work.path(),
            &format!(
                "[storage]\nbackend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n"
            ),
        )
    };

    // storage.key_prefix is honoured.
    let moved = redis_args("moved");
    ok(&["import", "--config", path(&moved), "--in", path(&export)]).await;
    assert_eq!(redis_cli(redis.port, &["get", "{moved}:head"]), "2");
    assert_eq!(
        redis_cli(redis.port, &["get", "{moved}:epoch"]),
        epoch_of(&first)
    );
    let keys_before = redis_cli(redis.port, &["dbsize"]);

    // Again into the same log: refused, naming its keys, nothing changed.
    let (status, _, stderr) =
        run(&["import", "--config", path(&moved), "--in", path(&export)]).await;
    assert!(!status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("already holds a log under {moved}:*") && stderr.contains("{moved}:head"),
        "{stderr}"
    );
    assert_eq!(redis_cli(redis.port, &["dbsize"]), keys_before);
    assert_eq!(redis_cli(redis.port, &["get", "{moved}:head"]), "2");

    // `--org` names an org's log, as the gateway does with tenancy.
    ok(&[
        "import",
        "--config",
        path(&moved),
        "--org",
        "acme",
        "--in",
        path(&export),
    ])
    .await;
    assert_eq!(
        redis_cli(redis.port, &["get", "{moved:org:acme}:head"]),
        "2"
    );
    let from_org = ok(&["export", "--config", path(&moved), "--org", "acme"]).await;
    assert_same_export(&std::fs::read_to_string(&export).unwrap(), &from_org, 0);
    let keys_before = redis_cli(redis.port, &["dbsize"]);

    // A broken export (its last event beyond the head): refused, no key written.
    let text = std::fs::read_to_string(&export).unwrap();
    let broken = work.path().join("broken.jsonl");
    let bad_line = text.lines().last().unwrap().replace(
        &format!("{}-2", epoch_of(&first)),
        &format!("{}-9", epoch_of(&first)),
    );
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(
        &broken,
        format!("{}\n{bad_line}\n", lines[..lines.len() - 1].join("\n")),
    )
    .unwrap();
    let other = redis_args("other");
    let (status, _, stderr) =
        run(&["import", "--config", path(&other), "--in", path(&broken)]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("line 3: id") && stderr.contains("beyond"),
        "{stderr}"
    );
    assert_eq!(
        redis_cli(redis.port, &["--scan", "--pattern", "{other}*"]),
        ""
    );
    assert_eq!(redis_cli(redis.port, &["dbsize"]), keys_before);

    // Export from a prefix that holds no log: a clear error, no output file.
    let out = work.path().join("none.jsonl");
    let (status, _, stderr) = run(&["export", "--config", path(&other), "--out", path(&out)]).await;
    assert!(!status.success());
    assert!(stderr.contains("holds no log under {other}:*"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn an_unknown_backend_flag_is_refused_by_export_and_import() {
    let dir = TempDir::new().unwrap();
    for command in ["export", "import"] {
        let (status, stdout, stderr) = run_binary(&[
            command,
            "--storage-backend",
            "mongo",
            "--data-dir",
            path(dir.path()),
        ]);
        assert!(!status.success(), "{stdout}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("\"mongo\" is unknown") && stderr.contains("\"redis\""),
            "{stderr}"
        );
    }
    // `--org` names an org's Redis log; a sled directory has none.
    let (status, _, stderr) =
        run_binary(&["export", "--org", "acme", "--data-dir", path(dir.path())]);
    assert!(!status.success());
    assert!(
        stderr.contains("--org selects an org's Redis log"),
        "{stderr}"
    );
    // `--data-dir` names a sled directory: with Redis it is an error, not ignored.
    let (status, _, stderr) = run_binary(&[
        "export",
        "--storage-backend",
        "redis",
        "--data-dir",
        path(dir.path()),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("--data-dir is for the sled backend"),
        "{stderr}"
    );
    // A Cluster is refused by name, not treated as one server.
    let (status, _, stderr) = run_binary(&[
        "export",
        "--storage-backend",
        "redis-cluster",
        "--storage-url",
        "redis://127.0.0.1:1",
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("\"redis-cluster\": export and import work on a single Redis server only"),
        "{stderr}"
    );
    // So is Sentinel: the message says how to reach the primary instead.
    let (status, _, stderr) = run_binary(&[
        "export",
        "--storage-backend",
        "redis-sentinel",
        "--storage-url",
        "redis://127.0.0.1:1",
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("\"redis-sentinel\": export and import take the primary's address"),
        "{stderr}"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

/// A Redis import that fails part way (here `XADD` is unknown to the server,
/// after the epoch and head were written) deletes what it wrote, and what a
/// gateway would see in the meantime has no version key, which it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_import_that_fails_part_way_leaves_no_key() {
    let source = TestServer::start(|_| {}).await;
    source.publish("t", "e", json!(1)).await;
    let source_dir = source.stop().await;
    let work = TempDir::new().unwrap();
    let export = work.path().join("one.jsonl");
    let sled_config = config(work.path(), "");
    ok(&[
        "export",
        "--config",
        path(&sled_config),
        "--data-dir",
        path(source_dir.path()),
        "--out",
        path(&export),
    ])
    .await;
    let redis = RedisServer::start_with(&["--rename-command", "XADD", ""]);
    let (status, _, stderr) = run(&[
        "import",
        "--config",
        path(&sled_config),
        "--storage-backend",
        "redis",
        "--storage-url",
        &redis.url(),
        "--in",
        path(&export),
    ])
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains("XADD") || stderr.contains("unknown command"),
        "{stderr}"
    );
    assert_eq!(redis_cli(redis.port, &["--scan", "--pattern", "*"]), "");
}

/// Edge sizes of the Redis writer's batches: a log with no event (a header
/// alone) and one of exactly one batch (1000 events, no watermark, no key)
/// import, and export back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_log_and_one_full_batch_move_into_redis_and_back() {
    let work = TempDir::new().unwrap();
    let redis = RedisServer::start();
    let header = |head: u64| {
        format!(
            r#"{{"format":"sse-gateway-export","version":2,"epoch":"edge","head":{head},"trimmed":{{}}}}"#
        )
    };
    let mut full = header(1000) + "\n";
    for seq in 1..=1000 {
        full.push_str(&format!(
            "{{\"id\":\"edge-{seq}\",\"event\":\"e\",\"topics\":[\"t\"],\"time_ms\":{seq},\"data\":{seq}}}\n"
        ));
    }
    for (prefix, text, head) in [("empty", header(7) + "\n", "7"), ("full", full, "1000")] {
        let file = work.path().join(format!("{prefix}.jsonl"));
        std::fs::write(&file, &text).unwrap();
        let redis_config = config(
            work.path(),
            &format!(
                "[storage]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n",
                redis.url()
            ),
        );
        ok(&[
            "import",
            "--config",
            path(&redis_config),
            "--in",
            path(&file),
        ])
        .await;
        let version = format!("{{{prefix}}}:version");
        assert_eq!(redis_cli(redis.port, &["get", &version]), "1");
        let head_key = format!("{{{prefix}}}:head");
        assert_eq!(redis_cli(redis.port, &["get", &head_key]), head);
        let back = ok(&["export", "--config", path(&redis_config)]).await;
        assert_eq!(back, text, "{prefix}: byte for byte");
    }
}
