//! A lane's routing book, pure and socket-free: which client each reply
//! belongs to, in the order the requests were written. The lane's writer
//! and reader (`super`) keep this module's invariant: a reply reaches only
//! the client that sent the request, in order, or that client gets an error.
//!
//! Redis answers one connection's requests in order, so the requests in
//! flight form a FIFO. Each entry names its client by id and generation (a
//! client that comes back to a lane after a pinned connection gets a new
//! generation, so nothing meant for its past reaches it) and by sequence
//! number. A client that leaves abandons its entries: their replies are still
//! read, then dropped. Any sign that the connection is out of step (a reply
//! with nothing in flight, a push, which a lane's clients never ask for, or
//! a reply the session finds contradicting its request) poisons the lane:
//! every live entry gets an error, and the lane takes nothing more. A lane
//! is never resynchronised.

use std::collections::VecDeque;

/// A client as a lane knows it: its id, and which of its stays on lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub id: u64,
    pub generation: u32,
}

/// Where a reply frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To this client, answering its request `sequence`.
    Deliver { client: ClientKey, sequence: u64 },
    /// Nowhere: the client that asked has left.
    Discard,
    /// The lane is out of step (or was already): see [`Book::poison`].
    Poisoned,
}

/// Why a lane was poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poison {
    /// A reply arrived with no request in flight.
    NothingInFlight,
    /// A push frame (pub/sub, tracking), which no lane client asked for.
    Push,
    /// Redis's bytes did not parse.
    ParseError,
    /// The session found the reply contradicting its request.
    Contradiction,
    /// A value failed to open under the key its request named: bound to
    /// another key (a reply meant for another request) or tampered with.
    ValueMismatch,
    /// The connection failed or was closed.
    ConnectionLost,
    /// Redis did not answer within `upstream.request_timeout`.
    Timeout,
    /// Redis's certificate expired: no connection outlives the check a new
    /// one would fail.
    CertificateExpired,
    /// Sentinel named another primary: the lane's Redis is no longer it.
    PrimaryChanged,
}

impl Poison {
    pub const ALL: [Poison; 9] = [
        Poison::NothingInFlight,
        Poison::Push,
        Poison::ParseError,
        Poison::Contradiction,
        Poison::ValueMismatch,
        Poison::ConnectionLost,
        Poison::Timeout,
        Poison::CertificateExpired,
        Poison::PrimaryChanged,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Poison::NothingInFlight => "nothing_in_flight",
            Poison::Push => "push",
            Poison::ParseError => "parse_error",
            Poison::Contradiction => "contradiction",
            Poison::ValueMismatch => "value_mismatch",
            Poison::ConnectionLost => "connection_lost",
            Poison::Timeout => "timeout",
            Poison::CertificateExpired => "certificate_expired",
            Poison::PrimaryChanged => "primary_changed",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    client: ClientKey,
    sequence: u64,
    abandoned: bool,
}

/// The requests written on one lane and not yet answered, in order.
#[derive(Debug, Default)]
pub struct Book {
    in_flight: VecDeque<InFlight>,
    poisoned: Option<Poison>,
}

impl Book {
    /// Records a request about to be written. `Err`: the lane is poisoned
    /// and takes nothing more (the request goes to another lane).
    pub fn submit(&mut self, client: ClientKey, sequence: u64) -> Result<(), Poison> {
        if let Some(poison) = self.poisoned {
            return Err(poison);
        }
        self.in_flight.push_back(InFlight {
            client,
            sequence,
            abandoned: false,
        });
        Ok(())
    }

    /// Routes the next reply frame (`push`: a RESP3 push frame).
    pub fn on_frame(&mut self, push: bool) -> Route {
        if self.poisoned.is_some() {
            return Route::Poisoned;
        }
        if push {
            self.poisoned = Some(Poison::Push);
            return Route::Poisoned;
        }
        match self.in_flight.pop_front() {
            None => {
                self.poisoned = Some(Poison::NothingInFlight);
                Route::Poisoned
            }
            Some(entry) if entry.abandoned => Route::Discard,
            Some(entry) => Route::Deliver {
                client: entry.client,
                sequence: entry.sequence,
            },
        }
    }

    /// The client left: its replies still in flight are read and dropped.
    pub fn client_left(&mut self, client: ClientKey) {
        for entry in self.in_flight.iter_mut().filter(|e| e.client == client) {
            entry.abandoned = true;
        }
    }

    /// Poisons the lane: the live requests in flight, in order, each to be
    /// answered with an error by its client's session. Once poisoned, the
    /// lane routes nothing and takes nothing.
    pub fn poison(&mut self, why: Poison) -> Vec<(ClientKey, u64)> {
        self.poisoned.get_or_insert(why);
        self.in_flight
            .drain(..)
            .filter(|e| !e.abandoned)
            .map(|e| (e.client, e.sequence))
            .collect()
    }

    /// Why the lane is poisoned, if it is.
    pub fn poisoned(&self) -> Option<Poison> {
        self.poisoned
    }

    /// Requests written and not yet answered (abandoned ones included: their
    /// replies still come).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    fn client(id: u64) -> ClientKey {
        ClientKey { id, generation: 0 }
    }

    #[test]
    fn every_reason_has_its_metric_series() {
        let labels = Poison::ALL.map(Poison::label);
        assert_eq!(labels, crate::telemetry::metrics::LANE_POISON_REASONS);
    }

    #[test]
    fn replies_go_to_their_clients_in_order_and_a_stray_frame_poisons() {
        let mut book = Book::default();
        let (a, b) = (client(1), client(2));
        book.submit(a, 0).expect("open");
        book.submit(b, 0).expect("open");
        book.submit(a, 1).expect("open");
        assert_eq!(
            book.on_frame(false),
            Route::Deliver {
                client: a,
                sequence: 0
            }
        );
        book.client_left(b);
        assert_eq!(book.on_frame(false), Route::Discard);
        assert_eq!(
            book.on_frame(false),
            Route::Deliver {
                client: a,
                sequence: 1
            }
        );
        assert_eq!(book.on_frame(false), Route::Poisoned);
        assert_eq!(book.poisoned(), Some(Poison::NothingInFlight));
        assert_eq!(book.submit(a, 2), Err(Poison::NothingInFlight));
    }

    #[test]
    fn a_push_poisons_and_every_live_request_gets_an_error_once() {
        let mut book = Book::default();
        let (a, b) = (
            client(1),
            ClientKey {
                id: 1,
                generation: 1,
            },
        );
        book.submit(a, 0).expect("open");
        book.submit(b, 0).expect("open");
        book.client_left(a);
        assert_eq!(book.on_frame(true), Route::Poisoned);
        assert_eq!(book.poison(Poison::ConnectionLost), vec![(b, 0)]);
        assert_eq!(book.poisoned(), Some(Poison::Push));
        assert_eq!(book.poison(Poison::ConnectionLost), vec![]);
        assert_eq!(book.on_frame(false), Route::Poisoned);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Submit(u64),
        Reply,
        Push,
        Leave(u64),
        Kill,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..4u64).prop_map(Step::Submit),
            6 => Just(Step::Reply),
            1 => Just(Step::Push),
            1 => (0..4u64).prop_map(Step::Leave),
            1 => Just(Step::Kill),
        ]
    }

    proptest! {
        /// Over any interleaving of requests, replies, pushes, clients
        /// leaving and the lane dying: each client receives exactly its own
        /// replies, in the order it sent its requests, and every request it
        /// is still waiting for when the lane dies gets an error, once.
        #[test]
        fn each_client_gets_exactly_its_own_replies_in_order_or_errors(
            steps in proptest::collection::vec(step(), 0..200)
        ) {
            let mut book = Book::default();
            let mut next_sequence: HashMap<u64, u64> = HashMap::new();
            // What each present client still waits for, oldest first.
            let mut waiting: HashMap<u64, VecDeque<u64>> = HashMap::new();
            let mut left: HashSet<u64> = HashSet::new();
            // Requests written (left or not) whose replies are still to come.
            let mut written = 0usize;
            for step in steps {
                match step {
                    Step::Submit(id) if !left.contains(&id) => {
                        let sequence = *next_sequence.entry(id).or_default();
                        if book.submit(client(id), sequence).is_ok() {
                            next_sequence.insert(id, sequence + 1);
                            waiting.entry(id).or_default().push_back(sequence);
                            written += 1;
                        } else {
                            prop_assert!(book.poisoned().is_some());
                        }
                    }
                    Step::Submit(_) => {}
                    Step::Reply | Step::Push => {
                        let push = matches!(step, Step::Push);
                        match book.on_frame(push) {
                            Route::Deliver { client, sequence } => {
                                prop_assert!(!push);
                                prop_assert!(!left.contains(&client.id));
                                let oldest = waiting.get_mut(&client.id).and_then(VecDeque::pop_front);
                                prop_assert_eq!(oldest, Some(sequence));
                                written -= 1;
                            }
                            Route::Discard => written -= 1,
                            Route::Poisoned => {
                                prop_assert!(push || written == 0 || book.poisoned().is_some());
                                let failed = book.poison(Poison::ConnectionLost);
                                for (client, sequence) in failed {
                                    let oldest = waiting.get_mut(&client.id).and_then(VecDeque::pop_front);
                                    prop_assert_eq!(oldest, Some(sequence));
                                }
                                written = 0;
                            }
                        }
                    }
                    Step::Leave(id) => {
                        book.client_left(client(id));
                        waiting.remove(&id);
                        left.insert(id);
                    }
                    Step::Kill => {
                        for (client, sequence) in book.poison(Poison::ConnectionLost) {
                            prop_assert!(!left.contains(&client.id));
                            let oldest = waiting.get_mut(&client.id).and_then(VecDeque::pop_front);
                            prop_assert_eq!(oldest, Some(sequence));
                        }
                        written = 0;
                    }
                }
                prop_assert_eq!(book.in_flight(), written);
            }
            // Whatever is still awaited is still in flight on a live lane.
            let awaited: usize = waiting.values().map(VecDeque::len).sum();
            prop_assert!(awaited <= book.in_flight());
            if book.poisoned().is_some() {
                prop_assert_eq!(awaited, 0);
            }
        }
    }
}
