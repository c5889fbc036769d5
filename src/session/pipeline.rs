//! The reply side of a session, without sockets: which request each upstream
//! reply answers, and what to send the client for it.
//!
//! Requests leave in order and Redis answers in order, so the pending
//! requests form a FIFO of [`Entry`]s. The entry at the front (the *head*)
//! takes the next reply, except for out-of-band frames: RESP3 pushes (pub/sub
//! messages, tracking invalidations) and, on a RESP2 connection in subscribed
//! mode, `message`/`pmessage`/`smessage` arrays. Those are delivered as they
//! come and never consume an entry. A (P|S)SUBSCRIBE or UNSUBSCRIBE entry
//! takes one confirmation per channel; its count for "all channels" is known
//! from the subscriptions this connection has been confirmed so far.
//!
//! Invariant: a reply is only ever delivered for the entry it answers. A frame
//! that fits no entry is an [`UnexpectedReply`] and ends the connection.
//!
//! A message on a channel whose rule encrypts is delivered with its payload
//! opened; one that fails to open is dropped, never delivered sealed, and
//! reported like any value that failed to open.

use super::open;
use super::pubsub::{PubSubEvent, Subscriptions, pubsub_event};
use crate::crypto::CurrentKeyring;
use crate::policy::rules::Rules;
use crate::policy::table::CommandId;
use crate::policy::table::PubSubKind;
use crate::policy::{self, ReplyPlan};
use crate::resp::{self, Limits, ReplyKind};
use crate::telemetry::metrics::Outcome;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Instant;

/// One pending request, in request order.
#[derive(Debug)]
pub enum Entry {
    /// Forwarded upstream; its reply follows the plan. `None`: the proxy's
    /// own request (the login after RESET), not counted as a command.
    Await(ReplyPlan, Option<Tally>),
    /// HELLO answered by the proxy for a client on a lane: delivered when
    /// its turn comes, and the replies after it are in `protocol`.
    Hello {
        reply: Bytes,
        protocol: u8,
        tally: Tally,
    },
    /// Answered by the proxy itself; delivered when its turn comes.
    Answer {
        reply: Bytes,
        then_close: bool,
        /// `None`: not a command (a protocol error).
        tally: Option<(Tally, Outcome)>,
    },
}

/// What metrics need to know of a client request.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    pub command: CommandId,
    /// When the read that completed the request returned.
    pub received: Instant,
}

/// A pending request that has been answered, in request order.
#[derive(Debug)]
pub struct Done {
    pub tally: Option<Tally>,
    pub outcome: Outcome,
    /// Answered by Redis (an `Await` entry), not by the proxy.
    pub forwarded: bool,
    /// Values in the reply that failed to open.
    pub failures: Vec<open::Failure>,
}

/// Whether the connection goes on after an entry was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

/// Upstream sent something that answers no pending request the way it must.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnexpectedReply {
    #[error("Redis sent a reply while no request was waiting for one")]
    NoRequestWaiting,
    #[error("Redis answered a (un)subscribe request with something other than a confirmation")]
    NotAConfirmation,
    #[error("logging in again after RESET failed: {0}")]
    RestoreLoginFailed(String),
    #[error("Redis's reply does not fit its request ({0}): the connection is out of step")]
    Contradicts(&'static str),
    #[error("Redis sent a RESP3 frame on a RESP2 connection: the connection is out of step")]
    Resp3OnResp2,
}

#[derive(Debug)]
struct Head {
    plan: ReplyPlan,
    tally: Option<Tally>,
    /// Confirmations still expected, for (un)subscribe plans.
    confirmations: usize,
}

/// Reply-side connection state.
#[derive(Debug)]
pub struct Replies {
    head: Option<Head>,
    /// 2 or 3: what the client negotiated with HELLO.
    protocol: u8,
    subscriptions: Subscriptions,
    /// Redis confirmed MULTI (`+OK`) and no EXEC, DISCARD or RESET has
    /// ended the transaction since.
    in_multi: bool,
    /// Plans of the commands Redis queued since MULTI, for EXEC.
    transaction: Vec<ReplyPlan>,
    keyring: Arc<CurrentKeyring>,
    /// Which channels' messages are sealed.
    rules: Arc<Rules>,
    /// Limits for walking inside a reply that is already framed.
    limits: Limits,
    /// Answered entries not yet taken by [`Replies::take_done`].
    done: Vec<Done>,
}

impl Replies {
    pub fn new(keyring: Arc<CurrentKeyring>, rules: Arc<Rules>, limits: Limits) -> Self {
        Replies {
            head: None,
            protocol: 2,
            subscriptions: Subscriptions::default(),
            in_multi: false,
            transaction: Vec::new(),
            keyring,
            rules,
            limits,
            done: Vec::new(),
        }
    }

    /// Replies start in `protocol` (a client that said HELLO 3 on a lane,
    /// now on a connection that was told so).
    pub fn speaking(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    /// Moves the entries answered since the last call into `into`.
    pub fn take_done(&mut self, into: &mut Vec<Done>) {
        into.append(&mut self.done);
    }

    /// True when no entry is waiting for a reply: the next one may be taken.
    pub fn needs_entry(&self) -> bool {
        self.head.is_none()
    }

    /// Takes the next entry in request order. Answers are written at once
    /// (everything before them has been delivered, or they would not be next).
    pub fn accept(&mut self, entry: Entry, out: &mut BytesMut) -> Flow {
        debug_assert!(self.head.is_none());
        match entry {
            Entry::Hello {
                reply,
                protocol,
                tally,
            } => {
                out.extend_from_slice(&reply);
                self.protocol = protocol;
                self.done.push(Done {
                    tally: Some(tally),
                    outcome: Outcome::Ok,
                    forwarded: false,
                    failures: Vec::new(),
                });
                Flow::Continue
            }
            Entry::Answer {
                reply,
                then_close,
                tally,
            } => {
                out.extend_from_slice(&reply);
                if let Some((tally, outcome)) = tally {
                    self.done.push(Done {
                        tally: Some(tally),
                        outcome,
                        forwarded: false,
                        failures: Vec::new(),
                    });
                }
                if then_close {
                    Flow::Close
                } else {
                    Flow::Continue
                }
            }
            Entry::Await(plan, tally) => {
                let confirmations = match &plan {
                    ReplyPlan::Subscribe { channels, .. } => *channels,
                    ReplyPlan::Unsubscribe {
                        channels: Some(n), ..
                    } => *n,
                    ReplyPlan::Unsubscribe {
                        kind,
                        channels: None,
                    } => self.subscriptions.of(*kind).len().max(1),
                    _ => 1,
                };
                self.head = Some(Head {
                    plan,
                    tally,
                    confirmations,
                });
                Flow::Continue
            }
        }
    }

    /// Handles one complete reply frame from upstream. On an error nothing
    /// of the frame is left in `out`.
    pub fn on_reply(&mut self, frame: Bytes, out: &mut BytesMut) -> Result<(), UnexpectedReply> {
        let (mark, done) = (out.len(), self.done.len());
        let head = self.head.as_ref().map(|h| h.tally);
        let handled = self.handle_reply(frame, out);
        if handled.is_err() {
            out.truncate(mark);
            self.done.truncate(done);
            // The request this frame went to stays unanswered: the session
            // answers it (and every later one) with the error.
            if let (Some(tally), None) = (head, &self.head) {
                self.head = Some(Head {
                    plan: ReplyPlan::Passthrough,
                    tally,
                    confirmations: 1,
                });
            }
        }
        handled
    }

    fn handle_reply(&mut self, frame: Bytes, out: &mut BytesMut) -> Result<(), UnexpectedReply> {
        // HELLO 3's own reply is the first RESP3 frame a connection sees.
        let hello_pending = matches!(
            self.head.as_ref().map(|h| &h.plan),
            Some(ReplyPlan::Hello { .. })
        );
        if self.protocol == 2 && !hello_pending && resp::is_resp3_only(&frame) {
            return Err(UnexpectedReply::Resp3OnResp2);
        }
        let kind = resp::reply_kind(&frame);
        let event = match kind {
            ReplyKind::Push => pubsub_event(&frame),
            ReplyKind::Array
                if self.protocol == 2 && (self.subscriptions.any() || self.head_is_pubsub()) =>
            {
                pubsub_event(&frame)
            }
            _ => None,
        };
        let for_head = match (kind, &event) {
            (
                ReplyKind::Push,
                Some(PubSubEvent::Confirmation {
                    kind, subscribe, ..
                }),
            ) => self.head_takes(*kind, *subscribe),
            (ReplyKind::Push, _) => false,
            (_, Some(PubSubEvent::Message)) => !self.subscriptions.any(),
            _ => true,
        };
        if !for_head {
            match event {
                Some(PubSubEvent::Confirmation {
                    kind,
                    subscribe,
                    channel,
                }) => self.subscriptions.apply(kind, subscribe, channel),
                Some(PubSubEvent::Message) => {
                    self.deliver_message(&frame, out);
                    return Ok(());
                }
                None => {}
            }
            out.extend_from_slice(&frame);
            return Ok(());
        }
        let Some(head) = self.head.as_mut() else {
            return Err(UnexpectedReply::NoRequestWaiting);
        };
        let is_error = kind == ReplyKind::Error;
        match &head.plan {
            ReplyPlan::Subscribe { .. } | ReplyPlan::Unsubscribe { .. } if !is_error => {
                let Some(PubSubEvent::Confirmation {
                    kind,
                    subscribe,
                    channel,
                }) = event
                else {
                    return Err(UnexpectedReply::NotAConfirmation);
                };
                head.confirmations = head.confirmations.saturating_sub(1);
                let done = head.confirmations == 0;
                self.subscriptions.apply(kind, subscribe, channel);
                out.extend_from_slice(&frame);
                if done && let Some(head) = self.head.take() {
                    self.answered(head.tally, Outcome::Ok, Vec::new());
                }
                return Ok(());
            }
            _ => {}
        }
        let Some(Head { plan, tally, .. }) = self.head.take() else {
            return Err(UnexpectedReply::NoRequestWaiting);
        };
        let mut failures = Vec::new();
        let replaced = matches!(plan, ReplyPlan::Replace(_));
        let delivered = self.deliver(plan, frame, is_error, out, &mut failures);
        let outcome = if !failures.is_empty() {
            Outcome::DecryptError
        } else if is_error || replaced {
            Outcome::RedisError
        } else {
            Outcome::Ok
        };
        self.answered(tally, outcome, failures);
        delivered
    }

    /// A `message`, `pmessage` or `smessage` delivery: the payload is
    /// opened when its channel's rule encrypts. One that fails to open is
    /// dropped (never delivered sealed) and reported as a failure.
    fn deliver_message(&mut self, frame: &[u8], out: &mut BytesMut) {
        let Some((header, elements)) = resp::aggregate_elements(frame, &self.limits) else {
            return out.extend_from_slice(frame);
        };
        // [message, channel, payload] or [pmessage, pattern, channel, payload].
        let (Some(&payload), Some(channel)) = (
            elements.last(),
            elements
                .len()
                .checked_sub(2)
                .and_then(|at| elements.get(at)),
        ) else {
            return out.extend_from_slice(frame);
        };
        let channel = resp::bulk_body(channel).unwrap_or_default();
        let Some(site) = policy::message_site(&self.rules, channel) else {
            return out.extend_from_slice(frame);
        };
        let mut opened = BytesMut::new();
        if let Err(failure) = open::payload(
            &site,
            payload,
            &self.keyring.load(),
            &self.limits,
            &mut opened,
        ) {
            self.done.push(Done {
                tally: None,
                outcome: Outcome::DecryptError,
                forwarded: false,
                failures: vec![failure],
            });
            return;
        }
        out.extend_from_slice(header);
        for element in &elements[..elements.len() - 1] {
            out.extend_from_slice(element);
        }
        out.extend_from_slice(&opened);
    }

    fn answered(&mut self, tally: Option<Tally>, outcome: Outcome, failures: Vec<open::Failure>) {
        self.done.push(Done {
            tally,
            outcome,
            forwarded: true,
            failures,
        });
    }

    fn deliver(
        &mut self,
        plan: ReplyPlan,
        frame: Bytes,
        is_error: bool,
        out: &mut BytesMut,
        failures: &mut Vec<open::Failure>,
    ) -> Result<(), UnexpectedReply> {
        // Redis queued the command: whatever the request side believed, its
        // plan waits for EXEC (the transaction is what Redis says it is).
        if self.in_multi && &frame[..] == b"+QUEUED\r\n" {
            let plan = match plan {
                ReplyPlan::Queued(inner) => *inner,
                plan => plan,
            };
            self.transaction.push(plan);
            out.extend_from_slice(&frame);
            return Ok(());
        }
        match plan {
            ReplyPlan::Passthrough
            | ReplyPlan::Subscribe { .. }
            | ReplyPlan::Unsubscribe { .. } => {}
            ReplyPlan::Multi => {
                if &frame[..] == b"+OK\r\n" {
                    self.in_multi = true;
                    self.transaction.clear();
                }
            }
            ReplyPlan::Hello { protocol } => {
                if let (false, Some(protocol)) = (is_error, protocol) {
                    self.protocol = protocol;
                }
            }
            ReplyPlan::Reset => {
                self.protocol = 2;
                self.subscriptions = Subscriptions::default();
                self.end_transaction();
            }
            ReplyPlan::RestoreLogin => {
                if &frame[..] == b"+OK\r\n" {
                    return Ok(());
                }
                let text = String::from_utf8_lossy(frame.strip_suffix(b"\r\n").unwrap_or(&frame));
                return Err(UnexpectedReply::RestoreLoginFailed(text.into_owned()));
            }
            // Not queued: an error (delivered as is), or Redis ran it.
            ReplyPlan::Queued(inner) if !is_error => {
                return self.deliver(*inner, frame, is_error, out, failures);
            }
            ReplyPlan::Queued(_) => {}
            ReplyPlan::Open(plan) => {
                return open::reply(
                    &plan,
                    &frame,
                    &self.keyring.load(),
                    &self.limits,
                    out,
                    failures,
                )
                .map_err(|c| UnexpectedReply::Contradicts(c.0));
            }
            ReplyPlan::Exec => {
                let plans = std::mem::take(&mut self.transaction);
                self.in_multi = false;
                return self.exec(&plans, &frame, out, failures);
            }
            ReplyPlan::Discard => self.end_transaction(),
            ReplyPlan::Replace(text) => {
                self.end_transaction();
                resp::encode_error(out, text);
                return Ok(());
            }
        }
        out.extend_from_slice(&frame);
        Ok(())
    }

    fn end_transaction(&mut self) {
        self.in_multi = false;
        self.transaction.clear();
    }

    /// EXEC's array, each element opened with the plan of the command it
    /// answers (queued plans are data plans: passthrough or open).
    fn exec(
        &self,
        plans: &[ReplyPlan],
        frame: &[u8],
        out: &mut BytesMut,
        failures: &mut Vec<open::Failure>,
    ) -> Result<(), UnexpectedReply> {
        let opens = plans.iter().any(|p| matches!(p, ReplyPlan::Open(_)));
        if !opens {
            out.extend_from_slice(frame);
            return Ok(());
        }
        let Some((header, elements)) = resp::aggregate_elements(frame, &self.limits) else {
            // EXECABORT, or nil when a WATCHed key changed.
            if matches!(frame.first(), Some(b'-' | b'!' | b'_')) || frame == b"*-1\r\n" {
                out.extend_from_slice(frame);
                return Ok(());
            }
            return Err(UnexpectedReply::Contradicts("EXEC answered with no array"));
        };
        if elements.len() != plans.len() {
            return Err(UnexpectedReply::Contradicts(
                "EXEC answered for another number of commands than were queued",
            ));
        }
        out.extend_from_slice(header);
        for (plan, element) in plans.iter().zip(elements) {
            match plan {
                ReplyPlan::Open(plan) => {
                    open::reply(
                        plan,
                        element,
                        &self.keyring.load(),
                        &self.limits,
                        out,
                        failures,
                    )
                    .map_err(|c| UnexpectedReply::Contradicts(c.0))?;
                }
                _ => out.extend_from_slice(element),
            }
        }
        Ok(())
    }

    fn head_is_pubsub(&self) -> bool {
        matches!(
            self.head.as_ref().map(|h| &h.plan),
            Some(ReplyPlan::Subscribe { .. } | ReplyPlan::Unsubscribe { .. })
        )
    }

    fn head_takes(&self, kind: PubSubKind, subscribe: bool) -> bool {
        match self.head.as_ref().map(|h| &h.plan) {
            Some(ReplyPlan::Subscribe { kind: k, .. }) => subscribe && *k == kind,
            Some(ReplyPlan::Unsubscribe { kind: k, .. }) => !subscribe && *k == kind,
            _ => false,
        }
    }

    /// Queued plans waiting for EXEC.
    #[cfg(test)]
    fn queued_plans(&self) -> &[ReplyPlan] {
        &self.transaction
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;

    fn ring() -> Keyring {
        let keys = vec![(1, zeroize::Zeroizing::new([1u8; 32]))];
        Keyring::new(1, keys, crate::crypto::LegacyPlaintext::Reject).expect("ring")
    }

    /// Replies where every channel is plaintext (these tests are about framing).
    fn replies() -> Replies {
        let plaintext = crate::policy::rules::Rule {
            name: "*".into(),
            pattern: "*".into(),
            mode: crate::policy::rules::Mode::Plaintext,
            members: crate::policy::rules::Members::Random,
        };
        let rules = Arc::new(Rules::new(vec![plaintext]));
        Replies::new(CurrentKeyring::new(ring()), rules, Limits::default())
    }

    #[test]
    fn messages_on_encrypted_channels_are_opened_and_ones_that_fail_are_dropped() {
        let current = CurrentKeyring::new(ring());
        let ring = current.load_full();
        let mut replies = Replies::new(current, Arc::default(), Limits::default());
        await_plan(
            &mut replies,
            ReplyPlan::Subscribe {
                kind: PubSubKind::Pattern,
                channels: 1,
            },
        );
        feed(
            &mut replies,
            &[b"*3\r\n$10\r\npsubscribe\r\n$1\r\n*\r\n:1\r\n"],
        )
        .expect("confirmed");
        outcomes(&mut replies);
        let sealed = |channel: &[u8], payload: &[u8]| {
            let site = policy::message_site(&Rules::default(), channel).expect("encrypted");
            ring.seal(payload, site.binding()).expect("primary")
        };
        let message = |name: &str, channel: &[u8], payload: &[u8]| {
            let mut frame = BytesMut::new();
            let parts: Vec<&[u8]> = match name {
                "pmessage" => vec![b"pmessage", b"*", channel, payload],
                _ => vec![name.as_bytes(), channel, payload],
            };
            resp::encode_header(&mut frame, b'*', parts.len());
            for part in parts {
                resp::encode_bulk(&mut frame, part);
            }
            frame.freeze()
        };
        let mut out = BytesMut::new();
        let good = message("pmessage", b"news", &sealed(b"news", b"hello"));
        replies.on_reply(good, &mut out).expect("delivered");
        assert_eq!(
            &out[..],
            b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
        );
        assert!(outcomes(&mut replies).is_empty());
        // Sealed for another channel, and not sealed at all: both dropped.
        for bad in [
            message("pmessage", b"news", &sealed(b"sport", b"score")),
            message("pmessage", b"news", b"plaintext"),
        ] {
            let mut out = BytesMut::new();
            replies.on_reply(bad, &mut out).expect("dropped, not fatal");
            assert!(out.is_empty(), "{out:?}");
            assert_eq!(outcomes(&mut replies), [(Outcome::DecryptError, false, 1)]);
        }
        // Redis's own notifications are plaintext.
        let mut out = BytesMut::new();
        let notification = message("pmessage", b"__keyevent@0__:del", b"user:1");
        replies
            .on_reply(notification.clone(), &mut out)
            .expect("delivered");
        assert_eq!(&out[..], &notification[..]);
    }

    fn feed(replies: &mut Replies, frames: &[&'static [u8]]) -> Result<Vec<u8>, UnexpectedReply> {
        let mut out = BytesMut::new();
        for frame in frames {
            replies.on_reply(Bytes::from_static(frame), &mut out)?;
        }
        Ok(out.to_vec())
    }

    fn await_plan(replies: &mut Replies, plan: ReplyPlan) {
        let tally = Tally {
            command: CommandId::OTHER,
            received: Instant::now(),
        };
        assert_eq!(
            replies.accept(Entry::Await(plan, Some(tally)), &mut BytesMut::new()),
            Flow::Continue
        );
    }

    fn outcomes(replies: &mut Replies) -> Vec<(Outcome, bool, usize)> {
        let mut done = Vec::new();
        replies.take_done(&mut done);
        done.iter()
            .map(|d| (d.outcome, d.forwarded, d.failures.len()))
            .collect()
    }

    #[test]
    fn every_answered_entry_is_reported_once_with_its_outcome() {
        let mut replies = replies();
        await_plan(&mut replies, ReplyPlan::Passthrough);
        feed(&mut replies, &[b"+OK\r\n"]).expect("ok");
        await_plan(&mut replies, ReplyPlan::Passthrough);
        feed(&mut replies, &[b"-ERR no\r\n"]).expect("error");
        let site = crate::policy::ValueSite {
            key: Bytes::from_static(b"k"),
            kind: crate::policy::table::Kind::String,
            scope: crate::policy::SiteScope::Key,
            field: None,
            deterministic: false,
        };
        await_plan(
            &mut replies,
            ReplyPlan::Open(crate::policy::OpenPlan::One(site)),
        );
        feed(&mut replies, &[b"$5\r\nplain\r\n"]).expect("not encrypted");
        await_plan(
            &mut replies,
            ReplyPlan::Subscribe {
                kind: PubSubKind::Channel,
                channels: 2,
            },
        );
        feed(
            &mut replies,
            &[b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"],
        )
        .expect("1");
        // A subscribe counts once, when its last confirmation came.
        assert_eq!(
            outcomes(&mut replies),
            [
                (Outcome::Ok, true, 0),
                (Outcome::RedisError, true, 0),
                (Outcome::DecryptError, true, 1)
            ]
        );
        feed(
            &mut replies,
            &[b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"],
        )
        .expect("2");
        let refused = Entry::Answer {
            reply: Bytes::from_static(b"-ERR redcloak: no\r\n"),
            then_close: false,
            tally: Some((
                Tally {
                    command: CommandId::OTHER,
                    received: Instant::now(),
                },
                Outcome::Refused,
            )),
        };
        replies.accept(refused, &mut BytesMut::new());
        assert_eq!(
            outcomes(&mut replies),
            [(Outcome::Ok, true, 0), (Outcome::Refused, false, 0)]
        );
    }

    #[test]
    fn a_reply_with_no_request_is_refused() {
        let mut replies = replies();
        assert_eq!(
            feed(&mut replies, &[b"+OK\r\n"]),
            Err(UnexpectedReply::NoRequestWaiting)
        );
    }

    #[test]
    fn resp3_pushes_never_take_the_head() {
        let mut replies = replies();
        replies.protocol = 3;
        await_plan(&mut replies, ReplyPlan::Passthrough);
        let out = feed(
            &mut replies,
            &[
                b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
                b"$1\r\nv\r\n",
            ],
        )
        .expect("ok");
        assert!(out.ends_with(b"$1\r\nv\r\n"));
        assert!(replies.needs_entry());
    }

    #[test]
    fn subscribe_takes_one_confirmation_per_channel_then_messages_are_out_of_band() {
        let mut replies = replies();
        await_plan(
            &mut replies,
            ReplyPlan::Subscribe {
                kind: PubSubKind::Channel,
                channels: 2,
            },
        );
        feed(
            &mut replies,
            &[b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"],
        )
        .expect("first");
        assert!(!replies.needs_entry());
        // A message for `a` arrives before the second confirmation.
        feed(
            &mut replies,
            &[b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"],
        )
        .expect("message");
        assert!(!replies.needs_entry());
        feed(
            &mut replies,
            &[b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"],
        )
        .expect("second");
        assert!(replies.needs_entry());
        feed(
            &mut replies,
            &[b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\nyo\r\n"],
        )
        .expect("out of band");
        // UNSUBSCRIBE with no channel expects one confirmation per subscribed channel.
        await_plan(
            &mut replies,
            ReplyPlan::Unsubscribe {
                kind: PubSubKind::Channel,
                channels: None,
            },
        );
        feed(
            &mut replies,
            &[b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n"],
        )
        .expect("first");
        assert!(!replies.needs_entry());
        feed(
            &mut replies,
            &[b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n"],
        )
        .expect("second");
        assert!(replies.needs_entry());
        // Not subscribed any more: an array is an ordinary reply again.
        await_plan(&mut replies, ReplyPlan::Passthrough);
        feed(
            &mut replies,
            &[b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\nyo\r\n"],
        )
        .expect("lrange-like");
        assert!(replies.needs_entry());
    }

    #[test]
    fn an_error_completes_a_subscribe() {
        let mut replies = replies();
        await_plan(
            &mut replies,
            ReplyPlan::Subscribe {
                kind: PubSubKind::Channel,
                channels: 3,
            },
        );
        feed(&mut replies, &[b"-NOPERM no\r\n"]).expect("error");
        assert!(replies.needs_entry());
    }

    #[test]
    fn hello_3_switches_to_pushes_for_confirmations() {
        let mut replies = replies();
        await_plan(&mut replies, ReplyPlan::Hello { protocol: Some(3) });
        feed(&mut replies, &[b"%1\r\n+proto\r\n:3\r\n"]).expect("hello");
        await_plan(
            &mut replies,
            ReplyPlan::Subscribe {
                kind: PubSubKind::Pattern,
                channels: 1,
            },
        );
        feed(
            &mut replies,
            &[b">3\r\n$10\r\npsubscribe\r\n$2\r\nx*\r\n:1\r\n"],
        )
        .expect("push");
        assert!(replies.needs_entry());
    }

    #[test]
    fn queued_plans_are_kept_for_exec_in_order_and_cleared() {
        let mut replies = replies();
        await_plan(&mut replies, ReplyPlan::Multi);
        feed(&mut replies, &[b"+OK\r\n"]).expect("multi");
        await_plan(
            &mut replies,
            ReplyPlan::Queued(Box::new(ReplyPlan::Passthrough)),
        );
        feed(&mut replies, &[b"+QUEUED\r\n"]).expect("queued");
        await_plan(
            &mut replies,
            ReplyPlan::Queued(Box::new(ReplyPlan::Passthrough)),
        );
        feed(&mut replies, &[b"-ERR syntax\r\n"]).expect("refused by redis");
        assert_eq!(replies.queued_plans(), &[ReplyPlan::Passthrough]);
        await_plan(&mut replies, ReplyPlan::Exec);
        feed(&mut replies, &[b"*1\r\n+OK\r\n"]).expect("exec");
        assert!(replies.queued_plans().is_empty());
    }

    #[test]
    fn the_transaction_is_what_redis_says_it_is() {
        let ring = crate::crypto::Keyring::new(
            1,
            vec![(1, zeroize::Zeroizing::new([1u8; 32]))],
            crate::crypto::LegacyPlaintext::Reject,
        )
        .expect("ring");
        let site = crate::policy::ValueSite {
            key: Bytes::from_static(b"k"),
            kind: crate::policy::table::Kind::String,
            scope: crate::policy::SiteScope::Key,
            field: None,
            deterministic: false,
        };
        let sealed = ring.seal(b"secret", site.binding()).expect("primary");
        let mut reply = BytesMut::new();
        resp::encode_bulk(&mut reply, &sealed);
        let open = || ReplyPlan::Open(crate::policy::OpenPlan::One(site.clone()));
        // MULTI refused by Redis: a plan queued by the request side is
        // answered with the value itself, and opened.
        let mut replies =
            Replies::new(CurrentKeyring::new(ring), Arc::default(), Limits::default());
        await_plan(&mut replies, ReplyPlan::Multi);
        feed(
            &mut replies,
            &[b"-ERR wrong number of arguments for 'multi' command\r\n"],
        )
        .expect("refused");
        await_plan(&mut replies, ReplyPlan::Queued(Box::new(open())));
        let mut out = BytesMut::new();
        replies
            .on_reply(reply.clone().freeze(), &mut out)
            .expect("value");
        assert_eq!(&out[..], b"$6\r\nsecret\r\n");
        // MULTI confirmed: a plan the request side did not queue is kept
        // for EXEC when Redis queues it, and EXEC opens its element.
        await_plan(&mut replies, ReplyPlan::Multi);
        feed(&mut replies, &[b"+OK\r\n"]).expect("multi");
        await_plan(&mut replies, open());
        feed(&mut replies, &[b"+QUEUED\r\n"]).expect("queued");
        await_plan(&mut replies, ReplyPlan::Exec);
        let mut exec = BytesMut::from(&b"*1\r\n"[..]);
        exec.extend_from_slice(&reply);
        let mut out = BytesMut::new();
        replies.on_reply(exec.freeze(), &mut out).expect("exec");
        assert_eq!(&out[..], b"*1\r\n$6\r\nsecret\r\n");
    }

    #[test]
    fn a_reply_that_contradicts_its_request_is_out_of_step() {
        let site = crate::policy::ValueSite {
            key: Bytes::from_static(b"k"),
            kind: crate::policy::table::Kind::String,
            scope: crate::policy::SiteScope::Key,
            field: None,
            deterministic: false,
        };
        let one = || ReplyPlan::Open(crate::policy::OpenPlan::One(site.clone()));
        let each = || ReplyPlan::Open(crate::policy::OpenPlan::Each(vec![Some(site.clone())]));
        let pairs = || ReplyPlan::Open(crate::policy::OpenPlan::HashPairs(site.clone()));
        let cases: [(ReplyPlan, &'static [u8]); 7] = [
            (one(), b":1\r\n"),
            (one(), b"+OK\r\n"),
            (one(), b"*1\r\n$1\r\nx\r\n"),
            (each(), b"*2\r\n$-1\r\n$-1\r\n"),
            (each(), b"*1\r\n:7\r\n"),
            (pairs(), b"*1\r\n$1\r\nf\r\n"),
            (pairs(), b":3\r\n"),
        ];
        for (plan, frame) in cases {
            let mut replies = replies();
            await_plan(&mut replies, plan);
            let mut out = BytesMut::from(&b"+earlier\r\n"[..]);
            assert!(
                matches!(
                    replies.on_reply(Bytes::from_static(frame), &mut out),
                    Err(UnexpectedReply::Contradicts(_))
                ),
                "{:?}",
                String::from_utf8_lossy(frame)
            );
            assert_eq!(&out[..], b"+earlier\r\n", "nothing of it is delivered");
        }
        // Errors and nils fit any plan.
        for frame in [&b"-ERR x\r\n"[..], b"$-1\r\n"] {
            let mut replies = replies();
            await_plan(&mut replies, one());
            assert_eq!(feed(&mut replies, &[frame]).expect("fits"), frame);
        }
        // RESP3 frames on a RESP2 connection, pushes included.
        for frame in [
            &b">2\r\n$10\r\ninvalidate\r\n*0\r\n"[..],
            b"|1\r\n+a\r\n:1\r\n+OK\r\n",
            b"_\r\n",
        ] {
            let mut replies = replies();
            await_plan(&mut replies, ReplyPlan::Passthrough);
            assert_eq!(
                feed(&mut replies, &[frame]),
                Err(UnexpectedReply::Resp3OnResp2)
            );
        }
    }

    #[test]
    fn replace_swallows_the_reply() {
        let mut replies = replies();
        await_plan(&mut replies, ReplyPlan::Replace("EXECABORT x"));
        assert_eq!(
            feed(&mut replies, &[b"+OK\r\n"]).expect("replaced"),
            b"-EXECABORT x\r\n"
        );
    }

    #[test]
    fn restore_login_is_silent_on_ok_and_fatal_otherwise() {
        let mut replies = replies();
        await_plan(&mut replies, ReplyPlan::RestoreLogin);
        assert_eq!(feed(&mut replies, &[b"+OK\r\n"]).expect("ok"), b"");
        await_plan(&mut replies, ReplyPlan::RestoreLogin);
        assert!(matches!(
            feed(&mut replies, &[b"-WRONGPASS x\r\n"]),
            Err(UnexpectedReply::RestoreLoginFailed(_))
        ));
    }

    #[test]
    fn answers_close_when_asked() {
        let mut replies = replies();
        let mut out = BytesMut::new();
        let quit = Entry::Answer {
            reply: Bytes::from_static(b"+OK\r\n"),
            then_close: true,
            tally: None,
        };
        assert_eq!(replies.accept(quit, &mut out), Flow::Close);
        assert_eq!(&out[..], b"+OK\r\n");
    }
}
