//! Brute-force protection for client AUTH: after `max_failures` failed
//! attempts from one peer within `window`, that peer's AUTH attempts (and new
//! connections) are refused for `duration`. Pure: the caller passes the time.
//!
//! A peer is its IP address (any port) or, on the unix socket, its user id.
//! A success does not clear earlier failures: on a shared address an
//! attacker could otherwise reset the count with every login of the app.
//! Attempts refused during a lockout are not failures: a client retrying
//! while locked out does not extend its own lockout.
//!
//! Memory is bounded: at most `MAX_PEERS` peers are tracked. When the table
//! is full, peers with nothing left to remember go first, then the peer
//! whose record is oldest.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Peers tracked at most.
pub const MAX_PEERS: usize = 10_000;

/// Who an attempt comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Ip(IpAddr),
    /// A unix-socket peer's user id (`None`: the kernel did not say).
    UnixUser(Option<u32>),
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Ip(ip) => write!(f, "{ip}"),
            PeerKey::UnixUser(Some(uid)) => write!(f, "unix socket, uid {uid}"),
            PeerKey::UnixUser(None) => write!(f, "unix socket, unknown uid"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub max_failures: u32,
    pub window: Duration,
    pub duration: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            max_failures: 5,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
        }
    }
}

/// A lockout that a failure just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedOut {
    pub failures: u32,
    pub duration: Duration,
}

#[derive(Debug, Default)]
struct PeerRecord {
    /// Times of the failures within the window, oldest first (at most `max_failures`).
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

impl PeerRecord {
    /// The last moment this record still matters.
    fn relevant_until(&self, window: Duration) -> Option<Instant> {
        let failures = self.failures.back().map(|t| *t + window);
        failures.max(self.locked_until)
    }
}

#[derive(Debug)]
pub struct Lockouts {
    policy: LockoutPolicy,
    peers: HashMap<PeerKey, PeerRecord>,
}

impl Lockouts {
    pub fn new(policy: LockoutPolicy) -> Self {
        Lockouts {
            policy,
            peers: HashMap::new(),
        }
    }

    /// How much longer `peer` is locked out, if it is.
    pub fn remaining(&self, peer: PeerKey, now: Instant) -> Option<Duration> {
        let until = self.peers.get(&peer)?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failed attempt; `Some` when it starts a lockout.
    pub fn record_failure(&mut self, peer: PeerKey, now: Instant) -> Option<LockedOut> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            self.make_room(now);
        }
        let policy = self.policy;
        let record = self.peers.entry(peer).or_default();
        if record.locked_until.is_some_and(|until| until > now) {
            return None;
        }
        record.locked_until = None;
        while record
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= policy.window)
        {
            record.failures.pop_front();
        }
        record.failures.push_back(now);
        if record.failures.len() < policy.max_failures as usize {
            return None;
        }
        record.failures.clear();
        record.locked_until = Some(now + policy.duration);
        Some(LockedOut {
            failures: policy.max_failures,
            duration: policy.duration,
        })
    }

    /// Forgets peers with nothing left to remember; if none, the oldest.
    fn make_room(&mut self, now: Instant) {
        let window = self.policy.window;
        self.peers
            .retain(|_, record| record.relevant_until(window).is_some_and(|t| t > now));
        if self.peers.len() < MAX_PEERS {
            return;
        }
        let oldest = self
            .peers
            .iter()
            .min_by_key(|(_, record)| record.relevant_until(window))
            .map(|(peer, _)| *peer);
        if let Some(peer) = oldest {
            self.peers.remove(&peer);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: LockoutPolicy = LockoutPolicy {
        max_failures: 3,
        window: Duration::from_secs(60),
        duration: Duration::from_secs(300),
    };

    fn peer(last: u8) -> PeerKey {
        PeerKey::Ip(IpAddr::from([10, 0, 0, last]))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_nth_failure_within_the_window_locks_the_peer_out_for_the_duration() {
        let mut lockouts = Lockouts::new(POLICY);
        let start = Instant::now();
        assert_eq!(lockouts.record_failure(peer(1), start), None);
        assert_eq!(lockouts.record_failure(peer(1), start + secs(10)), None);
        assert_eq!(lockouts.remaining(peer(1), start + secs(10)), None);
        assert_eq!(
            lockouts.record_failure(peer(1), start + secs(20)),
            Some(LockedOut {
                failures: 3,
                duration: secs(300)
            })
        );
        assert_eq!(
            lockouts.remaining(peer(1), start + secs(21)),
            Some(secs(299))
        );
        // Other peers are not affected.
        assert_eq!(lockouts.remaining(peer(2), start + secs(21)), None);
        // Attempts during the lockout do not extend it.
        assert_eq!(lockouts.record_failure(peer(1), start + secs(100)), None);
        assert_eq!(
            lockouts.remaining(peer(1), start + secs(319)),
            Some(secs(1))
        );
        assert_eq!(lockouts.remaining(peer(1), start + secs(320)), None);
        // After the lockout the count starts again from zero.
        assert_eq!(lockouts.record_failure(peer(1), start + secs(321)), None);
        assert_eq!(lockouts.record_failure(peer(1), start + secs(322)), None);
        assert!(
            lockouts
                .record_failure(peer(1), start + secs(323))
                .is_some()
        );
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut lockouts = Lockouts::new(POLICY);
        let start = Instant::now();
        lockouts.record_failure(peer(1), start);
        lockouts.record_failure(peer(1), start + secs(30));
        // The first failure has left the window: two within it, not three.
        assert_eq!(lockouts.record_failure(peer(1), start + secs(60)), None);
        assert!(lockouts.record_failure(peer(1), start + secs(61)).is_some());
    }

    #[test]
    fn unix_peers_are_told_apart_by_user_id() {
        let mut lockouts = Lockouts::new(POLICY);
        let now = Instant::now();
        for _ in 0..3 {
            lockouts.record_failure(PeerKey::UnixUser(Some(1000)), now);
        }
        assert!(
            lockouts
                .remaining(PeerKey::UnixUser(Some(1000)), now)
                .is_some()
        );
        assert_eq!(lockouts.remaining(PeerKey::UnixUser(Some(1001)), now), None);
        assert_eq!(
            PeerKey::UnixUser(Some(1000)).to_string(),
            "unix socket, uid 1000"
        );
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_locked_peers_over_stale_ones() {
        let mut lockouts = Lockouts::new(POLICY);
        let start = Instant::now();
        for _ in 0..3 {
            lockouts.record_failure(peer(1), start);
        }
        for n in 0..MAX_PEERS as u32 + 10 {
            let ip = IpAddr::from(n.to_be_bytes().map(|b| b.wrapping_add(100)));
            lockouts.record_failure(PeerKey::Ip(ip), start + secs(120));
            assert!(lockouts.tracked() <= MAX_PEERS);
        }
        assert!(lockouts.remaining(peer(1), start + secs(121)).is_some());
    }
}
