//! The real binary: `spillway check` on valid and invalid configs, `spillway schema`, and
//! `--version`.
//! (`spillway run` and its signal handling are covered elsewhere.)

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A config file under the temp dir with a name unique to this process and call; removed on
/// drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(tag: &str, text: &str) -> TempConfig {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "spillway-cli-{}-{tag}-{n}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn spillway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(args)
        // Neither the config nor the log filter may come from the environment of the test run.
        .env_remove("SPILLWAY_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs")
}

fn check(text: &str, tag: &str) -> (Output, String, String, TempConfig) {
    let file = TempConfig::new(tag, text);
    let out = spillway(&["check", "--config", file.0.to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    (out, stdout, stderr, file)
}

/// The error lines `check` printed (each indented by two spaces under the header line).
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .collect()
}

/// Asserts one printed error: `path: message... (line L, column C)`, message starting with
/// `message_start`, and perhaps a `; did you mean …?` after the location.
fn assert_error(line: &str, path: &str, message_start: &str, at: (usize, usize)) {
    let prefix = format!("{path}: {message_start}");
    let location = format!(" (line {}, column {})", at.0, at.1);
    assert!(
        line.starts_with(&prefix),
        "expected `{prefix}...`, got `{line}`"
    );
    let before_hint = line.split("; did you mean").next().unwrap_or(line);
    assert!(
        before_hint.ends_with(&location),
        "expected `...{location}`, got `{line}`"
    );
}

const VALID: &str = "\
server_id: cli-test
listeners:
  - name: http
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
upstreams:
  app:
    endpoints: [\"127.0.0.1:3000\"]
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: app
    timeout: 2s
  - name: all
    upstream: app
";

#[test]
fn check_accepts_a_valid_config_and_prints_the_summary() {
    let (out, stdout, stderr, _f) = check(VALID, "valid");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "server_id  cli-test", "{stdout}");
    assert!(
        lines[1].starts_with("version    ") && lines[1].len() == "version    ".len() + 12,
        "{stdout}"
    );
    assert_eq!(lines[2], "admin      127.0.0.1:0", "{stdout}");
    assert!(
        stdout.contains("\nlisteners\n  http  127.0.0.1:0  tls: no\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nroutes (first match wins)\n"), "{stdout}");
    assert!(
        stdout.contains("  [0] api  * /api *  -> app  timeout 2s\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  [1] all  * / *     -> app  timeout 30s\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nupstreams\n  app  127.0.0.1:3000  http1  connect 1s, idle 4s\n"),
        "{stdout}"
    );
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn check_rejects_an_unknown_key_with_its_path_and_line() {
    let text = VALID.replace(
        "    endpoints: [\"127.0.0.1:3000\"]\n",
        "    endpoints: [\"127.0.0.1:3000\"]\n    conect_timeout: 1s\n",
    );
    let (out, stdout, stderr, f) = check(&text, "unknown-key");
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with(&format!("{}: 1 error(s):\n", f.0.display())),
        "{stderr}"
    );
    let errors = error_lines(&stderr);
    assert_eq!(
        errors,
        ["upstreams.app.conect_timeout: unknown key (line 10, column 5); did you mean `connect_timeout`?"],
        "{stderr}"
    );
}

/// The example: four mistakes of four kinds, all reported by one run, in file order,
/// each with its path, line and column.
#[test]
fn check_reports_unknown_keys_types_references_and_values_in_one_run() {
    let text = "\
listeners:
  - name: http
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
defaults:
  timout: 5s
upstreams:
  app:
    endpoints: [\"127.0.0.1:3000\"]
    conect_timeout: 1s
routes:
  - name: api
    upstream: ap
    timeout: soon
";
    let (out, stdout, stderr, f) = check(text, "four-mistakes");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(
        stderr,
        format!(
            "{}: 4 error(s):
  defaults.timout: unknown key (line 7, column 3); did you mean `timeout`?
  upstreams.app.conect_timeout: unknown key (line 11, column 5); did you mean `connect_timeout`?
  routes[0].upstream: unknown upstream `ap` (line 14, column 15); did you mean `app`?
  routes[0].timeout: `soon` is not a duration: use a number and a unit, e.g. 250ms, 5s, 1m (line 15, column 14)
",
            f.0.display()
        )
    );
}

#[test]
fn check_rejects_an_unknown_upstream_with_its_path_and_line() {
    let text = VALID.replace(
        "  - name: all\n    upstream: app\n",
        "  - name: all\n    upstream: ap\n",
    );
    let (out, _, stderr, _f) = check(&text, "unknown-upstream");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_error(
        errors[0],
        "routes[1].upstream",
        "unknown upstream `ap`",
        (16, 15),
    );
    assert!(
        errors[0].contains("app"),
        "the message should name the defined upstreams: {}",
        errors[0]
    );
}

#[test]
fn check_rejects_a_bad_duration_with_its_path_and_line() {
    let text = VALID.replace("    timeout: 2s\n", "    timeout: 2 parsecs\n");
    let (out, _, stderr, _f) = check(&text, "bad-duration");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_error(
        errors[0],
        "routes[0].timeout",
        "`2 parsecs` is not a duration: use a number and a unit",
        (14, 14),
    );
}

#[test]
fn check_rejects_a_bad_address_with_its_path_and_line() {
    let text = VALID.replace(
        "    address: 127.0.0.1:0\n",
        "    address: localhost:80800\n",
    );
    let (out, _, stderr, _f) = check(&text, "bad-address");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_error(
        errors[0],
        "listeners[0].address",
        "invalid address `localhost:80800`",
        (4, 14),
    );
}

#[test]
fn check_reports_every_validation_error_at_once_in_file_order() {
    let text = VALID
        .replace("    address: 127.0.0.1:0\n", "    address: nowhere\n")
        .replace("    timeout: 2s\n", "    timeout: soon\n")
        .replace(
            "  - name: all\n    upstream: app\n",
            "  - name: all\n    upstream: ghost\n",
        );
    let (out, _, stderr, f) = check(&text, "several");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!("{}: 3 error(s):\n", f.0.display())),
        "{stderr}"
    );
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 3, "{stderr}");
    assert_error(
        errors[0],
        "listeners[0].address",
        "invalid address `nowhere`",
        (4, 14),
    );
    assert_error(
        errors[1],
        "routes[0].timeout",
        "`soon` is not a duration",
        (14, 14),
    );
    assert_error(
        errors[2],
        "routes[1].upstream",
        "unknown upstream `ghost`",
        (16, 15),
    );
}

#[test]
fn check_of_a_missing_file_exits_2() {
    let path =
        std::env::temp_dir().join(format!("spillway-cli-{}-missing.yaml", std::process::id()));
    let out = spillway(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn schema_prints_the_config_schema() {
    let out = spillway(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("spillway schema prints JSON");
    assert_eq!(printed, spillway::config::schema());
    assert_eq!(
        printed["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(printed["additionalProperties"], false);
    let timeout = &printed["$defs"]["PolicyFile"]["properties"]["timeout"];
    assert_eq!(timeout["default"], "30s", "{timeout}");
    assert!(
        timeout["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{timeout}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let out = spillway(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("spillway {}\n", env!("CARGO_PKG_VERSION"))
    );
}
