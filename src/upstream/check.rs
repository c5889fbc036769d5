//! The upstream check: every few seconds a fresh connection to Redis (TCP,
//! TLS, AUTH, then HELLO, whose `role` a least-privilege user can read),
//! which keeps readiness (`telemetry::health`) and `redcloak_upstream_up`
//! current. An existing connection that still answers proves nothing: DNS,
//! certificates or the password may have changed under it. A replica is not
//! ready: it does not take writes.

use crate::telemetry::Telemetry;
use crate::upstream::{Upstream, UpstreamStream};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the upstream check runs.
pub const UPSTREAM_CHECK_INTERVAL: Duration = Duration::from_secs(5);

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
    fn hello_says_the_role() {
        let reply = b"*6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$5\r\nproto\r\n:2\r\n";
        assert_eq!(hello_field(reply, b"role"), Some(&b"replica"[..]));
        assert_eq!(hello_field(reply, b"mode"), None);
    }
}
