//! The command line: `run`, `check`, `demo`, `--version`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Loaded};
use crate::metrics::Metrics;
use crate::server::Server;

/// Exit code for a config that does not validate.
const EXIT_BAD_CONFIG: u8 = 2;
/// Exit code when spillway could not start (e.g. an address already in use).
const EXIT_START_FAILED: u8 = 1;
/// Where `run` and `check` look when neither `--config` nor `$SPILLWAY_CONFIG` is given.
const DEFAULT_CONFIG: &str = "config/spillway.yaml";
/// The config `demo` uses; embedded too, so the demo also runs outside the source tree.
const DEMO_CONFIG: &str = "config/demo.yaml";
const DEMO_CONFIG_EMBEDDED: &str = include_str!("../config/demo.yaml");

/// spillway: a reverse-proxy sidecar that observes and sheds load.
#[derive(Debug, Parser)]
#[command(name = "spillway", version, about)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. `info,spillway::access=off`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve traffic.
    Run {
        /// Config file.
        #[arg(long, env = "SPILLWAY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file and print a summary (exit 2 with every error if it is invalid).
    Check {
        /// Config file.
        #[arg(long, env = "SPILLWAY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run a built-in sample app with spillway in front of it, to try things out.
    Demo {
        /// Demo config; the sample app's address is passed to it as `${SPILLWAY_DEMO_APP}`.
        /// When the file does not exist, a built-in copy of config/demo.yaml is used.
        #[arg(long, default_value = DEMO_CONFIG)]
        config: PathBuf,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => match load(&config) {
            Ok(loaded) => block_on(run(loaded, Some(config), None)),
            Err(code) => code,
        },
        Command::Demo { config } => block_on(crate::demo::run(&config, DEMO_CONFIG_EMBEDDED)),
    }
}

fn block_on<F: std::future::Future<Output = ExitCode>>(f: F) -> ExitCode {
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

fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    // Logging must never stall the request path: lines go through a background writer.
    // The writer thread drains whatever lines are queued into one buffer and flushes when the
    // queue is empty: one write per burst instead of one per line under load, and nothing
    // waits in the buffer once things are quiet.
    let (writer, guard) = tracing_appender::non_blocking(std::io::BufWriter::with_capacity(
        64 * 1024,
        std::io::stderr(),
    ));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(Rfc3339Micros)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

/// Log timestamps as RFC 3339 UTC with microseconds, the format tracing-subscriber uses by
/// default, formatted by humantime into one buffer: the default formatter's seven padded
/// integer formats cost about as much as the rest of an access-log line's fields.
struct Rfc3339Micros;

impl tracing_subscriber::fmt::time::FormatTime for Rfc3339Micros {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(
            w,
            "{}",
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
        )
    }
}

/// Loads a config, printing every error on failure.
fn load(path: &Path) -> Result<Loaded, ExitCode> {
    match config::load_file(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                tracing::warn!("{}: {w}", path.display());
            }
            Ok(loaded)
        }
        Err(errors) => {
            eprintln!("{}: invalid config:", path.display());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            Err(ExitCode::from(EXIT_BAD_CONFIG))
        }
    }
}

fn check(path: &Path) -> ExitCode {
    // The files a config names (certificates, keys, CA bundles) are read too: `run` would
    // refuse to start without them, so `check` must not say the config is fine.
    let checked = config::load_file(path).and_then(|loaded| {
        crate::server::tls::Certificates::load(&loaded.settings, &Metrics::new()).map(|_| loaded)
    });
    match checked {
        Ok(loaded) => {
            print!("{}", config::summary(&loaded));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {} error(s):", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// Serves until SIGTERM or SIGINT, then drains; a second signal exits at once. With a config
/// `path`, the file is watched and reloaded (also on SIGHUP and `POST /reload`). `started` is
/// told the bound addresses (used by `demo`).
pub async fn run(
    loaded: Loaded,
    path: Option<PathBuf>,
    started: Option<tokio::sync::oneshot::Sender<Addrs>>,
) -> ExitCode {
    let mut signals = StopSignals::install();
    let started_server = match &path {
        Some(p) => Server::start_with_file(p, &loaded, Metrics::new()).await,
        None => Server::start(&loaded, Metrics::new()).await,
    };
    let server = match started_server {
        Ok(s) => {
            if path.is_some() {
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
    if let Some(tx) = started {
        let _ = tx.send(Addrs {
            listeners: server.listen_addrs.clone(),
            admin: server.admin_addr,
        });
    }
    let signal = signals.next().await;
    tracing::info!(signal, "shutting down");
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
pub struct Addrs {
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
