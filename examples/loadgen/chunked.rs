//! Incremental HTTP/1.1 `Transfer-Encoding: chunked` decoding, for the load
//! generator's raw-socket client (and the integration tests' raw HTTP client,
//! which include this file): bytes are fed as they arrive, split anywhere.
//!
//! Chunk extensions (`;name=value`) are skipped; trailers after the last
//! chunk are not read. Only a client of ours uses it: the gateway's own
//! chunked writing is in `src/http/stream_conn.rs`.

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
    /// Reading the hex size line up to its CRLF.
    #[default]
    Size,
    /// `n` data bytes left in this chunk.
    Data(usize),
    /// Expecting the CRLF after a chunk's data (`true` once CR was seen).
    DataEnd(bool),
    /// After the last (zero-size) chunk: trailer lines up to a blank line.
    Trailer,
    /// The body is complete; further input is not ours and is ignored.
    Done,
}

/// Longest size or trailer line accepted, so garbage cannot grow a buffer.
const MAX_LINE: usize = 1024;

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the last chunk and the blank line ending the trailers were read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, appending body bytes to `out`; returns how many bytes
    /// of `input` belonged to the body (the rest follows it on the
    /// connection). Line ends must be CRLF, as RFC 9112 writes them: the
    /// tests that use this decoder check the gateway's framing with it.
    pub fn decode(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkedError> {
        let given = input.len();
        while !input.is_empty() {
            match self.state {
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(lf) = input.iter().position(|&b| b == b'\n') else {
                        if self.size_line.len() + input.len() > MAX_LINE {
                            return Err(ChunkedError("size or trailer line too long"));
                        }
                        self.size_line.extend_from_slice(input);
                        return Ok(given);
                    };
                    self.size_line.extend_from_slice(&input[..lf]);
                    input = &input[lf + 1..];
                    let line = std::mem::take(&mut self.size_line);
                    let line = line
                        .strip_suffix(b"\r")
                        .ok_or(ChunkedError("line not ended by CRLF"))?;
                    self.state = match self.state {
                        ChunkState::Size => match parse_size(line)? {
                            0 => ChunkState::Trailer,
                            size => ChunkState::Data(size),
                        },
                        _ if line.is_empty() => ChunkState::Done,
                        _ => ChunkState::Trailer,
                    };
                }
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
                        (true, b'\n') => self.state = ChunkState::Size,
                        _ => return Err(ChunkedError("chunk data not followed by CRLF")),
                    }
                    input = &input[1..];
                }
                ChunkState::Done => break,
            }
        }
        Ok(given - input.len())
    }
}

/// The size of a `<hex>[;extensions]` line (white space only before `;`).
fn parse_size(line: &[u8]) -> Result<usize, ChunkedError> {
    let hex = match line.iter().position(|&b| b == b';') {
        Some(semi) => line[..semi].trim_ascii_end(),
        None => line,
    };
    if hex.is_empty() || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(ChunkedError("size is not hex"));
    }
    let text = std::str::from_utf8(hex).map_err(|_| ChunkedError("size is not hex"))?;
    usize::from_str_radix(text, 16).map_err(|_| ChunkedError("size too large"))
}
