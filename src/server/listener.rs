//! One proxy listener: accept, terminate TLS when configured, serve each connection with
//! HTTP/1.1 or HTTP/2, and hand the open connections to the drain on shutdown.
//!
//! The protocol is picked by the connection's first bytes (the HTTP/2 preface or not). On a
//! TLS listener that agrees with ALPN for every conforming client: `h2` clients send the
//! preface, `http/1.1` clients a request line. On a plain listener it gives HTTP/1.1 and h2c
//! with prior knowledge. HTTP/1.1 is spillway's own server ([`crate::http1::server`]), HTTP/2
//! hyper's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::drain::{ConnectionSlot, Connections};
use super::timer::SpareTimer;
use crate::config::ListenerSettings;
use crate::http1::request::HeadLimits;
use crate::http1::server::io::ClientIo;
use crate::http1::server::{self as h1, Served, ServerSettings};
use crate::proxy::{ProxyService, Runtime};
use crate::spare_timer;
use crate::tls::server::ListenerTls;

/// Back off this long when accept fails (e.g. out of file descriptors) instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds with SO_REUSEADDR (quick restarts) and a deep backlog (bursts of new connections).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

type H2Builder = hyper::server::conn::http2::Builder<TokioExecutor>;

/// The HTTP/1.1 server's settings for a listener.
fn server_settings(l: &ListenerSettings) -> ServerSettings {
    ServerSettings {
        head: HeadLimits {
            max_bytes: l.max_request_header_bytes as usize,
            max_fields: l.max_request_headers as usize,
        },
        header_timeout: l.header_timeout,
        idle_timeout: l.idle_timeout,
        close_connections: || false,
    }
}

/// Accepts and serves until `stop` fires, then returns the open connections for draining.
/// With `tls`, every connection does the TLS handshake first (in its own task, so a slow
/// client never holds up the accept loop).
pub(crate) async fn serve(
    listener: TcpListener,
    settings: ListenerSettings,
    runtime: Arc<ArcSwap<Runtime>>,
    tls: Option<Arc<ListenerTls>>,
    stop: CancellationToken,
) -> Connections {
    let connections = Connections::new();
    let name = settings.name.clone();
    let h1 = Arc::new(server_settings(&settings));
    let mut h2 = H2Builder::new(TokioExecutor::new());
    h2.timer(SpareTimer);
    let h2 = Arc::new(h2);
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
        let (h1, h2, tls) = (h1.clone(), h2.clone(), tls.clone());
        // Its requests' deadlines (head read, route timeout) share one spare timer.
        tokio::spawn(spare_timer::scope(async move {
            let io = match tls {
                None => ClientIo::Plain(stream),
                Some(tls) => {
                    // A drain lets the handshake finish (the connection is then closed before
                    // its first request); a cut ends it.
                    match conn.watch(tls.accept(stream, peer), |_| {}).await {
                        Some(Some(stream)) => ClientIo::Tls(Box::new(stream)),
                        _ => return,
                    }
                }
            };
            serve_io(io, svc, &h1, &h2, &mut conn, peer).await;
        }));
    }
    drop(listener);
    connections
}

/// Serves one connection (plain or TLS) until it closes, is upgraded away, is drained or is
/// cut: HTTP/1.1 by spillway's own server, HTTP/2 (recognised by its preface) by hyper's.
async fn serve_io(
    io: ClientIo,
    svc: ProxyService,
    h1: &ServerSettings,
    h2: &H2Builder,
    conn: &mut ConnectionSlot,
    peer: SocketAddr,
) {
    let drain = conn.drain_check();
    let draining = move || drain.draining();
    let served = conn.watch(h1::serve(io, &svc, h1, &draining), |_| {}).await;
    if let Some(Served::Http2(io)) = served {
        let http = h2.serve_connection(TokioIo::new(io), svc);
        if let Some(Err(e)) = conn.watch(http, |http| http.graceful_shutdown()).await {
            tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
        }
    }
}
