//! What a benchmark event's data carries: the publisher, its sequence and the
//! send time, padded to the chosen size, and the fast reader of it.

use std::time::{SystemTime, UNIX_EPOCH};

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
