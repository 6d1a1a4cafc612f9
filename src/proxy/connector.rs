//! Opens connections to upstream endpoints and classifies why that failed, so a refused
//! connection, an unreachable host, a DNS failure, a connect timeout, a TLS handshake failure
//! and a rejected certificate each keep their own name all the way to the response.
//!
//! TLS towards an upstream always verifies the certificate: against `ca_file` when set, else
//! the system roots (loaded once per process with `rustls-native-certs`). SNI and the name
//! verified are `server_name`, or the endpoint's host. ALPN offers exactly the configured
//! protocol (`h2` or `http/1.1`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::client::ClientConfig;
use rustls::{AlertDescription, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{ConfigError, ConfigErrors, Settings, UpstreamProtocol, UpstreamSettings};
use crate::error::UpstreamError;
use crate::server::tls::crypto_provider;

/// A connect failure, already classified. Found again by walking the client error's source
/// chain.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub UpstreamError);

/// When a connection was established; carried in the connection's metadata so a failed request
/// can tell whether it went out on a reused (possibly stale) pooled connection.
#[derive(Debug, Clone, Copy)]
pub struct Established(pub Instant);

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
        let err = |field: &str, message: String| ConfigError {
            path: if field.is_empty() {
                base.clone()
            } else {
                format!("{base}.{field}")
            },
            message,
            line: None,
            column: None,
        };
        let Some(tls) = &settings.tls else {
            return Err(err("", "the upstream has no tls settings".into()));
        };
        let roots = match &tls.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| err("ca_file", format!("cannot read {}: {e}", ca.display())))?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| {
                        err(
                            "ca_file",
                            format!("{} is not a PEM bundle: {e}", ca.display()),
                        )
                    })?;
                    roots.add(cert).map_err(|e| {
                        err(
                            "ca_file",
                            format!("{} holds an unusable CA certificate: {e}", ca.display()),
                        )
                    })?;
                }
                if roots.is_empty() {
                    return Err(err(
                        "ca_file",
                        format!("{} holds no PEM certificate", ca.display()),
                    ));
                }
                Arc::new(roots)
            }
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
                let chain = load_chain(cert_file).map_err(|m| err("cert_file", m))?;
                let key = load_key(key_file).map_err(|m| err("key_file", m))?;
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
}

/// Reads a PEM certificate chain.
fn load_chain(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate chain: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(chain)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
fn load_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{} holds no usable PEM private key: {e}", path.display()))
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
pub fn load_upstream_tls(settings: &Settings) -> Result<Vec<(String, TlsClient)>, ConfigErrors> {
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

    /// Uses `client` for new connections.
    pub fn set(&self, client: TlsClient) {
        self.0.store(Arc::new(Ok(client)));
    }
}

/// Connects TCP to `host:port` from the URI, then TLS when configured, all within
/// `connect_timeout` (name resolution included).
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    tls: Option<UpstreamTls>,
}

impl Connector {
    /// A connector with this connect timeout, speaking TLS when `tls` is set.
    pub fn new(connect_timeout: Duration, tls: Option<UpstreamTls>) -> Self {
        Connector {
            connect_timeout,
            tls,
        }
    }
}

/// The byte stream of an upstream connection.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

/// A connection to an upstream endpoint.
#[derive(Debug)]
pub struct UpstreamIo {
    io: TokioIo<Stream>,
    established: Instant,
    h2: bool,
}

impl UpstreamIo {
    /// The byte stream, for spillway's own HTTP/1.1 client.
    pub fn into_stream(self) -> Stream {
        self.io.into_inner()
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(Established(self.established));
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}
impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.connect_timeout;
        // The setup current when the connection starts; a reload only affects later ones.
        let tls = self.tls.as_ref().map(|t| t.0.load_full());
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let host = uri.host().ok_or(ConnectError(UpstreamError::Dns))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(80);
            let tcp = connect_tcp(host, port, deadline).await?;
            let Some(tls) = tls else {
                return Ok(UpstreamIo {
                    io: TokioIo::new(Stream::Plain(tcp)),
                    established: Instant::now(),
                    h2: false,
                });
            };
            let tls = match &*tls {
                Ok(t) => t,
                Err(problem) => {
                    tracing::debug!(%host, %problem, "upstream TLS setup is unusable");
                    return Err(ConnectError(UpstreamError::TlsCertificate));
                }
            };
            let server_name = match &tls.server_name {
                Some(n) => n.clone(),
                // Validated as host:port by config: an IP literal or a DNS name.
                None => ServerName::try_from(host.to_owned())
                    .map_err(|_| ConnectError(UpstreamError::TlsCertificate))?,
            };
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            match tokio::time::timeout_at(deadline, connector.connect(server_name, tcp)).await {
                Ok(Ok(stream)) => {
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    Ok(UpstreamIo {
                        io: TokioIo::new(Stream::Tls(Box::new(stream))),
                        established: Instant::now(),
                        h2,
                    })
                }
                Ok(Err(e)) => {
                    let kind = classify_tls_io(&e);
                    tracing::debug!(%host, port, error = %e, kind = kind.kind(), "upstream TLS handshake failed");
                    Err(ConnectError(kind))
                }
                Err(_) => Err(ConnectError(UpstreamError::ConnectTimeout)),
            }
        })
    }
}

/// Resolves `host` and connects to the first address that accepts, before `deadline`.
async fn connect_tcp(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(_)) => return Err(ConnectError(UpstreamError::Dns)),
                Err(_) => return Err(ConnectError(UpstreamError::ConnectTimeout)),
            }
        }
    };
    if addrs.is_empty() {
        return Err(ConnectError(UpstreamError::Dns));
    }
    let mut last = UpstreamError::ConnectRefused;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Small requests and responses: do not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "upstream connect failed");
                last = classify_connect_io(&e);
            }
            Err(_) => return Err(ConnectError(UpstreamError::ConnectTimeout)),
        }
    }
    Err(ConnectError(last))
}

/// Maps an OS connect error to what the client is told.
fn classify_connect_io(e: &io::Error) -> UpstreamError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => UpstreamError::ConnectRefused,
        io::ErrorKind::TimedOut => UpstreamError::ConnectTimeout,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::NetworkDown => UpstreamError::Unreachable,
        _ => UpstreamError::ConnectRefused,
    }
}

/// Classifies a failed TLS handshake: the rustls error inside the I/O error when there is one;
/// anything else (the peer closed or reset mid-handshake, e.g. a plain-HTTP server) is a
/// protocol failure.
pub fn classify_tls_io(e: &io::Error) -> UpstreamError {
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
pub fn classify_tls(e: &rustls::Error) -> UpstreamError {
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
