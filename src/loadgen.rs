//! The load generator's wire-level pieces, kept in the library so the test
//! suite can pin them (the scenarios themselves live in `examples/loadgen.rs`).
//!
//! - [`SseParser`]: an incremental parser of `text/event-stream` that follows
//!   the WHATWG "Server-sent events" parsing rules (CR, LF and CRLF line ends,
//!   also split across reads; a leading BOM; comments; `data` lines joined with
//!   LF; `id` with NUL ignored; `retry` digits only; a block without data
//!   dispatches nothing but still moves the last event id).
//! - [`ChunkedDecoder`]: incremental HTTP/1.1 `Transfer-Encoding: chunked`.
//! - [`Payload`]: event data carrying a publisher number, a sequence and a
//!   send timestamp, padded to a chosen size, and its fast reader.
//! - [`SeqTracker`]: per-stream gap / duplicate / order accounting.
//!
//! None of this is on the gateway's serving path.

use std::time::{SystemTime, UNIX_EPOCH};

/// One dispatched SSE event (WHATWG "dispatch the event").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type; `message` when the block had no `event:` field.
    pub event: String,
    /// The data buffer, lines joined with LF, without the final LF.
    pub data: String,
    /// The stream's last event id at dispatch time.
    pub last_event_id: String,
}

/// Incremental `text/event-stream` parser: feed bytes as they arrive.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of an unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended in CR: a leading LF of the next one belongs to it.
    after_cr: bool,
    /// Whether the first bytes (and a possible BOM) have been seen.
    started: bool,
    event: String,
    data: String,
    last_event_id: String,
    /// The last `retry:` value, in milliseconds.
    pub retry_ms: Option<u64>,
    /// Comment lines seen (keepalives count here).
    pub comments: u64,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last event id buffer: what a client sends as `Last-Event-ID`.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Parses `bytes`, calling `on_event` for every dispatched event.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_event: impl FnMut(SseEvent)) {
        if !self.started {
            // A UTF-8 BOM may start the stream; it can arrive split.
            let bom = b"\xEF\xBB\xBF";
            let have = self.line.len();
            let take = (bom.len() - have).min(bytes.len());
            if bom[..have] == self.line[..] && bom[have..have + take] == bytes[..take] {
                self.line.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.line.len() < bom.len() {
                    return;
                }
                self.line.clear();
            }
            self.started = true;
        }
        if self.after_cr {
            self.after_cr = false;
            if bytes.first() == Some(&b'\n') {
                bytes = &bytes[1..];
            }
        }
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let line_end = bytes[pos];
            if self.line.is_empty() {
                self.process_line(&bytes[..pos], &mut on_event);
            } else {
                self.line.extend_from_slice(&bytes[..pos]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, &mut on_event);
                self.line = line;
                self.line.clear();
            }
            bytes = &bytes[pos + 1..];
            if line_end == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(bytes);
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = value.into_owned(),
            b"data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            b"id" if !value.contains('\0') => self.last_event_id = value.into_owned(),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent)) {
        if self.data.is_empty() {
            self.event.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the final LF
        let event = std::mem::take(&mut self.event);
        on_event(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
            last_event_id: self.last_event_id.clone(),
        });
    }
}

/// Why a chunked body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad chunked encoding: {0}")]
pub struct ChunkedError(pub &'static str);

/// Incremental decoder of an HTTP/1.1 chunked body.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Bytes of a size line not yet complete.
    size_line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size line up to LF.
    #[default]
    Size,
    /// `n` data bytes left in this chunk.
    Data(usize),
    /// Expecting the CRLF after a chunk's data (`true` once CR was seen).
    DataEnd(bool),
    /// The last chunk was read; trailers and the final CRLF are skipped.
    Done,
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the terminating zero-size chunk was read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, appending body bytes to `out`.
    pub fn decode(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkedError> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size => match input.iter().position(|&b| b == b'\n') {
                    Some(lf) => {
                        self.size_line.extend_from_slice(&input[..lf]);
                        input = &input[lf + 1..];
                        let line = std::mem::take(&mut self.size_line);
                        let text = std::str::from_utf8(&line)
                            .map_err(|_| ChunkedError("size line is not text"))?;
                        let hex = text
                            .trim_end_matches('\r')
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim();
                        let size = usize::from_str_radix(hex, 16)
                            .map_err(|_| ChunkedError("size is not hex"))?;
                        self.state = if size == 0 {
                            ChunkState::Done
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    None => {
                        if self.size_line.len() + input.len() > 1024 {
                            return Err(ChunkedError("size line too long"));
                        }
                        self.size_line.extend_from_slice(input);
                        input = &[];
                    }
                },
                ChunkState::Data(left) => {
                    let take = left.min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if take == left {
                        ChunkState::DataEnd(false)
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::DataEnd(seen_cr) => {
                    match (seen_cr, input[0]) {
                        (false, b'\r') => self.state = ChunkState::DataEnd(true),
                        (_, b'\n') => self.state = ChunkState::Size,
                        _ => return Err(ChunkedError("chunk data not followed by CRLF")),
                    }
                    input = &input[1..];
                }
                ChunkState::Done => return Ok(()),
            }
        }
        Ok(())
    }
}

/// Microseconds since the Unix epoch (the send timestamp in payloads).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What a benchmark event's data carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Which publisher sent it (each publisher numbers its own events).
    pub publisher: u32,
    /// The publisher's sequence number, from 0.
    pub seq: u64,
    /// Send time, microseconds since the Unix epoch.
    pub sent_us: u64,
}

impl Payload {
    /// The JSON object `{"p":…,"seq":…,"ts":…,"pad":"xx…"}`, padded with `x`
    /// to `size` bytes (or the shortest form when `size` is smaller).
    pub fn encode(&self, size: usize) -> String {
        let mut json = format!(
            r#"{{"p":{},"seq":{},"ts":{},"pad":""#,
            self.publisher, self.seq, self.sent_us
        );
        let fill = size.saturating_sub(json.len() + 2);
        json.push_str(&"x".repeat(fill));
        json.push_str("\"}");
        json
    }

    /// Reads the fields back from data written by [`Payload::encode`]
    /// (a server may reformat whitespace, so this only looks for the keys).
    pub fn decode(data: &str) -> Option<Self> {
        Some(Self {
            publisher: u32::try_from(number_after(data, "\"p\":")?).ok()?,
            seq: number_after(data, "\"seq\":")?,
            sent_us: number_after(data, "\"ts\":")?,
        })
    }
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..].trim_start();
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Gap / duplicate / order accounting for one stream.
///
/// Each publisher waits for its acknowledgement before sending its next event,
/// so on every stream one publisher's events must arrive in its own sequence
/// order; events of different publishers may interleave in any order.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    /// Per publisher: a bitset of the sequences received.
    seen: Vec<Vec<u64>>,
    /// Per publisher: the highest sequence received so far.
    highest: Vec<Option<u64>>,
    /// Events received (duplicates included).
    pub received: u64,
    /// Events received a second time (or more).
    pub duplicates: u64,
    /// Events received after a later event of the same publisher.
    pub out_of_order: u64,
}

impl SeqTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one received event.
    pub fn record(&mut self, publisher: u32, seq: u64) {
        let p = publisher as usize;
        if self.seen.len() <= p {
            self.seen.resize_with(p + 1, Vec::new);
            self.highest.resize(p + 1, None);
        }
        self.received += 1;
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let bits = &mut self.seen[p];
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        bits[word] |= 1 << bit;
        match self.highest[p] {
            Some(high) if seq < high => self.out_of_order += 1,
            _ => self.highest[p] = Some(seq),
        }
    }

    /// Distinct events received.
    pub fn distinct(&self) -> u64 {
        self.seen
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Events missing, given how many each publisher sent in `from..to`:
    /// `ranges[p]` is publisher `p`'s expected sequence range.
    pub fn missing(&self, ranges: &[std::ops::Range<u64>]) -> u64 {
        let mut missing = 0;
        for (p, range) in ranges.iter().enumerate() {
            for seq in range.clone() {
                let (word, bit) = ((seq / 64) as usize, seq % 64);
                let has = self
                    .seen
                    .get(p)
                    .and_then(|bits| bits.get(word))
                    .is_some_and(|w| w & (1 << bit) != 0);
                if !has {
                    missing += 1;
                }
            }
        }
        missing
    }

    /// Events received that no publisher was expected to send in `ranges`.
    pub fn unexpected(&self, ranges: &[std::ops::Range<u64>]) -> u64 {
        let expected_seen: u64 = ranges
            .iter()
            .enumerate()
            .map(|(p, r)| r.end - r.start - self.missing_one(p, r))
            .sum();
        self.distinct() - expected_seen
    }

    fn missing_one(&self, p: usize, range: &std::ops::Range<u64>) -> u64 {
        let mut ranges = vec![0..0; p];
        ranges.push(range.clone());
        self.missing(&ranges)
    }
}
