//! One connection, from accept to close: SSE streams are written straight to
//! the socket; everything else is served by hyper.
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

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::subscription::{Handoff, Subscription};

/// Most header lines in a head (hyper's own limit).
const MAX_HEADERS: usize = 100;
/// The head buffer starts this small and doubles up to the head limit.
const INITIAL_HEAD_BUFFER: usize = 1024;
/// Largest non-stream body this module sends itself (errors, shed notices).
const MAX_SMALL_BODY: usize = 1 << 20;

/// What a connection needs, shared by all of them.
pub struct Shared {
    pub router: Router,
    /// hyper's settings, for connections it serves.
    pub http: hyper::server::conn::http1::Builder,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub write_stall: Duration,
    pub stop: CancellationToken,
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

/// A stream request's head, ready for the router.
struct StreamHead {
    request: Request<Body>,
    keep_alive: bool,
    http11: bool,
}

/// Reads the first head and, when it is a stream request, runs it through
/// the router: a subscription comes back as [`Next::Stream`], any other
/// answer is sent here. Otherwise says how to go on; `tcp` stays usable for
/// hyper afterwards. Everything this allocates is gone when it returns, so an
/// idle stream keeps none of it.
pub async fn serve_first(tcp: &mut TcpStream, peer: SocketAddr, shared: &Shared) -> Next {
    let deadline = Instant::now() + shared.header_read_timeout;
    let limit = shared.max_header_bytes.max(8192);
    let mut buf = BytesMut::with_capacity(INITIAL_HEAD_BUFFER);
    let mut scanned = 0;
    let (head, len) = loop {
        // Parsed again only when a line was completed: a client trickling a
        // head byte by byte must not cost a parse of the whole buffer per byte.
        if buf[scanned..].contains(&b'\n') {
            match classify(&buf, peer) {
                Classified::Partial => {}
                Classified::Other => return Next::Hyper(buf.freeze()),
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
            read = tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)) => read,
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
    match send_small(tcp, response, http11, keep_alive, shared.write_stall).await {
        Ok(()) if keep_alive => Next::Hyper(rest),
        _ => Next::Close,
    }
}

enum Classified {
    Partial,
    Other,
    Stream(Box<StreamHead>, usize),
}

/// Parses what has arrived: a complete stream head, not a stream request (or
/// not parseable: hyper will answer it), or not complete yet.
fn classify(buf: &[u8], peer: SocketAddr) -> Classified {
    if buf.is_empty() {
        return Classified::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Classified::Partial,
        Err(_) => return Classified::Other,
    };
    match stream_head(&parsed, peer) {
        Some(head) => Classified::Stream(Box::new(head), len),
        None => Classified::Other,
    }
}

/// `GET /topics/{topic}` or `GET /events…` without a body, in HTTP/1.x.
fn is_stream_target(method: &str, path: &str) -> bool {
    if method != "GET" {
        return false;
    }
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    path == "/events"
        || path
            .strip_prefix("/topics/")
            .is_some_and(|topic| !topic.is_empty() && !topic.contains('/'))
}

fn stream_head(parsed: &httparse::Request<'_, '_>, peer: SocketAddr) -> Option<StreamHead> {
    let (method, path, minor) = (parsed.method?, parsed.path?, parsed.version?);
    if !is_stream_target(method, path) {
        return None;
    }
    let http11 = minor == 1;
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path.parse::<Uri>().ok()?)
        .version(if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        })
        .body(Body::empty())
        .ok()?;
    let mut connection_close = !http11;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == header::CONTENT_LENGTH && value.as_bytes() != b"0"
            || name == header::TRANSFER_ENCODING
        {
            // A body on a GET: rare enough to leave to hyper.
            return None;
        }
        if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    connection_close = false;
                }
            }
        }
        request.headers_mut().append(name, value);
    }
    request.extensions_mut().insert(ConnectInfo(peer));
    Some(StreamHead {
        request,
        keep_alive: !connection_close,
        http11,
    })
}

/// How a response body is delimited.
#[derive(Clone, Copy)]
enum Framing {
    Chunked,
    Length(usize),
    /// Until the connection closes (HTTP/1.0 streams).
    Close,
}

impl Framing {
    fn stream(http11: bool) -> Self {
        if http11 {
            Self::Chunked
        } else {
            Self::Close
        }
    }
}

/// Serialises a response head. Framing headers from the handler are replaced
/// by ours; `date` is added as hyper would.
fn response_head(
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
async fn send_small(
    tcp: &TcpStream,
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
    write_all(tcp, &mut [IoSlice::new(&head), IoSlice::new(&body)], stall).await
}

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

/// Writes every slice; a write that makes no progress for `stall` fails.
async fn write_all(tcp: &TcpStream, slices: &mut [IoSlice<'_>], stall: Duration) -> io::Result<()> {
    let mut slices = slices;
    // Drops leading empty slices, so "everything written" is "no slices left".
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match tcp.try_write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Boxed: the rare slow path should not size every stream's state.
                Box::pin(tokio::time::timeout(
                    stall,
                    std::future::poll_fn(|cx| tcp.poll_write_ready(cx)),
                ))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client took no bytes for limits.write_stall",
                    )
                })??;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The `<hex size>\r\n` line of one HTTP/1.1 chunk.
#[derive(Default)]
struct ChunkSize([u8; 18]);

impl ChunkSize {
    fn of(&mut self, len: usize) -> &[u8] {
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

    #[test]
    fn only_plain_gets_of_stream_routes_are_streams() {
        for (method, path) in [
            ("GET", "/events?topic=a"),
            ("GET", "/events"),
            ("GET", "/topics/projects:all"),
            ("GET", "/topics/a?last_event_id=x"),
        ] {
            assert!(is_stream_target(method, path), "{method} {path}");
        }
        for (method, path) in [
            ("POST", "/topics/a"),
            ("HEAD", "/topics/a"),
            ("GET", "/topics"),
            ("GET", "/topics/"),
            ("GET", "/topics/a/info"),
            ("GET", "/eventsx"),
            ("GET", "http://host/topics/a"),
            ("GET", "/"),
        ] {
            assert!(!is_stream_target(method, path), "{method} {path}");
        }
    }

    fn classify_str(raw: &str) -> Classified {
        classify(raw.as_bytes(), "127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn heads_are_classified() {
        assert!(matches!(
            classify_str("GET /topics/a HTTP/1.1\r\nHost: x\r\n"),
            Classified::Partial
        ));
        assert!(matches!(
            classify_str("POST /topics/a HTTP/1.1\r\nHost: x\r\n\r\n"),
            Classified::Other
        ));
        assert!(matches!(
            classify_str("\x00\x01garbage\r\n\r\n"),
            Classified::Other
        ));
        assert!(matches!(
            classify_str("GET /topics/a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
            Classified::Other
        ));
        let raw =
            "GET /topics/a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: e-1\r\n\r\nGET / HTTP/1.1\r\n";
        match classify_str(raw) {
            Classified::Stream(head, len) => {
                assert_eq!(&raw[len..], "GET / HTTP/1.1\r\n");
                assert!(head.keep_alive && head.http11);
                assert_eq!(head.request.headers()["last-event-id"], "e-1");
                assert_eq!(head.request.uri().path(), "/topics/a");
            }
            _ => panic!("not a stream head"),
        }
        match classify_str("GET /events?topic=a HTTP/1.0\r\n\r\n") {
            Classified::Stream(head, _) => assert!(!head.keep_alive && !head.http11),
            _ => panic!("not a stream head"),
        }
        match classify_str("GET /events?topic=a HTTP/1.1\r\nConnection: close\r\n\r\n") {
            Classified::Stream(head, _) => assert!(!head.keep_alive),
            _ => panic!("not a stream head"),
        }
    }
}
