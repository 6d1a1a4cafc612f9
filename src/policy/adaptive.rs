//! The adaptive concurrency limit: a latency gradient against a re-measured no-load baseline.
//!
//! The limit follows one idea: while the upstream has a free worker, letting one more request in
//! does not make requests slower; once every worker is busy, each extra request only waits in
//! the upstream's own queue, and the average latency grows in proportion to the excess
//! (`latency ≈ baseline × in_flight / capacity`). So the ratio `baseline / latency`, the
//! *gradient*, says how far above capacity the limit is, and `limit × gradient` is the capacity.
//!
//! A measurement is a *cohort*: the requests admitted during an admission window
//! ([`MIN_INTERVAL`], at least [`INTERVAL_BASELINES`] baselines, at least [`MIN_SAMPLES`]
//! requests). The limiter waits for all of them to answer (stragglers count as
//! [`SAMPLE_CAP`] × baseline once they are that late), so slow answers weigh as much as the fast
//! ones that arrive first, and requests admitted under an earlier limit never mix in. With the
//! cohort's average latency:
//! - slow start, while latency has not risen beyond noise ([`NOISE_Z`] standard errors above
//!   [`TOLERANCE`] × baseline) and the limit is used: `limit × SLOW_START_FACTOR`;
//! - afterwards: `limit × clamp(TOLERANCE × baseline / latency, MIN_GRADIENT, 1) +
//!   QUEUE_ALLOWANCE × √limit`. At the baseline this grows by the allowance; above it, it lands
//!   on the capacity plus a small standing queue in one step. (The baseline here is taken
//!   [`NOISE_Z`] standard errors high, so that one measured on few samples errs on the side of
//!   a higher limit rather than a lower one.)
//!
//! The baseline is measured, never inferred from a minimum (a minimum of noisy averages drifts
//! low and drags the limit down with it): first by the cohorts of slow start, pooled while they
//! show no queueing, then by probes. Under constant saturation no cohort shows the no-load
//! latency, so every [`PROBE_EVERY`] (jittered) the limit drops to [`PROBE_FACTOR`] of itself for
//! one cohort, whose requests find free workers, and their average becomes the baseline. A probe
//! also runs early, at `PROBE_FACTOR / STALE_RATIO` of the limit, when latency stays at
//! [`STALE_RATIO`] × baseline for [`STALE_INTERVALS`] cohorts in a row despite the cuts: either
//! the upstream lost capacity (the deep probe still finds free workers) or it got slower, and
//! then the limit must not keep halving towards `min`. docs/design/adaptive-limit.md explains every value.

use std::time::Duration;

use tokio::time::Instant;

/// Requests a measurement needs before the limit is recomputed: fewer make the average too
/// noisy to act on.
pub(super) const MIN_SAMPLES: u32 = 10;

/// Shortest admission window of a measurement: several round trips of a typical upstream, so
/// one measurement's average is not one burst's.
pub(super) const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The admission window also lasts at least this many baselines, so that it holds many
/// requests' worth of variation even for a slow upstream.
pub(super) const INTERVAL_BASELINES: f64 = 2.0;

/// Latency up to this multiple of the baseline counts as "not queueing": absorbs measurement
/// noise, which would otherwise read as congestion and stall growth.
pub(super) const TOLERANCE: f64 = 1.05;

/// Standard errors of the average subtracted before comparing it with the baseline: latency
/// must rise beyond noise (two standard errors, ~98% one-sided) to count as queueing.
pub(super) const NOISE_Z: f64 = 2.0;

/// Deepest cut per measurement (halving): enough to undo any overshoot of slow start in one
/// step, while a single bad measurement cannot throw the limit to the floor.
pub(super) const MIN_GRADIENT: f64 = 0.5;

/// Standing queue allowed at the upstream, times `√limit`: a worker that finishes always finds
/// the next request already there (full throughput), while the extra latency stays at
/// `0.5 / √capacity` of the baseline (about 9% for 32 workers).
pub(super) const QUEUE_ALLOWANCE: f64 = 0.5;

/// Growth per measurement until latency first rises: from `min` = 1 to 32 in nine
/// measurements, and an overshoot past capacity of at most 1.5× (latency at most 1.5× for one
/// measurement).
pub(super) const SLOW_START_FACTOR: f64 = 1.5;

/// A limit grows only if at least this share of it was in use (or requests were turned away)
/// during the measurement: otherwise low latency says nothing about a higher limit.
pub(super) const USAGE_TO_GROW: f64 = 0.5;

/// One sample counts at most this multiple of the baseline, and a timeout counts as exactly that:
/// a rare very slow request or timeout moves the average a little, a flood of them a lot.
pub(super) const SAMPLE_CAP: f64 = 3.0;

/// Latency at this multiple of the baseline is "as slow as cutting can explain"…
pub(super) const STALE_RATIO: f64 = 2.0;

/// …and staying there for this many measurements after cuts means the baseline is stale (or the
/// capacity fell steeply): probe now.
pub(super) const STALE_INTERVALS: u32 = 2;

/// How often the baseline is re-measured: rarely enough that the cost (a quarter of the limit
/// for one measurement, ~0.1 s + a round trip) is negligible, often enough to follow a slower or
/// faster deploy.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(30);

/// Probes are spread by ±25% so that replicas started together do not probe together.
pub(super) const PROBE_JITTER: f64 = 0.25;

/// Limit during a probe, as a share of the limit: at equilibrium the limit is about
/// `capacity × 1.05 + 0.5√limit`, so three quarters of it leaves every worker free of a queue.
pub(super) const PROBE_FACTOR: f64 = 0.75;

/// Requests a probe measures (at least) before their average becomes the baseline; a probe
/// whose answers are mostly errors keeps the old baseline.
pub(super) const PROBE_SAMPLES: u32 = 2 * MIN_SAMPLES;

/// A probe waits this many baselines (and at least [`PROBE_STRAGGLER_MIN`]) for its last answers
/// before measuring without them: a probe holds the limit down, so it must not wait for a hung
/// request until the route timeout.
pub(super) const PROBE_STRAGGLER_BASELINES: f64 = 10.0;

/// See [`PROBE_STRAGGLER_BASELINES`].
pub(super) const PROBE_STRAGGLER_MIN: Duration = Duration::from_secs(1);

/// How a request admitted under the limit ended, as far as the limit is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A response head arrived (any status): its latency is a sample.
    Success,
    /// The upstream timed out: the strongest congestion signal.
    Congestion,
    /// Tells nothing about congestion (refused connection, shed further in, client gone).
    Ignore,
}

/// The gradient limiter's state; kept inside the concurrency limiter's lock.
#[derive(Debug)]
pub(super) struct GradientLimit {
    min: f64,
    max: f64,
    limit: f64,
    /// Samples behind the baseline (the no-load latency): the last probe's, plus every cohort of
    /// slow start that showed no queueing. Empty until the first measurement.
    baseline: Stats,
    slow_start: bool,
    cohort: Cohort,
    /// Most requests wanting in at once during the cohort.
    max_demand: usize,
    stale_streak: u32,
    /// While probing: the limit to return to, and whether the probe was called because the
    /// baseline looked stale.
    probe: Option<(f64, bool)>,
    next_probe: Instant,
}

/// Running sum, sum of squares and count of latency samples, in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    sum: f64,
    sum_sq: f64,
    n: u32,
}

impl Stats {
    fn add(&mut self, value: f64, count: u32) {
        let c = f64::from(count);
        self.sum += value * c;
        self.sum_sq += value * value * c;
        self.n += count;
    }

    fn merge(&mut self, other: &Stats) {
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.n += other.n;
    }

    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / f64::from(self.n))
    }

    /// Variance of the mean (sample variance / n); 0 with fewer than two samples.
    fn mean_variance(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = f64::from(self.n);
        let mean = self.sum / n;
        let variance = ((self.sum_sq - n * mean * mean) / (n - 1.0)).max(0.0);
        variance / n
    }
}

/// The requests whose latencies make one measurement: those admitted during the admission
/// window. All of them are waited for (stragglers only up to a cap), so that the slow ones count
/// as much as the fast ones, which finish first.
#[derive(Debug)]
struct Cohort {
    id: u64,
    start: Instant,
    /// When admissions into the cohort stopped; `None` while admitting.
    closed_at: Option<Instant>,
    admitted: u32,
    finished: u32,
    stats: Stats,
}

impl Cohort {
    fn new(id: u64, start: Instant) -> Self {
        Cohort {
            id,
            start,
            closed_at: None,
            admitted: 0,
            finished: 0,
            stats: Stats::default(),
        }
    }
}

impl GradientLimit {
    /// Starts at `min` (clamped to at least 1; `max` to at least `min`): a cold upstream is never
    /// handed more than the operator's floor before it has shown it copes.
    pub(super) fn new(min: u32, max: u32) -> Self {
        let min = f64::from(min.max(1));
        let max = f64::from(max).max(min);
        let now = Instant::now();
        GradientLimit {
            min,
            max,
            limit: min,
            baseline: Stats::default(),
            slow_start: true,
            cohort: Cohort::new(0, now),
            max_demand: 0,
            stale_streak: 0,
            probe: None,
            next_probe: now + jittered(PROBE_EVERY),
        }
    }

    /// The limit in whole requests.
    pub(super) fn current(&self) -> usize {
        // `limit` is kept within [min, max], both whole numbers, so flooring stays inside.
        self.limit.floor() as usize
    }

    /// The no-load latency currently assumed, once measured.
    pub(super) fn baseline(&self) -> Option<Duration> {
        self.baseline.mean().map(Duration::from_secs_f64)
    }

    /// Records that `demand` requests wanted to be in flight at once.
    pub(super) fn note_demand(&mut self, demand: usize) {
        self.max_demand = self.max_demand.max(demand);
    }

    /// Records the admission of a request, `in_flight` counting it; returns the tag to hand back
    /// to [`on_complete`](Self::on_complete). May change [`current`](Self::current).
    pub(super) fn on_admit(&mut self, now: Instant, in_flight: usize) -> Option<u64> {
        let id = self.cohort.id;
        self.advance(now, in_flight.saturating_sub(1));
        self.note_demand(in_flight);
        if self.cohort.id != id || self.cohort.closed_at.is_some() {
            // A new cohort started just now, under a limit this request was not admitted by;
            // or the current one is only waiting for its last answers.
            return None;
        }
        self.cohort.admitted += 1;
        Some(self.cohort.id)
    }

    /// Records the end of a request admitted at `started` with `tag`; `in_flight` is what
    /// remains in flight. May change [`current`](Self::current).
    pub(super) fn on_complete(
        &mut self,
        tag: Option<u64>,
        started: Instant,
        outcome: Outcome,
        now: Instant,
        in_flight: usize,
    ) {
        if tag == Some(self.cohort.id) {
            self.cohort.finished += 1;
            let latency = now.saturating_duration_since(started).as_secs_f64();
            let cap = self.baseline.mean().map(|b| b * SAMPLE_CAP);
            let value = match (outcome, self.probe.is_some()) {
                (Outcome::Ignore, _) => None,
                // A probe measures the real no-load latency: no cap, and timeouts say nothing
                // about it.
                (Outcome::Congestion, true) => None,
                (Outcome::Success, true) => Some(latency),
                (Outcome::Congestion, false) => cap,
                (Outcome::Success, false) => Some(cap.map_or(latency, |c| latency.min(c))),
            };
            if let Some(v) = value {
                self.cohort.stats.add(v, 1);
            }
        }
        self.advance(now, in_flight);
    }

    /// Closes admissions when the window is over, and finishes the cohort when its requests
    /// are all answered (or the stragglers waited for long enough).
    fn advance(&mut self, now: Instant, in_flight: usize) {
        if self.cohort.closed_at.is_none() {
            let enough = if self.probe.is_some() {
                PROBE_SAMPLES
            } else {
                MIN_SAMPLES
            };
            let window_over =
                now.saturating_duration_since(self.cohort.start) >= self.interval_length();
            if self.cohort.admitted >= enough && window_over {
                self.cohort.closed_at = Some(now);
            }
        }
        let Some(closed_at) = self.cohort.closed_at else {
            return;
        };
        let outstanding = self.cohort.admitted - self.cohort.finished;
        if outstanding > 0 {
            let Some(baseline) = self.baseline.mean() else {
                // The first measurement waits for every answer (the route timeout bounds it).
                return;
            };
            let waited = now.saturating_duration_since(closed_at);
            if self.probe.is_some() {
                // A probe measures the no-load latency: it waits long for its stragglers, then
                // leaves them out (they would say more about them than about the upstream).
                let patience = Duration::from_secs_f64(baseline * PROBE_STRAGGLER_BASELINES)
                    .max(PROBE_STRAGGLER_MIN);
                if waited < patience {
                    return;
                }
            } else {
                // A request still out SAMPLE_CAP baselines after the last admission is at least
                // that slow, which is all a capped sample would say.
                let cap = baseline * SAMPLE_CAP;
                if waited.as_secs_f64() < cap {
                    return;
                }
                self.cohort.stats.add(cap, outstanding);
            }
        }
        self.finish_cohort(now, in_flight);
    }

    fn finish_cohort(&mut self, now: Instant, in_flight: usize) {
        let stats = self.cohort.stats;
        if let Some((saved, stale)) = self.probe {
            let measured = (stats.n >= PROBE_SAMPLES / 2).then_some(stats);
            self.end_probe(saved, stale, measured, now, in_flight);
        } else if stats.n < MIN_SAMPLES / 2 {
            // Mostly answers that say nothing about latency: measure again.
            self.new_cohort(now, in_flight);
        } else {
            self.update(&stats, now, in_flight);
        }
    }

    fn update(&mut self, stats: &Stats, now: Instant, in_flight: usize) {
        let first = self.baseline.n == 0;
        if first {
            self.baseline = *stats;
        }
        let (Some(mean), Some(baseline)) = (stats.mean(), self.baseline.mean()) else {
            return;
        };
        // Guards a zero baseline (an upstream answering within the clock's resolution).
        let baseline = baseline.max(f64::MIN_POSITIVE);
        // Whether latency rose beyond noise: a small cohort's average wanders by several
        // percent, and reading that as queueing would end slow start or stall growth at random.
        let noise = NOISE_Z * (stats.mean_variance() + self.baseline.mean_variance()).sqrt();
        let queueing = (mean - noise) / baseline > TOLERANCE;
        // How far latency is above the baseline, giving the baseline the benefit of its doubt:
        // one measured on few or scattered samples may be low by chance, and trusting it as is
        // would hold the limit below the capacity until the next probe.
        let ratio = mean / (baseline + NOISE_Z * self.baseline.mean_variance().sqrt());
        let demand = self.max_demand as f64;
        let used = demand >= USAGE_TO_GROW * self.limit;
        // What this measurement vouches for: the concurrency that was actually reached (all of
        // the limit, when demand filled it: the limit admits whole requests).
        let validated = if demand >= self.limit.floor() {
            self.limit
        } else {
            demand
        };
        let target = if self.slow_start && !queueing {
            if !first {
                // No queueing beyond noise: these samples are no-load latencies too; pooling
                // them makes the baseline steadier than any single cohort (and corrects a first
                // cohort that came out fast by chance).
                self.baseline.merge(stats);
            }
            if used {
                // Growth is validated by use: what this measurement showed is that `validated`
                // requests at once cause no queueing, so the limit grows from that, not from a
                // limit part of which sat idle. Otherwise a moderate load walks the limit far
                // past the capacity, and the next surge queues at the app until cuts catch up.
                (validated * SLOW_START_FACTOR).max(self.limit)
            } else {
                self.limit
            }
        } else {
            if queueing {
                self.slow_start = false;
            }
            // At or below the baseline this grows by the allowance; above it, it lands on the
            // capacity plus the allowance.
            let gradient = (TOLERANCE / ratio).clamp(MIN_GRADIENT, 1.0);
            let allowance = QUEUE_ALLOWANCE * self.limit.sqrt();
            let target = self.limit * gradient + allowance;
            if used {
                // As in slow start: never more than the allowance above what was in use.
                target.min((validated + allowance).max(self.limit))
            } else {
                target.min(self.limit)
            }
        };
        self.limit = target.clamp(self.min, self.max);
        tracing::debug!(
            limit = self.limit,
            mean_ms = mean * 1000.0,
            baseline_ms = baseline * 1000.0,
            samples = stats.n,
            demand = self.max_demand,
            slow_start = self.slow_start,
            "adaptive limit updated"
        );
        self.stale_streak = if ratio >= STALE_RATIO {
            self.stale_streak + 1
        } else {
            0
        };
        if self.stale_streak >= STALE_INTERVALS {
            // Measure well below the level that latency says is the capacity: if the upstream
            // lost capacity, the probe still finds free workers; if it only got slower, the
            // probe costs one short measurement.
            self.start_probe(PROBE_FACTOR / STALE_RATIO, true, now, in_flight);
        } else if now >= self.next_probe {
            if demand >= PROBE_FACTOR * self.limit {
                self.start_probe(PROBE_FACTOR, false, now, in_flight);
            } else {
                // Demand is below what the probe would allow: every measurement is a no-load
                // one already, and the probe would only risk shedding. Look again later.
                self.next_probe = now + jittered(PROBE_EVERY);
                self.new_cohort(now, in_flight);
            }
        } else {
            self.new_cohort(now, in_flight);
        }
    }

    fn start_probe(&mut self, factor: f64, stale: bool, now: Instant, in_flight: usize) {
        self.probe = Some((self.limit, stale));
        self.limit = (self.limit * factor).max(self.min);
        tracing::debug!(
            limit = self.limit,
            stale,
            "adaptive limit probing the baseline"
        );
        self.stale_streak = 0;
        self.new_cohort(now, in_flight);
    }

    fn end_probe(
        &mut self,
        saved: f64,
        stale: bool,
        measured: Option<Stats>,
        now: Instant,
        in_flight: usize,
    ) {
        if let Some(stats) = measured {
            if stale && stats.mean() > self.baseline.mean().map(|old| old * TOLERANCE) {
                // The upstream itself got slower and the limit was cut for nothing: regain it
                // quickly.
                self.slow_start = true;
            }
            self.baseline = stats;
        }
        self.limit = saved.clamp(self.min, self.max);
        tracing::debug!(
            limit = self.limit,
            baseline_ms = self.baseline.mean().unwrap_or(0.0) * 1000.0,
            "adaptive limit probe done"
        );
        self.probe = None;
        self.next_probe = now + jittered(PROBE_EVERY);
        self.new_cohort(now, in_flight);
    }

    fn interval_length(&self) -> Duration {
        let by_baseline = self.baseline.mean().map_or(0.0, |b| b * INTERVAL_BASELINES);
        Duration::from_secs_f64(by_baseline).max(MIN_INTERVAL)
    }

    fn new_cohort(&mut self, now: Instant, in_flight: usize) {
        self.cohort = Cohort::new(self.cohort.id + 1, now);
        self.max_demand = in_flight;
    }

    #[cfg(test)]
    pub(crate) fn is_probing(&self) -> bool {
        self.probe.is_some()
    }
}

/// `d` spread by ±[`PROBE_JITTER`].
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(
        (1.0 - PROBE_JITTER)..=(1.0 + PROBE_JITTER),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// One whole cohort: `n` requests admitted together with `demand` wanting in, all
    /// answering `latency` later (or when the admission window is over, if that is later).
    fn feed(g: &mut GradientLimit, latency: Duration, n: u32, demand: usize) {
        let t0 = g.cohort.start;
        let tags: Vec<_> = (0..n).map(|_| g.on_admit(t0, demand)).collect();
        assert!(tags.iter().all(Option::is_some));
        let end = t0 + latency.max(g.interval_length());
        for tag in tags {
            g.on_complete(
                tag,
                end - latency,
                Outcome::Success,
                end,
                demand.saturating_sub(1),
            );
        }
    }

    /// Equal but for float rounding (identical samples still leave a variance of ~1e-20).
    fn assert_near(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() < expected * 1e-6,
            "{actual} != {expected}"
        );
    }

    fn assert_close(actual: Option<Duration>, expected: Duration) {
        let actual = actual.expect("no baseline");
        assert!(
            actual.abs_diff(expected) < Duration::from_micros(1),
            "{actual:?} != {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn grows_only_when_the_limit_is_used() {
        let mut g = GradientLimit::new(4, 100);
        assert_eq!(g.current(), 4);
        for _ in 0..5 {
            feed(&mut g, 20 * MS, MIN_SAMPLES, 1);
        }
        assert_eq!(g.current(), 4, "an unused limit must not grow");
        feed(&mut g, 20 * MS, MIN_SAMPLES, 4);
        assert_eq!(g.current(), 6, "slow start grows by half");
    }

    #[tokio::test(start_paused = true)]
    async fn growth_is_bounded_by_the_demand_that_validated_it() {
        // A steady load of 20 at once, never queueing: the limit may reach 1.5 × 20, not walk
        // on by half of itself each time (which took it to 68 before a 3× surge in the
        // overload benchmark).
        let mut g = GradientLimit::new(4, 256);
        for _ in 0..30 {
            let demand = g.current().min(20);
            feed(&mut g, 20 * MS, 2 * MIN_SAMPLES, demand);
        }
        assert_eq!(g.current(), 30, "1.5 × the demand seen");
        // After slow start the same holds: a limit held at ~40 by a load that then falls to 25
        // stays where it is (neither grows nor is cut: latency says nothing about more).
        let mut g = GradientLimit::new(4, 256);
        for _ in 0..10 {
            let demand = g.current();
            feed(&mut g, 20 * MS, 2 * MIN_SAMPLES, demand);
        }
        // Queueing above ~40: ends slow start near there.
        for _ in 0..10 {
            let demand = g.current().max(100);
            let latency = if g.current() > 40 { 30 * MS } else { 20 * MS };
            feed(&mut g, latency, 2 * MIN_SAMPLES, demand);
        }
        // The load falls to 25 at once (the cohort that sees the fall still saw the old peak).
        feed(&mut g, 20 * MS, 2 * MIN_SAMPLES, 25);
        let settled = g.current();
        assert!((35..=50).contains(&settled), "{settled}");
        for _ in 0..20 {
            feed(&mut g, 20 * MS, 2 * MIN_SAMPLES, 25);
        }
        assert!(g.current() <= settled, "{settled} -> {}", g.current());
        assert!(
            g.current() >= 25,
            "not cut below the demand: {}",
            g.current()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_to_capacity_in_one_step_and_at_most_by_half() {
        let mut g = GradientLimit::new(2, 100);
        // Establish the baseline at 20 ms, then leave slow start at a used limit.
        for _ in 0..8 {
            let demand = g.current();
            feed(&mut g, 20 * MS, MIN_SAMPLES, demand);
        }
        assert_close(g.baseline(), 20 * MS);
        let before = g.limit;
        assert!(before > 20.0, "{before}");
        // Latency 1.6× the baseline: the upstream holds limit/1.6 requests without queueing.
        let demand = g.current();
        feed(&mut g, 32 * MS, MIN_SAMPLES, demand);
        let expected = before * TOLERANCE / 1.6 + QUEUE_ALLOWANCE * before.sqrt();
        assert_near(g.limit, expected);
        // A flood of slowness cuts by half at most in one measurement…
        let before = g.current();
        feed(&mut g, 100 * MS, MIN_SAMPLES, 100);
        assert!(g.current() >= before / 2, "{before} -> {}", g.current());
        // …and whatever follows (cuts, probes, regrowth) stays within [min, max].
        for _ in 0..20 {
            feed(&mut g, 100 * MS, MIN_SAMPLES, 100);
            assert!((2..=100).contains(&g.current()), "{}", g.current());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stragglers_count_as_capped_samples() {
        let mut g = GradientLimit::new(100, 1000);
        feed(&mut g, 20 * MS, 100, 100);
        let before = g.limit;
        let t0 = g.cohort.start;
        let tags: Vec<_> = (0..100).map(|_| g.on_admit(t0, 150)).collect();
        let end = t0 + g.interval_length();
        for tag in &tags[10..] {
            g.on_complete(*tag, end - 20 * MS, Outcome::Success, end, 140);
        }
        // Ten requests are still out: the measurement waits…
        assert_eq!(g.limit, before);
        let cap = Duration::from_secs_f64(0.020 * SAMPLE_CAP);
        assert_eq!(
            g.on_admit(end + cap - MS, 150),
            None,
            "admissions are closed"
        );
        assert_eq!(g.limit, before);
        // …until they are SAMPLE_CAP baselines late, then they count as exactly that.
        g.on_admit(end + cap + MS, 150);
        let mean = (0.020 * 90.0 + 0.020 * SAMPLE_CAP * 10.0) / 100.0;
        let expected = before * TOLERANCE * 0.020 / mean + QUEUE_ALLOWANCE * before.sqrt();
        assert_near(g.limit, expected);
        // A late answer belongs to a finished measurement and is ignored.
        let cohort = g.cohort.id;
        g.on_complete(tags[0], t0, Outcome::Success, end + cap * 2, 100);
        assert_eq!((g.cohort.id, g.cohort.finished), (cohort, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_weigh_as_the_slowest_samples() {
        let mut g = GradientLimit::new(100, 1000);
        feed(&mut g, 20 * MS, 100, 100);
        let before = g.limit;
        let t0 = g.cohort.start;
        let tags: Vec<_> = (0..100).map(|_| g.on_admit(t0, 150)).collect();
        let end = t0 + g.interval_length();
        for (i, tag) in tags.into_iter().enumerate() {
            let outcome = if i < 10 {
                Outcome::Congestion
            } else {
                Outcome::Success
            };
            g.on_complete(tag, end - 20 * MS, outcome, end, 140);
        }
        let mean = (0.020 * 90.0 + 0.020 * SAMPLE_CAP * 10.0) / 100.0;
        let expected = before * TOLERANCE * 0.020 / mean + QUEUE_ALLOWANCE * before.sqrt();
        assert_near(g.limit, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn noise_in_a_small_measurement_is_not_read_as_queueing() {
        let mut g = GradientLimit::new(10, 1000);
        feed(&mut g, 20 * MS, MIN_SAMPLES, 10);
        assert_eq!(g.current(), 15);
        // Ten answers of 14 or 30 ms (average 22, ten percent up): noise, slow start goes on…
        let t0 = g.cohort.start;
        let tags: Vec<_> = (0..10).map(|_| g.on_admit(t0, 15)).collect();
        let end = t0 + g.interval_length();
        for (i, tag) in tags.into_iter().enumerate() {
            let latency = if i % 2 == 0 { 14 * MS } else { 30 * MS };
            g.on_complete(tag, end - latency, Outcome::Success, end, 9);
        }
        assert_eq!(g.current(), 22);
        assert!(g.slow_start);
        // …and its samples join the baseline's.
        assert_close(g.baseline(), 21 * MS);
        // A clear rise without the spread is queueing.
        let before = g.limit;
        feed(&mut g, 25 * MS, MIN_SAMPLES, 22);
        assert!(!g.slow_start);
        assert!(
            g.limit < before * SLOW_START_FACTOR,
            "{} -> {}",
            before,
            g.limit
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_baseline_is_re_measured_by_a_probe() {
        let mut g = GradientLimit::new(1, 1000);
        for _ in 0..12 {
            let demand = g.current();
            feed(&mut g, 20 * MS, MIN_SAMPLES, demand);
        }
        assert_close(g.baseline(), 20 * MS);
        // The upstream is now four times slower whatever the load: after STALE_INTERVALS cuts a
        // probe measures the new no-load latency.
        for _ in 0..STALE_INTERVALS {
            assert!(!g.is_probing());
            feed(&mut g, 80 * MS, MIN_SAMPLES, 1000);
        }
        assert!(g.is_probing());
        feed(&mut g, 80 * MS, PROBE_SAMPLES, 1000);
        assert!(!g.is_probing());
        assert_close(g.baseline(), 80 * MS);
        let after_probe = g.current();
        feed(&mut g, 80 * MS, MIN_SAMPLES, 1000);
        assert!(
            g.current() > after_probe,
            "regains the limit once the baseline is right"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_scheduled_probe_lowers_the_limit_for_one_measurement() {
        let mut g = GradientLimit::new(1, 1000);
        for _ in 0..12 {
            let demand = g.current();
            feed(&mut g, 20 * MS, MIN_SAMPLES, demand);
        }
        let limit = g.limit;
        g.next_probe = g.cohort.start;
        // Latency slightly up (1.1×): an ordinary measurement, then the probe starts.
        feed(&mut g, 22 * MS, MIN_SAMPLES, 1000);
        assert!(g.is_probing());
        let settled = limit * TOLERANCE / 1.1 + QUEUE_ALLOWANCE * limit.sqrt();
        assert_near(g.limit, settled * PROBE_FACTOR);
        // Without the extra load the requests take 19 ms: that is the new baseline.
        feed(&mut g, 19 * MS, PROBE_SAMPLES, 1000);
        assert!(!g.is_probing());
        assert_close(g.baseline(), 19 * MS);
        assert_near(g.limit, settled);
        assert!(g.next_probe >= g.cohort.start + PROBE_EVERY.mul_f64(1.0 - PROBE_JITTER));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_does_not_wait_for_a_hung_request() {
        let mut g = GradientLimit::new(1, 1000);
        for _ in 0..12 {
            let demand = g.current();
            feed(&mut g, 20 * MS, MIN_SAMPLES, demand);
        }
        g.next_probe = g.cohort.start;
        feed(&mut g, 20 * MS, MIN_SAMPLES, 1000);
        assert!(g.is_probing());
        let t0 = g.cohort.start;
        let tags: Vec<_> = (0..=PROBE_SAMPLES).map(|_| g.on_admit(t0, 100)).collect();
        let end = t0 + g.interval_length();
        for tag in &tags[1..] {
            g.on_complete(*tag, end - 19 * MS, Outcome::Success, end, 99);
        }
        g.on_admit(end + PROBE_STRAGGLER_MIN - MS, 100);
        assert!(g.is_probing(), "waits for the last answer…");
        g.on_admit(end + PROBE_STRAGGLER_MIN, 100);
        assert!(!g.is_probing(), "…but not forever");
        assert_close(g.baseline(), 19 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_admitted_before_a_change_are_ignored() {
        let mut g = GradientLimit::new(10, 100);
        let t0 = g.cohort.start;
        let old: Vec<_> = (0..20).map(|_| g.on_admit(t0, 10)).collect();
        g.new_cohort(t0, 10);
        for tag in old {
            g.on_complete(tag, t0, Outcome::Success, t0 + MIN_INTERVAL * 2, 10);
        }
        assert_eq!((g.cohort.finished, g.cohort.stats.n), (0, 0));
        assert_eq!(g.baseline(), None);
        assert_eq!(g.current(), 10);
    }
}
