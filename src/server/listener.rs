//! One proxy listener: accept, terminate TLS when configured, serve each connection with
//! HTTP/1.1 or HTTP/2, and hand the open connections to the drain on shutdown.
//!
//! The protocol is picked by the connection's first bytes (the HTTP/2 preface or not). On a
//! TLS listener that agrees with ALPN for every conforming client: `h2` clients send the
//! preface, `http/1.1` clients a request line. On a plain listener it gives HTTP/1.1 and h2c
//! with prior knowledge.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::tls::ListenerTls;
use crate::policy::with_spare_timer;
use crate::proxy::{ProxyService, Runtime};

/// How long a client may take to send a request head: slow-loris protection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Back off this long when accept fails (e.g. out of file descriptors) instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds with SO_REUSEADDR (quick restarts) and a deep backlog (bursts of new connections).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The connections still open when a listener stopped accepting.
pub struct Drained {
    graceful: GracefulShutdown,
    live: Arc<AtomicUsize>,
    /// Fired when the drain timeout passes: every connection task still running drops its
    /// connection (closing the socket) and ends.
    cut: CancellationToken,
}

impl Drained {
    /// Waits for in-flight work until `deadline`; returns how many connections were cut.
    pub async fn finish(self, deadline: tokio::time::Instant) -> usize {
        if self.graceful.count() == 0 {
            return 0;
        }
        match tokio::time::timeout_at(deadline, self.graceful.shutdown()).await {
            Ok(()) => 0,
            Err(_) => {
                let cut = self.live.load(Ordering::SeqCst);
                self.cut.cancel();
                cut
            }
        }
    }
}

type ConnBuilder = auto::Builder<TokioExecutor>;

/// Accepts and serves until `stop` fires, then returns the open connections for draining.
/// With `tls`, every connection does the TLS handshake first (in its own task, so a slow
/// client never holds up the accept loop).
pub async fn serve(
    listener: TcpListener,
    name: String,
    runtime: Arc<ArcSwap<Runtime>>,
    tls: Option<Arc<ListenerTls>>,
    stop: CancellationToken,
) -> Drained {
    let graceful = GracefulShutdown::new();
    let live = Arc::new(AtomicUsize::new(0));
    let cut = CancellationToken::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    // X-Forwarded-Proto: what the client spoke to us.
    let proto = if tls.is_some() { "https" } else { "http" };
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
        let svc = ProxyService::new(runtime.clone(), peer, proto);
        // Watched from accept on, so a connection still in its TLS handshake counts for the
        // drain too.
        let watcher = graceful.watcher();
        let (live, builder, tls, cut) = (live.clone(), builder.clone(), tls.clone(), cut.clone());
        live.fetch_add(1, Ordering::SeqCst);
        // The connection's requests share one spare timer for their route timeouts.
        tokio::spawn(with_spare_timer(async move {
            let serve = async {
                match tls {
                    None => serve_io(&builder, TokioIo::new(stream), svc, watcher, peer).await,
                    Some(tls) => {
                        if let Some(stream) = tls.accept(stream, peer).await {
                            serve_io(&builder, TokioIo::new(stream), svc, watcher, peer).await;
                        }
                    }
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = cut.cancelled() => {}
            }
            live.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    drop(listener);
    Drained {
        graceful,
        live,
        cut,
    }
}

/// Serves one connection (plain or TLS) until it closes, is upgraded away, or is drained.
async fn serve_io<I>(
    builder: &ConnBuilder,
    io: I,
    svc: ProxyService,
    watcher: Watcher,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
