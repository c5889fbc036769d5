//! Liveness and readiness, as `/healthz` and `/readyz` report them.
//!
//! ```text
//!   Starting ──gate passed, listeners open──▶ Serving ──shutdown──▶ Draining (final)
//! ```
//!
//! Ready means: serving, and a new upstream connection can be made right
//! now, to a Redis that takes writes. `upstream::check` proves it every
//! few seconds with a fresh connection (TCP, TLS, AUTH, then HELLO, whose
//! `role` a least-privilege user can read: a replica is not ready), and a
//! client whose upstream connection fails turns it off at once. An existing
//! connection that still answers proves nothing: DNS, certificates or the
//! password may have changed under it. When not ready, the reason names the
//! step that failed. Draining is final: nothing makes a draining proxy
//! ready again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

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
}
