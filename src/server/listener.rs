//! One proxy listener: accept, terminate TLS when configured, serve each connection with
//! HTTP/1.1 or HTTP/2, and hand the open connections to the drain on shutdown.
//!
//! The protocol is picked by the connection's first bytes (the HTTP/2 preface or not). On a
//! TLS listener that agrees with ALPN for every conforming client: `h2` clients send the
//! preface, `http/1.1` clients a request line. On a plain listener it gives HTTP/1.1 and h2c
//! with prior knowledge.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::drain::{ConnectionSlot, Connections};
use super::timer::SpareTimer;
use crate::proxy::{ProxyService, Runtime};
use crate::spare_timer;
use crate::tls::server::ListenerTls;

/// How long a client may take to send a request head: slow-loris protection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Back off this long when accept fails (e.g. out of file descriptors) instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds with SO_REUSEADDR (quick restarts) and a deep backlog (bursts of new connections).
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

type ConnBuilder = auto::Builder<TokioExecutor>;

/// Accepts and serves until `stop` fires, then returns the open connections for draining.
/// With `tls`, every connection does the TLS handshake first (in its own task, so a slow
/// client never holds up the accept loop).
pub(super) async fn serve(
    listener: TcpListener,
    name: String,
    runtime: Arc<ArcSwap<Runtime>>,
    tls: Option<Arc<ListenerTls>>,
    stop: CancellationToken,
) -> Connections {
    let connections = Connections::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(SpareTimer)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(SpareTimer);
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
        // Registered from accept on, so a connection still in its TLS handshake counts for the
        // drain too.
        let mut conn = connections.register();
        let (builder, tls) = (builder.clone(), tls.clone());
        // Its requests' deadlines (head read, route timeout) share one spare timer.
        tokio::spawn(spare_timer::scope(async move {
            match tls {
                None => serve_io(&builder, TokioIo::new(stream), svc, &mut conn, peer).await,
                Some(tls) => {
                    // A drain lets the handshake finish (the connection is then closed before
                    // its first request); a cut ends it.
                    let handshake = conn.watch(tls.accept(stream, peer), |_| {}).await;
                    if let Some(Some(stream)) = handshake {
                        serve_io(&builder, TokioIo::new(stream), svc, &mut conn, peer).await;
                    }
                }
            }
        }));
    }
    drop(listener);
    connections
}

/// Serves one connection (plain or TLS) until it closes, is upgraded away, is drained or is
/// cut.
async fn serve_io<I>(
    builder: &ConnBuilder,
    io: I,
    svc: ProxyService,
    conn: &mut ConnectionSlot,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = builder.serve_connection_with_upgrades(io, svc).into_owned();
    if let Some(Err(e)) = conn.watch(http, |http| http.graceful_shutdown()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
