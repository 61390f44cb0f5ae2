//! Sending one stream: the response head, then each chunk of the
//! subscription as one vectored write, until it ends, the peer leaves or a
//! write stalls.

use std::io::{self, IoSlice};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::response::{write_all, ChunkSize};
use super::Stream;

/// Writes the head, then every chunk of the subscription, until it ends,
/// the peer leaves, or a write stalls.
pub async fn pump(tcp: &mut TcpStream, stream: Stream, stall: Duration) {
    let Stream {
        head,
        mut subscription,
        chunked,
    } = stream;
    let mut head = Some(head);
    loop {
        let chunk = tokio::select! {
            biased;
            chunk = subscription.next_chunk() => chunk,
            ready = std::future::poll_fn(|cx| tcp.poll_read_ready(cx)) => {
                if ready.is_err() || peer_left(tcp) {
                    return;
                }
                continue;
            }
        };
        let Some(chunk) = chunk else { break };
        let mut size = ChunkSize::default();
        let framing: &[u8] = if chunked { size.of(chunk.len()) } else { b"" };
        let trailer: &[u8] = if chunked { b"\r\n" } else { b"" };
        let head_bytes = head.take();
        let mut slices = [
            IoSlice::new(head_bytes.as_deref().unwrap_or_default()),
            IoSlice::new(framing),
            IoSlice::new(&chunk),
            IoSlice::new(trailer),
        ];
        if let Err(e) = write_all(tcp, &mut slices, stall).await {
            tracing::debug!(error = %e, "stream write failed; closing");
            return;
        }
    }
    // The stream ended on our side (shutdown, max age, token expiry).
    let last: &[u8] = if chunked { b"0\r\n\r\n" } else { b"" };
    let head_bytes = head.take();
    let mut slices = [
        IoSlice::new(head_bytes.as_deref().unwrap_or_default()),
        IoSlice::new(last),
    ];
    if write_all(tcp, &mut slices, stall).await.is_ok() {
        let _ = tcp.shutdown().await;
    }
}

/// Whether the peer closed its side; discards anything it sent.
fn peer_left(tcp: &TcpStream) -> bool {
    let mut scratch = [0u8; 512];
    // Bounded, so a client that streams bytes at us cannot hold this task.
    for _ in 0..16 {
        match tcp.try_read(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    false
}
