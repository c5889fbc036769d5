//! Value encryption, pure: no sockets, no config files.
//!
//! `envelope` is the byte formats and the ciphers around one value: the
//! random envelope (XAES-256-GCM), the deterministic one for members
//! (AES-256-SIV) and HyperLogLog tokens (HMAC-SHA256), the last two under
//! keys derived from each data key; `keyring` holds the keys (one primary that seals, all that open)
//! and turns files or environment variables into keys. Nothing here logs or
//! formats a value, a plaintext or a key.

pub mod envelope;
pub mod keyring;

pub use envelope::{Binding, OpenError};

/// Lower-case hex of `bytes` (digests, check values, MACs, nonces).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
pub use keyring::{CurrentKeyring, KeyError, Keyring, LegacyPlaintext};
