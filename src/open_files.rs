//! The open-file limit: every client connection takes one descriptor and,
//! while it holds one, its upstream connection another. At start the soft
//! limit is raised to the hard one (as nginx and Go programs do), and the
//! startup checks warn when even that is too low for `listen.max_connections`.

use crate::config::Config;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors beyond the connections: standard streams, listeners, the
/// runtime's own, the admin listener's connections, the readiness check.
const SPARE: u64 = 64;

/// Raises the soft limit to the hard one. Returns the soft limit before and
/// after, when it changed.
pub fn raise_to_hard_limit() -> Option<(u64, u64)> {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current?;
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard <= before {
        return None;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).ok()?;
    Some((before, hard))
}

/// The soft limit now; `None`: unlimited.
pub fn soft_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Descriptors redcloak may need with every client connected and active.
pub fn needed(config: &Config) -> u64 {
    let clients = config.listen.max_connections as u64;
    2 * clients + config.upstream.pool_idle as u64 + SPARE
}
