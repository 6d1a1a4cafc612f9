//! A sliding time window of two counters, kept in a fixed ring of buckets so that recording and
//! reading cost the same at any traffic level and never allocate.

use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window: the window slides in steps of a tenth of its length, fine enough that a
/// burst drops out close to when it should, small enough to sum on every request.
pub(crate) const BUCKETS: u64 = 10;

/// Counts of one bucket (or of the whole window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Everything recorded (requests).
    pub(crate) total: u64,
    /// The subset of interest (failures, retries).
    pub(crate) marked: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Which bucket period (counted from `origin`) these counts belong to.
    period: u64,
    counts: Counts,
}

/// Counts over roughly the last `window`: the current bucket plus the nine before it, so the
/// span covered is between 9/10 and 10/10 of `window`.
#[derive(Debug)]
pub(crate) struct SlidingWindow {
    origin: Instant,
    width_nanos: u64,
    slots: [Slot; BUCKETS as usize],
}

impl SlidingWindow {
    /// An empty window of length `window`, starting now.
    pub(crate) fn new(window: Duration) -> Self {
        // A zero window would divide by zero; one nanosecond per bucket means "only now".
        let width_nanos = u64::try_from(window.as_nanos() / u128::from(BUCKETS))
            .unwrap_or(u64::MAX)
            .max(1);
        SlidingWindow {
            origin: Instant::now(),
            width_nanos,
            slots: [Slot::default(); BUCKETS as usize],
        }
    }

    fn period(&self, now: Instant) -> u64 {
        // 64-bit nanoseconds last 584 years; a 128-bit division would cost a libcall on every
        // request.
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed).unwrap_or(u64::MAX) / self.width_nanos
    }

    /// Adds to the bucket `now` falls in.
    pub(crate) fn add(&mut self, now: Instant, total: u64, marked: u64) {
        let period = self.period(now);
        let slot = &mut self.slots[(period % BUCKETS) as usize];
        if slot.period != period {
            // The slot still holds a bucket that has slid out of the window.
            *slot = Slot {
                period,
                counts: Counts::default(),
            };
        }
        slot.counts.total += total;
        slot.counts.marked += marked;
    }

    /// Sums the buckets still inside the window at `now`.
    pub(crate) fn counts(&self, now: Instant) -> Counts {
        let period = self.period(now);
        let mut sum = Counts::default();
        for slot in &self.slots {
            if slot.period <= period && period - slot.period < BUCKETS {
                sum.total += slot.counts.total;
                sum.marked += slot.counts.marked;
            }
        }
        sum
    }

    /// Forgets everything.
    pub(crate) fn reset(&mut self) {
        self.slots = [Slot::default(); BUCKETS as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_slide_out_bucket_by_bucket() {
        let mut w = SlidingWindow::new(Duration::from_secs(10));
        let t0 = Instant::now();
        w.add(t0, 1, 1);
        w.add(t0 + Duration::from_millis(4500), 2, 0);
        assert_eq!(
            w.counts(t0 + Duration::from_millis(4500)),
            Counts {
                total: 3,
                marked: 1
            }
        );
        // The first bucket covers [0 s, 1 s): it is still in at 9.999 s, gone at 10 s.
        assert_eq!(w.counts(t0 + Duration::from_millis(9999)).total, 3);
        assert_eq!(
            w.counts(t0 + Duration::from_secs(10)),
            Counts {
                total: 2,
                marked: 0
            }
        );
        assert_eq!(w.counts(t0 + Duration::from_secs(15)), Counts::default());
        // A slot reused for a later period starts from zero.
        w.add(t0 + Duration::from_secs(20), 1, 0);
        assert_eq!(
            w.counts(t0 + Duration::from_secs(20)),
            Counts {
                total: 1,
                marked: 0
            }
        );
        w.reset();
        assert_eq!(w.counts(t0 + Duration::from_secs(20)), Counts::default());
    }
}
