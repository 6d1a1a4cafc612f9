//! TLS on both sides of the proxy: termination on listeners ([`server`]), connections to
//! upstreams ([`client`]), and the certificates both read from files and re-read on reload
//! ([`certificates`]).
//!
//! Everything here uses one crypto provider and one set of PEM readers, so a broken file reads
//! the same in every error message whichever side it belongs to.

pub(crate) mod certificates;
pub(crate) mod client;
pub(crate) mod server;

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider of every TLS config spillway builds: ring, which builds with nothing
/// but a C compiler.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (at least one certificate). The error names the file and
/// what is wrong with it.
pub(crate) fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate chain: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(chain)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_empty_files_name_the_file() {
        let dir = std::env::temp_dir().join(format!("spillway-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let err = read_chain(&missing).unwrap_err();
        assert!(
            err.starts_with(&format!("cannot read {}", missing.display())),
            "{err}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(
            read_chain(&empty).unwrap_err(),
            format!("{} holds no PEM certificate", empty.display())
        );
        let err = read_key(&empty).unwrap_err();
        assert!(err.contains("holds no usable PEM private key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
