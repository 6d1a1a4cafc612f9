//! Whether the limiter's queue is absorbing a burst or standing: the controlled-delay rule of
//! Nichols and Jacobson's CoDel ("Controlling Queue Delay", 2012), as Facebook applies it to
//! request queues ("Fail at Scale", 2015).
//!
//! A queue that absorbs a burst drains: some request soon passes with little or no wait. A
//! standing queue never does: every request waits, and the wait is pure added latency. So the
//! rule watches the *shortest* wait over an interval: if even that is above the target for a
//! whole interval, the queue stands. While it stands, the limiter serves the newest waiter
//! first (its caller is still there; the oldest have likely given up) and refuses every request
//! that waited longer than the target. It stands until a whole interval passes in which no
//! request waited longer than the target: the waits have fallen below it again.
//!
//! What counts as a wait:
//! - a request admitted while the queue is empty: zero;
//! - a request handed a permit: its time in the queue;
//! - a request refused after waiting (its deadline, or too old while standing): its time in
//!   the queue, and above the target in any case (it would have waited longer).
//!
//! Why the exit is not the mirror of the entry: while the queue stands, the newest waiters are
//! served, so the shortest wait is short however long the backlog, and a moment's lull in
//! arrivals empties the queue without the overload being over. What does say the overload is
//! over is that nobody had to be refused for waiting too long, for a whole interval. An interval
//! with no event at all (the queue sat empty) ends standing too.

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
    /// Whether a wait above the target was seen in the current interval.
    above: bool,
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
            above: false,
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
    /// happened in.
    pub(super) fn tick(&mut self, now: Instant) {
        if now < self.interval_end {
            return;
        }
        // No event for a whole interval after the last one ended: the queue sat empty (a
        // waiter's own deadline is an event), whatever the waits before said.
        let idle = now >= self.interval_end + self.interval;
        self.standing = if idle {
            false
        } else if self.standing {
            self.above
        } else {
            self.shortest.is_some_and(|s| s > self.target)
        };
        self.shortest = None;
        self.above = false;
        self.interval_end = now + self.interval;
    }

    /// Records one wait (zero for a request that found the queue empty).
    pub(super) fn observe(&mut self, wait: Duration) {
        self.shortest = Some(self.shortest.map_or(wait, |s| s.min(wait)));
        self.above |= wait > self.target;
    }

    /// Records the wait of a request refused after `waited`: how long it would have waited is
    /// not known, only that it is longer, so it counts as above the target even when refused
    /// exactly at it.
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
    async fn at(c: &mut Codel, after: Duration) {
        tokio::time::advance(after).await;
        c.tick(Instant::now());
    }

    /// A standing queue, one interval in.
    async fn standing() -> Codel {
        let mut c = codel();
        c.observe(20 * MS);
        at(&mut c, 100 * MS).await;
        assert!(c.standing());
        c
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_interval_of_waits_above_the_target_makes_the_queue_stand() {
        let mut c = codel();
        for _ in 0..9 {
            at(&mut c, 10 * MS).await;
            c.observe(6 * MS);
        }
        // Decided only at the end of the interval.
        at(&mut c, 9 * MS).await;
        assert!(!c.standing());
        at(&mut c, MS).await;
        assert!(c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn one_short_wait_in_the_interval_means_the_queue_drains() {
        let mut c = codel();
        c.observe(40 * MS);
        c.observe(5 * MS); // at the target is not above it
        c.observe(60 * MS);
        at(&mut c, 100 * MS).await;
        assert!(!c.standing());
        // A burst's queue: long waits, but the interval also saw an empty queue.
        c.observe(80 * MS);
        c.observe(Duration::ZERO);
        at(&mut c, 100 * MS).await;
        assert!(!c.standing());
        // Nothing seen: no news, the queue does not stand.
        at(&mut c, 100 * MS).await;
        assert!(!c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_standing_queue_stands_while_anyone_waits_past_the_target() {
        let mut c = standing().await;
        // Its own refusals keep it standing, even those refused at the target itself, and even
        // when the newest requests it serves wait next to nothing, or the queue runs empty for
        // a moment.
        c.observe(Duration::ZERO);
        c.observe(MS);
        c.observe_refused(5 * MS);
        at(&mut c, 100 * MS).await;
        assert!(c.standing());
        c.observe_refused(Duration::ZERO);
        at(&mut c, 100 * MS).await;
        assert!(c.standing());
        // A whole interval in which nobody waited past the target: the overload is over.
        c.observe(Duration::ZERO);
        c.observe(5 * MS);
        at(&mut c, 100 * MS).await;
        assert!(!c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn an_interval_with_nothing_seen_or_an_idle_spell_ends_standing() {
        let mut c = standing().await;
        at(&mut c, 100 * MS).await;
        assert!(!c.standing());

        // Stale waits from before a long quiet spell do not make the next burst's queue stand.
        c.observe(20 * MS);
        at(&mut c, 100 * MS).await;
        assert!(c.standing());
        c.observe(30 * MS);
        at(&mut c, 10_000 * MS).await;
        assert!(!c.standing());
        let mut c = codel();
        c.observe(30 * MS);
        at(&mut c, 10_000 * MS).await;
        assert!(!c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn intervals_restart_at_the_first_event_after_one_ends() {
        let mut c = codel();
        at(&mut c, 150 * MS).await;
        // The interval now runs to 250 ms: a wait at 240 ms still belongs to it.
        at(&mut c, 90 * MS).await;
        c.observe(7 * MS);
        assert!(!c.standing());
        at(&mut c, 10 * MS).await;
        assert!(c.standing());
    }
}
