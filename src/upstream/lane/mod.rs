//! Lanes: shared upstream connections. A client with no connection-bound
//! state sends its requests on a lane that other clients use too, instead of
//! holding an upstream connection of its own.
//!
//! ```text
//!   session ─submit(batch)─▶ per-client queues ─round robin─▶ writer ─one TLS write per wakeup─▶ Redis
//!   session ◀─frame──────── route by Book (client, generation, sequence) ◀─ ReplyScanner ◀─ reader ◀─┘
//! ```
//!
//! The writer takes every batch that is ready, one per client in turn, books
//! each request in the [`Book`] *before* its bytes are written, and writes
//! them with one call; there is no flush timer, so a lone client waits for
//! nothing but its own request. The reader frames replies with the
//! [`ReplyScanner`] and hands each frame to the client the book names, on an
//! unbounded channel, so it never waits on a slow client: that client's
//! session stops reading its channel, is closed after
//! `limits.client_write_timeout`, and its replies still in flight are then
//! read and dropped. What one client can have queued is bounded by its
//! session's pending-request limit; what a lane queues and has in flight is
//! capped too ([`LaneLimits`]).
//!
//! Any sign of lost sync poisons the lane (see [`book`]): every client with a
//! request in flight on it gets [`Lost`], so its session answers each of its
//! pending requests with an error; the lane is closed and never
//! resynchronised. A request is never sent twice: a client whose requests
//! were all still queued (none of their bytes written) is moved to a fresh
//! lane with them, and one with nothing on the lane moves when it next sends.
//! Where a client rides is its [`Seat`], changed only by such a move. Lanes
//! are keyed by (database, protocol); each key has a few ([`Lanes`]), taken
//! from the pool's ready connections.

pub mod book;

use crate::resp::{Limits, ReplyScanner};
use crate::session::memory::BufferBudget;
use crate::session::{KEPT_BUFFER, watchdog};
use crate::telemetry::metrics::Metrics;
use crate::upstream::pool::Pool;
use crate::upstream::{UpstreamError, UpstreamStream};
use book::{Book, ClientKey, Poison, Route};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

const READ_CHUNK: usize = 64 * 1024;
/// Replies larger than this are not handed out while the buffer budget is
/// spent (see [`Lane::route`]).
const LARGE_REPLY: usize = 64 * 1024;
/// What a client gets in place of a reply the budget has no room for.
const DROPPED: &[u8] = b"-ERR redcloak: reply dropped: redcloak's reply buffers are full \
(limits.max_buffered_bytes); try again\r\n";
/// How deep a lane frames replies (the scanner keeps a counter per level).
const LANE_FRAMING_DEPTH: usize = 1024;

/// What one lane takes at most.
#[derive(Debug, Clone, Copy)]
pub struct LaneLimits {
    /// Requests written and not yet answered.
    pub max_in_flight: usize,
    /// Bytes of requests written and not yet answered (Redis's query
    /// buffers): past this, nothing more is written until replies come.
    pub max_in_flight_bytes: usize,
    /// Bytes queued by clients and not yet written: past this, clients wait.
    pub max_queued_bytes: usize,
    /// Bytes gathered for one write.
    pub max_write_bytes: usize,
    /// With requests in flight, Redis must send something within this
    /// (`upstream.request_timeout`), or the lane is poisoned.
    pub request_timeout: Duration,
}

impl Default for LaneLimits {
    fn default() -> Self {
        LaneLimits {
            max_in_flight: 4096,
            max_in_flight_bytes: 8 * 1024 * 1024,
            max_queued_bytes: 8 * 1024 * 1024,
            max_write_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Which lanes a client may ride: those on the same database, speaking the
/// same protocol (one upstream today), and of its kind: a client reading
/// large replies rides the bulk lanes, so small replies never wait behind
/// its replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneKey {
    pub database: u32,
    pub protocol: u8,
    pub bulk: bool,
}

/// What a client's lanes tell its requests end about its replies.
#[derive(Debug, Default)]
struct ReplyGauge {
    /// Bytes handed to the client's channel that its session has not taken.
    unread: AtomicUsize,
    /// A reply over [`LARGE_REPLY`] came since its last send.
    large_reply: AtomicBool,
}

/// After a bulky request or a large reply, a client's next this many
/// batches of requests without either still go on the bulk lane (so a
/// client mixing small and large reads does not drain and move each time).
const BULK_BATCHES: u8 = 8;

/// What a lane hands a client's session, in order.
#[derive(Debug)]
pub enum LaneMessage {
    /// A whole reply frame.
    Frame(Bytes),
    /// The lane was lost with requests of this client in flight on it.
    Lost(Lost),
    /// The frames that follow come from this lane (sent on attaching).
    From(Weak<Lane>),
}

/// Opens a fresh lane of a lost lane's key, for the client with this id
/// (its unsent requests move there). `None`: none can be had.
pub type Reopen =
    Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = Option<Arc<Lane>>> + Send>> + Send + Sync>;

/// Where a client rides: its lane, its key there, and the lane key. Changed
/// only by [`move_seat`], by the client's own sends or by a lost lane moving
/// its unsent requests, whichever comes first.
pub struct Seat {
    lane: Arc<Lane>,
    client: ClientKey,
    key: LaneKey,
}

fn lock_seat(seat: &Mutex<Seat>) -> MutexGuard<'_, Seat> {
    seat.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lane was poisoned with requests of this client on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream connection lost")]
pub struct Lost(pub Poison);

struct Batch {
    bytes: Bytes,
    requests: usize,
}

/// A client attached to a lane.
struct Attached {
    replies: mpsc::UnboundedSender<LaneMessage>,
    gauge: Arc<ReplyGauge>,
    /// Written or queued and not yet answered.
    outstanding: usize,
    queued: VecDeque<Batch>,
    /// The sequence number of the next request to book, and of the next
    /// reply due (a reply for any other is a contradiction).
    next_booked: u64,
    next_due: u64,
    /// Where the client's requests end knows it rides (moved with it).
    seat: Weak<Mutex<Seat>>,
    /// Its requests wait, unwritten, on a lost lane to be moved.
    stranded: bool,
}

impl Attached {
    /// Requests of this client written and not yet answered.
    fn written(&self) -> u64 {
        self.next_booked - self.next_due
    }
}

#[derive(Default)]
struct LaneState {
    book: Book,
    clients: HashMap<ClientKey, Attached>,
    /// Clients with batches queued, in the order the writer serves them.
    ready: VecDeque<ClientKey>,
    queued_bytes: usize,
    /// Batches written and not yet answered, in order: (requests not yet
    /// answered, bytes), and the bytes in all of them.
    written: VecDeque<(usize, usize)>,
    in_flight_bytes: usize,
    /// Clients whose requests were all still queued when the lane was
    /// poisoned: they move to a fresh lane with them.
    stranded: Vec<ClientKey>,
    /// When the first of the requests in flight was written (after none
    /// were): Redis owes an answer since then, or since its last bytes.
    waiting_since: Option<Instant>,
    /// The poisoning was counted in the metric.
    poison_counted: bool,
}

/// One shared upstream connection: its book, its clients, and the tokens
/// its writer and reader tasks watch.
pub struct Lane {
    state: Mutex<LaneState>,
    wake_writer: Notify,
    /// Queued bytes fell, or answers came: whoever waits for room may go on.
    room: Notify,
    lost: CancellationToken,
    limits: LaneLimits,
    /// Frames handed to sessions and not yet taken count here.
    budget: Arc<BufferBudget>,
    metrics: Arc<Metrics>,
    /// Where stranded clients go once this lane is lost.
    reopen: Option<Reopen>,
    key: LaneKey,
}

impl Lane {
    /// Starts a lane on a connection: its writer and reader run as tasks
    /// until the lane is poisoned. `on_end` runs once both have stopped.
    #[allow(clippy::too_many_arguments)]
    fn start<S>(
        key: LaneKey,
        stream: S,
        limits: LaneLimits,
        reply_limits: Limits,
        expires: Option<SystemTime>,
        budget: Arc<BufferBudget>,
        metrics: Arc<Metrics>,
        reopen: Option<Reopen>,
        on_end: impl Future<Output = ()> + Send + 'static,
    ) -> Arc<Lane>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let lane = Arc::new(Lane {
            state: Mutex::new(LaneState::default()),
            wake_writer: Notify::new(),
            room: Notify::new(),
            lost: CancellationToken::new(),
            limits,
            budget,
            metrics,
            reopen,
            key,
        });
        lane.metrics.upstream_lanes_open.increment(1.0);
        let (reader, writer) = tokio::io::split(stream);
        let writing = tokio::spawn(lane.clone().write(writer));
        let reading = lane.clone();
        tokio::spawn(async move {
            reading.clone().read(reader, reply_limits, expires).await;
            let _ = writing.await;
            reading.metrics.upstream_lanes_open.decrement(1.0);
            reading.move_stranded().await;
            on_end.await;
        });
        lane
    }

    fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once poisoned: it takes nothing more.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    fn attach(
        self: &Arc<Self>,
        client: ClientKey,
        replies: mpsc::UnboundedSender<LaneMessage>,
        gauge: Arc<ReplyGauge>,
        seat: Weak<Mutex<Seat>>,
    ) {
        let attached = Attached {
            replies,
            gauge,
            outstanding: 0,
            queued: VecDeque::new(),
            next_booked: 0,
            next_due: 0,
            seat,
            stranded: false,
        };
        // A lane lost meanwhile takes it all the same: its next send moves it.
        let _ = self.adopt(client, attached);
    }

    /// Takes a client, with what it has queued (from a lost lane: never
    /// written). `Err` gives it back: this lane was poisoned meanwhile.
    #[allow(clippy::result_large_err)]
    fn adopt(self: &Arc<Self>, client: ClientKey, mut attached: Attached) -> Result<(), Attached> {
        let mut state = self.lock();
        if state.book.poisoned().is_some() && !attached.queued.is_empty() {
            return Err(attached);
        }
        attached.next_booked = 0;
        attached.next_due = 0;
        attached.stranded = false;
        let _ = attached
            .replies
            .send(LaneMessage::From(Arc::downgrade(self)));
        if !attached.queued.is_empty() {
            state.queued_bytes += attached.queued.iter().map(|b| b.bytes.len()).sum::<usize>();
            state.ready.push_back(client);
        }
        let queued = !attached.queued.is_empty();
        state.clients.insert(client, attached);
        drop(state);
        if queued {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Takes a client off this lane, with what it has queued, to move it.
    fn detach(&self, client: ClientKey) -> Option<Attached> {
        let mut state = self.lock();
        let attached = state.clients.remove(&client)?;
        let queued: usize = attached.queued.iter().map(|b| b.bytes.len()).sum();
        state.queued_bytes = state.queued_bytes.saturating_sub(queued);
        state.book.client_left(client);
        Some(attached)
    }

    /// A stranded client that cannot move: it hears the lane is lost.
    fn fail_stranded(&self, client: ClientKey) {
        let mut state = self.lock();
        let why = state.book.poisoned().unwrap_or(Poison::ConnectionLost);
        if let Some(attached) = state.clients.get_mut(&client)
            && attached.outstanding > 0
        {
            attached.stranded = false;
            attached.outstanding = 0;
            attached.queued.clear();
            let _ = attached.replies.send(LaneMessage::Lost(Lost(why)));
        }
    }

    /// Once lost: each stranded client (every request of it still queued)
    /// moves to a fresh lane with its requests, unless its own next send
    /// moved it first; one that cannot move hears the lane is lost.
    async fn move_stranded(self: Arc<Self>) {
        let stranded = std::mem::take(&mut self.lock().stranded);
        for client in stranded {
            let seat = match self.lock().clients.get(&client) {
                Some(attached) => attached.seat.upgrade(),
                None => continue,
            };
            let fresh = match (&seat, &self.reopen) {
                (Some(_), Some(reopen)) => reopen(client.id).await,
                _ => None,
            };
            match (seat, fresh) {
                (Some(seat), Some(fresh)) => {
                    if move_seat(&seat, client, &self, &fresh) == Moved::Refused {
                        self.fail_stranded(client);
                    }
                }
                _ => self.fail_stranded(client),
            }
        }
    }

    /// Whether the client has anything queued or in flight here.
    fn has_outstanding(&self, client: ClientKey) -> bool {
        self.lock()
            .clients
            .get(&client)
            .is_some_and(|a| a.outstanding > 0)
    }

    /// Waits until every reply due to `client` here has been handed over,
    /// or the lane is lost with the client's requests all unwritten (they
    /// move). `Err`: the lane was lost with some in flight.
    async fn drained(&self, client: ClientKey) -> Result<(), Lost> {
        loop {
            let answered = self.room.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if !self.has_outstanding(client) {
                return Ok(());
            }
            {
                let state = self.lock();
                if let Some(poison) = state.book.poisoned() {
                    let stranded = state.clients.get(&client).is_some_and(|a| a.stranded);
                    return if stranded { Ok(()) } else { Err(Lost(poison)) };
                }
            }
            tokio::select! {
                _ = answered => {}
                _ = self.lost.cancelled() => {}
            }
        }
    }

    /// Queues a batch of `requests` whole requests. `Err`: the lane is lost.
    async fn submit(&self, client: ClientKey, bytes: Bytes, requests: usize) -> Result<(), Lost> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(poison) = state.book.poisoned() {
                    return Err(Lost(poison));
                }
                if state.queued_bytes < self.limits.max_queued_bytes {
                    let len = bytes.len();
                    let Some(attached) = state.clients.get_mut(&client) else {
                        return Err(Lost(Poison::ConnectionLost));
                    };
                    attached.outstanding += requests;
                    let was_idle = attached.queued.is_empty();
                    attached.queued.push_back(Batch { bytes, requests });
                    if was_idle {
                        state.ready.push_back(client);
                    }
                    state.queued_bytes += len;
                    drop(state);
                    self.wake_writer.notify_one();
                    return Ok(());
                }
            }
            tokio::select! {
                _ = room => {}
                _ = self.lost.cancelled() => {}
            }
        }
    }

    /// The client left: what it queued is dropped, what it has in flight is
    /// read and dropped.
    fn leave(&self, client: ClientKey) {
        let mut state = self.lock();
        if let Some(attached) = state.clients.remove(&client) {
            let queued: usize = attached.queued.iter().map(|b| b.bytes.len()).sum();
            state.queued_bytes = state.queued_bytes.saturating_sub(queued);
            state.book.client_left(client);
        }
    }

    /// Poisons the lane: every client with requests on it gets [`Lost`]
    /// once, and the writer and reader stop. Counted the first time.
    pub fn poison(&self, why: Poison) {
        let mut state = self.lock();
        let first = !std::mem::replace(&mut state.poison_counted, true);
        let why = state.book.poisoned().unwrap_or(why);
        state.book.poison(why);
        let inner = &mut *state;
        let can_move = self.reopen.is_some();
        for (client, attached) in inner.clients.iter_mut() {
            if attached.outstanding == 0 || attached.stranded {
                continue;
            }
            if can_move && attached.written() == 0 {
                // Not a byte of its requests was written: they move.
                attached.stranded = true;
                inner.stranded.push(*client);
                continue;
            }
            attached.outstanding = 0;
            attached.queued.clear();
            let _ = attached.replies.send(LaneMessage::Lost(Lost(why)));
        }
        inner.ready.clear();
        inner.queued_bytes = 0;
        inner.written.clear();
        inner.in_flight_bytes = 0;
        drop(state);
        if first && let Some(counter) = self.metrics.lane_poisoned(why.label()) {
            counter.increment(1);
        }
        self.lost.cancel();
        self.room.notify_waiters();
    }

    /// Takes ready batches round robin, one per client per turn, booking
    /// each request, until nothing is ready or a cap is reached.
    fn gather(&self, out: &mut BytesMut) -> Result<(), Poison> {
        let mut state = self.lock();
        let state = &mut *state;
        if state.book.in_flight() == 0 {
            state.waiting_since = None;
        }
        while out.len() < self.limits.max_write_bytes
            && state.book.in_flight() < self.limits.max_in_flight
            && state.in_flight_bytes < self.limits.max_in_flight_bytes
        {
            let Some(client) = state.ready.pop_front() else {
                break;
            };
            let Some(attached) = state.clients.get_mut(&client) else {
                continue;
            };
            let Some(batch) = attached.queued.pop_front() else {
                continue;
            };
            for _ in 0..batch.requests {
                state.book.submit(client, attached.next_booked)?;
                attached.next_booked += 1;
            }
            if !attached.queued.is_empty() {
                state.ready.push_back(client);
            }
            state.queued_bytes = state.queued_bytes.saturating_sub(batch.bytes.len());
            if batch.requests > 0 {
                state.written.push_back((batch.requests, batch.bytes.len()));
                state.in_flight_bytes += batch.bytes.len();
            }
            out.extend_from_slice(&batch.bytes);
            state.waiting_since.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    async fn write<W: AsyncWrite>(self: Arc<Self>, writer: W) {
        tokio::pin!(writer);
        let mut out = BytesMut::with_capacity(READ_CHUNK);
        loop {
            let woken = self.wake_writer.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Err(why) = self.gather(&mut out) {
                self.poison(why);
                return;
            }
            if out.is_empty() {
                tokio::select! {
                    _ = woken => {
                        // Let the sessions already running on this thread
                        // queue theirs too: one write then carries them all.
                        // No timer: a lone request waits one turn, no more.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    _ = self.lost.cancelled() => return,
                }
            }
            self.room.notify_waiters();
            let written = tokio::select! {
                written = async {
                    writer.write_all(&out).await?;
                    writer.flush().await
                } => written,
                _ = self.lost.cancelled() => return,
            };
            if written.is_err() {
                self.poison(Poison::ConnectionLost);
                return;
            }
            out.clear();
            if out.capacity() > KEPT_BUFFER {
                out = BytesMut::with_capacity(READ_CHUNK);
            }
        }
    }

    async fn read<R: AsyncRead>(
        self: Arc<Self>,
        reader: R,
        limits: Limits,
        expires: Option<SystemTime>,
    ) {
        tokio::pin!(reader);
        let mut input = BytesMut::with_capacity(READ_CHUNK);
        let mut scanner = ReplyScanner::default();
        let mut frames = Vec::new();
        let expiry = until(expires);
        tokio::pin!(expiry);
        let mut overdue = watchdog(self.limits.request_timeout);
        // When Redis last sent something (kept here: no lock per read).
        let mut last_read = Instant::now();
        loop {
            loop {
                match scanner.scan(&input, &limits) {
                    Ok(Some(len)) => frames.push(input.split_to(len).freeze()),
                    Ok(None) => break,
                    Err(_) => {
                        self.metrics.upstream_protocol_errors.increment(1);
                        self.poison(Poison::ParseError);
                        return;
                    }
                }
            }
            if !frames.is_empty() {
                if let Err(why) = self.route(&mut frames) {
                    self.metrics.upstream_protocol_errors.increment(1);
                    self.poison(why);
                    return;
                }
                self.room.notify_waiters();
                self.wake_writer.notify_one();
            }
            if input.is_empty() && input.capacity() > KEPT_BUFFER {
                input = BytesMut::new();
            }
            input.reserve(READ_CHUNK);
            let read = tokio::select! {
                read = reader.read_buf(&mut input) => read,
                _ = self.lost.cancelled() => return,
                _ = &mut expiry => {
                    self.poison(Poison::CertificateExpired);
                    return;
                }
                _ = overdue.tick() => {
                    if self.overdue(last_read) {
                        self.poison(Poison::Timeout);
                        return;
                    }
                    continue;
                }
            };
            match read {
                Ok(0) | Err(_) => {
                    self.poison(Poison::ConnectionLost);
                    return;
                }
                Ok(read) => {
                    self.metrics.upstream_received.increment(read as u64);
                    last_read = Instant::now();
                }
            }
        }
    }

    /// Requests are in flight and Redis has sent nothing (since the first of
    /// them was written, or since `last_read`) for longer than
    /// `request_timeout` and half again: the sessions waiting have given up
    /// on it by then (each with its own error), and the lane is dropped.
    fn overdue(&self, last_read: Instant) -> bool {
        let state = self.lock();
        let limit = self.limits.request_timeout + self.limits.request_timeout / 2;
        state.book.in_flight() > 0
            && state
                .waiting_since
                .is_some_and(|since| since.max(last_read).elapsed() > limit)
    }

    /// Hands each frame to the client that asked for it.
    fn route(&self, frames: &mut Vec<Bytes>) -> Result<(), Poison> {
        let mut state = self.lock();
        let state = &mut *state;
        for frame in frames.drain(..) {
            let push = frame.first() == Some(&b'>');
            let route = state.book.on_frame(push);
            if route != Route::Poisoned
                && let Some((left, bytes)) = state.written.front_mut()
            {
                *left -= 1;
                if *left == 0 {
                    state.in_flight_bytes = state.in_flight_bytes.saturating_sub(*bytes);
                    state.written.pop_front();
                }
            }
            match route {
                Route::Deliver { client, sequence } => {
                    let Some(attached) = state.clients.get_mut(&client) else {
                        // Left without its entries marked: cannot happen,
                        // but then the frame is simply nobody's.
                        continue;
                    };
                    if sequence != attached.next_due {
                        return Err(Poison::Contradiction);
                    }
                    attached.next_due += 1;
                    attached.outstanding = attached.outstanding.saturating_sub(1);
                    // Over limits.max_buffered_bytes the reader still never
                    // waits: a large reply, or any reply for a client that has
                    // not taken the last one, is answered with an error instead.
                    let frame = if self.budget.over()
                        && (frame.len() > LARGE_REPLY
                            || attached.gauge.unread.load(Ordering::Relaxed) > 0)
                    {
                        Bytes::from_static(DROPPED)
                    } else {
                        frame
                    };
                    let len = frame.len();
                    self.budget.add(len);
                    if len > LARGE_REPLY {
                        attached.gauge.large_reply.store(true, Ordering::Relaxed);
                    }
                    attached.gauge.unread.fetch_add(len, Ordering::Relaxed);
                    if attached.replies.send(LaneMessage::Frame(frame)).is_err() {
                        self.budget.remove(len);
                        attached.gauge.unread.fetch_sub(len, Ordering::Relaxed);
                    }
                }
                Route::Discard => {}
                Route::Poisoned => {
                    return Err(state.book.poisoned().unwrap_or(Poison::NothingInFlight));
                }
            }
        }
        Ok(())
    }
}

/// Sleeps until a wall-clock time (`None`: forever).
async fn until(when: Option<SystemTime>) {
    match when {
        Some(when) => {
            let left = when.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// How a move went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    Yes,
    /// The client was moved (or left) already: nothing done.
    Already,
    /// The fresh lane was lost meanwhile: the client stays where it was.
    Refused,
}

/// Moves the client seated on `from` as `client` to `to`, with whatever it
/// has queued on `from` (on a lost lane: requests none of whose bytes were
/// written), if its seat still says so.
fn move_seat(seat: &Mutex<Seat>, client: ClientKey, from: &Arc<Lane>, to: &Arc<Lane>) -> Moved {
    let mut seat = lock_seat(seat);
    if seat.client != client || !Arc::ptr_eq(&seat.lane, from) {
        return Moved::Already;
    }
    let Some(attached) = from.detach(client) else {
        return Moved::Already;
    };
    let moved = ClientKey {
        id: client.id,
        generation: client.generation + 1,
    };
    match to.adopt(moved, attached) {
        Ok(()) => {
            seat.lane = to.clone();
            seat.client = moved;
            seat.key = to.key;
            Moved::Yes
        }
        Err(attached) => {
            from.lock().clients.insert(client, attached);
            Moved::Refused
        }
    }
}

/// Where one lane of a key lives: empty until first needed, and again
/// (lost) after it was poisoned. Locked while a lane is being opened.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Lane>>>>;

/// Every lane, by key, each key with `per_key` slots filled from the pool
/// when first needed and again after a lane is lost.
pub struct Lanes {
    pool: Arc<Pool>,
    /// Redis's HELLO reply per protocol, from the last lane opened in it.
    hellos: Mutex<HashMap<u8, Bytes>>,
    budget: Arc<BufferBudget>,
    per_key: usize,
    slots: Mutex<HashMap<LaneKey, Vec<Slot>>>,
    next_client: AtomicU64,
    limits: LaneLimits,
    reply_limits: Limits,
    metrics: Arc<Metrics>,
}

impl Lanes {
    pub fn new(
        pool: Arc<Pool>,
        per_key: usize,
        limits: LaneLimits,
        reply_limits: Limits,
        budget: Arc<BufferBudget>,
        metrics: Arc<Metrics>,
    ) -> Arc<Lanes> {
        // Frames deeper than a session allows are framed here all the same,
        // so the session refuses that one reply and the lane stays in step.
        let reply_limits = Limits {
            max_reply_depth: reply_limits.max_reply_depth.max(LANE_FRAMING_DEPTH),
            ..reply_limits
        };
        Arc::new(Lanes {
            pool,
            hellos: Mutex::new(HashMap::new()),
            budget,
            per_key: per_key.max(1),
            slots: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
            limits,
            reply_limits,
            metrics,
        })
    }

    /// A live lane for `key`, spreading clients over the key's slots. A new
    /// lane on another database first SELECTs it; Redis's refusal (an index
    /// out of range) is [`LaneOpenError::Refused`].
    async fn lane(self: &Arc<Self>, key: LaneKey, client: u64) -> Result<Arc<Lane>, LaneOpenError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let slots = slots.entry(key).or_insert_with(|| {
                (0..self.per_key)
                    .map(|_| Arc::new(tokio::sync::Mutex::new(None)))
                    .collect()
            });
            slots[(client % self.per_key as u64) as usize].clone()
        };
        let mut slot = slot.lock().await;
        if let Some(lane) = slot.as_ref().filter(|lane| !lane.is_lost()) {
            return Ok(lane.clone());
        }
        let mut stream = self
            .pool
            .take()
            .await
            .map_err(LaneOpenError::Upstream)?
            .stream;
        if let Err(err) = self.set_up(&mut stream, key).await {
            self.pool.give_back(None).await;
            return Err(err);
        }
        let expires = self.pool.upstream().certificate_expiry(&stream);
        let pool = self.pool.clone();
        let lanes = Arc::downgrade(self);
        let reopen: Reopen = Arc::new(move |client| reopen(lanes.clone(), key, client));
        let lane = Lane::start(
            key,
            stream,
            self.limits,
            self.reply_limits.clone(),
            expires,
            self.budget.clone(),
            self.metrics.clone(),
            Some(reopen),
            async move { pool.give_back(None).await },
        );
        *slot = Some(lane.clone());
        Ok(lane)
    }

    /// Puts a new lane's connection in its key's protocol (HELLO, whose
    /// reply is kept for the clients' own HELLO) and database.
    async fn set_up(&self, stream: &mut UpstreamStream, key: LaneKey) -> Result<(), LaneOpenError> {
        let timeout = self.pool.upstream().settings().connect_timeout;
        let protocol = key.protocol.to_string();
        let hello = crate::upstream::call(stream, &[b"HELLO", protocol.as_bytes()], timeout)
            .await
            .map_err(LaneOpenError::Setup)?;
        let expected = if key.protocol == 3 { b'%' } else { b'*' };
        if hello.first() != Some(&expected) {
            return Err(LaneOpenError::Setup(crate::upstream::error_text(&hello)));
        }
        self.hellos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.protocol, hello);
        if key.database != 0 {
            let database = key.database.to_string();
            let reply = crate::upstream::call(stream, &[b"SELECT", database.as_bytes()], timeout)
                .await
                .map_err(LaneOpenError::Setup)?;
            if &reply[..] != b"+OK\r\n" {
                return Err(LaneOpenError::Refused(crate::upstream::error_text(&reply)));
            }
        }
        Ok(())
    }

    /// Poisons every live lane (Sentinel named another primary): their
    /// in-flight requests fail and their clients move to new lanes, made
    /// from the pool's new connections.
    pub async fn poison_all(&self, why: Poison) {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        for slot in slots {
            if let Some(lane) = slot.lock().await.take() {
                lane.poison(why);
            }
        }
    }

    /// Redis's HELLO reply in `protocol`, as a lane last heard it.
    pub fn hello(&self, protocol: u8) -> Option<Bytes> {
        self.hellos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&protocol)
            .cloned()
    }

    /// Attaches a new client to a lane of `key`.
    pub async fn attach(self: &Arc<Self>, key: LaneKey) -> Result<LaneLink, LaneOpenError> {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let client = ClientKey { id, generation: 0 };
        let lane = self.lane(key, id).await?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let gauge = Arc::new(ReplyGauge::default());
        let seat = Arc::new(Mutex::new(Seat {
            lane: lane.clone(),
            client,
            key,
        }));
        lane.attach(client, sender, gauge.clone(), Arc::downgrade(&seat));
        Ok(LaneLink {
            requests: LaneRequests {
                lanes: self.clone(),
                key,
                seat,
                gauge: gauge.clone(),
                bulk_batches: 0,
            },
            replies: LaneReplies {
                receiver,
                current: Bytes::new(),
                lost: None,
                source: Weak::new(),
                next_source: None,
                budget: self.budget.clone(),
                gauge,
            },
        })
    }
}

/// A fresh lane of `key` for a client moving off a lost one.
fn reopen(
    lanes: Weak<Lanes>,
    key: LaneKey,
    client: u64,
) -> Pin<Box<dyn Future<Output = Option<Arc<Lane>>> + Send>> {
    Box::pin(async move { lanes.upgrade()?.lane(key, client).await.ok() })
}

/// A client's two ends of a lane.
pub struct LaneLink {
    pub requests: LaneRequests,
    pub replies: LaneReplies,
}

/// Where a client's requests go. Dropping it leaves the lane.
pub struct LaneRequests {
    lanes: Arc<Lanes>,
    /// The lanes the client's next requests go to (SELECT and HELLO
    /// change it; `bulk` is decided per batch).
    key: LaneKey,
    seat: Arc<Mutex<Seat>>,
    gauge: Arc<ReplyGauge>,
    /// Batches still to go on the bulk lane (see [`BULK_BATCHES`]).
    bulk_batches: u8,
}

/// How often a send moves to a fresh lane that is lost again before it
/// gives up.
const MOVES_PER_SEND: usize = 3;

impl LaneRequests {
    fn seated(&self) -> (Arc<Lane>, ClientKey, LaneKey) {
        let seat = lock_seat(&self.seat);
        (seat.lane.clone(), seat.client, seat.key)
    }

    /// Sends `requests` whole requests, on the bulk lane if `bulky` (one of
    /// them has a reply that grows with the data) or if a bulky request or a
    /// large reply came within the last [`BULK_BATCHES`] batches. A client
    /// on a lost lane moves to a fresh one first, with any requests of its own still queued there
    /// (none of their bytes written: they go to a lane of the key they were
    /// sent for). After [`LaneRequests::switch`], it moves to that key's
    /// lane once every reply due on the current one has come, so replies
    /// stay in order. `Err(Lost)`: its lane was lost with requests of it in
    /// flight (the session answers its pending requests with errors).
    pub async fn send(
        &mut self,
        bytes: Bytes,
        requests: usize,
        bulky: bool,
    ) -> Result<(), LaneError> {
        if bulky || self.gauge.large_reply.swap(false, Ordering::Relaxed) {
            self.bulk_batches = BULK_BATCHES;
        } else {
            self.bulk_batches = self.bulk_batches.saturating_sub(1);
        }
        self.key.bulk = self.bulk_batches > 0;
        let mut moves = 0;
        loop {
            let (lane, client, lane_key) = self.seated();
            let to = if lane.is_lost() {
                // What it left queued there must run where it was sent for.
                if lane.has_outstanding(client) {
                    lane_key
                } else {
                    self.key
                }
            } else if lane_key != self.key {
                lane.drained(client).await.map_err(LaneError::Lost)?;
                if lane.is_lost() {
                    // Stranded on it: first to a lane of the key it left.
                    continue;
                }
                self.key
            } else {
                match lane.submit(client, bytes.clone(), requests).await {
                    Ok(()) => return Ok(()),
                    // Lost before the batch was queued: it moves.
                    Err(_) => continue,
                }
            };
            moves += 1;
            if moves > MOVES_PER_SEND {
                let why = lane
                    .lock()
                    .book
                    .poisoned()
                    .unwrap_or(Poison::ConnectionLost);
                return Err(LaneError::Lost(Lost(why)));
            }
            // Boxed: opening a lane (a pool connection, its TLS handshake)
            // is rare, and its state would otherwise sit in every session.
            let fresh = Box::pin(self.lanes.lane(to, client.id))
                .await
                .map_err(LaneError::Unavailable)?;
            move_seat(&self.seat, client, &lane, &fresh);
        }
    }

    /// SELECT or HELLO on a lane: makes sure a lane on `database` speaking
    /// `protocol` can be had (Redis refuses an index out of range), then
    /// sends what follows there. Returns Redis's HELLO reply in `protocol`.
    pub async fn switch(&mut self, database: u32, protocol: u8) -> Result<Bytes, LaneOpenError> {
        let key = LaneKey {
            database,
            protocol,
            bulk: self.key.bulk,
        };
        let client = lock_seat(&self.seat).client;
        Box::pin(self.lanes.lane(key, client.id)).await?;
        self.key = key;
        self.lanes
            .hello(protocol)
            .ok_or_else(|| LaneOpenError::Setup("no HELLO reply kept".into()))
    }

    /// Poisons this client's lane (its session found a reply contradicting
    /// its request).
    pub fn poison(&self, why: Poison) {
        lock_seat(&self.seat).lane.poison(why);
    }
}

impl Drop for LaneRequests {
    fn drop(&mut self) {
        let seat = lock_seat(&self.seat);
        seat.lane.leave(seat.client);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error(transparent)]
    Lost(Lost),
    #[error(transparent)]
    Unavailable(LaneOpenError),
}

/// Why no lane could be had for a key.
#[derive(Debug, thiserror::Error)]
pub enum LaneOpenError {
    #[error("upstream unavailable: {0}")]
    Upstream(UpstreamError),
    #[error("upstream unavailable: setting up a shared connection failed: {0}")]
    Setup(String),
    /// Redis refused the SELECT (its error text).
    #[error("{0}")]
    Refused(String),
}

/// A client's replies from its lane, as a byte stream of whole frames. A
/// lost lane reads as an error whose inner error is [`Lost`].
pub struct LaneReplies {
    receiver: mpsc::UnboundedReceiver<LaneMessage>,
    current: Bytes,
    /// Received after bytes still to be read: returned once they are.
    lost: Option<Lost>,
    /// The lane the frames read come from, and the one those after the
    /// bytes still to be read come from (applied once they are read).
    source: Weak<Lane>,
    next_source: Option<Weak<Lane>>,
    budget: Arc<BufferBudget>,
    gauge: Arc<ReplyGauge>,
}

impl LaneReplies {
    /// A frame taken from the channel no longer counts here (the session's
    /// buffer counts it once copied).
    fn took(&mut self, frame: Bytes) {
        self.budget.remove(frame.len());
        self.gauge.unread.fetch_sub(frame.len(), Ordering::Relaxed);
        self.current = frame;
    }

    /// A value in the frames read so far failed to open under the key its
    /// request named: the lane they came from is poisoned (a reply may have
    /// gone to the wrong request; the key binding is the second detector).
    pub fn distrust(&self, why: Poison) {
        if let Some(lane) = self.source.upgrade() {
            lane.poison(why);
        }
    }
}

impl Drop for LaneReplies {
    fn drop(&mut self) {
        self.receiver.close();
        while let Ok(message) = self.receiver.try_recv() {
            if let LaneMessage::Frame(frame) = message {
                self.budget.remove(frame.len());
            }
        }
    }
}

impl AsyncRead for LaneReplies {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.current.is_empty() {
            if let Some(lost) = this.lost.take() {
                return Poll::Ready(Err(lost_error(lost)));
            }
            if let Some(source) = this.next_source.take() {
                this.source = source;
            }
            match this.receiver.poll_recv(cx) {
                Poll::Ready(Some(LaneMessage::Frame(frame))) => this.took(frame),
                Poll::Ready(Some(LaneMessage::Lost(lost))) => {
                    return Poll::Ready(Err(lost_error(lost)));
                }
                Poll::Ready(Some(LaneMessage::From(source))) => this.source = source,
                // Every lane let go of this client: read as a close.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        // What is here already goes in this read; an error, or frames from
        // another lane, come after it.
        loop {
            let n = this.current.len().min(buf.remaining());
            buf.put_slice(&this.current[..n]);
            if n == this.current.len() {
                // Let go of the frame's buffer now (an advanced, empty
                // `Bytes` would keep it alive while the client is slow).
                this.current = Bytes::new();
            } else {
                bytes::Buf::advance(&mut this.current, n);
            }
            if buf.remaining() == 0 || !this.current.is_empty() {
                break;
            }
            match this.receiver.try_recv() {
                Ok(LaneMessage::Frame(frame)) => this.took(frame),
                Ok(LaneMessage::Lost(lost)) => {
                    this.lost = Some(lost);
                    break;
                }
                Ok(LaneMessage::From(source)) => {
                    this.next_source = Some(source);
                    break;
                }
                Err(_) => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn lost_error(lost: Lost) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, lost)
}

/// Whether an upstream read error says the client's lane was lost.
pub fn is_lost(err: &std::io::Error) -> bool {
    err.get_ref().is_some_and(|inner| inner.is::<Lost>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    const KEY: LaneKey = LaneKey {
        database: 0,
        protocol: 2,
        bulk: false,
    };

    fn lane_on(stream: DuplexStream, budget: usize) -> Arc<Lane> {
        lane_with(stream, LaneLimits::default(), budget, None)
    }

    fn lane_with(
        stream: DuplexStream,
        limits: LaneLimits,
        budget: usize,
        reopen: Option<Reopen>,
    ) -> Arc<Lane> {
        Lane::start(
            KEY,
            stream,
            limits,
            Limits::default(),
            None,
            Arc::new(BufferBudget::new(budget)),
            Arc::new(Metrics::new()),
            reopen,
            async {},
        )
    }

    fn client(lane: &Arc<Lane>, id: u64) -> (ClientKey, Replies) {
        let key = ClientKey { id, generation: 0 };
        let (sender, receiver) = mpsc::unbounded_channel();
        lane.attach(key, sender, Arc::default(), Weak::new());
        (key, Replies(receiver))
    }

    /// A client with a seat, as `Lanes::attach` makes them (it can move).
    fn seated_client(lane: &Arc<Lane>, id: u64) -> (ClientKey, Replies, Arc<Mutex<Seat>>) {
        let client = ClientKey { id, generation: 0 };
        let (sender, receiver) = mpsc::unbounded_channel();
        let seat = Arc::new(Mutex::new(Seat {
            lane: lane.clone(),
            client,
            key: KEY,
        }));
        lane.attach(client, sender, Arc::default(), Arc::downgrade(&seat));
        (client, Replies(receiver), seat)
    }

    /// A client's channel, read as frames or `Lost` (lane marks skipped).
    struct Replies(mpsc::UnboundedReceiver<LaneMessage>);

    impl Replies {
        async fn recv(&mut self) -> Option<Result<Bytes, Lost>> {
            loop {
                match self.0.recv().await? {
                    LaneMessage::Frame(frame) => return Some(Ok(frame)),
                    LaneMessage::Lost(lost) => return Some(Err(lost)),
                    LaneMessage::From(_) => {}
                }
            }
        }

        fn try_recv(&mut self) -> Result<Result<Bytes, Lost>, ()> {
            loop {
                match self.0.try_recv().map_err(|_| ())? {
                    LaneMessage::Frame(frame) => return Ok(Ok(frame)),
                    LaneMessage::Lost(lost) => return Ok(Err(lost)),
                    LaneMessage::From(_) => {}
                }
            }
        }
    }

    fn get(key: &str) -> Bytes {
        let mut out = BytesMut::new();
        crate::resp::encode_command(&mut out, &[b"GET", key.as_bytes()]);
        out.freeze()
    }

    /// A Redis stand-in: answers each GET with its key, in order.
    async fn echo_redis(mut redis: DuplexStream, answers: usize) {
        let mut input = BytesMut::new();
        let mut parser = crate::resp::RequestParser::default();
        let mut answered = 0;
        while answered < answers {
            if redis.read_buf(&mut input).await.unwrap_or(0) == 0 {
                return;
            }
            while let Ok(Some(request)) = parser.next(&mut input, &Limits::default()) {
                let mut out = BytesMut::new();
                crate::resp::encode_bulk(&mut out, &request.args[1]);
                if redis.write_all(&out).await.is_err() {
                    return;
                }
                answered += 1;
            }
        }
    }

    #[tokio::test]
    async fn clients_get_their_own_replies_in_order_and_a_leaver_s_are_dropped() {
        let (proxy_side, redis_side) = tokio::io::duplex(4096);
        let lane = lane_on(proxy_side, usize::MAX);
        let (a, mut a_replies) = client(&lane, 1);
        let (b, mut b_replies) = client(&lane, 2);
        let (c, _c_replies) = client(&lane, 3);
        // c leaves before the writer ran: its two requests never reach Redis.
        let redis = tokio::spawn(echo_redis(redis_side, 5));
        for (who, key) in [
            (a, "a0"),
            (c, "c0"),
            (b, "b0"),
            (a, "a1"),
            (c, "c1"),
            (b, "b1"),
        ] {
            lane.submit(who, get(key), 1).await.expect("submit");
        }
        lane.leave(c);
        let mut batch = BytesMut::new();
        batch.extend_from_slice(&get("a2"));
        lane.submit(a, batch.freeze(), 1).await.expect("submit");
        for (replies, keys) in [
            (&mut a_replies, ["a0", "a1", "a2"].as_slice()),
            (&mut b_replies, &["b0", "b1"]),
        ] {
            for key in keys {
                let frame = replies.recv().await.expect("open").expect("not lost");
                assert_eq!(
                    &frame[..],
                    format!("${}\r\n{key}\r\n", key.len()).as_bytes()
                );
            }
        }
        redis.await.expect("redis");
        // Redis closing is the only thing that ended the lane; no one was
        // waiting, so no one heard of it.
        lane.lost.cancelled().await;
        assert_eq!(lane.lock().book.poisoned(), Some(Poison::ConnectionLost));
        assert!(a_replies.try_recv().is_err() && b_replies.try_recv().is_err());
    }

    #[tokio::test]
    async fn the_writer_takes_one_batch_per_client_in_turn_within_its_caps() {
        let (proxy_side, _redis_side) = tokio::io::duplex(1 << 16);
        let lane = lane_on(proxy_side, usize::MAX);
        let (a, _a_replies) = client(&lane, 1);
        let (b, _b_replies) = client(&lane, 2);
        // Nothing yields here, so the lane's own writer has not run yet.
        for (who, key) in [(a, "a0"), (a, "a1"), (a, "a2"), (b, "b0"), (b, "b1")] {
            lane.submit(who, get(key), 1).await.expect("submit");
        }
        let mut out = BytesMut::new();
        lane.gather(&mut out).expect("open");
        let order: Vec<Bytes> = ["a0", "b0", "a1", "b1", "a2"].map(get).to_vec();
        assert_eq!(&out[..], &order.concat()[..]);
        assert_eq!(lane.lock().book.in_flight(), 5);
        assert_eq!(lane.lock().queued_bytes, 0);
    }

    #[tokio::test]
    async fn a_push_poisons_and_only_clients_waiting_get_lost_once() {
        let (proxy_side, mut redis_side) = tokio::io::duplex(4096);
        let lane = lane_on(proxy_side, usize::MAX);
        let (a, mut a_replies) = client(&lane, 1);
        let (_idle, mut idle_replies) = client(&lane, 2);
        lane.submit(a, get("x"), 1).await.expect("submit");
        lane.submit(a, get("y"), 1).await.expect("submit");
        redis_side.write_all(b"+one\r\n").await.expect("write");
        let first = a_replies.recv().await.expect("open").expect("a reply");
        assert_eq!(&first[..], b"+one\r\n");
        redis_side
            .write_all(b">2\r\n+message\r\n+x\r\n+two\r\n")
            .await
            .expect("write");
        assert_eq!(
            a_replies.recv().await.expect("open"),
            Err(Lost(Poison::Push))
        );
        lane.lost.cancelled().await;
        assert!(a_replies.try_recv().is_err(), "nothing after Lost");
        // The client with nothing on the lane heard nothing; it moves when it
        // next sends (LaneRequests), as this lane takes nothing more.
        assert!(idle_replies.try_recv().is_err());
        assert!(lane.submit(a, get("z"), 1).await.is_err());
    }

    /// Reads what a Redis stand-in has been sent until `expected` came.
    async fn read_exactly(redis: &mut DuplexStream, expected: &[u8]) {
        let mut got = vec![0; expected.len()];
        redis.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn unwritten_requests_move_to_a_fresh_lane_and_written_ones_fail() {
        let limits = LaneLimits {
            max_in_flight: 1,
            ..LaneLimits::default()
        };
        let (fresh_side, fresh_redis) = tokio::io::duplex(4096);
        let fresh = lane_with(fresh_side, LaneLimits::default(), usize::MAX, None);
        let reopened = fresh.clone();
        let reopen: Reopen = Arc::new(move |_| {
            let lane = reopened.clone();
            Box::pin(async move { Some(lane) })
        });
        let (lost_side, mut lost_redis) = tokio::io::duplex(4096);
        let lost = lane_with(lost_side, limits, usize::MAX, Some(reopen));
        let (a, mut a_replies) = client(&lost, 1);
        let (b, mut b_replies, seat) = seated_client(&lost, 2);
        lost.submit(a, get("a0"), 1).await.expect("submit");
        read_exactly(&mut lost_redis, &get("a0")).await;
        // a0 is in flight, the lane's only slot: b0 waits in its queue.
        lost.submit(b, get("b0"), 1).await.expect("submit");
        tokio::task::yield_now().await;
        assert_eq!(lost.lock().book.in_flight(), 1);
        drop(lost_redis);
        assert_eq!(
            a_replies.recv().await.expect("open"),
            Err(Lost(Poison::ConnectionLost))
        );
        // b0 was never written there: it is sent, once, on the fresh lane.
        let redis = tokio::spawn(echo_redis(fresh_redis, 1));
        let reply = b_replies
            .recv()
            .await
            .expect("open")
            .expect("moved, not lost");
        assert_eq!(&reply[..], b"$2\r\nb0\r\n");
        redis.await.expect("redis");
        let seat = lock_seat(&seat);
        assert!(Arc::ptr_eq(&seat.lane, &fresh));
        assert_eq!(seat.client.generation, 1);
        assert!(!lost.lock().clients.contains_key(&b));
    }

    #[tokio::test]
    async fn without_a_fresh_lane_unwritten_requests_hear_the_lane_is_lost() {
        let limits = LaneLimits {
            max_in_flight: 1,
            ..LaneLimits::default()
        };
        let reopen: Reopen = Arc::new(|_| Box::pin(async { None }));
        let (side, mut redis) = tokio::io::duplex(4096);
        let lane = lane_with(side, limits, usize::MAX, Some(reopen));
        let (a, _a_replies) = client(&lane, 1);
        let (b, mut b_replies, _seat) = seated_client(&lane, 2);
        lane.submit(a, get("a0"), 1).await.expect("submit");
        read_exactly(&mut redis, &get("a0")).await;
        lane.submit(b, get("b0"), 1).await.expect("submit");
        drop(redis);
        assert_eq!(
            b_replies.recv().await.expect("open"),
            Err(Lost(Poison::ConnectionLost))
        );
    }

    #[tokio::test]
    async fn bytes_in_flight_are_capped_until_replies_come() {
        let (proxy_side, _redis_side) = tokio::io::duplex(1 << 16);
        let limits = LaneLimits {
            max_in_flight_bytes: get("a0").len(),
            ..LaneLimits::default()
        };
        let lane = lane_with(proxy_side, limits, usize::MAX, None);
        let (a, mut a_replies) = client(&lane, 1);
        let (b, _b_replies) = client(&lane, 2);
        // Nothing yields here, so the lane's own writer has not run yet.
        for (who, key) in [(a, "a0"), (b, "b0"), (a, "a1")] {
            lane.submit(who, get(key), 1).await.expect("submit");
        }
        let mut out = BytesMut::new();
        lane.gather(&mut out).expect("open");
        // With a0 in flight the lane is at its cap: nothing more is written
        // until a0 is answered, then b0, then a1.
        assert_eq!(&out[..], &get("a0")[..]);
        for (answer, next) in [("+a0\r\n", "b0"), ("+b0\r\n", "a1")] {
            out.clear();
            lane.gather(&mut out).expect("open");
            assert!(out.is_empty(), "over the cap nothing more is written");
            lane.route(&mut vec![Bytes::from(answer)]).expect("in step");
            lane.gather(&mut out).expect("open");
            assert_eq!(&out[..], &get(next)[..]);
        }
        assert_eq!(
            &a_replies.recv().await.expect("open").expect("reply")[..],
            b"+a0\r\n"
        );
    }

    #[tokio::test]
    async fn a_large_reply_sends_its_client_s_next_batches_to_the_bulk_lane() {
        let (proxy_side, _redis_side) = tokio::io::duplex(1 << 16);
        let lane = lane_on(proxy_side, usize::MAX);
        let client = ClientKey {
            id: 1,
            generation: 0,
        };
        let (sender, _receiver) = mpsc::unbounded_channel();
        let gauge = Arc::new(ReplyGauge::default());
        lane.attach(client, sender, gauge.clone(), Weak::new());
        for (len, large) in [(LARGE_REPLY, false), (LARGE_REPLY + 1, true)] {
            lane.submit(client, get("k"), 1).await.expect("submit");
            let mut out = BytesMut::new();
            lane.gather(&mut out).expect("open");
            let mut frame = BytesMut::new();
            crate::resp::encode_bulk(&mut frame, &vec![b'v'; len - 5 - len.to_string().len()]);
            assert_eq!(frame.len(), len);
            lane.route(&mut vec![frame.freeze()]).expect("in step");
            assert_eq!(gauge.large_reply.swap(false, Ordering::Relaxed), large);
        }
    }

    #[tokio::test]
    async fn a_value_that_fails_its_key_poisons_the_lane_it_came_from() {
        let (proxy_side, redis_side) = tokio::io::duplex(4096);
        let lane = lane_on(proxy_side, usize::MAX);
        let key = ClientKey {
            id: 1,
            generation: 0,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let gauge = Arc::new(ReplyGauge::default());
        lane.attach(key, sender, gauge.clone(), Weak::new());
        let mut replies = LaneReplies {
            receiver,
            current: Bytes::new(),
            lost: None,
            source: Weak::new(),
            next_source: None,
            budget: Arc::new(BufferBudget::new(usize::MAX)),
            gauge,
        };
        let mut redis = redis_side;
        lane.submit(key, get("k"), 1).await.expect("submit");
        read_exactly(&mut redis, &get("k")).await;
        redis.write_all(b"$1\r\nv\r\n").await.expect("write");
        let mut read = vec![0; 7];
        replies.read_exact(&mut read).await.expect("reply");
        assert_eq!(read, b"$1\r\nv\r\n");
        assert!(!lane.is_lost());
        replies.distrust(Poison::ValueMismatch);
        assert!(lane.is_lost());
        assert_eq!(lane.lock().book.poisoned(), Some(Poison::ValueMismatch));
    }

    #[tokio::test]
    async fn a_reply_with_nothing_in_flight_poisons() {
        let (proxy_side, mut redis_side) = tokio::io::duplex(4096);
        let lane = lane_on(proxy_side, usize::MAX);
        redis_side.write_all(b"+stray\r\n").await.expect("write");
        lane.lost.cancelled().await;
        assert_eq!(lane.lock().book.poisoned(), Some(Poison::NothingInFlight));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever Redis sends, the lane reader never panics: each client
        /// gets whole frames and then, at most once, `Lost`.
        #[test]
        fn any_bytes_from_redis_poison_or_pass_but_never_panic(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            requests in 0usize..6,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let (proxy_side, mut redis_side) = tokio::io::duplex(1 << 16);
                let lane = lane_on(proxy_side, 1 << 20);
                let (a, mut replies) = client(&lane, 1);
                for i in 0..requests {
                    lane.submit(a, get(&i.to_string()), 1).await.expect("submit");
                }
                for chunk in &chunks {
                    let _ = redis_side.write_all(chunk).await;
                    tokio::task::yield_now().await;
                }
                drop(redis_side);
                lane.lost.cancelled().await;
                let mut lost = 0;
                let mut frames = 0;
                while let Ok(reply) = replies.try_recv() {
                    match reply {
                        Ok(frame) => {
                            prop_assert_eq!(lost, 0);
                            let mut scanner = ReplyScanner::default();
                            prop_assert_eq!(scanner.scan(&frame, &Limits::default()).ok().flatten(), Some(frame.len()));
                            frames += 1;
                        }
                        Err(_) => lost += 1,
                    }
                }
                prop_assert!(frames <= requests);
                prop_assert_eq!(lost, usize::from(frames < requests));
                Ok(())
            })?;
        }
    }
}
