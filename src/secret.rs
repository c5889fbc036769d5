//! Secret bytes (passwords): never printed, zeroized on drop, not `Clone`;
//! and the process itself never dumps core (see [`forbid_core_dumps`]).
//!
//! `Debug` prints `<redacted>`; there is no `Display`. Comparison is
//! constant-time over SHA-256 digests, so neither the content nor the length
//! of the expected secret leaks through timing.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Makes the process non-dumpable and its core size limit 0, so a crash or
/// a SIGABRT writes no core file holding data keys or passwords (and other
/// users cannot ptrace it). Best effort: a failure is logged by the caller's
/// absence of effect, never fatal.
pub fn forbid_core_dumps() {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let _ = set_dumpable_behavior(DumpableBehavior::NotDumpable);
    let _ = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    );
}

pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }

    /// The secret's bytes, for the one place that must send them (AUTH).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time equality with a candidate the client sent.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let expected = Sha256::digest(self.expose());
        let given = Sha256::digest(candidate);
        expected.ct_eq(&given).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret as it arrives in configuration: a string. A value of another type
/// is an error that does not quote the value (serde's default would).
pub struct RawSecret(pub Zeroizing<String>);

impl fmt::Debug for RawSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (value not shown)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSecret, E> {
                Ok(RawSecret(Zeroizing::new(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<RawSecret, E> {
                Ok(RawSecret(Zeroizing::new(v)))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<RawSecret, E> {
                Err(redacted_type())
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<RawSecret, E> {
                Err(redacted_type())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<RawSecret, E> {
                Err(redacted_type())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<RawSecret, E> {
                Err(redacted_type())
            }
        }
        deserializer.deserialize_string(Visitor)
    }
}

fn redacted_type<E: serde::de::Error>() -> E {
    E::custom("a secret must be a string (value not shown); quote it in TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let secret = Secret::new(b"hunter2hunter2".to_vec());
        assert_eq!(format!("{secret:?}"), "<redacted>");
        let raw = RawSecret(Zeroizing::new("hunter2".into()));
        assert_eq!(format!("{raw:?}"), "<redacted>");
    }

    #[test]
    fn matches_only_the_exact_secret() {
        let secret = Secret::new(b"correct horse".to_vec());
        assert!(secret.matches(b"correct horse"));
        assert!(!secret.matches(b"correct hors"));
        assert!(!secret.matches(b"correct horse "));
        assert!(!secret.matches(b""));
    }
}
