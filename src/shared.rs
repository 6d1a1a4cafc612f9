//! The state of a running spillway that the proxy listeners, the admin endpoint and reloads
//! all read: the serving snapshot, the metrics, readiness, the listeners' certificates and the
//! memory pressure.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::metrics::Metrics;
use crate::pressure::Pressure;
use crate::proxy::Runtime;
use crate::systemd::notify::Notifier;
use crate::tls::certificates::Certificates;
use crate::token::AdminToken;

/// What every part of a running process shares. Built once at start; only its parts change
/// (the runtime is swapped whole on reload, readiness flips when draining begins).
pub struct ProcessState {
    /// The serving snapshot; swapped whole on reload.
    pub runtime: Arc<ArcSwap<Runtime>>,
    /// The process's metrics.
    pub metrics: Metrics,
    /// False once draining has begun: `/readyz` answers 503.
    pub ready: AtomicBool,
    /// TLS listeners' certificates (re-read on reload and when their files change).
    pub(crate) certificates: Certificates,
    /// How short of memory spillway is.
    pub(crate) pressure: Pressure,
    /// The full admin endpoint's bearer token (`admin.token_file`), re-read on every reload.
    pub(crate) admin_token: ArcSwapOption<AdminToken>,
    /// The service manager's notify socket (`Type=notify`), when there is one.
    pub(crate) notifier: Notifier,
}
