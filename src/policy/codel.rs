//! Whether the limiter's queue is absorbing a burst or standing: the controlled-delay rule of
//! Nichols and Jacobson's CoDel ("Controlling Queue Delay", 2012), as Facebook applies it to
//! request queues ("Fail at Scale", 2015).
//!
//! A queue that absorbs a burst drains: some request soon passes with little or no wait. A
//! standing queue never does: every request waits, and the wait is pure added latency. So the
//! rule watches the *shortest* wait over an interval: if even that stays above the target for a
//! whole interval, the queue stands. While it stands, the limiter serves the newest waiter
//! first (its caller is still there; the oldest have likely given up) and refuses every request
//! that waited longer than the target.
//!
//! What counts as a wait:
//! - a request admitted while the queue is empty: zero;
//! - a request handed a permit while the queue does not stand: its time in the queue;
//! - a request refused after waiting (its deadline, or too old while standing): its time in
//!   the queue, and above the target in any case (it would have waited longer).
//!
//! While the queue stands, the waits of the requests it serves say nothing (the newest go
//! first, so they are short however long the backlog), and are not counted: the queue stops
//! standing when a request passes an empty queue, or an interval ends with the queue empty
//! and nothing seen. An interval with nothing seen otherwise keeps the verdict.

use std::time::Duration;

use tokio::time::Instant;

/// The standing-queue detector of one limiter; kept inside its lock.
#[derive(Debug)]
pub(super) struct Codel {
    target: Duration,
    interval: Duration,
    standing: bool,
    /// When the current interval ends.
    interval_end: Instant,
    /// The shortest wait seen in the current interval.
    shortest: Option<Duration>,
}

impl Codel {
    /// Not standing, with a first interval starting `now`.
    pub(super) fn new(target: Duration, interval: Duration, now: Instant) -> Self {
        Codel {
            target,
            interval,
            standing: false,
            interval_end: now + interval,
            shortest: None,
        }
    }

    /// The queue delay above which a standing queue refuses.
    pub(super) fn target(&self) -> Duration {
        self.target
    }

    /// Whether the queue stands (newest first; waits above the target are refused).
    pub(super) fn standing(&self) -> bool {
        self.standing
    }

    /// Ends the current interval if `now` is past it, and decides from what it saw. Call it
    /// before [`observe`](Self::observe) at each event, so a wait lands in the interval it
    /// happened in; `queue_empty` is whether nobody waits right now.
    pub(super) fn tick(&mut self, now: Instant, queue_empty: bool) {
        if now < self.interval_end {
            return;
        }
        match self.shortest.take() {
            Some(shortest) => self.standing = shortest > self.target,
            None if queue_empty => self.standing = false,
            None => {}
        }
        // No event for a whole interval after the last one ended: the queue sat empty (a
        // waiter's own deadline is an event), whatever the last waits said.
        if queue_empty && now >= self.interval_end + self.interval {
            self.standing = false;
        }
        self.interval_end = now + self.interval;
    }

    /// Records one wait (zero for a request that found the queue empty).
    pub(super) fn observe(&mut self, wait: Duration) {
        self.shortest = Some(self.shortest.map_or(wait, |s| s.min(wait)));
    }

    /// Records the wait of a request refused after `waited`: how long it would have waited is
    /// not known, only that it is longer, so it counts as above the target even when refused
    /// exactly at it (a standing queue's own refusals must not end its standing).
    pub(super) fn observe_refused(&mut self, waited: Duration) {
        self.observe(waited.max(self.target + Duration::from_nanos(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn codel() -> Codel {
        Codel::new(5 * MS, 100 * MS, Instant::now())
    }

    /// Advances the paused clock and ticks.
    async fn at(c: &mut Codel, after: Duration, queue_empty: bool) {
        tokio::time::advance(after).await;
        c.tick(Instant::now(), queue_empty);
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_interval_of_waits_above_the_target_makes_the_queue_stand() {
        let mut c = codel();
        for _ in 0..9 {
            at(&mut c, 10 * MS, false).await;
            c.observe(6 * MS);
        }
        // Decided only at the end of the interval.
        at(&mut c, 9 * MS, false).await;
        assert!(!c.standing());
        at(&mut c, MS, false).await;
        assert!(c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn one_short_wait_in_the_interval_means_the_queue_drains() {
        let mut c = codel();
        c.observe(40 * MS);
        c.observe(5 * MS); // at the target is not above it
        c.observe(60 * MS);
        at(&mut c, 100 * MS, false).await;
        assert!(!c.standing());
        // A burst's queue: long waits, but the interval also saw an empty queue.
        c.observe(80 * MS);
        c.observe(Duration::ZERO);
        at(&mut c, 100 * MS, false).await;
        assert!(!c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_standing_queue_stays_standing_until_a_wait_falls_below_the_target() {
        let mut c = codel();
        c.observe(20 * MS);
        at(&mut c, 100 * MS, false).await;
        assert!(c.standing());
        // Refused waiters keep it standing, even those refused at the target itself.
        c.observe_refused(5 * MS);
        at(&mut c, 100 * MS, false).await;
        assert!(c.standing());
        c.observe_refused(Duration::ZERO);
        at(&mut c, 100 * MS, false).await;
        assert!(c.standing());
        // Nothing seen and somebody waiting: no news, the verdict holds.
        at(&mut c, 100 * MS, false).await;
        assert!(c.standing());
        // A request that found the queue empty.
        c.observe(Duration::ZERO);
        at(&mut c, 100 * MS, false).await;
        assert!(!c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_queue_with_nothing_seen_or_an_idle_spell_ends_standing() {
        let mut c = codel();
        c.observe(20 * MS);
        at(&mut c, 100 * MS, false).await;
        assert!(c.standing());
        at(&mut c, 100 * MS, true).await;
        assert!(!c.standing());

        // Stale waits from before a long quiet spell do not make the next burst's queue stand.
        c.observe(20 * MS);
        at(&mut c, 100 * MS, false).await;
        assert!(c.standing());
        c.observe(30 * MS);
        at(&mut c, 10_000 * MS, true).await;
        assert!(!c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn intervals_restart_at_the_first_event_after_one_ends() {
        let mut c = codel();
        at(&mut c, 250 * MS, false).await;
        // The interval now runs to 350 ms: a wait at 340 ms still belongs to it.
        at(&mut c, 90 * MS, false).await;
        c.observe(7 * MS);
        assert!(!c.standing());
        at(&mut c, 10 * MS, false).await;
        assert!(c.standing());
    }
}
