//! TLS termination on proxy listeners, with certificates that can be replaced while serving.
//!
//! Each TLS listener has one [`ListenerTls`]: a rustls server config whose certificate resolver
//! holds the current [`CertifiedKey`] in an [`ArcSwap`], so a handshake reads it without a lock
//! and a new certificate takes effect for the next connection, with no restart.
//!
//! The files are re-read in two cases:
//! - on every config reload (and on SIGHUP / `POST /reload`, changed config or not), as part of
//!   the reload: a certificate that does not load refuses the reload whole;
//! - when they change on disk. Changes are found by comparing the files' metadata (size,
//!   modification and change time, inode), at most once per second per listener, when a new
//!   connection arrives. That needs no watcher thread, works the same for in-place writes,
//!   renames and Kubernetes' `..data` symlink swap, and costs two `stat` calls per second at
//!   most; and since only new connections use the certificate, a new connection is exactly when
//!   a change matters.
//!
//! A changed certificate that does not load (unreadable, not PEM, key not matching) keeps the old
//! one serving, logs an error and counts a failed reload. Files changed in the last
//! [`SETTLE`] are given the benefit of the doubt first: a writer may have replaced the
//! certificate and not yet the key.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::crypto_provider;
use crate::config::ListenerTlsSettings;
use crate::metrics::Metrics;

/// Longest a client may take to complete the TLS handshake, so half-open or idle connections
/// that never finish it do not pile up.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Certificate files are checked for changes at most this often per listener.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A changed certificate that fails to load is only reported once its files have been still
/// this long: until then a writer may still be busy replacing them one by one.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// Reads a PEM certificate chain and its private key (PKCS#8, PKCS#1 or SEC1) and checks that
/// they belong together. The error says which file and what is wrong, for the log.
pub(crate) fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
) -> Result<CertifiedKey, String> {
    let chain = super::read_chain(cert_file)?;
    let key = super::read_key(key_file)?;
    CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|e| {
        format!(
            "certificate {} and key {} cannot be used together: {e}",
            cert_file.display(),
            key_file.display()
        )
    })
}

/// What a file looked like when it was last read: any write, rename or symlink swap changes
/// at least one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    changed: (i64, i64),
    #[cfg(unix)]
    inode: (u64, u64),
}

impl FileStamp {
    /// `None` when the file cannot be looked at (missing, mid-swap).
    fn of(path: &Path) -> Option<FileStamp> {
        // `metadata` follows symlinks: a swapped `..data` link shows up as a different inode.
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Some(FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
            #[cfg(unix)]
            changed: (m.ctime(), m.ctime_nsec()),
            #[cfg(unix)]
            inode: (m.dev(), m.ino()),
        })
    }

    /// Whether a file may still be being written: missing (mid-swap) or modified within
    /// [`SETTLE`].
    fn unsettled(stamp: &Option<FileStamp>) -> bool {
        match stamp {
            Some(s) => s.younger_than(SETTLE),
            None => true,
        }
    }

    /// Whether the file was modified within `d` of now.
    fn younger_than(&self, d: Duration) -> bool {
        match self.modified.map(|m| SystemTime::now().duration_since(m)) {
            Some(Ok(age)) => age < d,
            // No mtime, or one in the future: treat as just written.
            _ => true,
        }
    }
}

/// Always answers with the current certificate (one per listener; SNI does not pick among
/// several).
#[derive(Debug)]
struct CurrentCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The files a listener serves from and what they looked like when last read.
struct CertFiles {
    settings: ListenerTlsSettings,
    stamps: [Option<FileStamp>; 2],
}

impl CertFiles {
    fn stamps_now(settings: &ListenerTlsSettings) -> [Option<FileStamp>; 2] {
        [
            FileStamp::of(&settings.cert_file),
            FileStamp::of(&settings.key_file),
        ]
    }
}

/// TLS termination state of one listener.
pub(crate) struct ListenerTls {
    name: String,
    cert: Arc<CurrentCert>,
    config: ArcSwap<ServerConfig>,
    source: Mutex<CertFiles>,
    /// Milliseconds since `epoch` before which no file check is due.
    next_check: AtomicU64,
    epoch: Instant,
    metrics: Metrics,
    handshake_errors: IntCounter,
}

impl ListenerTls {
    /// Loads the listener's certificate; fails (with the reason) when it cannot be served.
    pub(crate) fn new(
        name: &str,
        settings: &ListenerTlsSettings,
        metrics: &Metrics,
    ) -> Result<ListenerTls, String> {
        // Stamps are taken before reading, so a write that lands in between is seen next time.
        let stamps = CertFiles::stamps_now(settings);
        let key = load_certified_key(&settings.cert_file, &settings.key_file)?;
        let cert = Arc::new(CurrentCert(ArcSwap::from_pointee(key)));
        let config = server_config(cert.clone(), &settings.alpn)?;
        Ok(ListenerTls {
            name: name.to_owned(),
            cert,
            config: ArcSwap::from_pointee(config),
            source: Mutex::new(CertFiles {
                settings: settings.clone(),
                stamps,
            }),
            next_check: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics: metrics.clone(),
            handshake_errors: metrics.tls_handshake_errors(name),
        })
    }

    /// The listener's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Runs the TLS handshake on a new connection, within [`HANDSHAKE_TIMEOUT`]. A failure is
    /// counted and logged at debug (it is the client's problem, and clients are many); `None`
    /// then, and the connection is dropped. A client that connects and closes without sending
    /// a byte (a TCP health check) is not a failed handshake and is not counted.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        self.refresh_if_due();
        let acceptor = TlsAcceptor::from(self.config.load_full());
        let handshake = async {
            let mut first = [0u8; 1];
            if stream.peek(&mut first).await? == 0 {
                return Ok(None);
            }
            acceptor.accept(stream).await.map(Some)
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(Some(tls))) => Some(tls),
            Ok(Ok(None)) => {
                tracing::debug!(listener = %self.name, %peer, "connection closed before a TLS handshake began");
                None
            }
            Ok(Err(e)) => {
                self.handshake_errors.inc();
                tracing::debug!(listener = %self.name, %peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.handshake_errors.inc();
                tracing::debug!(listener = %self.name, %peer, "TLS handshake timed out");
                None
            }
        }
    }

    /// Re-reads the files if they changed, at most once per [`CHECK_INTERVAL`]. Called on new
    /// connections; the one that wins the check does the (cheap) `stat`s inline, the others go
    /// on with the current certificate.
    fn refresh_if_due(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let due = self.next_check.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now + CHECK_INTERVAL.as_millis() as u64;
        if self
            .next_check
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // A reload holding the lock is reading the files right now: nothing to add.
        let Ok(mut guard) = self.source.try_lock() else {
            return;
        };
        let source = &mut *guard;
        let stamps = CertFiles::stamps_now(&source.settings);
        if stamps == source.stamps {
            return;
        }
        let s = &source.settings;
        match load_certified_key(&s.cert_file, &s.key_file) {
            Ok(key) => {
                self.cert.0.store(Arc::new(key));
                source.stamps = stamps;
                self.metrics.reload(true);
                tracing::info!(listener = %self.name, cert_file = %s.cert_file.display(), "certificate changed on disk: now serving the new one");
            }
            Err(e) if stamps.iter().any(FileStamp::unsettled) => {
                // Possibly half-written; the next check looks again (the stamps are not kept).
                tracing::debug!(listener = %self.name, error = %e, "certificate files changed and do not load yet");
            }
            Err(e) => {
                // Kept, so this version of the files is reported once, not every second.
                source.stamps = stamps;
                self.metrics.reload(false);
                tracing::error!(listener = %self.name, "new certificate refused, still serving the previous one: {e}");
            }
        }
    }

    /// Reads the files `settings` names (which a reload may have changed), without applying them.
    pub(super) fn prepare(
        &self,
        settings: &ListenerTlsSettings,
    ) -> Result<PreparedListener, String> {
        let stamps = CertFiles::stamps_now(settings);
        let key = load_certified_key(&settings.cert_file, &settings.key_file)?;
        let same_alpn = self
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settings
            .alpn
            == settings.alpn;
        let config = if same_alpn {
            None
        } else {
            Some(server_config(self.cert.clone(), &settings.alpn)?)
        };
        Ok(PreparedListener {
            settings: settings.clone(),
            stamps,
            key,
            config,
        })
    }

    pub(super) fn commit(&self, p: PreparedListener) {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        self.cert.0.store(Arc::new(p.key));
        if let Some(config) = p.config {
            self.config.store(Arc::new(config));
        }
        source.settings = p.settings;
        source.stamps = p.stamps;
    }
}

/// A rustls server config answering with `cert`, offering `alpn` in preference order.
fn server_config(cert: Arc<CurrentCert>, alpn: &[String]) -> Result<ServerConfig, String> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// A listener's certificate read for a reload, not applied yet.
pub(super) struct PreparedListener {
    settings: ListenerTlsSettings,
    stamps: [Option<FileStamp>; 2],
    key: CertifiedKey,
    config: Option<ServerConfig>,
}
