//! `Idempotency-Key` and `POST /publish/batch` on the sled log: replays,
//! reuse, in-flight repeats, restarts, `kill -9`, expiry, export/import,
//! tenancy; batch order, atomicity, limits and mixed replays.
//! (Redis, two nodes: `redis.rs`.)

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sse_gateway::config::AuthConfig;
use tempfile::TempDir;

use crate::common::*;

const SECRET: &str = "idempotency-tests-secret-0123456789abcdef";

/// One answer: status, whether `Idempotent-Replayed: true` was set, body.
struct Answer {
    status: StatusCode,
    replayed: bool,
    body: Value,
}

impl Answer {
    fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("an id in {} ({})", self.body, self.status))
            .to_owned()
    }

    fn ids(&self) -> Vec<String> {
        self.body["ids"]
            .as_array()
            .unwrap_or_else(|| panic!("ids in {} ({})", self.body, self.status))
            .iter()
            .map(|v| v.as_str().expect("id").to_owned())
            .collect()
    }

    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    token: Option<&str>,
    body: Value,
) -> Answer {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("publish request");
    let status = response.status();
    let replayed = match response.headers().get("idempotent-replayed") {
        None => false,
        Some(v) => {
            assert_eq!(v, "true", "the only value of Idempotent-Replayed");
            true
        }
    };
    let text = response.text().await.expect("body");
    Answer {
        status,
        replayed,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

async fn keyed(server: &TestServer, path: &str, key: Option<&str>, body: Value) -> Answer {
    post(&server.client, &server.url(path), key, None, body).await
}

/// Retained events of `topic` (`/topics/{topic}/info`).
async fn count(client: &reqwest::Client, base: &str, topic: &str) -> u64 {
    let (status, info) = get_json(client, &format!("{base}/topics/{topic}/info")).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    info["count"].as_u64().expect("count")
}

#[tokio::test]
async fn a_retry_with_the_same_key_gets_the_first_answer_and_stores_nothing() {
    let server = TestServer::start(|_| {}).await;
    let first = keyed(&server, "/topics/a", Some("k-1"), json!({"data": {"n": 1}})).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(!first.replayed, "a first store is no replay");
    let mut stream = server.subscribe("/topics/a", Some("0")).await;
    assert_eq!(stream.next_event().await.id, first.id());

    // The same request again, through each route that can carry it.
    let again = keyed(&server, "/topics/a", Some("k-1"), json!({"data": {"n": 1}})).await;
    let many = keyed(
        &server,
        "/publish",
        Some("k-1"),
        json!({"topics": ["a", "a"], "event": "message", "data": {"n":1}}),
    )
    .await;
    let batch = keyed(
        &server,
        "/publish/batch",
        None,
        json!({"events": [{"topics": ["a"], "data": {"n": 1}, "idempotency_key": "k-1"}]}),
    )
    .await;
    for answer in [&again, &many] {
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        assert!(answer.replayed, "Idempotent-Replayed: true");
        assert_eq!(answer.body, first.body, "the original id and topics");
    }
    assert_eq!(batch.status, StatusCode::CREATED, "{}", batch.body);
    assert!(batch.replayed);
    assert_eq!(batch.ids(), [first.id()]);

    assert_eq!(count(&server.client, &server.base, "a").await, 1);
    stream.expect_no_event(Duration::from_millis(300)).await;
    // Nothing was used up either: the next event takes the next id.
    let next = server.publish("a", "message", json!(2)).await;
    assert_eq!(seq_of(&next), seq_of(&first.id()) + 1);
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_422_and_stores_nothing() {
    let server = TestServer::start(|_| {}).await;
    let first = keyed(&server, "/topics/a", Some("k"), json!({"data": 1})).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_data = keyed(&server, "/topics/a", Some("k"), json!({"data": 2})).await;
    let other_name = keyed(
        &server,
        "/topics/a",
        Some("k"),
        json!({"event": "e", "data": 1}),
    )
    .await;
    let other_topic = keyed(&server, "/topics/b", Some("k"), json!({"data": 1})).await;
    let more_topics = keyed(
        &server,
        "/publish",
        Some("k"),
        json!({"topics": ["a", "b"], "data": 1}),
    )
    .await;
    for answer in [&other_data, &other_name, &other_topic, &more_topics] {
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            answer.body
        );
        assert_eq!(answer.code(), "idempotency_key_reused");
        assert!(!answer.replayed);
    }
    assert_eq!(count(&server.client, &server.base, "a").await, 1);
    assert_eq!(count(&server.client, &server.base, "b").await, 0);
}

#[tokio::test]
async fn a_malformed_key_is_400_and_stores_nothing() {
    let server = TestServer::start(|_| {}).await;
    let long = "x".repeat(256);
    for bad in ["a b", "a\tb", &long] {
        let answer = keyed(&server, "/topics/a", Some(bad), json!({"data": 1})).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{bad:?}: {}",
            answer.body
        );
        assert_eq!(answer.code(), "invalid_idempotency_key");
    }
    let non_ascii = server
        .client
        .post(server.url("/topics/a"))
        .header("content-type", "application/json")
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .body(r#"{"data":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(non_ascii.status(), StatusCode::BAD_REQUEST);
    let twice = server
        .client
        .post(server.url("/topics/a"))
        .header("content-type", "application/json")
        .header("idempotency-key", "one")
        .header("idempotency-key", "two")
        .body(r#"{"data":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), StatusCode::BAD_REQUEST);
    let item = keyed(
        &server,
        "/publish/batch",
        None,
        json!({"events": [{"topics": ["a"], "data": 1, "idempotency_key": "bad key"}]}),
    )
    .await;
    assert_eq!(item.status, StatusCode::BAD_REQUEST, "{}", item.body);
    assert_eq!(item.code(), "invalid_idempotency_key");
    assert!(item.message().contains("events[0]"), "{}", item.message());
    let max = "x".repeat(255);
    let ok = keyed(&server, "/topics/a", Some(&max), json!({"data": 1})).await;
    assert_eq!(ok.status, StatusCode::CREATED, "255 characters are allowed");
    assert_eq!(count(&server.client, &server.base, "a").await, 1);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_store_once_and_all_get_its_id() {
    let server = TestServer::start(|_| {}).await;
    let requests = (0..24).map(|_| keyed(&server, "/topics/a", Some("race"), json!({"data": "x"})));
    let answers = futures_util::future::join_all(requests).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
            a.id()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one id for all: {ids:?}");
    assert_eq!(
        answers.iter().filter(|a| !a.replayed).count(),
        1,
        "exactly one request stored"
    );
    assert_eq!(count(&server.client, &server.base, "a").await, 1);
}

#[tokio::test]
async fn keys_are_remembered_across_a_restart() {
    let server = TestServer::start(|_| {}).await;
    let first = keyed(&server, "/topics/a", Some("restart"), json!({"data": 1})).await;
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let again = keyed(&server, "/topics/a", Some("restart"), json!({"data": 1})).await;
    assert!(again.replayed);
    assert_eq!(again.body, first.body);
    let reused = keyed(&server, "/topics/a", Some("restart"), json!({"data": 2})).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(count(&server.client, &server.base, "a").await, 1);
}

#[tokio::test]
async fn keys_are_remembered_across_kill_9_of_the_real_process() {
    let dir = TempDir::new().unwrap();
    let client = fresh_client();
    let gateway = GatewayProcess::start(dir.path(), "127.0.0.1:0", &[]);
    let url = gateway.url("/topics/a");
    let mut firsts = Vec::new();
    for i in 0..20 {
        let key = format!("crash-{i}");
        let answer = post(&client, &url, Some(&key), None, json!({"data": i})).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        firsts.push(answer.id());
    }
    let listen = gateway.addr.to_string();
    gateway.kill9();
    let gateway = start_gateway(dir.path(), &listen, None).await;
    for (i, first) in firsts.iter().enumerate() {
        let key = format!("crash-{i}");
        let answer = post(&client, &url, Some(&key), None, json!({"data": i})).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.replayed, "key {key} replayed after kill -9");
        assert_eq!(&answer.id(), first);
    }
    assert_eq!(count(&client, &gateway.base, "a").await, 20);
}

#[tokio::test]
async fn an_expired_key_is_trimmed_and_then_stores_anew() {
    let server = TestServer::start(|c| {
        c.publish.idempotency_window_s = 1;
        c.retention.trim_interval_ms = 100;
    })
    .await;
    let first = keyed(&server, "/topics/a", Some("short"), json!({"data": 1})).await;
    let again = keyed(&server, "/topics/a", Some("short"), json!({"data": 1})).await;
    assert!(again.replayed, "within the window");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let later = keyed(&server, "/topics/a", Some("short"), json!({"data": 2})).await;
    assert_eq!(later.status, StatusCode::CREATED, "{}", later.body);
    assert!(!later.replayed);
    assert_ne!(later.id(), first.id());
    assert_eq!(count(&server.client, &server.base, "a").await, 2);
    // Trimmed in the background: after the new key's window too, no key is left on disk.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let dir = server.stop().await;
    assert_eq!(
        stored_keys(dir.path()),
        (0, 0),
        "keys and expiry entries trimmed"
    );
}

/// `(y/ keys, x/ expiry entries)` in a closed data dir.
fn stored_keys(dir: &Path) -> (usize, usize) {
    let db = sled::Config::new().path(dir).open().expect("open data dir");
    (db.scan_prefix(b"y/").count(), db.scan_prefix(b"x/").count())
}

#[tokio::test]
async fn export_and_import_carry_the_keys() {
    let server = TestServer::start(|_| {}).await;
    let first = keyed(&server, "/topics/a", Some("moved"), json!({"data": 1})).await;
    let source = server.stop().await;
    let work = TempDir::new().unwrap();
    let export = work.path().join("export.jsonl");
    let imported = work.path().join("imported");
    let (status, _, stderr) = run_binary(&[
        "export",
        "--data-dir",
        source.path().to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("and 1 idempotency keys"), "{stderr}");
    let (status, _, stderr) = run_binary(&[
        "import",
        "--data-dir",
        imported.to_str().unwrap(),
        "--in",
        export.to_str().unwrap(),
    ]);
    assert!(status.success(), "{stderr}");
    let (status, stdout, _) = run_binary(&["check", "--data-dir", imported.to_str().unwrap()]);
    assert!(status.success(), "check: {stdout}");
    let dir = TempDir::new().unwrap();
    copy_dir(&imported, dir.path());
    let server = TestServer::start_in(dir, |_| {}).await;
    let again = keyed(&server, "/topics/a", Some("moved"), json!({"data": 1})).await;
    assert!(again.replayed, "{}", again.body);
    assert_eq!(again.body, first.body);
    assert_eq!(count(&server.client, &server.base, "a").await, 1);

    // `check` reads the key entries too: a damaged one is reported.
    {
        let db = sled::Config::new().path(&imported).open().unwrap();
        db.insert(b"y/:damaged", &[0u8; 3]).unwrap();
        db.flush().unwrap();
    }
    let (status, stdout, _) = run_binary(&["check", "--data-dir", imported.to_str().unwrap()]);
    assert!(!status.success(), "{stdout}");
    assert!(
        stdout.contains("malformed idempotency key entry"),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_same_key_in_two_orgs_is_two_keys() {
    let server = TestServer::start(|c| {
        c.auth = Some(AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        });
        c.tenancy.enabled = true;
    })
    .await;
    let token = |org: &str| org_token(SECRET, org);
    let (a, b) = (token("orgA"), token("orgB"));
    let url = server.url("/topics/t");
    let in_a = post(
        &server.client,
        &url,
        Some("same"),
        Some(&a),
        json!({"data": 1}),
    )
    .await;
    let in_b = post(
        &server.client,
        &url,
        Some("same"),
        Some(&b),
        json!({"data": 1}),
    )
    .await;
    assert_eq!(in_a.status, StatusCode::CREATED, "{}", in_a.body);
    assert_eq!(in_b.status, StatusCode::CREATED, "{}", in_b.body);
    assert!(!in_a.replayed && !in_b.replayed, "each org stores its own");
    assert_ne!(in_a.id(), in_b.id());
    let again_a = post(
        &server.client,
        &url,
        Some("same"),
        Some(&a),
        json!({"data": 1}),
    )
    .await;
    assert!(again_a.replayed);
    assert_eq!(again_a.id(), in_a.id());
    // Another org's key with another request is no conflict either.
    let b_other = post(
        &server.client,
        &url,
        Some("b-only"),
        Some(&b),
        json!({"data": 5}),
    )
    .await;
    let a_other = post(
        &server.client,
        &url,
        Some("b-only"),
        Some(&a),
        json!({"data": 6}),
    )
    .await;
    assert_eq!(b_other.status, StatusCode::CREATED);
    assert_eq!(a_other.status, StatusCode::CREATED, "{}", a_other.body);
}

#[tokio::test]
async fn a_batch_is_one_commit_with_ids_in_item_order() {
    let server = TestServer::start(|_| {}).await;
    let mut all = server
        .subscribe("/events?topic=a&topic=projects:all", Some("0"))
        .await;
    let uuid = "3F1C2B4A-1111-4222-8333-444455556666";
    let answer = keyed(
        &server,
        "/publish/batch",
        None,
        json!({"events": [
            {"topics": ["a"], "data": 1},
            {"route": "projects/project", "event": "project_updated", "payload": {"uuid": uuid}},
            {"topics": ["a", "b"], "event": "two", "data": null},
        ]}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert!(!answer.replayed);
    let ids = answer.ids();
    assert_eq!(ids.len(), 3);
    let seqs: Vec<u64> = ids.iter().map(|id| seq_of(id)).collect();
    assert_eq!(
        seqs,
        [seqs[0], seqs[0] + 1, seqs[0] + 2],
        "consecutive, in item order"
    );
    let events = all.take(3).await;
    assert_eq!(events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(events[1].event, "project_updated");
    assert_eq!(events[2].data, "null");
    let (_, info) = server
        .get_json(&format!(
            "/topics/projects:project:{}/info",
            uuid.to_lowercase()
        ))
        .await;
    assert_eq!(info["count"], 1, "the route's topics: {info}");
}

#[tokio::test]
async fn a_bad_item_refuses_the_whole_batch_naming_its_index() {
    let server = TestServer::start(|c| c.publish.max_batch_events = 3).await;
    let good = json!({"topics": ["a"], "data": 1});
    let cases = [
        (
            json!({"topics": ["a b"], "data": 1}),
            2,
            StatusCode::BAD_REQUEST,
            "invalid_topic",
        ),
        (
            json!({"topics": ["a"], "event": "reset", "data": 1}),
            1,
            StatusCode::BAD_REQUEST,
            "invalid_event",
        ),
        (
            json!({"topics": ["a"]}),
            1,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            json!({"topics": ["a"], "data": 1, "extra": 1}),
            2,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            json!({"route": "projects/project", "event": "e", "payload": {}}),
            1,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payload",
        ),
        (
            json!({"route": "nope/x", "event": "e", "payload": {}}),
            2,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payload",
        ),
        (
            json!({"route": "projects/task", "payload": {}}),
            1,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            json!({"topics": ["a"], "route": "projects/task", "data": 1}),
            1,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
    ];
    for (bad, index, status, code) in cases {
        let mut events = vec![good.clone(); 3];
        events[index] = bad.clone();
        let answer = keyed(&server, "/publish/batch", None, json!({ "events": events })).await;
        assert_eq!(answer.status, status, "{bad}: {}", answer.body);
        assert_eq!(answer.code(), code, "{bad}: {}", answer.body);
        assert!(
            answer.message().contains(&format!("events[{index}]")),
            "{bad}: the message names the item: {}",
            answer.message()
        );
    }
    let too_many = keyed(
        &server,
        "/publish/batch",
        None,
        json!({"events": vec![good.clone(); 4]}),
    )
    .await;
    assert_eq!(
        too_many.status,
        StatusCode::BAD_REQUEST,
        "{}",
        too_many.body
    );
    assert!(
        too_many.message().contains("max_batch_events"),
        "{}",
        too_many.message()
    );
    let empty = keyed(&server, "/publish/batch", None, json!({"events": []})).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        count(&server.client, &server.base, "a").await,
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn a_batch_replays_stored_items_and_stores_the_rest_in_one_commit() {
    let server = TestServer::start(|_| {}).await;
    let alone = keyed(&server, "/topics/a", Some("k1"), json!({"data": 1})).await;
    let batch = json!({"events": [
        {"topics": ["a"], "data": 1, "idempotency_key": "k1"},
        {"topics": ["b"], "data": 2, "idempotency_key": "k2"},
        {"topics": ["b"], "data": 2, "idempotency_key": "k2"},
        {"topics": ["c"], "data": 3},
    ]});
    let mixed = keyed(&server, "/publish/batch", None, batch.clone()).await;
    assert_eq!(mixed.status, StatusCode::CREATED, "{}", mixed.body);
    assert!(!mixed.replayed, "not every item was replayed");
    let ids = mixed.ids();
    assert_eq!(
        ids[0],
        alone.id(),
        "the item sent alone before keeps its id"
    );
    assert_eq!(ids[1], ids[2], "one key twice in a batch is stored once");
    assert_eq!(seq_of(&ids[3]), seq_of(&ids[1]) + 1);
    assert_eq!(count(&server.client, &server.base, "a").await, 1);
    assert_eq!(count(&server.client, &server.base, "b").await, 1);

    // A reused key anywhere refuses the batch: nothing of it stored.
    let reused = keyed(
        &server,
        "/publish/batch",
        None,
        json!({"events": [
            {"topics": ["d"], "data": 1, "idempotency_key": "new"},
            {"topics": ["b"], "data": 99, "idempotency_key": "k2"},
        ]}),
    )
    .await;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reused.body
    );
    assert_eq!(reused.code(), "idempotency_key_reused");
    assert!(
        reused.message().contains("events[1]"),
        "{}",
        reused.message()
    );
    assert_eq!(count(&server.client, &server.base, "d").await, 0);

    // A header key gives each item `<key>#<index>`: the retried batch replays whole.
    let body = json!({"events": [{"topics": ["e"], "data": 1}, {"topics": ["e"], "data": 2}]});
    let sent = keyed(&server, "/publish/batch", Some("B"), body.clone()).await;
    let retried = keyed(&server, "/publish/batch", Some("B"), body).await;
    assert!(!sent.replayed && retried.replayed, "{}", retried.body);
    assert_eq!(sent.ids(), retried.ids());
    let item_alone = keyed(&server, "/topics/e", Some("B#1"), json!({"data": 2})).await;
    assert!(item_alone.replayed);
    assert_eq!(item_alone.id(), sent.ids()[1]);
    assert_eq!(count(&server.client, &server.base, "e").await, 2);
}

#[tokio::test]
async fn every_event_of_a_batch_counts_against_the_publish_rate() {
    let server = TestServer::start(|c| {
        c.limits.publish_rate_per_ip = 1;
        c.limits.publish_burst = 5;
    })
    .await;
    let batch = |n: usize| json!({"events": vec![json!({"topics": ["a"], "data": 1}); n]});
    let too_big = keyed(&server, "/publish/batch", None, batch(7)).await;
    assert_eq!(
        too_big.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        too_big.body
    );
    assert_eq!(too_big.code(), "rate_limited");
    assert!(
        too_big.message().contains("smaller batches"),
        "{}",
        too_big.message()
    );
    // The refused request counted one; four are left, and a batch of 4 spends them.
    let fits = keyed(&server, "/publish/batch", None, batch(4)).await;
    assert_eq!(fits.status, StatusCode::CREATED, "{}", fits.body);
    let over = keyed(&server, "/publish/batch", None, batch(2)).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{}", over.body);
    assert_eq!(count(&server.client, &server.base, "a").await, 4);
}
