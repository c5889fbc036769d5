//! Counting answered requests: when each batch of requests left for Redis
//! ([`FlushLog`]), and, once their replies are written, each request's
//! outcome, duration and time in Redis in metrics, and values that failed
//! to open as security events ([`Answered`]).

use super::SessionContext;
use super::peer::Peer;
use super::pipeline::{Done, Replies};
use crate::policy::shown;
use crate::policy::table::{Blocks, CommandId, Kind};
use crate::telemetry::events;
use crate::telemetry::metrics::OpenFailure;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When each request sent to Redis left, and how long it may legitimately
/// block there, oldest first. The request half appends when it flushes;
/// the reply half takes one entry per reply from the front, and watches
/// the oldest for `upstream.request_timeout`. Both halves run in one task:
/// the lock is never contended, and it is never held across an await.
#[derive(Debug, Default)]
pub(super) struct FlushLog {
    sent: Mutex<VecDeque<(Instant, Blocks)>>,
}

impl FlushLog {
    /// Logs the requests in `batch` as sent `at` (and empties it).
    pub(super) fn sent(&self, batch: &mut Vec<Blocks>, at: Instant) {
        if batch.is_empty() {
            return;
        }
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.extend(batch.drain(..).map(|blocks| (at, blocks)));
    }

    /// True when every request sent has been answered.
    pub(super) fn is_empty(&self) -> bool {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// When the request the next reply answers was sent.
    pub(super) fn answered(&self) -> Option<Instant> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.pop_front().map(|(at, _)| at)
    }

    /// When the oldest unanswered request is overdue: `timeout` after it
    /// was sent, plus what it may block. `None`: nothing is due (nothing
    /// pending, or a command that may block forever while its client may
    /// still send: once `client_done`, forever is `timeout`).
    pub(super) fn deadline(&self, timeout: Duration, client_done: bool) -> Option<Instant> {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let (at, blocks) = sent.front()?;
        match blocks {
            Blocks::No => Some(*at + timeout),
            Blocks::For(wait) => Some(*at + timeout + *wait),
            Blocks::Forever if client_done => Some(*at + timeout),
            Blocks::Forever => None,
        }
    }
}

/// Answered requests between their reply's arrival and its write to the
/// client, with the time Redis took for those it answered.
#[derive(Default)]
pub(super) struct Answered {
    done: Vec<(Done, Option<Duration>)>,
    taken: Vec<Done>,
}

impl Answered {
    /// Takes what `replies` answered since last time; a reply Redis sent
    /// arrived now.
    pub(super) fn take(&mut self, replies: &mut Replies, flushes: &FlushLog) {
        replies.take_done(&mut self.taken);
        if self.taken.is_empty() {
            return;
        }
        let now = Instant::now();
        for done in self.taken.drain(..) {
            let waited = if done.forwarded {
                flushes
                    .answered()
                    .map(|sent| now.saturating_duration_since(sent))
            } else {
                None
            };
            self.done.push((done, waited));
        }
    }

    /// A value among those answered failed its authentication: sealed under
    /// a known key but bound to another key (or altered). On a lane that is
    /// the sign of a reply handed to the wrong request.
    pub(super) fn value_mismatched(&self) -> bool {
        self.done.iter().any(|(done, _)| {
            done.failures
                .iter()
                .any(|f| f.reason == OpenFailure::AuthFailed && f.site.kind != Kind::Message)
        })
    }

    /// Their replies are written: count them, and report values that did not open.
    pub(super) fn record(&mut self, ctx: &SessionContext, peer: &Peer) {
        if self.done.is_empty() {
            return;
        }
        let now = Instant::now();
        for (done, waited) in self.done.drain(..) {
            let command = done.tally.map_or(CommandId::OTHER, |t| t.command);
            for failure in &done.failures {
                ctx.metrics.open_failure(failure.reason).increment(1);
                let key = ctx.log_key_names.then(|| shown(&failure.site.key));
                if failure.site.kind == Kind::Message {
                    events::message_dropped(peer, failure.key_id, failure.reason, key.as_deref());
                    continue;
                }
                events::decrypt_failure(
                    peer,
                    command.name(),
                    failure.key_id,
                    failure.reason,
                    key.as_deref(),
                );
            }
            if let Some(tally) = done.tally {
                let duration = now.saturating_duration_since(tally.received);
                ctx.metrics
                    .command(tally.command, done.outcome, duration, waited);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reply_takes_the_send_time_of_its_batch_in_order() {
        let log = FlushLog::default();
        let start = Instant::now();
        let (first, second) = (start, start + Duration::from_millis(5));
        log.sent(&mut vec![Blocks::No, Blocks::No], first);
        log.sent(&mut vec![], start + Duration::from_millis(1)); // a batch of answers only
        log.sent(&mut vec![Blocks::No], second);
        assert_eq!(log.answered(), Some(first));
        assert_eq!(log.answered(), Some(first));
        assert_eq!(log.answered(), Some(second));
        assert_eq!(log.answered(), None);
    }

    #[test]
    fn the_oldest_pending_request_sets_the_deadline_blocking_ones_later_or_never() {
        let log = FlushLog::default();
        let timeout = Duration::from_secs(10);
        let at = Instant::now();
        assert_eq!(log.deadline(timeout, false), None);
        let wait = Duration::from_secs(3);
        log.sent(
            &mut vec![Blocks::No, Blocks::For(wait), Blocks::Forever],
            at,
        );
        assert_eq!(log.deadline(timeout, false), Some(at + timeout));
        log.answered();
        assert_eq!(log.deadline(timeout, false), Some(at + timeout + wait));
        log.answered();
        assert_eq!(log.deadline(timeout, false), None);
        assert_eq!(log.deadline(timeout, true), Some(at + timeout));
    }
}
