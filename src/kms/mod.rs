//! Data keys wrapped by a KMS. The keyring file (`file`) lists each data
//! key (DEK) wrapped by a key-encryption key that never leaves a KMS
//! (`vault`: Vault or OpenBao Transit; `aws`: AWS KMS; `pkcs11`: an HSM); redcloak unwraps them at start and
//! on reload, checks each against its check value, and holds them in
//! memory (zeroized on drop). No KMS request is made per value.
//!
//! While running, [`revalidate`] unwraps each DEK again every
//! `encryption.kms_policy.revalidate_every` (with jitter, one request at a
//! time):
//! - a denial (a revoked token, a disabled key) or a bad check value drops
//!   the DEK: its values fail to open as revoked, and if it was the primary
//!   writes to encrypted keys are refused (never sealed under another key,
//!   never stored in plaintext);
//! - an unreachable KMS changes nothing (serving goes on from memory),
//!   unless `max_unreachable` bounds it: past that, the provider's DEKs are
//!   dropped as if denied;
//! - a KMS that allows the DEK again restores it.

pub mod aws;
pub mod file;
pub mod manage;
pub mod pkcs11;
pub mod vault;

use crate::crypto::keyring::{Keyring, LegacyPlaintext};
use crate::crypto::{CurrentKeyring, KeyError};
use crate::telemetry::{Telemetry, events};
use arc_swap::ArcSwapOption;
use file::{KeyringFile, WrappedDek};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

/// What a KMS answered, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KmsError {
    /// No answer, or a passing one (5xx, 429, a sealed Vault): retried.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The KMS refused (403, a disabled key, a blob that does not
    /// authenticate): the DEK is dropped.
    #[error("denied: {0}")]
    Denied(String),
    /// An answer that is not one (the DEK cannot be used).
    #[error("invalid answer: {0}")]
    Invalid(String),
}

/// How a provider is reached, as `[encryption.kms.NAME]` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderSettings {
    VaultTransit(vault::TransitSettings),
    Aws(aws::AwsSettings),
    Pkcs11(pkcs11::Pkcs11Settings),
}

/// One KMS provider, ready to use.
#[derive(Debug)]
pub enum Provider {
    VaultTransit(vault::Transit),
    #[cfg(feature = "aws-kms")]
    Aws(aws::Aws),
    Pkcs11(pkcs11::Token),
}

impl Provider {
    pub fn new(settings: ProviderSettings) -> Result<Provider, String> {
        match settings {
            ProviderSettings::VaultTransit(settings) => {
                vault::Transit::new(settings).map(Provider::VaultTransit)
            }
            ProviderSettings::Pkcs11(settings) => {
                pkcs11::Token::new(settings).map(Provider::Pkcs11)
            }
            #[cfg(feature = "aws-kms")]
            ProviderSettings::Aws(settings) => aws::Aws::new(settings).map(Provider::Aws),
            #[cfg(not(feature = "aws-kms"))]
            ProviderSettings::Aws(_) => Err(
                "this redcloak is built without the aws-kms feature (cargo build --features aws-kms)"
                    .into(),
            ),
        }
    }

    /// The kind, as `type` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::VaultTransit(_) => "vault-transit",
            Provider::Pkcs11(_) => "pkcs11",
            #[cfg(feature = "aws-kms")]
            Provider::Aws(_) => "aws-kms",
        }
    }

    pub async fn wrap(&self, dek: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        match self {
            Provider::VaultTransit(transit) => transit.wrap(dek, aad).await,
            Provider::Pkcs11(token) => token.wrap(dek, aad).await,
            #[cfg(feature = "aws-kms")]
            Provider::Aws(aws) => aws.wrap(dek, aad).await,
        }
    }

    pub async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        match self {
            Provider::VaultTransit(transit) => transit.unwrap(wrapped, aad).await,
            Provider::Pkcs11(token) => token.unwrap(wrapped, aad).await,
            #[cfg(feature = "aws-kms")]
            Provider::Aws(aws) => aws.unwrap(wrapped, aad).await,
        }
    }
}

/// `[encryption.kms_policy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsPolicy {
    /// How long start waits for an unreachable KMS (retrying with backoff).
    pub startup_timeout: Duration,
    /// How often each DEK is unwrapped again while running.
    pub revalidate_every: Duration,
    /// After this long unreachable, a provider's DEKs are dropped (`None`:
    /// serve from memory however long it lasts).
    pub max_unreachable: Option<Duration>,
    /// How long one KMS request may take, connection included.
    pub request_timeout: Duration,
}

impl Default for KmsPolicy {
    fn default() -> Self {
        KmsPolicy {
            startup_timeout: Duration::from_secs(30),
            revalidate_every: Duration::from_secs(15 * 60),
            max_unreachable: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The keyring file and the providers its keys name.
#[derive(Debug)]
pub struct Kms {
    pub file_path: PathBuf,
    pub file: KeyringFile,
    pub providers: BTreeMap<String, Provider>,
    pub policy: KmsPolicy,
}

/// Why a DEK cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DekError {
    #[error("key {id}: KMS '{provider}' {error}")]
    Kms {
        id: u32,
        provider: String,
        error: KmsError,
    },
    #[error(
        "key {id}: the unwrapped key does not match its check value (a blob from another key or keyring, or another KEK)"
    )]
    BadCheck { id: u32, provider: String },
    #[error("key {id} is {state}: it is not loaded")]
    NotLoaded { id: u32, state: &'static str },
}

impl DekError {
    /// The KMS did not answer (as opposed to refusing).
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            DekError::Kms {
                error: KmsError::Unreachable(_),
                ..
            }
        )
    }

    pub fn provider(&self) -> &str {
        match self {
            DekError::Kms { provider, .. } | DekError::BadCheck { provider, .. } => provider,
            DekError::NotLoaded { .. } => "",
        }
    }
}

/// Why the keyring could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(
        "{error}; still failing after encryption.kms_policy.startup_timeout ({timeout:?}): check that the KMS is up and reachable from here"
    )]
    Unreachable { error: DekError, timeout: Duration },
    #[error("{0}")]
    Refused(DekError),
    #[error("encryption: {0}")]
    Keyring(#[from] KeyError),
    #[error(
        "key {0} is both in [[encryption.keys]] and in the keyring file, and they are not the same key: remove one"
    )]
    Conflict(u32),
    #[error(
        "no key seals: the keyring file has no active key and encryption.primary is not set \
         (`redcloak keys new --kms NAME`, reload, then `redcloak keys promote --id ID`)"
    )]
    NoActiveKey,
}

impl Kms {
    fn provider(&self, dek: &WrappedDek) -> Result<&Provider, DekError> {
        self.providers.get(&dek.kms).ok_or_else(|| DekError::Kms {
            id: dek.id,
            provider: dek.kms.clone(),
            error: KmsError::Invalid("no such provider under [encryption.kms]".into()),
        })
    }

    /// Unwraps one DEK and checks it against its check value.
    pub async fn unwrap(
        &self,
        dek: &WrappedDek,
        telemetry: Option<&Telemetry>,
    ) -> Result<Zeroizing<[u8; 32]>, DekError> {
        let provider = self.provider(dek)?;
        let fail = |error| DekError::Kms {
            id: dek.id,
            provider: dek.kms.clone(),
            error,
        };
        let wrapped = dek
            .wrapped_bytes()
            .ok_or_else(|| fail(KmsError::Invalid("wrapped is not base64".into())))?;
        let aad = file::associated_data(&self.file.name, dek.id);
        let result = provider.unwrap(&wrapped, &aad).await;
        if let Some(telemetry) = telemetry {
            let label = match &result {
                Ok(_) => "ok",
                Err(KmsError::Unreachable(_)) => "unreachable",
                Err(_) => "denied",
            };
            telemetry.metrics.kms_request(&dek.kms, label);
            let answered = !matches!(result, Err(KmsError::Unreachable(_)));
            telemetry.metrics.set_kms_up(&dek.kms, answered);
        }
        let plaintext = result.map_err(fail)?;
        let bad_check = || DekError::BadCheck {
            id: dek.id,
            provider: dek.kms.clone(),
        };
        let key: [u8; 32] = plaintext[..].try_into().map_err(|_| bad_check())?;
        let key = Zeroizing::new(key);
        let expected = dek.check_bytes().ok_or_else(bad_check)?;
        let actual = file::check_value(&key, &self.file.name, dek.id);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&actual[..], &expected[..])) {
            return Err(bad_check());
        }
        Ok(key)
    }

    /// Every loaded DEK (pending, active, decrypt-only), unwrapped and
    /// checked. An unreachable KMS is retried with backoff for `patience`;
    /// a denial or a bad check value fails at once, naming the DEK.
    pub async fn unwrap_loaded(
        &self,
        patience: Duration,
        telemetry: Option<&Telemetry>,
    ) -> Result<Vec<(u32, Zeroizing<[u8; 32]>)>, KeysError> {
        let started = Instant::now();
        let mut keys = Vec::new();
        for dek in self.file.keys.iter().filter(|d| d.state.loaded()) {
            let mut backoff = Duration::from_millis(200);
            loop {
                match self.unwrap(dek, telemetry).await {
                    Ok(key) => {
                        keys.push((dek.id, key));
                        break;
                    }
                    Err(error) if error.unreachable() => {
                        if started.elapsed() + backoff > patience {
                            return Err(KeysError::Unreachable {
                                error,
                                timeout: patience,
                            });
                        }
                        tracing::warn!(%error, retry_in = ?backoff, "KMS unreachable at start: retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    Err(error) => return Err(KeysError::Refused(error)),
                }
            }
        }
        Ok(keys)
    }
}

/// Where the data keys come from: raw keys (`[[encryption.keys]]`, from
/// files or variables) and a keyring file of KMS-wrapped keys. Both may be
/// used together (ids are unique across them); the primary is the keyring
/// file's active key, or `encryption.primary`.
pub struct KeySources {
    /// `None` only with a keyring file that has no active key yet: serving
    /// refuses to start until one is promoted.
    pub primary: Option<u32>,
    pub raw: Vec<(u32, Zeroizing<[u8; 32]>)>,
    pub legacy: LegacyPlaintext,
    pub kms: Option<Arc<Kms>>,
}

/// Ids only: never a key.
impl std::fmt::Debug for KeySources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySources")
            .field("primary", &self.primary)
            .field(
                "raw_ids",
                &self.raw.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("legacy", &self.legacy)
            .field("kms", &self.kms)
            .finish()
    }
}

impl KeySources {
    /// The keyring: raw keys as they are, wrapped ones unwrapped (waiting
    /// up to `patience` for an unreachable KMS).
    pub async fn keyring(
        &self,
        patience: Duration,
        telemetry: Option<&Telemetry>,
    ) -> Result<Keyring, KeysError> {
        let mut keys = self.raw.clone();
        if let Some(kms) = &self.kms {
            for (id, key) in kms.unwrap_loaded(patience, telemetry).await? {
                match self.raw.iter().find(|(raw, _)| *raw == id) {
                    // A raw key on its way under the KMS: the same key, once.
                    Some((_, raw))
                        if bool::from(subtle::ConstantTimeEq::ct_eq(&raw[..], &key[..])) => {}
                    Some(_) => return Err(KeysError::Conflict(id)),
                    None => keys.push((id, key)),
                }
            }
        }
        let primary = self.primary.ok_or(KeysError::NoActiveKey)?;
        Ok(Keyring::new(primary, keys, self.legacy)?)
    }

    /// A digest of where the keys come from (the primary, the legacy
    /// policy, each raw key's SHA-256, the keyring file and the providers'
    /// settings): a reload unwraps only when it changed.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(self.primary.unwrap_or(0).to_be_bytes());
        hash.update(format!("{:?}", self.legacy));
        for (id, key) in &self.raw {
            hash.update(id.to_be_bytes());
            hash.update(Sha256::digest(&key[..]));
        }
        if let Some(kms) = &self.kms {
            hash.update(kms.file.to_text());
            hash.update(format!("{:?}{:?}", kms.providers, kms.policy));
        }
        hash.finalize().into()
    }

    /// How long start waits for an unreachable KMS.
    pub fn startup_timeout(&self) -> Duration {
        self.kms
            .as_ref()
            .map_or(Duration::ZERO, |kms| kms.policy.startup_timeout)
    }
}

/// The keyring file in use, for [`revalidate`]; a reload replaces it.
pub type CurrentKms = Arc<ArcSwapOption<Kms>>;

/// `interval`, give or take a tenth, so proxies started together do not
/// ask the KMS together.
fn jittered(interval: Duration) -> Duration {
    let mut byte = [0u8; 1];
    crate::crypto::envelope::fill_random(&mut byte);
    let tenth = interval / 10;
    interval - tenth + tenth * 2 * u32::from(byte[0]) / 255
}

/// Unwraps each loaded DEK again every `revalidate_every` until
/// `shutdown`, dropping those a KMS denies and restoring those it allows
/// again (see the module's documentation).
pub async fn revalidate(
    kms: CurrentKms,
    keyring: Arc<CurrentKeyring>,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) {
    // Since when each provider has been unreachable.
    let mut unreachable_since: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let Some(current) = kms.load_full() else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(jittered(current.policy.revalidate_every)) => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(current) = kms.load_full() else {
            return;
        };
        // One warning per provider per round.
        let mut warned = std::collections::BTreeSet::new();
        for dek in current.file.keys.iter().filter(|d| d.state.loaded()) {
            let provider = dek.kms.as_str();
            match current.unwrap(dek, Some(&telemetry)).await {
                Ok(key) => {
                    unreachable_since.remove(provider);
                    let mut restored = false;
                    keyring.update(|ring| {
                        restored = ring.revoked().contains(&dek.id);
                        restored.then(|| ring.restoring(dek.id, &key))
                    });
                    if restored {
                        events::key_restored(provider, dek.id);
                    }
                }
                Err(error) if error.unreachable() => {
                    let since = *unreachable_since
                        .entry(provider.to_owned())
                        .or_insert_with(Instant::now);
                    if warned.insert(provider) {
                        events::kms_unreachable(provider, dek.id, &error);
                    }
                    let bounded = current.policy.max_unreachable;
                    if bounded.is_some_and(|bound| since.elapsed() >= bound) {
                        revoke(&keyring, dek, &error);
                    }
                }
                Err(error) => {
                    unreachable_since.remove(provider);
                    revoke(&keyring, dek, &error);
                }
            }
        }
    }
}

fn revoke(keyring: &CurrentKeyring, dek: &WrappedDek, error: &DekError) {
    let mut revoked = false;
    keyring.update(|ring| {
        revoked = !ring.revoked().contains(&dek.id);
        revoked.then(|| ring.revoking(dek.id))
    });
    if revoked {
        events::key_revoked(&dek.kms, dek.id, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_key_ids_never_keys() {
        let sources = KeySources {
            primary: Some(1),
            raw: vec![(1, Zeroizing::new([0xAB; 32]))],
            legacy: LegacyPlaintext::Reject,
            kms: None,
        };
        let text = format!("{sources:?}");
        assert!(
            text.contains("raw_ids: [1]") && !text.contains("171"),
            "{text}"
        );
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        for _ in 0..200 {
            let d = jittered(Duration::from_secs(100));
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
    }
}
