//! The upstream side's TLS: verify Redis's certificate against `upstream.ca`
//! and the server name, present redcloak's client certificate. There is no
//! option to skip verification or to connect without TLS.

use super::{TlsError, VERSIONS, load, provider};
use std::path::Path;
use std::sync::Arc;

/// Like [`config`] but without a client certificate: the startup checks use
/// it to prove that Redis refuses such clients. Never used to serve.
pub fn config_without_client_cert(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = load::roots(ca, "upstream CA certificate (upstream.ca)")?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Rejected {
            what: "TLS versions",
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub fn config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = load::roots(ca, "upstream CA certificate (upstream.ca)")?;
    let chain = load::certificates(cert, "client certificate (upstream.cert)")?;
    let key = load::private_key(key, "client private key (upstream.key)")?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Rejected {
            what: "TLS versions",
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::Rejected {
            what: "upstream.cert and upstream.key",
            source,
        })?;
    Ok(Arc::new(config))
}
