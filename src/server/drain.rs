//! The drain of one listener's connections: one small atomic signal per connection.
//!
//! Every accepted connection registers in the listener's [`Connections`] and gets a [`ConnectionSlot`]
//! whose signal is an atomic state (running → drain → cut) plus a waker. The connection task
//! runs its work inside [`ConnectionSlot::watch`], which on each poll reads the state once and registers
//! the task's waker only when the waker or the state changed: a connection that is not being
//! drained pays one load and one pointer comparison per wakeup, where a cancellation token and
//! a watch channel would each poll a future on every wakeup.
//!
//! [`Connections::finish`] asks every live connection to drain, waits for them up to a
//! deadline and cuts the rest.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use prometheus::IntGauge;
use slab::Slab;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Serving normally.
const RUNNING: u8 = 0;
/// Asked to finish in-flight work and close.
const DRAIN: u8 = 1;
/// Must end now.
const CUT: u8 = 2;

/// What one connection is told to do, and how to wake its task when that changes.
struct Signal {
    state: AtomicU8,
    /// Bumped to wake the task without changing the state: something it should look at again
    /// changed (memory pressure began, so an idle connection should close).
    nudges: AtomicU32,
    waker: AtomicWaker,
}

impl Signal {
    /// Moves the state forward to `to` (never back: a late drain does not undo a cut) and wakes
    /// the task when it changed.
    fn raise(&self, to: u8) {
        // Relaxed is enough: the state carries no other data, and the wake that follows orders
        // this store before the poll it causes.
        if self.state.fetch_max(to, Ordering::Relaxed) < to {
            self.waker.wake();
        }
    }
}

/// The live connections of one listener, counted from accept on.
pub(super) struct Connections {
    state: Arc<DrainState>,
}

struct DrainState {
    registry: Mutex<Registry>,
    /// The listener's open-connections gauge, kept equal to the live count.
    open: Option<IntGauge>,
    /// Notified when the last connection ends after a drain was requested.
    emptied: Notify,
}

/// Only locked at connect, disconnect and shutdown, never per request.
struct Registry {
    /// The live connections' signals; a connection's key is its slot, and freed slots are
    /// reused.
    slots: Slab<Arc<Signal>>,
    /// What the listener asks of its connections; new ones start in it.
    mode: u8,
}

impl Registry {
    /// Raises every live connection (and the ones registered later) to `to`; returns how many
    /// connections are live.
    fn raise(&mut self, to: u8) -> usize {
        self.mode = self.mode.max(to);
        for (_, signal) in &self.slots {
            signal.raise(to);
        }
        self.slots.len()
    }
}

impl Connections {
    /// An empty registry for a new listener.
    #[cfg(test)]
    pub(super) fn new() -> Self {
        Self::counted(None)
    }

    /// An empty registry whose live count is mirrored in `open`.
    pub(super) fn counted(open: Option<IntGauge>) -> Self {
        Connections {
            state: Arc::new(DrainState {
                open,
                registry: Mutex::new(Registry {
                    slots: Slab::new(),
                    mode: RUNNING,
                }),
                emptied: Notify::new(),
            }),
        }
    }

    /// Registers a just-accepted connection: it counts for the drain until the returned
    /// handle is dropped.
    pub(super) fn register(&self) -> ConnectionSlot {
        let mut registry = lock(&self.state.registry);
        let signal = Arc::new(Signal {
            state: AtomicU8::new(registry.mode),
            nudges: AtomicU32::new(0),
            waker: AtomicWaker::new(),
        });
        let key = registry.slots.insert(signal.clone());
        if let Some(open) = &self.state.open {
            open.inc();
        }
        ConnectionSlot {
            signal,
            state: self.state.clone(),
            key,
            registered: None,
            seen_nudges: 0,
        }
    }

    /// Wakes every live connection's task to look again at what it may do (a connection
    /// waiting idle for a request closes itself when spillway is short of memory).
    pub(super) fn nudge_all(&self) {
        let registry = lock(&self.state.registry);
        for (_, signal) in &registry.slots {
            signal.nudges.fetch_add(1, Ordering::Relaxed);
            signal.waker.wake();
        }
    }

    /// Connections registered and not yet ended.
    pub(super) fn live(&self) -> usize {
        lock(&self.state.registry).slots.len()
    }

    /// Asks every live connection to drain, waits until all have ended or `deadline` passed,
    /// then cuts the rest; returns how many were cut.
    pub(super) async fn finish(self, deadline: Instant) -> usize {
        if lock(&self.state.registry).raise(DRAIN) == 0 {
            return 0;
        }
        // Each pass waits for a notification or the deadline; a notification left over from
        // earlier only costs one more check.
        loop {
            let emptied = self.state.emptied.notified();
            if self.live() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return lock(&self.state.registry).raise(CUT);
            }
        }
    }
}

/// Nothing panics while the registry is locked, but a poisoned lock must not turn every later
/// connect and disconnect into a panic either.
fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One connection's place in its listener's [`Connections`]; dropping it ends the connection's
/// count.
pub(super) struct ConnectionSlot {
    signal: Arc<Signal>,
    state: Arc<DrainState>,
    key: usize,
    /// The waker last registered in `signal`, to skip registering the same one again.
    registered: Option<Waker>,
    /// The nudge count the task last saw.
    seen_nudges: u32,
}

/// Whether a connection has been asked to drain; cheap to ask on every poll.
#[derive(Clone)]
pub(crate) struct DrainCheck(Arc<Signal>);

impl DrainCheck {
    /// True once a drain (or a cut) was requested.
    pub(crate) fn draining(&self) -> bool {
        self.0.state.load(Ordering::Relaxed) != RUNNING
    }
}

impl ConnectionSlot {
    /// A handle that tells whether this connection is draining.
    pub(crate) fn drain_check(&self) -> DrainCheck {
        DrainCheck(self.signal.clone())
    }

    /// Runs `work` until it completes (`Some(output)`) or the connection is cut (`None`, and
    /// `work` is dropped by the caller). When a drain is requested, `on_drain` is called once
    /// with `work`: e.g. to start a graceful shutdown; a no-op lets `work` run on.
    pub(super) fn watch<F, D>(&mut self, work: F, on_drain: D) -> Watched<'_, F, D>
    where
        F: Future,
        D: FnOnce(Pin<&mut F>),
    {
        Watched {
            work,
            conn: self,
            on_drain: Some(on_drain),
        }
    }

    /// The current state, with this task's waker registered for the next change.
    fn poll_state(&mut self, cx: &mut Context<'_>) -> u8 {
        let state = self.signal.state.load(Ordering::Relaxed);
        let nudges = self.signal.nudges.load(Ordering::Relaxed);
        // Only a state change or a nudge takes the registered waker (both wake after changing
        // their counter), so while neither moved the waker registered last is still there.
        let same_waker = self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if state == RUNNING && same_waker && nudges == self.seen_nudges {
            return RUNNING;
        }
        self.seen_nudges = nudges;
        self.signal.waker.register(cx.waker());
        if !same_waker {
            self.registered = Some(cx.waker().clone());
        }
        // Read again after registering, so a change racing with it is not missed.
        self.signal.state.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut registry = lock(&self.state.registry);
        registry.slots.remove(self.key);
        if let Some(open) = &self.state.open {
            open.dec();
        }
        if registry.slots.is_empty() && registry.mode != RUNNING {
            self.state.emptied.notify_one();
        }
    }
}

pin_project! {
    /// Work run under a connection's drain signal: see [`ConnectionSlot::watch`].
    pub struct Watched<'a, F, D> {
        #[pin]
        work: F,
        conn: &'a mut ConnectionSlot,
        on_drain: Option<D>,
    }
}

impl<F, D> Future for Watched<'_, F, D>
where
    F: Future,
    D: FnOnce(Pin<&mut F>),
{
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        match this.conn.poll_state(cx) {
            RUNNING => {}
            CUT => return Poll::Ready(None),
            _ => {
                if let Some(on_drain) = this.on_drain.take() {
                    on_drain(this.work.as_mut());
                }
            }
        }
        this.work.poll(cx).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::task::Wake;
    use std::time::Duration;

    use super::*;

    /// Counts its wakes.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl CountingWaker {
        fn wakes(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn in_a_second() -> Instant {
        Instant::now() + Duration::from_secs(1)
    }

    /// A connection task whose work never ends on its own: it ends when cut, and counts the
    /// drain requests it saw.
    fn spawn_idle(
        connections: &Connections,
        drains: Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<bool> {
        let mut conn = connections.register();
        tokio::spawn(async move {
            let work = pending::<()>();
            let on_drain = move |_: Pin<&mut _>| {
                drains.fetch_add(1, Ordering::SeqCst);
            };
            conn.watch(work, on_drain).await.is_none()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn no_connections_finish_at_once() {
        let start = Instant::now();
        assert_eq!(Connections::new().finish(in_a_second()).await, 0);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_request_reaches_the_work_and_the_drain_waits_for_it() {
        let connections = Connections::new();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let asked = Arc::new(AtomicBool::new(false));
        let mut conn = connections.register();
        let seen = asked.clone();
        let task = tokio::spawn(async move {
            // Stands in for hyper's graceful shutdown: the work ends 3 s after being asked.
            let work = async move {
                let _ = stop_rx.await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                "done"
            };
            let mut stop_tx = Some(stop_tx);
            let on_drain = move |_: Pin<&mut _>| {
                seen.store(true, Ordering::SeqCst);
                let _ = stop_tx.take().map(|tx| tx.send(()));
            };
            conn.watch(work, on_drain).await
        });
        tokio::task::yield_now().await;
        assert!(!asked.load(Ordering::SeqCst), "not asked before the drain");
        let start = Instant::now();
        let cut = connections.finish(start + Duration::from_secs(10)).await;
        assert_eq!(cut, 0);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3),
            "waited for the work"
        );
        assert!(asked.load(Ordering::SeqCst));
        assert_eq!(task.await.unwrap(), Some("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn connections_still_busy_at_the_deadline_are_cut_and_counted() {
        let connections = Connections::new();
        let drains = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..3)
            .map(|_| spawn_idle(&connections, drains.clone()))
            .collect();
        // One that ends by itself is not counted.
        drop(connections.register());
        assert_eq!(connections.live(), 3);
        tokio::task::yield_now().await;
        let start = Instant::now();
        assert_eq!(connections.finish(start + Duration::from_secs(2)).await, 3);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        for task in tasks {
            let cut = tokio::time::timeout(Duration::from_secs(1), task).await;
            assert!(
                cut.expect("a cut connection ends").unwrap(),
                "ended by the cut"
            );
        }
        assert_eq!(drains.load(Ordering::SeqCst), 3, "each asked to drain once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_not_yet_watched_counts_and_is_cut() {
        // E.g. still in its TLS handshake: registered at accept, watched later.
        let connections = Connections::new();
        let mut conn = connections.register();
        assert_eq!(connections.finish(in_a_second()).await, 1);
        // Cut before it got to its work: the work never runs.
        let ran = conn.watch(async { "served" }, |_| {}).await;
        assert_eq!(ran, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_registered_during_the_drain_starts_draining() {
        let connections = Connections::new();
        let first = connections.register();
        let registry = connections.state.clone();
        let drain = tokio::spawn(connections.finish(in_a_second()));
        tokio::task::yield_now().await;
        let mut late = Connections {
            state: registry.clone(),
        }
        .register();
        let asked = AtomicBool::new(false);
        let ran = late
            .watch(async { "served" }, |_| asked.store(true, Ordering::SeqCst))
            .await;
        assert_eq!(ran, Some("served"));
        assert!(asked.load(Ordering::SeqCst));
        drop((first, late));
        assert_eq!(drain.await.unwrap(), 0);
    }

    #[test]
    fn the_waker_is_registered_once_and_again_when_it_changes() {
        let connections = Connections::new();
        let mut conn = connections.register();
        let (a, b) = (
            Arc::new(CountingWaker::default()),
            Arc::new(CountingWaker::default()),
        );
        let (waker_a, waker_b) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let mut watched = Box::pin(conn.watch(pending::<()>(), |_| {}));
        for _ in 0..3 {
            assert!(watched
                .as_mut()
                .poll(&mut Context::from_waker(&waker_a))
                .is_pending());
        }
        assert!(watched
            .as_mut()
            .poll(&mut Context::from_waker(&waker_b))
            .is_pending());
        lock(&connections.state.registry).raise(DRAIN);
        assert_eq!((a.wakes(), b.wakes()), (0, 1), "the latest waker is woken");
        // The wake took the waker: the next poll must register it again for the cut.
        assert!(watched
            .as_mut()
            .poll(&mut Context::from_waker(&waker_b))
            .is_pending());
        lock(&connections.state.registry).raise(CUT);
        assert_eq!(b.wakes(), 2);
        assert_eq!(
            watched.as_mut().poll(&mut Context::from_waker(&waker_b)),
            Poll::Ready(None)
        );
    }

    #[test]
    fn keys_are_reused_and_the_count_follows() {
        let connections = Connections::new();
        let first = connections.register();
        let second = connections.register();
        assert_eq!((first.key, second.key, connections.live()), (0, 1, 2));
        drop(first);
        assert_eq!(connections.live(), 1);
        let third = connections.register();
        assert_eq!(third.key, 0);
        drop((second, third));
        assert_eq!(connections.live(), 0);
    }
}
