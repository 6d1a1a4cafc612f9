//! Opens connections to upstream endpoints and classifies why that failed, so a refused
//! connection, an unreachable host, a DNS failure, a connect timeout, a TLS handshake failure
//! and a rejected certificate each keep their own name all the way to the response. The TLS
//! handshake itself is [`crate::tls::client`]'s.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::UpstreamError;
use crate::tls::client::UpstreamTls;

/// A connect failure, already classified. Found again by walking the client error's source
/// chain.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConnectError(pub UpstreamError);

/// When a connection was established; carried in the connection's metadata so a failed request
/// can tell whether it went out on a reused (possibly stale) pooled connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Established(pub Instant);

/// Connects TCP to `host:port` from the URI, then TLS when configured, all within
/// `connect_timeout` (name resolution included).
#[derive(Clone)]
pub(crate) struct Connector {
    connect_timeout: Duration,
    tls: Option<UpstreamTls>,
}

impl Connector {
    /// A connector with this connect timeout, speaking TLS when `tls` is set.
    pub(crate) fn new(connect_timeout: Duration, tls: Option<UpstreamTls>) -> Self {
        Connector {
            connect_timeout,
            tls,
        }
    }
}

/// The byte stream of an upstream connection.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

/// A connection to an upstream endpoint.
#[derive(Debug)]
pub(crate) struct UpstreamIo {
    io: TokioIo<Stream>,
    established: Instant,
    h2: bool,
}

impl UpstreamIo {
    /// The byte stream, for spillway's own HTTP/1.1 client.
    pub(crate) fn into_stream(self) -> Stream {
        self.io.into_inner()
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(Established(self.established));
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}
impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.connect_timeout;
        // The setup current when the connection starts; a reload only affects later ones.
        let tls = self.tls.as_ref().map(UpstreamTls::current);
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let host = uri.host().ok_or(ConnectError(UpstreamError::Dns))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(80);
            let tcp = connect_tcp(host, port, deadline).await?;
            let Some(tls) = tls else {
                return Ok(UpstreamIo {
                    io: TokioIo::new(Stream::Plain(tcp)),
                    established: Instant::now(),
                    h2: false,
                });
            };
            let tls = match &*tls {
                Ok(t) => t,
                Err(problem) => {
                    tracing::debug!(%host, %problem, "upstream TLS setup is unusable");
                    return Err(ConnectError(UpstreamError::TlsCertificate));
                }
            };
            match tokio::time::timeout_at(deadline, tls.connect(host, tcp)).await {
                Ok(Ok((stream, h2))) => Ok(UpstreamIo {
                    io: TokioIo::new(Stream::Tls(Box::new(stream))),
                    established: Instant::now(),
                    h2,
                }),
                Ok(Err(kind)) => Err(ConnectError(kind)),
                Err(_) => Err(ConnectError(UpstreamError::ConnectTimeout)),
            }
        })
    }
}

/// Resolves `host` and connects to the first address that accepts, before `deadline`.
async fn connect_tcp(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(_)) => return Err(ConnectError(UpstreamError::Dns)),
                Err(_) => return Err(ConnectError(UpstreamError::ConnectTimeout)),
            }
        }
    };
    if addrs.is_empty() {
        return Err(ConnectError(UpstreamError::Dns));
    }
    let mut last = UpstreamError::ConnectRefused;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Small requests and responses: do not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "upstream connect failed");
                last = classify_connect_io(&e);
            }
            Err(_) => return Err(ConnectError(UpstreamError::ConnectTimeout)),
        }
    }
    Err(ConnectError(last))
}

/// Maps an OS connect error to what the client is told.
fn classify_connect_io(e: &io::Error) -> UpstreamError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => UpstreamError::ConnectRefused,
        io::ErrorKind::TimedOut => UpstreamError::ConnectTimeout,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::NetworkDown => UpstreamError::Unreachable,
        _ => UpstreamError::ConnectRefused,
    }
}
