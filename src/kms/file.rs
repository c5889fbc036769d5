//! The keyring file (`encryption.keyring_file`): each data key (DEK)
//! wrapped by a KMS, its state and its check value. It holds no secret, so
//! a ConfigMap will do. Pure, but for reading the file and writing it
//! atomically.
//!
//! ```toml
//! name = "orders"
//! [[keys]]
//! id = 3
//! state = "active"            # pending | active | decrypt-only | retired | destroyed
//! kms = "vault"               # a provider under [encryption.kms.NAME]
//! wrapped = "dmF1bHQ6djE6..." # base64 of what the KMS returned
//! check = "9f1c..."           # hex of the 16-byte key-check value
//! created = "2026-11-30T19:00:00Z"
//! ```

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;

/// What every wrap binds as associated data (and the check value covers):
/// `redcloak-dek-v1|<keyring name>|<id>`.
pub fn associated_data(name: &str, id: u32) -> Vec<u8> {
    format!("redcloak-dek-v1|{name}|{id}").into_bytes()
}

/// The 16-byte key-check value of a DEK: HMAC-SHA256 under the DEK of a
/// fixed label, the keyring's name and the id. Verified after every unwrap,
/// it catches a blob swapped between ids or keyrings and a wrong KEK (also
/// where the wrap mechanism binds no associated data).
pub fn check_value(dek: &[u8; 32], name: &str, id: u32) -> [u8; 16] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(dek).expect("HMAC takes any key length");
    mac.update(b"redcloak-dek-check-v1\0");
    mac.update(name.as_bytes());
    mac.update(b"\0");
    mac.update(&id.to_be_bytes());
    let full = mac.finalize().into_bytes();
    let mut check = [0u8; 16];
    check.copy_from_slice(&full[..16]);
    check
}

/// A DEK's life: created `pending` (opens, never seals), made `active`
/// (exactly one: the primary), `decrypt-only` once another is active,
/// `retired` (not loaded), `destroyed` (its wrapped blob erased).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DekState {
    Pending,
    Active,
    DecryptOnly,
    Retired,
    Destroyed,
}

impl DekState {
    /// Whether redcloak unwraps and holds it.
    pub fn loaded(self) -> bool {
        matches!(
            self,
            DekState::Pending | DekState::Active | DekState::DecryptOnly
        )
    }

    /// The transitions there are. `active -> decrypt-only` happens only
    /// when another key is promoted.
    pub fn can_become(self, next: DekState) -> bool {
        use DekState::*;
        matches!(
            (self, next),
            (Pending, Active)
                | (Pending, Destroyed)
                | (Active, DecryptOnly)
                | (DecryptOnly, Active)
                | (DecryptOnly, Retired)
                | (Retired, DecryptOnly)
                | (Retired, Destroyed)
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            DekState::Pending => "pending",
            DekState::Active => "active",
            DekState::DecryptOnly => "decrypt-only",
            DekState::Retired => "retired",
            DekState::Destroyed => "destroyed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringFile {
    /// Bound into every wrap and check value: a blob moved from another
    /// keyring does not unwrap (or check) here.
    pub name: String,
    #[serde(default)]
    pub keys: Vec<WrappedDek>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedDek {
    pub id: u32,
    pub state: DekState,
    pub kms: String,
    /// Base64 of the KMS's wrapped DEK (empty once destroyed).
    #[serde(default)]
    pub wrapped: String,
    /// Hex of the 16-byte check value.
    pub check: String,
    pub created: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("keyring file {path}: {why}")]
    Invalid { path: String, why: String },
}

impl WrappedDek {
    /// The check value, decoded.
    pub fn check_bytes(&self) -> Option<[u8; 16]> {
        let text = self.check.trim();
        if text.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(out)
    }

    /// The wrapped blob, decoded.
    pub fn wrapped_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(self.wrapped.trim())
            .ok()
    }
}

/// Hex of a check value, as the file holds it.
pub fn check_text(check: &[u8; 16]) -> String {
    crate::crypto::hex(check)
}

/// Base64 of a wrapped blob, as the file holds it.
pub fn wrapped_text(wrapped: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(wrapped)
}

/// Now, as the file's `created` holds it (RFC 3339, UTC).
pub fn now_text() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|now| {
            now.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl KeyringFile {
    /// Parses and checks the file's own rules: a name, ids unique, at most
    /// one active key, each loaded key with a well-formed blob and check
    /// value, every provider among `providers`.
    pub fn parse(path: &Path, text: &str, providers: &[&str]) -> Result<KeyringFile, FileError> {
        let invalid = |why: String| FileError::Invalid {
            path: path.display().to_string(),
            why,
        };
        let file: KeyringFile = toml_from_str(text).map_err(invalid)?;
        file.validate(providers).map_err(invalid)?;
        Ok(file)
    }

    pub fn validate(&self, providers: &[&str]) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        let mut ids = std::collections::BTreeSet::new();
        for dek in &self.keys {
            if !ids.insert(dek.id) {
                return Err(format!("key id {} appears twice", dek.id));
            }
            if !providers.contains(&dek.kms.as_str()) {
                return Err(format!(
                    "key {}: kms = \"{}\" is not under [encryption.kms] (have: {})",
                    dek.id,
                    dek.kms,
                    providers.join(", ")
                ));
            }
            if dek.check_bytes().is_none() {
                return Err(format!("key {}: check must be 32 hex digits", dek.id));
            }
            if dek.state != DekState::Destroyed && dek.wrapped_bytes().is_none_or(|b| b.is_empty())
            {
                return Err(format!("key {}: wrapped must be base64", dek.id));
            }
        }
        let active = self
            .keys
            .iter()
            .filter(|d| d.state == DekState::Active)
            .count();
        if active > 1 {
            return Err(format!("{active} keys are active: exactly one may be"));
        }
        Ok(())
    }

    /// The active key's id (the primary).
    pub fn active(&self) -> Option<u32> {
        self.keys
            .iter()
            .find(|d| d.state == DekState::Active)
            .map(|d| d.id)
    }

    pub fn get(&self, id: u32) -> Option<&WrappedDek> {
        self.keys.iter().find(|d| d.id == id)
    }

    /// Moves key `id` to `next`, if that transition exists. Promoting a key
    /// makes the active one decrypt-only; destroying erases the blob.
    pub fn transition(&mut self, id: u32, next: DekState) -> Result<(), String> {
        let Some(current) = self.get(id).map(|d| d.state) else {
            return Err(format!("no key {id} in the keyring file"));
        };
        if current == next {
            return Ok(());
        }
        if !current.can_become(next) {
            return Err(format!(
                "key {id} is {}: it cannot become {}",
                current.label(),
                next.label()
            ));
        }
        if next == DekState::Active {
            for dek in &mut self.keys {
                if dek.state == DekState::Active {
                    dek.state = DekState::DecryptOnly;
                }
            }
        }
        for dek in &mut self.keys {
            if dek.id == id {
                dek.state = next;
                if next == DekState::Destroyed {
                    dek.wrapped.clear();
                }
            }
        }
        Ok(())
    }

    pub fn to_text(&self) -> String {
        toml_to_string(self)
    }

    /// Writes the file atomically (a temporary file beside it, then a
    /// rename), mode 0644: it holds no secret.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
        std::io::Write::write_all(&mut tmp, self.to_text().as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

fn toml_from_str(text: &str) -> Result<KeyringFile, String> {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| e.to_string())
}

/// TOML as people write it: the name, then one `[[keys]]` table per key.
fn toml_to_string(file: &KeyringFile) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut out = format!(
        "# redcloak keyring: data keys wrapped by a KMS (no secrets here).\nname = {}\n",
        quote(&file.name)
    );
    for dek in &file.keys {
        out.push_str(&format!(
            "\n[[keys]]\nid = {}\nstate = {}\nkms = {}\nwrapped = {}\ncheck = {}\ncreated = {}\n",
            dek.id,
            quote(dek.state.label()),
            quote(&dek.kms),
            quote(&dek.wrapped),
            quote(&dek.check),
            quote(&dek.created)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dek(id: u32, state: DekState) -> WrappedDek {
        WrappedDek {
            id,
            state,
            kms: "vault".into(),
            wrapped: wrapped_text(b"blob"),
            check: check_text(&check_value(&[id as u8; 32], "orders", id)),
            created: "2026-11-30T19:00:00Z".into(),
        }
    }

    #[test]
    fn the_file_round_trips_and_is_validated() {
        let file = KeyringFile {
            name: "orders".into(),
            keys: vec![dek(1, DekState::DecryptOnly), dek(2, DekState::Active)],
        };
        let text = file.to_text();
        let back = KeyringFile::parse(Path::new("k.toml"), &text, &["vault"]).expect("parses");
        assert_eq!(back, file);
        assert_eq!(back.active(), Some(2));
        let err = KeyringFile::parse(Path::new("k.toml"), &text, &["aws"]).unwrap_err();
        assert!(
            err.to_string().contains("kms = \"vault\" is not under"),
            "{err}"
        );
        let two_active = text.replace("decrypt-only", "active");
        let err = KeyringFile::parse(Path::new("k.toml"), &two_active, &["vault"]).unwrap_err();
        assert!(err.to_string().contains("2 keys are active"), "{err}");
        let twice = text.replace("id = 1", "id = 2");
        assert!(KeyringFile::parse(Path::new("k.toml"), &twice, &["vault"]).is_err());
        let bad_state = text.replace("decrypt-only", "enabled");
        assert!(KeyringFile::parse(Path::new("k.toml"), &bad_state, &["vault"]).is_err());
    }

    #[test]
    fn only_the_allowed_transitions_happen() {
        let mut file = KeyringFile {
            name: "orders".into(),
            keys: vec![dek(1, DekState::Active), dek(2, DekState::Pending)],
        };
        assert!(
            file.transition(2, DekState::Retired).is_err(),
            "pending cannot retire"
        );
        assert!(
            file.transition(1, DekState::Retired).is_err(),
            "active cannot retire"
        );
        file.transition(2, DekState::Active).expect("promote");
        assert_eq!(file.get(1).map(|d| d.state), Some(DekState::DecryptOnly));
        assert_eq!(file.active(), Some(2));
        file.transition(1, DekState::Retired).expect("retire");
        assert!(
            file.transition(1, DekState::Active).is_err(),
            "retired cannot seal"
        );
        file.transition(1, DekState::Destroyed).expect("destroy");
        assert!(file.get(1).is_some_and(|d| d.wrapped.is_empty()));
        assert!(file.transition(1, DekState::DecryptOnly).is_err());
    }

    #[test]
    fn the_check_value_binds_the_key_name_and_id() {
        let key = [7u8; 32];
        let check = check_value(&key, "orders", 1);
        assert_ne!(check, check_value(&[8u8; 32], "orders", 1));
        assert_ne!(check, check_value(&key, "billing", 1));
        assert_ne!(check, check_value(&key, "orders", 2));
        assert_eq!(check, check_value(&key, "orders", 1));
    }
}
