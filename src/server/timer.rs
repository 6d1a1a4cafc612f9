//! hyper's timer: its deadlines (the header read timeout, HTTP/2 keep-alive pings) use the
//! connection's spare timer ([`crate::spare_timer`]).
//!
//! hyper's HTTP/1 server asks for a new sleep at every request head and drops it once the head
//! is read; handing it the connection's spare tokio timer, reset, spares the timer wheel an
//! insertion and a removal per request. Only a small box per sleep remains, which hyper's API
//! requires.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::spare_timer;

/// hyper's timer (HTTP/1 and HTTP/2): one for every connection, each using its own spare.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SpareTimer;

impl hyper::rt::Timer for SpareTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(ReusedSleep {
            sleep: Some(spare_timer::take(tokio::time::Instant::from_std(deadline))),
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

/// The sleep handed to hyper: gives its tokio timer back as the spare when dropped.
struct ReusedSleep {
    /// Always `Some` until dropped.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
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
            spare_timer::give_back(sleep);
        }
    }
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

    fn cached(_: &SpareTimer) -> bool {
        spare_timer::has_spare()
    }

    /// Polls once; true when the sleep has fired.
    async fn fired(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> bool {
        poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_sleep_returns_to_the_slot_and_is_reused() {
        spare_timer::scope(async {
            let timer = SpareTimer;
            let mut first = timer.sleep(Duration::from_secs(30));
            assert!(!fired(&mut first).await, "registers the tokio timer");
            assert!(!cached(&timer));
            drop(first);
            assert!(cached(&timer), "the dropped sleep's tokio timer is kept");
            let _second = timer.sleep(Duration::from_secs(30));
            assert!(!cached(&timer), "the next sleep takes it");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_sleep_fires_at_its_new_deadline() {
        spare_timer::scope(async {
            let timer = SpareTimer;
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
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn two_live_sleeps_both_fire_at_their_deadlines() {
        spare_timer::scope(async {
            let timer = SpareTimer;
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
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_a_live_sleep() {
        spare_timer::scope(async {
            let timer = SpareTimer;
            let start = tokio::time::Instant::now();
            let mut sleep = timer.sleep(Duration::from_secs(10));
            assert!(!fired(&mut sleep).await);
            timer.reset(&mut sleep, timer.now() + Duration::from_secs(15));
            sleep.as_mut().await;
            assert_eq!(start.elapsed(), Duration::from_secs(15));
        })
        .await;
    }

    /// hyper's header read timeout with this timer: each request head gets the full timeout
    /// from when hyper starts waiting for it, also when the tokio timer is reused.
    #[tokio::test(start_paused = true)]
    async fn header_read_timeout_counts_from_each_head() {
        const TIMEOUT: Duration = Duration::from_secs(30);
        let (mut client, server) = tokio::io::duplex(4096);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(SpareTimer)
            .header_read_timeout(TIMEOUT)
            .keep_alive(true);
        let start = tokio::time::Instant::now();
        let served = tokio::spawn(spare_timer::scope(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            });
            let _ = builder.serve_connection(TokioIo::new(server), svc).await;
            start.elapsed()
        }));
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
