//! Writing HTTP/1.x responses on the raw socket: the response head, small
//! bodies sent with a length, chunk-size lines, and the stall-timed
//! vectored write every byte goes through.

use std::io::{self, IoSlice};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{header, Response};
use bytes::{BufMut, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Largest non-stream body this module sends itself (errors, shed notices).
const MAX_SMALL_BODY: usize = 1 << 20;

/// How a response body is delimited.
#[derive(Clone, Copy)]
pub(super) enum Framing {
    Chunked,
    Length(usize),
    /// Until the connection closes (HTTP/1.0 streams).
    Close,
}

impl Framing {
    pub(super) fn stream(http11: bool) -> Self {
        if http11 {
            Self::Chunked
        } else {
            Self::Close
        }
    }
}

/// Serialises a response head. Framing headers from the handler are replaced
/// by ours; `date` is added as hyper would.
pub(super) fn response_head(
    parts: &axum::http::response::Parts,
    http11: bool,
    framing: Framing,
    keep_alive: bool,
) -> BytesMut {
    let mut out = BytesMut::with_capacity(256);
    out.put_slice(if http11 { b"HTTP/1.1 " } else { b"HTTP/1.0 " });
    out.put_slice(parts.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"date: ");
    out.put_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    out.put_slice(b"\r\n");
    match framing {
        Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(len) => {
            out.put_slice(b"content-length: ");
            out.put_slice(itoa::Buffer::new().format(len).as_bytes());
            out.put_slice(b"\r\n");
        }
        Framing::Close => {}
    }
    match (framing, keep_alive, http11) {
        (Framing::Close, _, _) | (_, false, true) => out.put_slice(b"connection: close\r\n"),
        (_, true, false) => out.put_slice(b"connection: keep-alive\r\n"),
        _ => {}
    }
    out.put_slice(b"\r\n");
    out
}

/// Sends a response that is not a stream (an error, a shed notice).
pub(super) async fn send_small<S: AsyncWrite + Unpin>(
    io: &mut S,
    response: Response<Body>,
    http11: bool,
    keep_alive: bool,
    stall: Duration,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, MAX_SMALL_BODY)
        .collect()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
        .to_bytes();
    let head = response_head(&parts, http11, Framing::Length(body.len()), keep_alive);
    write_all(io, &mut [IoSlice::new(&head), IoSlice::new(&body)], stall).await
}

/// Writes every slice, then flushes (a TLS session holds what it
/// encrypted until then); a write that makes no progress for `stall` fails.
pub(super) async fn write_all<S: AsyncWrite + Unpin>(
    io: &mut S,
    slices: &mut [IoSlice<'_>],
    stall: Duration,
) -> io::Result<()> {
    let mut slices = slices;
    // Drops leading empty slices, so "everything written" is "no slices left".
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let written = match io.write_vectored(slices).now_or_never() {
            Some(written) => written,
            // Boxed: the rare slow path should not size every stream's state.
            None => Box::pin(tokio::time::timeout(stall, io.write_vectored(slices)))
                .await
                .map_err(|_| stalled())?,
        };
        match written? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => IoSlice::advance_slices(&mut slices, n),
        }
    }
    match io.flush().now_or_never() {
        Some(flushed) => flushed,
        None => Box::pin(tokio::time::timeout(stall, io.flush()))
            .await
            .map_err(|_| stalled())?,
    }
}

fn stalled() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "client took no bytes for limits.write_stall",
    )
}

/// The `<hex size>\r\n` line of one HTTP/1.1 chunk.
#[derive(Default)]
pub(super) struct ChunkSize([u8; 18]);

impl ChunkSize {
    pub(super) fn of(&mut self, len: usize) -> &[u8] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = 0;
        let mut rest = len;
        loop {
            digits += 1;
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        for i in 0..digits {
            self.0[digits - 1 - i] = HEX[(len >> (4 * i)) & 0xf];
        }
        self.0[digits] = b'\r';
        self.0[digits + 1] = b'\n';
        &self.0[..digits + 2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_lowercase_hex_lines() {
        let mut size = ChunkSize::default();
        assert_eq!(size.of(0), b"0\r\n");
        assert_eq!(size.of(9), b"9\r\n");
        assert_eq!(size.of(26), b"1a\r\n");
        assert_eq!(size.of(4096), b"1000\r\n");
        assert_eq!(size.of(usize::MAX), b"ffffffffffffffff\r\n");
    }
}
