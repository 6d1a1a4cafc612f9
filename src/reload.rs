//! Hot reload: read → expand → parse → validate → build the whole new runtime → one atomic
//! swap. Triggered by a change of the config file (watched through its directory, which also
//! catches atomic renames and Kubernetes' ConfigMap `..data` symlink swap), by SIGHUP, and by
//! `POST /reload` on the admin endpoint.
//!
//! A bad config changes nothing that serves. Requests in flight keep the snapshot they started
//! with; limiter and breaker state of routes whose policy is unchanged carries over.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, ConfigErrors, Env, Settings};
use crate::proxy::Runtime;
use crate::shared::ProcessState;
use crate::tls::certificates::PreparedCertificates;

/// Quiet time after the last file event before reloading: editors and `kubectl` write in
/// bursts (truncate, write, rename, chmod), and one reload per burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// A change is applied at most this long after its first event, however busy the file keeps
/// being: a writer that never pauses must not postpone the reload forever.
const DEBOUNCE_CEILING: Duration = Duration::from_secs(1);

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Version now serving.
    pub version: String,
    /// False when the file's content was identical to what was serving.
    pub changed: bool,
}

/// A refused reload: when, and why. The last one is kept (also after a later reload succeeds)
/// for `/config` and `/status.json`, so that the reason is still there when someone looks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadFailure {
    /// When it was refused (RFC 3339, UTC).
    pub at: String,
    /// Each error as the log and `spillway check` write it: `path: message (line L, column
    /// C); hint`.
    pub lines: Vec<String>,
    /// The same errors, field by field (as `POST /reload` answers them).
    pub errors: Vec<ConfigError>,
}

impl ReloadFailure {
    fn new(errors: &ConfigErrors, at: std::time::SystemTime) -> ReloadFailure {
        ReloadFailure {
            at: humantime::format_rfc3339_seconds(at).to_string(),
            lines: errors.0.iter().map(ToString::to_string).collect(),
            errors: errors.0.clone(),
        }
    }
}

/// Reloads a running process's config from its file: the one way a new config is applied,
/// whatever triggered it.
pub struct Reloader {
    state: Arc<ProcessState>,
    /// The config file, when spillway was started from one (else nothing can be reloaded).
    path: Option<PathBuf>,
    /// Variables the file may use beyond the process environment (the demo's app address).
    env: Env,
    /// Serializes reloads.
    lock: Mutex<()>,
    /// Hash of the config file's bytes at the last watch-triggered attempt (or at start).
    last_seen_file: Mutex<Option<u64>>,
    /// The last refused reload, if any.
    last_failure: Mutex<Option<ReloadFailure>>,
}

impl Reloader {
    /// A reloader for `state`, reading `path` with `env`. `serving` is the hash of the file
    /// bytes the serving config was loaded from ([`config::file_hash`]).
    pub fn new(
        state: Arc<ProcessState>,
        path: Option<PathBuf>,
        env: Env,
        serving: Option<u64>,
    ) -> Arc<Reloader> {
        Arc::new(Reloader {
            state,
            path,
            env,
            lock: Mutex::new(()),
            last_seen_file: Mutex::new(serving),
            last_failure: Mutex::new(None),
        })
    }

    /// The last refused reload since start, if any (kept after later successful ones).
    pub fn last_failure(&self) -> Option<ReloadFailure> {
        self.last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config file, when there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reloads the config file now. Serialized: concurrent triggers run one after another.
    pub fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let Some(path) = self.path.as_deref() else {
            return Err(single(
                "spillway was started without a config file; nothing to reload",
            ));
        };
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let notifier = &self.state.notifier;
        notifier.reloading();
        let result = config::read_file(path).and_then(|text| self.apply(path, &text));
        // Serving again, the new config or the old one.
        let serving = self.state.runtime.load().version.clone();
        notifier.ready(&match &result {
            Ok(_) => format!("serving config {serving}"),
            Err(_) => format!("serving config {serving}; the last reload was refused"),
        });
        let metrics = &self.state.metrics;
        match &result {
            Ok(r) => {
                metrics.reload(true);
                metrics.config_loaded(&r.version, std::time::SystemTime::now());
                if r.changed {
                    tracing::info!(version = %r.version, "config reloaded");
                }
            }
            Err(errors) => {
                metrics.reload(false);
                for e in &errors.0 {
                    tracing::error!(path = %path.display(), "config reload refused: {e}");
                }
                *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(ReloadFailure::new(errors, std::time::SystemTime::now()));
            }
        }
        result
    }

    /// Validates `text` and, when it is good, swaps the whole runtime it describes in.
    fn apply(&self, path: &Path, text: &str) -> Result<Reloaded, ConfigErrors> {
        let state = &self.state;
        let loaded = config::load_str_with(text, &self.env)?;
        for w in &loaded.warnings {
            tracing::warn!("{}: {w}", path.display());
        }
        let current = state.runtime.load_full();
        restart_needed(&current.settings, &loaded.settings)?;
        let certificates = reread_certificates(state, &loaded.settings)?;
        // The admin token is re-read on every reload too; one that cannot be read refuses it.
        let token = crate::token::load(&loaded.settings)?;
        state.admin_token.store(token.map(Arc::new));
        if loaded.version == current.version {
            commit(certificates, &current);
            return Ok(Reloaded {
                version: loaded.version,
                changed: false,
            });
        }
        let next = Arc::new(Runtime::build(&loaded, &state.metrics, Some(&current)));
        state.runtime.store(next.clone());
        commit(certificates, &next);
        Ok(Reloaded {
            version: loaded.version,
            changed: true,
        })
    }
}

/// Applies certificates read for a reload: listeners', and those of the upstreams `runtime`
/// serves with (including upstreams carried over unchanged, with their pools).
fn commit(certificates: PreparedCertificates, runtime: &Runtime) {
    certificates.commit(|name| runtime.upstreams.get(name).and_then(|u| u.tls()));
}

/// Certificates, keys and CA bundles are re-read on every reload, also when the config text is
/// unchanged (replace the files, then SIGHUP). All are read before anything is applied: one
/// that does not load refuses the reload whole, and the previous ones keep serving.
fn reread_certificates(
    state: &ProcessState,
    settings: &Settings,
) -> Result<PreparedCertificates, ConfigErrors> {
    state.certificates.prepare(settings)
}

/// Listener and admin addresses are bound once at start; changing them needs a restart, and a
/// reload that asks for it is refused whole rather than half-applied.
fn restart_needed(old: &Settings, new: &Settings) -> Result<(), ConfigErrors> {
    let addrs = |s: &Settings| {
        s.listeners
            .iter()
            .map(|l| (l.name.clone(), l.address, l.tls.is_some()))
            .collect::<Vec<_>>()
    };
    let mut errors = Vec::new();
    if addrs(old) != addrs(new) {
        errors.push(ConfigError::new(
            "listeners",
            "listeners changed (names, addresses or TLS on/off): a restart is needed; nothing was applied",
        ));
    }
    if old.admin != new.admin {
        errors.push(ConfigError::new(
            "admin.address",
            "the admin address changed: a restart is needed; nothing was applied",
        ));
    }
    if old.admin_metrics != new.admin_metrics {
        errors.push(ConfigError::new(
            "admin.metrics_address",
            "the metrics address changed: a restart is needed; nothing was applied",
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

fn single(message: &str) -> ConfigErrors {
    ConfigErrors(vec![ConfigError::new("", message)])
}

/// A watch on the config file, set up before the file is first read so that a change made
/// while spillway starts is not missed: its events wait until [`spawn_watcher`] takes them.
///
/// The file's directory is watched (which also sees atomic renames onto the file and
/// Kubernetes' ConfigMap swap), but only events that can concern the file count: its own name,
/// and the first link of the path it resolves through (`..data` in a ConfigMap volume). Other
/// files in the directory — a log written beside the config several times a second — are
/// ignored, so they can neither trigger reloads nor keep postponing one.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    events: tokio::sync::mpsc::Receiver<()>,
}

impl FileWatch {
    /// Starts watching `path`'s directory for changes that concern `path`.
    pub fn start(path: &Path) -> notify::Result<FileWatch> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let names = relevant_names(path);
        let (tx, events) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // Reads (ours included: every reload opens the file) are not changes; reacting
                // to them would re-read the file forever.
                if matches!(event.kind, notify::EventKind::Access(_)) {
                    return;
                }
                let concerns_us = event.paths.iter().any(|p| {
                    p.file_name()
                        .is_some_and(|n| names.iter().any(|name| name.as_os_str() == n))
                });
                if concerns_us {
                    // A full channel already means "something changed": the extra can go.
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(FileWatch {
            _watcher: watcher,
            events,
        })
    }
}

/// The names in the config's directory whose events concern it: the file's own name, and the
/// first component of the link it is (`spillway.yaml -> ..data/spillway.yaml` in a ConfigMap
/// volume: `..data`, which kubelet swaps).
fn relevant_names(path: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = path.file_name().map(Into::into).into_iter().collect();
    if let Ok(target) = std::fs::read_link(path) {
        if target.is_relative() {
            if let Some(std::path::Component::Normal(first)) = target.components().next() {
                if Some(first) != path.file_name() {
                    names.push(first.to_owned());
                }
            }
        }
    }
    names
}

/// Reloads when the config file changes, from the events of `watch` (made with
/// [`FileWatch::start`] before the file was read, or now).
pub fn spawn_watcher(
    reloader: Arc<Reloader>,
    watch: Option<FileWatch>,
    stop: CancellationToken,
) -> notify::Result<()> {
    let Some(path) = reloader.path.clone() else {
        return Ok(());
    };
    let watch = match watch {
        Some(w) => w,
        None => FileWatch::start(&path)?,
    };
    tokio::spawn(async move {
        // The whole watch moves in (its watcher stops when dropped), not only its events.
        let FileWatch {
            _watcher: _alive,
            mut events,
        } = watch;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = events.recv() => if got.is_none() { return },
            }
            // Debounce: wait until the burst is over, but never longer than the ceiling.
            let ceiling = tokio::time::Instant::now() + DEBOUNCE_CEILING;
            loop {
                let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(ceiling);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(quiet) => break,
                    more = events.recv() => if more.is_none() { return },
                }
            }
            let reloader = reloader.clone();
            // Reading and building is blocking work; keep it off the request threads' queue.
            let _ = tokio::task::spawn_blocking(move || reloader.reload_if_changed()).await;
        }
    });
    Ok(())
}

impl Reloader {
    /// A file event fired: reload if the file's bytes changed since the last attempt. Events
    /// for other files in the directory read the same bytes and do nothing.
    fn reload_if_changed(&self) {
        let Some(path) = self.path.as_deref() else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            // Mid-swap or deleted: count it only if it stays that way (the next event retries).
            if !path.exists() {
                tracing::warn!(path = %path.display(), "config file is missing; still serving the previous config");
            }
            return;
        };
        // Only a change of the file's bytes since the last attempt (good or bad) is worth a
        // reload.
        let hash = config::file_hash(&text);
        {
            let mut last = self
                .last_seen_file
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *last == Some(hash) {
                return;
            }
            *last = Some(hash);
        }
        let _ = self.reload();
    }
}

/// Reloads on every SIGHUP until `stop`.
#[cfg(unix)]
pub fn spawn_sighup(reloader: Arc<Reloader>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; reload with POST /reload instead");
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading config");
            let reloader = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
        }
    });
}

/// No SIGHUP outside unix.
#[cfg(not(unix))]
pub fn spawn_sighup(_reloader: Arc<Reloader>, _stop: CancellationToken) {}
