//! Redis Cluster: which slot a key lives in (`slot`, pure), which node
//! serves each slot (`map`, from `CLUSTER SHARDS`, patched by MOVED; pure),
//! and finding and proving the nodes (`topology`: TLS name, AUTH and
//! `CLUSTER MYID` per node).
//!
//! Routing requests through them (lanes per node, redirects followed,
//! topology refreshes) is being built on these: see the README's "Not done
//! yet".

pub mod map;
pub mod router;
pub mod slot;
pub mod topology;
