//! A refused reload says why where an operator looks: `/config` and `/status.json` keep its
//! error lines (also after a later reload succeeds), and the config info metrics name the
//! version serving, for drift across replicas.

use super::*;

/// A one-route config whose route `timeout` is `timeout`.
fn config(app: SocketAddr, timeout: &str) -> String {
    format!(
        "{}    timeout: {timeout}\n",
        TestProxy::simple_config(app, "")
    )
}

async fn json(url: &str) -> serde_json::Value {
    let r = get(url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{url}: not JSON ({e})"))
}

async fn post_reload(admin: SocketAddr) -> StatusCode {
    send(req(Method::POST, &format!("http://{admin}/reload"), ""))
        .await
        .status
}

fn info_series(version: &str) -> String {
    format!(r#"spillway_config_info{{version="{version}"}}"#)
}

#[tokio::test]
async fn a_refused_reload_keeps_its_error_lines_on_config_and_status() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = TempDir::new("reload-errors");
    let path = dir.write("spillway.yaml", &config(app.local_addr(), "5s"));
    let p = TestProxy::start_file(&path).await;
    let admin = p.admin;
    let first = json(&format!("http://{admin}/config")).await;
    let v1 = first["version"].as_str().unwrap().to_owned();
    assert_eq!(first["last_reload_error"], serde_json::Value::Null);
    let m = p.metrics().await;
    assert_eq!(metric_value(&m, &info_series(&v1)), 1.0, "{m}");
    let started = metric_value(&m, "spillway_config_last_reload_timestamp_seconds");
    assert!(started > 1.6e9, "a Unix time: {started}");

    // Two mistakes: both lines are kept, in file order, with their place in the file.
    let bad = config(app.local_addr(), "soon").replace("upstream: app", "upstream: nope");
    std::fs::write(&path, &bad).unwrap();
    assert_eq!(post_reload(admin).await, StatusCode::UNPROCESSABLE_ENTITY);
    let expected: Vec<String> = spillway::config::load_str(&bad)
        .expect_err("the bad config is refused")
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(expected.len(), 2, "{expected:?}");
    assert!(
        expected.iter().all(|l| l.contains("(line ")),
        "{expected:?}"
    );
    let config_view = json(&format!("http://{admin}/config")).await;
    let kept = &config_view["last_reload_error"];
    assert_eq!(kept["lines"], serde_json::json!(expected), "{config_view}");
    assert_eq!(kept["errors"][0]["path"], "routes[0].upstream", "{kept}");
    assert!(kept["at"].as_str().unwrap().ends_with('Z'), "{kept}");
    assert_eq!(config_view["version"], v1.as_str(), "the old config serves");
    let status = json(&format!("http://{admin}/status.json")).await;
    assert_eq!(status["reload"]["last_successful"], false);
    assert_eq!(
        status["reload"]["last_error"]["lines"],
        serde_json::json!(expected)
    );
    // The metrics still name the version serving.
    assert_eq!(p.metric(&info_series(&v1)).await, 1.0);

    // A good reload: a new version serves, the last refusal is still there to read.
    std::fs::write(&path, config(app.local_addr(), "4s")).unwrap();
    assert_eq!(post_reload(admin).await, StatusCode::OK);
    let now = json(&format!("http://{admin}/config")).await;
    let v2 = now["version"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    assert_eq!(
        now["last_reload_error"]["lines"],
        serde_json::json!(expected)
    );
    let status = json(&format!("http://{admin}/status.json")).await;
    assert_eq!(status["reload"]["last_successful"], true);
    assert_eq!(status["reload"]["failures"], 1);
    let m = p.metrics().await;
    assert_eq!(metric_value(&m, &info_series(&v2)), 1.0, "{m}");
    assert!(
        !m.contains(&info_series(&v1)),
        "only the version serving: {m}"
    );
    assert!(metric_value(&m, "spillway_config_last_reload_timestamp_seconds") >= started);
}
