//! Listeners, connections and the one shutdown path.
//!
//! [`Server::start`] binds every listener and the admin endpoint and serves until
//! [`Server::shutdown`]: readiness fails at once, traffic is still served for `drain_delay`
//! (so endpoints can propagate), then listeners stop accepting, idle keep-alive connections are
//! closed, busy ones finish their in-flight request (HTTP/1 gets `Connection: close`, HTTP/2
//! GOAWAY) and whatever is left after `drain_timeout` is cut.

mod drain;
mod listener;
mod timer;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::Loaded;
use crate::metrics::Metrics;
use crate::proxy::Runtime;
use crate::reload;

/// State shared by the proxy listeners and the admin endpoint.
pub struct Shared {
    /// The serving snapshot; swapped whole on reload.
    pub runtime: Arc<ArcSwap<Runtime>>,
    /// The process's metrics.
    pub metrics: Metrics,
    /// False once draining has begun: `/readyz` answers 503.
    pub ready: AtomicBool,
    /// The config file, when spillway was started from one (enables reloads).
    pub config_path: Option<PathBuf>,
    /// Serializes reloads.
    pub reload_lock: Mutex<()>,
    /// Hash of the config file's bytes at the last watch-triggered attempt.
    pub last_seen_file: Mutex<Option<u64>>,
    /// TLS listeners' certificates (re-read on reload and when their files change).
    pub certificates: tls::Certificates,
}

/// A running spillway: its bound addresses and the handle to stop it.
pub struct Server {
    /// Shared state (runtime snapshot, metrics, readiness).
    pub shared: Arc<Shared>,
    /// Bound proxy listener addresses, in config order.
    pub listen_addrs: Vec<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: Option<SocketAddr>,
    stop_accepting: CancellationToken,
    tasks: Vec<JoinHandle<drain::Connections>>,
    admin_task: Option<JoinHandle<()>>,
    admin_stop: CancellationToken,
    background: CancellationToken,
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
        Self::start_inner(loaded, metrics, None).await
    }

    /// Starts serving the config loaded from `path`; `POST /reload` re-reads it. Add
    /// [`Server::watch_file`] and [`Server::reload_on_sighup`] for the other triggers.
    pub async fn start_with_file(
        path: &Path,
        loaded: &Loaded,
        metrics: Metrics,
    ) -> std::io::Result<Server> {
        Self::start_inner(loaded, metrics, Some(path.to_path_buf())).await
    }

    /// Reloads when the config file changes (in place, by rename, or by a ConfigMap swap).
    pub fn watch_file(&self) {
        let Some(path) = self.shared.config_path.clone() else {
            return;
        };
        if let Err(e) = reload::spawn_watcher(self.shared.clone(), path, self.background.clone()) {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
        }
    }

    /// Reloads on SIGHUP.
    pub fn reload_on_sighup(&self) {
        reload::spawn_sighup(self.shared.clone(), self.background.clone());
    }

    async fn start_inner(
        loaded: &Loaded,
        metrics: Metrics,
        config_path: Option<PathBuf>,
    ) -> std::io::Result<Server> {
        // Certificate, key and CA files are read first: a config whose files are broken does
        // not start.
        let certificates = tls::Certificates::load(&loaded.settings, &metrics)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let runtime = Runtime::build(loaded, &metrics, None);
        let last_seen_file = config_path
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| reload::file_hash(&t));
        let shared = Arc::new(Shared {
            runtime: Arc::new(ArcSwap::from_pointee(runtime)),
            metrics,
            ready: AtomicBool::new(true),
            config_path,
            reload_lock: Mutex::new(()),
            last_seen_file: Mutex::new(last_seen_file),
            certificates,
        });
        let stop_accepting = CancellationToken::new();
        let mut listen_addrs = Vec::new();
        let mut tasks = Vec::new();
        for l in &loaded.settings.listeners {
            let bound = listener::bind(l.address).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("listener {} on {}: {e}", l.name, l.address),
                )
            })?;
            let addr = bound.local_addr()?;
            listen_addrs.push(addr);
            tracing::info!(listener = %l.name, %addr, "listening");
            tasks.push(tokio::spawn(listener::serve(
                bound,
                l.name.clone(),
                shared.runtime.clone(),
                shared.certificates.listener(&l.name),
                stop_accepting.clone(),
            )));
        }
        let admin_stop = CancellationToken::new();
        let (admin_addr, admin_task) = match loaded.settings.admin {
            Some(addr) => {
                let bound = listener::bind(addr)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("admin on {addr}: {e}")))?;
                let addr = bound.local_addr()?;
                tracing::info!(%addr, "admin listening");
                let task = tokio::spawn(admin::serve(bound, shared.clone(), admin_stop.clone()));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        Ok(Server {
            shared,
            listen_addrs,
            admin_addr,
            stop_accepting,
            tasks,
            admin_task,
            admin_stop,
            background: CancellationToken::new(),
        })
    }

    /// Drains and stops: readiness off, `drain_delay` of normal serving, then stop accepting
    /// and give in-flight requests up to `drain_timeout`.
    pub async fn shutdown(self) -> ShutdownReport {
        let shutdown = self.shared.runtime.load().settings.shutdown.clone();
        self.shared.ready.store(false, Ordering::SeqCst);
        tracing::info!(drain_delay = ?shutdown.drain_delay, "draining: readiness now fails");
        tokio::time::sleep(shutdown.drain_delay).await;
        self.stop_now(shutdown.drain_timeout).await
    }

    /// Stops accepting at once and gives in-flight requests up to `grace`.
    pub async fn stop_now(self, grace: std::time::Duration) -> ShutdownReport {
        self.shared.ready.store(false, Ordering::SeqCst);
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
        if let Some(t) = self.admin_task {
            let _ = t.await;
        }
        ShutdownReport {
            cut_connections: cut,
        }
    }
}
