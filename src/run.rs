//! Serving until told to stop: the process's life from a loaded config to a drained exit,
//! shared by `spillway run` and `spillway demo`.

use std::process::ExitCode;

use crate::config::Loaded;
use crate::metrics::Metrics;
use crate::server::{ConfigSource, Server};

/// Exit code when spillway could not start (e.g. an address already in use).
pub(crate) const EXIT_START_FAILED: u8 = 1;
/// Exit code for a config that does not validate.
pub(crate) const EXIT_BAD_CONFIG: u8 = 2;

/// Runs `f` to completion on a new tokio runtime sized to the CPUs spillway may use.
pub(crate) fn block_on<F: std::future::Future<Output = ExitCode>>(f: F) -> ExitCode {
    // A sidecar is usually given one CPU. With one CPU to run on, the single-threaded
    // scheduler does the same work with less cross-thread bookkeeping than a one-worker
    // multi-threaded runtime; with more, requests are spread over a worker per CPU
    // (TOKIO_WORKER_THREADS overrides the count).
    let one_cpu = std::env::var_os("TOKIO_WORKER_THREADS").is_none()
        && std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let runtime = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match runtime {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("spillway: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// Serves until SIGTERM or SIGINT, then drains; a second signal exits at once. With a config
/// file in `source`, the file is watched and reloaded (also on SIGHUP and `POST /reload`). `started` is
/// told the bound addresses (used by `demo`).
pub(crate) async fn run(
    loaded: Loaded,
    source: ConfigSource,
    started: Option<tokio::sync::oneshot::Sender<Addrs>>,
) -> ExitCode {
    let mut signals = StopSignals::install();
    let from_file = source.path.is_some();
    let server = match Server::start_from(&loaded, Metrics::new(), source).await {
        Ok(s) => {
            if from_file {
                s.watch_file();
                s.reload_on_sighup();
            }
            s
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    // Type=notify: systemd counts the start as done (and starts what waits for it) now.
    let notifier = &server.state.notifier;
    if notifier.enabled() {
        tracing::info!("ready: telling the service manager (NOTIFY_SOCKET)");
    }
    notifier.ready(&format!(
        "serving config {}",
        server.state.runtime.load().version
    ));
    if let Some(tx) = started {
        let _ = tx.send(Addrs {
            listeners: server.listen_addrs.clone(),
            admin: server.admin_addr,
        });
    }
    let signal = signals.next().await;
    tracing::info!(signal, "shutting down");
    server.state.notifier.stopping("draining");
    let report = tokio::select! {
        r = server.shutdown() => r,
        s = signals.next() => {
            tracing::warn!(signal = s, "second signal: exiting at once");
            return ExitCode::SUCCESS;
        }
    };
    tracing::info!(cut = report.cut_connections, "stopped");
    ExitCode::SUCCESS
}

/// Where a started server listens.
#[derive(Debug, Clone)]
pub(crate) struct Addrs {
    /// Proxy listener addresses.
    pub listeners: Vec<std::net::SocketAddr>,
    /// Admin address.
    pub admin: Option<std::net::SocketAddr>,
}

/// The stop signals, listened to from before the server starts: a signal that arrives while it
/// is still starting is then a request to drain, not the default "terminate now".
struct StopSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    _hup: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            StopSignals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
                // Installed here only so an early SIGHUP cannot kill the process; the reload
                // listener is set up once the server runs.
                _hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    /// The next SIGTERM or SIGINT (Ctrl-C).
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    // No handler could be installed: only SIGKILL stops us; keep serving.
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = recv(&mut self.term) => "SIGTERM",
                _ = recv(&mut self.int) => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        }
    }
}
