//! The `redcloak keys` commands that change or inspect the keyring file:
//! `new`, `promote`, `list`, `verify`, `import`, `rewrap`, and the file
//! side of `retire`. Each reads the file the configuration names, asks the
//! KMS what it must, and writes the file back atomically. A DEK is made
//! from the OS's random generator and leaves this process only wrapped.

use super::file::{self, DekState, KeyringFile, WrappedDek};
use super::{DekError, Kms, KmsError};
use std::sync::Arc;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(
        "no keyring file: set encryption.keyring_file (an empty one holds `name = \"...\"`) and a provider under [encryption.kms.NAME]"
    )]
    NoKeyringFile,
    #[error("no provider '{0}' under [encryption.kms]")]
    NoProvider(String),
    #[error("key {0} is already in use (raw or in the keyring file)")]
    IdTaken(u32),
    #[error("{0}")]
    Transition(String),
    #[error(transparent)]
    Dek(#[from] DekError),
    #[error("wrapping with '{provider}': {error}")]
    Wrap { provider: String, error: KmsError },
    #[error("{0}")]
    Key(String),
    #[error("writing {path}: {error}")]
    Write { path: String, error: std::io::Error },
}

/// The keyring and providers the configuration names.
pub fn kms(sources: &super::KeySources) -> Result<&Arc<Kms>, ManageError> {
    sources.kms.as_ref().ok_or(ManageError::NoKeyringFile)
}

fn save(kms: &Kms, file: &KeyringFile) -> Result<(), ManageError> {
    file.write(&kms.file_path)
        .map_err(|error| ManageError::Write {
            path: kms.file_path.display().to_string(),
            error,
        })
}

/// Wraps `dek` for `id` with provider `name`: the file's entry.
async fn wrapped(
    kms: &Kms,
    name: &str,
    id: u32,
    dek: &[u8; 32],
    state: DekState,
) -> Result<WrappedDek, ManageError> {
    let provider = kms
        .providers
        .get(name)
        .ok_or_else(|| ManageError::NoProvider(name.to_owned()))?;
    let aad = file::associated_data(&kms.file.name, id);
    let blob = provider
        .wrap(dek, &aad)
        .await
        .map_err(|error| ManageError::Wrap {
            provider: name.to_owned(),
            error,
        })?;
    Ok(WrappedDek {
        id,
        state,
        kms: name.to_owned(),
        wrapped: file::wrapped_text(&blob),
        check: file::check_text(&file::check_value(dek, &kms.file.name, id)),
        created: file::now_text(),
    })
}

/// `keys new`: a DEK from the OS RNG, wrapped by `provider`, added as
/// `pending` (it opens, never seals, until promoted) under `id` or the
/// next free id. Returns the id.
pub async fn new_key(
    sources: &super::KeySources,
    provider: &str,
    id: Option<u32>,
) -> Result<u32, ManageError> {
    let kms = kms(sources)?;
    let taken =
        |id: u32| sources.raw.iter().any(|(raw, _)| *raw == id) || kms.file.get(id).is_some();
    let id = match id {
        Some(id) if taken(id) => return Err(ManageError::IdTaken(id)),
        Some(id) => id,
        None => {
            let highest = sources
                .raw
                .iter()
                .map(|(id, _)| *id)
                .chain(kms.file.keys.iter().map(|d| d.id))
                .max();
            highest.map_or(1, |id| id + 1)
        }
    };
    let mut dek = Zeroizing::new([0u8; 32]);
    crate::crypto::envelope::fill_random(dek.as_mut_slice());
    let entry = wrapped(kms, provider, id, &dek, DekState::Pending).await?;
    // Proved before it is stored: the KMS unwraps what it wrapped.
    let mut file = kms.file.clone();
    file.keys.push(entry.clone());
    kms.unwrap(&entry, None).await?;
    save(kms, &file)?;
    Ok(id)
}

/// `keys promote`: key `id` becomes the active one (the primary), once it
/// unwraps and checks; the active one becomes decrypt-only. Every proxy
/// must already hold the key (it is pending there) before this, as with
/// raw keys: add, reload everywhere, then promote.
pub async fn promote(sources: &super::KeySources, id: u32) -> Result<(), ManageError> {
    let kms = kms(sources)?;
    let dek = kms
        .file
        .get(id)
        .ok_or_else(|| ManageError::Transition(format!("no key {id} in the keyring file")))?;
    kms.unwrap(dek, None).await?;
    let mut file = kms.file.clone();
    file.transition(id, DekState::Active)
        .map_err(ManageError::Transition)?;
    save(kms, &file)
}

/// `keys retire` (the file side): key `id` leaves the loaded set.
pub fn retire(sources: &super::KeySources, id: u32) -> Result<(), ManageError> {
    let kms = kms(sources)?;
    let mut file = kms.file.clone();
    file.transition(id, DekState::Retired)
        .map_err(ManageError::Transition)?;
    save(kms, &file)
}

/// One line of `keys list` / `keys verify`.
#[derive(Debug, serde::Serialize)]
pub struct KeyStatus {
    pub id: u32,
    pub state: &'static str,
    /// The provider, or `raw` for a key from `[[encryption.keys]]`.
    pub kms: String,
    /// Unwrapped and matched its check value (raw keys: always).
    pub check_passed: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
}

/// `keys list` and `keys verify`: every key, raw ones and each DEK that is
/// not destroyed unwrapped and checked.
pub async fn statuses(sources: &super::KeySources) -> Vec<KeyStatus> {
    let mut out: Vec<KeyStatus> = sources
        .raw
        .iter()
        .map(|(id, _)| KeyStatus {
            id: *id,
            state: if Some(*id) == sources.primary {
                "active"
            } else {
                "decrypt-only"
            },
            kms: "raw".into(),
            check_passed: true,
            error: None,
        })
        .collect();
    if let Some(kms) = &sources.kms {
        for dek in &kms.file.keys {
            let (check_passed, error) = if dek.state == DekState::Destroyed {
                (false, Some("destroyed".to_owned()))
            } else {
                match kms.unwrap(dek, None).await {
                    Ok(_) => (true, None),
                    Err(err) => (false, Some(err.to_string())),
                }
            };
            out.push(KeyStatus {
                id: dek.id,
                state: dek.state.label(),
                kms: dek.kms.clone(),
                check_passed,
                error,
            });
        }
    }
    out.sort_by_key(|s| s.id);
    out
}

/// `keys import`: a raw key (base64, as `redcloak keygen` prints it) moved
/// under provider `name` as key `id`, `decrypt-only`. Its
/// `[[encryption.keys]]` entry must then go from the configuration (ids are
/// unique); `keys promote` makes it active if it was the primary.
pub async fn import(
    sources: &super::KeySources,
    id: u32,
    key_text: &[u8],
    provider: &str,
) -> Result<(), ManageError> {
    let kms = kms(sources)?;
    if kms.file.get(id).is_some() {
        return Err(ManageError::IdTaken(id));
    }
    let key = crate::crypto::keyring::decode_key(id, key_text)
        .map_err(|e| ManageError::Key(e.to_string()))?;
    let configured = sources.raw.iter().find(|(raw, _)| *raw == id);
    if configured
        .is_some_and(|(_, raw)| !bool::from(subtle::ConstantTimeEq::ct_eq(&raw[..], &key[..])))
    {
        return Err(ManageError::Key(format!(
            "the key in this file is not [[encryption.keys]] id {id}"
        )));
    }
    let entry = wrapped(kms, provider, id, &key, DekState::DecryptOnly).await?;
    kms.unwrap(&entry, None).await?;
    let mut file = kms.file.clone();
    file.keys.push(entry);
    file.keys.sort_by_key(|d| d.id);
    save(kms, &file)
}

/// `keys rewrap`: every DEK that is not destroyed unwrapped by its provider
/// and wrapped again by `to` (KEK rotation, or a move between providers),
/// and every raw key (`[[encryption.keys]]`) not yet in the file wrapped by
/// `to` (active if it is the primary, else decrypt-only), each checked
/// before the file is written, atomically, all at once. Never the KMS's own
/// rewrap (Vault's drops associated data). Returns how many.
pub async fn rewrap(sources: &super::KeySources, to: &str) -> Result<usize, ManageError> {
    let kms = kms(sources)?;
    if !kms.providers.contains_key(to) {
        return Err(ManageError::NoProvider(to.to_owned()));
    }
    let mut file = kms.file.clone();
    let mut count = 0;
    for entry in file.keys.iter_mut() {
        if entry.state == DekState::Destroyed {
            continue;
        }
        let dek = kms.unwrap(entry, None).await?;
        let mut again = wrapped(kms, to, entry.id, &dek, entry.state).await?;
        kms.unwrap(&again, None).await?;
        again.created = entry.created.clone();
        *entry = again;
        count += 1;
    }
    for (id, key) in &sources.raw {
        if file.get(*id).is_some() {
            continue;
        }
        let state = if sources.primary == Some(*id) && file.active().is_none() {
            DekState::Active
        } else {
            DekState::DecryptOnly
        };
        let entry = wrapped(kms, to, *id, key, state).await?;
        kms.unwrap(&entry, None).await?;
        file.keys.push(entry);
        count += 1;
    }
    file.keys.sort_by_key(|d| d.id);
    save(kms, &file)?;
    Ok(count)
}
