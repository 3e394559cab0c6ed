//! TLS to Redis (`rediss://`, `rediss-cluster://`): one rustls client
//! configuration, shared by fred's connections and Belfry's own pub/sub
//! connections, so both trust the same certificates.
//!
//! The system's roots are trusted, plus an optional CA file
//! (`redis_tls_ca`): managed Redis services and self-run servers often sign
//! with a private CA that is not in the system store.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// The client configuration for TLS connections to Redis. Compared by
/// identity: two endpoints are the same if they share one configuration.
#[derive(Clone)]
pub struct RedisTls(pub Arc<ClientConfig>);

impl RedisTls {
    /// System roots plus the PEM certificates in `ca`, if given.
    pub fn new(ca: Option<&Path>) -> Result<RedisTls, String> {
        client_config(ca, "Redis", "redis_tls_ca").map(RedisTls)
    }
}

/// A rustls client configuration trusting the system's roots (which
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` replace) plus the PEM certificates in
/// `ca`. `what` and `setting` name the peer and the setting in errors.
pub fn client_config(
    ca: Option<&Path>,
    what: &str,
    setting: &str,
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    // A missing or partly unreadable system store is not fatal: with a
    // CA file the connection can still be verified.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read the {what} CA file {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the {what} CA file {} is not PEM: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "the {what} CA file {} holds no certificate",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("the {what} CA file {} is not a CA: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "TLS to {what} needs a CA to trust: the system has none; set {setting}"
        ));
    }
    Ok(Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisTls")
    }
}

impl PartialEq for RedisTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for RedisTls {}

impl std::hash::Hash for RedisTls {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.0) as usize).hash(state);
    }
}

/// Whether a Redis URL asks for TLS.
pub fn url_uses_tls(url: &str) -> bool {
    let scheme = url.split("://").next().unwrap_or("").to_ascii_lowercase();
    matches!(
        scheme.as_str(),
        "rediss" | "rediss-cluster" | "rediss-sentinel" | "valkeys" | "valkeys-cluster"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_schemes_are_recognised() {
        assert!(url_uses_tls("rediss://h:6380"));
        assert!(url_uses_tls("REDISS-cluster://h:1?node=h:2"));
        assert!(!url_uses_tls("redis://h:6379"));
        assert!(!url_uses_tls("redis-cluster://h:1"));
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let err = RedisTls::new(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("belfry-ca-{}", std::process::id()));
        std::fs::write(&dir, "not a certificate\n").unwrap();
        let err = RedisTls::new(Some(&dir)).unwrap_err();
        let _ = std::fs::remove_file(&dir);
        assert!(err.contains("no certificate"), "{err}");
    }
}
