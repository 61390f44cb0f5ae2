//! The load generator's own correctness: its SSE parser (WHATWG rules, input
//! split at every byte), its chunked decoder, its payloads, and its gap /
//! duplicate / order accounting. No timing here.

use sse_gateway::loadgen::{ChunkedDecoder, Payload, SeqTracker, SseEvent, SseParser};

fn parse_all(input: &[u8]) -> (Vec<SseEvent>, SseParser) {
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    parser.feed(input, |e| events.push(e));
    (events, parser)
}

/// Feeds `input` split at every position (and byte by byte); every split must
/// give what one feed gives.
fn parse_every_split(input: &[u8]) -> Vec<SseEvent> {
    let (whole, _) = parse_all(input);
    for cut in 0..=input.len() {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        parser.feed(&input[..cut], |e| events.push(e));
        parser.feed(&input[cut..], |e| events.push(e));
        assert_eq!(events, whole, "split at {cut}");
    }
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    for byte in input {
        parser.feed(std::slice::from_ref(byte), |e| events.push(e));
    }
    assert_eq!(events, whole, "byte by byte");
    whole
}

fn event(event: &str, data: &str, id: &str) -> SseEvent {
    SseEvent {
        event: event.into(),
        data: data.into(),
        last_event_id: id.into(),
    }
}

#[test]
fn sse_parser_reads_our_frames_and_moves_the_id_on_id_only_blocks() {
    let input =
        b"retry: 2000\n\nid: ep-0\n\nid: ep-1\nevent: created\ndata: {\"a\":1}\n\n: keepalive\n\n";
    let events = parse_every_split(input);
    assert_eq!(events, vec![event("created", "{\"a\":1}", "ep-1")]);
    let (_, parser) = parse_all(input);
    assert_eq!(parser.retry_ms, Some(2000));
    assert_eq!(parser.comments, 1);
    assert_eq!(parser.last_event_id(), "ep-1");
}

#[test]
fn sse_parser_handles_cr_lf_and_crlf_line_ends_even_when_split() {
    let input = b"data: a\r\ndata: b\rdata: c\n\r\nid: 7\r\rdata:d\n\n";
    let events = parse_every_split(input);
    assert_eq!(
        events,
        vec![event("message", "a\nb\nc", ""), event("message", "d", "7")]
    );
}

#[test]
fn sse_parser_follows_whatwg_field_rules() {
    // One leading space is stripped, not two; a field without a colon has an
    // empty value; unknown fields are ignored; `id` with NUL is ignored;
    // `retry` needs digits only; a leading BOM is dropped; an event type is
    // kept only for its own block; a block without data dispatches nothing.
    let input = "\u{feff}data:  two spaces\nfoo: bar\nid: a\0b\nretry: 12x\n\nevent: only-type\n\ndata\nevent: x\n\ndata: last\n\n";
    let events = parse_every_split(input.as_bytes());
    assert_eq!(
        events,
        vec![
            event("message", " two spaces", ""),
            event("x", "", ""),
            event("message", "last", ""),
        ]
    );
    let (_, parser) = parse_all(input.as_bytes());
    assert_eq!(parser.retry_ms, None);
}

#[test]
fn sse_parser_keeps_an_unfinished_block_pending() {
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    parser.feed(b"id: 1\ndata: x\n", |e| events.push(e));
    assert!(events.is_empty(), "no blank line yet");
    parser.feed(b"\n", |e| events.push(e));
    assert_eq!(events, vec![event("message", "x", "1")]);
}

#[test]
fn chunked_decoder_joins_chunks_split_anywhere() {
    let input = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
    for cut in 0..=input.len() {
        let mut decoder = ChunkedDecoder::new();
        let mut out = Vec::new();
        decoder.decode(&input[..cut], &mut out).unwrap();
        decoder.decode(&input[cut..], &mut out).unwrap();
        assert_eq!(out, b"hello, world", "split at {cut}");
        assert!(decoder.is_done());
    }
}

#[test]
fn chunked_decoder_refuses_garbage() {
    let mut decoder = ChunkedDecoder::new();
    assert!(decoder.decode(b"zz\r\n", &mut Vec::new()).is_err());
    let mut decoder = ChunkedDecoder::new();
    assert!(decoder.decode(b"1\r\nab", &mut Vec::new()).is_err());
}

#[test]
fn payload_round_trips_at_the_requested_size() {
    let payload = Payload {
        publisher: 3,
        seq: 123_456,
        sent_us: 1_700_000_000_123_456,
    };
    let json = payload.encode(256);
    assert_eq!(json.len(), 256);
    serde_json::from_str::<serde_json::Value>(&json).expect("valid JSON");
    assert_eq!(Payload::decode(&json), Some(payload));
    // Reformatted by a server: still readable.
    let spaced = json.replace(":", ": ");
    assert_eq!(Payload::decode(&spaced), Some(payload));
    assert_eq!(Payload::decode("{\"other\":1}"), None);
}

#[test]
fn seq_tracker_counts_nothing_wrong_for_interleaved_publishers() {
    let mut tracker = SeqTracker::new();
    // Two publishers interleaved: fine, each is in its own order.
    for (p, s) in [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (1, 2)] {
        tracker.record(p, s);
    }
    let ranges = [0..3, 0..3];
    assert_eq!(tracker.received, 6);
    assert_eq!(tracker.distinct(), 6);
    assert_eq!(tracker.duplicates, 0);
    assert_eq!(tracker.out_of_order, 0);
    assert_eq!(tracker.missing(&ranges), 0);
    assert_eq!(tracker.unexpected(&ranges), 0);
}

#[test]
fn seq_tracker_counts_gaps_duplicates_reorders_and_strays() {
    let mut tracker = SeqTracker::new();
    for (p, s) in [(0, 0), (0, 2), (0, 1), (0, 2), (1, 70), (2, 0)] {
        tracker.record(p, s);
    }
    // Publisher 0 sent 0..4 (3 missing), publisher 1 sent 0..2 (both
    // missing; 70 is a stray), publisher 2 sent nothing (0 is a stray).
    let ranges = [0..4, 0..2, 0..0];
    assert_eq!(tracker.received, 6);
    assert_eq!(tracker.duplicates, 1, "0/2 came twice");
    assert_eq!(tracker.out_of_order, 1, "0/1 came after 0/2");
    assert_eq!(tracker.missing(&ranges), 3, "0/3, 1/0 and 1/1");
    assert_eq!(tracker.unexpected(&ranges), 2, "1/70 and 2/0");
}
