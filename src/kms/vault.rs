//! Vault or OpenBao Transit as a KMS: wrap and unwrap a DEK with
//! `POST /v1/<mount>/encrypt/<key>` and `/decrypt/<key>`, binding the
//! associated data. HTTPS only (the token travels in a header), the
//! server's certificate verified against `ca` or the system roots, the
//! token file read again for every request (so a rotated token is used at
//! once). One request at a time on a fresh connection: KMS calls happen at
//! start, on reload and on revalidation, never per value.
//!
//! Vault's own `rewrap` endpoint drops associated data, so it is never
//! used: rewrapping is unwrap then wrap (see `kms`).

use super::KmsError;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// A Transit reply larger than this is not one.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Where the Transit engine is, as `[encryption.kms.NAME]` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitSettings {
    /// `https://host:port`, with an optional path prefix.
    pub address: String,
    pub ca: Option<PathBuf>,
    pub token_file: PathBuf,
    pub mount: String,
    pub key: String,
    /// Each request gets this long, connection included
    /// (`encryption.kms_policy.request_timeout`).
    pub request_timeout: Duration,
}

pub struct Transit {
    host: String,
    port: u16,
    prefix: String,
    tls: Arc<rustls::ClientConfig>,
    settings: TransitSettings,
}

impl std::fmt::Debug for Transit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Transit({}:{}, key {})",
            self.host, self.port, self.settings.key
        )
    }
}

/// `https://host[:port][/prefix]`: host, port and prefix; anything but
/// https is refused.
pub fn parse_address(address: &str) -> Result<(String, u16, String), String> {
    let rest = address.trim().strip_prefix("https://").ok_or_else(|| {
        format!("'{address}' must start with https:// (the token must not travel in plaintext)")
    })?;
    let (authority, prefix) = match rest.find('/') {
        Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            let port = port
                .parse()
                .map_err(|_| format!("'{address}': '{port}' is not a port"))?;
            (host, port)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("'{address}' names no host"));
    }
    Ok((host.to_owned(), port, prefix.to_owned()))
}

impl Transit {
    pub fn new(settings: TransitSettings) -> Result<Transit, String> {
        let (host, port, prefix) = parse_address(&settings.address)?;
        let tls = crate::tls::client::kms(settings.ca.as_deref()).map_err(|e| e.to_string())?;
        Ok(Transit {
            host,
            port,
            prefix,
            tls,
            settings,
        })
    }

    pub async fn wrap(&self, dek: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        let engine = &base64::engine::general_purpose::STANDARD;
        let body = Zeroizing::new(
            serde_json::json!({
                "plaintext": engine.encode(dek),
                "associated_data": engine.encode(aad),
            })
            .to_string(),
        );
        #[derive(serde::Deserialize)]
        struct Reply {
            data: Data,
        }
        #[derive(serde::Deserialize)]
        struct Data {
            ciphertext: String,
        }
        let reply = self.post("encrypt", &body).await?;
        let reply: Reply = serde_json::from_slice(&reply)
            .map_err(|_| KmsError::Invalid("the encrypt reply holds no ciphertext".into()))?;
        Ok(reply.data.ciphertext.into_bytes())
    }

    pub async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let engine = &base64::engine::general_purpose::STANDARD;
        let ciphertext = std::str::from_utf8(wrapped)
            .map_err(|_| KmsError::Invalid("the wrapped key is not a Transit ciphertext".into()))?;
        let body = serde_json::json!({
            "ciphertext": ciphertext,
            "associated_data": engine.encode(aad),
        })
        .to_string();
        #[derive(serde::Deserialize)]
        struct Reply {
            data: Data,
        }
        #[derive(serde::Deserialize)]
        struct Data {
            plaintext: String,
        }
        let reply = self.post("decrypt", &body).await?;
        let reply: Reply = serde_json::from_slice(&reply)
            .map_err(|_| KmsError::Invalid("the decrypt reply holds no plaintext".into()))?;
        let plaintext = Zeroizing::new(reply.data.plaintext);
        engine
            .decode(plaintext.as_bytes())
            .map(Zeroizing::new)
            .map_err(|_| KmsError::Invalid("the decrypt reply's plaintext is not base64".into()))
    }

    /// One POST to `<prefix>/v1/<mount>/<operation>/<key>`: the reply's
    /// body, or the error classified (unreachable, denied, invalid).
    async fn post(&self, operation: &str, body: &str) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let token = std::fs::read_to_string(&self.settings.token_file).map_err(|e| {
            // A token file being replaced is a passing state, not a denial.
            KmsError::Unreachable(format!(
                "cannot read the token file {}: {e}",
                self.settings.token_file.display()
            ))
        })?;
        let token = Zeroizing::new(token);
        let mut token_header = hyper::header::HeaderValue::from_str(token.trim())
            .map_err(|_| KmsError::Denied("the token file holds no valid token".into()))?;
        token_header.set_sensitive(true);
        let path = format!(
            "{}/v1/{}/{operation}/{}",
            self.prefix,
            self.settings.mount.trim_matches('/'),
            self.settings.key
        );
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("X-Vault-Token", token_header)
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|e| KmsError::Invalid(e.to_string()))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| KmsError::Unreachable(format!("connect: {e}")))?;
            let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| KmsError::Invalid(format!("server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| KmsError::Unreachable(format!("TLS: {e}")))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| KmsError::Unreachable(format!("HTTP: {e}")))?;
            let driver = tokio::spawn(connection);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| KmsError::Unreachable(format!("HTTP: {e}")))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| KmsError::Unreachable(format!("reading the reply: {e}")))?
                .to_bytes();
            let body = Zeroizing::new(body.to_vec());
            driver.abort();
            Ok::<_, KmsError>((status, body))
        };
        let timeout = self.settings.request_timeout;
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| KmsError::Unreachable(format!("no answer within {timeout:?}")))??;
        if status.is_success() {
            return Ok(body);
        }
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        // Vault's errors name the problem, never a secret.
        let errors = json["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let why = format!("HTTP {}: {errors}", status.as_u16());
        Err(classify(status.as_u16(), why))
    }
}

/// A status the KMS answered: 5xx (a sealed Vault answers 503), 429 and 408
/// are passing; any other refusal (403 for a revoked token, 400 for a blob
/// that does not authenticate or a disabled key) is a denial.
pub fn classify(status: u16, why: String) -> KmsError {
    match status {
        408 | 429 | 500..=599 => KmsError::Unreachable(why),
        _ => KmsError::Denied(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_https_only() {
        assert_eq!(
            parse_address("https://vault.internal:8200"),
            Ok(("vault.internal".into(), 8200, String::new()))
        );
        assert_eq!(
            parse_address("https://127.0.0.1:8200/prefix/"),
            Ok(("127.0.0.1".into(), 8200, "/prefix".into()))
        );
        assert_eq!(
            parse_address("https://vault"),
            Ok(("vault".into(), 443, String::new()))
        );
        assert_eq!(
            parse_address("https://[::1]:8200"),
            Ok(("::1".into(), 8200, String::new()))
        );
        assert!(
            parse_address("http://vault:8200")
                .unwrap_err()
                .contains("https://")
        );
        assert!(parse_address("https://:8200").is_err());
    }

    #[test]
    fn refusals_are_told_from_outages() {
        for status in [403, 400, 404] {
            assert!(matches!(
                classify(status, String::new()),
                KmsError::Denied(_)
            ));
        }
        for status in [503, 500, 429, 408] {
            assert!(matches!(
                classify(status, String::new()),
                KmsError::Unreachable(_)
            ));
        }
    }
}
