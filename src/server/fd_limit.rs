//! The open-file limit: raised at start as far as the process may (every client connection
//! and every upstream connection is a file descriptor), and used to keep each listener's
//! `max_connections` below it, so a flood meets a clear 503 instead of `accept` failing with
//! "too many open files" and healthy clients hanging.

/// Descriptors kept for everything that is not a proxied connection: listeners, the admin
/// endpoint, config and certificate files, logging, the runtime.
const RESERVED: u64 = 128;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the limit now in force
/// (`None` where it cannot be read).
#[cfg(unix)]
pub(crate) fn raise() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    // rlim_t is u64 on Linux but not on every unix.
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

/// No file limit to raise outside unix.
#[cfg(not(unix))]
pub(crate) fn raise() -> Option<u64> {
    None
}

/// The connection cap of each of `listeners` listeners asking for `configured`, under a file
/// limit of `nofile`: a proxied connection can hold two descriptors (client and upstream).
pub(crate) fn connection_cap(configured: u32, listeners: usize, nofile: Option<u64>) -> u32 {
    let Some(nofile) = nofile else {
        return configured;
    };
    let budget = nofile.saturating_sub(RESERVED) / 2 / listeners.max(1) as u64;
    configured
        .min(u32::try_from(budget).unwrap_or(u32::MAX))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_upstream_connections_and_the_rest() {
        assert_eq!(connection_cap(10_000, 1, Some(1_048_576)), 10_000);
        assert_eq!(connection_cap(10_000, 1, Some(1024)), 448);
        assert_eq!(connection_cap(10_000, 2, Some(20_000)), 4968);
        assert_eq!(connection_cap(500, 1, None), 500);
        assert_eq!(connection_cap(10, 1, Some(16)), 1);
    }

    #[test]
    fn raising_reports_a_limit() {
        let limit = raise().expect("readable on unix");
        assert!(limit >= 256, "{limit}");
    }
}
