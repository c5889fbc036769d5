//! The upstream side's TLS: verify Redis's certificate against `upstream.ca`
//! and the server name, present redcloak's client certificate. There is no
//! option to skip verification or to connect without TLS.
//!
//! Session resumption is off: a resumed session skips the certificate
//! checks of a full handshake, so a certificate that expired or is no
//! longer trusted would still be accepted. Every connection verifies.

use super::{TlsError, VERSIONS, load, provider};
use rustls::client::WantsClientCert;
use rustls::{ClientConfig, ConfigBuilder};
use std::path::Path;
use std::sync::Arc;

/// redcloak's upstream TLS configuration: Redis verified, our certificate presented.
pub fn config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = verifying(ca)?;
    let chain = load::certificates(cert, "client certificate (upstream.cert)")?;
    let key = load::private_key(key, "client private key (upstream.key)")?;
    let config = builder
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::Rejected {
            what: "upstream.cert and upstream.key",
            source,
        })?;
    Ok(without_resumption(config))
}

/// Like [`config`] but without a client certificate: the startup checks use
/// it to prove that Redis refuses such clients. Never used to serve.
pub fn config_without_client_cert(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(without_resumption(verifying(ca)?.with_no_client_auth()))
}

/// A TLS client for a KMS: its certificate verified against `ca` (or the
/// system's roots when there is none), no client certificate, no
/// resumption.
pub fn kms(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(ca) => load::roots(ca, "KMS CA certificate (encryption.kms.*.ca)")?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            roots
        }
    };
    Ok(without_resumption(
        versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// TLS 1.2 and 1.3 with the ring provider.
fn versions() -> Result<ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Rejected {
            what: "TLS versions",
            source,
        })
}

fn without_resumption(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// TLS 1.2+ with Redis's certificate verified against `upstream.ca`.
fn verifying(ca: &Path) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, TlsError> {
    let roots = load::roots(ca, "upstream CA certificate (upstream.ca)")?;
    Ok(versions()?.with_root_certificates(roots))
}
