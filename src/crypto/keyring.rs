//! The keyring: data keys by id, the primary that seals, and what to do
//! with values stored before encryption was turned on.
//!
//! Rotation: add the new key to every proxy (it opens values at once), then
//! make it `primary` (new values are sealed with it). Values sealed with the
//! old key stay readable while the old key is in the ring.

use super::envelope::{self, Binding, DataKey, OpenError};
use arc_swap::{ArcSwap, Guard};
use base64::Engine;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use zeroize::Zeroizing;

/// How to treat a stored value that is not an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyPlaintext {
    /// An error in the value's place (the default).
    Reject,
    /// Returned as stored, and counted (for migrations).
    Pass,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key {id}: expected base64 of 32 bytes (make one with `redcloak keygen`)")]
    Malformed { id: u32 },
    #[error("key id {0} appears twice")]
    DuplicateId(u32),
    #[error("primary key id {0} is not among encryption.keys")]
    NoPrimary(u32),
}

/// The primary key was revoked by its KMS: nothing is sealed (never under
/// another key, never stored in plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key {0} revoked by the KMS: writes to encrypted keys are refused")]
pub struct PrimaryRevoked(pub u32);

/// A value read back from Redis.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'a> {
    Plaintext(Vec<u8>),
    /// A legacy plaintext value, passed as stored.
    Legacy(&'a [u8]),
}

pub struct Keyring {
    primary: u32,
    /// Shared with the keyrings derived from this one (a key revoked or
    /// restored): a key's bytes are zeroized when its last keyring goes.
    keys: BTreeMap<u32, Arc<Slot>>,
    /// Keys a KMS refused to unwrap while running: dropped from `keys`;
    /// their values fail to open as revoked.
    revoked: BTreeSet<u32>,
    legacy: LegacyPlaintext,
    legacy_values_read: AtomicU64,
}

/// A key and how often it has sealed and opened (rotation progress).
struct Slot {
    key: DataKey,
    sealed: AtomicU64,
    opened: AtomicU64,
}

impl Slot {
    fn new(id: u32, key: &[u8; 32]) -> Arc<Slot> {
        Arc::new(Slot {
            key: DataKey::new(id, key),
            sealed: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        })
    }
}

/// Values sealed and opened with one key since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUse {
    pub id: u32,
    pub sealed: u64,
    pub opened: u64,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("revoked", &self.revoked)
            .field("legacy", &self.legacy)
            .finish()
    }
}

/// Decodes a key as stored in a file or variable: base64 of 32 bytes.
pub fn decode_key(id: u32, text: &[u8]) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let trimmed = text.trim_ascii();
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .map_err(|_| KeyError::Malformed { id })?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    if decoded.len() != key.len() {
        return Err(KeyError::Malformed { id });
    }
    key.copy_from_slice(&decoded);
    Ok(key)
}

/// A new random key, base64 encoded (for `redcloak keygen`).
pub fn generate_key() -> Zeroizing<String> {
    let mut key = Zeroizing::new([0u8; 32]);
    envelope::fill_random(key.as_mut_slice());
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_slice()))
}

impl Keyring {
    pub fn new(
        primary: u32,
        keys: Vec<(u32, Zeroizing<[u8; 32]>)>,
        legacy: LegacyPlaintext,
    ) -> Result<Keyring, KeyError> {
        let mut ring = BTreeMap::new();
        for (id, key) in keys {
            if ring.insert(id, Slot::new(id, &key)).is_some() {
                return Err(KeyError::DuplicateId(id));
            }
        }
        if !ring.contains_key(&primary) {
            return Err(KeyError::NoPrimary(primary));
        }
        Ok(Keyring {
            primary,
            keys: ring,
            revoked: BTreeSet::new(),
            legacy,
            legacy_values_read: AtomicU64::new(0),
        })
    }

    /// This keyring with key `id` dropped because its KMS refused it: its
    /// values fail to open as revoked, and if it is the primary nothing is
    /// sealed. The other keys are shared, not copied.
    pub fn revoking(&self, id: u32) -> Keyring {
        let mut keys = self.keys.clone();
        keys.remove(&id);
        let mut revoked = self.revoked.clone();
        revoked.insert(id);
        self.derived(keys, revoked)
    }

    /// This keyring with a revoked key `id` back (its KMS allows it again).
    pub fn restoring(&self, id: u32, key: &[u8; 32]) -> Keyring {
        let mut keys = self.keys.clone();
        keys.insert(id, Slot::new(id, key));
        let mut revoked = self.revoked.clone();
        revoked.remove(&id);
        self.derived(keys, revoked)
    }

    fn derived(&self, keys: BTreeMap<u32, Arc<Slot>>, revoked: BTreeSet<u32>) -> Keyring {
        Keyring {
            primary: self.primary,
            keys,
            revoked,
            legacy: self.legacy,
            legacy_values_read: AtomicU64::new(0),
        }
    }

    /// Keys revoked by their KMS while running.
    pub fn revoked(&self) -> &BTreeSet<u32> {
        &self.revoked
    }

    fn primary_slot(&self) -> Result<&Slot, PrimaryRevoked> {
        self.keys
            .get(&self.primary)
            .map(|slot| &**slot)
            .ok_or(PrimaryRevoked(self.primary))
    }

    /// Whether values can be sealed (the primary is not revoked).
    pub fn can_seal(&self) -> Result<(), PrimaryRevoked> {
        self.primary_slot().map(|_| ())
    }

    pub fn primary_id(&self) -> u32 {
        self.primary
    }

    /// Seals with the primary key.
    pub fn seal(&self, value: &[u8], binding: Binding<'_>) -> Result<Vec<u8>, PrimaryRevoked> {
        let slot = self.primary_slot()?;
        slot.sealed.fetch_add(1, Ordering::Relaxed);
        Ok(slot.key.seal(value, binding))
    }

    /// Seals with the key `id` (`None`: no such key): `redcloak rekey
    /// --to-key` rolls values back to a key that is not the primary.
    pub fn seal_with(&self, id: u32, value: &[u8], binding: Binding<'_>) -> Option<Vec<u8>> {
        let slot = self.keys.get(&id)?;
        slot.sealed.fetch_add(1, Ordering::Relaxed);
        Some(slot.key.seal(value, binding))
    }

    /// Seals a member deterministically with the key `id` (`None`: no such key).
    pub fn seal_member_with(
        &self,
        id: u32,
        member: &[u8],
        binding: Binding<'_>,
    ) -> Option<Vec<u8>> {
        let slot = self.keys.get(&id)?;
        slot.sealed.fetch_add(1, Ordering::Relaxed);
        Some(slot.key.seal_member(member, binding))
    }

    /// Whether the keyring holds a key `id`.
    pub fn has(&self, id: u32) -> bool {
        self.keys.contains_key(&id)
    }

    /// Seals a member deterministically with the primary key: equal
    /// members under one binding give equal envelopes (see `envelope`).
    pub fn seal_member(
        &self,
        member: &[u8],
        binding: Binding<'_>,
    ) -> Result<Vec<u8>, PrimaryRevoked> {
        let slot = self.primary_slot()?;
        slot.sealed.fetch_add(1, Ordering::Relaxed);
        Ok(slot.key.seal_member(member, binding))
    }

    /// The HyperLogLog token of `element` under the primary key (see
    /// `DataKey::token`).
    pub fn token(
        &self,
        element: &[u8],
        binding: Binding<'_>,
    ) -> Result<[u8; envelope::TOKEN_LEN], PrimaryRevoked> {
        Ok(self.primary_slot()?.key.token(element, binding))
    }

    /// Opens a stored value (either envelope), applying the legacy-plaintext policy.
    pub fn open<'a>(
        &self,
        stored: &'a [u8],
        binding: Binding<'_>,
    ) -> Result<Opened<'a>, OpenError> {
        let id = match envelope::key_id(stored) {
            Ok(id) => id,
            Err(OpenError::NotAnEnvelope) if self.legacy == LegacyPlaintext::Pass => {
                self.legacy_values_read.fetch_add(1, Ordering::Relaxed);
                return Ok(Opened::Legacy(stored));
            }
            Err(err) => return Err(err),
        };
        if self.revoked.contains(&id) {
            return Err(OpenError::Revoked(id));
        }
        let plaintext = envelope::open(stored, binding, |id| self.keys.get(&id).map(|s| &s.key))?;
        if let Some(slot) = self.keys.get(&id) {
            slot.opened.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Opened::Plaintext(plaintext))
    }

    /// Per key: values sealed and opened since start, by key id.
    pub fn key_use(&self) -> Vec<KeyUse> {
        self.keys
            .iter()
            .map(|(id, slot)| KeyUse {
                id: *id,
                sealed: slot.sealed.load(Ordering::Relaxed),
                opened: slot.opened.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Legacy plaintext values passed through since start.
    pub fn legacy_values_read(&self) -> u64 {
        self.legacy_values_read.load(Ordering::Relaxed)
    }

    /// What a reload compares: the primary, each key's id and check value
    /// (never the key), and the legacy-plaintext policy.
    pub fn shape(&self) -> KeyringShape {
        KeyringShape {
            primary: self.primary,
            checks: self
                .keys
                .iter()
                .map(|(id, slot)| (*id, slot.key.check()))
                .collect(),
            legacy: self.legacy,
        }
    }

    /// Takes over `earlier`'s counts for the keys both hold, so the per-key
    /// counters carry on across a reload.
    fn carry_counts(&self, earlier: &Keyring) {
        for (id, slot) in &self.keys {
            // A shared slot (a key revoked or restored) has its counts.
            if let Some(before) = earlier.keys.get(id)
                && !Arc::ptr_eq(before, slot)
            {
                let sealed = before.sealed.load(Ordering::Relaxed);
                let opened = before.opened.load(Ordering::Relaxed);
                slot.sealed.fetch_add(sealed, Ordering::Relaxed);
                slot.opened.fetch_add(opened, Ordering::Relaxed);
            }
        }
        let legacy = earlier.legacy_values_read.load(Ordering::Relaxed);
        self.legacy_values_read.fetch_add(legacy, Ordering::Relaxed);
    }
}

/// A keyring's primary, key ids with their check values, and legacy policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyringShape {
    pub primary: u32,
    pub checks: BTreeMap<u32, [u8; 16]>,
    pub legacy: LegacyPlaintext,
}

/// The keyring in use: sealing and opening load it per request, a reload
/// replaces it whole, a KMS revalidation derives it (a key revoked or
/// restored). Changes are made one at a time.
pub struct CurrentKeyring(
    ArcSwap<Keyring>,
    std::sync::Mutex<()>,
    /// Whether the keyring in use cannot seal (its primary revoked): read
    /// per write without loading the keyring.
    std::sync::atomic::AtomicBool,
);

impl std::fmt::Debug for CurrentKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CurrentKeyring {{ primary: {} }}", self.0.load().primary)
    }
}

impl CurrentKeyring {
    pub fn new(keyring: Keyring) -> Arc<CurrentKeyring> {
        let refused = keyring.can_seal().is_err();
        Arc::new(CurrentKeyring(
            ArcSwap::from_pointee(keyring),
            std::sync::Mutex::new(()),
            std::sync::atomic::AtomicBool::new(refused),
        ))
    }

    /// The keyring as of now.
    pub fn load(&self) -> Guard<Arc<Keyring>> {
        self.0.load()
    }

    /// The keyring as of now, to hold on to.
    pub fn load_full(&self) -> Arc<Keyring> {
        self.0.load_full()
    }

    /// Replaces the keyring; its per-key counts carry on.
    pub fn publish(&self, keyring: Keyring) {
        let _one_at_a_time = self.1.lock().unwrap_or_else(|e| e.into_inner());
        keyring.carry_counts(&self.0.load());
        self.2.store(keyring.can_seal().is_err(), Ordering::Release);
        self.0.store(Arc::new(keyring));
    }

    /// Why nothing can be sealed now (the primary revoked by its KMS), if so.
    pub fn can_seal(&self) -> Result<(), PrimaryRevoked> {
        if self.2.load(Ordering::Acquire) {
            self.0.load().can_seal()
        } else {
            Ok(())
        }
    }

    /// Replaces the keyring with one derived from it (a key revoked or
    /// restored), unless a reload published another meanwhile: `derive`
    /// sees the one it replaces.
    pub fn update(&self, derive: impl FnOnce(&Keyring) -> Option<Keyring>) {
        let _one_at_a_time = self.1.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.0.load_full();
        if let Some(keyring) = derive(&current) {
            keyring.carry_counts(&current);
            self.2.store(keyring.can_seal().is_err(), Ordering::Release);
            self.0.store(Arc::new(keyring));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(byte: u8) -> Zeroizing<[u8; 32]> {
        Zeroizing::new([byte; 32])
    }

    const NAME: Binding<'static> = Binding::string(b"k");

    #[test]
    fn rotation_keeps_old_values_readable_and_seals_with_the_new_primary() {
        let before = Keyring::new(1, vec![(1, raw(1))], LegacyPlaintext::Reject).expect("ring");
        let old = before.seal(b"old", NAME).expect("primary");
        let after =
            Keyring::new(2, vec![(1, raw(1)), (2, raw(2))], LegacyPlaintext::Reject).expect("ring");
        assert_eq!(
            after.open(&old, NAME),
            Ok(Opened::Plaintext(b"old".to_vec()))
        );
        let new = after.seal(b"new", NAME).expect("primary");
        assert_eq!(envelope::key_id(&new), Ok(2));
        assert_eq!(before.open(&new, NAME), Err(OpenError::UnknownKeyId(2)));
        // Rotation progress: what each key sealed and opened.
        assert_eq!(
            after.key_use(),
            vec![
                KeyUse {
                    id: 1,
                    sealed: 0,
                    opened: 1
                },
                KeyUse {
                    id: 2,
                    sealed: 1,
                    opened: 0
                },
            ]
        );
    }

    #[test]
    fn legacy_plaintext_is_rejected_or_passed_and_counted() {
        let reject = Keyring::new(1, vec![(1, raw(1))], LegacyPlaintext::Reject).expect("ring");
        assert_eq!(reject.open(b"plain", NAME), Err(OpenError::NotAnEnvelope));
        let pass = Keyring::new(1, vec![(1, raw(1))], LegacyPlaintext::Pass).expect("ring");
        assert_eq!(pass.open(b"plain", NAME), Ok(Opened::Legacy(b"plain")));
        assert_eq!(pass.legacy_values_read(), 1);
        // A tampered envelope is never mistaken for legacy plaintext.
        let mut sealed = pass.seal(b"v", NAME).expect("primary");
        sealed[40] ^= 1;
        assert_eq!(
            pass.open(&sealed, NAME),
            Err(OpenError::AuthenticationFailed)
        );
    }

    #[test]
    fn keys_are_validated() {
        assert_eq!(
            Keyring::new(3, vec![(1, raw(1))], LegacyPlaintext::Reject).map(|_| ()),
            Err(KeyError::NoPrimary(3))
        );
        assert_eq!(
            Keyring::new(1, vec![(1, raw(1)), (1, raw(2))], LegacyPlaintext::Reject).map(|_| ()),
            Err(KeyError::DuplicateId(1))
        );
        assert!(decode_key(1, b"c2hvcnQ=").is_err());
        assert!(decode_key(1, b"not base64!").is_err());
        let generated = generate_key();
        assert_eq!(
            decode_key(1, format!("{}\n", *generated).as_bytes()).map(|k| k.len()),
            Ok(32)
        );
    }

    #[test]
    fn debug_shows_ids_only() {
        let ring = Keyring::new(1, vec![(1, raw(0xAB))], LegacyPlaintext::Reject).expect("ring");
        let text = format!("{ring:?}");
        assert!(
            text.contains("primary: 1") && !text.contains("171") && !text.contains("ab"),
            "{text}"
        );
    }
}
