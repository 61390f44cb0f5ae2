//! API.md "Operations": `/healthz`, `/readyz`, `/metrics`,
//! `/topics/{topic}/info` (counts and subscribers), and CORS.

use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::*;

const ORIGIN: &str = "https://app.example";

// ---------------------------------------------------------------- helpers

/// `/topics/{topic}/info`, asserting 200.
async fn info(server: &TestServer, topic: &str) -> Value {
    let (status, info) = server.get_json(&format!("/topics/{topic}/info")).await;
    assert_eq!(status, StatusCode::OK, "info for {topic}: {info}");
    info
}

/// `/metrics`: (content type, text).
async fn metrics(server: &TestServer) -> (String, String) {
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (content_type, response.text().await.expect("metrics text"))
}

/// The sum of every sample of the metric `name` (all label sets), or `None`
/// when the exposition has no such sample.
fn sample_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, rest) = match line.find('}') {
            Some(close) => (&line[..=close], &line[close + 1..]),
            None => line.split_once(' ').unwrap_or((line, "")),
        };
        let metric = series.split('{').next().unwrap_or("");
        if metric != name {
            continue;
        }
        let value: f64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("sample without a number: {line:?}"));
        *sum.get_or_insert(0.0) += value;
    }
    sum
}

fn sample(text: &str, name: &str) -> f64 {
    sample_sum(text, name).unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// The sum of the samples of every metric whose name contains `part` and ends in `suffix`.
fn samples_matching(text: &str, part: &str, suffix: &str) -> Option<f64> {
    let mut names: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| n.starts_with("sse_gateway_") && n.contains(part) && n.ends_with(suffix))
        .collect();
    names.sort_unstable();
    names.dedup();
    names.iter().map(|n| sample_sum(text, n)).sum()
}

async fn preflight(server: &TestServer, path: &str, origin: &str) -> (StatusCode, HeaderMap) {
    let response = server
        .client
        .request(Method::OPTIONS, server.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,last-event-id",
        )
        .send()
        .await
        .expect("preflight");
    (response.status(), response.headers().clone())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The comma-separated list in `name`, lowercased.
fn header_list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

// ---------------------------------------------------------------- health

#[tokio::test]
async fn healthz_answers_200_while_running() {
    let server = TestServer::start(|_| {}).await;
    let response = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), StatusCode::OK);
    server.publish("x", "e", json!(1)).await;
    let response = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn readyz_answers_200_when_storage_is_open_and_writable() {
    let server = TestServer::start(|_| {}).await;
    let response = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(response.status(), StatusCode::OK);
    // Ready means publishes are taken.
    server.publish("x", "e", json!(1)).await;
    let response = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(response.status(), StatusCode::OK);
}

// ---------------------------------------------------------------- metrics

/// What the process's memory is made of (src/process_memory.rs; the soak
/// samples these to tell live data from allocator retention). The real
/// binary allocates with jemalloc: it reports jemalloc's figures and its own
/// resident set. A gateway inside this test binary (system malloc) reports
/// its resident set but no heap figures, rather than a misleading 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_what_the_process_memory_is_made_of() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let gateway = GatewayProcess::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
    let text = metrics_text(&fresh_client(), &gateway.base).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.pid()))
        .expect("the child's /proc status");
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .expect("VmRSS")
        * 1024.0;
    let reported = sample(&text, "sse_gateway_process_resident_bytes");
    assert!(
        reported > vm_rss / 2.0 && reported < vm_rss * 2.0,
        "the child's own RSS ({vm_rss} B by /proc), not another process's: {reported}"
    );
    let allocated = sample(&text, "sse_gateway_heap_allocated_bytes");
    let active = sample(&text, "sse_gateway_heap_active_bytes");
    assert!(
        allocated > f64::from(1 << 20),
        "a running gateway holds > 1 MiB: {allocated}"
    );
    assert!(
        active >= allocated,
        "active pages hold the allocations: {active} < {allocated}"
    );
    assert!(sample(&text, "sse_gateway_heap_resident_bytes") >= active);
    assert!(sample_sum(&text, "sse_gateway_heap_retained_bytes").is_some());
    gateway.kill9();

    let server = TestServer::start(|_| {}).await;
    let (_, text) = metrics(&server).await;
    assert!(sample(&text, "sse_gateway_process_resident_bytes") > 0.0);
    assert!(
        !text.contains("sse_gateway_heap_"),
        "no allocator figures when the host supplied no reader:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_with_published_count_streams_storage_and_latency() {
    let server = TestServer::start(|c| c.stream.heartbeat_ms = 200).await;
    let (content_type, text) = metrics(&server).await;
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "Prometheus or OpenMetrics text: {content_type:?}"
    );
    if content_type.starts_with("application/openmetrics-text") {
        assert_eq!(
            text.lines().last(),
            Some("# EOF"),
            "OpenMetrics ends with # EOF"
        );
    }
    assert_eq!(sample(&text, "sse_gateway_events_published_total"), 0.0);

    for i in 0..3 {
        server.publish("m", "e", json!(i)).await;
    }
    let (status, answer) = server
        .post_raw("/publish", r#"{"topics":["m","n","o"],"data":3}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (_, text) = metrics(&server).await;
    assert!(
        text.contains("# TYPE sse_gateway_events_published"),
        "typed:\n{text}"
    );
    assert_eq!(
        sample(&text, "sse_gateway_events_published_total"),
        4.0,
        "one multi-topic event counts once"
    );
    assert_eq!(
        sample(&text, "sse_gateway_publish_duration_seconds_count"),
        4.0
    );
    // Four real publishes (each at least an fsync) took some time.
    assert!(sample(&text, "sse_gateway_publish_duration_seconds_sum") > 0.0);
    assert!(
        text.contains("sse_gateway_publish_duration_seconds_bucket{le=\"+Inf\"} 4"),
        "histogram buckets:\n{text}"
    );
    assert!(
        sample(&text, "sse_gateway_storage_bytes") > 0.0,
        "storage size after publishes"
    );

    // Refused publishes are not counted as published.
    let (status, _) = server.post_raw("/topics/m", "not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, text) = metrics(&server).await;
    assert_eq!(sample(&text, "sse_gateway_events_published_total"), 4.0);

    // Open streams, and deliveries/replay reads once a subscriber replays.
    let mut topic_stream = server.subscribe("/topics/m", Some("0")).await;
    let events_stream = server.subscribe("/events?topic=n&topic=o", None).await;
    let replayed = topic_stream.take(4).await;
    assert!(
        replayed
            .windows(2)
            .all(|w| seq_of(&w[1].id) > seq_of(&w[0].id)),
        "four events in id order: {replayed:?}"
    );
    let (_, text) = metrics(&server).await;
    assert_eq!(sample(&text, "sse_gateway_streams_open"), 2.0, "{text}");
    assert!(
        samples_matching(&text, "delivered", "_total").unwrap_or(0.0) >= 4.0,
        "events delivered:\n{text}"
    );
    assert!(
        samples_matching(&text, "replay", "_total").unwrap_or(0.0) >= 1.0,
        "replay reads:\n{text}"
    );
    assert!(text.contains("lag"), "a lag metric:\n{text}");

    drop(topic_stream);
    drop(events_stream);
    eventually("streams_open back to 0", || async {
        let (_, text) = metrics(&server).await;
        sample(&text, "sse_gateway_streams_open") == 0.0
    })
    .await;
}

// ---------------------------------------------------------------- /topics/{topic}/info

#[tokio::test]
async fn info_for_a_never_published_topic_is_200_with_count_0_and_null_ids() {
    let server = TestServer::start(|_| {}).await;
    assert_eq!(
        info(&server, "never:published").await,
        json!({ "topic": "never:published", "first_id": null, "last_id": null, "count": 0, "subscribers": 0 })
    );
    // Still so once other topics hold events.
    server.publish("other", "e", json!(1)).await;
    assert_eq!(
        info(&server, "never:published").await,
        json!({ "topic": "never:published", "first_id": null, "last_id": null, "count": 0, "subscribers": 0 })
    );
}

#[tokio::test]
async fn info_reports_first_last_and_count_after_publishes() {
    let server = TestServer::start(|_| {}).await;
    let t1 = server.publish("t", "e", json!(1)).await;
    let o1 = server.publish("other", "e", json!(2)).await;
    let t2 = server.publish("t", "e", json!(3)).await;
    let (status, answer) = server
        .post_raw("/publish", r#"{"topics":["other","t"],"data":4}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let both = answer["id"].as_str().expect("id").to_owned();
    assert_ne!(t2, both);

    assert_eq!(
        info(&server, "t").await,
        json!({ "topic": "t", "first_id": t1, "last_id": both, "count": 3, "subscribers": 0 })
    );
    assert_eq!(
        info(&server, "other").await,
        json!({ "topic": "other", "first_id": o1, "last_id": both, "count": 2, "subscribers": 0 })
    );
    // Percent-decoded and case-sensitive, like every topic in a path.
    let x = server.publish("Ax", "e", json!(5)).await;
    assert_eq!(
        info(&server, "%41x").await,
        json!({ "topic": "Ax", "first_id": x, "last_id": x, "count": 1, "subscribers": 0 })
    );
    assert_eq!(info(&server, "ax").await["count"], 0);
}

#[tokio::test]
async fn info_for_a_bad_topic_is_400_invalid_topic() {
    let server = TestServer::start(|_| {}).await;
    let long = "a".repeat(201);
    for topic in ["a%20b", "a%2Fb", "%C3%A9", long.as_str()] {
        let response = server
            .client
            .get(server.url(&format!("/topics/{topic}/info")))
            .send()
            .await
            .expect("info");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{topic}");
        let body: Value = response.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "invalid_topic", "{topic}: {body}");
        assert!(
            !body["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_subscribers_counts_topic_and_events_streams_and_drops_within_a_heartbeat() {
    let heartbeat = Duration::from_millis(200);
    let server = TestServer::start(|c| c.stream.heartbeat_ms = heartbeat.as_millis() as u64).await;
    assert_eq!(subscribers(&server, "t").await, 0);

    let topic_stream = server.subscribe("/topics/t", None).await;
    assert_eq!(topic_stream.status, StatusCode::OK);
    assert_eq!(subscribers(&server, "t").await, 1);

    let events_stream = server.subscribe("/events?topic=t&topic=u", None).await;
    assert_eq!(events_stream.status, StatusCode::OK);
    assert_eq!(
        subscribers(&server, "t").await,
        2,
        "/events streams count too"
    );
    assert_eq!(subscribers(&server, "u").await, 1);

    // A topic named twice in one stream is one subscription.
    let twice = server.subscribe("/events?topic=u&topic=u", None).await;
    assert_eq!(subscribers(&server, "u").await, 2);
    assert_eq!(subscribers(&server, "v").await, 0);

    // Leaving is noticed within about one heartbeat.
    for (reader, topic, left) in [
        (topic_stream, "t", 1),
        (events_stream, "t", 0),
        (twice, "u", 0),
    ] {
        drop(reader);
        let left_at = Instant::now();
        eventually(&format!("{topic} back to {left} subscribers"), || async {
            subscribers(&server, topic).await == left
        })
        .await;
        let took = left_at.elapsed();
        assert!(
            took <= heartbeat * 5,
            "{topic}: a leaving client was counted for {took:?} (heartbeat {heartbeat:?})"
        );
    }
    assert_eq!(subscribers(&server, "u").await, 0);
    assert_eq!(subscribers(&server, "t").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_after_shutdown_began_is_503_or_refused() {
    let server = TestServer::start(|_| {}).await;
    server.publish("x", "e", json!(1)).await;
    server.begin_stop();
    let client = reqwest::Client::new();
    match client.get(server.url("/topics/x/info")).send().await {
        Ok(response) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let retry_after = header(response.headers(), "retry-after")
                .map(str::to_owned)
                .expect("Retry-After");
            assert!(retry_after.parse::<u64>().is_ok(), "{retry_after:?}");
            let body: Value = response.json().await.expect("JSON error");
            assert_eq!(body["error"]["code"], "unavailable", "{body}");
            assert!(
                !body["error"]["message"].as_str().unwrap_or("").is_empty(),
                "{body}"
            );
        }
        // The listener may already be closed.
        Err(e) => assert!(
            e.is_connect() || e.is_request(),
            "neither a 503 nor a refused connection: {e}"
        ),
    }
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(info(&server, "x").await["count"], 1);
}

// ---------------------------------------------------------------- CORS

#[tokio::test]
async fn cors_preflight_from_an_allowed_origin_is_allowed_with_credentials() {
    let server = TestServer::start(|c| c.cors.allowed_origins = vec![ORIGIN.into()]).await;
    for path in [
        "/topics/x",
        "/publish",
        "/publish/batch",
        "/projects/broadcast/task",
        "/events?topic=x",
    ] {
        let (status, headers) = preflight(&server, path, ORIGIN).await;
        assert!(status.is_success(), "{path}: preflight {status}");
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            Some(ORIGIN),
            "{path}"
        );
        assert_eq!(
            header(&headers, "access-control-allow-credentials"),
            Some("true"),
            "{path}"
        );
        let methods = header_list(&headers, "access-control-allow-methods");
        assert!(methods.iter().any(|m| m == "post"), "{path}: {methods:?}");
        let allowed = header_list(&headers, "access-control-allow-headers");
        for want in [
            "content-type",
            "last-event-id",
            "authorization",
            "idempotency-key",
        ] {
            assert!(
                allowed.iter().any(|h| h == want),
                "{path}: {want} in {allowed:?}"
            );
        }
        assert!(
            header_list(&headers, "vary").iter().any(|v| v == "origin"),
            "{path}: Vary: Origin"
        );
    }
    assert_eq!(
        info(&server, "x").await["count"],
        0,
        "a preflight publishes nothing"
    );

    // The actual requests carry the headers too: publish, info, and the stream.
    let response = server
        .client
        .post(server.url("/topics/x"))
        .header("origin", ORIGIN)
        .header("content-type", "application/json")
        .body(r#"{"data":1}"#)
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        Some(ORIGIN)
    );
    assert_eq!(
        header(response.headers(), "access-control-allow-credentials"),
        Some("true")
    );
    // A script may read whether an answer was replayed from its key.
    let exposed = header_list(response.headers(), "access-control-expose-headers");
    assert!(
        exposed.iter().any(|h| h == "idempotent-replayed"),
        "{exposed:?}"
    );
    let response = server
        .client
        .get(server.url("/topics/x/info"))
        .header("origin", ORIGIN)
        .send()
        .await
        .expect("info");
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        Some(ORIGIN)
    );
    let response = server
        .client
        .get(server.url("/topics/x"))
        .header("origin", ORIGIN)
        .header("accept", "text/event-stream")
        .header("last-event-id", "0")
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        Some(ORIGIN)
    );
    assert_eq!(
        header(response.headers(), "access-control-allow-credentials"),
        Some("true")
    );
}

#[tokio::test]
async fn cors_other_origins_get_no_allow_origin() {
    let server = TestServer::start(|c| c.cors.allowed_origins = vec![ORIGIN.into()]).await;
    for origin in [
        "https://evil.example",
        "http://app.example",
        "https://app.example.evil",
        "https://sub.app.example",
    ] {
        let (_, headers) = preflight(&server, "/topics/x", origin).await;
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            None,
            "{origin}: preflight"
        );
        let response = server
            .client
            .get(server.url("/topics/x/info"))
            .header("origin", origin)
            .send()
            .await
            .expect("info");
        assert_eq!(
            header(response.headers(), "access-control-allow-origin"),
            None,
            "{origin}: GET"
        );
    }
}

#[tokio::test]
async fn cors_wildcard_allows_any_origin_with_star_and_no_credentials() {
    let server = TestServer::start(|c| c.cors.allowed_origins = vec!["*".into()]).await;
    for origin in [ORIGIN, "https://other.example"] {
        let (status, headers) = preflight(&server, "/topics/x", origin).await;
        assert!(status.is_success(), "{origin}: preflight {status}");
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            Some("*"),
            "{origin}"
        );
        assert_ne!(
            header(&headers, "access-control-allow-credentials"),
            Some("true"),
            "`*` is never combined with credentials"
        );
        assert!(header_list(&headers, "access-control-allow-methods")
            .iter()
            .any(|m| m == "post"));
        let allowed = header_list(&headers, "access-control-allow-headers");
        for want in [
            "content-type",
            "last-event-id",
            "authorization",
            "idempotency-key",
        ] {
            assert!(allowed.iter().any(|h| h == want), "{want} in {allowed:?}");
        }
        let response = server
            .client
            .get(server.url("/topics/x/info"))
            .header("origin", origin)
            .send()
            .await
            .expect("info");
        assert_eq!(
            header(response.headers(), "access-control-allow-origin"),
            Some("*")
        );
    }
}

#[tokio::test]
async fn cors_is_off_without_allowed_origins() {
    let server = TestServer::start(|_| {}).await;
    let (_, headers) = preflight(&server, "/topics/x", ORIGIN).await;
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    let response = server
        .client
        .get(server.url("/topics/x/info"))
        .header("origin", ORIGIN)
        .send()
        .await
        .expect("info");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        None
    );
}

#[tokio::test]
async fn metrics_time_live_delivery_from_durable_to_the_subscriber() {
    let server = TestServer::start(|_| {}).await;
    let metrics = || metrics_text(&server.client, &server.base);
    let count = |text: &str| metric_value(text, "sse_gateway_delivery_latency_seconds_count");
    assert_eq!(count(&metrics().await), 0.0);
    let mut stream = server.subscribe("/topics/lat", None).await;
    stream.until_blocks(2).await;
    server.publish("lat", "e", serde_json::json!(1)).await;
    stream.next_event().await;
    assert!(count(&metrics().await) >= 1.0, "a live delivery was timed");
}
