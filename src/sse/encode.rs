//! The SSE blocks the gateway writes, each encoded once into `Bytes`.
//!
//! Frames for published events are built once, by the log writer, and shared by
//! every subscriber (docs/API.md "Wire format"). Field values here never hold CR,
//! LF or NUL: ids and names are validated, data is compact JSON.

use bytes::{BufMut, Bytes, BytesMut};

use crate::model::Epoch;

/// Appends one event block: `id:`, `event:`, `data:` and the blank line.
pub fn put_event(buf: &mut BytesMut, epoch: &Epoch, seq: u64, name: &str, data: &[u8]) {
    let mut seq_text = itoa::Buffer::new();
    let seq_text = seq_text.format(seq);
    buf.reserve(epoch.as_str().len() + seq_text.len() + name.len() + data.len() + 24);
    buf.put_slice(b"id: ");
    buf.put_slice(epoch.as_str().as_bytes());
    buf.put_u8(b'-');
    buf.put_slice(seq_text.as_bytes());
    buf.put_slice(b"\nevent: ");
    buf.put_slice(name.as_bytes());
    buf.put_slice(b"\ndata: ");
    buf.put_slice(data);
    buf.put_slice(b"\n\n");
}

/// One event block as shared `Bytes`.
pub fn event_frame(epoch: &Epoch, seq: u64, name: &str, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    put_event(&mut buf, epoch, seq, name, data);
    buf.freeze()
}

/// `retry: <ms>` in a block of its own.
pub fn retry_block(retry_ms: u64) -> String {
    format!("retry: {retry_ms}\n\n")
}

/// An id-only block: moves the client's last event id without an event.
pub fn id_block(id: &str) -> String {
    format!("id: {id}\n\n")
}

/// A comment block (`: text`), ignored by clients; keeps proxies from timing out.
pub fn comment_block(text: &str) -> String {
    format!(": {}\n\n", text.replace(['\r', '\n'], " "))
}

/// The keepalive comment.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Why a resume point could not be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// Events newer than the resume point were trimmed.
    Retention,
    /// Not an id of this log, or ahead of it.
    UnknownId,
}

impl ResetReason {
    /// The `reason` value on the wire and the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retention => "retention",
            Self::UnknownId => "unknown_id",
        }
    }
}

/// The `reset` block of docs/API.md: `id:` is where the stream continues from.
pub fn reset_block(
    continue_from: &str,
    reason: ResetReason,
    requested: &str,
    oldest: Option<&str>,
) -> String {
    let data = serde_json::json!({
        "reason": reason.as_str(),
        "requested": requested,
        "oldest": oldest,
    });
    format!("id: {continue_from}\nevent: reset\ndata: {data}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frame_layout() {
        let epoch = Epoch::parse("ep1").unwrap();
        let frame = event_frame(&epoch, 42, "created", br#"{"a":1}"#);
        assert_eq!(
            &frame[..],
            b"id: ep1-42\nevent: created\ndata: {\"a\":1}\n\n"
        );
    }

    #[test]
    fn reset_block_escapes_requested_id() {
        let block = reset_block("e-5", ResetReason::UnknownId, "bad\"id", None);
        assert_eq!(
            block,
            "id: e-5\nevent: reset\ndata: {\"oldest\":null,\"reason\":\"unknown_id\",\"requested\":\"bad\\\"id\"}\n\n"
        );
    }

    #[test]
    fn comments_stay_one_line() {
        assert_eq!(comment_block("a\nb"), ": a b\n\n");
    }
}
