//! A config error at start, where a container's log collector and `kubectl describe`
//! (`terminationMessagePolicy: FallbackToLogsOnError`) read it: with `--log-format json`, one
//! JSON object per error, with its field path, line and column; exit code 2.

use super::*;

#[test]
fn a_bad_config_at_start_is_logged_as_json() {
    let dir = TempDir::new("startup-json");
    let app: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let bad = TestProxy::simple_config(app, "    timeout: soon\n")
        .replace("upstream: app", "upstream: ap");
    let path = dir.write("spillway.yaml", &bad);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args([
            "--log-format",
            "json",
            "run",
            "--config",
            path.to_str().unwrap(),
        ])
        .env_remove("SPILLWAY_CONFIG")
        .env("RUST_LOG", "info")
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &serde_json::Value| v["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    let upstream = errors
        .iter()
        .find(|e| e["path"] == "routes[0].upstream")
        .unwrap_or_else(|| panic!("{stderr}"));
    let line = bad
        .lines()
        .position(|l| l.contains("upstream: ap"))
        .unwrap()
        + 1;
    assert_eq!(upstream["line"], line, "{upstream}");
    assert!(upstream["column"].is_u64(), "{upstream}");
    assert!(
        upstream["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid config: routes[0].upstream: "),
        "{upstream}"
    );
    assert!(
        errors.iter().any(|e| e["path"] == "routes[0].timeout"),
        "{stderr}"
    );
}
