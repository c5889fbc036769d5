//! The envelope: how one value is stored in Redis.
//!
//! ```text
//! offset  size  field
//! ------  ----  ----------------------------------------------------------
//!      0     3  magic 0xC7 0x0A 0x4B (0xC7 0x0A is never valid UTF-8)
//!      3     1  format version, 1
//!      4     4  key id, big-endian u32
//!      8    24  nonce, random (XAES-256-GCM's 192-bit nonce)
//!     32     n  ciphertext (same length as the value)
//!   32+n    16  GCM tag
//! ```
//!
//! Overhead: 48 bytes. A stored value that does not start with the magic and
//! version and is shorter than 48 bytes is a legacy plaintext value.
//!
//! Set members, sorted-set members and (on `members = "deterministic"`
//! rules) list elements use the *deterministic* envelope, so that equal
//! members are equal to Redis (SISMEMBER, ZSCORE, SREM, LREM work):
//!
//! ```text
//! offset  size  field
//! ------  ----  ----------------------------------------------------------
//!      0     3  magic 0xC7 0x0A 0x53 ("S": synthetic IV)
//!      3   1-5  key id, unsigned LEB128 (one byte for ids below 128)
//!    3+k    16  synthetic IV (AES-SIV, RFC 5297; also the tag)
//!   19+k     n  ciphertext (same length as the member)
//! ```
//!
//! Overhead: 20 bytes for key ids below 128, so members of up to 44 bytes
//! stay within Redis's 64-byte compact (listpack) encodings. AES-256-SIV's
//! 64-byte key is derived from the data key with HKDF-SHA256 under the label
//! `redcloak member siv v1`, so it is never the XAES key itself. The
//! associated data is the same as the random envelope's, with this header in
//! place of the 8 header bytes. Equal members under one key and binding give
//! equal envelopes: that is the point, and it is what such an envelope
//! leaks (equality and frequency, and the length).
//!
//! Associated data (authenticated, not stored) binds the value to where it
//! lives, so a value copied to another key or hash field fails to open:
//!
//! ```text
//! magic | version | key id (the 8 header bytes)
//! u8 kind: 1 string value, 2 hash field value, 3 list element,
//!          4 stream field value, 5 pub/sub message, 6 set member,
//!          7 sorted-set member (8, HyperLogLog element, is never sealed:
//!          see `DataKey::token`)
//! u8 scope: 0 unbound | 1, u32 BE length, key (or channel) name
//!                     | 2, u32 BE length, rule name
//! if kinds 2 and 4: u32 BE length | field name
//! ```
//!
//! The scope comes from the configured rule (`bind = "key"`, `"rule"` or
//! `"none"`), never from the stored bytes, so a stored value cannot
//! downgrade its own binding. The kind comes from the command that reads
//! the value, so a list element cannot be read back as a hash field value
//! or a string, whatever the scope.
//!
//! Why XAES-256-GCM: random 96-bit GCM nonces under one key are limited to
//! 2^32 messages (NIST SP 800-38D), which a fleet of proxies sharing a key
//! reaches in days. XAES-256-GCM derives a fresh AES-256-GCM key per message
//! from the first half of a 192-bit random nonce (C2SP XAES-256-GCM), so
//! random nonces stay safe for about 2^80 messages per key, with no state to
//! coordinate between proxies. The cost is two extra AES block encryptions
//! and a GCM key setup per value.

use aes_siv::siv::Aes256Siv;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::cell::RefCell;
use thread_local::ThreadLocal;
use xaes_256_gcm::aead::{AeadInOut, KeyInit};
use xaes_256_gcm::aes::Aes256;
use xaes_256_gcm::aes::cipher::BlockCipherEncrypt;
use xaes_256_gcm::aes_gcm::Aes256Gcm;
use zeroize::{Zeroize, Zeroizing};

pub const MAGIC: [u8; 3] = [0xC7, 0x0A, 0x4B];
/// The deterministic envelope's magic.
pub const MEMBER_MAGIC: [u8; 3] = [0xC7, 0x0A, 0x53];
/// Bytes a deterministic envelope adds to a member, for key ids below 128.
pub const MEMBER_OVERHEAD: usize = 3 + 1 + SIV_LEN;
const SIV_LEN: usize = 16;
const SIV_KEY_LABEL: &[u8] = b"redcloak member siv v1";
const TOKEN_KEY_LABEL: &[u8] = b"redcloak hll token v1";
const CHECK_LABEL: &[u8] = b"redcloak key check v1";
/// Bytes of a HyperLogLog token.
pub const TOKEN_LEN: usize = 16;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes an envelope adds to a value.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// What a sealed value is. Bound in the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    String = 1,
    HashField = 2,
    ListElement = 3,
    StreamValue = 4,
    Message = 5,
    SetMember = 6,
    SortedSetMember = 7,
    /// Never sealed: PFADD sends a keyed token of each element instead.
    HyperLogLogElement = 8,
}

/// Which name a value is bound to, as its rule says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// `bind = "none"`: any key of any unbound rule.
    Unbound,
    /// `bind = "key"`: this key (or pub/sub channel) only.
    Key(&'a [u8]),
    /// `bind = "rule"`: any key of the rule with this name.
    Rule(&'a [u8]),
}

/// Where a value lives, as far as its associated data binds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    pub kind: Kind,
    pub scope: Scope<'a>,
    /// The hash field or stream field, for those kinds.
    pub field: Option<&'a [u8]>,
}

impl<'a> Binding<'a> {
    /// A string value bound to its key name.
    pub const fn string(key: &'a [u8]) -> Self {
        Binding {
            kind: Kind::String,
            scope: Scope::Key(key),
            field: None,
        }
    }

    /// A hash field's value bound to its key name and field.
    pub const fn hash_field(key: &'a [u8], field: &'a [u8]) -> Self {
        Binding {
            kind: Kind::HashField,
            scope: Scope::Key(key),
            field: Some(field),
        }
    }
}

/// Why a stored value could not be opened. Never carries value bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not encrypted (legacy plaintext)")]
    NotAnEnvelope,
    /// Starts with the magic but is not a whole version-1 envelope:
    /// truncated or damaged. Never taken for legacy plaintext.
    #[error("malformed envelope (truncated, or an unknown version)")]
    Malformed,
    #[error("unknown key id {0}")]
    UnknownKeyId(u32),
    /// Its key's KMS refused to unwrap it while running (see `kms`).
    #[error("key {0} revoked by the KMS")]
    Revoked(u32),
    #[error(
        "authentication failed: tampered, truncated, moved from another key or field, or sealed with another key"
    )]
    AuthenticationFailed,
}

/// One data key. Not `Clone`; its `Debug` shows nothing; the cipher states
/// (its own, and the AES-256-GCM keys derived from it that each thread
/// keeps) and the derived SIV key are zeroized on drop (the `zeroize`
/// features of aes and aes-gcm, `Zeroizing`).
pub struct DataKey {
    id: u32,
    /// XAES-256-GCM's key-derivation state: AES-256 under the data key,
    /// and K1 (C2SP XAES-256-GCM steps 1 and 2).
    xaes: Aes256,
    k1: Zeroizing<[u8; 16]>,
    /// Each thread's nonce prefix and the key derived from it (see [`Sealer`]).
    sealers: ThreadLocal<RefCell<Sealer>>,
    /// Each thread's keys derived for the prefixes it last opened.
    openers: ThreadLocal<RefCell<Openers>>,
    /// AES-256-SIV's key for deterministic envelopes, derived from the data key.
    siv_key: Zeroizing<[u8; 64]>,
    /// HMAC-SHA256's key for HyperLogLog tokens, derived from the data key.
    token_key: Zeroizing<[u8; 32]>,
    /// A value derived from the key (HKDF, its own label) that tells keys
    /// apart without revealing them: a reload sees a key change under its id.
    check: [u8; 16],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey {{ id: {}, key: <redacted> }}", self.id)
    }
}

impl DataKey {
    pub fn new(id: u32, key: &[u8; 32]) -> Self {
        let mut siv_key = Zeroizing::new([0u8; 64]);
        let mut token_key = Zeroizing::new([0u8; 32]);
        let mut check = [0u8; 16];
        // The data key is 32 uniformly random bytes: a valid HKDF PRK.
        // Expanding 32 or 64 bytes from SHA-256 never fails.
        if let Ok(hkdf) = Hkdf::<Sha256>::from_prk(key) {
            let _ = hkdf.expand(SIV_KEY_LABEL, siv_key.as_mut_slice());
            let _ = hkdf.expand(TOKEN_KEY_LABEL, token_key.as_mut_slice());
            let _ = hkdf.expand(CHECK_LABEL, &mut check);
        }
        let xaes = Aes256::new(key.into());
        // L = AES-256(K, 0^128); K1 = L << 1, xor 0x87 into its last byte
        // when L's top bit was set.
        let mut l = [0u8; 16];
        xaes.encrypt_block((&mut l).into());
        let mut k1 = Zeroizing::new([0u8; 16]);
        let carry = l[0] >> 7;
        for i in 0..16 {
            k1[i] = (l[i] << 1) | l.get(i + 1).map_or(0, |next| next >> 7);
        }
        k1[15] ^= carry * 0x87;
        l.zeroize();
        DataKey {
            id,
            xaes,
            k1,
            sealers: ThreadLocal::new(),
            openers: ThreadLocal::new(),
            check,
            siv_key,
            token_key,
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The key's check value (see the field).
    pub fn check(&self) -> [u8; 16] {
        self.check
    }

    /// Seals `value` into a new envelope. The nonce is this thread's
    /// random prefix under this key (whose derived key it keeps) and 12
    /// fresh random bytes; see [`Sealer`].
    pub fn seal(&self, value: &[u8], binding: Binding<'_>) -> Vec<u8> {
        let sealer = self.sealers.get_or(|| RefCell::new(self.new_sealer()));
        let mut sealer = sealer.borrow_mut();
        if sealer.sealed == SEALS_PER_PREFIX {
            *sealer = self.new_sealer();
        }
        sealer.sealed += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..PREFIX_LEN].copy_from_slice(&sealer.prefix);
        fresh_nonce(&mut nonce[PREFIX_LEN..]);
        seal_with(&sealer.cipher, self.id, value, binding, &nonce)
    }

    /// A new random nonce prefix for this thread, and its derived key.
    fn new_sealer(&self) -> Sealer {
        let mut prefix = [0u8; PREFIX_LEN];
        fresh_nonce(&mut prefix);
        Sealer {
            cipher: self.derive(&prefix),
            prefix,
            sealed: 0,
        }
    }

    /// XAES-256-GCM's per-nonce key (C2SP steps 3 to 5): AES-256-GCM under
    /// AES-256(K, M1 ^ K1) || AES-256(K, M2 ^ K1), where Mi is
    /// `0x00 || i || "X" || 0x00 || N[:12]`.
    fn derive(&self, prefix: &[u8; PREFIX_LEN]) -> Aes256Gcm {
        let mut key = Zeroizing::new([0u8; 32]);
        for (half, counter) in key.chunks_exact_mut(16).zip([1u8, 2]) {
            let mut block = [0u8; 16];
            block[..4].copy_from_slice(&[0, counter, b'X', 0]);
            block[4..].copy_from_slice(prefix);
            for (b, k) in block.iter_mut().zip(self.k1.iter()) {
                *b ^= k;
            }
            self.xaes.encrypt_block((&mut block).into());
            half.copy_from_slice(&block);
            block.zeroize();
        }
        let key: &[u8; 32] = &key;
        Aes256Gcm::new(key.into())
    }

    #[cfg(test)]
    fn seal_with_nonce(
        &self,
        value: &[u8],
        binding: Binding<'_>,
        nonce: &[u8; NONCE_LEN],
    ) -> Vec<u8> {
        let prefix = nonce[..PREFIX_LEN].try_into().unwrap_or([0; PREFIX_LEN]);
        seal_with(&self.derive(&prefix), self.id, value, binding, nonce)
    }

    /// Seals `member` into a deterministic envelope: the same member,
    /// binding and key always give the same bytes.
    pub fn seal_member(&self, member: &[u8], binding: Binding<'_>) -> Vec<u8> {
        let mut envelope = member_header(self.id);
        let aad = associated_data(&envelope, binding);
        // Only fails for more than 126 associated-data items; there is one.
        let sealed = self.siv().encrypt([&aad], member).unwrap_or_default();
        envelope.extend_from_slice(&sealed);
        envelope
    }

    /// The token PFADD sends for `element`: HMAC-SHA256 under a key derived
    /// from the data key, over the binding (as associated data is built)
    /// and the element, cut to 16 bytes. Equal elements under one binding
    /// and key give equal tokens, so Redis counts distinct elements; the
    /// elements themselves never reach Redis, and a token cannot be opened.
    pub fn token(&self, element: &[u8], binding: Binding<'_>) -> [u8; TOKEN_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.token_key.as_slice())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(&associated_data(b"hll-token", binding));
        mac.update(element);
        let digest = mac.finalize().into_bytes();
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&digest[..TOKEN_LEN]);
        token
    }

    /// AES-SIV encrypts through `&mut self`, so each call gets its own
    /// instance (a key schedule, zeroized on drop).
    fn siv(&self) -> Aes256Siv {
        let key: &[u8; 64] = &self.siv_key;
        Aes256Siv::new(key.into())
    }

    fn open_member(
        &self,
        envelope: &[u8],
        header_len: usize,
        binding: Binding<'_>,
    ) -> Result<Vec<u8>, OpenError> {
        let (header, sealed) = envelope.split_at(header_len);
        let aad = associated_data(header, binding);
        self.siv()
            .decrypt([&aad], sealed)
            .map_err(|_| OpenError::AuthenticationFailed)
    }

    /// Opens an envelope whose header named this key.
    fn open(&self, envelope: &[u8], binding: Binding<'_>) -> Result<Vec<u8>, OpenError> {
        let (header, rest) = envelope.split_at(HEADER_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let aad = associated_data(header, binding);
        let (prefix, nonce) = nonce.split_at(PREFIX_LEN);
        let prefix: &[u8; PREFIX_LEN] = prefix
            .try_into()
            .map_err(|_| OpenError::AuthenticationFailed)?;
        let openers = self.openers.get_or(RefCell::default);
        let mut openers = openers.borrow_mut();
        let cipher = openers.cipher(prefix, || self.derive(prefix));
        let mut plaintext = ciphertext.to_vec();
        let opened = cipher.decrypt_inout_detached(
            nonce
                .try_into()
                .map_err(|_| OpenError::AuthenticationFailed)?,
            &aad,
            plaintext.as_mut_slice().into(),
            tag.try_into()
                .map_err(|_| OpenError::AuthenticationFailed)?,
        );
        match opened {
            Ok(()) => Ok(plaintext),
            // The buffer is dropped unread: a failed decryption shows nothing.
            Err(_) => Err(OpenError::AuthenticationFailed),
        }
    }
}

/// XAES-256-GCM's nonce is a prefix (N[:12], from which the message's
/// AES-256-GCM key is derived) and a GCM nonce (N[12:]).
const PREFIX_LEN: usize = 12;

/// A prefix seals at most this many values; then its thread draws another.
/// Each derived key thus sees at most 2^32 random 96-bit GCM nonces, NIST
/// SP 800-38D's bound for random nonces under one key.
const SEALS_PER_PREFIX: u32 = u32::MAX;

/// One thread's sealing state under one data key: a random nonce prefix,
/// drawn once (and again after [`SEALS_PER_PREFIX`] seals), and the
/// AES-256-GCM key XAES derives from it, so a seal costs one GCM pass and no
/// key derivation. Every nonce is still 24 random bytes in the envelope;
/// only the first 12 repeat, within one thread, for a while.
struct Sealer {
    prefix: [u8; PREFIX_LEN],
    cipher: Aes256Gcm,
    sealed: u32,
}

/// How many derived keys a thread keeps for opening: values sealed by this
/// and a few other threads or processes open without a key derivation.
const OPENERS: usize = 8;

/// The keys a thread derived for the prefixes it opened last, replaced in
/// turn.
#[derive(Default)]
struct Openers {
    derived: Vec<([u8; PREFIX_LEN], Aes256Gcm)>,
    next: usize,
}

impl Openers {
    fn cipher(
        &mut self,
        prefix: &[u8; PREFIX_LEN],
        derive: impl FnOnce() -> Aes256Gcm,
    ) -> &Aes256Gcm {
        let at = match self.derived.iter().position(|(p, _)| p == prefix) {
            Some(at) => at,
            None if self.derived.len() < OPENERS => {
                self.derived.push((*prefix, derive()));
                self.derived.len() - 1
            }
            None => {
                let at = self.next;
                self.next = (self.next + 1) % OPENERS;
                self.derived[at] = (*prefix, derive());
                at
            }
        };
        &self.derived[at].1
    }
}

/// Seals under a derived key: header, the whole 24-byte nonce, the value
/// encrypted with the nonce's last 12 bytes, the tag.
fn seal_with(
    cipher: &Aes256Gcm,
    id: u32,
    value: &[u8],
    binding: Binding<'_>,
    nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let header = header(id);
    let mut envelope = Vec::with_capacity(OVERHEAD + value.len());
    envelope.extend_from_slice(&header);
    envelope.extend_from_slice(nonce);
    envelope.extend_from_slice(value);
    let aad = associated_data(&header, binding);
    let body = &mut envelope[HEADER_LEN + NONCE_LEN..];
    let gcm_nonce: &[u8; NONCE_LEN - PREFIX_LEN] = nonce[PREFIX_LEN..]
        .try_into()
        .unwrap_or(&[0; NONCE_LEN - PREFIX_LEN]);
    // Only fails for inputs over GCM's 64 GiB limit, far beyond limits.max_bulk_bytes.
    let tag = cipher
        .encrypt_inout_detached(gcm_nonce.into(), &aad, body.into())
        .unwrap_or_default();
    envelope.extend_from_slice(&tag);
    envelope
}

/// Which envelope a stored value is, and the key id its header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Random { id: u32 },
    Member { id: u32, header_len: usize },
}

fn format(stored: &[u8]) -> Result<Format, OpenError> {
    if stored.starts_with(&MEMBER_MAGIC) {
        let (id, id_len) = leb128(&stored[3..]).ok_or(OpenError::Malformed)?;
        let header_len = 3 + id_len;
        if stored.len() < header_len + SIV_LEN {
            return Err(OpenError::Malformed);
        }
        return Ok(Format::Member { id, header_len });
    }
    if !stored.starts_with(&MAGIC) {
        return Err(OpenError::NotAnEnvelope);
    }
    if stored.len() < OVERHEAD || stored[3] != VERSION {
        return Err(OpenError::Malformed);
    }
    let id = u32::from_be_bytes([stored[4], stored[5], stored[6], stored[7]]);
    Ok(Format::Random { id })
}

/// The key id an envelope (random or deterministic) names;
/// `NotAnEnvelope` without a magic, `Malformed` with a magic but not a
/// whole envelope.
pub fn key_id(stored: &[u8]) -> Result<u32, OpenError> {
    match format(stored)? {
        Format::Random { id } | Format::Member { id, .. } => Ok(id),
    }
}

/// Opens `stored`, random or deterministic, with whichever of `keys` its
/// header names. Either format opens wherever its binding matches, so a
/// rule may switch list elements to deterministic envelopes and still read
/// the elements it sealed before.
pub fn open<'k>(
    stored: &[u8],
    binding: Binding<'_>,
    find_key: impl Fn(u32) -> Option<&'k DataKey>,
) -> Result<Vec<u8>, OpenError> {
    let format = format(stored)?;
    let (Format::Random { id } | Format::Member { id, .. }) = format;
    let key = find_key(id).ok_or(OpenError::UnknownKeyId(id))?;
    match format {
        Format::Random { .. } => key.open(stored, binding),
        Format::Member { header_len, .. } => key.open_member(stored, header_len, binding),
    }
}

/// A key id as unsigned LEB128: seven bits a byte, low bits first.
fn push_leb128(out: &mut Vec<u8>, mut id: u32) {
    while id >= 0x80 {
        out.push((id as u8 & 0x7F) | 0x80);
        id >>= 7;
    }
    out.push(id as u8);
}

/// Reads a minimal unsigned LEB128 u32: the value and its length. A
/// longer-than-needed encoding is refused, so one id has one header.
fn leb128(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut id: u64 = 0;
    for (i, &byte) in bytes.iter().take(5).enumerate() {
        id |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let minimal = i == 0 || byte != 0;
            return (minimal && id <= u64::from(u32::MAX)).then_some((id as u32, i + 1));
        }
    }
    None
}

fn member_header(id: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(MEMBER_OVERHEAD + 48);
    header.extend_from_slice(&MEMBER_MAGIC);
    push_leb128(&mut header, id);
    header
}

fn header(id: u32) -> [u8; HEADER_LEN] {
    let id = id.to_be_bytes();
    [
        MAGIC[0], MAGIC[1], MAGIC[2], VERSION, id[0], id[1], id[2], id[3],
    ]
}

fn associated_data(header: &[u8], binding: Binding<'_>) -> Vec<u8> {
    let name_len = match binding.scope {
        Scope::Unbound => 0,
        Scope::Key(name) | Scope::Rule(name) => name.len() + 4,
    };
    let field_len = binding.field.map_or(0, |f| f.len() + 4);
    let mut aad = Vec::with_capacity(HEADER_LEN + 2 + name_len + field_len);
    aad.extend_from_slice(header);
    aad.push(binding.kind as u8);
    match binding.scope {
        Scope::Unbound => aad.push(0),
        Scope::Key(key) => {
            aad.push(1);
            push_prefixed(&mut aad, key);
        }
        Scope::Rule(rule) => {
            aad.push(2);
            push_prefixed(&mut aad, rule);
        }
    }
    if let Some(field) = binding.field {
        push_prefixed(&mut aad, field);
    }
    aad
}

fn push_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths are bounded by limits.max_bulk_bytes, far below u32::MAX.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Nonce bytes drawn from one OS read: one getrandom call per 80 values
/// sealed (12 random bytes each), not one per value (measured at ~0.5 us a
/// call).
const NONCES_PER_READ: usize = 40;

struct NonceStock {
    bytes: [u8; NONCE_LEN * NONCES_PER_READ],
    /// Bytes at the front already handed out (and zeroed).
    used: usize,
}

thread_local! {
    static NONCES: std::cell::RefCell<NonceStock> = const {
        std::cell::RefCell::new(NonceStock {
            bytes: [0; NONCE_LEN * NONCES_PER_READ],
            used: NONCE_LEN * NONCES_PER_READ,
        })
    };
}

/// Fresh OS randomness for a nonce (up to [`NONCE_LEN`] bytes), never
/// handed out twice: each thread reads a stock at once and hands each byte
/// out once. (redcloak never forks, so no two processes share a stock.)
fn fresh_nonce(nonce: &mut [u8]) {
    NONCES.with_borrow_mut(|stock| {
        if stock.used + nonce.len() > stock.bytes.len() {
            fill_random(&mut stock.bytes);
            stock.used = 0;
        }
        let taken = &mut stock.bytes[stock.used..stock.used + nonce.len()];
        nonce.copy_from_slice(taken);
        taken.fill(0);
        stock.used += nonce.len();
    });
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    // getrandom only fails where the OS has no entropy source; rather than
    // sealing with a predictable nonce, stop the process.
    if let Err(err) = getrandom::fill(buf) {
        panic!("no secure random numbers from the OS: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(byte: u8, id: u32) -> DataKey {
        DataKey::new(id, &[byte; 32])
    }

    fn bound(key: &[u8]) -> Binding<'_> {
        Binding {
            kind: Kind::String,
            scope: Scope::Key(key),
            field: None,
        }
    }

    fn open_with(
        keys: &[DataKey],
        stored: &[u8],
        binding: Binding<'_>,
    ) -> Result<Vec<u8>, OpenError> {
        open(stored, binding, |id| keys.iter().find(|k| k.id == id))
    }

    /// C2SP XAES-256-GCM test vectors (c2sp.org/XAES-256-GCM), through the
    /// same cipher calls the envelope makes.
    #[test]
    fn xaes_256_gcm_matches_the_published_vectors() {
        let vectors: [(&[u8; 32], &[u8], &str, &str); 2] = [
            (
                &[0x01; 32],
                b"",
                "ce546ef63c9cc60765923609",
                "b33a9a1974e96e52daf2fcf7075e2271",
            ),
            (
                &[0x03; 32],
                b"c2sp.org/XAES-256-GCM",
                "986ec1832593df5443a17943",
                "7fd083bf3fdb41abd740a21f71eb769d",
            ),
        ];
        for (key, aad, ciphertext, tag) in vectors {
            let nonce: &[u8; 24] = b"ABCDEFGHIJKLMNOPQRSTUVWX";
            let (prefix, gcm_nonce) = nonce.split_at(PREFIX_LEN);
            let cipher = DataKey::new(0, key).derive(prefix.try_into().expect("12 bytes"));
            let gcm_nonce: &[u8; 12] = gcm_nonce.try_into().expect("12 bytes");
            let mut buf = b"XAES-256-GCM".to_vec();
            let got_tag = cipher
                .encrypt_inout_detached(gcm_nonce.into(), aad, buf.as_mut_slice().into())
                .expect("encrypts");
            assert_eq!(hex(&buf), ciphertext);
            assert_eq!(hex(&got_tag), tag);
        }
    }

    fn unhex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| {
                u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("00"), 16).unwrap_or(0)
            })
            .collect()
    }

    /// RFC 5297 appendix A.1 (deterministic) and A.2 (nonce-based, several
    /// associated data items), through the crate the member envelope uses.
    #[test]
    fn aes_siv_matches_the_rfc_5297_vectors() {
        use aes_siv::siv::Aes128Siv;
        let key = unhex("fffefdfc fbfaf9f8 f7f6f5f4 f3f2f1f0 f0f1f2f3 f4f5f6f7 f8f9fafb fcfdfeff");
        let ad = unhex("10111213 14151617 18191a1b 1c1d1e1f 20212223 24252627");
        let plaintext = unhex("11223344 55667788 99aabbcc ddee");
        let key: [u8; 32] = key.try_into().expect("32 bytes");
        let sealed = Aes128Siv::new(&key.into())
            .encrypt([&ad], &plaintext)
            .expect("seals");
        assert_eq!(
            hex(&sealed),
            "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c"
        );
        let opened = Aes128Siv::new(&key.into()).decrypt([&ad], &sealed);
        assert_eq!(opened.as_deref(), Ok(&plaintext[..]));

        let key = unhex("7f7e7d7c 7b7a7978 77767574 73727170 40414243 44454647 48494a4b 4c4d4e4f");
        let key: [u8; 32] = key.try_into().expect("32 bytes");
        let headers = [
            unhex(
                "00112233 44556677 8899aabb ccddeeff deaddada deaddada ffeeddcc bbaa9988 77665544 33221100",
            ),
            unhex("10203040 50607080 90a0"),
            unhex("09f91102 9d74e35b d84156c5 635688c0"),
        ];
        let plaintext = unhex(
            "74686973 20697320 736f6d65 20706c61 696e7465 78742074 6f20656e 63727970 74207573 696e6720 5349562d 414553",
        );
        let sealed = Aes128Siv::new(&key.into())
            .encrypt(&headers, &plaintext)
            .expect("seals");
        assert_eq!(
            hex(&sealed),
            "7bdb6e3b432667eb06f4d14bff2fbd0fcb900f2fddbe404326601965c889bf17\
             dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d"
        );
    }

    fn member(key: &[u8]) -> Binding<'_> {
        Binding {
            kind: Kind::SetMember,
            scope: Scope::Key(key),
            field: None,
        }
    }

    #[test]
    fn member_envelopes_are_deterministic_short_and_open_only_under_their_binding() {
        let keys = [key(1, 1), key(2, 300)];
        let a = keys[0].seal_member(b"alice@example.com", member(b"s"));
        assert_eq!(a, keys[0].seal_member(b"alice@example.com", member(b"s")));
        assert_ne!(a, keys[0].seal_member(b"bob@example.com", member(b"s")));
        assert_ne!(a, keys[0].seal_member(b"alice@example.com", member(b"t")));
        assert_ne!(a, keys[1].seal_member(b"alice@example.com", member(b"s")));
        assert_eq!(a.len(), 17 + MEMBER_OVERHEAD);
        assert_eq!(&a[..4], &[0xC7, 0x0A, 0x53, 1]);
        assert_eq!(keys[0].seal_member(&[b'x'; 44], member(b"s")).len(), 64);
        // Key id 300 is two LEB128 bytes.
        let wide = keys[1].seal_member(b"m", member(b"s"));
        assert_eq!(&wide[3..5], &[0xAC, 0x02]);
        assert_eq!(key_id(&wide), Ok(300));
        assert_eq!(
            open_with(&keys, &a, member(b"s")),
            Ok(b"alice@example.com".to_vec())
        );
        assert_eq!(open_with(&keys, &wide, member(b"s")), Ok(b"m".to_vec()));
        let empty = keys[0].seal_member(b"", member(b"s"));
        assert_eq!(open_with(&keys, &empty, member(b"s")), Ok(Vec::new()));
        let sorted = Binding {
            kind: Kind::SortedSetMember,
            ..member(b"s")
        };
        for elsewhere in [member(b"t"), sorted, bound(b"s")] {
            assert_eq!(
                open_with(&keys, &a, elsewhere),
                Err(OpenError::AuthenticationFailed)
            );
        }
        for i in 0..a.len() {
            let mut bad = a.clone();
            bad[i] ^= 0x40;
            assert!(open_with(&keys, &bad, member(b"s")).is_err(), "byte {i}");
        }
        for len in 0..a.len() {
            assert!(
                open_with(&keys, &a[..len], member(b"s")).is_err(),
                "cut to {len}"
            );
        }
        // A non-minimal key id is malformed, not a second name for key 1.
        let mut padded = a[..3].to_vec();
        padded.extend_from_slice(&[0x81, 0x00]);
        padded.extend_from_slice(&a[4..]);
        assert_eq!(key_id(&padded), Err(OpenError::Malformed));
    }

    #[test]
    fn hyperloglog_tokens_are_keyed_bound_and_deterministic() {
        let element = |key: &'static [u8]| Binding {
            kind: Kind::HyperLogLogElement,
            scope: Scope::Key(key),
            field: None,
        };
        let k = key(1, 1);
        let token = k.token(b"visitor-1", element(b"h"));
        assert_eq!(token, k.token(b"visitor-1", element(b"h")));
        assert_ne!(token, k.token(b"visitor-2", element(b"h")));
        assert_ne!(token, k.token(b"visitor-1", element(b"other")));
        assert_ne!(token, key(2, 1).token(b"visitor-1", element(b"h")));
        assert!(!token.windows(9).any(|w| w == b"visitor-1"));
        assert_ne!(k.token_key[..], k.siv_key[..32]);
    }

    const KINDS: [Kind; 7] = [
        Kind::String,
        Kind::HashField,
        Kind::ListElement,
        Kind::StreamValue,
        Kind::Message,
        Kind::SetMember,
        Kind::SortedSetMember,
    ];

    /// Every kind, in both envelopes, opens under its own binding and kind
    /// and under no other kind, scope or field.
    #[test]
    fn every_kind_round_trips_in_both_envelopes_and_opens_nowhere_else() {
        let keys = [key(6, 7)];
        let at = |kind: Kind, scope: Scope<'static>| Binding {
            kind,
            scope,
            field: matches!(kind, Kind::HashField | Kind::StreamValue).then_some(&b"f"[..]),
        };
        for kind in KINDS {
            for scope in [Scope::Key(b"k"), Scope::Rule(b"r"), Scope::Unbound] {
                let binding = at(kind, scope);
                for sealed in [
                    keys[0].seal(b"payload", binding),
                    keys[0].seal_member(b"payload", binding),
                ] {
                    assert_eq!(open_with(&keys, &sealed, binding), Ok(b"payload".to_vec()));
                    for other in KINDS.into_iter().filter(|k| *k != kind) {
                        assert!(
                            open_with(&keys, &sealed, at(other, scope)).is_err(),
                            "{kind:?} as {other:?}"
                        );
                    }
                    for other in [Scope::Key(b"k2"), Scope::Rule(b"k"), Scope::Key(b"r")] {
                        assert!(
                            open_with(&keys, &sealed, at(kind, other)).is_err(),
                            "{kind:?} under {other:?}"
                        );
                    }
                    if binding.field.is_some() {
                        let moved = Binding {
                            field: Some(b"g"),
                            ..binding
                        };
                        assert!(
                            open_with(&keys, &sealed, moved).is_err(),
                            "{kind:?} in another field"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_member_key_is_derived_not_the_data_key() {
        let k = key(9, 1);
        assert_ne!(&k.siv_key[..32], &[9u8; 32]);
        assert_ne!(&k.siv_key[32..], &[9u8; 32]);
        assert_ne!(k.siv_key[..32], k.siv_key[32..]);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_layout_matches_the_documented_table() {
        let k = key(7, 0x01020304);
        let sealed = k.seal_with_nonce(b"hello", bound(b"user:1"), &[9; 24]);
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(&sealed[..4], &[0xC7, 0x0A, 0x4B, 1]);
        assert_eq!(&sealed[4..8], &[1, 2, 3, 4]);
        assert_eq!(&sealed[8..32], &[9; 24]);
        assert_eq!(key_id(&sealed), Ok(0x01020304));
    }

    #[test]
    fn values_open_only_where_they_were_sealed() {
        let keys = [key(1, 1)];
        let sealed = keys[0].seal(b"secret", bound(b"a"));
        assert_eq!(
            open_with(&keys, &sealed, bound(b"a")),
            Ok(b"secret".to_vec())
        );
        let elsewhere = |scope, kind| Binding {
            kind,
            scope,
            field: None,
        };
        for (scope, kind) in [
            (Scope::Key(b"b"), Kind::String),
            (Scope::Unbound, Kind::String),
            (Scope::Rule(b"a"), Kind::String),
            (Scope::Key(b"a"), Kind::ListElement),
            (Scope::Key(b"a"), Kind::Message),
        ] {
            assert_eq!(
                open_with(&keys, &sealed, elsewhere(scope, kind)),
                Err(OpenError::AuthenticationFailed),
                "{scope:?} {kind:?}"
            );
        }
        let field = |f: &'static [u8]| Binding {
            kind: Kind::HashField,
            scope: Scope::Key(b"h"),
            field: Some(f),
        };
        let in_hash = keys[0].seal(b"v", field(b"f1"));
        assert_eq!(open_with(&keys, &in_hash, field(b"f1")), Ok(b"v".to_vec()));
        assert_eq!(
            open_with(&keys, &in_hash, field(b"f2")),
            Err(OpenError::AuthenticationFailed)
        );
        // A hash value cannot pose as a stream value of the same field.
        let stream = Binding {
            kind: Kind::StreamValue,
            ..field(b"f1")
        };
        assert_eq!(
            open_with(&keys, &in_hash, stream),
            Err(OpenError::AuthenticationFailed)
        );
        // Rule-bound: any key of the rule, no other rule.
        let rule = |name: &'static [u8]| Binding {
            kind: Kind::ListElement,
            scope: Scope::Rule(name),
            field: None,
        };
        let element = keys[0].seal(b"job", rule(b"queues"));
        assert_eq!(
            open_with(&keys, &element, rule(b"queues")),
            Ok(b"job".to_vec())
        );
        assert_eq!(
            open_with(&keys, &element, rule(b"other")),
            Err(OpenError::AuthenticationFailed)
        );
    }

    /// Envelopes written before kinds and rule scopes existed (strings and
    /// hash values, key-bound or unbound) still open: the associated data
    /// of kinds 1 and 2 is what it was.
    #[test]
    fn the_associated_data_of_strings_and_hash_values_is_unchanged() {
        let header = header(1);
        let aad = associated_data(&header, bound(b"k"));
        assert_eq!(&aad[8..], &[1, 1, 0, 0, 0, 1, b'k']);
        let unbound_field = Binding {
            kind: Kind::HashField,
            scope: Scope::Unbound,
            field: Some(b"f"),
        };
        let aad = associated_data(&header, unbound_field);
        assert_eq!(&aad[8..], &[2, 0, 0, 0, 0, 1, b'f']);
    }

    #[test]
    fn every_tampering_fails() {
        let keys = [key(1, 1)];
        let sealed = keys[0].seal(b"some secret value", bound(b"k"));
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    open_with(&keys, &bad, bound(b"k")).is_err(),
                    "flip of byte {i} bit {bit}"
                );
            }
        }
        for len in 0..sealed.len() {
            assert!(
                open_with(&keys, &sealed[..len], bound(b"k")).is_err(),
                "truncated to {len}"
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(
            open_with(&keys, &longer, bound(b"k")),
            Err(OpenError::AuthenticationFailed)
        );
    }

    #[test]
    fn unknown_ids_and_other_keys_fail() {
        let sealed = key(1, 1).seal(b"x", bound(b"k"));
        assert_eq!(
            open_with(&[key(1, 2)], &sealed, bound(b"k")),
            Err(OpenError::UnknownKeyId(1))
        );
        assert_eq!(
            open_with(&[key(2, 1)], &sealed, bound(b"k")),
            Err(OpenError::AuthenticationFailed)
        );
    }

    #[test]
    fn plaintext_is_recognised() {
        for legacy in [&b""[..], b"hello", &[0xC7, 0x0A]] {
            assert_eq!(key_id(legacy), Err(OpenError::NotAnEnvelope));
        }
    }

    #[test]
    fn a_damaged_envelope_is_malformed_never_plaintext() {
        let sealed = key(1, 1).seal(b"value", bound(b"k"));
        assert_eq!(key_id(&sealed[..OVERHEAD - 1]), Err(OpenError::Malformed));
        let mut other_version = sealed.clone();
        other_version[3] = 9;
        assert_eq!(key_id(&other_version), Err(OpenError::Malformed));
        assert_eq!(
            key_id(&[0xC7, 0x0A, 0x4B, 1, 0, 0, 0, 1]),
            Err(OpenError::Malformed)
        );
    }

    #[test]
    fn nonces_differ_between_seals() {
        let k = key(1, 1);
        assert_ne!(k.seal(b"same", bound(b"k")), k.seal(b"same", bound(b"k")));
    }

    /// The prefix each thread seals under, and the GCM nonces after it.
    fn nonce_of(envelope: &[u8]) -> (&[u8], &[u8]) {
        envelope[HEADER_LEN..HEADER_LEN + NONCE_LEN].split_at(PREFIX_LEN)
    }

    #[test]
    fn a_thread_seals_under_its_own_prefix_with_fresh_gcm_nonces() {
        let k = std::sync::Arc::new(key(1, 1));
        let first = k.seal(b"one", bound(b"k"));
        let second = k.seal(b"two", bound(b"k"));
        let (prefix, gcm) = nonce_of(&first);
        assert_eq!(nonce_of(&second).0, prefix, "the derived key is kept");
        assert_ne!(nonce_of(&second).1, gcm);
        let other = std::thread::scope(|scope| {
            scope
                .spawn(|| k.seal(b"three", bound(b"k")))
                .join()
                .expect("thread")
        });
        assert_ne!(nonce_of(&other).0, prefix, "each thread draws its own");
        for (envelope, value) in [(&first, &b"one"[..]), (&second, b"two"), (&other, b"three")] {
            assert_eq!(k.open(envelope, bound(b"k")).as_deref(), Ok(value));
        }
        // After SEALS_PER_PREFIX seals the thread draws a new prefix.
        if let Some(sealer) = k.sealers.get() {
            sealer.borrow_mut().sealed = SEALS_PER_PREFIX;
        }
        let renewed = k.seal(b"four", bound(b"k"));
        assert_ne!(nonce_of(&renewed).0, prefix);
        assert_eq!(k.open(&renewed, bound(b"k")).as_deref(), Ok(&b"four"[..]));
    }

    #[test]
    fn values_under_more_prefixes_than_a_thread_keeps_all_open() {
        let k = key(2, 1);
        let sealed: Vec<_> = (0..OPENERS as u8 * 2 + 1)
            .map(|i| {
                let mut nonce = [i; NONCE_LEN];
                nonce[PREFIX_LEN..].fill(0xee);
                (i, k.seal_with_nonce(&[i; 5], bound(b"k"), &nonce))
            })
            .collect();
        for _ in 0..2 {
            for (i, envelope) in sealed.iter().chain(sealed.iter().rev()) {
                assert_eq!(k.open(envelope, bound(b"k")), Ok(vec![*i; 5]));
                assert_eq!(
                    k.open(envelope, bound(b"other")),
                    Err(OpenError::AuthenticationFailed)
                );
            }
        }
    }

    proptest! {
        /// The derivation redcloak caches is XAES-256-GCM's: every envelope
        /// equals what the reference crate makes of the same key, nonce,
        /// associated data and value, and opens there too.
        #[test]
        fn cached_derivation_is_xaes_256_gcm(
            data_key in any::<[u8; 32]>(),
            nonce in any::<[u8; NONCE_LEN]>(),
            value in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let k = DataKey::new(7, &data_key);
            let envelope = k.seal_with_nonce(&value, bound(b"key"), &nonce);
            let reference = xaes_256_gcm::Xaes256Gcm::new((&data_key).into());
            let header = header(7);
            let aad = associated_data(&header, bound(b"key"));
            let mut body = value.clone();
            let tag = reference
                .encrypt_inout_detached((&nonce).into(), &aad, body.as_mut_slice().into())
                .expect("encrypts");
            let expected = [&header[..], &nonce, &body, &tag].concat();
            prop_assert_eq!(&envelope, &expected);
            prop_assert_eq!(k.open(&envelope, bound(b"key")), Ok(value));
        }
    }

    #[test]
    fn no_nonce_repeats_across_stock_refills() {
        let count = NONCES_PER_READ * 5 + 3;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..count {
            let mut nonce = [0u8; NONCE_LEN];
            fresh_nonce(&mut nonce);
            assert_ne!(nonce, [0u8; NONCE_LEN]);
            seen.insert(nonce);
        }
        assert_eq!(seen.len(), count);
    }

    proptest! {
        #[test]
        fn any_value_round_trips(value in proptest::collection::vec(any::<u8>(), 0..4096),
                                 name in proptest::collection::vec(any::<u8>(), 0..64)) {
            let keys = [key(5, 9)];
            let sealed = keys[0].seal(&value, bound(&name));
            prop_assert_eq!(sealed.len(), value.len() + OVERHEAD);
            prop_assert_eq!(open_with(&keys, &sealed, bound(&name)), Ok(value));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn random_values_up_to_one_mebibyte_round_trip(value in proptest::collection::vec(any::<u8>(), 0..=1024 * 1024)) {
            let keys = [key(5, 9)];
            let sealed = keys[0].seal(&value, bound(b"big"));
            prop_assert_eq!(open_with(&keys, &sealed, bound(b"big")), Ok(value));
        }
    }
}
