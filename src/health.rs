//! Liveness and readiness, as `/healthz` and `/readyz` report them.
//!
//! ```text
//!   Starting ──gate passed, listeners open──▶ Serving ──shutdown──▶ Draining (final)
//! ```
//!
//! Ready means: serving, and a new upstream connection can be made right
//! now, to a Redis that takes writes. [`watch_upstream`] proves it every
//! few seconds with a fresh connection (TCP, TLS, AUTH, then HELLO, whose
//! `role` a least-privilege user can read: a replica is not ready), and a
//! client whose upstream connection fails turns it off at once. An existing
//! connection that still answers proves nothing: DNS, certificates or the
//! password may have changed under it. When not ready, the reason names the
//! step that failed. Draining is final: nothing makes a draining proxy
//! ready again.

use crate::admin::Telemetry;
use crate::upstream::{Upstream, UpstreamStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Why the last upstream attempt failed (no secrets: error texts only).
    upstream_failure: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            phase: AtomicU8::new(STARTING),
            upstream_up: AtomicBool::new(false),
            upstream_failure: Mutex::new("no upstream connection made yet".into()),
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

    /// A new upstream connection succeeded, or failed for `Err(reason)`.
    pub fn set_upstream(&self, outcome: Result<(), String>) {
        let up = outcome.is_ok();
        if let Err(reason) = outcome {
            *self
                .upstream_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = reason;
        }
        self.upstream_up.store(up, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == SERVING && self.upstream_up.load(Ordering::SeqCst)
    }

    /// Why the proxy is not ready, for the `/readyz` body.
    pub fn status(&self) -> String {
        match (
            self.phase.load(Ordering::SeqCst),
            self.upstream_up.load(Ordering::SeqCst),
        ) {
            (STARTING, _) => "starting: the startup checks have not passed yet".into(),
            (DRAINING, _) => "draining: shutting down".into(),
            (_, false) => {
                let reason = self
                    .upstream_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                format!("upstream unavailable: {reason}")
            }
            _ => "ready".into(),
        }
    }
}

/// Keeps `health` and the `redcloak_upstream_up` gauge current until
/// `shutdown`: every interval, a fresh authenticated connection asked
/// HELLO, then closed.
pub async fn watch_upstream(
    upstream: Arc<Upstream>,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) {
    loop {
        // One lost connection (killed, or a blip) is not an outage: a
        // failed check is tried again at once before it counts.
        let mut outcome = check(&upstream, &telemetry).await;
        if outcome.is_err() {
            outcome = check(&upstream, &telemetry).await;
        }
        telemetry.set_upstream(outcome);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(UPSTREAM_CHECK_INTERVAL) => {}
        }
    }
}

/// A fresh connection, logged in, that HELLO says is a primary's.
async fn check(upstream: &Upstream, telemetry: &Telemetry) -> Result<(), String> {
    match upstream.connect_counted(&telemetry.metrics).await {
        Ok(mut stream) => takes_writes(upstream, &mut stream).await,
        Err(err) => Err(err.to_string()),
    }
}

/// HELLO 2 on a new connection: Redis answers, and as a primary.
async fn takes_writes(upstream: &Upstream, stream: &mut UpstreamStream) -> Result<(), String> {
    let timeout = upstream.settings().connect_timeout;
    let address = upstream.address();
    let reply = crate::upstream::call(stream, &[b"HELLO", b"2"], timeout)
        .await
        .map_err(|err| format!("Redis at {address} did not answer HELLO: {err}"))?;
    match hello_field(&reply, b"role") {
        Some(b"master") => Ok(()),
        Some(role) => Err(format!(
            "Redis at {address} is a {} (read-only): point upstream.address at the primary",
            String::from_utf8_lossy(role)
        )),
        None => Err(format!("Redis at {address} answered HELLO without a role")),
    }
}

/// A field of HELLO's RESP2 reply (a flat array of names and values).
fn hello_field<'a>(reply: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (_, elements) = crate::resp::aggregate_elements(reply, &crate::resp::Limits::default())?;
    elements.chunks_exact(2).find_map(|pair| {
        let key = crate::resp::bulk_body(pair[0])?;
        (key == name).then(|| crate::resp::bulk_body(pair[1]))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving_with_redis_reachable_and_never_after_draining() {
        let health = Health::default();
        health.set_upstream(Ok(()));
        assert!(!health.is_ready(), "not before the gate passed");
        assert!(health.status().starts_with("starting"));
        health.serving();
        assert!(health.is_ready());
        health.set_upstream(Err("cannot connect to Redis at r:6379: refused".into()));
        assert!(!health.is_ready());
        assert_eq!(
            health.status(),
            "upstream unavailable: cannot connect to Redis at r:6379: refused"
        );
        health.set_upstream(Ok(()));
        assert!(health.is_ready());
        health.draining();
        assert!(!health.is_ready());
        health.serving();
        health.set_upstream(Ok(()));
        assert!(!health.is_ready(), "draining is final");
        assert!(health.status().starts_with("draining"));
    }

    #[test]
    fn hello_says_the_role() {
        let reply = b"*6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$5\r\nproto\r\n:2\r\n";
        assert_eq!(hello_field(reply, b"role"), Some(&b"replica"[..]));
        assert_eq!(hello_field(reply, b"mode"), None);
    }
}
