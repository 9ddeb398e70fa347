//! Optional TLS on the listeners (rustls with the ring provider; no OpenSSL).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Reads the PEM files and builds an acceptor offering HTTP/2 and HTTP/1.1.
pub fn acceptor(c: &TlsConfig) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| format!("cannot read certificates from {}: {e}", c.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid certificate PEM in {}: {e}", c.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", c.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", c.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
