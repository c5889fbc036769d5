//! What a pub/sub frame says (a message, or the confirmation of a
//! (un)subscribe), and the subscriptions a connection holds: read the same
//! way by a session and by the cluster router's subscriber connections.

use crate::policy::table::PubSubKind;
use crate::resp;
use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;
use std::collections::HashSet;

/// Channels, patterns and shard channels this connection is subscribed to.
#[derive(Debug, Default)]
pub struct Subscriptions {
    pub channels: HashSet<Bytes>,
    pub patterns: HashSet<Bytes>,
    pub shard_channels: HashSet<Bytes>,
}

impl Subscriptions {
    pub fn of(&mut self, kind: PubSubKind) -> &mut HashSet<Bytes> {
        match kind {
            PubSubKind::Channel => &mut self.channels,
            PubSubKind::Pattern => &mut self.patterns,
            PubSubKind::Shard => &mut self.shard_channels,
        }
    }

    pub fn any(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard_channels.is_empty())
    }

    pub fn apply(&mut self, kind: PubSubKind, subscribe: bool, channel: Option<Bytes>) {
        let Some(channel) = channel else { return };
        let set = self.of(kind);
        if subscribe {
            // A copy, so the name does not pin the whole read buffer it came in.
            set.insert(Bytes::copy_from_slice(&channel));
        } else {
            set.remove(&channel);
        }
    }
}

#[derive(Debug)]
pub enum PubSubEvent {
    Confirmation {
        kind: PubSubKind,
        subscribe: bool,
        channel: Option<Bytes>,
    },
    Message,
}

/// Reads a pub/sub array or push: `[kind, channel, ...]`.
pub fn pubsub_event(frame: &Bytes) -> Option<PubSubEvent> {
    let (BytesFrame::Push { data, .. } | BytesFrame::Array { data, .. }) =
        resp::decode_reply(frame)?
    else {
        return None;
    };
    let name = match data.first()? {
        BytesFrame::BlobString { data, .. } | BytesFrame::SimpleString { data, .. } => {
            data.to_ascii_lowercase()
        }
        _ => return None,
    };
    let channel = match data.get(1) {
        Some(BytesFrame::BlobString { data, .. } | BytesFrame::SimpleString { data, .. }) => {
            Some(data.clone())
        }
        _ => None,
    };
    let (kind, subscribe) = match name.as_slice() {
        b"message" | b"pmessage" | b"smessage" => return Some(PubSubEvent::Message),
        b"subscribe" => (PubSubKind::Channel, true),
        b"unsubscribe" => (PubSubKind::Channel, false),
        b"psubscribe" => (PubSubKind::Pattern, true),
        b"punsubscribe" => (PubSubKind::Pattern, false),
        b"ssubscribe" => (PubSubKind::Shard, true),
        b"sunsubscribe" => (PubSubKind::Shard, false),
        _ => return None,
    };
    Some(PubSubEvent::Confirmation {
        kind,
        subscribe,
        channel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resp2_confirmation_naming_no_channel_is_read() {
        let frame = Bytes::from_static(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");
        assert!(matches!(
            pubsub_event(&frame),
            Some(PubSubEvent::Confirmation {
                kind: PubSubKind::Channel,
                subscribe: false,
                channel: None
            })
        ));
    }
}
