//! An incremental `text/event-stream` parser for `tail`, following the
//! WHATWG HTML "event stream interpretation".
//!
//! Bytes are fed as they arrive, in chunks of any size. Lines end in CRLF,
//! LF or CR, also when a CRLF is split between two chunks; one leading BOM is
//! dropped; lines starting with `:` are comments; `data` lines are joined with
//! LF; `id` (unless it holds NUL) fills the last-event-id buffer, which becomes
//! the last event id when the block ends, so id-only blocks count too; `retry`
//! with only ASCII digits sets the reconnection delay; a blank line dispatches
//! the block as an event when it has data. A block cut short by a disconnect is
//! dropped, its id included: the server sends it again after the reconnect.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The last event id when the event was dispatched.
    pub id: String,
    /// The event type; `message` when the block named none.
    pub event: String,
    pub data: String,
}

/// What the parser hands out, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(Event),
    /// A comment line's text, without the colon and one leading space.
    Comment(String),
}

/// The parser state of one event source: it survives reconnects (the last
/// event id and the reconnection delay carry over), the half-received block
/// does not.
#[derive(Debug, Default)]
pub struct Parser {
    /// The current line's bytes, decoded when it ends.
    line: Vec<u8>,
    /// The previous byte was a CR: a LF right after it ends nothing.
    after_cr: bool,
    /// No line of this connection has ended yet (for the BOM).
    at_start: bool,
    data: String,
    event_type: String,
    id_buffer: String,
    last_event_id: String,
    retry_ms: Option<u64>,
}

impl Parser {
    /// A parser for a new event source.
    pub fn new() -> Self {
        Self {
            at_start: true,
            ..Self::default()
        }
    }

    /// The last event id: what a reconnect sends as `Last-Event-ID`.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Sets the last event id, e.g. a resume point given by the user.
    pub fn set_last_event_id(&mut self, id: &str) {
        self.last_event_id = id.to_owned();
        self.id_buffer = id.to_owned();
    }

    /// The reconnection delay the server asked for, if any.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Starts a new connection: drops the partly received block and line.
    pub fn reconnect(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.at_start = true;
        self.data.clear();
        self.event_type.clear();
        self.id_buffer = self.last_event_id.clone();
    }

    /// Parses `bytes`, appending what they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Item>) {
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => self.line.push(b),
            }
        }
    }

    fn end_line(&mut self, out: &mut Vec<Item>) {
        let raw = std::mem::take(&mut self.line);
        let mut line = String::from_utf8_lossy(&raw).into_owned();
        if std::mem::take(&mut self.at_start) && line.starts_with('\u{feff}') {
            line.drain(..'\u{feff}'.len_utf8());
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            out.push(Item::Comment(comment.to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event_type = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.id_buffer = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                // Digits only; a value too large for u64 is ignored like any other bad one.
                if let Ok(ms) = value.parse() {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Item>) {
        self.last_event_id = self.id_buffer.clone();
        let event_type = std::mem::take(&mut self.event_type);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        out.push(Item::Event(Event {
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

    fn parse(chunks: &[&[u8]]) -> (Parser, Vec<Item>) {
        let mut parser = Parser::new();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out);
        }
        (parser, out)
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
            assert_eq!(parse(&[text.as_bytes()]).1, expected, "{text:?}");
            // Byte by byte: every split point, a CRLF cut in two included.
            let bytes: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
            assert_eq!(parse(&bytes).1, expected, "{text:?} byte by byte");
        }
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_end() {
        let (_, out) = parse(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(out, vec![event("", "message", "a\nb")]);
    }

    #[test]
    fn comments_are_reported_and_never_events() {
        let (parser, out) = parse(&[b": keepalive\n\n:no space\n: shutting down\n\n"]);
        assert_eq!(
            out,
            vec![
                Item::Comment("keepalive".into()),
                Item::Comment("no space".into()),
                Item::Comment("shutting down".into()),
            ]
        );
        assert_eq!(parser.last_event_id(), "");
    }

    #[test]
    fn id_only_blocks_move_the_last_event_id_without_an_event() {
        let (parser, out) = parse(&[b"retry: 250\n\nid: E-7\n\n"]);
        assert!(out.is_empty());
        assert_eq!(parser.last_event_id(), "E-7");
        assert_eq!(parser.retry_ms(), Some(250));
    }

    #[test]
    fn an_id_counts_only_once_its_block_ends() {
        let (mut parser, out) = parse(&[b"id: E-1\ndata: 1\n\nid: E-2\nevent: x\ndata: 2\n"]);
        assert_eq!(out, vec![event("E-1", "message", "1")]);
        // Cut mid-block: E-2 was not received, so the resume point stays E-1.
        assert_eq!(parser.last_event_id(), "E-1");
        parser.reconnect();
        let mut out = Vec::new();
        parser.feed(b"data: again\n\n", &mut out);
        assert_eq!(out, vec![event("E-1", "message", "again")]);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        let (_, out) = parse(&[b"data: one\ndata:two\ndata\ndata:  three\n\n"]);
        assert_eq!(out, vec![event("", "message", "one\ntwo\n\n three")]);
    }

    #[test]
    fn retry_takes_only_digits() {
        let (parser, _) = parse(&[b"retry: 100\n\nretry: 1e3\n\nretry: -5\n\nretry:\n\n"]);
        assert_eq!(parser.retry_ms(), Some(100));
        let (parser, _) = parse(&[b"retry:3000\n\n"]);
        assert_eq!(parser.retry_ms(), Some(3000));
    }

    #[test]
    fn an_id_with_nul_is_ignored_and_unknown_fields_too() {
        let (parser, out) = parse(&[b"id: a\0b\nfoo: bar\ndata: x\n\n"]);
        assert_eq!(out, vec![event("", "message", "x")]);
        assert_eq!(parser.last_event_id(), "");
    }

    #[test]
    fn a_block_without_data_dispatches_nothing_and_resets_the_type() {
        let (_, out) = parse(&[b"event: lonely\n\ndata: d\n\n"]);
        assert_eq!(out, vec![event("", "message", "d")]);
    }

    #[test]
    fn a_leading_bom_is_dropped_once_per_connection() {
        let (_, out) = parse(&["\u{feff}data: a\n\n".as_bytes()]);
        assert_eq!(out, vec![event("", "message", "a")]);
        let (_, out) = parse(&["data: a\n\n\u{feff}data: b\n\n".as_bytes()]);
        assert_eq!(out, vec![event("", "message", "a")]);
    }

    #[test]
    fn a_resume_point_set_by_the_user_is_kept_until_the_server_moves_it() {
        let mut parser = Parser::new();
        parser.set_last_event_id("E-3");
        let mut out = Vec::new();
        parser.feed(b"retry: 10\n\ndata: x\n\n", &mut out);
        assert_eq!(out, vec![event("E-3", "message", "x")]);
        parser.feed(b"id: E-4\ndata: y\n\n", &mut out);
        assert_eq!(parser.last_event_id(), "E-4");
    }
}
