//! Handing a connection over after `101 Switching Protocols`: the request carries an
//! [`OnUpgrade`]; once the server has written the 101, the connection (with any bytes of the
//! new protocol already read) arrives through it as [`Upgraded`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::io::{ClientIo, Rewind};

/// The client's side of an upgraded connection: what it sends next, and where to write.
#[derive(Debug)]
pub(crate) struct Upgraded(Rewind<ClientIo>);

impl Upgraded {
    pub(super) fn new(read_ahead: Bytes, io: ClientIo) -> Self {
        Upgraded(Rewind::new(read_ahead, io))
    }
}

/// Resolves to the connection once the server has switched protocols; fails if it did not
/// (the response was not a 101, or the connection ended first). Request extensions must be
/// clonable: clones share the one connection, and the first to be awaited takes it.
#[derive(Debug, Clone)]
pub(crate) struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

/// The server's end of an [`OnUpgrade`].
pub(super) type Pending = oneshot::Sender<Upgraded>;

/// A pair for one request that may switch protocols.
pub(super) fn pair() -> (Pending, OnUpgrade) {
    let (tx, rx) = oneshot::channel();
    (tx, OnUpgrade(Arc::new(Mutex::new(Some(rx)))))
}

impl Future for OnUpgrade {
    type Output = io::Result<Upgraded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(rx) = slot.as_mut() else {
            return Poll::Ready(Err(no_upgrade()));
        };
        let got = std::task::ready!(Pin::new(rx).poll(cx));
        *slot = None;
        Poll::Ready(got.map_err(|_| no_upgrade()))
    }
}

fn no_upgrade() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no upgrade took place")
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
