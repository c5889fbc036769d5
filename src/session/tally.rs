//! Counting answered requests: when each batch of requests left for Redis
//! ([`FlushLog`]), and, once their replies are written, each request's
//! outcome, duration and time in Redis in metrics, and values that failed
//! to open as security events ([`Answered`]).

use super::SessionContext;
use super::peer::Peer;
use super::pipeline::{Done, Replies};
use crate::events;
use crate::policy::shown;
use crate::policy::table::CommandId;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When each batch of requests left for Redis, with how many replies it
/// awaits, oldest first. The request half appends; the reply half takes one
/// reply at a time from the front. Both halves run in one task: the lock is
/// never contended, and it is never held across an await.
#[derive(Debug, Default)]
pub(super) struct FlushLog {
    batches: Mutex<VecDeque<(usize, Instant)>>,
}

impl FlushLog {
    pub(super) fn sent(&self, replies: usize, at: Instant) {
        if replies > 0 {
            let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
            batches.push_back((replies, at));
        }
    }

    /// True when every request sent has been answered.
    pub(super) fn is_empty(&self) -> bool {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// When the request the next reply answers was sent.
    pub(super) fn answered(&self) -> Option<Instant> {
        let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        let (left, at) = batches.front_mut()?;
        let sent = *at;
        *left -= 1;
        if *left == 0 {
            batches.pop_front();
        }
        Some(sent)
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
        log.sent(2, first);
        log.sent(0, start + Duration::from_millis(1)); // a batch of answers only
        log.sent(1, second);
        assert_eq!(log.answered(), Some(first));
        assert_eq!(log.answered(), Some(first));
        assert_eq!(log.answered(), Some(second));
        assert_eq!(log.answered(), None);
    }
}
