//! The load generator's own correctness (`examples/loadgen/`): its chunked
//! decoder, its payloads, and its gap / duplicate / order accounting. No
//! timing here. Its SSE parsing is the library's decoder, tested with it
//! (`src/sse/decode.rs`).

use crate::common::ChunkedDecoder;

// The example's modules, compiled into this test target as they are.
#[path = "../../examples/loadgen/follow.rs"]
mod follow;
#[path = "../../examples/loadgen/payload.rs"]
#[allow(dead_code)] // `now_micros` is the example's; no test needs a clock
mod payload;
#[path = "../../examples/loadgen/tracker.rs"]
mod tracker;

use follow::{Follow, Seen};
use payload::Payload;
use tracker::SeqTracker;

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
fn chunked_decoder_wants_crlf_and_ends_after_the_trailers() {
    // A lone LF is not a line end here: the gateway must write CRLF.
    let mut decoder = ChunkedDecoder::new();
    assert!(decoder.decode(b"1\nx", &mut Vec::new()).is_err());
    let mut decoder = ChunkedDecoder::new();
    assert!(decoder.decode(b"1\r\nx\n", &mut Vec::new()).is_err());
    // The body ends only after the trailer section's blank line.
    let mut decoder = ChunkedDecoder::new();
    let mut out = Vec::new();
    decoder
        .decode(b"1\r\nx\r\n0\r\nX-T: 1\r\n", &mut out)
        .unwrap();
    assert!(!decoder.is_done());
    decoder.decode(b"\r\n", &mut out).unwrap();
    assert!(decoder.is_done());
    assert_eq!(out, b"x");
}

#[test]
fn chunked_decoder_leaves_what_follows_the_body() {
    let input = b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n";
    let mut decoder = ChunkedDecoder::new();
    let mut out = Vec::new();
    let used = decoder.decode(input, &mut out).unwrap();
    assert_eq!(&input[used..], b"HTTP/1.1 200 OK\r\n");
    assert_eq!(out, b"abc");
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
    let mut tracker = SeqTracker::default();
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
    let mut tracker = SeqTracker::default();
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

#[test]
fn soak_follow_accepts_interleaved_publishers_in_order() {
    // Publishers 0 and 2 on this stream's topics, 1 not.
    let mut follow = Follow::new(vec![true, false, true]);
    for (p, s) in [(0, 0), (2, 0), (2, 1), (0, 1), (0, 2), (2, 2)] {
        assert_eq!(follow.record(p, s), Seen::InOrder, "{p}/{s}");
    }
    assert_eq!((follow.gaps, follow.dups, follow.unexpected), (0, 0, 0));
    assert!(follow.caught_up(&[3, 7, 3]), "publisher 1 is not followed");
    assert!(!follow.caught_up(&[4, 0, 3]));
    assert_eq!(follow.missing(&[5, 0, 3]), 2);
}

#[test]
fn soak_follow_counts_gaps_duplicates_strays_and_rebaselines_on_reset() {
    let mut follow = Follow::new(vec![true, false]);
    assert_eq!(follow.record(0, 0), Seen::InOrder);
    assert_eq!(follow.record(0, 3), Seen::Gap(2));
    assert_eq!(follow.record(0, 3), Seen::Duplicate);
    assert_eq!(follow.record(0, 1), Seen::Duplicate, "late is not in order");
    assert_eq!(follow.record(1, 0), Seen::Unexpected);
    assert_eq!((follow.gaps, follow.dups, follow.unexpected), (2, 2, 1));
    // After a reset the next event of each publisher is the new baseline.
    follow.reset();
    assert_eq!(follow.record(0, 40), Seen::InOrder);
    assert_eq!(follow.record(0, 41), Seen::InOrder);
    assert_eq!((follow.gaps, follow.resets), (2, 1));
    assert!(follow.caught_up(&[42, 0]));
}
