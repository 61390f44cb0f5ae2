//! Sending one stream: the response head, then each chunk of the
//! subscription as one vectored write, until it ends, the peer leaves or a
//! write stalls.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::response::{write_all, ChunkSize};
use super::Stream;

/// Writes the head, then every chunk of the subscription, until it ends,
/// the peer leaves, or a write stalls.
pub async fn pump<S>(io: &mut S, stream: Stream, stall: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
            () = std::future::poll_fn(|cx| peer_left(&mut *io, cx)) => return,
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
        if let Err(e) = write_all(io, &mut slices, stall).await {
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
    if write_all(io, &mut slices, stall).await.is_ok() {
        let _ = io.shutdown().await;
    }
}

/// Ready when the peer closed its side (or the connection broke);
/// discards anything it sent. For TLS this also reads `close_notify`.
fn peer_left<S: AsyncRead + Unpin>(io: &mut S, cx: &mut Context<'_>) -> Poll<()> {
    let mut scratch = [0u8; 512];
    // Bounded, so a client that streams bytes at us cannot hold this task.
    for _ in 0..16 {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
            Poll::Ready(Ok(())) => {}
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}
