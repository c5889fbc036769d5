//! The slot map: which shard serves each of the 16384 slots, its primary
//! and replicas, read from `CLUSTER SHARDS` (Redis 7). Pure: parsing a
//! reply and looking up slots; fetching it is the caller's.

use super::slot::SLOTS;
use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;

/// A node as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its node id (40 hex characters): `CLUSTER MYID` must answer it.
    pub id: String,
    /// Where to connect: its announced IP (or endpoint) and TLS port.
    pub host: String,
    pub port: u16,
    /// Its announced hostname (`cluster-announce-hostname`), if any: the
    /// name its certificate is verified against when configured so.
    pub hostname: Option<String>,
    pub primary: bool,
    /// `health` is `online` (not `failed` or `loading`).
    pub online: bool,
}

/// A primary, its replicas and the slot ranges they serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub ranges: Vec<(u16, u16)>,
    pub primary: Option<Node>,
    pub replicas: Vec<Node>,
}

/// Every shard, and for each slot the shard that serves it.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    pub shards: Vec<Shard>,
    owners: Vec<u16>,
}

impl std::fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotMap")
            .field("shards", &self.shards)
            .field("uncovered", &self.uncovered())
            .finish()
    }
}

/// No shard serves the slot.
const NO_SHARD: u16 = u16::MAX;

impl SlotMap {
    pub fn new(shards: Vec<Shard>) -> SlotMap {
        let mut owners = vec![NO_SHARD; usize::from(SLOTS)];
        for (index, shard) in shards.iter().enumerate() {
            for (start, end) in &shard.ranges {
                for slot in *start..=(*end).min(SLOTS - 1) {
                    owners[usize::from(slot)] = index as u16;
                }
            }
        }
        SlotMap { shards, owners }
    }

    /// The shard serving `slot`, if any.
    pub fn shard(&self, slot: u16) -> Option<&Shard> {
        let owner = *self.owners.get(usize::from(slot))?;
        self.shards.get(usize::from(owner))
    }

    /// The primary serving `slot`, if it has one that is online.
    pub fn primary(&self, slot: u16) -> Option<&Node> {
        self.shard(slot)?
            .primary
            .as_ref()
            .filter(|node| node.online)
    }

    /// Slots without an online primary.
    pub fn uncovered(&self) -> usize {
        (0..SLOTS)
            .filter(|slot| self.primary(*slot).is_none())
            .count()
    }

    /// Every node, primaries first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        let primaries = self.shards.iter().filter_map(|s| s.primary.as_ref());
        primaries.chain(self.shards.iter().flat_map(|s| s.replicas.iter()))
    }

    /// `slot` now served by the node at `host:port` (a MOVED said so),
    /// until the next full refresh. A node not in the map is added as a
    /// shard of its own with only that slot.
    pub fn moved(&mut self, slot: u16, host: &str, port: u16) {
        let found = self.shards.iter().position(|shard| {
            shard
                .primary
                .as_ref()
                .is_some_and(|p| p.host == host && p.port == port)
        });
        let index = match found {
            Some(index) => index,
            None => {
                self.shards.push(Shard {
                    ranges: Vec::new(),
                    primary: Some(Node {
                        id: String::new(),
                        host: host.to_owned(),
                        port,
                        hostname: None,
                        primary: true,
                        online: true,
                    }),
                    replicas: Vec::new(),
                });
                self.shards.len() - 1
            }
        };
        if let Some(owner) = self.owners.get_mut(usize::from(slot)) {
            *owner = index as u16;
        }
    }
}

/// A frame's text (bulk, simple or verbatim string).
fn text(frame: &BytesFrame) -> Option<String> {
    match frame {
        BytesFrame::BlobString { data, .. }
        | BytesFrame::SimpleString { data, .. }
        | BytesFrame::VerbatimString { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        _ => None,
    }
}

fn number(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Number { data, .. } => Some(*data),
        other => text(other)?.parse().ok(),
    }
}

/// A map, or a RESP2 array of alternating keys and values, as pairs.
fn pairs(frame: &BytesFrame) -> Option<Vec<(String, &BytesFrame)>> {
    match frame {
        BytesFrame::Map { data, .. } => data.iter().map(|(k, v)| Some((text(k)?, v))).collect(),
        BytesFrame::Array { data, .. } if data.len() % 2 == 0 => data
            .chunks_exact(2)
            .map(|pair| Some((text(&pair[0])?, &pair[1])))
            .collect(),
        _ => None,
    }
}

fn items(frame: &BytesFrame) -> Option<&[BytesFrame]> {
    match frame {
        BytesFrame::Array { data, .. } => Some(data),
        _ => None,
    }
}

fn node(frame: &BytesFrame) -> Option<Node> {
    let fields = pairs(frame)?;
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    let port = get("tls-port")
        .and_then(number)
        .filter(|p| *p > 0)
        .or_else(|| get("port").and_then(number))?;
    let host = get("ip")
        .and_then(text)
        .filter(|ip| !ip.is_empty() && ip != "?")
        .or_else(|| get("endpoint").and_then(text))?;
    Some(Node {
        id: get("id").and_then(text)?,
        host,
        port: u16::try_from(port).ok()?,
        hostname: get("hostname").and_then(text).filter(|h| !h.is_empty()),
        primary: get("role").and_then(text).as_deref() == Some("master"),
        online: get("health").and_then(text).as_deref() == Some("online"),
    })
}

/// The slot map a `CLUSTER SHARDS` reply describes.
pub fn parse_shards(reply: &Bytes) -> Result<SlotMap, String> {
    let invalid = |what: &str| format!("CLUSTER SHARDS: {what}");
    let frame = crate::resp::decode_reply(reply).ok_or_else(|| invalid("not a reply"))?;
    if let BytesFrame::SimpleError { data, .. } = &frame {
        return Err(invalid(data));
    }
    let mut shards = Vec::new();
    for shard in items(&frame).ok_or_else(|| invalid("not an array"))? {
        let fields = pairs(shard).ok_or_else(|| invalid("a shard is not a map"))?;
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let bounds: Vec<i64> = get("slots")
            .and_then(items)
            .ok_or_else(|| invalid("a shard without slots"))?
            .iter()
            .map(number)
            .collect::<Option<_>>()
            .ok_or_else(|| invalid("a slot is not a number"))?;
        let ranges = bounds
            .chunks_exact(2)
            .map(|pair| Some((u16::try_from(pair[0]).ok()?, u16::try_from(pair[1]).ok()?)))
            .collect::<Option<Vec<_>>>()
            .filter(|ranges| ranges.iter().all(|(s, e)| s <= e && *e < SLOTS))
            .ok_or_else(|| invalid("a slot range out of bounds"))?;
        let nodes: Vec<Node> = get("nodes")
            .and_then(items)
            .ok_or_else(|| invalid("a shard without nodes"))?
            .iter()
            .map(node)
            .collect::<Option<_>>()
            .ok_or_else(|| invalid("a node without id, address or port"))?;
        let (primaries, mut replicas): (Vec<Node>, Vec<Node>) =
            nodes.into_iter().partition(|n| n.primary);
        // After a failover the old primary may still be listed as one,
        // failed: the online one serves.
        let (mut online, failed): (Vec<Node>, Vec<Node>) =
            primaries.into_iter().partition(|n| n.online);
        let mut failed = failed.into_iter();
        let primary = match online.is_empty() {
            false => Some(online.remove(0)),
            true => failed.next(),
        };
        replicas.extend(online);
        replicas.extend(failed);
        shards.push(Shard {
            ranges,
            primary,
            replicas,
        });
    }
    Ok(SlotMap::new(shards))
}

/// A node of a `CLUSTER SLOTS` entry: `[ip, port, id, metadata]`.
fn slots_node(frame: &BytesFrame, primary: bool) -> Option<Node> {
    let parts = items(frame)?;
    let host = text(parts.first()?).filter(|ip| !ip.is_empty() && ip != "?")?;
    let port = u16::try_from(number(parts.get(1)?)?).ok()?;
    let hostname = parts
        .get(3)
        .and_then(pairs)
        .and_then(|fields| fields.into_iter().find(|(k, _)| k == "hostname"))
        .and_then(|(_, v)| text(v))
        .filter(|h| !h.is_empty());
    Some(Node {
        id: text(parts.get(2)?)?,
        host,
        port,
        hostname,
        primary,
        // CLUSTER SLOTS lists no health: a node listed is taken as online.
        online: true,
    })
}

/// The slot map a `CLUSTER SLOTS` reply describes: the fallback where
/// `CLUSTER SHARDS` is not available (Redis before 7.0). Ranges of the same
/// primary make one shard.
pub fn parse_slots(reply: &Bytes) -> Result<SlotMap, String> {
    let invalid = |what: &str| format!("CLUSTER SLOTS: {what}");
    let frame = crate::resp::decode_reply(reply).ok_or_else(|| invalid("not a reply"))?;
    if let BytesFrame::SimpleError { data, .. } = &frame {
        return Err(invalid(data));
    }
    let mut shards: Vec<Shard> = Vec::new();
    for entry in items(&frame).ok_or_else(|| invalid("not an array"))? {
        let fields = items(entry).ok_or_else(|| invalid("an entry is not an array"))?;
        let bound = |at: usize| {
            fields
                .get(at)
                .and_then(number)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n < SLOTS)
        };
        let (Some(start), Some(end)) = (bound(0), bound(1)) else {
            return Err(invalid("a slot range out of bounds"));
        };
        let nodes: Vec<Node> = fields
            .iter()
            .skip(2)
            .enumerate()
            .map(|(at, node)| slots_node(node, at == 0))
            .collect::<Option<_>>()
            .filter(|nodes: &Vec<Node>| !nodes.is_empty() && start <= end)
            .ok_or_else(|| invalid("a range without a valid primary"))?;
        let mut nodes = nodes.into_iter();
        let primary = nodes.next().expect("not empty");
        match shards
            .iter_mut()
            .find(|s| s.primary.as_ref().is_some_and(|p| p.id == primary.id))
        {
            Some(shard) => shard.ranges.push((start, end)),
            None => shards.push(Shard {
                ranges: vec![(start, end)],
                primary: Some(primary),
                replicas: nodes.collect(),
            }),
        }
    }
    Ok(SlotMap::new(shards))
}

/// A `MOVED <slot> <host>:<port>` or `ASK ...` error: the slot and where.
pub fn redirect(error: &[u8]) -> Option<(Redirect, u16, String, u16)> {
    let text = std::str::from_utf8(error.strip_prefix(b"-")?)
        .ok()?
        .trim_end();
    let mut words = text.split(' ');
    let kind = match words.next()? {
        "MOVED" => Redirect::Moved,
        "ASK" => Redirect::Ask,
        _ => return None,
    };
    let slot = words.next()?.parse().ok()?;
    let (host, port) = words.next()?.rsplit_once(':')?;
    Some((kind, slot, host.to_owned(), port.parse().ok()?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    Moved,
    Ask,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RESP2 `CLUSTER SHARDS` reply of two shards as Redis 7 writes it.
    fn reply() -> Bytes {
        let node = |id: &str, port: u16, role: &str, health: &str| {
            format!(
                "*14\r\n$2\r\nid\r\n$40\r\n{id:0>40}\r\n$8\r\ntls-port\r\n:{port}\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n\
                 $8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n${}\r\n{role}\r\n\
                 $18\r\nreplication-offset\r\n:42\r\n$6\r\nhealth\r\n${}\r\n{health}\r\n",
                role.len(),
                health.len()
            )
        };
        let shard = |slots: &str, count: usize, nodes: &[String]| {
            format!(
                "*4\r\n$5\r\nslots\r\n*{count}\r\n{slots}$5\r\nnodes\r\n*{}\r\n{}",
                nodes.len(),
                nodes.concat()
            )
        };
        let a = shard(
            ":0\r\n:8000\r\n",
            2,
            &[
                node("a", 7001, "master", "online"),
                node("b", 7004, "replica", "online"),
            ],
        );
        let b = shard(
            ":8001\r\n:16000\r\n:16001\r\n:16383\r\n",
            4,
            &[node("c", 7002, "master", "failed")],
        );
        Bytes::from(format!("*2\r\n{a}{b}"))
    }

    #[test]
    fn a_shards_reply_maps_every_slot_to_its_primary() {
        let map = parse_shards(&reply()).expect("parses");
        assert_eq!(map.shards.len(), 2);
        let primary = map.primary(100).expect("slot 100 served");
        assert_eq!((primary.host.as_str(), primary.port), ("127.0.0.1", 7001));
        assert_eq!(primary.id.len(), 40);
        assert_eq!(map.shards[0].replicas.len(), 1);
        assert!(map.primary(9000).is_none(), "its primary failed");
        assert_eq!(map.uncovered(), 16383 - 8001 + 1);
        assert_eq!(map.nodes().count(), 3);
    }

    #[test]
    fn moved_patches_one_slot() {
        let mut map = parse_shards(&reply()).expect("parses");
        map.moved(100, "127.0.0.1", 7009);
        assert_eq!(map.primary(100).map(|p| p.port), Some(7009));
        assert_eq!(map.primary(101).map(|p| p.port), Some(7001));
        assert_eq!(
            redirect(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some((Redirect::Moved, 3999, "127.0.0.1".into(), 6381))
        );
        assert_eq!(
            redirect(b"-ASK 1 10.0.0.1:7000\r\n"),
            Some((Redirect::Ask, 1, "10.0.0.1".into(), 7000))
        );
        assert_eq!(redirect(b"-ERR no\r\n"), None);
    }
}
