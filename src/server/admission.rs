//! Who gets a client slot. At most `listen.max_connections` connections,
//! and at most `listen.max_connections_per_peer` from one peer (an IP
//! address, or a unix-socket user id). When every slot is taken, the
//! connection that has waited longest without saying anything (TLS
//! handshake not done, or no request yet) gives its slot up to the
//! newcomer: a flood of silent connections cannot lock real clients out,
//! since a real client speaks within milliseconds and stops being a
//! candidate. A connection that has spoken is never evicted.

use crate::session::Peer;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long a newcomer waits for the slot of the connection it evicted.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Whose connections are counted together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerSlot {
    Ip(IpAddr),
    Unix(Option<u32>),
}

impl PeerSlot {
    fn of(peer: &Peer) -> PeerSlot {
        match peer {
            Peer::Tcp(address) | Peer::Tls(address) => PeerSlot::Ip(address.ip()),
            Peer::Unix(uid) => PeerSlot::Unix(*uid),
        }
    }
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `listen.max_connections`, and no silent connection to evict.
    Full,
    /// `listen.max_connections_per_peer`.
    PeerFull,
}

pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Applies only below `capacity` (at or above it, the total limit rules).
    per_peer: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    peers: HashMap<PeerSlot, usize>,
    /// Connections that have not spoken yet, oldest first.
    silent: VecDeque<(u64, CancellationToken)>,
    next_id: u64,
}

impl Admission {
    pub fn new(max_connections: usize, per_peer: usize) -> Arc<Admission> {
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(max_connections)),
            capacity: max_connections,
            per_peer,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection from `peer`, evicting the oldest silent
    /// connection when every slot is taken.
    pub async fn admit(self: &Arc<Self>, peer: &Peer) -> Result<Ticket, Refused> {
        let slot = PeerSlot::of(peer);
        {
            let mut state = self.lock();
            let count = state.peers.entry(slot).or_default();
            if self.per_peer < self.capacity && *count >= self.per_peer {
                return Err(Refused::PeerFull);
            }
            *count += 1;
        }
        // From here the peer count is undone by the ticket, or by hand.
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => self.evict_for_slot().await,
        };
        let Some(permit) = permit else {
            self.release_peer(slot);
            return Err(Refused::Full);
        };
        let evicted = CancellationToken::new();
        let id = {
            let mut state = self.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.silent.push_back((id, evicted.clone()));
            id
        };
        Ok(Ticket {
            admission: self.clone(),
            slot,
            _permit: permit,
            silent: Some(id),
            evicted,
        })
    }

    async fn evict_for_slot(&self) -> Option<OwnedSemaphorePermit> {
        let (_, victim) = self.lock().silent.pop_front()?;
        victim.cancel();
        tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    fn release_peer(&self, slot: PeerSlot) {
        let mut state = self.lock();
        if let Some(count) = state.peers.get_mut(&slot) {
            *count -= 1;
            if *count == 0 {
                state.peers.remove(&slot);
            }
        }
    }
}

/// A connection's slot, held while it lives.
pub struct Ticket {
    admission: Arc<Admission>,
    slot: PeerSlot,
    _permit: OwnedSemaphorePermit,
    /// Its place among the silent connections, until it speaks.
    silent: Option<u64>,
    evicted: CancellationToken,
}

impl Ticket {
    /// The connection said something: it can no longer be evicted.
    pub fn spoke(&mut self) {
        if let Some(id) = self.silent.take() {
            self.admission
                .lock()
                .silent
                .retain(|(other, _)| *other != id);
        }
    }

    /// Cancelled when a newcomer took this silent connection's slot.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.spoke();
        self.admission.release_peer(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(last: u8) -> Peer {
        Peer::Tcp(std::net::SocketAddr::from(([10, 0, 0, last], 1000)))
    }

    #[tokio::test]
    async fn a_full_table_evicts_the_oldest_silent_connection_never_one_that_spoke() {
        let admission = Admission::new(2, 10);
        let mut spoke = admission.admit(&peer(1)).await.expect("slot");
        spoke.spoke();
        let silent = admission.admit(&peer(2)).await.expect("slot");
        let evicted = silent.evicted().clone();
        // The newcomer waits for the evicted connection to let go.
        let newcomer = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(&peer(3)).await })
        };
        evicted.cancelled().await;
        drop(silent);
        let mut newcomer = newcomer.await.expect("join").expect("the evicted slot");
        // Both remaining connections spoke: nothing to evict, the table is full.
        newcomer.spoke();
        assert_eq!(admission.admit(&peer(4)).await.err(), Some(Refused::Full));
        assert!(!spoke.evicted().is_cancelled());
    }

    #[tokio::test]
    async fn one_peer_holds_at_most_its_share() {
        let admission = Admission::new(100, 2);
        let first = admission.admit(&peer(1)).await.expect("slot");
        let _second = admission.admit(&peer(1)).await.expect("slot");
        assert_eq!(
            admission.admit(&peer(1)).await.err(),
            Some(Refused::PeerFull)
        );
        assert!(admission.admit(&peer(2)).await.is_ok());
        drop(first);
        assert!(admission.admit(&peer(1)).await.is_ok());
    }
}
