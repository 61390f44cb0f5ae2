//! Reading SSE streams in tests: [`SseReader`] over real HTTP (reqwest),
//! [`SseParser`] for bytes read any other way (raw sockets, curl), both on
//! the library's one WHATWG decoder.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use sse_gateway::sse::decode::{Decoder, Item};

use super::WAIT;

/// One dispatched SSE event (WHATWG semantics: `id` is the last event id at dispatch).
///
/// The tests' own type (not the library's) so that it can carry [`SseEvent::json`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id at dispatch.
    pub id: String,
    /// The event type (`message` when none was named).
    pub event: String,
    /// The data lines joined with LF.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON; panics when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {}", self.data))
    }
}

/// The library's WHATWG decoder ([`sse_gateway::sse::decode`]) with what
/// the tests look at kept in plain fields: every test reads streams the way
/// `tail`, the load generator and a browser do.
#[derive(Debug, Default)]
pub struct SseParser {
    decoder: Decoder,
    /// The last event id: moves when a block ends (id-only blocks too).
    pub last_event_id: String,
    /// The last `retry:` value.
    pub retry: Option<u64>,
    /// Every comment's text, without the colon and one leading space.
    pub comments: Vec<String>,
    /// Blocks ended (blank lines), with or without an event.
    pub blocks: usize,
}

impl SseParser {
    /// Feeds bytes; returns the events dispatched.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let comments = &mut self.comments;
        self.decoder.feed(bytes, |item| match item {
            Item::Event(event) => events.push(SseEvent {
                id: event.id,
                event: event.event,
                data: event.data,
            }),
            Item::Comment(text) => comments.push(text),
        });
        self.decoder
            .last_event_id()
            .clone_into(&mut self.last_event_id);
        self.retry = self.decoder.retry_ms();
        self.blocks = usize::try_from(self.decoder.blocks_ended()).expect("blocks fit usize");
        events
    }
}

/// An SSE stream over real HTTP.
pub struct SseReader {
    /// The response status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: reqwest::header::HeaderMap,
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    /// What has been decoded so far (last event id, retry, comments, blocks).
    pub parser: SseParser,
    queue: std::collections::VecDeque<SseEvent>,
    /// The server ended the body (or it broke).
    pub ended: bool,
    /// The body ended cleanly (the last chunk arrived), not by a broken connection.
    pub ended_cleanly: bool,
    /// Every byte received, for assertions on the exact wire format.
    pub raw: Vec<u8>,
}

impl SseReader {
    /// `GET url` with `Accept: text/event-stream`, and `Last-Event-ID` when given.
    pub async fn connect(client: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("subscribe request");
        Self::from_response(response)
    }

    /// Wraps a response (sent however the test needs) as an SSE stream.
    pub fn from_response(response: reqwest::Response) -> Self {
        Self {
            status: response.status(),
            headers: response.headers().clone(),
            stream: Box::pin(response.bytes_stream()),
            parser: SseParser::default(),
            queue: Default::default(),
            ended: false,
            ended_cleanly: false,
            raw: Vec::new(),
        }
    }

    /// Reads more bytes; false when the stream ended or `wait` passed.
    async fn pump(&mut self, wait: Duration) -> bool {
        if self.ended {
            return false;
        }
        match tokio::time::timeout(wait, self.stream.next()).await {
            Ok(Some(Ok(bytes))) => {
                self.raw.extend_from_slice(&bytes);
                let events = self.parser.feed(&bytes);
                self.queue.extend(events);
                true
            }
            Ok(None) => {
                self.ended = true;
                self.ended_cleanly = true;
                false
            }
            Ok(Some(Err(_))) => {
                self.ended = true;
                false
            }
            Err(_) => false,
        }
    }

    /// The next event within `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || (!self.pump(left).await && self.ended) {
                return self.queue.pop_front();
            }
        }
    }

    /// The next event; panics after [`WAIT`].
    pub async fn next_event(&mut self) -> SseEvent {
        self.next_event_within(WAIT)
            .await
            .expect("an event within the wait")
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next_event().await);
        }
        events
    }

    /// Reads until `blocks` blocks (events or id-only) have arrived.
    pub async fn until_blocks(&mut self, blocks: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.parser.blocks < blocks {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "expected {blocks} blocks, got {}",
                self.parser.blocks
            );
            self.pump(left).await;
            assert!(
                !(self.ended && self.parser.blocks < blocks),
                "stream ended early: {}",
                String::from_utf8_lossy(&self.raw)
            );
        }
    }

    /// Reads until the server closes the stream (or `wait` passes: false).
    pub async fn until_closed(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.ended {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            self.pump(left).await;
        }
        true
    }

    /// Asserts nothing but comments arrive within `wait`.
    pub async fn expect_no_event(&mut self, wait: Duration) {
        if let Some(event) = self.next_event_within(wait).await {
            panic!("unexpected event {event:?}");
        }
    }
}
