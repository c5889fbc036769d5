//! Finding and proving a cluster's nodes: the slot map read from the first
//! seed that answers (`CLUSTER SHARDS`, as redcloak's own ACL user, over a
//! verified TLS connection), then every node connected to at the address
//! the cluster announces, its certificate verified against the configured
//! name (or the node's announced hostname), redcloak's AUTH accepted there
//! (ACL users are per node), and `CLUSTER MYID` answering the id the map
//! names: an address reused by another node is refused. A name is never
//! resolved and its IP verified instead.

use super::map::{Node, SlotMap};
use crate::upstream::{Upstream, UpstreamStream, call};
use std::time::Duration;

/// Which name each node's certificate must show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Naming {
    /// One name for every node (`upstream.server_name`).
    Configured(String),
    /// The node's announced hostname (`cluster-announce-hostname`); a node
    /// that announces none is refused.
    Announced,
}

impl Naming {
    /// The name `node`'s certificate must show.
    pub fn name_of(&self, node: &Node) -> Result<String, String> {
        match self {
            Naming::Configured(name) => Ok(name.clone()),
            Naming::Announced => node.hostname.clone().ok_or_else(|| {
                format!(
                    "node {}:{} announces no hostname (cluster-announce-hostname) to verify its certificate against",
                    node.host, node.port
                )
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("no seed answered CLUSTER SHARDS: {0}")]
    NoSeed(String),
}

/// `host:port`, brackets around an IPv6 address.
pub fn address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The slot map from `CLUSTER SHARDS`, or `CLUSTER SLOTS` where Redis
/// refuses that (before 7.0, or an ACL without it).
pub(crate) async fn shards(
    conn: &mut UpstreamStream,
    timeout: Duration,
) -> Result<SlotMap, String> {
    let reply = call(conn, &[b"CLUSTER", b"SHARDS"], timeout)
        .await
        .map_err(|e| e.to_string())?;
    if !reply.starts_with(b"-") {
        return super::map::parse_shards(&bytes::Bytes::from(reply.to_vec()));
    }
    let slots = call(conn, &[b"CLUSTER", b"SLOTS"], timeout)
        .await
        .map_err(|e| e.to_string())?;
    super::map::parse_slots(&bytes::Bytes::from(slots.to_vec())).map_err(|slots_error| {
        format!(
            "CLUSTER SHARDS: {}; {slots_error}",
            crate::upstream::error_text(&reply)
        )
    })
}

/// The slot map, from the first of `seeds` that answers.
pub async fn discover(
    upstream: &Upstream,
    seeds: &[String],
    naming: &Naming,
    timeout: Duration,
) -> Result<SlotMap, TopologyError> {
    discover_keeping(upstream, seeds, naming, timeout)
        .await
        .map(|(map, _)| map)
}

/// [`discover`], and the connection the map was read over (kept to read
/// it again).
pub async fn discover_keeping(
    upstream: &Upstream,
    seeds: &[String],
    naming: &Naming,
    timeout: Duration,
) -> Result<(SlotMap, UpstreamStream), TopologyError> {
    let mut failures = Vec::new();
    for seed in seeds {
        let name = match naming {
            Naming::Configured(name) => name.clone(),
            // A seed is named by its host as configured.
            Naming::Announced => seed
                .rsplit_once(':')
                .map_or(seed.as_str(), |(host, _)| host)
                .trim_matches(['[', ']'])
                .to_owned(),
        };
        let attempt = async {
            let node = upstream
                .node(seed.clone(), &name)
                .map_err(|e| e.to_string())?;
            let mut conn = node.connect().await.map_err(|e| e.to_string())?;
            let map = shards(&mut conn, timeout).await?;
            Ok::<_, String>((map, conn))
        };
        match attempt.await {
            Ok(found) => return Ok(found),
            Err(why) => failures.push(format!("{seed}: {why}")),
        }
    }
    Err(TopologyError::NoSeed(failures.join("; ")))
}

/// One node, proved or not.
#[derive(Debug)]
pub struct NodeCheck {
    pub node: Node,
    pub outcome: Result<(), String>,
}

/// Connects to every node of `map`: TLS verified against its name, AUTH,
/// and `CLUSTER MYID` answering the id the map names.
pub async fn verify_nodes(
    upstream: &Upstream,
    map: &SlotMap,
    naming: &Naming,
    timeout: Duration,
) -> Vec<NodeCheck> {
    let mut checks = Vec::new();
    for node in map.nodes() {
        let outcome = async {
            let name = naming.name_of(node)?;
            let conn = upstream
                .node(address(&node.host, node.port), &name)
                .map_err(|e| e.to_string())?;
            let mut conn = conn.connect().await.map_err(|e| e.to_string())?;
            let reply = call(&mut conn, &[b"CLUSTER", b"MYID"], timeout)
                .await
                .map_err(|e| e.to_string())?;
            match crate::resp::bulk_body(&reply) {
                Some(id) if id == node.id.as_bytes() => Ok(()),
                Some(id) => Err(format!(
                    "answers as node {} where the slot map names {}: another node behind a known address",
                    String::from_utf8_lossy(id),
                    node.id
                )),
                None => Err(format!(
                    "CLUSTER MYID answered {}",
                    crate::upstream::error_text(&reply)
                )),
            }
        }
        .await;
        checks.push(NodeCheck {
            node: node.clone(),
            outcome,
        });
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        assert_eq!(address("127.0.0.1", 7000), "127.0.0.1:7000");
        assert_eq!(address("::1", 7000), "[::1]:7000");
        let node = Node {
            id: "a".into(),
            host: "10.0.0.1".into(),
            port: 7000,
            hostname: Some("redis-0.internal".into()),
            primary: true,
            online: true,
        };
        assert_eq!(
            Naming::Announced.name_of(&node),
            Ok("redis-0.internal".into())
        );
        assert_eq!(
            Naming::Configured("redis".into()).name_of(&node),
            Ok("redis".into())
        );
        let anonymous = Node {
            hostname: None,
            ..node
        };
        assert!(Naming::Announced.name_of(&anonymous).is_err());
    }
}
