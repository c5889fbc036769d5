//! Redis Cluster's key slots: CRC16 (XMODEM) of the key, or of its
//! `{hashtag}` when it has a non-empty one, modulo 16384. Pure.

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis's
/// `crc16.c`.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of a key that is hashed: between the first `{` and the first
/// `}` after it, when that is not empty; else the whole key.
pub fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|b| *b == b'{')
        && let Some(length) = key[open + 1..].iter().position(|b| *b == b'}')
        && length > 0
    {
        return &key[open + 1..open + 1 + length];
    }
    key
}

/// The slot that holds `key`.
pub fn slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOTS
}

/// The one slot all `keys` share: `Ok(None)` without keys, `Err` with the
/// first two slots that differ (Redis answers CROSSSLOT).
pub fn common_slot<'a>(
    keys: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<u16>, (u16, u16)> {
    let mut common = None;
    for key in keys {
        let this = slot(key);
        match common {
            None => common = Some(this),
            Some(first) if first != this => return Err((first, this)),
            Some(_) => {}
        }
    }
    Ok(common)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_specification() {
        // The specification's test vector, and known slots.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b""), 0);
    }

    #[test]
    fn hashtags_follow_the_first_braces_with_something_inside() {
        assert_eq!(hashed_part(b"{user1000}.following"), b"user1000");
        assert_eq!(hashed_part(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hashed_part(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hashed_part(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hashed_part(b"{"), b"{");
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(common_slot([&b"{a}1"[..], b"{a}2"]), Ok(Some(slot(b"a"))));
        assert_eq!(common_slot(Vec::<&[u8]>::new()), Ok(None));
        assert!(common_slot([&b"foo"[..], b"bar"]).is_err());
    }
}
