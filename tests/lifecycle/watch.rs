//! File watch: in-place writes, atomic renames and the ConfigMap symlink swap are picked up
//! within the contract, a bad file is refused until fixed, and the watcher goes quiet.

use super::*;

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
///
/// With `busy_neighbour`, another file in the same directory is written every 50 ms
/// throughout (spillway's own log redirected next to its config does that): changes must still
/// be picked up within the contract.
async fn watch_picks_up(trigger: Trigger, busy_neighbour: bool) {
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
    let _neighbour = busy_neighbour.then(|| {
        let log = dir.join("spillway.log");
        AbortOnDrop(tokio::spawn(async move {
            for i in 0u64.. {
                let _ = std::fs::write(&log, format!("line {i}\n"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }))
    });
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

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_in_place_writes() {
    watch_picks_up(Trigger::InPlace, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_atomic_renames() {
    watch_picks_up(Trigger::Rename, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_a_configmap_symlink_swap() {
    watch_picks_up(Trigger::ConfigMap, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_in_place_writes_next_to_a_busy_log() {
    watch_picks_up(Trigger::InPlace, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_atomic_renames_next_to_a_busy_log() {
    watch_picks_up(Trigger::Rename, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_a_configmap_swap_next_to_a_busy_log() {
    watch_picks_up(Trigger::ConfigMap, true).await;
}

/// A change written after the file was read but before the server started is applied once
/// the watch runs: the watch is set up before the first read, and what serves is the hash of
/// the bytes actually loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_during_start_up_is_not_missed() {
    let _serial = SERIAL.lock().await;
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let dir = TempDir::new("startup-change");
    let a = config(app.local_addr(), nowhere, "", "5s");
    let b = config(app.local_addr(), nowhere, X_REFUSED, "4s");
    let path = dir.join("spillway.yaml");
    std::fs::write(&path, &a).unwrap();
    // What `spillway run` does: watch, then read and load.
    let watch = spillway::reload::FileWatch::start(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let loaded = config::load_str(&text).unwrap();
    // The change lands while the server is still starting.
    std::fs::write(&path, &b).unwrap();
    let source = spillway::server::ConfigSource {
        path: Some(path.clone()),
        env: config::Env::default(),
        loaded_hash: Some(config::file_hash(&text)),
        watch: Some(watch),
    };
    let server =
        spillway::server::Server::start_from(&loaded, spillway::metrics::Metrics::new(), source)
            .await
            .unwrap();
    let admin = server.admin_addr.unwrap();
    assert_eq!(serving(admin).await.0, version_of(&a), "A serves first");
    server.watch_file();
    let took = wait_for_version(admin, &version_of(&b), Instant::now()).await;
    assert!(
        took.is_some_and(|t| t <= PICKUP),
        "the change made during start-up was applied: {took:?}"
    );
    server.stop_now(Duration::from_secs(1)).await;
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
