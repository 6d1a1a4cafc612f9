//! Whether the limiter's queue is absorbing a burst or standing: the controlled-delay rule of
//! Nichols and Jacobson's CoDel ("Controlling Queue Delay", 2012), as Facebook applies it to
//! request queues ("Fail at Scale", 2015).
//!
//! A queue that absorbs a burst drains: some request soon passes with little or no wait. A
//! standing queue never does: every request waits, and the wait is pure added latency. So the
//! rule watches the waits: when every wait seen for a whole interval was above the target (the
//! shortest wait over the interval stays above it), the queue stands. As in CoDel the interval
//! starts at the first wait above the target, and any wait at or below it, or the queue
//! running empty, starts it over. While the queue stands, the limiter serves the newest waiter
//! first (its caller is still there; the oldest have likely given up) and refuses every request
//! that waited longer than the target. It stands until a whole interval passes in which nobody
//! waited longer than the target: the waits have fallen below it again.
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
//! over is that nobody had to be refused for waiting too long, for a whole interval.

use std::time::Duration;

use tokio::time::Instant;

/// The standing-queue detector of one limiter; kept inside its lock.
#[derive(Debug)]
pub(super) struct Codel {
    target: Duration,
    interval: Duration,
    standing: bool,
    /// Not standing: since when every wait seen was above the target (`None`: the last one
    /// was not, or the queue ran empty since).
    above_since: Option<Instant>,
    /// Standing: when a wait was last above the target.
    last_above: Instant,
}

impl Codel {
    /// Not standing.
    pub(super) fn new(target: Duration, interval: Duration, now: Instant) -> Self {
        Codel {
            target,
            interval,
            standing: false,
            above_since: None,
            last_above: now,
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

    /// Brings the verdict up to `now`; call it first at each event. `queue_empty` is whether
    /// nobody waits right now.
    pub(super) fn tick(&mut self, now: Instant, queue_empty: bool) {
        if self.standing {
            if now >= self.last_above + self.interval {
                self.standing = false;
                self.above_since = None;
            }
        } else if queue_empty {
            // A queue that ran empty was not standing.
            self.above_since = None;
        } else if self.above_since.is_some_and(|t| now >= t + self.interval) {
            self.stand(now);
        }
    }

    /// Records one wait, ending at `now` (zero for a request that found the queue empty).
    pub(super) fn observe(&mut self, now: Instant, wait: Duration) {
        if wait <= self.target {
            if !self.standing {
                self.above_since = None;
            }
            return;
        }
        self.last_above = now;
        if !self.standing {
            let since = *self.above_since.get_or_insert(now);
            if now >= since + self.interval {
                self.stand(now);
            }
        }
    }

    /// Records the wait of a request refused after `waited`: how long it would have waited is
    /// not known, only that it is longer, so it counts as above the target even when refused
    /// exactly at it.
    pub(super) fn observe_refused(&mut self, now: Instant, waited: Duration) {
        self.observe(now, waited.max(self.target + Duration::from_nanos(1)));
    }

    fn stand(&mut self, now: Instant) {
        self.standing = true;
        self.last_above = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn codel() -> Codel {
        Codel::new(5 * MS, 100 * MS, Instant::now())
    }

    /// Advances the paused clock by `after`, ticks (`queue_empty`), and returns the time.
    async fn at(c: &mut Codel, after: Duration, queue_empty: bool) -> Instant {
        tokio::time::advance(after).await;
        let now = Instant::now();
        c.tick(now, queue_empty);
        now
    }

    /// A standing queue.
    async fn standing() -> Codel {
        let mut c = codel();
        c.observe(Instant::now(), 20 * MS);
        let now = at(&mut c, 100 * MS, false).await;
        c.observe(now, 20 * MS);
        assert!(c.standing());
        c
    }

    #[tokio::test(start_paused = true)]
    async fn waits_above_the_target_for_a_whole_interval_make_the_queue_stand() {
        let mut c = codel();
        // The interval starts at the first wait above the target, not before.
        let now = at(&mut c, 30 * MS, false).await;
        c.observe(now, 6 * MS);
        for _ in 0..9 {
            let now = at(&mut c, 10 * MS, false).await;
            c.observe(now, 6 * MS);
            assert!(!c.standing());
        }
        let now = at(&mut c, 10 * MS, false).await;
        assert!(
            c.standing(),
            "decided at the first event a whole interval on"
        );
        c.observe(now, 6 * MS);
        assert!(c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn one_short_wait_or_an_empty_queue_starts_the_interval_over() {
        let mut c = codel();
        c.observe(Instant::now(), 40 * MS);
        let now = at(&mut c, 60 * MS, false).await;
        c.observe(now, 5 * MS); // at the target is not above it
        let now = at(&mut c, 60 * MS, false).await;
        c.observe(now, 60 * MS);
        let now = at(&mut c, 60 * MS, false).await;
        c.observe(now, 60 * MS);
        assert!(!c.standing(), "above for 60 ms only");
        // A burst's queue: long waits, then it drains.
        at(&mut c, 30 * MS, true).await;
        let now = at(&mut c, 30 * MS, false).await;
        c.observe(now, 80 * MS);
        assert!(!c.standing());
        let now = at(&mut c, 90 * MS, false).await;
        c.observe(now, 80 * MS);
        assert!(!c.standing());
        c.observe(now, Duration::ZERO);
        at(&mut c, 500 * MS, false).await;
        assert!(!c.standing(), "nothing seen since a short wait");
    }

    #[tokio::test(start_paused = true)]
    async fn a_standing_queue_stands_while_anyone_waits_past_the_target() {
        let mut c = standing().await;
        // Its own refusals keep it standing, even those refused at the target itself, and even
        // when the newest requests it serves wait next to nothing, or the queue runs empty for
        // a moment.
        for waited in [5 * MS, Duration::ZERO] {
            let now = at(&mut c, 90 * MS, true).await;
            c.observe(now, Duration::ZERO);
            c.observe(now, MS);
            c.observe_refused(now, waited);
            assert!(c.standing());
        }
        // A whole interval in which nobody waited past the target: the overload is over.
        let now = at(&mut c, 60 * MS, false).await;
        c.observe(now, 5 * MS);
        at(&mut c, 39 * MS, false).await;
        assert!(c.standing());
        at(&mut c, MS, false).await;
        assert!(!c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_that_stops_moving_stands_an_interval_after_its_last_long_wait() {
        // A wait above the target, then nobody is served (the upstream holds every slot) while
        // requests keep waiting: any event a whole interval on finds the queue standing.
        let mut c = codel();
        c.observe(Instant::now(), 10 * MS);
        at(&mut c, 99 * MS, false).await;
        assert!(!c.standing());
        at(&mut c, MS, false).await;
        assert!(c.standing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_ends_standing_and_forgets_the_waits_before_it() {
        let mut c = standing().await;
        at(&mut c, 10_000 * MS, true).await;
        assert!(!c.standing());
        // Not standing, waits above the target, then a long quiet spell with the queue empty:
        // the next burst starts from scratch.
        c.observe(Instant::now(), 30 * MS);
        at(&mut c, 10_000 * MS, true).await;
        let now = at(&mut c, MS, false).await;
        c.observe(now, 30 * MS);
        assert!(!c.standing());
    }
}
