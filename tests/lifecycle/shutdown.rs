//! Shutdown in-process: every listener drains at once, idle and busy connections are treated
//! as the drain delay and timeout say, and `stop_now` cuts what outlasts its grace period.

use super::*;

/// A keep-alive connection to `addr` that has served one `GET /ok` and is now idle, and a task
/// that ends (with the time) when the proxy closes it.
async fn idle_keep_alive(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Instant>,
) {
    let (mut idle, idle_conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        TokioIo::new(TcpStream::connect(addr).await.unwrap()),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(async move {
        let _ = idle_conn.await;
        Instant::now()
    });
    let r = idle.send_request(get_request(addr, "/ok")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.into_body().collect().await.unwrap();
    (idle, closed)
}

/// With two listeners, stopping tells every listener's connections to drain at once: an idle
/// keep-alive connection on one is closed while a slow request on the other still runs (one
/// listener after the other, it would go on taking requests until that request ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_every_listeners_connections_at_once() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    // A second listener, listed first: its connections are the ones a one-by-one drain
    // would wait for.
    let yaml = config(app.local_addr(), nowhere, "", "10s").replace(
        "listeners:\n",
        "listeners:\n  - name: other\n    address: 127.0.0.1:0\n",
    );
    let proxy = TestProxy::start(&yaml).await;
    let (busy_addr, idle_addr) = (proxy.server.listen_addrs[0], proxy.server.listen_addrs[1]);
    let (_idle, idle_closed) = idle_keep_alive(idle_addr).await;
    let slow = tokio::spawn(async move {
        let r = try_get(
            &format!("http://{busy_addr}/slow?ms=1500"),
            Duration::from_secs(5),
        )
        .await;
        (r, Instant::now())
    });
    assert_eq!(
        metric_settles(proxy.admin, &in_flight_series("default"), 1.0).await,
        1.0
    );

    let started = Instant::now();
    let stop = tokio::spawn(proxy.server.stop_now(Duration::from_secs(5)));
    let idle_closed_at = tokio::time::timeout(STEP, idle_closed)
        .await
        .expect("idle connection closed")
        .unwrap();
    assert!(
        idle_closed_at.duration_since(started) < Duration::from_millis(800),
        "the other listener's idle connection was closed only after {:?}",
        idle_closed_at.duration_since(started)
    );
    assert!(
        !slow.is_finished(),
        "the slow request should still be running"
    );
    let (r, done_at) = tokio::time::timeout(STEP, slow).await.unwrap().unwrap();
    assert_eq!(
        r.expect("the slow request completes").status,
        StatusCode::OK
    );
    assert!(done_at.duration_since(started) >= Duration::from_millis(800));
    let report = tokio::time::timeout(STEP, stop).await.unwrap().unwrap();
    assert_eq!(report.cut_connections, 0);
}

/// `shutdown()` in-process: readiness fails at once; for `drain_delay` new connections and
/// idle keep-alive ones are still served; then new connections are refused, the idle
/// keep-alive connection is closed, and the busy one finishes its request (200, full body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_idle_and_busy_connections() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let yaml = config_at(
        "127.0.0.1:0",
        "127.0.0.1:0",
        app.local_addr(),
        nowhere,
        "",
        "10s",
        "shutdown: { drain_delay: 400ms, drain_timeout: 5s }\n",
    );
    let proxy = TestProxy::start(&yaml).await;
    let (addr, admin) = (proxy.addr, proxy.admin);

    // An idle keep-alive connection (one request done), watched for its close.
    let (mut idle, idle_closed) = idle_keep_alive(addr).await;
    let req = move |path: &str| get_request(addr, path);

    // A busy one.
    let (mut busy, busy_conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        TokioIo::new(TcpStream::connect(addr).await.unwrap()),
    )
    .await
    .unwrap();
    tokio::spawn(busy_conn);
    let slow = tokio::spawn(async move {
        let r = busy
            .send_request(req("/slow?ms=1200"))
            .await
            .map_err(|e| format!("{e}"))?;
        let headers = r.headers().clone();
        let status = r.status();
        let body = r
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{e}"))?
            .to_bytes();
        Ok::<_, String>((status, headers, body, Instant::now()))
    });
    assert_eq!(
        metric_settles(admin, &in_flight_series("default"), 1.0).await,
        1.0
    );

    let started = Instant::now();
    let shutdown = tokio::spawn(proxy.server.shutdown());
    let r = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness fails at once"
    );
    // Still served during drain_delay: a new connection, and the idle keep-alive one.
    let r = try_get(&format!("http://{addr}/ok"), Duration::from_secs(1))
        .await
        .expect("served during drain_delay");
    assert_eq!(r.status, StatusCode::OK);
    let r = idle
        .send_request(req("/ok"))
        .await
        .expect("the keep-alive connection still serves during drain_delay");
    assert_eq!(r.status(), StatusCode::OK);
    r.into_body().collect().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "checks ran too late to mean anything"
    );

    // After drain_delay: refused, and the idle connection closed, while the slow one runs.
    let refused_at = wait_until_refused(addr, started).await;
    assert!(
        refused_at >= Duration::from_millis(380),
        "stopped accepting after {refused_at:?}, before drain_delay"
    );
    let idle_closed_at = tokio::time::timeout(STEP, idle_closed)
        .await
        .expect("idle connection closed")
        .unwrap();
    assert!(
        idle_closed_at.duration_since(started) < Duration::from_millis(1000),
        "the idle keep-alive connection was closed only after {:?}",
        idle_closed_at.duration_since(started)
    );
    assert!(
        !slow.is_finished(),
        "the slow request should still be running"
    );

    let (status, _headers, body, done_at) = tokio::time::timeout(STEP, slow)
        .await
        .unwrap()
        .unwrap()
        .expect("busy request completes");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), b"slept 1200 ms\n");
    let report = tokio::time::timeout(STEP, shutdown)
        .await
        .expect("shutdown ends")
        .unwrap();
    assert_eq!(report.cut_connections, 0);
    assert!(
        done_at.elapsed() < Duration::from_secs(1),
        "shutdown returned long after the last request ended"
    );
}

/// `stop_now(grace)` with a request that outlasts `grace`: the report counts it as cut, and it
/// is cut — its client sees the connection end soon after, not a response seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_now_cuts_what_outlasts_the_grace_period() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let proxy = TestProxy::start(&TestProxy::simple_config(
        app.local_addr(),
        "    timeout: 30s\n",
    ))
    .await;
    let url = proxy.url("/slow?ms=4000");
    let slow = tokio::spawn(async move {
        let r = try_get(&url, STEP).await;
        (r, Instant::now())
    });
    assert_eq!(
        metric_settles(proxy.admin, &in_flight_series("default"), 1.0).await,
        1.0
    );
    let started = Instant::now();
    let report = tokio::time::timeout(STEP, proxy.server.stop_now(Duration::from_millis(300)))
        .await
        .expect("stop_now ends");
    let stopped = started.elapsed();
    assert!(
        stopped < Duration::from_secs(1),
        "stop_now took {stopped:?} with a 300 ms grace period"
    );
    assert_eq!(
        report.cut_connections, 1,
        "the slow request's connection is reported cut"
    );
    let (r, at) = tokio::time::timeout(STEP, slow).await.unwrap().unwrap();
    assert!(
        at.duration_since(started) < Duration::from_secs(2),
        "the cut request ended {:?} after stop_now began ({r:?}): the connection was not cut",
        at.duration_since(started)
    );
    assert!(
        r.is_err(),
        "a cut request cannot have a complete response: {r:?}"
    );
}
