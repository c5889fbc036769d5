//! Seals the request arguments a plan names, with the keyring's primary
//! key: the one place request values are encrypted (random or deterministic
//! envelopes, or HyperLogLog tokens). `policy::classify`
//! decides which arguments are values and where they live; this module only
//! applies that decision. Pure.

use crate::crypto::Keyring;
use crate::crypto::keyring::PrimaryRevoked;
use crate::policy::SealAt;
use crate::policy::table::Kind;
use bytes::Bytes;

/// The request's arguments with each one `values` names replaced by its
/// envelope. Arguments not named are shared, not copied. Nothing when the
/// primary key was revoked by its KMS.
pub fn arguments(
    keyring: &Keyring,
    args: &[Bytes],
    values: &[SealAt],
) -> Result<Vec<Bytes>, PrimaryRevoked> {
    let mut sealed = args.to_vec();
    for SealAt { index, site } in values {
        if let Some(value) = args.get(*index) {
            let envelope = match (site.kind, site.deterministic) {
                (Kind::HyperLogLogElement, _) => keyring.token(value, site.binding())?.to_vec(),
                (_, true) => keyring.seal_member(value, site.binding())?,
                (_, false) => keyring.seal(value, site.binding())?,
            };
            sealed[*index] = Bytes::from(envelope);
        }
    }
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keyring::Opened;
    use crate::crypto::{Binding, LegacyPlaintext};
    use crate::policy::{SiteScope, ValueSite};
    use zeroize::Zeroizing;

    #[test]
    fn only_the_named_arguments_are_sealed_each_under_its_own_site() {
        let ring = Keyring::new(
            1,
            vec![(1, Zeroizing::new([4; 32]))],
            LegacyPlaintext::Reject,
        )
        .expect("ring");
        let args: Vec<Bytes> = ["RPUSH", "q", "a", "b"]
            .iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let site = ValueSite {
            kind: Kind::ListElement,
            key: Bytes::from_static(b"q"),
            scope: SiteScope::Key,
            field: None,
            deterministic: false,
        };
        let plan = [2, 3, 9].map(|index| SealAt {
            index,
            site: site.clone(),
        });
        let sealed = arguments(&ring, &args, &plan).expect("primary");
        assert_eq!(sealed.len(), 4);
        assert_eq!(&sealed[..2], &args[..2]);
        for (at, plaintext) in [(2, b"a"), (3, b"b")] {
            assert_eq!(
                ring.open(&sealed[at], site.binding()),
                Ok(Opened::Plaintext(plaintext.to_vec()))
            );
            assert!(ring.open(&sealed[at], Binding::string(b"q")).is_err());
        }
    }
}
