//! The lifecycle contract: hot reload (file watch for in-place writes, atomic renames and
//! Kubernetes' ConfigMap symlink swap; SIGHUP; `POST /reload`), what a refused reload leaves
//! serving, reloads under load, and graceful shutdown (in-process and with the real binary on
//! SIGTERM).
//!
//! Tests here are serialized (see [`SERIAL`]): several measure timings and run sustained load,
//! and the machine they run on may have only two cores.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use spillway::config;
use spillway::demo_app::DemoApp;
use tokio::net::TcpStream;

/// One test at a time in this file: timing bounds and load figures mean little when the
/// tests compete for two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SUCCESS: &str = r#"spillway_config_reloads_total{result="success"}"#;
const FAILURE: &str = r#"spillway_config_reloads_total{result="failure"}"#;
const LAST_OK: &str = "spillway_config_last_reload_successful";

/// The contract: a change of the config file is serving within this long.
const PICKUP: Duration = Duration::from_secs(2);
/// How long a test polls for a pickup before giving up (longer than [`PICKUP`], so a slow
/// pickup is reported with its actual delay).
const PICKUP_POLL_BOUND: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A config with upstreams `app` (the demo app) and `nowhere` (refuses connections), the
/// `extra_routes` YAML (route items, indented by two spaces) before a catch-all route
/// `default` to `app` with the given timeout, then `shutdown` (top-level YAML, or empty).
/// Listener and admin on `listener`/`admin`.
fn config_at(
    listener: &str,
    admin: &str,
    app: SocketAddr,
    nowhere: SocketAddr,
    extra_routes: &str,
    timeout: &str,
    shutdown: &str,
) -> String {
    format!(
        "server_id: spillway-lifecycle\n\
         listeners:\n  - name: http\n    address: {listener}\n\
         admin:\n  address: {admin}\n\
         upstreams:\n  app:\n    endpoints: [\"{app}\"]\n    connect_timeout: 500ms\n\
         \x20 nowhere:\n    endpoints: [\"{nowhere}\"]\n    connect_timeout: 500ms\n\
         routes:\n{extra_routes}\
         \x20 - name: default\n    match: {{ path_prefix: / }}\n    upstream: app\n    timeout: {timeout}\n\
         {shutdown}"
    )
}

/// [`config_at`] on ephemeral loopback ports, without shutdown settings.
fn config(app: SocketAddr, nowhere: SocketAddr, extra_routes: &str, timeout: &str) -> String {
    config_at(
        "127.0.0.1:0",
        "127.0.0.1:0",
        app,
        nowhere,
        extra_routes,
        timeout,
        "",
    )
}

/// Route `x` (`/x`) to the refusing upstream: `GET /x` answers 502.
const X_REFUSED: &str = "  - name: x\n    match: { path_prefix: /x }\n    upstream: nowhere\n";
/// Route `x` (`/x`) in maintenance: `GET /x` answers 503.
const X_MAINTENANCE: &str =
    "  - name: x\n    match: { path_prefix: /x }\n    upstream: app\n    maintenance: { enabled: true }\n";

/// The version spillway reports for this config text.
fn version_of(text: &str) -> String {
    config::load_str(text)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
        .version
}

/// The admin calls of the reload tests.
impl TestProxy {
    /// `(version, loaded_at)` from `GET /config`.
    async fn serving(&self) -> (String, String) {
        serving(self.admin).await
    }

    /// `POST /reload`: the status and the JSON answer.
    async fn post_reload(&self) -> (StatusCode, serde_json::Value) {
        let r = send(
            Request::post(format!("http://{}/reload", self.admin))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        let json = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("reload answer not JSON ({e}): {}", r.text()));
        (r.status, json)
    }
}

/// `(version, loaded_at)` from `GET /config` on `admin`.
async fn serving(admin: SocketAddr) -> (String, String) {
    let r = get(&format!("http://{admin}/config")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("/config is JSON");
    (
        v["version"]
            .as_str()
            .expect("/config has a version")
            .to_string(),
        v["loaded_at"]
            .as_str()
            .expect("/config has loaded_at")
            .to_string(),
    )
}

/// Polls `/config` every 50 ms (bounded by [`PICKUP_POLL_BOUND`]) until `expected` serves;
/// returns how long that took, or `None`.
async fn wait_for_version(admin: SocketAddr, expected: &str, since: Instant) -> Option<Duration> {
    let deadline = since + PICKUP_POLL_BOUND;
    loop {
        if serving(admin).await.0 == expected {
            return Some(since.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts `loaded_at` is an RFC 3339 time within the window (second precision).
fn assert_loaded_between(
    loaded_at: &str,
    before: std::time::SystemTime,
    after: std::time::SystemTime,
) {
    let t = humantime::parse_rfc3339(loaded_at)
        .unwrap_or_else(|e| panic!("loaded_at `{loaded_at}`: {e}"));
    let slack = Duration::from_secs(1);
    assert!(
        t + slack >= before && t <= after + slack,
        "loaded_at {loaded_at} is not within the reload's window"
    );
}

/// The layout kubelet gives a mounted ConfigMap: `dir/spillway.yaml` → `..data/spillway.yaml`,
/// `..data` → a timestamped directory holding the real file.
struct ConfigMapDir {
    dir: PathBuf,
    current: PathBuf,
    generation: usize,
}

impl ConfigMapDir {
    fn create(dir: &Path, text: &str) -> ConfigMapDir {
        let ts = "..2026_11_23_10_00_00.1234";
        std::fs::create_dir(dir.join(ts)).unwrap();
        std::fs::write(dir.join(ts).join("spillway.yaml"), text).unwrap();
        std::os::unix::fs::symlink(ts, dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/spillway.yaml", dir.join("spillway.yaml")).unwrap();
        ConfigMapDir {
            dir: dir.to_path_buf(),
            current: dir.join(ts),
            generation: 0,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("spillway.yaml")
    }

    /// An update the way kubelet does it: new timestamped dir, `..data_tmp` symlink to it,
    /// rename over `..data`, remove the old dir.
    fn update(&mut self, text: &str) {
        self.generation += 1;
        let ts = format!(
            "..2026_11_23_10_0{}_00.{}",
            self.generation,
            5678 + self.generation
        );
        let new = self.dir.join(&ts);
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("spillway.yaml"), text).unwrap();
        std::os::unix::fs::symlink(&ts, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(&self.current).unwrap();
        self.current = new;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. File watch: in place, atomic rename, ConfigMap swap
// ---------------------------------------------------------------------------------------------

/// How a test changes the config file.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    InPlace,
    Rename,
    ConfigMap,
}

/// Starts from config A (`/x` goes to the catch-all, the demo app answers 404), then changes
/// the file twice with `trigger` — B (`/x` → refusing upstream: 502), then C (`/x` in
/// maintenance: 503) — and checks each change serves within [`PICKUP`]: `/config` shows the
/// new version and a fresh `loaded_at`, requests behave the new way, and each change counted
/// exactly one successful reload. Two changes, because a watch that breaks after the first
/// rename (a watch on the file's inode rather than its directory) passes a one-change test.
async fn watch_picks_up(trigger: Trigger) {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new(&format!("{trigger:?}").to_lowercase());
    let a = config(app.local_addr(), nowhere, "", "5s");
    let b = config(app.local_addr(), nowhere, X_REFUSED, "4s");
    let c = config(app.local_addr(), nowhere, X_MAINTENANCE, "3s");

    let mut configmap = None;
    let path = match trigger {
        Trigger::InPlace | Trigger::Rename => {
            let p = dir.join("spillway.yaml");
            std::fs::write(&p, &a).unwrap();
            p
        }
        Trigger::ConfigMap => {
            let cm = ConfigMapDir::create(dir.path(), &a);
            let p = cm.file();
            configmap = Some(cm);
            p
        }
    };
    let proxy = TestProxy::start_file(&path).await;
    proxy.server.watch_file();

    assert_eq!(proxy.serving().await.0, version_of(&a));
    let r = get(&proxy.url("/x")).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "config A sends /x to the app: {}",
        r.text()
    );
    assert_eq!(r.text(), "not found (demo app)\n");

    for (n, (next, expect_x)) in [
        (&b, StatusCode::BAD_GATEWAY),
        (&c, StatusCode::SERVICE_UNAVAILABLE),
    ]
    .into_iter()
    .enumerate()
    {
        // loaded_at has second precision: make the new one distinguishable from the old.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = std::time::SystemTime::now();
        let since = Instant::now();
        match trigger {
            Trigger::InPlace => std::fs::write(&path, next).unwrap(),
            Trigger::Rename => write_by_rename(&path, next),
            Trigger::ConfigMap => configmap.as_mut().unwrap().update(next),
        }
        let took = wait_for_version(proxy.admin, &version_of(next), since).await;
        let took = took.unwrap_or_else(|| {
            panic!(
                "{trigger:?} change {} not serving within {PICKUP_POLL_BOUND:?}",
                n + 1
            )
        });
        assert!(
            took <= PICKUP,
            "{trigger:?} change {} took {took:?} (contract: {PICKUP:?})",
            n + 1
        );
        let (_, loaded_at) = proxy.serving().await;
        assert_loaded_between(&loaded_at, before, std::time::SystemTime::now());

        let r = get(&proxy.url("/x")).await;
        assert_eq!(
            r.status,
            expect_x,
            "{trigger:?} change {}: /x: {}",
            n + 1,
            r.text()
        );
        let r = get(&proxy.url("/ok")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{trigger:?} change {}: /ok: {}",
            n + 1,
            r.text()
        );
        assert_eq!(
            proxy.metric(SUCCESS).await,
            (n + 1) as f64,
            "one successful reload per change"
        );
    }
    assert_eq!(proxy.metric(FAILURE).await, 0.0);
    assert_eq!(proxy.metric(LAST_OK).await, 1.0);
    proxy.server.stop_now(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_in_place_writes() {
    watch_picks_up(Trigger::InPlace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_atomic_renames() {
    watch_picks_up(Trigger::Rename).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_a_configmap_symlink_swap() {
    watch_picks_up(Trigger::ConfigMap).await;
}

/// A bad file written while watched changes nothing that serves and is counted as a failure;
/// fixing the file reloads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_refuses_a_bad_file_and_recovers() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("watch-bad");
    let path = dir.join("spillway.yaml");
    let a = config(app.local_addr(), nowhere, "", "5s");
    std::fs::write(&path, &a).unwrap();
    let proxy = TestProxy::start_file(&path).await;
    proxy.server.watch_file();

    // Refusing /x would be observable if anything of the bad file were applied.
    let bad = config(app.local_addr(), nowhere, X_REFUSED, "4s")
        .replace("    timeout: 4s\n", "    timeuot: 4s\n");
    write_by_rename(&path, &bad);
    let deadline = Instant::now() + PICKUP_POLL_BOUND;
    while proxy.metric(FAILURE).await < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        proxy.metric(FAILURE).await,
        1.0,
        "the bad file is counted as a failed reload"
    );
    assert_eq!(proxy.metric(LAST_OK).await, 0.0);
    assert_eq!(
        proxy.serving().await.0,
        version_of(&a),
        "the old config keeps serving"
    );
    let r = get(&proxy.url("/x")).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "nothing of the bad config applied: {}",
        r.text()
    );

    let b = config(app.local_addr(), nowhere, X_REFUSED, "4s");
    let since = Instant::now();
    write_by_rename(&path, &b);
    let took = wait_for_version(proxy.admin, &version_of(&b), since)
        .await
        .expect("the fixed file serves");
    assert!(took <= PICKUP, "took {took:?}");
    assert_eq!(get(&proxy.url("/x")).await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(proxy.metric(LAST_OK).await, 1.0);
    assert_eq!(proxy.metric(SUCCESS).await, 1.0);
    assert_eq!(proxy.metric(FAILURE).await, 1.0);
    proxy.server.stop_now(Duration::from_secs(1)).await;
}

/// Once a change has been picked up, the watcher must go quiet: it must not keep re-reading
/// the file when nothing changes. (Watching a directory also reports the watcher's own reads
/// of the file — inotify `IN_OPEN` — and reacting to those re-reads the file every debounce
/// period, forever.) Counted with a second watcher on the same directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_is_quiet_when_nothing_changes() {
    use notify::event::{AccessKind, EventKind};
    use notify::Watcher;

    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("quiet");
    let path = dir.join("spillway.yaml");
    let a = config(app.local_addr(), nowhere, "", "5s");
    let b = config(app.local_addr(), nowhere, X_REFUSED, "4s");
    std::fs::write(&path, &a).unwrap();
    let proxy = TestProxy::start_file(&path).await;
    proxy.server.watch_file();

    let opens = Arc::new(AtomicUsize::new(0));
    let counter = opens.clone();
    let mut spy = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if let Ok(e) = e {
            let ours = e
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == "spillway.yaml"));
            if ours && matches!(e.kind, EventKind::Access(AccessKind::Open(_))) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    spy.watch(dir.path(), notify::RecursiveMode::NonRecursive)
        .unwrap();

    let since = Instant::now();
    std::fs::write(&path, &b).unwrap();
    wait_for_version(proxy.admin, &version_of(&b), since)
        .await
        .expect("the change serves");
    // Let the burst and one debounce period pass, then watch a quiet period.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let at_start = opens.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reopened = opens.load(Ordering::SeqCst) - at_start;
    drop(spy);
    assert_eq!(
        reopened, 0,
        "spillway opened its unchanged config file {reopened} times in 1.5 s of quiet"
    );
    proxy.server.stop_now(Duration::from_secs(1)).await;
}

// ---------------------------------------------------------------------------------------------
// 2. POST /reload, refused reloads, snapshots
// ---------------------------------------------------------------------------------------------

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

    // An unknown key: 422 naming the path and line; nothing applied (the maintenance it
    // also asks for would answer /x with 503).
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
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("unknown field `timout`"))
        })
        .unwrap_or_else(|| panic!("no unknown-field error: {json}"));
    assert_eq!(e["path"], "routes[1]", "{json}");
    assert_eq!(e["line"], bad_line, "{json}");
    assert!(e["column"].is_u64(), "{json}");
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

// ---------------------------------------------------------------------------------------------
// 3. The real binary: SIGHUP, SIGTERM
// ---------------------------------------------------------------------------------------------

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
    let refused = loop {
        match TcpStream::connect(proxy).await {
            Err(e) if refused_at_connect(&e) => break signalled.elapsed(),
            Err(e) => panic!(
                "unexpected connect error: {e} ({:?}, {:?})",
                e.kind(),
                e.raw_os_error()
            ),
            Ok(_) => {}
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(3),
            "listener still accepting after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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

// ---------------------------------------------------------------------------------------------
// 4. Soak: reloads under load
// ---------------------------------------------------------------------------------------------

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
        let req = Request::get("/ok")
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
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
        let shared = proxy.server.shared.clone();
        let outcome = tokio::task::spawn_blocking(move || spillway::reload::reload(&shared))
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

// ---------------------------------------------------------------------------------------------
// 5. Shutdown in-process
// ---------------------------------------------------------------------------------------------

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

/// A connect that failed because the listener is closed or closing: refused, or reset while
/// the handshake was queued on the listener being closed.
fn refused_at_connect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
    )
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
    let req = Request::get("/")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
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

/// `GET path` with `addr` as its `Host`.
fn get_request(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

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
    let refused_at = loop {
        match TcpStream::connect(addr).await {
            Err(e) if refused_at_connect(&e) => break started.elapsed(),
            Err(e) => panic!(
                "unexpected connect error: {e} ({:?}, {:?})",
                e.kind(),
                e.raw_os_error()
            ),
            Ok(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still accepting after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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
