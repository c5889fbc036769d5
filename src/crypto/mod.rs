//! Value encryption, pure: no sockets, no config files.
//!
//! `envelope` is the byte format and the AEAD (XAES-256-GCM) around one
//! value; `keyring` holds the keys (one primary that seals, all that open)
//! and turns files or environment variables into keys. Nothing here logs or
//! formats a value, a plaintext or a key.

pub mod envelope;
pub mod keyring;

pub use envelope::{Binding, OpenError};
pub use keyring::{KeyError, Keyring, LegacyPlaintext};
