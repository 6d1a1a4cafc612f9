//! The memory watch: spillway's own resident memory against its limit, every
//! [`INTERVAL`], setting the [`Pressure`] level everything sheds by.
//!
//! The limit is `limits.memory_bytes` when set, else the memory limit of spillway's cgroup (v2
//! `memory.max`, v1 `memory.limit_in_bytes`): what the kubelet or systemd would kill it at.
//! Without either there is no limit and no pressure. Reading `/proc/self/statm` costs one small
//! read; the cgroup limit is re-read every [`LIMIT_REREAD`] (a pod can be resized in place).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use crate::config::LimitsSettings;
use crate::pressure::{Pressure, HARD, OK, SOFT};
use crate::proxy::Runtime;

/// How often resident memory is compared with the limit.
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);
/// How often the cgroup's limit is read again.
const LIMIT_REREAD: Duration = Duration::from_secs(10);
/// A level is only left once memory is this share of the limit below its mark, so the level
/// does not flap while memory hovers at a mark.
const HYSTERESIS: f64 = 0.05;

/// The level for `rss` bytes under `limit`, coming from `current` (see [`HYSTERESIS`]).
pub(crate) fn level(current: u8, rss: u64, limit: u64, marks: &LimitsSettings) -> u8 {
    if limit == 0 {
        return OK;
    }
    let used = rss as f64 / limit as f64;
    let above = |mark: f64, level: u8| {
        let mark = if current >= level {
            mark - HYSTERESIS
        } else {
            mark
        };
        used >= mark
    };
    if above(marks.memory_hard, HARD) {
        HARD
    } else if above(marks.memory_soft, SOFT) {
        SOFT
    } else {
        OK
    }
}

/// The gauges the watch keeps.
pub(crate) struct MemoryGauges {
    /// 0 ok, 1 soft, 2 hard.
    pub(crate) pressure: IntGauge,
    /// The limit in force (0: none).
    pub(crate) limit_bytes: IntGauge,
    /// Resident memory.
    pub(crate) resident_bytes: IntGauge,
}

/// Runs the memory watch until `stop`.
pub(crate) fn spawn(
    runtime: Arc<ArcSwap<Runtime>>,
    pressure: Pressure,
    gauges: MemoryGauges,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut cgroup = cgroup_limit();
        let mut cgroup_read = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if cgroup_read.elapsed() >= LIMIT_REREAD {
                cgroup = cgroup_limit();
                cgroup_read = tokio::time::Instant::now();
            }
            let limits = runtime.load().settings.limits.clone();
            let limit = limits.memory_bytes.or(cgroup).unwrap_or(0);
            gauges
                .limit_bytes
                .set(i64::try_from(limit).unwrap_or(i64::MAX));
            let Some(rss) = resident_bytes() else {
                continue;
            };
            gauges
                .resident_bytes
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
            let before = pressure.level();
            let now = level(before, rss, limit, &limits);
            if now != before {
                match now {
                    OK => tracing::info!(rss, limit, "memory pressure over"),
                    SOFT => tracing::warn!(
                        rss,
                        limit,
                        "memory pressure (soft): refusing new connections, closing idle ones"
                    ),
                    _ => {
                        tracing::warn!(rss, limit, "memory pressure (hard): refusing new requests")
                    }
                }
                pressure.set(now);
                gauges.pressure.set(i64::from(now));
            }
        }
    });
}

/// spillway's resident memory, in bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            return n as u64;
        }
    }
    4096
}

/// The memory limit of spillway's cgroup, v2 or v1; `None` when there is none.
pub(crate) fn cgroup_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let file: PathBuf = if controllers.is_empty() {
            // v2: the unified hierarchy.
            ["/sys/fs/cgroup", path, "memory.max"].iter().collect()
        } else if controllers.split(',').any(|c| c == "memory") {
            ["/sys/fs/cgroup/memory", path, "memory.limit_in_bytes"]
                .iter()
                .collect()
        } else {
            continue;
        };
        // Inside a container the cgroup root may be mounted as the own cgroup.
        let text = std::fs::read_to_string(&file).or_else(|_| {
            let root = if controllers.is_empty() {
                "/sys/fs/cgroup/memory.max"
            } else {
                "/sys/fs/cgroup/memory/memory.limit_in_bytes"
            };
            std::fs::read_to_string(root)
        });
        let Ok(text) = text else { continue };
        let text = text.trim();
        if text == "max" {
            return None;
        }
        // v1 says "no limit" with a huge number.
        return text.parse::<u64>().ok().filter(|&n| n < (1 << 60));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKS: LimitsSettings = LimitsSettings {
        memory_bytes: None,
        memory_soft: 0.8,
        memory_hard: 0.9,
    };

    #[test]
    fn levels_follow_the_marks_and_leave_them_with_some_slack() {
        let l = |current, rss| level(current, rss, 1000, &MARKS);
        assert_eq!(l(OK, 700), OK);
        assert_eq!(l(OK, 800), SOFT);
        assert_eq!(l(OK, 899), SOFT);
        assert_eq!(l(OK, 900), HARD);
        // Coming down, a level holds until memory is 5 % of the limit under its mark.
        assert_eq!(l(HARD, 860), HARD);
        assert_eq!(l(HARD, 849), SOFT);
        assert_eq!(l(SOFT, 760), SOFT);
        assert_eq!(l(SOFT, 749), OK);
        // No limit, no pressure.
        assert_eq!(level(OK, u64::MAX, 0, &MARKS), OK);
    }

    #[test]
    fn resident_memory_and_cgroup_limit_can_be_read() {
        let rss = resident_bytes().expect("statm is readable");
        assert!(rss > 1024 * 1024, "{rss}");
        // There may be no limit here; reading must not fail either way.
        let _ = cgroup_limit();
    }
}
