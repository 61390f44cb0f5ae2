//! One HTTP/1.x connection read by hand, for tests that check the gateway's
//! framing byte by byte (heads, chunked bodies, keep-alive, close) or that
//! need a socket reqwest would not give them (a tiny receive buffer).
//!
//! Chunked bodies go through the load generator's decoder
//! (`examples/loadgen/chunked.rs`, included here), so there is one.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::server::TestServer;
use super::sse::{SseEvent, SseParser};
use super::WAIT;

#[path = "../../../examples/loadgen/chunked.rs"]
mod chunked;

pub use chunked::ChunkedDecoder;

/// One HTTP/1.x client connection, read by hand.
pub struct RawConn {
    /// The socket, for tests that write or read it directly.
    pub tcp: TcpStream,
    /// Bytes read and not consumed yet.
    pub buf: Vec<u8>,
    /// The chunked body being read, if any.
    body: ChunkedDecoder,
}

/// A response head.
pub struct Head {
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// The status code.
    pub status: u16,
    /// Names lower-cased, values trimmed.
    pub headers: HashMap<String, String>,
}

impl RawConn {
    /// A new connection to `server`.
    pub async fn open(server: &TestServer) -> Self {
        Self::from_tcp(TcpStream::connect(server.addr).await.expect("connect"))
    }

    /// Wraps a connected socket (e.g. one with a tiny receive buffer).
    pub fn from_tcp(tcp: TcpStream) -> Self {
        Self {
            tcp,
            buf: Vec::new(),
            body: ChunkedDecoder::new(),
        }
    }

    /// A new connection whose first request is `GET <target>` (HTTP/1.1);
    /// returns it with the response head, which must be `200`.
    pub async fn stream(server: &TestServer, target: &str) -> (Self, Head) {
        let mut conn = Self::open(server).await;
        conn.send(&format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"))
            .await;
        let head = conn.head().await;
        assert_eq!(head.status, 200, "GET {target}");
        (conn, head)
    }

    /// Writes `raw` as it is.
    pub async fn send(&mut self, raw: &str) {
        self.tcp.write_all(raw.as_bytes()).await.expect("write");
    }

    /// Reads more bytes; false at EOF.
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("bytes within the wait")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next response head; a chunked body after it starts fresh.
    pub async fn head(&mut self) -> Head {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let text = String::from_utf8(self.buf[..end].to_vec()).expect("utf-8 head");
                self.buf.drain(..end + 4);
                let mut lines = text.split("\r\n");
                let status_line = lines.next().expect("status line");
                let mut parts = status_line.split(' ');
                let version = parts.next().unwrap_or_default().to_owned();
                let status = parts
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("status code");
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                self.body = ChunkedDecoder::new();
                return Head {
                    version,
                    status,
                    headers,
                };
            }
            assert!(self.fill().await, "connection closed before a full head");
        }
    }

    /// A body of `len` bytes.
    pub async fn body(&mut self, len: usize) -> Vec<u8> {
        while self.buf.len() < len {
            assert!(self.fill().await, "connection closed inside a body");
        }
        self.buf.drain(..len).collect()
    }

    /// The next bytes of a chunked body, as soon as a chunk (or part of one)
    /// arrived; empty once the last chunk ended the body. Panics on bad framing.
    pub async fn chunk(&mut self) -> Vec<u8> {
        loop {
            let mut data = Vec::new();
            let used = self
                .body
                .decode(&self.buf, &mut data)
                .expect("valid chunked framing");
            self.buf.drain(..used);
            if !data.is_empty() || self.body.is_done() {
                return data;
            }
            assert!(self.fill().await, "connection closed inside a chunked body");
        }
    }

    /// Chunks until `n` events were parsed.
    pub async fn events(&mut self, parser: &mut SseParser, n: usize) -> Vec<SseEvent> {
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
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
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

/// Where `needle` first starts in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
