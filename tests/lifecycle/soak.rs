//! Soaks: 100 reloads under steady keep-alive load, and shutdowns under load (with `stop_now`,
//! and the way an orchestrator does it, with a drain delay and a load balancer polling
//! readiness).

use super::*;

/// What the load clients saw.
#[derive(Default)]
struct LoadTally {
    ok: AtomicUsize,
    bad_status: AtomicUsize,
    bad_body: AtomicUsize,
    connection_errors: AtomicUsize,
}

/// One keep-alive connection, GETs in a loop until `stop`; any error ends it and is counted.
async fn keepalive_client(
    addr: SocketAddr,
    tally: Arc<LoadTally>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            tally.connection_errors.fetch_add(1, Ordering::SeqCst);
            return vec![format!("connect: {e}")];
        }
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                tally.connection_errors.fetch_add(1, Ordering::SeqCst);
                return vec![format!("handshake: {e}")];
            }
        };
    let conn = tokio::spawn(conn);
    while !stop.load(Ordering::SeqCst) {
        let req = get_request(addr, "/ok");
        let exchange = async {
            sender.ready().await.map_err(|e| format!("ready: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(STEP, exchange).await {
            Ok(Ok((status, body))) => {
                if status != StatusCode::OK {
                    tally.bad_status.fetch_add(1, Ordering::SeqCst);
                    errors.push(format!("status {status}"));
                } else if body.as_ref() != b"ok\n" {
                    tally.bad_body.fetch_add(1, Ordering::SeqCst);
                    errors.push(format!("body {body:?}"));
                } else {
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(Err(e)) => {
                tally.connection_errors.fetch_add(1, Ordering::SeqCst);
                errors.push(e);
                break;
            }
            Err(_) => {
                tally.connection_errors.fetch_add(1, Ordering::SeqCst);
                errors.push("no answer within STEP".into());
                break;
            }
        }
    }
    drop(sender);
    let _ = tokio::time::timeout(STEP, conn).await;
    errors
}

/// Four clients on keep-alive connections send GETs for the whole run while the config is
/// reloaded 100 times (alternating two valid configs that differ in the catch-all's timeout):
/// every request is answered 200 `ok`, no connection breaks (each client keeps its one
/// connection throughout), and exactly 100 successful reloads are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_reloads_under_keepalive_load() {
    const CLIENTS: usize = 4;
    const RELOADS: usize = 100;
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("soak-reload");
    let path = dir.join("spillway.yaml");
    let a = config(app.local_addr(), nowhere, "", "5s");
    let b = config(app.local_addr(), nowhere, "", "4s");
    let (va, vb) = (version_of(&a), version_of(&b));
    assert_ne!(va, vb);
    std::fs::write(&path, &a).unwrap();
    let proxy = TestProxy::start_file(&path).await;

    let tally = Arc::new(LoadTally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(keepalive_client(proxy.addr, tally.clone(), stop.clone())))
        .collect();
    let wait_for_ok = |n: usize| {
        let tally = tally.clone();
        async move {
            let deadline = Instant::now() + STEP;
            while tally.ok.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for_ok(20).await;

    let mut intervals_with_traffic = 0;
    let mut last = &va;
    let started = Instant::now();
    for i in 0..RELOADS {
        let (text, expected) = if i % 2 == 0 { (&b, &vb) } else { (&a, &va) };
        std::fs::write(&path, text).unwrap();
        let before = tally.ok.load(Ordering::SeqCst);
        let reloader = proxy.server.reloader.clone();
        let outcome = tokio::task::spawn_blocking(move || reloader.reload())
            .await
            .unwrap();
        let r = outcome.unwrap_or_else(|e| panic!("reload {i} refused: {e}"));
        assert_eq!((&r.version, r.changed), (expected, true), "reload {i}");
        last = expected;
        tokio::time::sleep(Duration::from_millis(10)).await;
        if tally.ok.load(Ordering::SeqCst) > before {
            intervals_with_traffic += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "reloads are too slow to soak"
        );
    }
    let during = tally.ok.load(Ordering::SeqCst);
    wait_for_ok(during + 20).await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(
            tokio::time::timeout(STEP, c)
                .await
                .expect("client ends")
                .unwrap(),
        );
    }

    let ok = tally.ok.load(Ordering::SeqCst);
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert_eq!(tally.connection_errors.load(Ordering::SeqCst), 0);
    assert_eq!(tally.bad_status.load(Ordering::SeqCst), 0);
    assert_eq!(tally.bad_body.load(Ordering::SeqCst), 0);
    assert!(ok >= 200, "too little load to mean anything: {ok} requests");
    assert!(
        intervals_with_traffic >= RELOADS / 2,
        "the load must overlap the reloads: traffic in only {intervals_with_traffic} of {RELOADS} intervals"
    );
    assert_eq!(proxy.metric(SUCCESS).await, RELOADS as f64);
    assert_eq!(proxy.metric(FAILURE).await, 0.0);
    assert_eq!(proxy.metric(LAST_OK).await, 1.0);
    assert_eq!(
        &proxy.serving().await.0,
        last,
        "the last config written serves"
    );
    let report = proxy.server.stop_now(Duration::from_secs(2)).await;
    assert_eq!(report.cut_connections, 0);
}

/// An upstream that counts the requests it serves and streams each answer in two parts 20 ms
/// apart, so that a shutdown catches responses in the middle of their bodies.
struct CountingUpstream {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

const TWO_PART_BODY: &str = "first part, second part\n";

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingUpstream {
    async fn start() -> CountingUpstream {
        use http_body::Frame;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let task = common::spawn_http1(listener, move || {
            let count = count.clone();
            hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                count.fetch_add(1, Ordering::SeqCst);
                let parts = futures_util::stream::unfold(0u8, |step| async move {
                    let (first, second) = TWO_PART_BODY.split_at(12);
                    match step {
                        0 => Some((
                            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(first))),
                            1,
                        )),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Some((Ok(Frame::data(Bytes::from(second))), 2))
                        }
                        _ => None,
                    }
                });
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::StreamBody::new(parts),
                    ))
                }
            })
        });
        CountingUpstream { addr, served, task }
    }
}

/// How one request of the shutdown soak ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// 200 with the whole body.
    Complete,
    /// The connect failed (refused or reset): the listener is closed or closing.
    Refused,
    /// Connected, but the connection ended before any response byte.
    ClosedBeforeHead(String),
    /// A response head arrived but the body did not complete, or was wrong.
    BrokenResponse(String),
}

/// One request on a fresh connection.
async fn fresh_connection_get(addr: SocketAddr) -> Outcome {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if refused_at_connect(&e) => return Outcome::Refused,
        Err(e) => return Outcome::ClosedBeforeHead(format!("connect: {e}")),
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return Outcome::ClosedBeforeHead(format!("handshake: {e}")),
        };
    tokio::spawn(conn);
    let req = get_request(addr, "/");
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::ClosedBeforeHead(format!("send: {e:?}")),
    };
    if resp.status() != StatusCode::OK {
        return Outcome::BrokenResponse(format!("status {}", resp.status()));
    }
    match resp.into_body().collect().await.map(|b| b.to_bytes()) {
        Ok(b) if b.as_ref() == TWO_PART_BODY.as_bytes() => Outcome::Complete,
        Ok(b) => Outcome::BrokenResponse(format!("body {b:?}")),
        Err(e) => Outcome::BrokenResponse(format!("body: {e}")),
    }
}

/// How a client of the shutdown soaks ended.
#[derive(Debug, PartialEq, Eq)]
enum ClientEnd {
    /// A connect was refused: the listener is closed.
    Refused,
    /// Its load balancer took the proxy out of rotation (readiness failed).
    Unrouted,
    /// Ran out of time.
    Deadline,
}

/// What the clients of a shutdown soak saw.
#[derive(Default)]
struct ShutdownLoad {
    /// Requests answered 200 with the whole body.
    complete: AtomicUsize,
    /// Complete requests that began before `stopping` was set and ended after it.
    spanning: AtomicUsize,
    /// Set by the test just before it stops the server.
    stopping: AtomicBool,
    /// Cleared when the (simulated) load balancer stops routing to the proxy.
    unrouted: AtomicBool,
    /// Every other outcome, with whether it ended after `stopping` was set.
    failures: Mutex<Vec<(bool, Outcome)>>,
}

impl ShutdownLoad {
    /// Starts `clients` clients sending requests on fresh connections to `addr` until a
    /// connect is refused, the load is unrouted, or 20 s pass.
    fn start(
        self: &Arc<Self>,
        addr: SocketAddr,
        clients: usize,
    ) -> Vec<tokio::task::JoinHandle<ClientEnd>> {
        (0..clients)
            .map(|_| {
                let load = self.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        if load.unrouted.load(Ordering::SeqCst) {
                            return ClientEnd::Unrouted;
                        }
                        let began_before_stop = !load.stopping.load(Ordering::SeqCst);
                        let outcome = tokio::time::timeout(STEP, fresh_connection_get(addr))
                            .await
                            .unwrap_or(Outcome::BrokenResponse("no outcome within STEP".into()));
                        let ended_after_stop = load.stopping.load(Ordering::SeqCst);
                        match outcome {
                            Outcome::Complete => {
                                load.complete.fetch_add(1, Ordering::SeqCst);
                                if began_before_stop && ended_after_stop {
                                    load.spanning.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Outcome::Refused => return ClientEnd::Refused,
                            o => load.failures.lock().unwrap().push((ended_after_stop, o)),
                        }
                        if Instant::now() >= deadline {
                            return ClientEnd::Deadline;
                        }
                    }
                })
            })
            .collect()
    }

    /// Waits (bounded) until `n` requests completed.
    async fn wait_for_complete(&self, n: usize) {
        let deadline = Instant::now() + STEP;
        while self.complete.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            self.complete.load(Ordering::SeqCst) >= n,
            "the load did not get going"
        );
    }

    fn failures(&self) -> Vec<(bool, Outcome)> {
        std::mem::take(&mut *self.failures.lock().unwrap())
    }
}

/// Four clients send requests on fresh connections (each response streams its body over
/// 20 ms) and keep going until the listener refuses them, while the server is stopped with
/// `stop_now`: no response is broken (every response head is followed by its whole body),
/// every request the upstream served reached its client, and each client ends on a refused
/// connect.
///
/// A request whose connection was set up in the instant the listener closed can fail before
/// any response byte — its handshake completed in the kernel's accept queue, which closing the
/// listener resets, or it was accepted but not yet read when the graceful shutdown closed it.
/// Such a request never reached the upstream (checked by the served/complete counts) and is
/// safe to retry; it is allowed, at most once per client and only once the stop has begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_shutdown_under_load_loses_no_response() {
    const CLIENTS: usize = 4;
    let _serial = SERIAL.lock().await;
    let upstream = CountingUpstream::start().await;
    let proxy = TestProxy::start(&TestProxy::simple_config(upstream.addr, "")).await;
    let load = Arc::new(ShutdownLoad::default());
    let clients = load.start(proxy.addr, CLIENTS);
    load.wait_for_complete(100).await;

    load.stopping.store(true, Ordering::SeqCst);
    let report = tokio::time::timeout(STEP, proxy.server.stop_now(Duration::from_secs(5)))
        .await
        .expect("stop_now ends");
    assert_eq!(
        report.cut_connections, 0,
        "every in-flight request finishes well within the grace period"
    );
    for c in clients {
        let end = tokio::time::timeout(STEP, c)
            .await
            .expect("client ends")
            .unwrap();
        assert_eq!(
            end,
            ClientEnd::Refused,
            "every client ends on a refused connect"
        );
    }

    let failures = load.failures();
    let broken: Vec<_> = failures
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::BrokenResponse(_)))
        .collect();
    assert!(broken.is_empty(), "responses broken mid-way: {broken:?}");
    assert!(
        failures.iter().all(|(after_stop, _)| *after_stop),
        "failures before the stop: {failures:?}"
    );
    assert!(
        failures.len() <= CLIENTS,
        "more failures than clients racing the listener's close: {failures:?}"
    );
    let complete = load.complete.load(Ordering::SeqCst);
    assert_eq!(
        upstream.served.load(Ordering::SeqCst),
        complete,
        "every request the upstream served reached its client"
    );
    assert!(
        load.spanning.load(Ordering::SeqCst) >= 1,
        "no request was in flight across the stop: the test proved nothing"
    );
}

/// The same load, stopped the way an orchestrator does it: `shutdown()` with a drain delay,
/// and a load balancer that polls `/readyz` every 20 ms and stops sending new requests when it
/// fails. Nothing fails at all: the listener only closes once the balancer has moved away, and
/// the requests still in flight then finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_shutdown_with_drain_delay_fails_nothing() {
    const CLIENTS: usize = 4;
    let _serial = SERIAL.lock().await;
    let upstream = CountingUpstream::start().await;
    let proxy = TestProxy::start(&format!(
        "{}shutdown: {{ drain_delay: 300ms, drain_timeout: 5s }}\n",
        TestProxy::simple_config(upstream.addr, "")
    ))
    .await;
    let (addr, admin) = (proxy.addr, proxy.admin);
    let load = Arc::new(ShutdownLoad::default());
    let balancer = {
        let load = load.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let ready =
                    try_get(&format!("http://{admin}/readyz"), Duration::from_secs(1)).await;
                if ready.map(|r| r.status) == Ok(StatusCode::SERVICE_UNAVAILABLE) {
                    load.unrouted.store(true, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let clients = load.start(addr, CLIENTS);
    load.wait_for_complete(100).await;

    load.stopping.store(true, Ordering::SeqCst);
    let shutdown = tokio::spawn(proxy.server.shutdown());
    for c in clients {
        let end = tokio::time::timeout(STEP, c)
            .await
            .expect("client ends")
            .unwrap();
        assert_eq!(
            end,
            ClientEnd::Unrouted,
            "clients stop when the balancer does"
        );
    }
    balancer.await.unwrap();
    let report = tokio::time::timeout(STEP, shutdown)
        .await
        .expect("shutdown ends")
        .unwrap();
    assert_eq!(report.cut_connections, 0);
    let failures = load.failures();
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    let complete = load.complete.load(Ordering::SeqCst);
    assert_eq!(
        upstream.served.load(Ordering::SeqCst),
        complete,
        "every request the upstream served reached its client"
    );
    assert!(
        load.spanning.load(Ordering::SeqCst) >= 1,
        "no request was in flight across the stop: the test proved nothing"
    );
    let refused = TcpStream::connect(addr).await;
    assert!(
        refused.as_ref().is_err_and(refused_at_connect),
        "the listener is closed after shutdown: {refused:?}"
    );
}
