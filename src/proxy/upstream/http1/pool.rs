//! Keep-alive pool of HTTP/1.1 connections to one upstream endpoint.
//!
//! spillway knows its endpoints up front, so there is no keyed lookup: each endpoint has its
//! own pool. A connection returns the moment its response body ends (see
//! [`Http1Body`](super::Http1Body)), and a checkout takes the most recently used one
//! (warm in cache, and it leaves the oldest to age out).
//!
//! Idle connections older than the upstream's `idle_timeout` are never handed out and are closed
//! by a sweeper, so spillway closes an idle connection before an app with a longer idle timeout
//! does — the first defence against the keep-alive race (the second is in `upstream/mod.rs`).
//! Connections the app closed (or wrote to) while idle are skipped at checkout.
//!
//! Two caps keep spillway from holding or opening more than the app wants: at most `max_idle`
//! connections wait in the pool for long, and at most
//! `max_connections` are open at once (busy and idle together; a request that would need one
//! more waits for one to free up, see [`Http1Pool::acquire`]). An idle connection keeps no
//! buffer.
//!
//! Connections beyond `max_idle` are closed only once they have been idle for
//! [`SURPLUS_GRACE`], not as they come back: under load, responses end in bursts and the
//! connections are taken again within milliseconds. Closing them at once made a proxy with
//! more requests in flight than `max_idle` open a new connection for every third request
//! (measured: 15,000 connects in 3 s at 256 in flight), costing both sides a handshake each
//! time and filling the app's host with TIME_WAIT sockets.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Http1Connection;

/// The sweeper never runs more often than this, whatever the idle timeout.
const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(100);

/// How long a connection beyond `max_idle` may stay idle before it is closed: long enough to
/// be taken again by the next burst, short enough that a burst's connections do not linger.
pub(crate) const SURPLUS_GRACE: Duration = Duration::from_secs(1);

/// Idle keep-alive connections to one endpoint, most recently used last.
#[derive(Debug)]
pub(crate) struct Http1Pool {
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
    max_idle: usize,
    slots: Arc<Slots>,
    sweeper_started: AtomicBool,
}

/// The open connections to one endpoint, counted against its cap.
#[derive(Debug)]
struct Slots {
    open: AtomicUsize,
    max: usize,
    /// Woken when a connection closes or goes back to the pool.
    freed: Notify,
}

/// One open connection's place under its endpoint's `max_connections`; given back when the
/// connection is dropped (closed).
#[derive(Debug)]
pub(crate) struct OpenSlot(Arc<Slots>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// What [`Http1Pool::acquire`] found.
#[derive(Debug)]
pub(crate) enum Acquired {
    /// An idle pooled connection.
    Idle(Box<Http1Connection>),
    /// Room to open a new one.
    New(OpenSlot),
}

#[derive(Debug)]
struct Idle {
    conn: Box<Http1Connection>,
    since: Instant,
}

impl Http1Pool {
    /// An empty pool whose connections retire after `idle_timeout` unused, holding at most
    /// `max_idle` idle ones, with at most `max_open` open at once (`None`: no cap).
    pub(crate) fn new(
        idle_timeout: Duration,
        max_idle: usize,
        max_open: Option<usize>,
    ) -> Arc<Self> {
        Arc::new(Http1Pool {
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
            max_idle,
            slots: Arc::new(Slots {
                open: AtomicUsize::new(0),
                max: max_open.unwrap_or(usize::MAX),
                freed: Notify::new(),
            }),
            sweeper_started: AtomicBool::new(false),
        })
    }

    /// A place for one more open connection, if the cap allows.
    pub(crate) fn try_open(&self) -> Option<OpenSlot> {
        let slots = &self.slots;
        slots
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < slots.max).then_some(n + 1)
            })
            .ok()
            .map(|_| OpenSlot(slots.clone()))
    }

    /// An idle connection, or room to open one; at the cap, waits up to `wait` for a connection
    /// to come back or close. `None`: none freed in time.
    pub(crate) async fn acquire(&self, wait: Duration) -> Option<Acquired> {
        let deadline = Instant::now() + wait;
        loop {
            // Registered before looking, so a connection freed in between is not missed.
            let freed = self.slots.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(conn) = self.checkout() {
                return Some(Acquired::Idle(conn));
            }
            if let Some(slot) = self.try_open() {
                return Some(Acquired::New(slot));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// Open connections (idle and busy).
    #[cfg(test)]
    pub(crate) fn open_count(&self) -> usize {
        self.slots.open.load(Ordering::Acquire)
    }

    /// The most recently used idle connection that is still open and not past the idle
    /// timeout. Connections found closed or too old on the way are dropped (which closes them).
    pub(crate) fn checkout(&self) -> Option<Box<Http1Connection>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(mut c) = idle.pop_back() {
            if now.duration_since(c.since) < self.idle_timeout && c.conn.is_open() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Returns a connection whose exchange has ended; it keeps no buffer while idle. The oldest
    /// entries past the idle timeout, or beyond `max_idle` and idle for [`SURPLUS_GRACE`], are
    /// closed on the way.
    pub(crate) fn put(&self, mut conn: Box<Http1Connection>) {
        if conn.rbuf.is_empty() {
            conn.rbuf = BytesMut::new();
        }
        conn.wbuf = Vec::new();
        let now = Instant::now();
        let retired = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let mut retired = Vec::new();
            while idle.front().is_some_and(|c| {
                let idle_for = now.duration_since(c.since);
                idle_for >= self.idle_timeout
                    || (idle.len() >= self.max_idle && idle_for >= SURPLUS_GRACE)
            }) {
                retired.extend(idle.pop_front());
            }
            if self.max_idle > 0 {
                idle.push_back(Idle { conn, since: now });
            } else {
                retired.push(Idle { conn, since: now });
            }
            retired
        };
        // Closed outside the lock.
        drop(retired);
        self.slots.freed.notify_one();
    }

    /// How many connections sit idle (closed ones not yet noticed included).
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Closes idle connections past the timeout or already closed by the upstream, and those
    /// beyond `max_idle` idle for [`SURPLUS_GRACE`].
    fn sweep(&self) {
        let now = Instant::now();
        let retired = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let mut retired = Vec::new();
            // Oldest first: the surplus to close is at the front.
            while idle.len() > self.max_idle
                && idle
                    .front()
                    .is_some_and(|c| now.duration_since(c.since) >= SURPLUS_GRACE)
            {
                retired.extend(idle.pop_front());
            }
            idle.retain_mut(|c| {
                now.duration_since(c.since) < self.idle_timeout && c.conn.is_open()
            });
            retired
        };
        // Closed outside the lock.
        drop(retired);
    }

    /// Starts the sweeper the first time a connection is made (it needs a runtime, and a pool
    /// that never connects needs none). It ends when the pool is dropped (e.g. a reload
    /// replaced the upstream).
    pub(crate) fn ensure_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Http1Pool> = Arc::downgrade(self);
        // Often enough to close a burst's surplus soon after its grace.
        let period = (self.idle_timeout / 2).clamp(MIN_SWEEP_PERIOD, SURPLUS_GRACE);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::upstream::connector::Stream;
    use crate::proxy::upstream::RequestBody;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connection of `pool` to a listener that accepts and then holds the socket open.
    async fn connection(
        listener: &TcpListener,
        pool: &Http1Pool,
    ) -> (Box<Http1Connection>, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let slot = pool.try_open().expect("under the cap");
        (
            Http1Connection::new(Stream::Plain(client.unwrap()), slot),
            server.unwrap().0,
        )
    }

    fn pool(idle_timeout: Duration) -> Arc<Http1Pool> {
        Http1Pool::new(idle_timeout, 64, None)
    }

    #[tokio::test]
    async fn checkout_is_last_in_first_out_and_skips_connections_past_the_idle_timeout() {
        tokio::time::pause();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(Duration::from_secs(4));
        let (a, _sa) = connection(&listener, &pool).await;
        let (b, _sb) = connection(&listener, &pool).await;
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

    /// Sends a GET on a fresh connection whose server answers with `reply` and then holds the
    /// connection open (only the proxy side decides about reuse).
    async fn exchange(
        pool: &Arc<Http1Pool>,
        reply: &'static [u8],
    ) -> http::Response<crate::proxy::upstream::http1::Http1Body> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (conn, mut server) = connection(&listener, pool).await;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = server.read(&mut buf).await.unwrap();
            server.write_all(reply).await.unwrap();
            std::future::pending::<()>().await;
        });
        let (parts, _) = http::Request::builder()
            .uri("/")
            .header("host", "x")
            .body(())
            .unwrap()
            .into_parts();
        conn.send(
            &parts,
            RequestBody::Empty,
            &http::HeaderValue::from_static("app"),
            pool,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn an_answered_connection_comes_back_but_not_after_switching_protocols() {
        let pool = pool(Duration::from_secs(4));
        let done = exchange(&pool, b"HTTP/1.1 204 No Content\r\n\r\n").await;
        drop(done);
        assert_eq!(pool.idle_count(), 1, "an empty body is over: reusable");
        let switched = exchange(
            &pool,
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n",
        )
        .await;
        drop(switched);
        assert_eq!(
            pool.idle_count(),
            1,
            "a 101 connection belongs to its tunnel, never to the pool"
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(Duration::from_secs(4));
        let (a, server_side) = connection(&listener, &pool).await;
        pool.put(a);
        assert_eq!(pool.idle_count(), 1);
        drop(server_side);
        // The close is noticed once the runtime has seen the socket's event; bounded wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool
            .idle
            .lock()
            .unwrap()
            .front_mut()
            .is_some_and(|c| c.conn.is_open())
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(pool.checkout().is_none());
    }

    #[tokio::test]
    async fn the_sweeper_closes_idle_connections_after_the_timeout() {
        tokio::time::pause();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(Duration::from_secs(2));
        let (a, _sa) = connection(&listener, &pool).await;
        pool.put(a);
        pool.ensure_sweeper();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(pool.idle_count(), 1, "not yet past the timeout");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(pool.idle_count(), 0, "swept");
    }

    /// Reads until the peer closes; true when it did within a (paused-clock) second.
    async fn closed(server: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), server.read(&mut buf)).await,
            Ok(Ok(0))
        )
    }

    #[tokio::test]
    async fn beyond_max_idle_the_oldest_connections_close_after_a_grace() {
        tokio::time::pause();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Http1Pool::new(Duration::from_secs(60), 2, None);
        let mut servers = Vec::new();
        for _ in 0..4 {
            let (c, s) = connection(&listener, &pool).await;
            servers.push(s);
            pool.put(c);
        }
        // A burst's connections stay for the next burst.
        assert_eq!(pool.idle_count(), 4);
        assert_eq!(pool.open_count(), 4);
        let again = pool.checkout().expect("taken again");
        tokio::time::advance(SURPLUS_GRACE).await;
        // Coming back, it retires the surplus that waited a whole grace (the two oldest).
        pool.put(again);
        assert_eq!(pool.idle_count(), 2);
        assert_eq!(pool.open_count(), 2, "the oldest were closed");
        assert!(closed(&mut servers[0]).await && closed(&mut servers[1]).await);

        // Without traffic, the sweeper closes the surplus.
        let extra: Vec<_> = [pool.checkout(), pool.checkout()]
            .into_iter()
            .flatten()
            .collect();
        let (c, _s) = connection(&listener, &pool).await;
        pool.put(c);
        for c in extra {
            pool.put(c);
        }
        assert_eq!(pool.idle_count(), 3);
        pool.ensure_sweeper();
        tokio::time::sleep(SURPLUS_GRACE * 2 + Duration::from_millis(10)).await;
        assert_eq!(pool.idle_count(), 2, "swept down to max_idle");
        assert_eq!(pool.open_count(), 2);
    }

    #[tokio::test]
    async fn max_idle_zero_keeps_no_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Http1Pool::new(Duration::from_secs(60), 0, None);
        let (c, mut s) = connection(&listener, &pool).await;
        pool.put(c);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(pool.open_count(), 0);
        assert!(closed(&mut s).await);
    }

    #[tokio::test(start_paused = true)]
    async fn at_max_connections_acquire_waits_for_one_to_free_up_or_gives_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Http1Pool::new(Duration::from_secs(60), 64, Some(2));
        let (a, _sa) = connection(&listener, &pool).await;
        let (b, _sb) = connection(&listener, &pool).await;
        assert!(pool.try_open().is_none(), "two open, cap two");
        // Nothing frees up: refused after the wait, not before.
        let start = Instant::now();
        assert!(pool.acquire(Duration::from_millis(100)).await.is_none());
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // One comes back to the pool after 30 ms: the waiter gets that very connection.
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(Duration::from_secs(1)).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        pool.put(a);
        let got = waiter.await.unwrap();
        assert!(matches!(got, Some(Acquired::Idle(_))), "{got:?}");
        assert_eq!(start.elapsed(), Duration::from_millis(130));
        drop(got);
        // A closed one frees its place for a new connection.
        assert!(
            pool.try_open().is_some(),
            "the dropped idle connection closed"
        );
        drop(b);
        assert_eq!(pool.open_count(), 0);
    }
}
