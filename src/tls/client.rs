//! TLS towards upstreams.
//!
//! TLS towards an upstream always verifies the certificate: against `ca_file` when set, else
//! the system roots (loaded once per process with `rustls-native-certs`). SNI and the name
//! verified are `server_name`, or the endpoint's host. ALPN offers exactly the configured
//! protocol (`h2` or `http/1.1`). A handshake failure is classified, so a rejected certificate
//! and any other TLS failure keep their own names all the way to the response.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::client::ClientConfig;
use rustls::{AlertDescription, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::crypto_provider;
use crate::config::{ConfigError, ConfigErrors, Settings, UpstreamProtocol, UpstreamSettings};
use crate::error::UpstreamError;

/// A ready TLS client setup for one upstream: verification roots, optional client certificate
/// and ALPN, plus the configured SNI name.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Reads the upstream's CA bundle (or takes the system roots) and client certificate.
    /// `Err` carries the field at fault and what is wrong with it.
    pub fn load(upstream: &str, settings: &UpstreamSettings) -> Result<TlsClient, ConfigError> {
        let base = format!("upstreams.{upstream}.tls");
        let err = |field: &str, message: String| {
            let path = if field.is_empty() {
                base.clone()
            } else {
                format!("{base}.{field}")
            };
            ConfigError::new(path, message)
        };
        let Some(tls) = &settings.tls else {
            return Err(err("", "the upstream has no tls settings".into()));
        };
        let roots = match &tls.ca_file {
            Some(ca) => Arc::new(read_ca_bundle(ca).map_err(|m| err("ca_file", m))?),
            None => {
                let roots = system_roots();
                if roots.is_empty() {
                    return Err(err(
                        "ca_file",
                        "no system CA certificates were found to verify the upstream with; set ca_file".into(),
                    ));
                }
                roots.clone()
            }
        };
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("", format!("TLS setup failed: {e}")))?
            .with_root_certificates(roots);
        let mut config = match (&tls.cert_file, &tls.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let chain = super::read_chain(cert_file).map_err(|m| err("cert_file", m))?;
                let key = super::read_key(key_file).map_err(|m| err("key_file", m))?;
                // Fails when the key does not match the certificate.
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    err(
                        "cert_file",
                        format!("client certificate and key cannot be used together: {e}"),
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![match settings.protocol {
            UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
            UpstreamProtocol::Http2 => b"h2".to_vec(),
        }];
        let server_name = match &tls.server_name {
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| {
                err(
                    "server_name",
                    format!("`{n}` is not a usable server name: {e}"),
                )
            })?),
            None => None,
        };
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }

    /// Runs the TLS handshake over `tcp` towards `host` (an IP literal or a DNS name, the SNI
    /// name unless `server_name` is configured). Returns the stream and whether the upstream
    /// agreed to HTTP/2 (ALPN `h2`); a failure is classified for the client.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, bool), UpstreamError> {
        let server_name = match &self.server_name {
            Some(n) => n.clone(),
            // Validated as host:port by config: an IP literal or a DNS name.
            None => {
                ServerName::try_from(host.to_owned()).map_err(|_| UpstreamError::TlsCertificate)?
            }
        };
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        match connector.connect(server_name, tcp).await {
            Ok(stream) => {
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                Ok((stream, h2))
            }
            Err(e) => {
                let kind = classify_tls_io(&e);
                tracing::debug!(%host, error = %e, kind = kind.kind(), "upstream TLS handshake failed");
                Err(kind)
            }
        }
    }
}

/// Reads a PEM CA bundle into a trust store (at least one certificate).
fn read_ca_bundle(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in super::read_chain(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{} holds an unusable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The system's trust roots, read once per process (a CA bundle update needs a restart).
fn system_roots() -> &'static Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "while loading the system CA certificates");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system CA certificates loaded");
        Arc::new(roots)
    })
}

/// Loads the TLS setup of every upstream that has one: all of them, or every problem found.
pub(crate) fn load_upstream_tls(
    settings: &Settings,
) -> Result<Vec<(String, TlsClient)>, ConfigErrors> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (name, u) in &settings.upstreams {
        if u.tls.is_none() {
            continue;
        }
        match TlsClient::load(name, u) {
            Ok(c) => ok.push((name.clone(), c)),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// An upstream's TLS setup, replaceable while its connection pool lives on: a reload re-reads
/// the CA and client certificate and new connections use them.
#[derive(Clone)]
pub struct UpstreamTls(Arc<ArcSwap<Result<TlsClient, Arc<str>>>>);

/// An upstream's TLS setup at one moment: the client, or why it is unusable.
pub(crate) type CurrentTls = Arc<Result<TlsClient, Arc<str>>>;

impl UpstreamTls {
    /// Loads it. It cannot fail here (start and reload already refused broken files); if the
    /// files broke in between, every connection fails as a certificate problem until fixed.
    pub fn load(upstream: &str, settings: &UpstreamSettings) -> UpstreamTls {
        let client = TlsClient::load(upstream, settings).map_err(|e| {
            tracing::error!(
                upstream,
                "upstream TLS unusable, every connection will fail: {e}"
            );
            Arc::<str>::from(e.to_string())
        });
        UpstreamTls(Arc::new(ArcSwap::from_pointee(client)))
    }

    /// The setup for a connection starting now (a reload only affects later ones).
    pub fn current(&self) -> CurrentTls {
        self.0.load_full()
    }

    /// Uses `client` for new connections.
    pub fn set(&self, client: TlsClient) {
        self.0.store(Arc::new(Ok(client)));
    }
}

/// Classifies a failed TLS handshake: the rustls error inside the I/O error when there is one;
/// anything else (the peer closed or reset mid-handshake, e.g. a plain-HTTP server) is a
/// protocol failure.
pub(crate) fn classify_tls_io(e: &io::Error) -> UpstreamError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => classify_tls(tls),
        None => UpstreamError::TlsProtocol,
    }
}

/// Certificate problems (ours rejected by the upstream, or theirs by us: unknown issuer, wrong
/// name, expired, missing) are `TlsCertificate`; every other TLS failure is `TlsProtocol`.
pub(crate) fn classify_tls(e: &rustls::Error) -> UpstreamError {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(_)
        | E::NoCertificatesPresented
        | E::UnsupportedNameType
        | E::InvalidCertRevocationList(_) => UpstreamError::TlsCertificate,
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired,
        ) => UpstreamError::TlsCertificate,
        _ => UpstreamError::TlsProtocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    #[test]
    fn certificate_problems_and_protocol_failures_keep_their_names() {
        let cert = [
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            rustls::Error::InvalidCertificate(CertificateError::Expired),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
            rustls::Error::NoCertificatesPresented,
        ];
        for e in cert {
            assert_eq!(classify_tls(&e), UpstreamError::TlsCertificate, "{e:?}");
        }
        let protocol = [
            rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
            rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol),
            rustls::Error::DecryptError,
        ];
        for e in protocol {
            assert_eq!(classify_tls(&e), UpstreamError::TlsProtocol, "{e:?}");
        }
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::Expired),
        );
        assert_eq!(classify_tls_io(&wrapped), UpstreamError::TlsCertificate);
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(classify_tls_io(&eof), UpstreamError::TlsProtocol);
    }
}
