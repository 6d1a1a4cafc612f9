//! The certificates a config names, on both sides: every TLS listener's serving certificate
//! and every upstream's CA bundle and client certificate. Loaded at start (a config whose files
//! are broken does not start) and re-read whole on each reload, applied only when all of them
//! load.

use std::sync::Arc;

use super::client::{self, TlsClient, UpstreamTls};
use super::server::{ListenerTls, PreparedListener};
use crate::config::{ConfigError, ConfigErrors, Settings};
use crate::metrics::Metrics;

/// Every TLS listener's certificate state, kept for the life of the process (listeners are
/// bound once; a reload re-reads their files).
#[derive(Default)]
pub(crate) struct Certificates {
    listeners: Vec<Arc<ListenerTls>>,
}

impl Certificates {
    /// Loads every TLS listener's certificate and checks every upstream's TLS files, so that a
    /// config whose files are missing or broken does not start.
    pub(crate) fn load(
        settings: &Settings,
        metrics: &Metrics,
    ) -> Result<Certificates, ConfigErrors> {
        let mut errors = Vec::new();
        let mut listeners = Vec::new();
        for (i, l) in settings.listeners.iter().enumerate() {
            let Some(tls) = &l.tls else { continue };
            match ListenerTls::new(&l.name, tls, metrics) {
                Ok(t) => listeners.push(Arc::new(t)),
                Err(message) => errors.push(listener_error(i, message)),
            }
        }
        if let Err(e) = client::load_upstream_tls(settings) {
            errors.extend(e.0);
        }
        if errors.is_empty() {
            Ok(Certificates { listeners })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The TLS state of the listener named `name`, if it terminates TLS.
    pub(crate) fn listener(&self, name: &str) -> Option<Arc<ListenerTls>> {
        self.listeners.iter().find(|l| l.name() == name).cloned()
    }

    /// For a reload: re-reads every certificate, key and CA file the new `settings` name, and
    /// applies none of them. Any that fails refuses the reload (nothing changes).
    pub(crate) fn prepare(
        &self,
        settings: &Settings,
    ) -> Result<PreparedCertificates, ConfigErrors> {
        let mut errors = Vec::new();
        let mut listeners = Vec::new();
        for (i, l) in settings.listeners.iter().enumerate() {
            // Listener names and TLS on/off cannot change without a restart (checked before).
            let (Some(tls), Some(current)) = (&l.tls, self.listener(&l.name)) else {
                continue;
            };
            match current.prepare(tls) {
                Ok(p) => listeners.push((current, p)),
                Err(message) => errors.push(listener_error(i, message)),
            }
        }
        let upstreams = match client::load_upstream_tls(settings) {
            Ok(u) => u,
            Err(e) => {
                errors.extend(e.0);
                Vec::new()
            }
        };
        if errors.is_empty() {
            Ok(PreparedCertificates {
                listeners,
                upstreams,
            })
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

fn listener_error(i: usize, message: String) -> ConfigError {
    ConfigError::new(format!("listeners[{i}].tls"), message)
}

/// Certificates read for a reload and not applied yet.
pub(crate) struct PreparedCertificates {
    listeners: Vec<(Arc<ListenerTls>, PreparedListener)>,
    upstreams: Vec<(String, TlsClient)>,
}

impl PreparedCertificates {
    /// Applies them: listeners serve the new certificates to new connections, and each upstream
    /// that `upstream_tls` finds by name (those carried over a reload unchanged, with their
    /// pools, included) uses the new CA and client certificate for new connections.
    pub(crate) fn commit<'a>(self, upstream_tls: impl Fn(&str) -> Option<&'a UpstreamTls>) {
        for (listener, p) in self.listeners {
            listener.commit(p);
        }
        for (name, client) in self.upstreams {
            if let Some(tls) = upstream_tls(&name) {
                tls.set(client);
            }
        }
    }
}
