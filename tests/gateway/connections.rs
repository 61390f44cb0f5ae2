//! Connection handling on raw TCP: a stream that is a connection's first
//! request is written on the socket by the gateway itself (after the head),
//! every other request by hyper. Both must look like one HTTP/1.1 server:
//! framing, headers, keep-alive after a refused stream, EOF detection,
//! shutdown, HTTP/1.0.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::{eventually, subscribers, RawConn, SseParser, TestServer, WAIT};

#[tokio::test]
async fn a_first_request_stream_is_chunked_with_sse_headers_and_carries_events_in_order() {
    let server = TestServer::start(|_| {}).await;
    let (mut conn, head) = RawConn::stream(&server, "/topics/raw?last_event_id=0").await;
    assert_eq!(head.headers["content-type"], "text/event-stream");
    assert_eq!(head.headers["cache-control"], "no-store");
    assert_eq!(head.headers["x-accel-buffering"], "no");
    assert_eq!(head.headers["transfer-encoding"], "chunked");
    assert!(head.headers.contains_key("date"), "{:?}", head.headers);
    assert!(!head.headers.contains_key("content-length"));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(server.publish("raw", "e", json!({ "i": i })).await);
    }
    let mut parser = SseParser::default();
    let events = conn.events(&mut parser, 3).await;
    let got: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, ids);
    assert_eq!(events[2].json(), json!({ "i": 2 }));
}

#[tokio::test]
async fn a_stream_is_released_when_the_client_closes_not_at_the_next_heartbeat() {
    // A heartbeat far beyond the wait: only noticing EOF can free the slot.
    let server = TestServer::start(|c| c.stream.heartbeat_ms = 600_000).await;
    let (conn, _) = RawConn::stream(&server, "/topics/gone").await;
    assert_eq!(subscribers(&server, "gone").await, 1);
    drop(conn);
    eventually("the closed stream to be released", || async {
        subscribers(&server, "gone").await == 0
    })
    .await;
}

#[tokio::test]
async fn a_refused_stream_gets_json_and_the_same_connection_serves_the_next_requests() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(&server).await;
    // Pipelined: the refusal, then two requests hyper serves on the same socket.
    conn.send(concat!(
        "GET /topics/bad%20topic HTTP/1.1\r\nHost: t\r\n\r\n",
        "GET /topics/ok/info HTTP/1.1\r\nHost: t\r\n\r\n",
    ))
    .await;
    let head = conn.head().await;
    assert_eq!(head.status, 400);
    assert_eq!(head.headers["content-type"], "application/json");
    let len: usize = head.headers["content-length"].parse().unwrap();
    let body: Value = serde_json::from_slice(&conn.body(len).await).unwrap();
    assert_eq!(body["error"]["code"], "invalid_topic", "{body}");
    let head = conn.head().await;
    assert_eq!(head.status, 200);
    let len: usize = head.headers["content-length"].parse().unwrap();
    let info: Value = serde_json::from_slice(&conn.body(len).await).unwrap();
    assert_eq!(info["topic"], "ok");
    conn.send("GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(conn.head().await.status, 200);
}

#[tokio::test]
async fn connection_close_on_a_refused_stream_closes_after_the_answer() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(&server).await;
    conn.send("GET /events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await;
    let head = conn.head().await;
    assert_eq!(head.status, 400, "no topic named");
    assert_eq!(head.headers["connection"], "close");
    assert!(conn.closed_within(WAIT).await);
}

#[tokio::test]
async fn a_stream_after_another_request_on_the_connection_is_served_by_hyper_alike() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(&server).await;
    conn.send("GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let head = conn.head().await;
    assert_eq!(head.status, 200);
    if let Some(len) = head.headers.get("content-length") {
        conn.body(len.parse().unwrap()).await;
    }
    conn.send("GET /topics/second?last_event_id=0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let head = conn.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-type"], "text/event-stream");
    assert_eq!(head.headers["transfer-encoding"], "chunked");
    let id = server.publish("second", "e", json!(1)).await;
    let events = conn.events(&mut SseParser::default(), 1).await;
    assert_eq!(events[0].id, id);
}

#[tokio::test]
async fn bytes_sent_after_a_stream_head_are_discarded_and_the_stream_goes_on() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(&server).await;
    conn.send("GET /topics/noisy?last_event_id=0 HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        .await;
    assert_eq!(conn.head().await.status, 200);
    conn.send(&"junk".repeat(10_000)).await;
    let mut parser = SseParser::default();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(server.publish("noisy", "e", json!(i)).await);
    }
    let got: Vec<_> = conn
        .events(&mut parser, 3)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, ids);
}

#[tokio::test]
async fn on_shutdown_a_chunked_stream_ends_with_the_last_chunk_and_closes() {
    let server = TestServer::start(|_| {}).await;
    let (mut conn, head) = RawConn::stream(&server, "/topics/bye").await;
    assert_eq!(head.headers["connection"], "close");
    let id = server.publish("bye", "e", json!(1)).await;
    let mut parser = SseParser::default();
    assert_eq!(conn.events(&mut parser, 1).await[0].id, id);
    server.begin_stop();
    loop {
        if conn.chunk().await.is_empty() {
            break;
        }
    }
    assert!(conn.closed_within(WAIT).await);
}

#[tokio::test]
async fn an_http10_stream_is_delimited_by_close() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(&server).await;
    conn.send("GET /topics/old?last_event_id=0 HTTP/1.0\r\n\r\n")
        .await;
    let head = conn.head().await;
    assert_eq!(head.status, 200);
    assert!(!head.headers.contains_key("transfer-encoding"));
    assert_eq!(head.headers["connection"], "close");
    let id = server.publish("old", "e", json!("x")).await;
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    while events.is_empty() {
        if conn.buf.is_empty() {
            assert!(conn.fill().await);
        }
        let bytes = std::mem::take(&mut conn.buf);
        events.extend(parser.feed(&bytes));
    }
    assert_eq!(events[0].id, id);
    server.begin_stop();
    assert!(conn.closed_within(WAIT).await);
}

#[tokio::test]
async fn a_stream_head_that_arrives_byte_by_byte_is_served() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(&server).await;
    conn.tcp.set_nodelay(true).unwrap();
    for byte in "GET /topics/trickle?last_event_id=0 HTTP/1.1\r\nHost: t\r\n\r\n".bytes() {
        conn.tcp.write_all(&[byte]).await.unwrap();
        conn.tcp.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let head = conn.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-type"], "text/event-stream");
    let id = server.publish("trickle", "e", json!(1)).await;
    assert_eq!(conn.events(&mut SseParser::default(), 1).await[0].id, id);
}

/// Issue 15: a stream head over `limits.max_header_bytes` gets the same 431
/// as any other route, even when it arrives in one write.
#[tokio::test]
async fn a_stream_head_over_the_header_limit_is_refused_like_any_other() {
    let server = TestServer::start(|c| c.limits.max_header_bytes = 16 * 1024).await;
    for target in ["/topics/big", "/healthz"] {
        let mut conn = RawConn::open(&server).await;
        let padding = "a".repeat(28 * 1024);
        conn.send(&format!(
            "GET {target} HTTP/1.1\r\nHost: t\r\nX-Padding: {padding}\r\n\r\n"
        ))
        .await;
        assert_eq!(conn.head().await.status, 431, "GET {target}");
    }
    // Just under the limit still streams.
    let mut conn = RawConn::open(&server).await;
    let padding = "a".repeat(12 * 1024);
    conn.send(&format!(
        "GET /topics/big HTTP/1.1\r\nHost: t\r\nX-Padding: {padding}\r\n\r\n"
    ))
    .await;
    assert_eq!(conn.head().await.status, 200);
}
