//! The load generator's HTTP/1.1 client on raw tokio sockets: where to
//! publish and subscribe ([`Target`], source addresses spread over
//! 127.0.0.x), response heads, keep-alive publishers, and SSE streams read
//! through the chunked decoder and the library's WHATWG decoder.
//!
//! `https://` URLs go over TLS (rustls, trusting `--ca-file`), HTTP/1.1 on
//! a connection per stream or publisher; with `--sub-http2` the streams go
//! over HTTP/2 instead (the `h2` crate), `--h2-streams-per-connection` of
//! them multiplexed on each connection ([`H2Pool`]), read through the same
//! WHATWG decoder.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sse_gateway::sse::decode::{Decoder, Event, Item};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::chunked::ChunkedDecoder;
use crate::payload::Payload;
use crate::{Args, ResumeVia};

/// A parsed `http(s)://host:port/path?query`.
#[derive(Debug, Clone)]
pub struct Url {
    addr: SocketAddr,
    host: String,
    path: String,
    /// `https://`.
    tls: bool,
}

impl Url {
    /// Parses a loopback `http://` or `https://` URL (`localhost` means 127.0.0.1).
    pub fn parse(url: &str) -> Result<Self> {
        let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => bail!("only http:// and https:// URLs: {url}"),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = host
            .replace("localhost", "127.0.0.1")
            .parse()
            .with_context(|| format!("host:port of {url}"))?;
        if !addr.ip().is_loopback() {
            bail!("only loopback targets: {url}");
        }
        Ok(Self {
            addr,
            host: host.to_owned(),
            path: path.to_owned(),
            tls,
        })
    }
}

/// A client connection: plain TCP or TLS over it.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS client settings for `https://` URLs: trusts the PEM
/// certificates of `ca_file`; offers `alpn`.
pub fn tls_config(ca_file: &std::path::Path, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("--ca-file {}", ca_file.display()))?
    {
        roots.add(cert.context("a PEM certificate")?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// HTTP/2 connections shared by the streams: each takes up to `per_connection`.
pub struct H2Pool {
    config: Arc<rustls::ClientConfig>,
    per_connection: usize,
    /// The connection being filled and how many streams it has.
    current: tokio::sync::Mutex<Option<(h2::client::SendRequest<Bytes>, usize)>>,
    /// Connections opened.
    pub connections: AtomicUsize,
}

impl H2Pool {
    /// `config` must offer ALPN `h2`.
    pub fn new(config: Arc<rustls::ClientConfig>, per_connection: usize) -> Self {
        Self {
            config,
            per_connection: per_connection.max(1),
            current: tokio::sync::Mutex::new(None),
            connections: AtomicUsize::new(0),
        }
    }

    /// A connection with room for one more stream (a new one when the
    /// current one is full).
    async fn sender(&self, target: &Target, url: &Url) -> Result<h2::client::SendRequest<Bytes>> {
        let mut current = self.current.lock().await;
        if let Some((send, used)) = current.as_mut() {
            if *used < self.per_connection {
                *used += 1;
                return Ok(send.clone());
            }
        }
        let tcp = target.connect(url.addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(server_name(url)?, tcp)
            .await
            .context("TLS handshake")?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            bail!("the server did not choose HTTP/2 (ALPN)");
        }
        let (send, connection) = h2::client::Builder::new()
            // Streams read as fast as they can; generous windows so flow
            // control does not pace a fast reader.
            .initial_window_size(1 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake::<_, Bytes>(tls)
            .await
            .context("h2 handshake")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                if std::env::var_os("LOADGEN_DEBUG").is_some() {
                    eprintln!("h2 connection ended: {e}");
                }
            }
        });
        self.connections.fetch_add(1, Ordering::Relaxed);
        *current = Some((send.clone(), 1));
        Ok(send)
    }
}

fn server_name(url: &Url) -> Result<ServerName<'static>> {
    let host = url
        .host
        .rsplit_once(':')
        .map_or(url.host.as_str(), |(h, _)| h);
    ServerName::try_from(host.to_owned()).map_err(|e| anyhow!("TLS server name {host:?}: {e}"))
}

/// Where to publish and subscribe for this run.
pub struct Target {
    publish: Url,
    subscribe: Url,
    body_template: String,
    content_type: String,
    resume: ResumeVia,
    resume_query_name: String,
    source_ips: u8,
    next_source: AtomicUsize,
    /// For `https://` URLs (HTTP/1.1).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Set: streams go over HTTP/2 (`https://` subscribe URL).
    h2: Option<Arc<H2Pool>>,
}

impl Target {
    /// The URLs and body template of `args`, with `{topic}` filled in.
    pub fn new(args: &Args, topic: &str) -> Result<Self> {
        Ok(Self {
            publish: Url::parse(&args.pub_url.replace("{topic}", topic))?,
            subscribe: Url::parse(&args.sub_url.replace("{topic}", topic))?,
            body_template: args.pub_body.clone(),
            content_type: args.pub_content_type.clone(),
            resume: args.resume,
            resume_query_name: args.resume_query_name.clone(),
            source_ips: args.source_ips.max(1),
            next_source: AtomicUsize::new(0),
            tls: match &args.ca_file {
                Some(ca) => Some(tls_config(ca, &[b"http/1.1"])?),
                None => None,
            },
            h2: match (&args.ca_file, args.sub_http2) {
                (Some(ca), true) => Some(Arc::new(H2Pool::new(
                    tls_config(ca, &[b"h2"])?,
                    args.h2_streams_per_connection,
                ))),
                (None, true) => bail!("--sub-http2 needs --ca-file and an https:// --sub-url"),
                (_, false) => None,
            },
        })
    }

    /// HTTP/2 connections opened so far (0 over HTTP/1.1).
    pub fn h2_connections(&self) -> usize {
        self.h2
            .as_ref()
            .map_or(0, |pool| pool.connections.load(Ordering::Relaxed))
    }

    /// A connection to `url`: TLS (HTTP/1.1) for `https://`.
    pub async fn open_io(&self, url: &Url, recv_buffer: Option<u32>) -> Result<Io> {
        let tcp = self.connect_with(url.addr, recv_buffer).await?;
        if !url.tls {
            return Ok(Io::Plain(tcp));
        }
        let config = self
            .tls
            .as_ref()
            .ok_or_else(|| anyhow!("https:// needs --ca-file"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(server_name(url)?, tcp)
            .await
            .context("TLS handshake")?;
        Ok(Io::Tls(Box::new(tls)))
    }

    /// The same target subscribing at `url` instead (e.g. a multi-topic
    /// `/events?topic=a&topic=b`).
    pub fn with_subscribe(&self, url: &str) -> Result<Self> {
        let mut target = clone_target(self);
        target.subscribe = Url::parse(url)?;
        Ok(target)
    }

    /// The same target publishing to `url` instead (e.g. `/publish/batch`).
    pub fn with_publish(&self, url: &str) -> Result<Self> {
        let mut target = clone_target(self);
        target.publish = Url::parse(url)?;
        Ok(target)
    }

    /// Connects from the next source address (bind before connect).
    pub async fn connect(&self, to: SocketAddr) -> Result<TcpStream> {
        self.connect_with(to, None).await
    }

    /// Connects from the next source address, with a receive buffer of
    /// `recv_buffer` bytes when given (set before connecting, so the window
    /// the server sees is small from the start).
    pub async fn connect_with(
        &self,
        to: SocketAddr,
        recv_buffer: Option<u32>,
    ) -> Result<TcpStream> {
        let i = self.next_source.fetch_add(1, Ordering::Relaxed);
        let stream = match to.ip() {
            IpAddr::V4(_) => {
                let source = Ipv4Addr::new(127, 0, 0, 2 + (i % self.source_ips as usize) as u8);
                let socket = TcpSocket::new_v4()?;
                if let Some(size) = recv_buffer {
                    socket.set_recv_buffer_size(size)?;
                }
                socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
                socket.connect(to).await?
            }
            IpAddr::V6(_) => TcpStream::connect(to).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// The publish body for `payload`, padded to `size` bytes of data.
    pub fn body(&self, payload: &Payload, size: usize) -> String {
        self.body_template
            .replace("{payload}", &payload.encode(size))
    }
}

/// A response head: status and how the body is framed.
pub struct Head {
    status: u16,
    chunked: bool,
    content_length: Option<usize>,
    close: bool,
}

/// Reads a response head from `stream` into `buf`; returns the head and
/// how many bytes of `buf` it took.
pub async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<(Head, usize)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = std::str::from_utf8(&buf[..end]).context("response head")?;
            let mut lines = text.split("\r\n");
            let status_line = lines.next().unwrap_or("");
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
            let mut head = Head {
                status,
                chunked: false,
                content_length: None,
                close: false,
            };
            for line in lines {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                let value = value.trim().to_ascii_lowercase();
                match name.trim().to_ascii_lowercase().as_str() {
                    "transfer-encoding" => head.chunked = value.contains("chunked"),
                    "content-length" => head.content_length = value.parse().ok(),
                    "connection" => head.close = value.contains("close"),
                    _ => {}
                }
            }
            return Ok((head, end + 4));
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One keep-alive publisher connection.
pub struct Publisher {
    target: Arc<Target>,
    stream: Option<Io>,
    buf: Vec<u8>,
}

impl Publisher {
    /// A publisher that connects on its first post.
    pub fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// POSTs one body; returns the status and the response body.
    pub async fn post(&mut self, body: &str) -> Result<(u16, Vec<u8>)> {
        // One retry on a fresh connection if the kept-alive one was closed.
        for attempt in 0..2 {
            if self.stream.is_none() {
                self.stream = Some(self.target.open_io(&self.target.publish, None).await?);
                self.buf.clear();
            }
            match self.try_post(body).await {
                Ok(answer) => return Ok(answer),
                Err(e) if attempt == 0 => {
                    self.stream = None;
                    tracing_note(&e);
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    async fn try_post(&mut self, body: &str) -> Result<(u16, Vec<u8>)> {
        let url = &self.target.publish;
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nAccept: application/json\r\n\r\n{}",
            url.path,
            url.host,
            self.target.content_type,
            body.len(),
            body
        );
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        let (head, used) = read_head(stream, &mut self.buf).await?;
        let mut rest = self.buf.split_off(used);
        let mut body_out = Vec::new();
        if head.chunked {
            let mut decoder = ChunkedDecoder::new();
            decoder.decode(&rest, &mut body_out)?;
            let mut chunk = [0u8; 4096];
            while !decoder.is_done() {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("closed inside a chunked body");
                }
                decoder.decode(&chunk[..n], &mut body_out)?;
            }
        } else if let Some(len) = head.content_length {
            while rest.len() < len {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("closed inside a body");
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            body_out = rest;
        }
        if head.close {
            self.stream = None;
        }
        Ok((head.status, body_out))
    }
}

fn tracing_note(e: &anyhow::Error) {
    if std::env::var_os("LOADGEN_DEBUG").is_some() {
        eprintln!("publisher reconnects after: {e:#}");
    }
}

/// How a slow reader reads: at most `chunk` bytes per read, then a pause.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Most bytes taken from the socket per read (also its receive buffer).
    pub chunk: usize,
    /// Sleep after each read.
    pub pause: Duration,
}

/// Why [`Stream::read_for`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// The callback returned false.
    Stopped,
    /// The server ended the stream (EOF or the last chunk).
    Ended,
    /// The deadline passed; the stream is still open and can be read again.
    TimedOut,
}

/// Where a stream's body comes from.
enum Body {
    /// HTTP/1.1 (plain or TLS): the socket, chunked or not.
    H1 {
        io: Io,
        chunked: Option<ChunkedDecoder>,
    },
    /// One HTTP/2 stream (DATA frames carry the SSE bytes as they are).
    H2(h2::RecvStream),
}

/// An open SSE stream.
pub struct Stream {
    body: Body,
    /// Body bytes read with the head, not yet parsed.
    pending: Vec<u8>,
    parser: Decoder,
    /// Read slowly (soak's slow consumers); `None` reads as fast as it can.
    pace: Option<Pace>,
}

impl Stream {
    /// Opens a stream, resuming after `resume` when given.
    pub async fn open(target: &Target, resume: Option<&str>) -> Result<Self> {
        Self::open_with(target, resume, None).await
    }

    /// Opens a stream like [`Stream::open`]; with `pace`, the socket's
    /// receive buffer is `pace.chunk` bytes and every read is followed by
    /// `pace.pause`, so the reader falls behind a fast topic.
    pub async fn open_with(
        target: &Target,
        resume: Option<&str>,
        pace: Option<Pace>,
    ) -> Result<Self> {
        let url = &target.subscribe;
        let mut path = url.path.clone();
        let mut header = String::new();
        if let Some(id) = resume.filter(|id| !id.is_empty()) {
            match target.resume {
                ResumeVia::Header => header = format!("Last-Event-ID: {id}\r\n"),
                ResumeVia::Query => {
                    let encoded: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
                    let sep = if path.contains('?') { '&' } else { '?' };
                    path = format!("{path}{sep}{}={encoded}", target.resume_query_name);
                }
            }
        }
        if let (Some(pool), true) = (&target.h2, url.tls) {
            let send = pool.sender(target, url).await?;
            let mut request = http::Request::get(format!("https://{}{path}", url.host))
                .header("accept", "text/event-stream");
            if let Some((_, id)) = header.trim_end().split_once(": ") {
                request = request.header("last-event-id", id);
            }
            let mut send = send.ready().await.context("h2 ready")?;
            let (response, _) = send
                .send_request(request.body(())?, true)
                .context("h2 request")?;
            let response = response.await.context("h2 response")?;
            if response.status() != 200 {
                bail!("subscribe answered {}", response.status());
            }
            return Ok(Self {
                body: Body::H2(response.into_body()),
                pending: Vec::new(),
                parser: Decoder::new(),
                pace,
            });
        }
        let recv_buffer = pace.map(|p| p.chunk as u32);
        let mut stream = target.open_io(url, recv_buffer).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n{header}\r\n",
            url.host
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let (head, used) = read_head(&mut stream, &mut buf).await?;
        if head.status != 200 {
            bail!("subscribe answered {}", head.status);
        }
        Ok(Self {
            body: Body::H1 {
                io: stream,
                chunked: head.chunked.then(ChunkedDecoder::new),
            },
            pending: buf.split_off(used),
            parser: Decoder::new(),
            pace,
        })
    }

    /// Reads until `on_event` returns false, the stream ends, or `deadline`.
    /// Returns whether it stopped because `on_event` said so.
    pub async fn read_until(
        &mut self,
        deadline: Instant,
        on_event: impl FnMut(&Event) -> bool,
    ) -> Result<bool> {
        Ok(self.read_for(deadline, on_event).await? == ReadEnd::Stopped)
    }

    /// Reads until `on_event` returns false, the stream ends, or `deadline`,
    /// and says which. After [`ReadEnd::TimedOut`] the stream may be read
    /// again: nothing read from the socket is lost (tokio's read is
    /// cancel-safe and every byte read is parsed before returning).
    pub async fn read_for(
        &mut self,
        deadline: Instant,
        mut on_event: impl FnMut(&Event) -> bool,
    ) -> Result<ReadEnd> {
        let cap = self.pace.map_or(16 * 1024, |p| p.chunk.max(1));
        let mut raw = vec![0u8; cap];
        let mut body = Vec::with_capacity(cap);
        let mut first = std::mem::take(&mut self.pending);
        let mut done = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let h2_data;
            let input: &[u8] = if !first.is_empty() {
                first.as_slice()
            } else {
                match &mut self.body {
                    Body::H1 { io, .. } => {
                        let n = match tokio::time::timeout(left, io.read(&mut raw)).await {
                            Ok(n) => n?,
                            Err(_) => return Ok(ReadEnd::TimedOut),
                        };
                        if n == 0 {
                            return Ok(ReadEnd::Ended);
                        }
                        &raw[..n]
                    }
                    Body::H2(stream) => {
                        h2_data = match tokio::time::timeout(left, stream.data()).await {
                            Ok(Some(data)) => data?,
                            Ok(None) => return Ok(ReadEnd::Ended),
                            Err(_) => return Ok(ReadEnd::TimedOut),
                        };
                        let _ = stream.flow_control().release_capacity(h2_data.len());
                        &h2_data[..]
                    }
                }
            };
            body.clear();
            let chunked = match &mut self.body {
                Body::H1 { chunked, .. } => chunked.as_mut(),
                Body::H2(_) => None,
            };
            let sse: &[u8] = match chunked {
                Some(decoder) => {
                    decoder.decode(input, &mut body)?;
                    &body
                }
                None => input,
            };
            self.parser.feed(sse, |item| {
                if let Item::Event(event) = item {
                    if !done && !on_event(&event) {
                        done = true;
                    }
                }
            });
            first.clear();
            if done {
                return Ok(ReadEnd::Stopped);
            }
            if let Body::H1 {
                chunked: Some(decoder),
                ..
            } = &self.body
            {
                if decoder.is_done() {
                    return Ok(ReadEnd::Ended);
                }
            }
            if let Some(pace) = self.pace {
                tokio::time::sleep(pace.pause).await;
            }
        }
    }
}

/// A copy of `t` whose source addresses start again at the first.
pub fn clone_target(t: &Target) -> Target {
    Target {
        publish: t.publish.clone(),
        subscribe: t.subscribe.clone(),
        body_template: t.body_template.clone(),
        content_type: t.content_type.clone(),
        resume: t.resume,
        resume_query_name: t.resume_query_name.clone(),
        source_ips: t.source_ips,
        next_source: AtomicUsize::new(0),
        tls: t.tls.clone(),
        h2: t.h2.clone(),
    }
}
