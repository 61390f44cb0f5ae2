//! Limits against hostile or broken clients, each held with real sockets:
//! streams per IP, publish rates per IP and per token, request head size and
//! read timeout (slowloris), URL length, topics per stream.

use std::time::{Duration, Instant};

use serde_json::json;
use sse_gateway::auth::{mint_hs256, Claims};
use sse_gateway::config::AuthConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

#[tokio::test]
async fn streams_over_the_per_ip_limit_are_shed_with_200_retry_and_close() {
    let server = TestServer::start(|c| c.limits.max_connections_per_ip = 2).await;
    let first = server.subscribe("/topics/t", None).await;
    let _second = server.subscribe("/events?topic=t", None).await;
    let mut shed = server.subscribe("/topics/t", None).await;
    assert_eq!(shed.status, 200);
    assert!(shed.until_closed(WAIT).await);
    assert_eq!(shed.parser.retry, Some(250));
    assert!(
        shed.parser
            .comments
            .iter()
            .any(|c| c.contains("from this address")),
        "{:?}",
        shed.parser.comments
    );
    drop(first);
    let server_ref = &server;
    eventually("the slot to free", || async move {
        let mut again = server_ref.subscribe("/topics/t", None).await;
        again.until_blocks(2).await;
        again.parser.comments.is_empty()
    })
    .await;
}

#[tokio::test]
async fn publishes_over_the_per_ip_rate_get_429_with_retry_after_and_store_nothing() {
    let server = TestServer::start(|c| {
        c.limits.publish_rate_per_ip = 1;
        c.limits.publish_burst = 3;
    })
    .await;
    for i in 0..3 {
        server.publish("t", "e", json!(i)).await;
    }
    let response = server
        .client
        .post(server.url("/topics/t"))
        .header("content-type", "application/json")
        .body(json!({"data": "over"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(server.get_json("/topics/t/info").await.1["count"], 3);
    // Streams are never rate limited.
    let mut stream = server.subscribe("/topics/t", Some("0")).await;
    let data: Vec<String> = stream.take(3).await.into_iter().map(|e| e.data).collect();
    assert_eq!(data, ["0", "1", "2"], "the three stored events, in order");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.publish("t", "e", json!("later")).await;
}

#[tokio::test]
async fn the_per_token_rate_spans_addresses() {
    const SECRET: &str = "limits-secret-limits-secret-limits!";
    let server = TestServer::start(|c| {
        c.auth = Some(AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        });
        c.limits.trust_forwarded_for = true;
        c.limits.publish_rate_per_token = 1;
        c.limits.publish_burst = 2;
    })
    .await;
    let claims = |sub: &str| Claims {
        exp: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs())
            + 600,
        subscribe: vec![],
        publish: vec!["*".into()],
        org: None,
        sub: Some(sub.into()),
    };
    let token = mint_hs256(SECRET, &claims("one")).unwrap();
    let other = mint_hs256(SECRET, &claims("two")).unwrap();
    let publish = |token: String, ip: &'static str| {
        let request = server
            .client
            .post(server.url("/topics/t"))
            .bearer_auth(token)
            .header("x-forwarded-for", format!("203.0.113.9, {ip}"))
            .header("content-type", "application/json")
            .body("{\"data\":1}");
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(publish(token.clone(), "198.51.100.1").await, 201);
    assert_eq!(publish(token.clone(), "198.51.100.2").await, 201);
    assert_eq!(
        publish(token.clone(), "198.51.100.3").await,
        429,
        "same token from a third address"
    );
    assert_eq!(
        publish(other, "198.51.100.4").await,
        201,
        "another token is not affected"
    );
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_is_refused_and_the_server_carries_on() {
    let server = TestServer::start(|c| c.limits.max_header_bytes = 8192).await;
    let response = server
        .client
        .get(server.url("/healthz"))
        .header("x-big", "a".repeat(20_000))
        .send()
        .await;
    match response {
        Ok(response) => assert_eq!(response.status(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    assert_eq!(server.get_json("/healthz").await.0, 200);
}

#[tokio::test]
async fn a_client_that_sends_its_head_too_slowly_is_disconnected() {
    let server = TestServer::start(|c| c.limits.header_read_timeout_ms = 300).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 1024];
    // Trickle a header byte at a time; the server must give up on us.
    let closed = loop {
        match tokio::time::timeout(Duration::from_millis(50), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => break true, // a 408-style answer before closing also ends it
            Err(_) => {
                if started.elapsed() > Duration::from_secs(5) {
                    break false;
                }
                let _ = slow.write_all(b"X").await;
            }
        }
    };
    assert!(closed, "the slow client was not disconnected");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "disconnected after {:?}",
        started.elapsed()
    );
    assert_eq!(
        server.get_json("/healthz").await.0,
        200,
        "others are served meanwhile"
    );
}

#[tokio::test]
async fn urls_over_max_url_bytes_get_414_json() {
    let server = TestServer::start(|c| c.limits.max_url_bytes = 200).await;
    let long = format!("/topics/t?pad={}", "x".repeat(300));
    let response = server.client.get(server.url(&long)).send().await.unwrap();
    assert_eq!(response.status(), 414);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "uri_too_long");
    let (status, _) = server
        .post_raw(
            &format!("/topics/t?pad={}", "x".repeat(300)),
            "{\"data\":1}",
        )
        .await;
    assert_eq!(status, 414);
    assert_eq!(server.get_json("/topics/t/info").await.1["count"], 0);
}

/// A browser can read the 414 too: it carries the CORS headers, or the page
/// would only see an opaque CORS failure.
#[tokio::test]
async fn a_414_carries_cors_headers_for_an_allowed_origin() {
    let server = TestServer::start(|c| {
        c.limits.max_url_bytes = 200;
        c.cors.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let long = format!("/topics/t?pad={}", "x".repeat(300));
    let response = server
        .client
        .get(server.url(&long))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 414);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    // And scripts may read Retry-After (of a 429/503).
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");
}

#[tokio::test]
async fn streams_over_max_topics_per_stream_are_400() {
    let server = TestServer::start(|c| c.limits.max_topics_per_stream = 2).await;
    let response = server
        .client
        .get(server.url("/events?topic=a&topic=b&topic=c"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_topic");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_topics_per_stream"));
    let ok = server
        .subscribe("/events?topic=a&topic=b&topic=a", None)
        .await;
    assert_eq!(ok.status, 200);
}

/// Issue 15: a Phoenix backend publishes from one address. With the shipped
/// `config.toml` it must never be throttled: 6,000 events as fast as 32
/// connections can send them all get 201 (the old per-IP default of 1,000/s
/// with a burst of 2,000 refused past ~3,500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_publishes_at_full_speed_with_the_shipped_config() {
    const EVENTS: usize = 6000;
    const PUBLISHERS: usize = 32;
    let shipped = sse_gateway::Config::from_file(&repo_path("config.toml")).expect("config.toml");
    // On tmpfs where there is one, so fsync costs nothing and the publishers
    // outrun any rate limit a shipped default could set.
    let dir = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::TempDir::new_in("/dev/shm").expect("tempdir in /dev/shm"),
        false => tempfile::TempDir::new().expect("tempdir"),
    };
    let server = TestServer::start_in(dir, move |c| {
        let data_dir = c.storage.data_dir.clone();
        *c = shipped;
        c.storage.data_dir = data_dir;
    })
    .await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let client = server.client.clone();
        let url = server.url("/topics/projects:all");
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for i in (p..EVENTS).step_by(PUBLISHERS) {
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(json!({"event": "task_updated", "data": {"i": i}}).to_string())
                    .send()
                    .await
                    .expect("publish");
                if response.status() != 201 {
                    refused += 1;
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap();
    }
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        refused, 0,
        "{refused} of {EVENTS} refused at {rate:.0} events/s"
    );
    let (_, info) = server.get_json("/topics/projects:all/info").await;
    assert_eq!(info["count"], EVENTS);
}
