//! Socket activation (`sd_listen_fds(3)` without libsystemd): when systemd started spillway
//! from a `.socket` unit, the listening sockets are already open as file descriptors 3, 4, …
//! (`LISTEN_FDS` of them, for the process `LISTEN_PID`), optionally named by
//! `LISTEN_FDNAMES` (colon-separated, from each socket's `FileDescriptorName=`).
//!
//! Each is matched to what spillway would bind: a proxy listener by its `name`, the admin
//! endpoint as `admin`, the metrics listener as `metrics`. When any socket was named on
//! purpose, every socket is matched by name (an unknown name is an error); otherwise (no
//! names, or systemd's defaults: the socket unit's name, `unknown`) by order: the listeners in
//! config order, then `admin`, then `metrics`. Whatever got no socket is bound as usual. A socket left over is an error: the
//! socket unit and the config disagree.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// Sockets are taken from the environment at most once per process: a second server started
/// in the same process (tests) must not own the same descriptors again.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening sockets systemd passed, by the name of what serves on each.
pub(crate) type Inherited = HashMap<String, TcpListener>;

/// Passed descriptors with their `LISTEN_FDNAMES` entry, in order.
type Passed = Vec<(RawFd, Option<String>)>;

/// The sockets passed to this process, matched to `wanted` (what spillway would bind, in
/// order: listener names, then `admin`, then `metrics` when configured). Empty when spillway
/// was not socket-activated (or already took them). Each socket is set non-blocking.
pub(crate) fn take(wanted: &[String]) -> std::io::Result<Inherited> {
    let var = |name: &str| std::env::var(name).ok();
    let Some(fds) = plan(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )
    .map_err(invalid)?
    else {
        return Ok(Inherited::new());
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Inherited::new());
    }
    let assigned = assign(&fds, wanted).map_err(invalid)?;
    let mut out = Inherited::new();
    for (name, fd) in assigned {
        check_listening_tcp(fd).map_err(|e| {
            std::io::Error::new(e.kind(), format!("socket {fd} ({name}) from systemd: {e}"))
        })?;
        // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is ours) for it to
        // own, it is open (checked above), and `TAKEN` makes sure nothing else takes it.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        listener.set_nonblocking(true)?;
        out.insert(name, listener);
    }
    Ok(out)
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

/// The passed descriptors and their names, from the three variables, if they are meant for
/// the process `own_pid`: `None` when spillway was not socket-activated.
fn plan(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Option<Passed>, String> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    // For another process (a parent that was activated and started us): not ours.
    if pid.trim().parse::<u32>().ok() != Some(own_pid) {
        return Ok(None);
    }
    let n: RawFd = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| format!("LISTEN_FDS={fds:?} is not a count of sockets"))?;
    if n == 0 {
        return Ok(None);
    }
    let names: Vec<Option<String>> = match names {
        Some(text) => {
            let list: Vec<&str> = text.split(':').collect();
            if list.len() != n as usize {
                return Err(format!(
                    "LISTEN_FDNAMES names {} sockets, LISTEN_FDS passes {n}",
                    list.len()
                ));
            }
            list.into_iter()
                .map(|s| Some(s.to_owned()).filter(|s| !s.is_empty()))
                .collect()
        }
        None => vec![None; n as usize],
    };
    Ok(Some((FIRST_FD..FIRST_FD + n).zip(names).collect()))
}

/// Whether a passed name was given on purpose (`FileDescriptorName=`), rather than systemd's
/// default: the socket unit's name (`spillway.socket`), or `unknown` in older versions.
fn explicit(name: &Option<String>) -> bool {
    name.as_deref()
        .is_some_and(|n| !n.is_empty() && n != "unknown" && !n.ends_with(".socket"))
}

/// Which passed descriptor serves what: by name when any socket was named on purpose (then
/// every name must be one spillway serves), else by order.
fn assign(
    fds: &[(RawFd, Option<String>)],
    wanted: &[String],
) -> Result<Vec<(String, RawFd)>, String> {
    if fds.iter().any(|(_, name)| explicit(name)) {
        let mut out: Vec<(String, RawFd)> = Vec::new();
        for (fd, name) in fds {
            let name = name.clone().unwrap_or_default();
            if !wanted.contains(&name) {
                return Err(format!(
                    "systemd passed a socket named {name:?}, which is no listener here (expected one of: {})",
                    wanted.join(", ")
                ));
            }
            if out.iter().any(|(n, _)| *n == name) {
                return Err(format!("systemd passed two sockets named {name:?}"));
            }
            out.push((name, *fd));
        }
        return Ok(out);
    }
    if fds.len() > wanted.len() {
        return Err(format!(
            "systemd passed {} sockets, but spillway has only {} to serve ({}); name them with FileDescriptorName=",
            fds.len(),
            wanted.len(),
            wanted.join(", ")
        ));
    }
    Ok(wanted
        .iter()
        .zip(fds)
        .map(|(name, (fd, _))| (name.clone(), *fd))
        .collect())
}

/// That `fd` is open, a stream socket, and listening.
fn check_listening_tcp(fd: RawFd) -> std::io::Result<()> {
    let option = |name: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of a c_int; getsockopt only reads `fd`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    if option(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(invalid("not a stream socket (ListenStream=)".to_owned()));
    }
    if option(libc::SO_ACCEPTCONN)? == 0 {
        return Err(invalid("not listening".to_owned()));
    }
    match option(libc::SO_DOMAIN)? {
        libc::AF_INET | libc::AF_INET6 => Ok(()),
        _ => Err(invalid("not a TCP socket (IPv4 or IPv6)".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn only_sockets_for_this_process_count() {
        assert_eq!(plan(None, None, None, 42), Ok(None));
        assert_eq!(plan(Some("42"), None, None, 42), Ok(None));
        assert_eq!(plan(Some("41"), Some("2"), None, 42), Ok(None));
        assert_eq!(plan(Some("42"), Some("0"), None, 42), Ok(None));
        assert_eq!(
            plan(Some("42"), Some("2"), None, 42),
            Ok(Some(vec![(3, None), (4, None)]))
        );
        assert_eq!(
            plan(Some("42"), Some("2"), Some("http:admin"), 42),
            Ok(Some(vec![
                (3, Some("http".into())),
                (4, Some("admin".into()))
            ]))
        );
        assert!(plan(Some("42"), Some("two"), None, 42).is_err());
        assert!(plan(Some("42"), Some("2"), Some("http"), 42)
            .unwrap_err()
            .contains("names 1 sockets, LISTEN_FDS passes 2"));
    }

    #[test]
    fn names_match_listeners_admin_and_metrics_in_any_order() {
        let wanted = names(&["https", "http", "admin", "metrics"]);
        let fds = vec![
            (3, Some("metrics".into())),
            (4, Some("http".into())),
            (5, Some("https".into())),
        ];
        assert_eq!(
            assign(&fds, &wanted),
            Ok(vec![
                ("metrics".into(), 3),
                ("http".into(), 4),
                ("https".into(), 5)
            ])
        );
        let typo = vec![(3, Some("http".into())), (4, Some("htps".into()))];
        assert!(assign(&typo, &wanted)
            .unwrap_err()
            .contains("named \"htps\", which is no listener here"));
        let twice = vec![(3, Some("http".into())), (4, Some("http".into()))];
        assert!(assign(&twice, &wanted).unwrap_err().contains("two sockets"));
        // Named on purpose, but nothing here by that name: an error, not a guess.
        let unknown = vec![(3, Some("web".into()))];
        assert!(assign(&unknown, &wanted).is_err());
        let half = vec![
            (3, Some("http".into())),
            (4, Some("spillway.socket".into())),
        ];
        assert!(assign(&half, &wanted).is_err());
    }

    #[test]
    fn without_usable_names_sockets_go_in_order() {
        let wanted = names(&["https", "admin"]);
        // systemd's default name is the socket unit's (`unknown` before v227).
        let fds = vec![
            (3, Some("spillway.socket".into())),
            (4, Some("unknown".into())),
        ];
        assert_eq!(
            assign(&fds, &wanted),
            Ok(vec![("https".into(), 3), ("admin".into(), 4)])
        );
        assert_eq!(
            assign(&fds[..1], &wanted),
            Ok(vec![("https".into(), 3)]),
            "the admin endpoint is bound by spillway"
        );
        let three = vec![(3, None), (4, None), (5, None)];
        assert!(assign(&three, &wanted)
            .unwrap_err()
            .contains("passed 3 sockets, but spillway has only 2"));
    }

    #[test]
    fn a_descriptor_that_is_no_listening_tcp_socket_is_refused() {
        let bound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        assert!(check_listening_tcp(bound.as_raw_fd()).is_ok());
        let connected = std::net::TcpStream::connect(bound.local_addr().unwrap()).unwrap();
        assert!(check_listening_tcp(connected.as_raw_fd())
            .unwrap_err()
            .to_string()
            .contains("not listening"));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(check_listening_tcp(udp.as_raw_fd()).is_err());
    }
}
