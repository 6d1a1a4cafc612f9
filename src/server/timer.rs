//! A hyper timer for one connection that reuses its tokio timer from one request head to the
//! next.
//!
//! hyper's HTTP/1 server asks for a new sleep at every request head (the header read timeout)
//! and drops it once the head is read. With a plain tokio timer every request then allocates a
//! timer, inserts it into the timer wheel and removes it again, each under the driver's lock.
//! [`ConnTimer`] keeps the dropped tokio sleep in a one-slot cache and resets it for the next
//! head: the new deadline is later than the one still registered, which tokio handles with one
//! atomic update and no lock. Only a small box per sleep remains, which hyper's API requires.
//!
//! A tokio sleep belongs to the runtime it was made on, so the cache is per connection (made
//! and dropped in the connection's task), never per thread or per process.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A cached tokio sleep, boxed so it can be pinned and moved between hyper's sleeps.
type Slot = Mutex<Option<Pin<Box<tokio::time::Sleep>>>>;

/// hyper's timer for one connection (HTTP/1 and HTTP/2 both): give each connection its own.
#[derive(Clone, Default)]
pub struct ConnTimer {
    slot: Arc<Slot>,
}

impl ConnTimer {
    /// A timer with an empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached tokio sleep reset to `deadline`, or a new one when the cache is empty
    /// (another sleep of this connection is live).
    fn tokio_sleep(&self, deadline: Instant) -> Pin<Box<tokio::time::Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let cached = lock(&self.slot).take();
        match cached {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(ReusedSleep {
            sleep: Some(self.tokio_sleep(deadline)),
            home: self.slot.clone(),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<ReusedSleep>() {
            Some(mut ours) => {
                if let Some(inner) = ours.sleep.as_mut() {
                    inner
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(new_deadline));
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    /// tokio's clock, so hyper's deadlines follow it when it is paused in tests.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// The sleep handed to hyper: gives its tokio sleep back to the connection's cache on drop.
struct ReusedSleep {
    /// Always `Some` until dropped.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    home: Arc<Slot>,
}

impl Future for ReusedSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut().sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl hyper::rt::Sleep for ReusedSleep {}

impl Drop for ReusedSleep {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            // Keeps the most recent sleep; one already cached (another sleep of this connection
            // ended first) is dropped, after the lock is released.
            let _replaced = lock(&self.home).replace(sleep);
        }
    }
}

/// Nothing panics while the slot is locked; a poisoned lock still holds a usable slot.
fn lock(slot: &Slot) -> MutexGuard<'_, Option<Pin<Box<tokio::time::Sleep>>>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::rt::Timer;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn cached(timer: &ConnTimer) -> bool {
        lock(&timer.slot).is_some()
    }

    /// Polls once; true when the sleep has fired.
    async fn fired(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> bool {
        poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_sleep_returns_to_the_slot_and_is_reused() {
        let timer = ConnTimer::new();
        let mut first = timer.sleep(Duration::from_secs(30));
        assert!(!fired(&mut first).await, "registers the tokio timer");
        assert!(!cached(&timer));
        drop(first);
        assert!(cached(&timer), "the dropped sleep's tokio timer is kept");
        let _second = timer.sleep(Duration::from_secs(30));
        assert!(!cached(&timer), "the next sleep takes it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_sleep_fires_at_its_new_deadline() {
        let timer = ConnTimer::new();
        let start = tokio::time::Instant::now();
        let mut first = timer.sleep(Duration::from_secs(30));
        assert!(!fired(&mut first).await);
        drop(first);
        tokio::time::advance(Duration::from_secs(10)).await;
        // Later than the deadline still registered (30 s): tokio's fast path.
        let mut later = timer.sleep(Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(!fired(&mut later).await, "not at the old deadline");
        later.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(40));
        drop(later);
        // Earlier than the one registered: tokio moves it in the wheel.
        let mut earlier = timer.sleep(Duration::from_secs(5));
        earlier.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(45));
    }

    #[tokio::test(start_paused = true)]
    async fn two_live_sleeps_both_fire_at_their_deadlines() {
        let timer = ConnTimer::new();
        let start = tokio::time::Instant::now();
        let mut warm = timer.sleep(Duration::from_secs(1));
        assert!(!fired(&mut warm).await);
        drop(warm);
        let mut long = timer.sleep(Duration::from_secs(20));
        let mut short = timer.sleep(Duration::from_secs(10));
        assert!(!fired(&mut long).await);
        short.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(!fired(&mut long).await);
        drop(short);
        long.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(20));
        drop(long);
        assert!(cached(&timer), "one of them is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_a_live_sleep() {
        let timer = ConnTimer::new();
        let start = tokio::time::Instant::now();
        let mut sleep = timer.sleep(Duration::from_secs(10));
        assert!(!fired(&mut sleep).await);
        timer.reset(&mut sleep, timer.now() + Duration::from_secs(15));
        sleep.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }

    /// hyper's header read timeout with this timer: each request head gets the full timeout
    /// from when hyper starts waiting for it, also when the tokio timer is reused.
    #[tokio::test(start_paused = true)]
    async fn header_read_timeout_counts_from_each_head() {
        const TIMEOUT: Duration = Duration::from_secs(30);
        let (mut client, server) = tokio::io::duplex(4096);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(ConnTimer::new())
            .header_read_timeout(TIMEOUT)
            .keep_alive(true);
        let start = tokio::time::Instant::now();
        let served = tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            });
            let _ = builder.serve_connection(TokioIo::new(server), svc).await;
            start.elapsed()
        });
        let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let mut reply = [0u8; 256];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            client.write_all(request).await.unwrap();
            let n = client.read(&mut reply).await.unwrap();
            assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
        }
        // Half a head, then silence: cut 30 s after the last response, not 30 s after an
        // earlier head's deadline.
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let closed_after = served.await.unwrap();
        assert_eq!(closed_after, Duration::from_secs(60 + 30));
    }
}
