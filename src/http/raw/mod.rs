//! One HTTP/1.x connection, from accept to close: SSE streams are written
//! straight to the socket (plain TCP or a TLS session); everything else is
//! served by hyper.
//!
//! The first request head is read here (same timeout and size limit hyper
//! applies). When it is a plain `GET` of a stream route, the request still
//! goes through the whole router (auth, limits, CORS, tracing), and if the
//! answer carries a subscription ([`Handoff`]) this module writes the
//! response head and then the subscription's chunks itself, HTTP/1.1 chunked
//! (close-delimited for HTTP/1.0). Why: an SSE connection spends its life
//! idle or writing small frames, and hyper keeps an 8 KiB read buffer, a
//! write queue and its connection state for each one; here a stream costs
//! its subscription and the socket. The pump reads nothing but EOF (a client
//! that sends more on a stream connection has its bytes discarded), and
//! times every write that would block against `limits.write_stall`.
//!
//! Any other first request, and anything this module does not fully
//! understand, is handed to hyper together with the bytes already read
//! ([`Rewind`]), so hyper parses and answers it exactly as before.

mod head;
mod pump;
mod response;
mod rewind;

pub use pump::pump;
pub use rewind::Rewind;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::table::StreamRoutes;
use crate::subscription::{Handoff, Subscription};
use head::{classify, Classified, StreamHead};
use response::{response_head, send_small, Framing};

/// The head buffer starts this small and doubles up to the head limit.
const INITIAL_HEAD_BUFFER: usize = 1024;

/// What a connection needs, shared by all of them.
pub struct Shared {
    pub router: Router,
    /// hyper's settings, for HTTP/1.x connections it serves.
    pub http: hyper::server::conn::http1::Builder,
    /// hyper's settings for HTTP/2 connections (negotiated over TLS).
    pub h2: hyper::server::conn::http2::Builder<crate::http::h2::StreamExecutor>,
    /// `http2.idle_timeout`: an HTTP/2 connection with no stream is closed after it.
    pub h2_idle_timeout: Option<Duration>,
    /// Set when the listener speaks TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub write_stall: Duration,
    pub stop: CancellationToken,
    /// Which request heads are streams: the router's own table.
    pub stream_routes: StreamRoutes,
}

/// How the connection goes on after its first head was read.
pub enum Next {
    /// Close it: nothing usable arrived in time, or the peer left.
    Close,
    /// Serve it with hyper, replaying these bytes first.
    Hyper(Bytes),
    /// Send this stream ([`pump`]).
    Stream(Box<Stream>),
}

/// A stream ready to send: its response head and its subscription.
pub struct Stream {
    head: BytesMut,
    subscription: Subscription,
    chunked: bool,
}

/// Reads the first head and, when it is a stream request, runs it through
/// the router: a subscription comes back as [`Next::Stream`], any other
/// answer is sent here. Otherwise says how to go on; `io` stays usable for
/// hyper afterwards. Plain TCP or TLS alike. Everything this allocates is gone when it returns, so an
/// idle stream keeps none of it.
pub async fn serve_first<S>(io: &mut S, peer: SocketAddr, shared: &Shared) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + shared.header_read_timeout;
    let limit = shared.max_header_bytes.max(8192);
    let mut buf = BytesMut::with_capacity(INITIAL_HEAD_BUFFER);
    let mut scanned = 0;
    let (head, len) = loop {
        // Parsed again only when a line was completed: a client trickling a
        // head byte by byte must not cost a parse of the whole buffer per byte.
        if buf[scanned..].contains(&b'\n') {
            match classify(&buf, peer, &shared.stream_routes) {
                Classified::Partial => {}
                Classified::Other => return Next::Hyper(buf.freeze()),
                // The same limit hyper applies to every other head: a head
                // read in one large gulp must not slip past it.
                Classified::Stream(_, len) if len > limit => return Next::Hyper(buf.freeze()),
                Classified::Stream(head, len) => break (head, len),
            }
        }
        scanned = buf.len();
        if buf.len() > limit {
            return Next::Hyper(buf.freeze());
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len());
        }
        let read = tokio::select! {
            () = shared.stop.cancelled() => return Next::Close,
            read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)) => read,
        };
        match read {
            // Too slow (slowloris), gone, or broken: hyper would close too.
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return Next::Close,
            Ok(Ok(_)) => {}
        }
    };
    let StreamHead {
        request,
        keep_alive,
        http11,
    } = *head;
    // Bytes after the head: a pipelined request (only served if the stream is refused).
    let rest = buf.split_off(len).freeze();
    drop(buf);
    let response = match shared.router.clone().oneshot(request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    };
    if let Some(subscription) = response
        .extensions()
        .get::<Handoff>()
        .and_then(Handoff::take)
    {
        // The body (now empty) and the parts go here; the stream keeps neither.
        let (parts, _) = response.into_parts();
        // A stream connection is closed when the stream ends.
        let head = response_head(&parts, http11, Framing::stream(http11), false);
        return Next::Stream(Box::new(Stream {
            head,
            subscription,
            chunked: http11,
        }));
    }
    match send_small(io, response, http11, keep_alive, shared.write_stall).await {
        Ok(()) if keep_alive => Next::Hyper(rest),
        _ => Next::Close,
    }
}
