//! Listeners, connections and the one shutdown path.
//!
//! [`Server::start`] binds every listener and the admin endpoint and serves until
//! [`Server::shutdown`]: readiness fails at once, traffic is still served for `drain_delay`
//! (so endpoints can propagate), then listeners stop accepting, idle keep-alive connections are
//! closed, busy ones finish their in-flight request (HTTP/1 gets `Connection: close`, HTTP/2
//! GOAWAY) and whatever is left after `drain_timeout` is cut.

mod drain;
mod fd_limit;
mod listener;
mod memory;
mod timer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::{Env, Loaded};
use crate::metrics::Metrics;
use crate::pressure::Pressure;
use crate::proxy::Runtime;
use crate::reload::{self, Reloader};
use crate::shared::ProcessState;
use crate::tls::certificates::Certificates;

/// Where the serving config came from, for reloads.
#[derive(Default)]
pub struct ConfigSource {
    /// The config file (`None`: the config did not come from a file and cannot be reloaded).
    pub path: Option<PathBuf>,
    /// Variables the file may use beyond the process environment.
    pub env: Env,
    /// Hash of the file bytes the serving config was loaded from ([`crate::config::file_hash`]).
    pub loaded_hash: Option<u64>,
    /// A watch on the file started before it was read, so that no change made during start-up
    /// is missed (see [`Server::watch_file`]).
    pub watch: Option<reload::FileWatch>,
}

impl ConfigSource {
    /// The file at `path`, read from the process environment; the bytes it was loaded from are
    /// not known, so the first change event re-reads it.
    pub fn file(path: &std::path::Path) -> ConfigSource {
        ConfigSource {
            path: Some(path.to_path_buf()),
            ..ConfigSource::default()
        }
    }
}

/// A running spillway: its bound addresses and the handle to stop it.
pub struct Server {
    /// State shared by the listeners and the admin endpoint (runtime snapshot, metrics,
    /// readiness, certificates).
    pub state: Arc<ProcessState>,
    /// Applies a new config from the file (on a file change, SIGHUP or `POST /reload`).
    pub reloader: Arc<Reloader>,
    /// The watch started before the config was first read, until [`Server::watch_file`].
    early_watch: std::sync::Mutex<Option<reload::FileWatch>>,
    /// Bound proxy listener addresses, in config order.
    pub listen_addrs: Vec<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: Option<SocketAddr>,
    /// Bound metrics address (`admin.metrics_address`).
    pub metrics_addr: Option<SocketAddr>,
    stop_accepting: CancellationToken,
    tasks: Vec<JoinHandle<drain::Connections>>,
    admin_tasks: Vec<JoinHandle<()>>,
    admin_stop: CancellationToken,
    background: CancellationToken,
}

/// The listening socket for `name` at `addr`: the one systemd passed for it, else bound now.
fn open(
    inherited: &mut crate::systemd::sockets::Inherited,
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let Some(socket) = inherited.remove(name) else {
        return listener::bind(addr);
    };
    let socket = tokio::net::TcpListener::from_std(socket)?;
    let actual = socket.local_addr()?;
    if addr.port() != 0 && actual != addr {
        tracing::warn!(%name, configured = %addr, %actual, "the socket from systemd is not on the configured address; serving it");
    } else {
        tracing::info!(%name, %actual, "serving the socket passed by systemd");
    }
    Ok(socket)
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still busy when `drain_timeout` ran out, and cut.
    pub cut_connections: usize,
}

impl Server {
    /// Binds every listener and the admin endpoint and starts serving a config that did not
    /// come from a file (no reloads).
    pub async fn start(loaded: &Loaded, metrics: Metrics) -> std::io::Result<Server> {
        Self::start_from(loaded, metrics, ConfigSource::default()).await
    }

    /// Starts serving the config loaded from `path`; `POST /reload` re-reads it.
    pub async fn start_with_file(
        path: &std::path::Path,
        loaded: &Loaded,
        metrics: Metrics,
    ) -> std::io::Result<Server> {
        Self::start_from(loaded, metrics, ConfigSource::file(path)).await
    }

    /// Starts serving `loaded`, which came from `source`; `POST /reload` re-reads its file. Add
    /// [`Server::watch_file`] and [`Server::reload_on_sighup`] for the other triggers.
    pub async fn start_from(
        loaded: &Loaded,
        metrics: Metrics,
        source: ConfigSource,
    ) -> std::io::Result<Server> {
        // Certificate, key and CA files are read first: a config whose files are broken does
        // not start.
        let certificates = Certificates::load(&loaded.settings, &metrics)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let admin_token = crate::token::load(&loaded.settings)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let runtime = Runtime::build(loaded, &metrics, None);
        metrics.config_loaded(&runtime.version, runtime.loaded_at);
        let state = Arc::new(ProcessState {
            runtime: Arc::new(ArcSwap::from_pointee(runtime)),
            metrics,
            ready: AtomicBool::new(true),
            certificates,
            pressure: Pressure::default(),
            admin_token: arc_swap::ArcSwapOption::new(admin_token.map(Arc::new)),
            notifier: crate::systemd::notify::Notifier::from_env(),
        });
        let background = CancellationToken::new();
        memory::spawn(
            state.runtime.clone(),
            state.pressure.clone(),
            memory::MemoryGauges {
                pressure: state.metrics.memory_pressure.clone(),
                limit_bytes: state.metrics.memory_limit_bytes.clone(),
                resident_bytes: state.metrics.memory_resident_bytes.clone(),
            },
            background.clone(),
        );
        let reloader = Reloader::new(state.clone(), source.path, source.env, source.loaded_hash);
        let early_watch = std::sync::Mutex::new(source.watch);
        let nofile = fd_limit::raise();
        tracing::info!(
            open_files = nofile,
            "open-file limit (soft limit raised to the hard one)"
        );
        let stop_accepting = CancellationToken::new();
        // Sockets systemd passed in (socket activation) serve instead of binding.
        let settings = &loaded.settings;
        let wanted: Vec<String> = settings
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .chain(settings.admin.map(|_| admin::Scope::Full.name().to_owned()))
            .chain(
                settings
                    .admin_metrics
                    .map(|_| admin::Scope::Metrics.name().to_owned()),
            )
            .collect();
        let mut inherited = crate::systemd::sockets::take(&wanted)?;
        let mut listen_addrs = Vec::new();
        let mut tasks = Vec::new();
        for l in &loaded.settings.listeners {
            let bound = open(&mut inherited, &l.name, l.address).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("listener {} on {}: {e}", l.name, l.address),
                )
            })?;
            let addr = bound.local_addr()?;
            listen_addrs.push(addr);
            let cap = fd_limit::connection_cap(
                l.max_connections,
                loaded.settings.listeners.len(),
                nofile,
            );
            if cap < l.max_connections {
                tracing::warn!(listener = %l.name, max_connections = l.max_connections, cap, open_files = nofile, "max_connections lowered to fit the open-file limit");
            }
            tracing::info!(listener = %l.name, %addr, max_connections = cap, "listening");
            tasks.push(tokio::spawn(listener::serve(
                bound,
                listener::Listener {
                    settings: l.clone(),
                    cap,
                    runtime: state.runtime.clone(),
                    tls: state.certificates.listener(&l.name),
                    metrics: state.metrics.listener(&l.name),
                    pressure: state.pressure.clone(),
                },
                stop_accepting.clone(),
            )));
        }
        let admin_stop = CancellationToken::new();
        // Admin connections are timed like the (first) listener's.
        let header_timeout = loaded
            .settings
            .listeners
            .first()
            .map_or(crate::config::DEFAULT_HEADER_TIMEOUT, |l| l.header_timeout);
        let mut admin_tasks = Vec::new();
        let mut bound_admin = |addr: Option<SocketAddr>, scope: admin::Scope| match addr {
            Some(addr) => {
                let what = scope.name();
                let bound = open(&mut inherited, what, addr)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{what} on {addr}: {e}")))?;
                let addr = bound.local_addr()?;
                tracing::info!(%addr, "{what} listening");
                admin_tasks.push(tokio::spawn(admin::serve(
                    bound,
                    scope,
                    state.clone(),
                    reloader.clone(),
                    header_timeout,
                    admin_stop.clone(),
                )));
                std::io::Result::Ok(Some(addr))
            }
            None => Ok(None),
        };
        let admin_addr = bound_admin(loaded.settings.admin, admin::Scope::Full)?;
        let metrics_addr = bound_admin(loaded.settings.admin_metrics, admin::Scope::Metrics)?;
        Ok(Server {
            state,
            reloader,
            early_watch,
            listen_addrs,
            admin_addr,
            metrics_addr,
            stop_accepting,
            tasks,
            admin_tasks,
            admin_stop,
            background,
        })
    }

    /// Reloads when the config file changes (in place, by rename, or by a ConfigMap swap),
    /// from the watch the [`ConfigSource`] brought (so a change made while starting is
    /// applied now) or from a new one.
    pub fn watch_file(&self) {
        let early = self
            .early_watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Err(e) = reload::spawn_watcher(self.reloader.clone(), early, self.background.clone())
        {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
        }
    }

    /// Reloads on SIGHUP.
    pub fn reload_on_sighup(&self) {
        reload::spawn_sighup(self.reloader.clone(), self.background.clone());
    }

    /// Drains and stops: readiness off, `drain_delay` of normal serving, then stop accepting
    /// and give in-flight requests up to `drain_timeout`.
    pub async fn shutdown(self) -> ShutdownReport {
        let shutdown = self.state.runtime.load().settings.shutdown.clone();
        self.state.ready.store(false, Ordering::SeqCst);
        tracing::info!(drain_delay = ?shutdown.drain_delay, "draining: readiness now fails");
        tokio::time::sleep(shutdown.drain_delay).await;
        self.stop_now(shutdown.drain_timeout).await
    }

    /// Stops accepting at once and gives in-flight requests up to `grace`.
    pub async fn stop_now(self, grace: std::time::Duration) -> ShutdownReport {
        self.state.ready.store(false, Ordering::SeqCst);
        self.background.cancel();
        self.stop_accepting.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let mut listeners = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            if let Ok(connections) = t.await {
                listeners.push(connections);
            }
        }
        // Every listener's connections are told to drain at once: one after another, a second
        // listener's idle connections would go on taking requests until the first listener's
        // busy ones finished, and those requests could then be cut at the deadline.
        let cut: usize = futures_util::future::join_all(
            listeners
                .into_iter()
                .map(|connections| connections.finish(deadline)),
        )
        .await
        .into_iter()
        .sum();
        if cut > 0 {
            tracing::warn!(cut, "drain timeout passed: cut connections still in flight");
        } else {
            tracing::info!("drained: all in-flight requests finished");
        }
        self.admin_stop.cancel();
        for t in self.admin_tasks {
            let _ = t.await;
        }
        ShutdownReport {
            cut_connections: cut,
        }
    }
}
