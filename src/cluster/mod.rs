//! Redis Cluster, the parts that are pure: which slot a key lives in
//! (`slot`), and which node serves each slot (`map`, from `CLUSTER
//! SHARDS`, patched by MOVED).
//!
//! Routing requests through them (lanes per node, redirects followed,
//! topology refreshes) is being built on these: see the README's "Not done
//! yet".

pub mod map;
pub mod slot;
