//! A timer for "the client has been quiet this long with nothing pending":
//! what parks a client on a clean connection (`upstream.release_idle_after`)
//! and closes an idle one (`listen.idle_timeout`). Reads do not touch it:
//! when it fires it checks the time of the last read and, if the client is
//! not quiet yet, moves itself to the next moment it could be.

use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

pub(super) struct QuietTimer {
    sleep: Pin<Box<Sleep>>,
    after: Duration,
}

impl QuietTimer {
    /// Fires first `after` from now.
    pub(super) fn new(after: Duration) -> QuietTimer {
        QuietTimer {
            sleep: Box::pin(tokio::time::sleep(after)),
            after,
        }
    }

    /// The sleep to await (in a `select!` branch).
    pub(super) fn fired(&mut self) -> &mut Pin<Box<Sleep>> {
        &mut self.sleep
    }

    /// Once fired: whether the client has been quiet for the whole period
    /// since `last_read` and nothing is pending. If not, the timer is reset
    /// to the next moment that could be true.
    pub(super) fn quiet(&mut self, last_read: std::time::Instant, nothing_pending: bool) -> bool {
        let now = Instant::now();
        let quiet_since = Instant::from_std(last_read) + self.after;
        if quiet_since <= now && nothing_pending {
            return true;
        }
        let next = if quiet_since > now {
            quiet_since
        } else {
            now + self.after
        };
        self.sleep.as_mut().reset(next);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fires(timer: &mut QuietTimer) -> Instant {
        timer.fired().await;
        Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn fires_once_the_client_has_been_quiet_for_the_whole_period() {
        let start = Instant::now();
        let mut timer = QuietTimer::new(Duration::from_secs(10));
        assert_eq!(fires(&mut timer).await - start, Duration::from_secs(10));
        assert!(timer.quiet(start.into_std(), true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_recent_read_moves_it_to_the_period_after_that_read() {
        let start = Instant::now();
        let mut timer = QuietTimer::new(Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(4)).await;
        let read_at = Instant::now();
        fires(&mut timer).await;
        assert!(!timer.quiet(read_at.into_std(), true));
        assert_eq!(fires(&mut timer).await - start, Duration::from_secs(14));
        assert!(timer.quiet(read_at.into_std(), true));
    }

    #[tokio::test(start_paused = true)]
    async fn pending_work_waits_a_whole_period_more() {
        let start = Instant::now();
        let mut timer = QuietTimer::new(Duration::from_secs(10));
        fires(&mut timer).await;
        assert!(!timer.quiet(start.into_std(), false));
        assert_eq!(fires(&mut timer).await - start, Duration::from_secs(20));
        assert!(timer.quiet(start.into_std(), true));
    }
}
