//! What operators see of redcloak: its metrics (Prometheus), its security
//! events (the `redcloak::security` log target) and its health (readiness
//! for `/readyz`). Everything else reports here; nothing here reaches back
//! into `upstream`, `session` or `admin`, so the dependencies point one way:
//! the admin listener serves what this module holds, and the places that
//! observe something record it here.
//!
//! * [`metrics`]: every metric redcloak exports, each label set a type;
//! * [`events`]: the security events;
//! * [`audit`]: the tamper-evident audit log they also go to;
//! * [`health`]: the readiness state machine;
//! * [`probe`]: the HTTP client `redcloak health` asks `/readyz` with.

pub mod audit;
pub mod events;
pub mod health;
pub mod metrics;
pub mod probe;

use health::Health;
use metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;

/// How often recorded histogram samples move into their buckets: samples
/// wait in memory until then (at 300k requests/s, 1 s of them is ~5 MB).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The metrics and health one redcloak process reports.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Telemetry {
    /// Whether a new upstream connection works (`Err`: why not), for
    /// readiness and `redcloak_upstream_up`.
    pub fn set_upstream(&self, outcome: Result<(), String>) {
        let up = outcome.is_ok();
        self.health.set_upstream(outcome);
        self.metrics.upstream_up.set(if up { 1.0 } else { 0.0 });
    }
}

/// Moves histogram samples into buckets periodically, so memory stays
/// bounded whether or not anyone scrapes.
pub async fn run_upkeep(metrics: Arc<Metrics>) {
    loop {
        tokio::time::sleep(UPKEEP_INTERVAL).await;
        metrics.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    /// The dependencies point one way: nothing in telemetry uses the
    /// modules that report to it.
    #[test]
    fn telemetry_depends_on_nothing_that_reports_to_it() {
        let files = [
            ("mod.rs", include_str!("mod.rs")),
            ("metrics.rs", include_str!("metrics.rs")),
            ("events.rs", include_str!("events.rs")),
            ("health.rs", include_str!("health.rs")),
            ("probe.rs", include_str!("probe.rs")),
        ];
        let reporters = ["upstream", "session", "admin", "server"];
        for (file, text) in files {
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for reporter in reporters {
                let path = format!("crate::{reporter}");
                assert!(!code.contains(&path), "telemetry/{file} uses {path}");
            }
        }
    }
}
