//! AWS KMS as a KMS provider (cargo feature `aws-kms`): a DEK is wrapped
//! with `Encrypt` under `key_id`, the associated data bound as the
//! encryption context `{"redcloak-dek": "redcloak-dek-v1|<name>|<id>"}`,
//! and unwrapped with `Decrypt` naming the same key and context. The SDK
//! runs on rustls with ring; credentials come from the SDK's default chain
//! (environment, profile, web identity, instance metadata). The endpoint is
//! AWS's, or `endpoint` (https, or http on a loopback address for a local
//! emulator: the DEK travels in the reply).

use super::KmsError;
use std::time::Duration;

/// Where the key is, as `[encryption.kms.NAME]` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    pub key_id: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub request_timeout: Duration,
}

/// `endpoint` is https, or http to a loopback address.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(format!("endpoint '{endpoint}' must start with https://"));
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "endpoint '{endpoint}': plain http only to a loopback address (the data key travels in the reply)"
        ))
    }
}

#[cfg(feature = "aws-kms")]
pub use enabled::Aws;

#[cfg(feature = "aws-kms")]
mod enabled {
    use super::*;
    use aws_sdk_kms::error::ProvideErrorMetadata;
    use zeroize::Zeroizing;

    /// The encryption context's one key.
    const CONTEXT_KEY: &str = "redcloak-dek";

    use aws_sdk_kms::primitives::Blob;
    use tokio::sync::OnceCell;

    pub struct Aws {
        settings: AwsSettings,
        /// Made on first use (the SDK's configuration loading is async).
        client: OnceCell<aws_sdk_kms::Client>,
    }

    impl std::fmt::Debug for Aws {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Aws(key {})", self.settings.key_id)
        }
    }

    impl Aws {
        pub fn new(settings: AwsSettings) -> Result<Aws, String> {
            if let Some(endpoint) = &settings.endpoint {
                check_endpoint(endpoint)?;
            }
            Ok(Aws {
                settings,
                client: OnceCell::new(),
            })
        }

        async fn client(&self) -> &aws_sdk_kms::Client {
            self.client
                .get_or_init(|| async {
                    let http = aws_smithy_http_client::Builder::new()
                        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                        ))
                        .build_https();
                    let timeouts = aws_config::timeout::TimeoutConfig::builder()
                        .operation_timeout(self.settings.request_timeout)
                        .build();
                    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                        .http_client(http)
                        .timeout_config(timeouts);
                    if let Some(region) = &self.settings.region {
                        loader = loader.region(aws_config::Region::new(region.clone()));
                    }
                    if let Some(endpoint) = &self.settings.endpoint {
                        loader = loader.endpoint_url(endpoint);
                    }
                    aws_sdk_kms::Client::new(&loader.load().await)
                })
                .await
        }

        fn context(aad: &[u8]) -> Result<String, KmsError> {
            String::from_utf8(aad.to_vec())
                .map_err(|_| KmsError::Invalid("associated data is not text".into()))
        }

        pub async fn wrap(&self, dek: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
            let reply = self
                .client()
                .await
                .encrypt()
                .key_id(&self.settings.key_id)
                .plaintext(Blob::new(dek.to_vec()))
                .encryption_context(CONTEXT_KEY, Self::context(aad)?)
                .send()
                .await
                .map_err(|e| classify_sdk(&e))?;
            reply
                .ciphertext_blob
                .map(Blob::into_inner)
                .ok_or_else(|| KmsError::Invalid("Encrypt returned no ciphertext".into()))
        }

        pub async fn unwrap(
            &self,
            wrapped: &[u8],
            aad: &[u8],
        ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
            let reply = self
                .client()
                .await
                .decrypt()
                .key_id(&self.settings.key_id)
                .ciphertext_blob(Blob::new(wrapped.to_vec()))
                .encryption_context(CONTEXT_KEY, Self::context(aad)?)
                .send()
                .await
                .map_err(|e| classify_sdk(&e))?;
            reply
                .plaintext
                .map(|p| Zeroizing::new(p.into_inner()))
                .ok_or_else(|| KmsError::Invalid("Decrypt returned no plaintext".into()))
        }
    }

    fn classify_sdk<E: ProvideErrorMetadata + std::fmt::Debug, R>(
        error: &aws_sdk_kms::error::SdkError<E, R>,
    ) -> KmsError {
        use aws_sdk_kms::error::SdkError;
        match error {
            SdkError::ServiceError(service) => {
                let err = service.err();
                classify(
                    err.code().unwrap_or("unknown"),
                    err.message().unwrap_or_default(),
                )
            }
            // No answer: a timeout, a connection refused, a bad reply.
            other => KmsError::Unreachable(format!("{other}")),
        }
    }
}

/// An AWS KMS error code, classified: the key or the caller refused
/// (disabled, pending deletion, not found, access denied, a blob or
/// context that does not match) is a denial; throttling, an internal
/// error or an unavailable key store is passing.
pub fn classify(code: &str, message: &str) -> KmsError {
    let why = format!("{code}: {message}");
    match code {
        "DisabledException"
        | "KMSInvalidStateException"
        | "NotFoundException"
        | "AccessDeniedException"
        | "InvalidCiphertextException"
        | "IncorrectKeyException"
        | "InvalidKeyUsageException"
        | "InvalidGrantTokenException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException" => KmsError::Denied(why),
        _ => KmsError::Unreachable(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_or_denied_key_is_told_from_an_outage() {
        for code in [
            "DisabledException",
            "KMSInvalidStateException",
            "AccessDeniedException",
            "InvalidCiphertextException",
            "NotFoundException",
        ] {
            assert!(matches!(classify(code, ""), KmsError::Denied(_)), "{code}");
        }
        for code in [
            "ThrottlingException",
            "KMSInternalException",
            "KeyUnavailableException",
            "DependencyTimeoutException",
        ] {
            assert!(
                matches!(classify(code, ""), KmsError::Unreachable(_)),
                "{code}"
            );
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(check_endpoint("https://kms.eu-west-1.amazonaws.com").is_ok());
        assert!(check_endpoint("http://127.0.0.1:5000").is_ok());
        assert!(check_endpoint("http://localhost:5000/").is_ok());
        assert!(check_endpoint("http://[::1]:5000").is_ok());
        assert!(check_endpoint("http://10.0.0.5:5000").is_err());
        assert!(check_endpoint("http://kms.internal").is_err());
        assert!(check_endpoint("ftp://x").is_err());
    }
}
