//! The adaptive concurrency limit: a latency gradient against a re-measured no-load baseline.
//!
//! The limit follows one idea: while the upstream has a free worker, letting one more request in
//! does not make requests slower; once every worker is busy, each extra request only waits in
//! the upstream's own queue, and the average latency grows in proportion to the excess
//! (`latency ≈ baseline × in_flight / capacity`). So the ratio `baseline / latency`, the
//! *gradient*, says how far above capacity the limit is, and `limit × gradient` is the capacity.
//!
//! Per measurement interval the limiter averages the latency (time to response head) of the
//! requests admitted since the previous change, then:
//! - latency within [`TOLERANCE`] of the baseline and the limit actually used: grow (by
//!   [`SLOW_START_FACTOR`] until the first sign of queueing, then by `√limit`);
//! - latency above it: `limit = limit × max(TOLERANCE × baseline / latency, MIN_GRADIENT) +
//!   QUEUE_ALLOWANCE × √limit`, which lands at the capacity plus a small standing queue in one
//!   step.
//!
//! The baseline is the lowest interval average seen since the last probe. Under constant
//! saturation no interval ever shows the no-load latency, and a baseline that only followed what
//! it saw would creep up and the limit with it; so every [`PROBE_EVERY`] (jittered) the limit
//! drops to [`PROBE_FACTOR`] of itself until [`PROBE_SAMPLES`] requests admitted under the lower
//! limit have answered, and their average becomes the new baseline. A probe also runs early when
//! latency stays at [`STALE_RATIO`] × baseline for [`STALE_INTERVALS`] intervals in a row despite
//! the cuts: then the upstream itself got slower (or the baseline was a fluke), and the limit
//! must not keep halving towards `min`. README.policies.md has the reasoning behind each value.

use std::time::Duration;

use tokio::time::Instant;

/// Samples an interval needs before the limit is recomputed: fewer make the average too noisy
/// to act on.
pub const MIN_SAMPLES: u32 = 10;

/// Shortest measurement interval: several round trips of a typical upstream, so one interval's
/// average is not one burst's.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Latency up to this multiple of the baseline counts as "not queueing": absorbs measurement
/// noise, which would otherwise read as congestion and stall growth.
pub const TOLERANCE: f64 = 1.05;

/// Deepest cut in one interval (halving): enough to undo any overshoot of slow start in one step,
/// while a single bad interval cannot throw the limit to the floor.
pub const MIN_GRADIENT: f64 = 0.5;

/// Standing queue allowed at the upstream, times `√limit`: a worker that finishes always finds
/// the next request already there (full throughput), while the extra latency stays at
/// `0.5 / √capacity` of the baseline (about 9% for 32 workers).
pub const QUEUE_ALLOWANCE: f64 = 0.5;

/// Growth per interval until latency first rises: from `min` = 1 to 32 in nine intervals, and an
/// overshoot past capacity of at most 1.5× (so latency at most 1.5× for one interval).
pub const SLOW_START_FACTOR: f64 = 1.5;

/// A limit grows only if at least this share of it was in use (or requests were turned away)
/// during the interval: otherwise low latency says nothing about a higher limit.
pub const USAGE_TO_GROW: f64 = 0.5;

/// One sample counts at most this multiple of the baseline, and a timeout counts as exactly that:
/// a rare very slow request or timeout moves the average a little, a flood of them a lot.
pub const SAMPLE_CAP: f64 = 3.0;

/// Latency at this multiple of the baseline is "as slow as cutting can explain"…
pub const STALE_RATIO: f64 = 2.0;

/// …and staying there for this many intervals after cuts means the baseline is stale: probe now.
pub const STALE_INTERVALS: u32 = 3;

/// How often the baseline is re-measured: rarely enough that the cost (a quarter of the limit
/// for about one round trip) is negligible, often enough to follow a slower or faster deploy.
pub const PROBE_EVERY: Duration = Duration::from_secs(30);

/// Probes are spread by ±25% so that replicas started together do not probe together.
pub const PROBE_JITTER: f64 = 0.25;

/// Limit during a probe, as a share of the limit: at equilibrium the limit is about
/// `capacity × 1.05 + 0.5√limit`, so three quarters of it leaves every worker free of a queue.
pub const PROBE_FACTOR: f64 = 0.75;

/// Answers a probe needs before its average becomes the baseline.
pub const PROBE_SAMPLES: u32 = MIN_SAMPLES;

/// A probe that gets too few answers gives up after this many baselines (or one second,
/// whichever is longer) and keeps the old baseline.
pub const PROBE_GIVE_UP_BASELINES: f64 = 10.0;

/// How a request admitted under the limit ended, as far as the limit is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived (any status): its latency is a sample.
    Success,
    /// The upstream timed out: the strongest congestion signal.
    Congestion,
    /// Tells nothing about congestion (refused connection, shed further in, client gone).
    Ignore,
}

/// The gradient limiter's state; kept inside the concurrency limiter's lock.
#[derive(Debug)]
pub struct GradientLimit {
    min: f64,
    max: f64,
    limit: f64,
    /// Lowest interval average since the last probe, in seconds.
    baseline: Option<f64>,
    slow_start: bool,
    interval_start: Instant,
    sum: f64,
    count: u32,
    /// Most requests wanting in at once during the interval.
    max_demand: usize,
    stale_streak: u32,
    /// While probing: the limit to return to.
    probe: Option<f64>,
    next_probe: Instant,
}

impl GradientLimit {
    /// Starts at `min` (clamped to at least 1; `max` to at least `min`): a cold upstream is never
    /// handed more than the operator's floor before it has shown it copes.
    pub fn new(min: u32, max: u32) -> Self {
        let min = f64::from(min.max(1));
        let max = f64::from(max).max(min);
        let now = Instant::now();
        GradientLimit {
            min,
            max,
            limit: min,
            baseline: None,
            slow_start: true,
            interval_start: now,
            sum: 0.0,
            count: 0,
            max_demand: 0,
            stale_streak: 0,
            probe: None,
            next_probe: now + jittered(PROBE_EVERY),
        }
    }

    /// The limit in whole requests.
    pub fn current(&self) -> usize {
        // `limit` is kept within [min, max], both whole numbers, so flooring stays inside.
        self.limit.floor() as usize
    }

    /// The no-load latency currently assumed, once measured.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }

    /// Records that `demand` requests wanted to be in flight at once.
    pub fn note_demand(&mut self, demand: usize) {
        self.max_demand = self.max_demand.max(demand);
    }

    /// Records the end of a request admitted at `started`; `in_flight` is what remains in
    /// flight. May change [`current`](Self::current).
    pub fn on_complete(&mut self, started: Instant, outcome: Outcome, now: Instant, in_flight: usize) {
        if let Some(saved) = self.probe {
            if now.saturating_duration_since(self.interval_start) > self.probe_give_up() {
                self.end_probe(saved, None, now, in_flight);
            }
        }
        if started < self.interval_start {
            // Admitted under an earlier limit: it measures the old situation.
            return;
        }
        let latency = now.saturating_duration_since(started).as_secs_f64();
        let value = match (outcome, self.probe, self.baseline) {
            (Outcome::Ignore, ..) => return,
            // A probe measures the real no-load latency: no cap, and timeouts say nothing of it.
            (Outcome::Congestion, Some(_), _) => return,
            (Outcome::Success, Some(_), _) => latency,
            (Outcome::Congestion, None, Some(base)) => base * SAMPLE_CAP,
            (Outcome::Congestion, None, None) => return,
            (Outcome::Success, None, Some(base)) => latency.min(base * SAMPLE_CAP),
            (Outcome::Success, None, None) => latency,
        };
        self.sum += value;
        self.count += 1;

        if let Some(saved) = self.probe {
            if self.count >= PROBE_SAMPLES {
                let mean = self.sum / f64::from(self.count);
                self.end_probe(saved, Some(mean), now, in_flight);
            }
            return;
        }
        if self.count < MIN_SAMPLES || now.saturating_duration_since(self.interval_start) < MIN_INTERVAL {
            return;
        }
        let mean = self.sum / f64::from(self.count);
        self.update(mean, now, in_flight);
    }

    fn update(&mut self, mean: f64, now: Instant, in_flight: usize) {
        let baseline = match self.baseline {
            Some(b) if b <= mean => b,
            _ => {
                self.baseline = Some(mean);
                mean
            }
        };
        // Guards a zero baseline (an upstream answering within the clock's resolution).
        let ratio = if baseline > 0.0 { mean / baseline } else { 1.0 };
        let used = self.max_demand as f64 >= USAGE_TO_GROW * self.limit;
        let target = if ratio <= TOLERANCE {
            match (used, self.slow_start) {
                (false, _) => self.limit,
                (true, true) => self.limit * SLOW_START_FACTOR,
                (true, false) => self.limit + self.limit.sqrt().max(1.0),
            }
        } else {
            self.slow_start = false;
            let gradient = (TOLERANCE / ratio).max(MIN_GRADIENT);
            let target = self.limit * gradient + QUEUE_ALLOWANCE * self.limit.sqrt();
            if used {
                target
            } else {
                target.min(self.limit)
            }
        };
        self.limit = target.clamp(self.min, self.max);
        self.stale_streak = if ratio >= STALE_RATIO { self.stale_streak + 1 } else { 0 };
        self.reset_interval(now, in_flight);
        if self.stale_streak >= STALE_INTERVALS || now >= self.next_probe {
            self.start_probe(now, in_flight);
        }
    }

    fn start_probe(&mut self, now: Instant, in_flight: usize) {
        self.probe = Some(self.limit);
        self.limit = (self.limit * PROBE_FACTOR).max(self.min);
        self.stale_streak = 0;
        self.reset_interval(now, in_flight);
    }

    fn end_probe(&mut self, saved: f64, measured: Option<f64>, now: Instant, in_flight: usize) {
        if let Some(mean) = measured {
            if let Some(old) = self.baseline {
                if mean > old * TOLERANCE {
                    // The upstream got slower: the limit was cut for nothing, regain it quickly.
                    self.slow_start = true;
                }
            }
            self.baseline = Some(mean);
        }
        self.limit = saved.clamp(self.min, self.max);
        self.probe = None;
        self.next_probe = now + jittered(PROBE_EVERY);
        self.reset_interval(now, in_flight);
    }

    fn probe_give_up(&self) -> Duration {
        let by_baseline = self.baseline.map_or(0.0, |b| b * PROBE_GIVE_UP_BASELINES);
        Duration::from_secs_f64(by_baseline.max(1.0))
    }

    fn reset_interval(&mut self, now: Instant, in_flight: usize) {
        self.interval_start = now;
        self.sum = 0.0;
        self.count = 0;
        self.max_demand = in_flight;
    }

    #[cfg(test)]
    pub(crate) fn is_probing(&self) -> bool {
        self.probe.is_some()
    }
}

/// `d` spread by ±[`PROBE_JITTER`].
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range((1.0 - PROBE_JITTER)..=(1.0 + PROBE_JITTER)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `n` successes of `latency` each, all admitted after the current interval started,
    /// completing over at least `MIN_INTERVAL`, with `demand` wanting in.
    fn feed(g: &mut GradientLimit, latency: Duration, n: u32, demand: usize) {
        let mut now = g.interval_start.max(Instant::now());
        for i in 0..n {
            g.note_demand(demand);
            let step = if i + 1 == n { MIN_INTERVAL } else { Duration::ZERO };
            now += step;
            let started = now - latency;
            let started = started.max(g.interval_start);
            g.on_complete(started, Outcome::Success, started + latency, demand.saturating_sub(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_only_when_the_limit_is_used() {
        let mut g = GradientLimit::new(4, 100);
        assert_eq!(g.current(), 4);
        for _ in 0..5 {
            feed(&mut g, 20 * MS, MIN_SAMPLES, 1);
            tokio::time::advance(MIN_INTERVAL * 2).await;
        }
        assert_eq!(g.current(), 4, "an unused limit must not grow");
        feed(&mut g, 20 * MS, MIN_SAMPLES, 4);
        assert_eq!(g.current(), 6, "slow start grows by half");
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_to_capacity_in_one_step_and_never_below_min() {
        let mut g = GradientLimit::new(2, 100);
        // Establish the baseline at 20 ms, then leave slow start at a used limit.
        for _ in 0..8 {
            let demand = g.current();
            feed(&mut g, 20 * MS, MIN_SAMPLES, demand);
            tokio::time::advance(MIN_INTERVAL * 2).await;
        }
        let before = g.current();
        assert!(before > 20, "{before}");
        // Latency 1.6× the baseline: the upstream holds limit/1.6 requests without queueing.
        feed(&mut g, 32 * MS, MIN_SAMPLES, before);
        let expected = before as f64 * TOLERANCE / 1.6 + QUEUE_ALLOWANCE * (before as f64).sqrt();
        assert_eq!(g.current(), expected.floor() as usize);
        // A flood of slowness cuts by half at most per interval and stops at min.
        for _ in 0..10 {
            let now = g.current();
            feed(&mut g, 100 * MS, MIN_SAMPLES, 100);
            assert!(g.current() >= now / 2 && g.current() >= 2, "{} -> {}", now, g.current());
            assert!(g.current() <= 100);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_baseline_is_re_measured_by_a_probe() {
        let mut g = GradientLimit::new(1, 1000);
        for _ in 0..12 {
            let demand = g.current();
            feed(&mut g, 20 * MS, MIN_SAMPLES, demand);
        }
        assert_eq!(g.baseline(), Some(20 * MS));
        // The upstream is now four times slower whatever the load: after STALE_INTERVALS cuts a
        // probe measures the new no-load latency.
        for _ in 0..STALE_INTERVALS {
            assert!(!g.is_probing());
            feed(&mut g, 80 * MS, MIN_SAMPLES, 1000);
        }
        assert!(g.is_probing());
        feed(&mut g, 80 * MS, PROBE_SAMPLES, 1000);
        assert!(!g.is_probing());
        assert_eq!(g.baseline(), Some(80 * MS));
        let after_probe = g.current();
        feed(&mut g, 80 * MS, MIN_SAMPLES, 1000);
        assert!(g.current() > after_probe, "regains the limit once the baseline is right");
    }

    #[tokio::test(start_paused = true)]
    async fn samples_from_before_a_change_are_ignored() {
        let mut g = GradientLimit::new(10, 100);
        let old = Instant::now();
        tokio::time::advance(MIN_INTERVAL).await;
        g.reset_interval(Instant::now(), 0);
        for _ in 0..100 {
            g.on_complete(old, Outcome::Success, Instant::now(), 10);
        }
        assert_eq!(g.baseline(), None);
        assert_eq!(g.current(), 10);
    }
}
