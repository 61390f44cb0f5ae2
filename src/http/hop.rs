//! Moving a connection from the runtime that accepted it to the stream
//! runtime (`server` says why there are two): a tokio socket belongs to the
//! reactor of the runtime it was registered with, so it is deregistered
//! here and registered again there. For TLS the session state travels
//! along; only the socket under it is swapped.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A connection that can leave one runtime and join another.
pub trait Hop: Sized {
    /// The connection between runtimes (registered with none).
    type Detached: Send + 'static;

    /// Deregisters it from the current runtime.
    fn detach(self) -> io::Result<Self::Detached>;

    /// Registers it with the current runtime.
    fn attach(detached: Self::Detached) -> io::Result<Self>;
}

impl Hop for TcpStream {
    type Detached = std::net::TcpStream;

    fn detach(self) -> io::Result<Self::Detached> {
        self.into_std()
    }

    fn attach(detached: Self::Detached) -> io::Result<Self> {
        TcpStream::from_std(detached)
    }
}

/// The TCP socket under a TLS session, which can be taken out and put back.
pub struct Socket(Option<TcpStream>);

impl Socket {
    pub fn new(tcp: TcpStream) -> Self {
        Self(Some(tcp))
    }

    fn get(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.0
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

impl Hop for TlsStream<Socket> {
    type Detached = (std::net::TcpStream, TlsStream<Socket>);

    fn detach(mut self) -> io::Result<Self::Detached> {
        let tcp = self
            .get_mut()
            .0
             .0
            .take()
            .ok_or(io::ErrorKind::NotConnected)?;
        Ok((tcp.into_std()?, self))
    }

    fn attach((tcp, mut tls): Self::Detached) -> io::Result<Self> {
        tls.get_mut().0 .0 = Some(TcpStream::from_std(tcp)?);
        Ok(tls)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get()?.poll_shutdown(cx)
    }
}
