//! TLS for both sides, with rustls and its `ring` provider.
//!
//! `load` reads PEM files into rustls types, `server` builds the config of
//! redcloak's own TLS listener, `client` the config for the upstream side.
//! Both accept TLS 1.2 and 1.3 only.

pub mod client;
pub mod inspect;
pub mod load;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

/// A certificate, key or TLS configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no {what}", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what} rejected: {source}")]
    Rejected {
        what: &'static str,
        source: rustls::Error,
    },
    #[error("client CA {}: {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
