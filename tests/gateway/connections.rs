//! Connection handling on raw TCP: a stream that is a connection's first
//! request is written on the socket by the gateway itself (after the head),
//! every other request by hyper. Both must look like one HTTP/1.1 server:
//! framing, headers, keep-alive after a refused stream, EOF detection,
//! shutdown, HTTP/1.0.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{eventually, SseEvent, SseParser, TestServer, WAIT};

/// One HTTP/1.x client connection, read by hand.
struct RawConn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

struct Head {
    status: u16,
    headers: HashMap<String, String>,
}

impl RawConn {
    async fn open(server: &TestServer) -> Self {
        Self {
            tcp: TcpStream::connect(server.addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    /// A new connection whose first request is `GET <target>` (HTTP/1.1);
    /// returns it with the response head, which must be `200`.
    async fn stream(server: &TestServer, target: &str) -> (Self, Head) {
        let mut conn = Self::open(server).await;
        conn.send(&format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"))
            .await;
        let head = conn.head().await;
        assert_eq!(head.status, 200, "GET {target}");
        (conn, head)
    }

    async fn send(&mut self, raw: &str) {
        self.tcp.write_all(raw.as_bytes()).await.expect("write");
    }

    /// Reads more bytes; false at EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("bytes within the wait")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn head(&mut self) -> Head {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let text = String::from_utf8(self.buf[..end].to_vec()).expect("utf-8 head");
                self.buf.drain(..end + 4);
                let mut lines = text.split("\r\n");
                let status_line = lines.next().expect("status line");
                let status = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status code");
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                return Head { status, headers };
            }
            assert!(self.fill().await, "connection closed before a full head");
        }
    }

    /// A body of `len` bytes.
    async fn body(&mut self, len: usize) -> Vec<u8> {
        while self.buf.len() < len {
            assert!(self.fill().await, "connection closed inside a body");
        }
        self.buf.drain(..len).collect()
    }

    /// The next chunk of a chunked body (empty for the last one).
    async fn chunk(&mut self) -> Vec<u8> {
        loop {
            if let Some(line_end) = find(&self.buf, b"\r\n") {
                let size_text = std::str::from_utf8(&self.buf[..line_end]).expect("size line");
                let size = usize::from_str_radix(size_text, 16).expect("hex chunk size");
                if self.buf.len() >= line_end + 2 + size + 2 {
                    let data = self.buf[line_end + 2..line_end + 2 + size].to_vec();
                    assert_eq!(&self.buf[line_end + 2 + size..line_end + 4 + size], b"\r\n");
                    self.buf.drain(..line_end + 4 + size);
                    return data;
                }
            }
            assert!(self.fill().await, "connection closed inside a chunked body");
        }
    }

    /// Chunks until `n` events were parsed.
    async fn events(&mut self, parser: &mut SseParser, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while events.len() < n {
            let chunk = self.chunk().await;
            assert!(
                !chunk.is_empty(),
                "stream ended after {} events",
                events.len()
            );
            events.extend(parser.feed(&chunk));
        }
        events
    }

    /// Whether the peer closes the connection within `wait`.
    async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut chunk = [0u8; 8192];
        loop {
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn subscribers(server: &TestServer, topic: &str) -> u64 {
    server.get_json(&format!("/topics/{topic}/info")).await.1["subscribers"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

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
