//! VM lifecycle without systemd: the real binary is given a notify socket and listening
//! sockets the way systemd gives them (`NOTIFY_SOCKET`; descriptors 3 and 4 with
//! `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`). It says READY once it serves, RELOADING …
//! READY around a reload and STOPPING when it drains; it serves the passed sockets instead of
//! binding; and because the sockets outlive it (here the test holds them, as systemd would), a
//! connection made while no spillway runs waits in the backlog and is answered by the next.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixDatagram;

use super::*;

/// A `spillway run` started the way systemd starts a socket-activated `Type=notify` service;
/// killed on drop if still running.
struct Activated {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Activated {
    /// Starts the binary with `sockets` as descriptors 3, 4, … named `names`, and
    /// `NOTIFY_SOCKET` = `notify`. `sh` puts its own pid in `LISTEN_PID` and `exec`s spillway,
    /// which keeps that pid: what systemd does for the process it starts.
    fn start(
        config: &std::path::Path,
        sockets: &[RawFd],
        names: &str,
        notify: &std::path::Path,
    ) -> Activated {
        let fds: Vec<RawFd> = sockets.to_vec();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#])
            .arg(env!("CARGO_BIN_EXE_spillway"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env_remove("SPILLWAY_CONFIG")
            .env_remove("LISTEN_PID")
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names)
            .env("NOTIFY_SOCKET", notify)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2, close): each
        // socket is first moved above the target range, so that no target overwrites a source,
        // then placed at 3, 4, … (dup2 clears close-on-exec there).
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0 as RawFd; 8];
                for (i, fd) in fds.iter().enumerate() {
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in high[..fds.len()].iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(*fd);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("sh and the binary start");
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    output.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        Activated { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -s {name}");
    }

    /// Waits (bounded) for the exit; its status.
    async fn exit(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still running:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The next notification on `socket` (bounded by [`STEP`]).
async fn next(socket: &UnixDatagram, context: &Activated) -> String {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(STEP, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => panic!(
            "no notification within {STEP:?}; output:\n{}",
            context.output()
        ),
    }
}

/// One raw request on `stream` (already connected), answered whole: the status line.
async fn exchange(mut stream: tokio::net::TcpStream) -> String {
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut out))
        .await
        .expect("answered within the step bound")
        .unwrap();
    String::from_utf8_lossy(&out)
        .split("\r\n")
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_and_socket_activation_keep_connections_across_a_restart() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = TempDir::new("systemd");
    // What the .socket unit would hold: the proxy and admin sockets, bound and listening.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (proxy_addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
    let config = dir.write(
        "spillway.yaml",
        &format!(
            "{}shutdown: {{ drain_delay: 0s, drain_timeout: 5s }}\n",
            TestProxy::simple_config(app.local_addr(), "")
                .replace(
                    "address: 127.0.0.1:0\nadmin",
                    &format!("address: {proxy_addr}\nadmin")
                )
                .replace(
                    "admin:\n  address: 127.0.0.1:0",
                    &format!("admin:\n  address: {admin_addr}")
                )
        ),
    );
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let fds = [proxy.as_raw_fd(), admin.as_raw_fd()];

    let mut first = Activated::start(&config, &fds, "http:admin", &notify_path);
    let ready = next(&notify, &first).await;
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving config "),
        "{ready:?}"
    );
    // Ready means serving: on the passed sockets, not on new ones.
    let r = get(&format!("http://{proxy_addr}/ok")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        get(&format!("http://{admin_addr}/readyz")).await.status,
        StatusCode::OK
    );
    let log = first.output();
    assert_eq!(
        log.matches("serving the socket passed by systemd").count(),
        2,
        "{log}"
    );

    // A reload is bracketed by RELOADING=1 and READY=1.
    first.signal("HUP");
    let reloading = next(&notify, &first).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let again = next(&notify, &first).await;
    assert!(again.starts_with("READY=1\n"), "{again:?}");

    // Stopping: STOPPING=1 at the start of the drain, then a clean exit.
    first.signal("TERM");
    assert!(next(&notify, &first).await.starts_with("STOPPING=1\n"));
    assert!(first.exit().await.success(), "{}", first.output());

    // No spillway runs now, yet the socket is open: the connection is accepted by the kernel
    // and its request waits in the backlog instead of being refused.
    let waiting = tokio::time::timeout(STEP, tokio::net::TcpStream::connect(proxy_addr))
        .await
        .expect("connect within the step bound")
        .expect("the kernel accepts into the backlog between the two processes");
    let answer = tokio::spawn(exchange(waiting));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!answer.is_finished(), "nobody should have answered yet");

    // The next process (the restart, or an upgraded binary) takes the same sockets and answers.
    let mut second = Activated::start(&config, &fds, "http:admin", &notify_path);
    assert!(next(&notify, &second).await.starts_with("READY=1\n"));
    let status = tokio::time::timeout(STEP, answer)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{}", second.output());
    second.signal("TERM");
    assert!(second.exit().await.success(), "{}", second.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_named_for_no_listener_fails_the_start() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = TempDir::new("systemd-mismatch");
    let config = dir.write(
        "spillway.yaml",
        &TestProxy::simple_config(app.local_addr(), ""),
    );
    let notify_path = dir.join("notify.sock");
    let _notify = UnixDatagram::bind(&notify_path).unwrap();
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // A name that is no listener: the socket unit and the config disagree; spillway says so
    // and exits 1 rather than serve something else than was meant.
    let mut wrong = Activated::start(&config, &[proxy.as_raw_fd()], "https", &notify_path);
    let status = wrong.exit().await;
    assert_eq!(status.code(), Some(1), "{}", wrong.output());
    assert!(
        wrong
            .output()
            .contains(r#"named "https", which is no listener here"#),
        "{}",
        wrong.output()
    );
}
