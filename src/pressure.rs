//! How short of memory spillway is: the level the memory watch sets (see
//! `server::memory`) and everything that sheds by it reads — the listeners, the HTTP/1.1
//! connections and the proxy service. One atomic, read on the request path with a load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Memory use is below the soft mark.
pub(crate) const OK: u8 = 0;
/// Above `limits.memory_soft`: no new connections, no keep-alive reuse, idle connections closed.
pub(crate) const SOFT: u8 = 1;
/// Above `limits.memory_hard`: new requests are refused too.
pub(crate) const HARD: u8 = 2;

/// The current memory-pressure level, shared by everything that sheds by it.
#[derive(Clone, Debug)]
pub(crate) struct Pressure(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    level: AtomicU8,
    changed: watch::Sender<u8>,
}

impl Default for Pressure {
    fn default() -> Self {
        Pressure(Arc::new(Inner {
            level: AtomicU8::new(OK),
            changed: watch::Sender::new(OK),
        }))
    }
}

impl Pressure {
    /// The current level: [`OK`], [`SOFT`] or [`HARD`].
    pub(crate) fn level(&self) -> u8 {
        self.0.level.load(Ordering::Relaxed)
    }

    /// At or above the soft mark.
    pub(crate) fn soft(&self) -> bool {
        self.level() >= SOFT
    }

    /// At or above the hard mark.
    pub(crate) fn hard(&self) -> bool {
        self.level() >= HARD
    }

    /// Sets the level; those who [`watch`](Self::watch) it hear of a change.
    pub(crate) fn set(&self, level: u8) {
        if self.0.level.swap(level, Ordering::Relaxed) != level {
            self.0.changed.send_replace(level);
        }
    }

    /// A receiver told of every change of level.
    pub(crate) fn watch(&self) -> watch::Receiver<u8> {
        self.0.changed.subscribe()
    }
}
