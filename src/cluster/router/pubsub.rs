//! Subscriptions in front of a cluster. Channels and patterns live on one
//! connection of their own (Redis Cluster sends every PUBLISH to every
//! node, so any node serves them); shard channels live on a connection to
//! the primary of their slot, one per node. These subscriber connections
//! are apart from the ones requests use, as Redis keeps a subscribed
//! connection for pub/sub.
//!
//! A (un)subscribe request is answered by its confirmations (one per
//! channel; for "all", one per subscription held, or one when none is),
//! delivered in the request's turn. A message is delivered after the reply
//! that came before it on its connection, so a client never sees a message
//! before the confirmation that subscribed it.
//!
//! When a subscriber connection is lost its subscriptions are taken again
//! elsewhere (any node for channels and patterns; the slot's primary,
//! waiting up to `cluster.failover_wait`, for shard channels), and when
//! Redis unsubscribes a shard channel itself (its slot moved) it is
//! subscribed again where the slot now lives. Neither reaches the client:
//! their confirmations are the router's own.
//!
//! Shard confirmations carry the count of shard channels held across all
//! nodes, as one Redis connection would count them.

use super::{MAX_REDIRECTS, MIN_REFRESH_GAP, RouteError, Router, local_error};
use crate::cluster::map::{Redirect, redirect};
use crate::cluster::slot::{common_slot, slot};
use crate::policy::table::PubSubKind;
use crate::resp;
use crate::session::pubsub::{PubSubEvent, Subscriptions, pubsub_event};
use crate::upstream::{ReplyReader, UpstreamStream};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// Which subscriber connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Holder {
    /// Channels and patterns.
    Classic,
    /// Shard channels whose slot this node serves.
    Shard((String, u16)),
}

/// What an owed request takes from its subscriber connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    /// Confirmations of this kind, subscribing or not.
    Confirmations(PubSubKind, bool),
    /// One reply (a PING in subscribed mode, a setup command's reply).
    Reply,
}

/// A request waiting for frames from a subscriber connection.
struct Owed {
    /// The client request they answer; `None`: the router's own
    /// (connection setup, subscribing again), never delivered.
    index: Option<u64>,
    takes: Takes,
    /// Frames still to come; `None` until it is first in line, for an
    /// unsubscribe from all (then one per subscription held, at least one).
    frames: Option<usize>,
    /// The request, sent again where a MOVED says.
    args: Vec<Bytes>,
    redirects: u8,
}

/// A connection holding subscriptions.
pub(super) struct Subscriber {
    stream: UpstreamStream,
    replies: ReplyReader,
    subscriptions: Subscriptions,
    owed: VecDeque<Owed>,
    /// The last client request it answered: a message it sends next is
    /// delivered after that request's reply.
    last_answered: Option<u64>,
}

impl Subscriber {
    /// Fixes the frame count of the owed request first in line, now that
    /// every earlier confirmation on this connection has been applied.
    fn count_front(&mut self) {
        let Some(front) = self.owed.front() else {
            return;
        };
        if front.frames.is_some() {
            return;
        }
        let held = match front.takes {
            Takes::Confirmations(kind, _) => self.subscriptions.of(kind).len(),
            Takes::Reply => 1,
        };
        if let Some(front) = self.owed.front_mut() {
            front.frames = Some(held.max(1));
        }
    }

    fn owe(&mut self, owed: Owed) {
        self.owed.push_back(owed);
        self.count_front();
    }
}

/// Every subscriber connection of one client.
#[derive(Default)]
pub(super) struct Subscribers {
    classic: Option<Subscriber>,
    shard: HashMap<(String, u16), Subscriber>,
}

impl Subscribers {
    /// Whether any subscriber connection is open.
    pub(super) fn open(&self) -> bool {
        self.classic.is_some() || !self.shard.is_empty()
    }

    /// Whether the client is subscribed, or asked to be: Redis then keeps a
    /// RESP2 connection to pub/sub commands.
    pub(super) fn subscribed(&mut self) -> bool {
        self.iter_mut().any(|(_, s)| {
            s.subscriptions.any()
                || s.owed
                    .iter()
                    .any(|o| matches!(o.takes, Takes::Confirmations(_, true)))
        })
    }

    /// Whether a subscriber connection owes request `index` a frame.
    pub(super) fn owe(&self, index: u64) -> bool {
        self.classic
            .iter()
            .chain(self.shard.values())
            .any(|s| s.owed.iter().any(|o| o.index == Some(index)))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (Holder, &mut Subscriber)> {
        self.classic.iter_mut().map(|s| (Holder::Classic, s)).chain(
            self.shard
                .iter_mut()
                .map(|(node, s)| (Holder::Shard(node.clone()), s)),
        )
    }

    fn get_mut(&mut self, holder: &Holder) -> Option<&mut Subscriber> {
        match holder {
            Holder::Classic => self.classic.as_mut(),
            Holder::Shard(node) => self.shard.get_mut(node),
        }
    }

    fn remove(&mut self, holder: &Holder) -> Option<Subscriber> {
        match holder {
            Holder::Classic => self.classic.take(),
            Holder::Shard(node) => self.shard.remove(node),
        }
    }

    /// Shard channels held across every node.
    fn shard_channels(&self) -> usize {
        self.shard
            .values()
            .map(|s| s.subscriptions.shard_channels.len())
            .sum()
    }

    /// Drops every subscriber connection (RESET): Redis ends their
    /// subscriptions with them.
    pub(super) fn clear(&mut self) {
        self.classic = None;
        self.shard.clear();
    }
}

/// A confirmation as Redis encodes it: `[kind, channel, count]`.
fn confirmation(protocol: u8, kind: &[u8], channel: Option<&[u8]>, count: usize) -> BytesMut {
    let mut out = BytesMut::new();
    out.extend_from_slice(if protocol == 3 { b">3\r\n" } else { b"*3\r\n" });
    resp::encode_bulk(&mut out, kind);
    match (channel, protocol) {
        (Some(channel), _) => resp::encode_bulk(&mut out, channel),
        (None, 3) => out.extend_from_slice(b"_\r\n"),
        (None, _) => out.extend_from_slice(b"$-1\r\n"),
    }
    out.extend_from_slice(format!(":{count}\r\n").as_bytes());
    out
}

/// What a (un)subscribe command is: its kind and whether it subscribes.
pub(super) fn pubsub_command(name: &[u8]) -> Option<(PubSubKind, bool)> {
    match &name.to_ascii_lowercase()[..] {
        b"subscribe" => Some((PubSubKind::Channel, true)),
        b"unsubscribe" => Some((PubSubKind::Channel, false)),
        b"psubscribe" => Some((PubSubKind::Pattern, true)),
        b"punsubscribe" => Some((PubSubKind::Pattern, false)),
        b"ssubscribe" => Some((PubSubKind::Shard, true)),
        b"sunsubscribe" => Some((PubSubKind::Shard, false)),
        _ => None,
    }
}

/// What one read from a connection gave.
pub(super) enum Event {
    Node(super::Link, std::io::Result<BytesMut>),
    Subscriber(Holder, std::io::Result<BytesMut>),
}

impl Router {
    /// A (P|S)SUBSCRIBE or (P|S)UNSUBSCRIBE from the client.
    pub(super) async fn send_pubsub(
        &mut self,
        args: Vec<Bytes>,
        kind: PubSubKind,
        subscribe: bool,
    ) -> Result<(), RouteError> {
        let name = args[0].to_ascii_lowercase();
        let channels = args[1..].to_vec();
        if subscribe && channels.is_empty() {
            self.refuse(&format!(
                "ERR wrong number of arguments for '{}' command",
                String::from_utf8_lossy(&name)
            ));
            return Ok(());
        }
        let takes = Takes::Confirmations(kind, subscribe);
        let holders: Vec<(Holder, Vec<Bytes>)> = match kind {
            PubSubKind::Channel | PubSubKind::Pattern => {
                if !subscribe && self.subscribers.classic.is_none() {
                    self.answer(confirmation(self.protocol, &name, None, 0));
                    return Ok(());
                }
                if self.subscribers.classic.is_none() {
                    let near = channels.first().map(|c| slot(c)).unwrap_or(0);
                    let subscriber = self.open_anywhere(near).await?;
                    self.subscribers.classic = Some(subscriber);
                }
                vec![(Holder::Classic, args.clone())]
            }
            PubSubKind::Shard if channels.is_empty() => {
                // From all: each node's shard channels, by name.
                let holders: Vec<(Holder, Vec<Bytes>)> = self
                    .subscribers
                    .shard
                    .iter()
                    .filter(|(_, s)| !s.subscriptions.shard_channels.is_empty())
                    .map(|(node, s)| {
                        let mut args = vec![args[0].clone()];
                        args.extend(s.subscriptions.shard_channels.iter().cloned());
                        (Holder::Shard(node.clone()), args)
                    })
                    .collect();
                if holders.is_empty() {
                    self.answer(confirmation(self.protocol, &name, None, 0));
                    return Ok(());
                }
                holders
            }
            PubSubKind::Shard => {
                let Ok(Some(slot)) = common_slot(channels.iter().map(|c| &c[..])) else {
                    self.refuse("CROSSSLOT Keys in request don't hash to the same slot");
                    return Ok(());
                };
                let node = self.shard_subscriber(slot).await?;
                vec![(Holder::Shard(node), args.clone())]
            }
        };
        let index = self.next_pending(args, None, false);
        self.partial.insert(index, (BytesMut::new(), holders.len()));
        for (holder, args) in holders {
            let frames = match (subscribe, args.len() - 1) {
                (false, 0) => None,
                (_, n) => Some(n),
            };
            let owed = Owed {
                index: Some(index),
                takes,
                frames,
                args,
                redirects: 0,
            };
            self.write_subscriber(&holder, owed).await?;
        }
        Ok(())
    }

    /// A command while a RESP2 client is subscribed: PING is answered on
    /// a subscribed connection (in its pub/sub form), any other command
    /// refused as Redis refuses it there.
    pub(super) async fn send_while_subscribed(
        &mut self,
        args: Vec<Bytes>,
    ) -> Result<(), RouteError> {
        if !args[0].eq_ignore_ascii_case(b"PING") {
            self.refuse(&format!(
                "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                String::from_utf8_lossy(&args[0].to_ascii_lowercase())
            ));
            return Ok(());
        }
        let holder = self
            .subscribers
            .iter_mut()
            .map(|(holder, _)| holder)
            .next()
            .expect("subscribed");
        let index = self.next_pending(args.clone(), None, false);
        self.partial.insert(index, (BytesMut::new(), 1));
        let owed = Owed {
            index: Some(index),
            takes: Takes::Reply,
            frames: Some(1),
            args,
            redirects: 0,
        };
        self.write_subscriber(&holder, owed).await
    }

    /// Writes an owed request to a subscriber connection.
    async fn write_subscriber(&mut self, holder: &Holder, owed: Owed) -> Result<(), RouteError> {
        let Some(subscriber) = self.subscribers.get_mut(holder) else {
            return Err(lost_subscriber(holder, "not open"));
        };
        let mut out = BytesMut::new();
        resp::encode_command(&mut out, &owed.args);
        subscriber.owe(owed);
        let written = async {
            subscriber.stream.write_all(&out).await?;
            subscriber.stream.flush().await
        };
        if let Err(err) = written.await {
            self.subscriber_lost(holder, err).await?;
        }
        Ok(())
    }

    /// A connection for channels and patterns: to the primary of `near`,
    /// or any node that answers (every node hears every PUBLISH).
    async fn open_anywhere(&mut self, near: u16) -> Result<Subscriber, RouteError> {
        let deadline = Instant::now() + self.topology.failover_wait;
        loop {
            let map = self.topology.map();
            let mut candidates: Vec<(String, u16)> = Vec::new();
            if let Some(primary) = map.primary(near) {
                candidates.push((primary.host.clone(), primary.port));
            }
            for node in map.nodes().filter(|n| n.online) {
                let at = (node.host.clone(), node.port);
                if !candidates.contains(&at) {
                    candidates.push(at);
                }
            }
            let mut last = None;
            for node in candidates {
                match self.open_subscriber(&node).await {
                    Ok(subscriber) => return Ok(subscriber),
                    Err(err) => last = Some(err),
                }
            }
            if Instant::now() >= deadline {
                return Err(last.unwrap_or(RouteError::Node {
                    node: String::new(),
                    why: "no node is known".into(),
                }));
            }
            tokio::time::sleep(MIN_REFRESH_GAP).await;
            self.topology.refresh().await;
        }
    }

    /// The shard subscriber at the primary of `slot`, opened if needed,
    /// waiting up to `cluster.failover_wait` for a primary to answer.
    async fn shard_subscriber(&mut self, slot: u16) -> Result<(String, u16), RouteError> {
        let deadline = Instant::now() + self.topology.failover_wait;
        loop {
            let primary = self
                .topology
                .map()
                .primary(slot)
                .map(|p| (p.host.clone(), p.port));
            let failed = match primary {
                Some(node) if self.subscribers.shard.contains_key(&node) => return Ok(node),
                Some(node) => match self.open_subscriber(&node).await {
                    Ok(subscriber) => {
                        self.subscribers.shard.insert(node.clone(), subscriber);
                        return Ok(node);
                    }
                    Err(err) => err,
                },
                None => RouteError::Node {
                    node: String::new(),
                    why: format!("no primary serves slot {slot}"),
                },
            };
            if Instant::now() >= deadline {
                return Err(failed);
            }
            tokio::time::sleep(MIN_REFRESH_GAP).await;
            self.topology.refresh().await;
        }
    }

    /// Connects to `node` for subscriptions, the client's connection setup
    /// (HELLO, CLIENT SETNAME) replayed on it.
    async fn open_subscriber(&mut self, node: &(String, u16)) -> Result<Subscriber, RouteError> {
        let failed = |why: String| RouteError::at(node, why);
        self.topology.prove(&node.0, node.1).await.map_err(failed)?;
        let upstream = self.topology.node(&node.0, node.1).map_err(failed)?;
        let mut stream = upstream
            .connect()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut owed = VecDeque::new();
        let mut out = BytesMut::new();
        for args in &self.setup {
            resp::encode_command(&mut out, args);
            owed.push_back(Owed {
                index: None,
                takes: Takes::Reply,
                frames: Some(1),
                args: Vec::new(),
                redirects: 0,
            });
        }
        if !out.is_empty() {
            stream
                .write_all(&out)
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        Ok(Subscriber {
            stream,
            replies: ReplyReader::default(),
            subscriptions: Subscriptions::default(),
            owed,
            last_answered: None,
        })
    }

    /// A frame from a subscriber connection: a message, a confirmation, or
    /// a reply.
    pub(super) async fn subscriber_frame(
        &mut self,
        holder: Holder,
        frame: BytesMut,
    ) -> Result<(), RouteError> {
        let frame = frame.freeze();
        let event = match resp::reply_kind(&frame) {
            resp::ReplyKind::Push | resp::ReplyKind::Array => pubsub_event(&frame),
            _ => None,
        };
        let protocol = self.protocol;
        let Some(subscriber) = self.subscribers.get_mut(&holder) else {
            return Ok(());
        };
        match event {
            Some(PubSubEvent::Message) => {
                self.messages.push_back((subscriber.last_answered, frame));
                Ok(())
            }
            Some(PubSubEvent::Confirmation {
                kind,
                subscribe,
                channel,
            }) => {
                subscriber
                    .subscriptions
                    .apply(kind, subscribe, channel.clone());
                let asked = matches!(
                    subscriber.owed.front(),
                    Some(o) if o.takes == Takes::Confirmations(kind, subscribe)
                );
                if asked {
                    let counted;
                    let frame: &[u8] = match kind {
                        PubSubKind::Shard => {
                            let name: &[u8] = if subscribe {
                                b"ssubscribe"
                            } else {
                                b"sunsubscribe"
                            };
                            let held = self.subscribers.shard_channels();
                            counted = confirmation(protocol, name, channel.as_deref(), held);
                            &counted
                        }
                        _ => &frame,
                    };
                    self.owed_frame(&holder, frame, false);
                    Ok(())
                } else if kind == PubSubKind::Shard && !subscribe {
                    // Redis let go of it (its slot moved): taken again where
                    // the slot lives now.
                    self.topology.refresh().await;
                    self.rehome_shard(channel.into_iter().collect()).await
                } else {
                    let after = subscriber.last_answered;
                    self.messages.push_back((after, frame));
                    Ok(())
                }
            }
            None => {
                let moved = redirect(&frame).filter(|(kind, ..)| *kind == Redirect::Moved);
                let front = subscriber.owed.front();
                // A shard channel's (un)subscribe, the client's or the
                // router's own, follows MOVED (the map may be stale).
                let resend = front.is_some_and(|o| {
                    o.redirects < MAX_REDIRECTS
                        && matches!(o.takes, Takes::Confirmations(PubSubKind::Shard, _))
                });
                match moved {
                    Some((_, slot, host, port)) if resend => {
                        let mut owed = subscriber.owed.pop_front().expect("front");
                        subscriber.count_front();
                        owed.redirects += 1;
                        owed.frames = Some(owed.args.len() - 1);
                        self.topology.redirected("moved");
                        self.topology.moved(slot, &host, port);
                        let node = self.shard_subscriber(slot).await?;
                        self.write_subscriber(&Holder::Shard(node), owed).await
                    }
                    _ => {
                        self.owed_frame(&holder, &frame, true);
                        Ok(())
                    }
                }
            }
        }
    }

    /// One frame for the owed request first in line on `holder`; `ends`:
    /// it is the request's whole answer (an error, a reply).
    fn owed_frame(&mut self, holder: &Holder, frame: &[u8], ends: bool) {
        let Some(subscriber) = self.subscribers.get_mut(holder) else {
            return;
        };
        let Some(owed) = subscriber.owed.front_mut() else {
            tracing::warn!("a cluster subscriber connection sent a reply nothing waited for");
            return;
        };
        let left = match ends {
            true => 0,
            false => owed.frames.unwrap_or(1).saturating_sub(1),
        };
        owed.frames = Some(left);
        let index = owed.index;
        if let Some(index) = index {
            subscriber.last_answered = Some(index);
        }
        if left == 0 {
            subscriber.owed.pop_front();
            subscriber.count_front();
        }
        match index {
            Some(index) => self.part(index, frame, left == 0),
            None if frame.starts_with(b"-") => {
                tracing::warn!("subscribing again on a cluster node failed");
            }
            None => {}
        }
    }

    /// Adds `frame` to the answer of request `index`; `last`: that part of
    /// it is complete.
    fn part(&mut self, index: u64, frame: &[u8], last: bool) {
        let Some((reply, parts)) = self.partial.get_mut(&index) else {
            return;
        };
        reply.extend_from_slice(frame);
        if last {
            *parts = parts.saturating_sub(1);
            if *parts == 0
                && let Some((reply, _)) = self.partial.remove(&index)
            {
                self.done.insert(index, reply);
            }
        }
    }

    /// A subscriber connection is gone: what it owed is answered with an
    /// error, and what it held is subscribed again elsewhere.
    pub(super) async fn subscriber_lost(
        &mut self,
        holder: &Holder,
        err: std::io::Error,
    ) -> Result<(), RouteError> {
        let Some(subscriber) = self.subscribers.remove(holder) else {
            return Ok(());
        };
        tracing::warn!(error = %err, "cluster subscriber connection lost; subscribing again elsewhere");
        let error = local_error(
            "ERR redcloak: the cluster node holding the subscriptions was lost before it answered",
        );
        for owed in subscriber.owed {
            if let Some(index) = owed.index {
                self.part(index, &error, true);
            }
        }
        let topology = self.topology.clone();
        tokio::spawn(async move { topology.refresh().await });
        let held = subscriber.subscriptions;
        match holder {
            Holder::Classic => self.resubscribe_classic(held).await,
            Holder::Shard(_) => {
                self.rehome_shard(held.shard_channels.into_iter().collect())
                    .await
            }
        }
    }

    /// Channels and patterns subscribed again on a new connection.
    async fn resubscribe_classic(&mut self, held: Subscriptions) -> Result<(), RouteError> {
        if !held.any() {
            return Ok(());
        }
        let near = held.channels.iter().next().map(|c| slot(c)).unwrap_or(0);
        let subscriber = self.open_anywhere(near).await?;
        self.subscribers.classic = Some(subscriber);
        for (kind, command, set) in [
            (PubSubKind::Channel, "SUBSCRIBE", held.channels),
            (PubSubKind::Pattern, "PSUBSCRIBE", held.patterns),
        ] {
            if set.is_empty() {
                continue;
            }
            let mut args = vec![Bytes::from(command)];
            args.extend(set);
            let owed = Owed {
                index: None,
                takes: Takes::Confirmations(kind, true),
                frames: Some(args.len() - 1),
                args,
                redirects: 0,
            };
            Box::pin(self.write_subscriber(&Holder::Classic, owed)).await?;
        }
        Ok(())
    }

    /// Shard channels subscribed again at the primaries of their slots.
    async fn rehome_shard(&mut self, channels: Vec<Bytes>) -> Result<(), RouteError> {
        let mut by_slot: HashMap<u16, Vec<Bytes>> = HashMap::new();
        for channel in channels {
            by_slot.entry(slot(&channel)).or_default().push(channel);
        }
        for (slot, channels) in by_slot {
            let node = self.shard_subscriber(slot).await?;
            let mut args = vec![Bytes::from_static(b"SSUBSCRIBE")];
            args.extend(channels);
            let owed = Owed {
                index: None,
                takes: Takes::Confirmations(PubSubKind::Shard, true),
                frames: Some(args.len() - 1),
                args,
                redirects: 0,
            };
            Box::pin(self.write_subscriber(&Holder::Shard(node), owed)).await?;
        }
        Ok(())
    }

    /// Messages that may go to the client now: each after the reply it
    /// followed.
    pub fn deliverable_messages(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some((after, _)) = self.messages.front() {
            let ready = match (after, self.delivered) {
                (None, _) => true,
                (Some(after), Some(delivered)) => *after <= delivered,
                (Some(_), None) => false,
            };
            if !ready {
                break;
            }
            out.extend(self.messages.pop_front().map(|(_, m)| m));
        }
        out
    }

    /// Reads the next frame from the node that owes `node` (if any) or
    /// from any subscriber connection.
    pub(super) async fn read_event(&mut self, node: Option<super::Link>) -> Event {
        let limits = self.limits.clone();
        let limits = &limits;
        let mut reads: Vec<std::pin::Pin<Box<dyn Future<Output = Event> + Send + '_>>> = Vec::new();
        if let Some(target) = node
            && let Some(conn) = self.nodes.get_mut(&target)
        {
            reads.push(Box::pin(async move {
                let read = conn.read(limits).await;
                Event::Node(target, read)
            }));
        }
        for (holder, subscriber) in self.subscribers.iter_mut() {
            reads.push(Box::pin(async move {
                let read = subscriber
                    .replies
                    .next(&mut subscriber.stream, limits)
                    .await;
                Event::Subscriber(holder, read)
            }));
        }
        if reads.is_empty() {
            return std::future::pending().await;
        }
        futures_util::future::select_all(reads).await.0
    }
}

fn lost_subscriber(holder: &Holder, why: &str) -> RouteError {
    match holder {
        Holder::Classic => RouteError::Node {
            node: "subscriber".into(),
            why: why.into(),
        },
        Holder::Shard(node) => RouteError::at(node, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_are_encoded_as_redis_encodes_them() {
        assert_eq!(
            &confirmation(2, b"sunsubscribe", None, 0)[..],
            b"*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n"
        );
        assert_eq!(
            &confirmation(3, b"ssubscribe", Some(b"c"), 2)[..],
            b">3\r\n$10\r\nssubscribe\r\n$1\r\nc\r\n:2\r\n"
        );
        assert_eq!(
            pubsub_command(b"PSUBSCRIBE"),
            Some((PubSubKind::Pattern, true))
        );
        assert_eq!(pubsub_command(b"publish"), None);
    }
}
