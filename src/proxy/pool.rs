//! Keep-alive pool of HTTP/1.1 connections to one upstream endpoint.
//!
//! Built directly on `hyper::client::conn::http1` rather than a general client: spillway knows
//! its endpoints up front, so there is no keyed lookup, no boxed connect future and no task
//! spawned per response to hand the connection back. A connection returns to the pool the
//! moment its response body ends (see [`UpstreamBody`]), and a checkout takes the most recently
//! used one (warm in cache, and it leaves the oldest to age out).
//!
//! Idle connections older than the upstream's `idle_timeout` are never handed out and are closed
//! by a sweeper, so spillway closes an idle connection before an app with a longer idle timeout
//! does — the first defence against the keep-alive race (the second is in `upstream.rs`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::body::RequestBody;

/// The sending half of one pooled HTTP/1.1 connection (its connection task runs on its own).
pub type Sender = SendRequest<RequestBody>;

/// The sweeper never runs more often than this, whatever the idle timeout.
const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(100);

/// Idle keep-alive connections to one endpoint, most recently used last.
#[derive(Debug)]
pub struct Http1Pool {
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
    sweeper_started: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl Http1Pool {
    /// An empty pool whose connections retire after `idle_timeout` unused.
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Http1Pool {
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
            sweeper_started: AtomicBool::new(false),
        })
    }

    /// The most recently used idle connection that is still open and not past the idle
    /// timeout. Connections found closed or too old on the way are dropped (which closes them).
    pub fn checkout(&self) -> Option<Sender> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(c) = idle.pop_back() {
            if !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    /// Returns a connection whose exchange has ended. The oldest entries past the idle timeout
    /// are retired on the way.
    pub fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    /// How many connections sit idle (closed ones not yet noticed included).
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Closes idle connections past the timeout or already closed by the upstream.
    fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout);
    }

    /// Starts the sweeper the first time a connection is made (it needs a runtime, and a pool
    /// that never connects needs none). It ends when the pool is dropped (e.g. a reload
    /// replaced the upstream).
    pub fn ensure_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Http1Pool> = Arc::downgrade(self);
        let period = (self.idle_timeout / 2).max(MIN_SWEEP_PERIOD);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    /// Attaches `sender` to its response, so that the connection comes back to this pool when
    /// the response body has been read to its end. After a `101 Switching Protocols` the
    /// connection is no longer HTTP (the tunnel takes it over) and never comes back.
    pub fn attach(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: Sender,
    ) -> Response<UpstreamBody> {
        let release = (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Release {
            pool: self.clone(),
            sender,
        });
        resp.map(|inner| UpstreamBody { inner, release })
    }
}

/// A connection on loan to one response.
#[derive(Debug)]
struct Release {
    pool: Arc<Http1Pool>,
    sender: Sender,
}

/// An upstream response body. For a pooled HTTP/1.1 connection it hands the connection back
/// to its pool once the body has ended; a body that fails or is dropped early takes its
/// connection with it (hyper closes it: the rest of that response is still on the wire).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    release: Option<Release>,
}

impl UpstreamBody {
    /// A body with no connection to hand back (HTTP/2: the connection is shared anyway).
    pub fn unpooled(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            release: None,
        }
    }

    fn release(&mut self) {
        if let Some(r) = self.release.take() {
            r.pool.put(r.sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            // A length-delimited body is over with its last byte: hand the connection back now,
            // before the end is even polled for.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.release = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Nothing left to read (HEAD, 204, 304, an empty body nobody polled): reusable.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connection to a listener that accepts and then holds the socket open.
    async fn connection(listener: &TcpListener) -> (Sender, tokio::net::TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let io = hyper_util::rt::TokioIo::new(client.unwrap());
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        (sender, server.unwrap().0)
    }

    #[tokio::test]
    async fn checkout_is_last_in_first_out_and_skips_connections_past_the_idle_timeout() {
        tokio::time::pause();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Http1Pool::new(Duration::from_secs(4));
        let (a, _sa) = connection(&listener).await;
        let (b, _sb) = connection(&listener).await;
        let a_since = Instant::now();
        pool.put(a);
        tokio::time::advance(Duration::from_secs(3)).await;
        pool.put(b);
        assert_eq!(pool.idle_count(), 2);
        let first = pool.checkout().expect("an idle connection");
        // The one left idle is the older one: the most recently used (b) was taken.
        let left = pool.idle.lock().unwrap().front().map(|c| c.since);
        assert_eq!(left, Some(a_since), "last in, first out");
        pool.put(first);
        // a is now 4 s old: past the timeout, dropped instead of handed out.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(pool.checkout().is_some(), "b is 1 s old");
        assert!(pool.checkout().is_none(), "a expired");
        assert_eq!(pool.idle_count(), 0);
    }

    /// Sends a GET on a fresh connection whose server answers with `reply`, and attaches the
    /// connection to `pool`.
    async fn exchange(pool: &Arc<Http1Pool>, reply: &'static [u8]) -> Response<UpstreamBody> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut sender, mut server) = connection(&listener).await;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = server.read(&mut buf).await.unwrap();
            server.write_all(reply).await.unwrap();
            // Held open: only the proxy side decides about reuse.
            std::future::pending::<()>().await;
        });
        let req = http::Request::builder()
            .uri("/")
            .header("host", "x")
            .body(RequestBody::Empty)
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        pool.attach(resp, sender)
    }

    #[tokio::test]
    async fn an_answered_connection_comes_back_but_not_after_switching_protocols() {
        let pool = Http1Pool::new(Duration::from_secs(4));
        let done = exchange(&pool, b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert!(done.body().release.is_some());
        drop(done);
        assert_eq!(pool.idle_count(), 1, "an empty body is over: reusable");
        let switched = exchange(
            &pool,
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n",
        )
        .await;
        assert!(
            switched.body().release.is_none(),
            "a 101 connection belongs to its tunnel"
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Http1Pool::new(Duration::from_secs(4));
        let (a, server_side) = connection(&listener).await;
        pool.put(a);
        drop(server_side);
        // The connection task sees the close and the sender reports it; bounded wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let closed = pool
                .idle
                .lock()
                .unwrap()
                .front()
                .is_none_or(|c| c.sender.is_closed());
            if closed || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(pool.checkout().is_none());
    }

    #[tokio::test]
    async fn the_sweeper_closes_idle_connections_after_the_timeout() {
        tokio::time::pause();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Http1Pool::new(Duration::from_secs(2));
        let (a, _sa) = connection(&listener).await;
        pool.put(a);
        pool.ensure_sweeper();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(pool.idle_count(), 1, "not yet past the timeout");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(pool.idle_count(), 0, "swept");
    }
}
