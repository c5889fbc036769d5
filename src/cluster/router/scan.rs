//! SCAN across every primary: the shards are scanned one after another,
//! each from its own cursor, and the cursor the client holds says which
//! shard, which node and where in it. A shard is named by the lowest slot
//! its primary serves, which a replica keeps when it is promoted, so a
//! scan goes on across a failover. A node's cursor means nothing to
//! another process (Redis seeds its hash function at random), so when the
//! shard's primary is no longer the node that gave the cursor, that shard
//! is scanned again from its start: keys may come twice, as SCAN allows,
//! and none is missed.
//!
//! The client's cursor is `node_cursor << 30 | node_tag << 14 | slot`:
//! 16384 slots fit 14 bits, the node's tag is 16 bits of its id, and a
//! Redis cursor walks its table's buckets, far below 2^34 (a table that
//! large would be refused, not wrapped). `0` starts at the first shard and,
//! as from Redis, ends the scan.

use super::{Pending, RouteError, Router, local_error};
use crate::cluster::map::SlotMap;
use crate::cluster::slot::SLOTS;
use crate::resp;
use bytes::{Bytes, BytesMut};

/// Bits of the client's cursor that name the shard's slot.
const SLOT_BITS: u32 = 14;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Bits that name the node that gave the cursor.
const TAG_BITS: u32 = 16;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
const CURSOR_SHIFT: u32 = SLOT_BITS + TAG_BITS;

/// 16 bits of a node's id (40 random hex digits).
fn tag(node_id: &str) -> u64 {
    node_id
        .get(..4)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

/// The tag of the primary serving `slot` now.
fn primary_tag(map: &SlotMap, slot: u16) -> Option<u64> {
    map.primary(slot).map(|p| tag(&p.id))
}

/// The lowest slot each primary serves, in order: the shards, each named
/// by a slot.
fn shard_starts(map: &SlotMap) -> Vec<u16> {
    let mut seen: Vec<(&str, u16)> = Vec::new();
    let mut starts = Vec::new();
    for slot in 0..SLOTS {
        if let Some(primary) = map.primary(slot) {
            let at = (primary.host.as_str(), primary.port);
            if !seen.contains(&at) {
                seen.push(at);
                starts.push(slot);
            }
        }
    }
    starts
}

/// Where a client's cursor points: the shard's slot and the cursor to
/// send its primary, whose tag is `primary_tag` (`None`: not served); a
/// cursor from another node starts the shard again.
fn decode(
    cursor: u64,
    starts: &[u16],
    primary_tag: impl Fn(u16) -> Option<u64>,
) -> Option<(u16, u64)> {
    if cursor == 0 {
        return starts.first().map(|first| (*first, 0));
    }
    let slot = u16::try_from(cursor & SLOT_MASK).ok()?;
    let tag = (cursor >> SLOT_BITS) & TAG_MASK;
    let node_cursor = cursor >> CURSOR_SHIFT;
    match primary_tag(slot)? {
        now if now == tag => Some((slot, node_cursor)),
        _ => Some((slot, 0)),
    }
}

/// The client's cursor once the node tagged `tag`, the shard at `slot`,
/// answered `node_cursor`: further in that shard, the start of the next
/// one, or 0 when it was the last. `None`: the node's cursor is too large.
fn encode(slot: u16, tag: u64, node_cursor: u64, starts: &[u16]) -> Option<u64> {
    if node_cursor == 0 {
        return Some(
            starts
                .iter()
                .find(|start| **start > slot)
                .map_or(0, |next| u64::from(*next)),
        );
    }
    if node_cursor >> (64 - CURSOR_SHIFT) != 0 {
        return None;
    }
    Some(node_cursor << CURSOR_SHIFT | (tag & TAG_MASK) << SLOT_BITS | u64::from(slot))
}

impl Router {
    /// SCAN: sent to the primary of the shard the cursor names, with that
    /// node's cursor; the reply's cursor is rewritten when it comes.
    pub(super) async fn send_scan(&mut self, mut args: Vec<Bytes>) -> Result<(), RouteError> {
        let starts = shard_starts(&self.topology.map());
        let cursor = args
            .get(1)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u64>().ok());
        let Some(cursor) = cursor else {
            self.refuse("ERR invalid cursor");
            return Ok(());
        };
        let map = self.topology.map();
        let Some((slot, node_cursor)) = decode(cursor, &starts, |slot| primary_tag(&map, slot))
        else {
            self.refuse("CLUSTERDOWN Hash slot not served");
            return Ok(());
        };
        args[1] = Bytes::from(node_cursor.to_string());
        let via = self.via_for(Self::row_of(&args));
        let index = self.next_index;
        self.next_index += 1;
        let pending = Pending {
            scan: Some(slot),
            ..Pending::new(index, args, Some(slot), via)
        };
        self.dispatch(&pending, None, false).await?;
        self.pending.push_back(pending);
        Ok(())
    }

    /// A SCAN reply from the shard at `slot`, given by the node at `from`,
    /// its cursor made the client's.
    pub(super) fn scanned(&self, slot: u16, from: &(String, u16), reply: BytesMut) -> BytesMut {
        let Some((_, elements)) = resp::aggregate_elements(&reply, &self.limits) else {
            return reply; // an error, as Redis sent it
        };
        let node_cursor = elements
            .first()
            .and_then(|c| resp::bulk_body(c))
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u64>().ok());
        let map = self.topology.map();
        let starts = shard_starts(&map);
        let node_tag = map
            .nodes()
            .find(|n| n.host == from.0 && n.port == from.1)
            .map_or(0, |n| tag(&n.id));
        let cursor = node_cursor.and_then(|n| encode(slot, node_tag, n, &starts));
        let (Some(cursor), Some(keys)) = (cursor, elements.get(1)) else {
            return local_error("ERR redcloak: a cluster node's SCAN cursor does not fit");
        };
        let mut out = BytesMut::with_capacity(reply.len() + 16);
        out.extend_from_slice(b"*2\r\n");
        resp::encode_bulk(&mut out, cursor.to_string().as_bytes());
        out.extend_from_slice(keys);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_names_the_shard_the_node_and_the_nodes_cursor() {
        let starts = [0, 5461, 10923];
        let same = |_: u16| Some(tag("abcd0123"));
        assert_eq!(tag("abcd0123"), 0xabcd);
        assert_eq!(decode(0, &starts, same), Some((0, 0)));
        // Within the first shard, then on to the next, then done.
        let c = encode(0, 0xabcd, 1234, &starts).expect("fits");
        assert_eq!(decode(c, &starts, same), Some((0, 1234)));
        let next = encode(0, 0xabcd, 0, &starts).expect("fits");
        assert_eq!(decode(next, &starts, same), Some((5461, 0)));
        let deep = encode(5461, 0xabcd, (1 << 33) + 7, &starts).expect("fits");
        assert_eq!(decode(deep, &starts, same), Some((5461, (1 << 33) + 7)));
        assert_eq!(encode(10923, 0xabcd, 0, &starts), Some(0));
        assert_eq!(encode(10923, 0xabcd, 1 << 34, &starts), None);
        // Another node serves the shard now: it starts again.
        let promoted = |_: u16| Some(0x1234);
        assert_eq!(decode(deep, &starts, promoted), Some((5461, 0)));
        assert_eq!(decode(deep, &starts, |_| None), None);
        // Slot 0 not served: 0 starts at the first shard there is.
        assert_eq!(decode(0, &[100, 9000], same), Some((100, 0)));
        assert_eq!(decode(0, &[], same), None);
    }
}
