//! Server-Sent Events on the wire, both ways: [`encode`] writes every block the
//! gateway sends (once per event, shared by every subscriber); [`decode`] is
//! the one WHATWG `text/event-stream` parser, used by `tail`, the load
//! generator and the tests, so all three read a stream the way a browser does.
//!
//! The encoding functions are re-exported here because the serving path calls
//! them as `sse::event_frame`, `sse::put_event`, ….

pub mod decode;
pub mod encode;

pub use encode::*;
