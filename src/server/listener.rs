//! One proxy listener: accept, terminate TLS when configured, serve each connection with
//! HTTP/1.1 or HTTP/2, and hand the open connections to the drain on shutdown.
//!
//! The protocol is picked by the connection's first bytes (the HTTP/2 preface or not). On a
//! TLS listener that agrees with ALPN for every conforming client: `h2` clients send the
//! preface, `http/1.1` clients a request line. On a plain listener it gives HTTP/1.1 and h2c
//! with prior knowledge. HTTP/1.1 is spillway's own server ([`crate::http1::server`]), HTTP/2
//! hyper's.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::drain::{ConnectionSlot, Connections};
use super::timer::SpareTimer;
use crate::config::ListenerSettings;
use crate::config::Priority;
use crate::error::{retry_after_secs, ProxyError, ShedReason};
use crate::http1::request::HeadLimits;
use crate::http1::server::io::{ClientIo, Rewind};
use crate::http1::server::{self as h1, Served, ServerSettings};
use crate::http1::{date, encode};
use crate::metrics::ListenerMetrics;
use crate::pressure::Pressure;
use crate::proxy::{ProxyService, Runtime};
use crate::spare_timer;
use crate::tls::server::ListenerTls;

/// After a failed accept (out of file descriptors, out of memory) wait this long before the
/// next, doubling up to [`MAX_ACCEPT_BACKOFF`] while failures go on: spinning on `accept`
/// would burn the CPU the open connections need to finish and free descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Failed accepts are logged at most this often, with a count.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);
/// How long a refused connection is given to read its 503 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

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
    }
}

/// What a listener serves with.
pub(crate) struct Listener {
    /// Its settings.
    pub(crate) settings: ListenerSettings,
    /// Its connection cap (`max_connections`, lowered to fit the open-file limit).
    pub(crate) cap: u32,
    /// The serving snapshot.
    pub(crate) runtime: Arc<ArcSwap<Runtime>>,
    /// TLS termination, when configured.
    pub(crate) tls: Option<Arc<ListenerTls>>,
    /// Its connection metrics.
    pub(crate) metrics: ListenerMetrics,
    /// spillway's memory pressure.
    pub(crate) pressure: Pressure,
}

/// Accepts and serves until `stop` fires, then returns the open connections for draining.
/// With `tls`, every connection does the TLS handshake first (in its own task, so a slow
/// client never holds up the accept loop). At `cap` open connections a new one is refused:
/// answered 503 and closed, nothing read.
pub(crate) async fn serve(
    listener: TcpListener,
    l: Listener,
    stop: CancellationToken,
) -> Connections {
    let Listener {
        settings,
        cap,
        runtime,
        tls,
        metrics,
        pressure,
    } = l;
    let connections = Connections::counted(Some(metrics.open.clone()));
    let name = settings.name.clone();
    let h1 = Arc::new(server_settings(&settings));
    let mut h2 = H2Builder::new(TokioExecutor::new());
    h2.timer(SpareTimer);
    let h2 = Arc::new(h2);
    // X-Forwarded-Proto: what the client spoke to us.
    let proto = if tls.is_some() { "https" } else { "http" };
    let mut failures = AcceptFailures::default();
    let mut pressure_changes = pressure.watch();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            changed = pressure_changes.changed() => {
                // Short of memory: idle connections look again, and close.
                if changed.is_ok() && pressure.soft() {
                    connections.nudge_all();
                }
                continue;
            }
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                failures.ended(&name);
                a
            }
            Err(e) => {
                let wait = failures.failed(&name, &e);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        if connections.live() >= cap as usize || pressure.soft() {
            metrics.refused.inc();
            refuse(stream, tls.is_some(), &runtime.load());
            continue;
        }
        let _ = stream.set_nodelay(true);
        let svc = ProxyService::new(runtime.clone(), peer, proto, pressure.clone());
        // Registered from accept on, so a connection still in its TLS handshake counts for the
        // drain too.
        let mut conn = connections.register();
        let (h1, h2, tls, pressure) = (h1.clone(), h2.clone(), tls.clone(), pressure.clone());
        // Its requests' deadlines (head read, route timeout) share one spare timer.
        tokio::spawn(spare_timer::scope(async move {
            let io = match tls {
                None => ClientIo::Plain(stream),
                Some(tls) => {
                    // A drain lets the handshake finish (the connection is then closed before
                    // its first request); a cut ends it. Boxed, like every state an idle
                    // connection is not in: the task's size is that of its largest state.
                    match Box::pin(conn.watch(tls.accept(stream, peer), |_| {})).await {
                        Some(Some(stream)) => ClientIo::Tls(Box::new(stream)),
                        _ => return,
                    }
                }
            };
            serve_io(io, svc, &h1, &h2, &mut conn, peer, &pressure).await;
        }));
    }
    drop(listener);
    connections
}

/// Failed accepts in a row: the backoff before the next, and a log line at most once a second.
#[derive(Default)]
struct AcceptFailures {
    in_a_row: u32,
    unlogged: u64,
    last_log: Option<tokio::time::Instant>,
}

impl AcceptFailures {
    /// Counts a failure; returns how long to wait before accepting again.
    fn failed(&mut self, listener: &str, e: &std::io::Error) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self
            .last_log
            .map_or(true, |at| now.duration_since(at) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(listener, error = %e, failures = self.unlogged, "accept failed; backing off");
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        ACCEPT_BACKOFF
            .saturating_mul(1 << self.in_a_row.min(7).saturating_sub(1))
            .min(MAX_ACCEPT_BACKOFF)
    }

    /// An accept succeeded: the failures (if any) are over.
    fn ended(&mut self, listener: &str) {
        if self.in_a_row > 0 {
            if self.unlogged > 0 {
                tracing::warn!(
                    listener,
                    failures = self.unlogged,
                    "accept failed; recovered"
                );
            }
            *self = AcceptFailures::default();
        }
    }
}

/// Answers a connection over the listener's cap with a 503 and closes it, without reading a
/// request: the app does no work for it. The answer is the concurrency limit's (one mapping
/// in `error.rs`). A TLS listener cannot answer before a handshake it should not spend the
/// CPU on: the connection is just closed.
fn refuse(mut stream: tokio::net::TcpStream, tls: bool, rt: &Runtime) {
    if tls {
        return;
    }
    let answer = refusal(rt);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let linger = async {
            stream.write_all(&answer).await?;
            stream.shutdown().await?;
            // Read what the client sent meanwhile, so the close is not a reset that could
            // destroy the 503 before the client read it.
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
    });
}

/// The bytes of the 503 a refused connection gets.
fn refusal(rt: &Runtime) -> Vec<u8> {
    let err = ProxyError::Shed {
        reason: ShedReason::ConcurrencyLimit,
        retry_after: rt.settings.retry_after,
        // No request has been read: nothing to classify.
        priority: Priority::Normal,
    };
    let p = err.presentation();
    let mut w = Vec::with_capacity(320);
    encode::status_line(&mut w, p.status);
    encode::field(&mut w, b"content-type", b"text/plain; charset=utf-8");
    encode::field(
        &mut w,
        b"content-length",
        p.body.len().to_string().as_bytes(),
    );
    let secs = retry_after_secs(rt.settings.retry_after).to_string();
    encode::field(&mut w, b"retry-after", secs.as_bytes());
    encode::field(&mut w, b"x-served-by", rt.stamps.served_by.as_bytes());
    if let Some(kind) = p.proxy_status {
        encode::field(
            &mut w,
            b"proxy-status",
            rt.stamps.proxy_status(kind).as_bytes(),
        );
    }
    encode::field(&mut w, b"connection", b"close");
    w.extend_from_slice(b"date: ");
    date::append_now(&mut w);
    w.extend_from_slice(b"\r\n\r\n");
    w.extend_from_slice(p.body.as_bytes());
    w
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
    pressure: &Pressure,
) {
    let drain = conn.drain_check();
    // Draining, or short of memory: no keep-alive reuse, and an idle connection closes.
    let pressure = pressure.clone();
    let draining = move || drain.draining() || pressure.soft();
    let served = conn.watch(h1::serve(io, &svc, h1, &draining), |_| {}).await;
    if let Some(Served::Http2(io)) = served {
        // Boxed: hyper's HTTP/2 connection is large, and inline it would make every HTTP/1.1
        // connection's task as large.
        Box::pin(serve_h2(io, svc, h1, h2, conn, peer)).await;
    }
}

/// Serves an HTTP/2 connection (recognised by its preface) with hyper's server.
async fn serve_h2(
    io: Rewind<ClientIo>,
    svc: ProxyService,
    h1: &ServerSettings,
    h2: &H2Builder,
    conn: &mut ConnectionSlot,
    peer: SocketAddr,
) {
    {
        let started = Arc::new(AtomicU64::new(0));
        let http = h2.serve_connection(TokioIo::new(io), svc.counting(started.clone()));
        let http = idle_watch(http, started, h1.header_timeout, h1.idle_timeout);
        if let Some(Some(Err(e))) = conn.watch(http, |http| http.close()).await {
            tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
        }
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 connection under the listener's timeouts: one that starts no request within
    /// `header_timeout` of its start (a client that sent only the preface, or nothing more),
    /// or no new request within `idle_timeout` of its last, is told to go away (GOAWAY: the
    /// streams in flight finish, no new ones start). One that has not even completed its
    /// handshake a `header_timeout` later is dropped (`None`).
    struct IdleWatch<F> {
        #[pin]
        conn: F,
        started: Arc<AtomicU64>,
        seen: u64,
        header_timeout: Duration,
        idle_timeout: Duration,
        timer: Pin<Box<tokio::time::Sleep>>,
        closing: bool,
    }
}

fn idle_watch<F>(
    conn: F,
    started: Arc<AtomicU64>,
    header_timeout: Duration,
    idle_timeout: Duration,
) -> IdleWatch<F> {
    IdleWatch {
        conn,
        started,
        seen: 0,
        header_timeout,
        idle_timeout,
        timer: Box::pin(tokio::time::sleep(header_timeout)),
        closing: false,
    }
}

/// What [`IdleWatch`] needs of hyper's connection.
trait GracefulClose {
    fn close(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulClose for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn close(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<F: Future + GracefulClose> IdleWatch<F> {
    fn close(self: Pin<&mut Self>) {
        let this = self.project();
        *this.closing = true;
        this.conn.close();
    }
}

impl<F: Future + GracefulClose> Future for IdleWatch<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<F::Output>> {
        let this = self.as_mut().project();
        let now = this.started.load(Ordering::Relaxed);
        if now != *this.seen && !*this.closing {
            *this.seen = now;
            let at = tokio::time::Instant::now() + *this.idle_timeout;
            this.timer.as_mut().reset(at);
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            if *this.closing {
                tracing::debug!("HTTP/2 connection did not close after GOAWAY: dropping it");
                return std::task::Poll::Ready(None);
            }
            tracing::debug!("HTTP/2 connection idle: going away");
            let grace = tokio::time::Instant::now() + *this.header_timeout;
            this.timer.as_mut().reset(grace);
            self.as_mut().close();
            // Registers the grace period's wake-up.
            let _ = self.as_mut().project().timer.as_mut().poll(cx);
        }
        self.project().conn.poll(cx).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection costs its task's size (plus a few small allocations): every state it
    /// spends time in while busy (a request in flight, a TLS handshake, HTTP/2) is boxed, so the
    /// task stays small. The figure is debug-build, where futures are largest.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let loaded = crate::config::load_str(
            "listeners: [{address: 127.0.0.1:0}]\nupstreams: {app: {endpoints: [\"127.0.0.1:1\"]}}\nroutes: [{name: r, upstream: app}]\n",
        )
        .unwrap();
        let metrics = crate::metrics::Metrics::new();
        let rt = Arc::new(ArcSwap::from_pointee(Runtime::build(
            &loaded, &metrics, None,
        )));
        let h1 = server_settings(&loaded.settings.listeners[0]);
        let h2 = H2Builder::new(TokioExecutor::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let svc = ProxyService::new(rt, peer, "http", Pressure::default());
        let connections = Connections::counted(None);
        let mut conn = connections.register();
        let pressure = Pressure::default();
        let task = serve_io(
            ClientIo::Plain(stream),
            svc,
            &h1,
            &h2,
            &mut conn,
            peer,
            &pressure,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "a connection's task is {size} bytes");
    }
}
