//! Who a client is, and what failed logins cost it: the peer of a
//! connection (TCP or TLS address, or unix-socket user id), the lockout
//! check before a login or a new connection, and the counting of failures.

use super::SessionContext;
use crate::auth::lockout::{Lockout, PeerKey};
use crate::telemetry::events;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

/// Who is on the other end of a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    Tls(SocketAddr),
    /// A unix-socket peer, by user id when the kernel says.
    Unix(Option<u32>),
}

impl Peer {
    /// What failed logins are counted against.
    pub fn key(&self) -> PeerKey {
        match self {
            Peer::Tcp(address) | Peer::Tls(address) => PeerKey::ip(address.ip()),
            Peer::Unix(uid) => PeerKey::UnixUser(*uid),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(address) | Peer::Tls(address) => write!(f, "{address}"),
            Peer::Unix(_) => write!(f, "{}", self.key()),
        }
    }
}

impl SessionContext {
    /// The lockout `peer` is under, if any.
    pub fn locked_out(&self, peer: &Peer) -> Option<Lockout> {
        let lockouts = self.lockouts.as_ref()?;
        let lockouts = lockouts.lock().unwrap_or_else(|e| e.into_inner());
        lockouts.remaining(peer.key(), Instant::now())
    }

    /// Counts a failed login, and locks the peer out after too many.
    pub(super) fn login_failed(&self, peer: &Peer) {
        self.metrics.auth_failures.increment(1);
        events::client_auth_failure(peer);
        let Some(lockouts) = self.lockouts.as_ref() else {
            return;
        };
        let locked = lockouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record_failure(peer.key(), Instant::now());
        if let Some(locked) = locked {
            self.metrics.auth_lockouts.increment(1);
            // The peer as locked out (loopback, an address, a /64, a uid), or everyone.
            let locked_peer = locked
                .peer
                .map_or_else(|| "all peers".to_owned(), |p| p.to_string());
            events::client_auth_lockout(&locked_peer, locked.failures, locked.duration.as_secs());
        }
    }
}

/// The error a locked-out peer gets for a login attempt or a new connection.
pub fn lockout_error(peer: &Peer, lockout: Lockout) -> String {
    let from = match lockout.everyone {
        true => "all peers together".to_owned(),
        false => peer.key().to_string(),
    };
    format!(
        "ERR redcloak: too many failed AUTH attempts from {from}; logins are refused for {} more seconds",
        lockout.remaining.as_secs().max(1)
    )
}
