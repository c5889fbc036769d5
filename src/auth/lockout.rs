//! Brute-force protection for client AUTH: after `max_failures` failed
//! attempts from one peer within `window`, that peer's AUTH attempts (and new
//! connections) are refused for `duration`; after `global_max_failures` from
//! all peers together, everyone's are. Pure: the caller passes the time.
//!
//! A peer is what an attacker cannot cheaply change: all of loopback
//! (127.0.0.0/8 and ::1, any of 16M source addresses) is one peer, an IPv6
//! address counts by its /64, another IPv4 address by itself, and a
//! unix-socket client by its user id. A success does not clear earlier
//! failures: on a shared address an attacker could otherwise reset the count
//! with every login of the app. Attempts refused during a lockout are not
//! failures: a client retrying while locked out does not extend its own
//! lockout.
//!
//! Memory is bounded: at most `MAX_PEERS` peers are tracked. A record that
//! still matters (failures in the window, or a lockout) is never evicted, so
//! flooding the table cannot wipe a locked peer's record: when the table is
//! full of live records, a new peer's failures count against one shared
//! record for all untracked peers, which locks out like any other.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Peers tracked at most.
pub const MAX_PEERS: usize = 10_000;

/// Who an attempt comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// Any loopback address: one local host, whatever source it picks.
    Loopback,
    /// An IPv4 address.
    Ipv4(std::net::Ipv4Addr),
    /// The /64 of an IPv6 address (its first 8 bytes).
    Ipv6Net([u8; 8]),
    /// A unix-socket peer's user id (`None`: the kernel did not say).
    UnixUser(Option<u32>),
    /// Every peer the full table could not track.
    Untracked,
}

impl PeerKey {
    pub fn ip(ip: IpAddr) -> PeerKey {
        let ip = ip.to_canonical();
        if ip.is_loopback() {
            return PeerKey::Loopback;
        }
        match ip {
            IpAddr::V4(v4) => PeerKey::Ipv4(v4),
            IpAddr::V6(v6) => {
                let mut net = [0u8; 8];
                net.copy_from_slice(&v6.octets()[..8]);
                PeerKey::Ipv6Net(net)
            }
        }
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Loopback => write!(f, "loopback"),
            PeerKey::Ipv4(ip) => write!(f, "{ip}"),
            PeerKey::Ipv6Net(net) => {
                let mut octets = [0u8; 16];
                octets[..8].copy_from_slice(net);
                write!(f, "{}/64", std::net::Ipv6Addr::from(octets))
            }
            PeerKey::UnixUser(Some(uid)) => write!(f, "unix socket, uid {uid}"),
            PeerKey::UnixUser(None) => write!(f, "unix socket, unknown uid"),
            PeerKey::Untracked => write!(f, "untracked peers"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub max_failures: u32,
    /// Failures from all peers together within `window` that lock out everyone.
    pub global_max_failures: u32,
    pub window: Duration,
    pub duration: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            max_failures: 5,
            global_max_failures: 100,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
        }
    }
}

/// A lockout that a failure just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedOut {
    /// Who is locked out: the peer, or `None` for everyone.
    pub peer: Option<PeerKey>,
    pub failures: u32,
    pub duration: Duration,
}

/// A lockout in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    pub remaining: Duration,
    /// Every peer is locked out (the global budget ran out), not just this one.
    pub everyone: bool,
}

#[derive(Debug, Default)]
struct Record {
    /// Times of the failures within the window, oldest first (at most the limit).
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

impl Record {
    /// The last moment this record still matters.
    fn relevant_until(&self, window: Duration) -> Option<Instant> {
        let failures = self.failures.back().map(|t| *t + window);
        failures.max(self.locked_until)
    }

    fn remaining(&self, now: Instant) -> Option<Duration> {
        let until = self.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failure; `true` when it reaches `limit` and starts a lockout.
    fn fail(&mut self, now: Instant, limit: u32, window: Duration, duration: Duration) -> bool {
        if self.remaining(now).is_some() {
            return false;
        }
        self.locked_until = None;
        while self
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(now);
        if self.failures.len() < limit as usize {
            return false;
        }
        self.failures.clear();
        self.locked_until = Some(now + duration);
        true
    }
}

#[derive(Debug)]
pub struct Lockouts {
    policy: LockoutPolicy,
    peers: HashMap<PeerKey, Record>,
    /// Peers the full table could not track, together.
    untracked: Record,
    everyone: Record,
}

impl Lockouts {
    pub fn new(policy: LockoutPolicy) -> Self {
        Lockouts {
            policy,
            peers: HashMap::new(),
            untracked: Record::default(),
            everyone: Record::default(),
        }
    }

    /// The lockout `peer` is under, if any (its own, or everyone's).
    pub fn remaining(&self, peer: PeerKey, now: Instant) -> Option<Lockout> {
        let own = match self.tracked_as(peer) {
            PeerKey::Untracked => Some(&self.untracked),
            key => self.peers.get(&key),
        }
        .and_then(|r| r.remaining(now));
        let everyone = self.everyone.remaining(now);
        match (own, everyone) {
            (own, Some(all)) if own.is_none_or(|own| all >= own) => Some(Lockout {
                remaining: all,
                everyone: true,
            }),
            (Some(own), _) => Some(Lockout {
                remaining: own,
                everyone: false,
            }),
            _ => None,
        }
    }

    /// Records a failed attempt; `Some` when it starts a lockout.
    pub fn record_failure(&mut self, peer: PeerKey, now: Instant) -> Option<LockedOut> {
        let policy = self.policy;
        if self.remaining(peer, now).is_some() {
            return None;
        }
        let everyone_locked = self.everyone.fail(
            now,
            policy.global_max_failures,
            policy.window,
            policy.duration,
        );
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            self.forget_stale(now);
        }
        let key = self.tracked_as(peer);
        let record = match key {
            PeerKey::Untracked => &mut self.untracked,
            key => self.peers.entry(key).or_default(),
        };
        let peer_locked = record.fail(now, policy.max_failures, policy.window, policy.duration);
        if everyone_locked {
            return Some(LockedOut {
                peer: None,
                failures: policy.global_max_failures,
                duration: policy.duration,
            });
        }
        peer_locked.then_some(LockedOut {
            peer: Some(key),
            failures: policy.max_failures,
            duration: policy.duration,
        })
    }

    /// The record a peer's failures go to: its own, or when the table is
    /// full of records that still matter, the one for untracked peers.
    fn tracked_as(&self, peer: PeerKey) -> PeerKey {
        if self.peers.contains_key(&peer) || self.peers.len() < MAX_PEERS {
            peer
        } else {
            PeerKey::Untracked
        }
    }

    /// Forgets peers with nothing left to remember; never a live record.
    fn forget_stale(&mut self, now: Instant) {
        let window = self.policy.window;
        self.peers
            .retain(|_, record| record.relevant_until(window).is_some_and(|t| t > now));
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
        global_max_failures: 1_000_000,
        window: Duration::from_secs(60),
        duration: Duration::from_secs(300),
    };

    fn peer(last: u8) -> PeerKey {
        PeerKey::ip(IpAddr::from([10, 0, 0, last]))
    }

    fn remaining(lockouts: &Lockouts, peer: PeerKey, now: Instant) -> Option<Duration> {
        lockouts.remaining(peer, now).map(|l| l.remaining)
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
        assert_eq!(remaining(&lockouts, peer(1), start + secs(10)), None);
        assert_eq!(
            lockouts.record_failure(peer(1), start + secs(20)),
            Some(LockedOut {
                peer: Some(peer(1)),
                failures: 3,
                duration: secs(300)
            })
        );
        assert_eq!(
            remaining(&lockouts, peer(1), start + secs(21)),
            Some(secs(299))
        );
        // Other peers are not affected.
        assert_eq!(remaining(&lockouts, peer(2), start + secs(21)), None);
        // Attempts during the lockout do not extend it.
        assert_eq!(lockouts.record_failure(peer(1), start + secs(100)), None);
        assert_eq!(
            remaining(&lockouts, peer(1), start + secs(319)),
            Some(secs(1))
        );
        assert_eq!(remaining(&lockouts, peer(1), start + secs(320)), None);
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
        assert_eq!(
            remaining(&lockouts, PeerKey::UnixUser(Some(1001)), now),
            None
        );
        assert_eq!(
            PeerKey::UnixUser(Some(1000)).to_string(),
            "unix socket, uid 1000"
        );
    }

    #[test]
    fn the_table_stays_bounded_and_a_flood_of_peers_evicts_no_live_record() {
        let mut lockouts = Lockouts::new(POLICY);
        let start = Instant::now();
        for _ in 0..3 {
            lockouts.record_failure(peer(1), start);
        }
        // A victim with two failures: flooding must not reset its count.
        lockouts.record_failure(peer(2), start);
        lockouts.record_failure(peer(2), start);
        for n in 0..MAX_PEERS as u32 + 10 {
            let ip = IpAddr::from(n.to_be_bytes().map(|b| b.wrapping_add(100)));
            lockouts.record_failure(PeerKey::ip(ip), start + secs(1));
            assert!(lockouts.tracked() <= MAX_PEERS);
        }
        assert!(remaining(&lockouts, peer(1), start + secs(2)).is_some());
        assert!(lockouts.record_failure(peer(2), start + secs(2)).is_some());
        // New peers beyond the table share one record, which locks out too.
        let newcomer = PeerKey::ip(IpAddr::from([192, 0, 2, 1]));
        assert!(remaining(&lockouts, newcomer, start + secs(2)).is_some());
        // Once the records are stale, new peers are tracked again.
        let later = start + secs(1000);
        assert_eq!(lockouts.record_failure(newcomer, later), None);
        assert_eq!(remaining(&lockouts, newcomer, later), None);
    }

    #[test]
    fn all_of_loopback_is_one_peer_and_ipv6_counts_by_its_64() {
        let mut lockouts = Lockouts::new(POLICY);
        let now = Instant::now();
        for last in [1u8, 2, 3] {
            lockouts.record_failure(PeerKey::ip(IpAddr::from([127, 9, 9, last])), now);
        }
        for loopback in ["127.0.0.1", "127.255.0.7", "::1", "::ffff:127.0.0.2"] {
            let ip: IpAddr = loopback.parse().expect("ip");
            assert!(
                remaining(&lockouts, PeerKey::ip(ip), now).is_some(),
                "{loopback}"
            );
        }
        for host in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2::3"] {
            lockouts.record_failure(PeerKey::ip(host.parse().expect("ip")), now);
        }
        let same_net: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let other_net: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(remaining(&lockouts, PeerKey::ip(same_net), now).is_some());
        assert_eq!(remaining(&lockouts, PeerKey::ip(other_net), now), None);
        assert_eq!(PeerKey::ip(same_net).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn the_global_budget_locks_out_everyone() {
        let mut lockouts = Lockouts::new(LockoutPolicy {
            global_max_failures: 10,
            ..POLICY
        });
        let now = Instant::now();
        let mut started = None;
        for n in 0..10u8 {
            // Two failures from each of five addresses: none reaches its own limit.
            started = lockouts.record_failure(peer(n / 2), now);
        }
        assert_eq!(
            started,
            Some(LockedOut {
                peer: None,
                failures: 10,
                duration: secs(300)
            })
        );
        let lock = lockouts
            .remaining(peer(99), now + secs(1))
            .expect("everyone");
        assert!(lock.everyone);
        assert_eq!(lock.remaining, secs(299));
    }
}
