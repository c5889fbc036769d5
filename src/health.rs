//! Liveness and readiness, as `/healthz` and `/readyz` report them.
//!
//! ```text
//!   Starting ──gate passed, listeners open──▶ Serving ──shutdown──▶ Draining (final)
//! ```
//!
//! Ready means: serving, and an upstream connection can be made right now.
//! The upstream part is kept fresh by [`watch_upstream`], which holds one
//! authenticated connection and PINGs it, and by every client's own upstream
//! connection attempt. Draining is final: nothing makes a draining proxy
//! ready again.

use crate::admin::Telemetry;
use crate::upstream::{Upstream, UpstreamStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

/// How often the upstream check runs.
pub const UPSTREAM_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Health {
    phase: AtomicU8,
    upstream_up: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            phase: AtomicU8::new(STARTING),
            upstream_up: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// The gate passed and the listeners are open. No effect once draining.
    pub fn serving(&self) {
        let _ = self
            .phase
            .compare_exchange(STARTING, SERVING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Shutdown began. Final.
    pub fn draining(&self) {
        self.phase.store(DRAINING, Ordering::SeqCst);
    }

    pub fn set_upstream_up(&self, up: bool) {
        self.upstream_up.store(up, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == SERVING && self.upstream_up.load(Ordering::SeqCst)
    }

    /// Why the proxy is not ready, for the `/readyz` body.
    pub fn status(&self) -> &'static str {
        match (
            self.phase.load(Ordering::SeqCst),
            self.upstream_up.load(Ordering::SeqCst),
        ) {
            (STARTING, _) => "starting: the startup checks have not passed yet",
            (DRAINING, _) => "draining: shutting down",
            (_, false) => "upstream unavailable: cannot connect to Redis",
            _ => "ready",
        }
    }
}

/// Keeps `health` and the `redcloak_upstream_up` gauge current until
/// `shutdown`: one authenticated upstream connection, PINGed every interval,
/// reconnected when it fails.
pub async fn watch_upstream(
    upstream: Arc<Upstream>,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) {
    let mut connection: Option<UpstreamStream> = None;
    loop {
        let up = match connection.as_mut() {
            Some(stream) => ping(&upstream, stream).await,
            None => match upstream.connect_counted(&telemetry.metrics).await {
                Ok(stream) => {
                    connection = Some(stream);
                    true
                }
                Err(_) => false,
            },
        };
        if !up {
            connection = None;
        }
        telemetry.set_upstream_up(up);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(UPSTREAM_CHECK_INTERVAL) => {}
        }
    }
}

async fn ping(upstream: &Upstream, stream: &mut UpstreamStream) -> bool {
    let timeout = upstream.settings().connect_timeout;
    let reply = crate::upstream::call(stream, &[b"PING"], timeout).await;
    matches!(reply, Ok(reply) if reply.as_ref() == b"+PONG\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving_with_redis_reachable_and_never_after_draining() {
        let health = Health::default();
        health.set_upstream_up(true);
        assert!(!health.is_ready(), "not before the gate passed");
        assert!(health.status().starts_with("starting"));
        health.serving();
        assert!(health.is_ready());
        health.set_upstream_up(false);
        assert!(!health.is_ready());
        assert!(health.status().starts_with("upstream unavailable"));
        health.set_upstream_up(true);
        assert!(health.is_ready());
        health.draining();
        assert!(!health.is_ready());
        health.serving();
        health.set_upstream_up(true);
        assert!(!health.is_ready(), "draining is final");
        assert!(health.status().starts_with("draining"));
    }
}
