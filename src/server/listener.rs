//! One proxy listener: accept, serve each connection with HTTP/1.1 or HTTP/2 (h2c prior
//! knowledge), and hand the open connections to the drain on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::{ProxyService, Runtime};

/// How long a client may take to send a request head: slow-loris protection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Back off this long when accept fails (e.g. out of file descriptors) instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds with SO_REUSEADDR (quick restarts) and a deep backlog (bursts of new connections).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The connections still open when a listener stopped accepting.
pub struct Drained {
    graceful: GracefulShutdown,
    live: Arc<AtomicUsize>,
}

impl Drained {
    /// Waits for in-flight work until `deadline`; returns how many connections were cut.
    pub async fn finish(self, deadline: tokio::time::Instant) -> usize {
        if self.graceful.count() == 0 {
            return 0;
        }
        match tokio::time::timeout_at(deadline, self.graceful.shutdown()).await {
            Ok(()) => 0,
            Err(_) => self.live.load(Ordering::SeqCst),
        }
    }
}

/// Accepts and serves until `stop` fires, then returns the open connections for draining.
pub async fn serve(
    listener: TcpListener,
    name: String,
    runtime: Arc<ArcSwap<Runtime>>,
    stop: CancellationToken,
) -> Drained {
    let graceful = GracefulShutdown::new();
    let live = Arc::new(AtomicUsize::new(0));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = ProxyService::new(runtime.clone(), peer, "http");
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        let live = live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            live.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(listener);
    Drained { graceful, live }
}
