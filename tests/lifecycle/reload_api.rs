//! `POST /reload`: good configs applied, bad ones refused whole (with what a refusal leaves
//! serving), and requests in flight finishing under the snapshot they started with.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_applies_good_configs_and_refuses_bad_ones_whole() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("post");
    let path = dir.join("spillway.yaml");
    let a = config(app.local_addr(), nowhere, "", "5s");
    std::fs::write(&path, &a).unwrap();
    let proxy = TestProxy::start_file(&path).await;
    // No watcher: every reload below is the POST's doing.
    assert_eq!(proxy.metric(SUCCESS).await, 0.0);
    assert_eq!(proxy.metric(LAST_OK).await, 1.0);
    assert_eq!(get(&proxy.url("/x")).await.status, StatusCode::NOT_FOUND);

    // A good change: 200 with the new version, applied.
    let b = config(app.local_addr(), nowhere, X_REFUSED, "4s");
    std::fs::write(&path, &b).unwrap();
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["version"], version_of(&b).as_str(), "{json}");
    assert_eq!(json["changed"], true, "{json}");
    assert_eq!(proxy.serving().await.0, version_of(&b));
    assert_eq!(get(&proxy.url("/x")).await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(proxy.metric(SUCCESS).await, 1.0);

    // The same file again: 200, unchanged, still a success.
    let loaded_at = proxy.serving().await.1;
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["version"], version_of(&b).as_str(), "{json}");
    assert_eq!(json["changed"], false, "{json}");
    assert_eq!(
        proxy.serving().await.1,
        loaded_at,
        "an unchanged reload builds nothing"
    );
    assert_eq!(proxy.metric(SUCCESS).await, 2.0);

    // An unknown key: 422 naming the key, its line and the key meant; nothing applied (the
    // maintenance it also asks for would answer /x with 503).
    let bad = config(app.local_addr(), nowhere, X_MAINTENANCE, "3s")
        .replace("    timeout: 3s\n", "    timout: 3s\n");
    let bad_line = bad.lines().position(|l| l.contains("timout")).unwrap() + 1;
    std::fs::write(&path, &bad).unwrap();
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    let errors = json["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors list: {json}"));
    let e = errors
        .iter()
        .find(|e| e["message"] == "unknown key" && e["hint"] == "did you mean `timeout`?")
        .unwrap_or_else(|| panic!("no unknown-key error: {json}"));
    assert_eq!(e["path"], "routes[1].timout", "{json}");
    assert_eq!(e["line"], bad_line, "{json}");
    assert_eq!(e["column"], 5, "{json}");
    // Every error, in the order and words `spillway check` gives them.
    let checked = spillway::config::load_str(&bad).expect_err("the bad config is refused");
    let as_checked: Vec<serde_json::Value> = checked
        .0
        .iter()
        .map(|e| serde_json::json!({"path": e.path, "message": e.message, "line": e.line, "column": e.column, "hint": e.hint}))
        .collect();
    assert_eq!(errors, &as_checked, "{json}");
    assert_eq!(
        proxy.serving().await.0,
        version_of(&b),
        "the old config keeps serving"
    );
    assert_eq!(get(&proxy.url("/x")).await.status, StatusCode::BAD_GATEWAY);
    let ok = get(&proxy.url("/ok")).await;
    assert_eq!((ok.status, ok.text().as_str()), (StatusCode::OK, "ok\n"));
    assert_eq!(proxy.metric(FAILURE).await, 1.0);
    assert_eq!(proxy.metric(LAST_OK).await, 0.0);
    assert_eq!(proxy.metric(SUCCESS).await, 2.0);

    // A good reload puts the gauge back.
    let c = config(app.local_addr(), nowhere, X_MAINTENANCE, "3s");
    std::fs::write(&path, &c).unwrap();
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["version"], version_of(&c).as_str());
    assert_eq!(proxy.metric(LAST_OK).await, 1.0);
    assert_eq!(proxy.metric(SUCCESS).await, 3.0);
    assert_eq!(
        get(&proxy.url("/x")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // A listener address change needs a restart: refused whole (the route change that comes
    // with it — /x back to the app — is not applied either).
    let other = refusing_addr().await;
    let moved = config_at(
        &other.to_string(),
        "127.0.0.1:0",
        app.local_addr(),
        nowhere,
        "",
        "5s",
        "",
    );
    std::fs::write(&path, &moved).unwrap();
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    let e = &json["errors"][0];
    assert_eq!(e["path"], "listeners", "{json}");
    assert!(
        e["message"].as_str().unwrap_or("").contains("restart"),
        "{json}"
    );
    assert_eq!(proxy.serving().await.0, version_of(&c), "nothing applied");
    assert_eq!(
        get(&proxy.url("/x")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(proxy.metric(FAILURE).await, 2.0);
    assert_eq!(proxy.metric(LAST_OK).await, 0.0);

    // So does an admin address change.
    let moved = config_at(
        "127.0.0.1:0",
        &other.to_string(),
        app.local_addr(),
        nowhere,
        "",
        "5s",
        "",
    );
    std::fs::write(&path, &moved).unwrap();
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    assert_eq!(json["errors"][0]["path"], "admin.address", "{json}");
    assert!(
        json["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("restart"),
        "{json}"
    );
    assert_eq!(proxy.serving().await.0, version_of(&c), "nothing applied");
    assert_eq!(
        get(&proxy.url("/x")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(proxy.metric(FAILURE).await, 3.0);

    // The listener still takes new connections on the address it was bound to.
    let r = get(&proxy.url("/ok")).await;
    assert_eq!(r.status, StatusCode::OK);

    // Back to a good file: gauge 1, success counted.
    std::fs::write(&path, &a).unwrap();
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["changed"], true);
    assert_eq!(proxy.metric(LAST_OK).await, 1.0);
    assert_eq!(proxy.metric(SUCCESS).await, 4.0);
    assert_eq!(get(&proxy.url("/x")).await.status, StatusCode::NOT_FOUND);
    proxy.server.stop_now(Duration::from_secs(1)).await;
}

/// A request finishes under the snapshot it started with: a slow request in flight when the
/// route's timeout is cut below its duration (and when the route goes into maintenance) still
/// gets its 200; the same request sent after the reload gets the new config's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_under_their_snapshot() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("snapshot");
    let path = dir.join("spillway.yaml");
    std::fs::write(&path, config(app.local_addr(), nowhere, "", "5s")).unwrap();
    let proxy = TestProxy::start_file(&path).await;

    let url = proxy.url("/slow?ms=1000");
    let slow = tokio::spawn(async move { try_get(&url, STEP).await });
    assert_eq!(
        metric_settles(proxy.admin, &in_flight_series("default"), 1.0).await,
        1.0,
        "the slow request is in flight"
    );

    // The catch-all now times out after 200 ms.
    let short = config(app.local_addr(), nowhere, "", "200ms");
    std::fs::write(&path, &short).unwrap();
    let (status, json) = proxy.post_reload().await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(proxy.serving().await.0, version_of(&short));
    let r = get(&proxy.url("/slow?ms=1000")).await;
    assert_eq!(
        r.status,
        StatusCode::GATEWAY_TIMEOUT,
        "a new request gets the new timeout: {}",
        r.text()
    );

    let r = slow
        .await
        .unwrap()
        .expect("the request in flight during the reload is answered");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "slept 1000 ms\n");

    // Same with maintenance switched on under an in-flight request.
    std::fs::write(&path, config(app.local_addr(), nowhere, "", "5s")).unwrap();
    assert_eq!(proxy.post_reload().await.0, StatusCode::OK);
    let url = proxy.url("/slow?ms=1000");
    let slow = tokio::spawn(async move { try_get(&url, STEP).await });
    assert_eq!(
        metric_settles(proxy.admin, &in_flight_series("default"), 1.0).await,
        1.0
    );
    let maint = config(app.local_addr(), nowhere, "", "5s").replace(
        "    timeout: 5s\n",
        "    timeout: 5s\n    maintenance: { enabled: true }\n",
    );
    std::fs::write(&path, &maint).unwrap();
    assert_eq!(proxy.post_reload().await.0, StatusCode::OK);
    assert_eq!(
        get(&proxy.url("/ok")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let r = slow.await.unwrap().expect("answered");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "slept 1000 ms\n");
    proxy.server.stop_now(Duration::from_secs(1)).await;
}
