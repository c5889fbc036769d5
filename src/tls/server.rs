//! redcloak's own TLS listener: its certificate, and when `client_ca` is set,
//! required and verified client certificates.

use super::{TlsError, VERSIONS, load, provider};
use rustls::server::WebPkiClientVerifier;
use std::path::Path;
use std::sync::Arc;

pub fn config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = load::certificates(cert, "listener certificate (listen.tls.cert)")?;
    let key = load::private_key(key, "listener private key (listen.tls.key)")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Rejected {
            what: "TLS versions",
            source,
        })?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = load::roots(path, "client CA certificate (listen.tls.client_ca)")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: path.to_owned(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rejected {
            what: "listen.tls.cert and listen.tls.key",
            source,
        })?;
    Ok(Arc::new(config))
}
