//! `sd_notify(3)` without libsystemd: newline-separated `KEY=value` assignments, one datagram
//! per state change, to the Unix socket `$NOTIFY_SOCKET` names (a path, or `@name` for the
//! abstract namespace). Sends never block and never fail the caller: a service manager that is
//! gone or slow must not hold up serving or stopping.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// Where notifications go: `$NOTIFY_SOCKET`, when spillway runs under a service manager that
/// asked for them.
#[derive(Debug)]
pub(crate) struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; without it (or with a value that names no Unix socket),
    /// notifications are dropped.
    pub(crate) fn from_env() -> Notifier {
        Notifier::to(std::env::var_os("NOTIFY_SOCKET").as_deref())
    }

    /// To the socket `value` names, like `$NOTIFY_SOCKET`.
    pub(crate) fn to(value: Option<&std::ffi::OsStr>) -> Notifier {
        use std::os::unix::ffi::OsStrExt;
        let target = value.map(OsStrExt::as_bytes).and_then(|v| match v {
            [b'@', name @ ..] if !name.is_empty() => Some(Target::Abstract(name.to_vec())),
            [b'/', ..] => Some(Target::Path(PathBuf::from(std::ffi::OsStr::from_bytes(v)))),
            _ => None,
        });
        Notifier { target }
    }

    /// Whether a service manager listens.
    pub(crate) fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: serving (also after a reload), with a status line for `systemctl status`.
    pub(crate) fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    /// `RELOADING=1`: a reload has begun; [`Notifier::ready`] ends it. `MONOTONIC_USEC` is what
    /// `Type=notify-reload` asks for; plain `Type=notify` accepts it too.
    pub(crate) fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the config\n",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`: the drain has begun.
    pub(crate) fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}\n"));
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|socket| {
            socket.set_nonblocking(true)?;
            match target {
                Target::Path(path) => socket.send_to(message.as_bytes(), path),
                Target::Abstract(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                    socket.send_to_addr(message.as_bytes(), &addr)
                }
            }
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares reload times on.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn each_state_is_one_datagram_to_a_path() {
        let dir = std::env::temp_dir().join(format!("spillway-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(Some(path.as_os_str()));
        assert!(n.enabled());
        n.ready("serving config abc");
        assert_eq!(receive(&socket), "READY=1\nSTATUS=serving config abc\n");
        n.reloading();
        let reloading = receive(&socket);
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
        let usec: u64 = reloading.lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
            .parse()
            .unwrap();
        assert!(usec > 0);
        n.stopping("draining");
        assert_eq!(receive(&socket), "STOPPING=1\nSTATUS=draining\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_abstract_socket_is_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("spillway-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::to(Some(OsStr::new(&format!("@{name}")))).ready("up");
        assert_eq!(receive(&socket), "READY=1\nSTATUS=up\n");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        for value in [None, Some(""), Some("relative/path"), Some("@")] {
            let n = Notifier::to(value.map(OsStr::new));
            assert!(!n.enabled(), "{value:?}");
            n.ready("nobody listens");
        }
    }
}
