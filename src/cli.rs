//! The command line: `run`, `check`, `schema`, `demo`, `--version`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Env, Loaded};
use crate::metrics::Metrics;
use crate::run::{block_on, run, EXIT_BAD_CONFIG};
use crate::server::ConfigSource;
use crate::tls::certificates::Certificates;

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
    /// Print the JSON Schema (draft 2020-12) of the config file, for editors and validators
    /// (e.g. `spillway schema > spillway.schema.json`).
    Schema,
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
        Command::Run { config } => {
            // Watching starts before the first read: a change made while spillway starts is
            // then seen as a change, not lost between the read and the watch.
            let watch = crate::reload::FileWatch::start(&config)
                .map_err(|e| tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload"))
                .ok();
            match load(&config, cli.log_format) {
                Ok((loaded, hash)) => {
                    let source = ConfigSource {
                        path: Some(config),
                        env: Env::default(),
                        loaded_hash: Some(hash),
                        watch,
                    };
                    block_on(run(loaded, source, None))
                }
                Err(code) => code,
            }
        }
        Command::Schema => print_schema(),
        Command::Demo { config } => block_on(crate::demo::run(&config, DEMO_CONFIG_EMBEDDED)),
    }
}

/// `spillway schema`: the schema on stdout. A closed pipe (`| head`) is a failure, not a panic.
fn print_schema() -> ExitCode {
    use std::io::Write;
    let text = serde_json::to_string_pretty(&config::schema()).unwrap_or_default();
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
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
    crate::proxy::access_log::install(writer.clone(), format == LogFormat::Json);
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

/// Loads a config, printing every error on failure; also returns the hash of the bytes it was
/// loaded from, so a change made after this read is not mistaken for what is serving. With
/// `--log-format json` the errors are log lines like any other (one JSON object each, with
/// the field path, line and column as fields), so a collector reading the container's log,
/// or `kubectl describe` through `FallbackToLogsOnError`, gets them whole.
fn load(path: &Path, format: LogFormat) -> Result<(Loaded, u64), ExitCode> {
    let loaded = config::read_file(path)
        .and_then(|text| config::load_str(&text).map(|l| (l, config::file_hash(&text))));
    match loaded {
        Ok((loaded, hash)) => {
            for w in &loaded.warnings {
                tracing::warn!("{}: {w}", path.display());
            }
            Ok((loaded, hash))
        }
        Err(errors) if format == LogFormat::Json => {
            for e in &errors.0 {
                tracing::error!(
                    config = %path.display(),
                    path = %e.path,
                    line = e.line,
                    column = e.column,
                    hint = e.hint.as_deref(),
                    "invalid config: {e}"
                );
            }
            Err(ExitCode::from(EXIT_BAD_CONFIG))
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
    // The files a config names (certificates, keys, CA bundles, the admin token) are read too:
    // `run` would refuse to start without them, so `check` must not say the config is fine.
    let checked = config::load_file(path)
        .and_then(|loaded| Certificates::load(&loaded.settings, &Metrics::new()).map(|_| loaded))
        .and_then(|loaded| crate::token::load(&loaded.settings).map(|_| loaded));
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
