//! The real binary (`spillway run`): SIGHUP reloads, SIGTERM drains (readiness first, then the
//! listener, then in-flight work up to `drain_timeout`), and a second signal exits at once.

use super::*;

/// A `spillway run` child process; killed on drop if still running, so a failing test does
/// not leave it behind. Its stdout and stderr are collected into `output`.
struct Spillway {
    child: Child,
    output: Arc<Mutex<String>>,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Spillway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Spillway {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Sends a signal with `kill(1)`.
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits (bounded) for the process to exit; its exit status, or `None` if still running.
    async fn wait_exit(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts `spillway run --config <dir>/spillway.yaml` with the config `make(proxy, admin)`
    /// on ports picked by binding port 0 and releasing it (retried if another process took
    /// one in between), and waits until it is ready and its signal handlers are installed.
    async fn start(dir: &TempDir, make: impl Fn(SocketAddr, SocketAddr) -> String) -> Spillway {
        let path = dir.join("spillway.yaml");
        for attempt in 0..5 {
            let (proxy, admin) = {
                let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                (a.local_addr().unwrap(), b.local_addr().unwrap())
            };
            std::fs::write(&path, make(proxy, admin)).unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
                .args(["run", "--config", path.to_str().unwrap()])
                .env_remove("SPILLWAY_CONFIG")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the binary starts");
            let output = Arc::new(Mutex::new(String::new()));
            for pipe in [
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                Box::new(child.stderr.take().unwrap()),
            ] {
                let output = output.clone();
                std::thread::spawn(move || {
                    use std::io::BufRead;
                    for line in std::io::BufReader::new(pipe).lines() {
                        let Ok(line) = line else { return };
                        let mut o = output.lock().unwrap();
                        o.push_str(&line);
                        o.push('\n');
                    }
                });
            }
            let mut s = Spillway {
                child,
                output,
                proxy,
                admin,
            };
            let deadline = Instant::now() + STEP;
            loop {
                if let Some(status) = s.child.try_wait().unwrap() {
                    // Give the reader threads a moment to collect the last lines.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let out = s.output();
                    if out.contains("in use") && attempt < 4 {
                        break; // a port was taken in between: pick others
                    }
                    panic!("spillway exited at start ({status}):\n{out}");
                }
                if let Ok(r) =
                    try_get(&format!("http://{admin}/readyz"), Duration::from_secs(1)).await
                {
                    if r.status == StatusCode::OK {
                        s.wait_for_signal_handlers().await;
                        return s;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "spillway not ready within {STEP:?}:\n{}",
                    s.output()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!("the last attempt panics instead of retrying")
    }

    /// Readiness can answer a moment before the SIGHUP/SIGTERM handlers are installed; a
    /// signal in that moment would take the default action (terminate). Waits (bounded) until
    /// `/proc/<pid>/status` shows both caught; elsewhere, waits a little.
    async fn wait_for_signal_handlers(&self) {
        const SIGHUP: u32 = 1;
        const SIGTERM: u32 = 15;
        let status = PathBuf::from(format!("/proc/{}/status", self.pid()));
        if !status.exists() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        let deadline = Instant::now() + STEP;
        loop {
            let caught = std::fs::read_to_string(&status)
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("SigCgt:"))
                        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                })
                .unwrap_or(0);
            if caught & (1 << (SIGHUP - 1)) != 0 && caught & (1 << (SIGTERM - 1)) != 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "signal handlers not installed within {STEP:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn metric(&self, series: &str) -> f64 {
        admin_metric(self.admin, series).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("sighup");
    let mut s = Spillway::start(&dir, |p, a| {
        config_at(
            &p.to_string(),
            &a.to_string(),
            app.local_addr(),
            nowhere,
            "",
            "5s",
            "",
        )
    })
    .await;
    let (version, loaded_at) = serving(s.admin).await;
    assert_eq!(s.metric(SUCCESS).await, 0.0);

    s.signal("HUP");
    assert_eq!(
        metric_settles(s.admin, SUCCESS, 1.0).await,
        1.0,
        "a SIGHUP counts one successful reload"
    );
    s.signal("HUP");
    assert_eq!(
        metric_settles(s.admin, SUCCESS, 2.0).await,
        2.0,
        "and another one"
    );
    // Nothing else reloads behind its back (the file did not change).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.metric(SUCCESS).await, 2.0);
    assert_eq!(s.metric(FAILURE).await, 0.0);
    assert_eq!(s.metric(LAST_OK).await, 1.0);
    assert_eq!(
        serving(s.admin).await,
        (version.clone(), loaded_at),
        "an unchanged file builds nothing"
    );
    let r = get(&format!("http://{}/ok", s.proxy)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop spillway"
    );
    assert!(
        s.output().contains("SIGHUP"),
        "the reload is logged:\n{}",
        s.output()
    );

    // A bad file (picked up by the watcher, then again by a SIGHUP): refused, logged,
    // counted; nothing of it serves.
    let path = dir.join("spillway.yaml");
    let (p, a) = (s.proxy.to_string(), s.admin.to_string());
    let good = config_at(&p, &a, app.local_addr(), nowhere, X_REFUSED, "4s", "");
    write_by_rename(
        &path,
        &good.replace("    timeout: 4s\n", "    timeuot: 4s\n"),
    );
    assert_eq!(
        metric_settles(s.admin, FAILURE, 1.0).await,
        1.0,
        "the watcher refuses the bad file"
    );
    s.signal("HUP");
    assert_eq!(
        metric_settles(s.admin, FAILURE, 2.0).await,
        2.0,
        "so does a SIGHUP"
    );
    assert_eq!(s.metric(LAST_OK).await, 0.0);
    assert_eq!(s.metric(SUCCESS).await, 2.0);
    assert_eq!(
        serving(s.admin).await.0,
        version,
        "the old config keeps serving"
    );
    let r = get(&format!("http://{}/x", s.proxy)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    let out = s.output();
    assert!(
        out.contains("config reload refused") && out.contains("timeuot"),
        "the refusal is logged with its reason:\n{out}"
    );

    // Fixed: the watcher applies it.
    let since = Instant::now();
    write_by_rename(&path, &good);
    let took = wait_for_version(s.admin, &version_of(&good), since).await;
    let took = took.unwrap_or_else(|| panic!("the fixed file never served:\n{}", s.output()));
    assert!(took <= PICKUP, "took {took:?}");
    assert_eq!(s.metric(LAST_OK).await, 1.0);
    assert_eq!(s.metric(SUCCESS).await, 3.0);
    let r = get(&format!("http://{}/x", s.proxy)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());

    s.signal("TERM");
    let status = s
        .wait_exit(STEP)
        .await
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", s.output()));
    assert!(status.success(), "{status}");
}

/// SIGTERM with a slow request in flight: readiness fails at once, traffic is still served
/// for `drain_delay`, then new connections are refused while the slow request completes with
/// its full body, and the process exits 0 as soon as it is done (well before
/// `drain_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_binary() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("sigterm");
    let drain_delay = Duration::from_millis(500);
    let mut s = Spillway::start(&dir, |p, a| {
        config_at(
            &p.to_string(),
            &a.to_string(),
            app.local_addr(),
            nowhere,
            "",
            "10s",
            "shutdown: { drain_delay: 500ms, drain_timeout: 5s }\n",
        )
    })
    .await;
    let proxy = s.proxy;

    let slow_url = format!("http://{proxy}/slow?ms=1500");
    let slow = tokio::spawn(async move { try_get(&slow_url, STEP).await });
    assert_eq!(
        metric_settles(s.admin, &in_flight_series("default"), 1.0).await,
        1.0,
        "the slow request is in flight"
    );

    s.signal("TERM");
    let signalled = Instant::now();
    // Readiness fails at once.
    let ready_url = format!("http://{}/readyz", s.admin);
    let not_ready = loop {
        let r = try_get(&ready_url, Duration::from_secs(1))
            .await
            .expect("admin answers while draining");
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            break signalled.elapsed();
        }
        assert!(signalled.elapsed() < STEP, "readiness never failed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        not_ready <= Duration::from_millis(250),
        "readiness failed only after {not_ready:?}"
    );

    // Traffic is still served during drain_delay, on a new connection.
    let r = try_get(&format!("http://{proxy}/ok"), Duration::from_secs(1))
        .await
        .expect("served while draining");
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "ok\n"));
    assert!(
        signalled.elapsed() < drain_delay,
        "the check above must run within drain_delay to mean anything"
    );

    // Then new connections are refused, while the slow request is still in flight.
    let refused = wait_until_refused(proxy, signalled).await;
    assert!(
        refused >= drain_delay - Duration::from_millis(100),
        "stopped accepting after {refused:?}, before drain_delay"
    );
    assert!(
        !slow.is_finished(),
        "the slow request should still be in flight when accepting stops ({refused:?})"
    );

    let r = slow
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("slow request failed: {e}\n{}", s.output()));
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "slept 1500 ms\n", "the full body");
    let answered = signalled.elapsed();

    let status = s
        .wait_exit(STEP)
        .await
        .unwrap_or_else(|| panic!("no exit after draining:\n{}", s.output()));
    let exited = signalled.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", s.output());
    assert!(
        exited < answered + Duration::from_secs(1),
        "exited {exited:?} after the signal, the last request was done at {answered:?}: it should not wait for drain_timeout"
    );
    let out = s.output();
    assert!(out.contains("SIGTERM"), "{out}");
}

/// A request that outlasts `drain_timeout` is cut and the process exits 0 once the timeout
/// passes, not when the request would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_when_drain_timeout_passes() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("drain-timeout");
    let mut s = Spillway::start(&dir, |p, a| {
        config_at(
            &p.to_string(),
            &a.to_string(),
            app.local_addr(),
            nowhere,
            "",
            "30s",
            "shutdown: { drain_delay: 100ms, drain_timeout: 1s }\n",
        )
    })
    .await;
    let slow_url = format!("http://{}/slow?ms=8000", s.proxy);
    let slow = tokio::spawn(async move { try_get(&slow_url, STEP).await });
    assert_eq!(
        metric_settles(s.admin, &in_flight_series("default"), 1.0).await,
        1.0
    );

    s.signal("TERM");
    let signalled = Instant::now();
    let status = s
        .wait_exit(Duration::from_secs(6))
        .await
        .unwrap_or_else(|| panic!("no exit:\n{}", s.output()));
    let exited = signalled.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", s.output());
    assert!(
        exited >= Duration::from_millis(1000),
        "exited after {exited:?}: in-flight work gets drain_timeout"
    );
    assert!(
        exited < Duration::from_secs(4),
        "exited after {exited:?}: drain_delay + drain_timeout is 1.1 s"
    );
    let r = slow.await.unwrap();
    assert!(
        r.is_err(),
        "the request outlasting drain_timeout is cut, got {r:?}"
    );
}

/// A second signal while draining exits at once (status 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("second-signal");
    let mut s = Spillway::start(&dir, |p, a| {
        config_at(
            &p.to_string(),
            &a.to_string(),
            app.local_addr(),
            nowhere,
            "",
            "5s",
            "shutdown: { drain_delay: 10s, drain_timeout: 10s }\n",
        )
    })
    .await;
    s.signal("TERM");
    let ready_url = format!("http://{}/readyz", s.admin);
    let deadline = Instant::now() + STEP;
    while try_get(&ready_url, Duration::from_secs(1))
        .await
        .map(|r| r.status)
        != Ok(StatusCode::SERVICE_UNAVAILABLE)
    {
        assert!(Instant::now() < deadline, "readiness never failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.signal("INT");
    let signalled = Instant::now();
    let status = s
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no exit:\n{}", s.output()));
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "took {:?}",
        signalled.elapsed()
    );
}

/// The access log as configured: with `sample: 0`, only the always-logged classes get a line
/// (here a 5xx and a 502 spillway generated, not the 200s); lines carry the trace id and the
/// configured header; `format: json` gives one object per line.
#[tokio::test]
async fn the_access_log_samples_and_always_logs_what_matters() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("access-log");
    let access_log = "access_log:\n  format: json\n  sample: 0\n  always_log: [proxy_errors, 5xx]\n  fields: { request: [user-agent] }\n";
    let s = Spillway::start(&dir, |p, a| {
        config_at(
            &p.to_string(),
            &a.to_string(),
            app.local_addr(),
            nowhere,
            X_REFUSED,
            "5s",
            access_log,
        )
    })
    .await;
    let send = |path: &'static str| async move {
        let req = Request::get(format!("http://{}{path}", s.proxy))
            .header("user-agent", "probe/1")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(req).await.status
    };
    for _ in 0..5 {
        assert_eq!(send("/ok").await, StatusCode::OK);
    }
    assert_eq!(send("/status/500").await, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(send("/x").await, StatusCode::BAD_GATEWAY);
    // The lines are written by a background thread: wait for both.
    let lines = || -> Vec<serde_json::Value> {
        s.output()
            .lines()
            .filter(|l| l.contains("spillway::access"))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    assert!(
        eventually(|| async { lines().len() >= 2 }).await,
        "{}",
        s.output()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = lines();
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        ["/status/500", "/x"],
        "only the always-logged classes"
    );
    assert_eq!(lines[0]["source"], "upstream");
    assert_eq!(lines[1]["source"], "proxy");
    assert_eq!(lines[1]["error"], "connection_refused");
    for l in &lines {
        assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(l["req_user_agent"], "probe/1");
        assert_eq!(l["level"], "INFO");
    }
}
