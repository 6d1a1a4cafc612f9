//! One spare timer per connection task, reused by every deadline its requests set.
//!
//! A request on a keep-alive connection sets two deadlines: hyper's header read timeout while
//! its head arrives, and the route timeout while the upstream answers. With a fresh tokio
//! timer for each, every request allocates a timer, inserts it into the timer wheel and
//! removes it again, each under the driver's lock. Instead the connection keeps its last timer: the next deadline
//! [`take`]s it and resets it, and gives it back when done. On one connection each deadline is
//! usually later than the one still registered, which tokio handles with one atomic update.
//!
//! A tokio timer belongs to the runtime it was made on, so the spare lives in the connection's
//! task ([`scope`]), never in a thread-local or a global: tests run many runtimes. Deadlines
//! set outside a scope (HTTP/2 streams, which hyper runs as tasks of their own; unit tests)
//! just make their own timer.
//!
//! The price: between requests the spare stays registered at its old deadline, so an idle
//! connection's task is woken once when that passes (30 s after its last request, at most).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;

use tokio::time::{Instant, Sleep};

tokio::task_local! {
    static SPARE: Cell<Option<Pin<Box<Sleep>>>>;
}

/// Runs `task` (a connection) with a spare timer for the deadlines set while it is polled.
pub(crate) fn scope<F: Future>(task: F) -> impl Future<Output = F::Output> {
    SPARE.scope(Cell::new(None), task)
}

/// A timer for `deadline`: the task's spare, reset, when it has one; a new one otherwise.
pub(crate) fn take(deadline: Instant) -> Pin<Box<Sleep>> {
    match SPARE.try_with(Cell::take).ok().flatten() {
        Some(mut timer) => {
            timer.as_mut().reset(deadline);
            timer
        }
        None => Box::pin(tokio::time::sleep_until(deadline)),
    }
}

/// Keeps `timer` as the task's spare (outside a scope it is simply dropped; when two deadlines
/// were live at once, the one given back last is kept).
pub(crate) fn give_back(timer: Pin<Box<Sleep>>) {
    let _ = SPARE.try_with(move |spare| spare.set(Some(timer)));
}

/// Whether the current task holds a spare (for tests).
#[cfg(test)]
pub(crate) fn has_spare() -> bool {
    SPARE
        .try_with(|spare| {
            let timer = spare.take();
            let has = timer.is_some();
            spare.set(timer);
            has
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::task::Poll;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_given_back_timer_is_reused_and_fires_at_its_new_deadline() {
        scope(async {
            let start = Instant::now();
            let mut first = take(start + Duration::from_secs(30));
            // Registered in the wheel at 30 s, then given back unfired.
            let pending =
                std::future::poll_fn(|cx| Poll::Ready(first.as_mut().poll(cx).is_pending()));
            assert!(pending.await);
            give_back(first);
            assert!(has_spare());
            tokio::time::advance(Duration::from_secs(10)).await;
            let later = take(Instant::now() + Duration::from_secs(30));
            assert!(!has_spare(), "the spare was not taken");
            later.await;
            assert_eq!(
                start.elapsed(),
                Duration::from_secs(40),
                "not the new deadline"
            );
            // Earlier than the one registered works too (tokio moves it in the wheel).
            let mut fired = take(Instant::now() + Duration::from_secs(30));
            fired.as_mut().await;
            give_back(fired);
            let earlier = take(Instant::now() + Duration::from_secs(5));
            earlier.await;
            assert_eq!(start.elapsed(), Duration::from_secs(75));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn outside_a_scope_every_deadline_has_its_own_timer() {
        let start = Instant::now();
        // Given back with nowhere to go: dropped, and the next deadline gets a timer of its own.
        give_back(take(start + Duration::from_secs(1)));
        take(start + Duration::from_secs(2)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
