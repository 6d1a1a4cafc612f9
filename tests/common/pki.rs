//! TLS support: a private CA whose certificates are made at test time, TLS client connections,
//! and an HTTPS upstream.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;

use super::{TempDir, STEP};

/// A private CA in a scratch directory (removed on drop) that issues leaf certificates.
pub struct TestPki {
    /// The scratch directory.
    pub dir: TempDir,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key.
pub struct Leaf {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Certificate, DER: what a client sees as the peer certificate.
    pub der: Vec<u8>,
}

impl TestPki {
    /// A new CA named `name`, in a fresh scratch directory.
    pub fn new(name: &str) -> TestPki {
        let dir = TempDir::new("pki");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        TestPki {
            dir,
            ca_pem: ca.pem(),
            ca,
        }
    }

    /// A leaf for `localhost` and `127.0.0.1` (plus `names`), common name `cn`, signed by the CA.
    pub fn leaf(&self, cn: &str, names: &[&str]) -> Leaf {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(names.iter().map(|s| s.to_string()));
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes `contents` to `name` in the scratch directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        self.dir.write(name, contents)
    }

    /// Writes the CA certificate as `ca.pem`; returns its path.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.write("ca.pem", &self.ca_pem.clone())
    }

    /// A rustls client config trusting only this CA, offering `alpn`, optionally presenting a
    /// client certificate.
    pub fn client_config(
        &self,
        alpn: &[&str],
        client_cert: Option<&Leaf>,
    ) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match client_cert {
            Some(leaf) => builder
                .with_client_auth_cert(
                    rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                        .map(|c| c.unwrap())
                        .collect(),
                    rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
                        .unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        std::sync::Arc::new(config)
    }
}

/// A TLS client connection to `addr`, verifying the name `localhost` (bounded by [`STEP`]).
pub async fn tls_connect(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("TLS handshake within the step bound")
}

/// The end-entity certificate (DER) a TLS client connection sees.
pub fn peer_cert(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server sent a certificate")[0]
        .to_vec()
}

/// The ALPN protocol negotiated on a TLS client connection ("" for none).
pub fn alpn_of(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    String::from_utf8_lossy(tls.get_ref().1.alpn_protocol().unwrap_or_default()).into_owned()
}

/// An HTTPS upstream (HTTP/1.1 or HTTP/2 by ALPN or preface) answering every request with 200
/// and body `tls ok`. With `client_ca`, it requires a client certificate issued by that CA.
/// Every answer says in `x-client-cert` whether the client presented one.
pub struct TlsUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
}

impl TlsUpstream {
    /// Starts it on an ephemeral loopback port with `leaf` as its certificate.
    pub async fn start(leaf: &Leaf, client_ca: Option<&TestPki>) -> TlsUpstream {
        use rustls_pki_types::pem::PemObject;
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(pki) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(
                rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(STEP, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let presented = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty());
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| async move {
                            let version = format!("{:?}", req.version());
                            let _ = req.into_body().collect().await;
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from_static(b"tls ok")));
                            let h = resp.headers_mut();
                            h.insert(
                                "x-client-cert",
                                http::HeaderValue::from_static(if presented {
                                    "yes"
                                } else {
                                    "no"
                                }),
                            );
                            h.insert(
                                "x-upstream-version",
                                http::HeaderValue::from_str(&version).unwrap(),
                            );
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            _task: AbortOnDropHandle::new(task),
        }
    }
}
