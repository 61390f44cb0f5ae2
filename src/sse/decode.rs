//! The one `text/event-stream` decoder: the WHATWG HTML "event stream
//! interpretation" (§9.2.6), fed bytes as they arrive, in chunks of any size.
//!
//! `tail`, the load generator and the integration tests all read streams
//! through it, so they agree with each other and with a browser's
//! `EventSource`. The rules, each pinned by a test below:
//!
//! - one UTF-8 BOM is dropped at the start of a stream, nowhere else;
//! - a line ends with CRLF, LF or CR, also when the CR and the LF of a CRLF
//!   arrive in different chunks;
//! - a line starting with `:` is a comment (reported, never an event);
//! - `field: value` loses one space after the colon; a line without a colon
//!   is a field with an empty value; unknown fields are ignored;
//! - `data` appends its value and a LF to the data buffer; `event` sets the
//!   event type;
//! - `id` sets the last event id buffer unless the value holds NUL; the buffer
//!   is never reset, so it carries over to later events;
//! - `retry` sets the reconnection time only when the value is ASCII digits;
//! - a blank line dispatches: the last event id becomes the buffer's value
//!   (also for a block without data, so id-only blocks move it); then, if the
//!   data buffer is empty, only the data and type are reset; otherwise one
//!   trailing LF is removed and the event goes out with the last event id and
//!   its type (`message` when none was given);
//! - at the end of a stream an unfinished event (and line) is discarded.
//!
//! Bytes that are not UTF-8 become U+FFFD, as the spec's decoder does; lines
//! are decoded whole, so a character split between chunks is not damaged.

/// One dispatched event (WHATWG "dispatch the event").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The last event id at dispatch (empty until the stream sets one).
    pub id: String,
    /// The event type; `message` when the block named none.
    pub event: String,
    /// The data lines joined with LF, without the final LF.
    pub data: String,
}

/// What the decoder hands out, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event.
    Event(Event),
    /// A comment line's text, without the colon and one leading space
    /// (keepalives and the gateway's notes to clients arrive this way).
    Comment(String),
}

/// The decoding state of one event source. The last event id and the
/// reconnection time survive [`Decoder::end_stream`] (a reconnect); the
/// half-received event does not.
#[derive(Debug)]
pub struct Decoder {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended with a CR: a LF starting the next one is the
    /// rest of that CRLF, not a second (blank) line.
    after_cr: bool,
    /// No line of this stream has ended yet: the first may start with a BOM.
    at_stream_start: bool,
    /// The data buffer: every `data` value followed by LF.
    data: String,
    /// The event type buffer.
    event_type: String,
    /// The last event id buffer: set by `id`, never reset by a dispatch.
    id_buffer: String,
    /// The event source's last event id: the buffer as of the last blank line.
    last_event_id: String,
    /// The reconnection time the stream asked for.
    retry_ms: Option<u64>,
    /// Blank lines seen: dispatches, with or without an event.
    blocks_ended: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Decoder {
    /// A decoder for a new event source.
    pub fn new() -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            at_stream_start: true,
            data: String::new(),
            event_type: String::new(),
            id_buffer: String::new(),
            last_event_id: String::new(),
            retry_ms: None,
            blocks_ended: 0,
        }
    }

    /// The last event id: what a reconnect sends as `Last-Event-ID`. It moves
    /// when a block ends, so a block cut short by a disconnect does not count.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Sets the last event id (and its buffer), e.g. a resume point the user gave.
    pub fn set_last_event_id(&mut self, id: &str) {
        id.clone_into(&mut self.last_event_id);
        id.clone_into(&mut self.id_buffer);
    }

    /// The reconnection time the stream asked for with `retry:`, if any.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// How many blocks ended (blank lines), whether they carried an event or
    /// only moved the id: tests wait on this for id-only blocks.
    pub fn blocks_ended(&self) -> u64 {
        self.blocks_ended
    }

    /// The stream ended (EOF, error, or the caller gives up on it): the
    /// unfinished event and line are discarded, and the next bytes fed are a
    /// new stream (a BOM may start it again). The last event id and the
    /// reconnection time carry over, as they do for an `EventSource`.
    pub fn end_stream(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.at_stream_start = true;
        self.data.clear();
        self.event_type.clear();
        self.id_buffer.clone_from(&self.last_event_id);
    }

    /// Decodes `bytes`, handing every comment and dispatched event to `emit`.
    pub fn feed(&mut self, mut bytes: &[u8], mut emit: impl FnMut(Item)) {
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.line.is_empty() {
                self.process_line(&bytes[..end], &mut emit);
            } else {
                self.line.extend_from_slice(&bytes[..end]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, &mut emit);
                // Keep the allocation for the next split line.
                self.line = line;
                self.line.clear();
            }
            let was_cr = bytes[end] == b'\r';
            bytes = &bytes[end + 1..];
            if was_cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(bytes);
    }

    fn process_line(&mut self, line: &[u8], emit: &mut impl FnMut(Item)) {
        let mut line = line;
        if std::mem::take(&mut self.at_stream_start) {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(emit);
            return;
        }
        if let Some(comment) = line.strip_prefix(b":") {
            let comment = comment.strip_prefix(b" ").unwrap_or(comment);
            emit(Item::Comment(String::from_utf8_lossy(comment).into_owned()));
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.event_type = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
            }
            b"id" if !value.contains(&0) => {
                self.id_buffer = String::from_utf8_lossy(value).into_owned();
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                // Digits only; a value too large for u64 is ignored like any other bad one.
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, emit: &mut impl FnMut(Item)) {
        self.blocks_ended += 1;
        self.last_event_id.clone_from(&self.id_buffer);
        let event_type = std::mem::take(&mut self.event_type);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        emit(Item::Event(Event {
            id: self.last_event_id.clone(),
            event: if event_type.is_empty() {
                "message".to_owned()
            } else {
                event_type
            },
            data,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` in order to a new decoder; the decoder and what it emitted.
    fn decode(chunks: &[&[u8]]) -> (Decoder, Vec<Item>) {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, |item| out.push(item));
        }
        (decoder, out)
    }

    /// Decodes `input` whole, then split at every position, then byte by
    /// byte: all must emit the same. Returns that, and the whole-input decoder.
    fn decode_every_split(input: &[u8]) -> (Decoder, Vec<Item>) {
        let (decoder, whole) = decode(&[input]);
        for cut in 0..=input.len() {
            let (_, split) = decode(&[&input[..cut], &input[cut..]]);
            assert_eq!(split, whole, "split at {cut} of {input:?}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode(&bytes).1, whole, "byte by byte: {input:?}");
        (decoder, whole)
    }

    fn events(input: &[u8]) -> Vec<Item> {
        decode_every_split(input)
            .1
            .into_iter()
            .filter(|item| matches!(item, Item::Event(_)))
            .collect()
    }

    fn event(id: &str, event: &str, data: &str) -> Item {
        Item::Event(Event {
            id: id.into(),
            event: event.into(),
            data: data.into(),
        })
    }

    #[test]
    fn lf_crlf_and_cr_line_endings_parse_alike() {
        let expected = vec![
            event("E-1", "created", "{\"a\":1}"),
            event("E-2", "message", "2"),
        ];
        for text in [
            "id: E-1\nevent: created\ndata: {\"a\":1}\n\nid: E-2\ndata: 2\n\n",
            "id: E-1\r\nevent: created\r\ndata: {\"a\":1}\r\n\r\nid: E-2\r\ndata: 2\r\n\r\n",
            "id: E-1\revent: created\rdata: {\"a\":1}\r\rid: E-2\rdata: 2\r\r",
        ] {
            assert_eq!(events(text.as_bytes()), expected, "{text:?}");
        }
    }

    #[test]
    fn mixed_line_endings_in_one_stream_parse_even_when_split() {
        let input = b"data: a\r\ndata: b\rdata: c\n\r\nid: 7\r\rdata:d\n\n";
        assert_eq!(
            events(input),
            vec![event("", "message", "a\nb\nc"), event("7", "message", "d")]
        );
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_end() {
        let (_, out) = decode(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(out, vec![event("", "message", "a\nb")]);
    }

    #[test]
    fn our_frames_parse_and_id_only_blocks_move_the_last_event_id() {
        let input =
            b"retry: 2000\n\nid: ep-0\n\nid: ep-1\nevent: created\ndata: {\"a\":1}\n\n: keepalive\n\n";
        let (decoder, out) = decode_every_split(input);
        assert_eq!(
            out,
            vec![
                event("ep-1", "created", "{\"a\":1}"),
                Item::Comment("keepalive".into()),
            ]
        );
        assert_eq!(decoder.retry_ms(), Some(2000));
        assert_eq!(decoder.last_event_id(), "ep-1");
        assert_eq!(decoder.blocks_ended(), 4);
    }

    #[test]
    fn comments_are_reported_and_never_events() {
        let (decoder, out) = decode_every_split(b": keepalive\n\n:no space\n:  two\n\n");
        assert_eq!(
            out,
            vec![
                Item::Comment("keepalive".into()),
                Item::Comment("no space".into()),
                Item::Comment(" two".into()),
            ]
        );
        assert_eq!(decoder.last_event_id(), "");
    }

    #[test]
    fn id_only_blocks_move_the_last_event_id_without_an_event() {
        let (decoder, out) = decode_every_split(b"retry: 250\n\nid: E-7\n\n");
        assert!(out.is_empty());
        assert_eq!(decoder.last_event_id(), "E-7");
        assert_eq!(decoder.retry_ms(), Some(250));
    }

    #[test]
    fn the_last_event_id_persists_across_events_and_goes_out_with_each() {
        let input = b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n";
        assert_eq!(
            events(input),
            vec![
                event("1", "message", "a"),
                event("1", "message", "b"),
                // `id` with an empty value sets it to empty.
                event("", "message", "c"),
            ]
        );
    }

    #[test]
    fn an_id_counts_for_a_reconnect_only_once_its_block_ends() {
        let (mut decoder, out) = decode(&[b"id: E-1\ndata: 1\n\nid: E-2\nevent: x\ndata: 2\n"]);
        assert_eq!(out, vec![event("E-1", "message", "1")]);
        // Cut mid-block: E-2 was not received, so the resume point stays E-1.
        assert_eq!(decoder.last_event_id(), "E-1");
        decoder.end_stream();
        let mut out = Vec::new();
        decoder.feed(b"data: again\n\n", |item| out.push(item));
        assert_eq!(out, vec![event("E-1", "message", "again")]);
    }

    #[test]
    fn an_unfinished_event_is_kept_pending_until_its_blank_line() {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        decoder.feed(b"id: 1\ndata: x\n", |item| out.push(item));
        assert!(out.is_empty(), "no blank line yet");
        decoder.feed(b"\n", |item| out.push(item));
        assert_eq!(out, vec![event("1", "message", "x")]);
    }

    #[test]
    fn a_final_incomplete_event_is_discarded_at_the_end_of_the_stream() {
        let (mut decoder, out) = decode(&[b"data: kept\n\ndata: lost\nevent: x\n\ndata: half"]);
        assert_eq!(
            out,
            vec![event("", "message", "kept"), event("", "x", "lost")]
        );
        decoder.end_stream();
        let mut out = Vec::new();
        // Neither `data: half` nor a pending type leaks into the next stream.
        decoder.feed(b"\ndata: next\n\n", |item| out.push(item));
        assert_eq!(out, vec![event("", "message", "next")]);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        assert_eq!(
            events(b"data: one\ndata:two\ndata\ndata:  three\n\n"),
            vec![event("", "message", "one\ntwo\n\n three")]
        );
    }

    #[test]
    fn only_one_trailing_lf_of_the_data_is_removed() {
        assert_eq!(
            events(b"data: a\ndata\n\ndata\n\n"),
            vec![event("", "message", "a\n"), event("", "message", "")]
        );
    }

    #[test]
    fn field_values_lose_one_space_and_unknown_fields_are_ignored() {
        // A field without a colon has an empty value; an event type is kept
        // only for its own block; a block without data dispatches nothing.
        let input = "data:  two spaces\nfoo: bar\nretry: 12x\n\nevent: only-type\n\ndata\nevent: x\n\ndata: last\n\n";
        let (decoder, out) = decode_every_split(input.as_bytes());
        assert_eq!(
            out,
            vec![
                event("", "message", " two spaces"),
                event("", "x", ""),
                event("", "message", "last"),
            ]
        );
        assert_eq!(decoder.retry_ms(), None);
    }

    #[test]
    fn retry_takes_only_digits() {
        let (decoder, _) =
            decode_every_split(b"retry: 100\n\nretry: 1e3\n\nretry: -5\n\nretry:\n\nretry: 7 \n\n");
        assert_eq!(decoder.retry_ms(), Some(100));
        let (decoder, _) = decode_every_split(b"retry:3000\n\n");
        assert_eq!(decoder.retry_ms(), Some(3000));
    }

    #[test]
    fn a_retry_too_large_for_u64_is_ignored_and_the_previous_one_kept() {
        let (decoder, _) = decode(&[b"retry: 10\n\nretry: 99999999999999999999999\n\n"]);
        assert_eq!(decoder.retry_ms(), Some(10));
    }

    #[test]
    fn an_id_with_nul_is_ignored_and_unknown_fields_too() {
        let (decoder, out) = decode_every_split(b"id: a\0b\nfoo: bar\ndata: x\n\n");
        assert_eq!(out, vec![event("", "message", "x")]);
        assert_eq!(decoder.last_event_id(), "");
        let (decoder, _) = decode_every_split(b"id: ok\n\nid: a\0b\n\n");
        assert_eq!(
            decoder.last_event_id(),
            "ok",
            "a NUL id leaves the last one"
        );
    }

    #[test]
    fn a_block_without_data_dispatches_nothing_and_resets_the_type() {
        assert_eq!(
            events(b"event: lonely\n\ndata: d\n\n"),
            vec![event("", "message", "d")]
        );
    }

    #[test]
    fn a_leading_bom_is_dropped_once_at_the_stream_start_only() {
        assert_eq!(
            events("\u{feff}data: a\n\n".as_bytes()),
            vec![event("", "message", "a")]
        );
        // Later, a BOM is part of the line: `\u{feff}data` is an unknown field.
        assert_eq!(
            events("data: a\n\n\u{feff}data: b\n\n".as_bytes()),
            vec![event("", "message", "a")]
        );
        // Only one is dropped.
        assert_eq!(
            events("\u{feff}\u{feff}data: a\n\ndata: b\n\n".as_bytes()),
            vec![event("", "message", "b")]
        );
        // A new stream (a reconnect) may start with one again.
        let (mut decoder, _) = decode(&["\u{feff}data: a\n\n".as_bytes()]);
        decoder.end_stream();
        let mut out = Vec::new();
        decoder.feed("\u{feff}data: b\n\n".as_bytes(), |item| out.push(item));
        assert_eq!(out, vec![event("", "message", "b")]);
    }

    #[test]
    fn a_resume_point_set_by_the_user_is_kept_until_the_server_moves_it() {
        let mut decoder = Decoder::new();
        decoder.set_last_event_id("E-3");
        let mut out = Vec::new();
        decoder.feed(b"retry: 10\n\ndata: x\n\n", |item| out.push(item));
        assert_eq!(out, vec![event("E-3", "message", "x")]);
        decoder.feed(b"id: E-4\ndata: y\n\n", |item| out.push(item));
        assert_eq!(decoder.last_event_id(), "E-4");
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters_and_split_characters_survive() {
        let input = "data: é✓\n\n".as_bytes();
        assert_eq!(events(input), vec![event("", "message", "é✓")]);
        assert_eq!(
            events(b"data: a\xFFb\n\n"),
            vec![event("", "message", "a\u{fffd}b")]
        );
    }
}
