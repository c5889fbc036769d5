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
//! request queued or in flight on it gets [`Lost`], so its session answers
//! each of them with an error; the lane is closed and never resynchronised.
//! A client with nothing on a poisoned lane moves to a fresh one when it next
//! sends. Lanes are keyed by (database, protocol); each key has a few
//! ([`Lanes`]), taken from the pool's ready connections.

pub mod book;

use crate::metrics::Metrics;
use crate::resp::{Limits, ReplyScanner};
use crate::session::memory::BufferBudget;
use crate::session::{KEPT_BUFFER, watchdog};
use crate::upstream::pool::Pool;
use crate::upstream::{UpstreamError, UpstreamStream};
use book::{Book, ClientKey, Poison, Route};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
            max_queued_bytes: 8 * 1024 * 1024,
            max_write_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Which lanes a client may ride: those on the same database, speaking the
/// same protocol (one upstream today).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneKey {
    pub database: u32,
    pub protocol: u8,
}

/// What a lane hands a client's session: a whole reply frame, or word that
/// the lane was lost while the client had requests on it.
pub type LaneReply = Result<Bytes, Lost>;

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
    replies: mpsc::UnboundedSender<LaneReply>,
    /// Bytes handed to the client's channel that its session has not taken.
    unread: Arc<AtomicUsize>,
    /// Written or queued and not yet answered.
    outstanding: usize,
    queued: VecDeque<Batch>,
    /// The sequence number of the next request to book, and of the next
    /// reply due (a reply for any other is a contradiction).
    next_booked: u64,
    next_due: u64,
}

#[derive(Default)]
struct LaneState {
    book: Book,
    clients: HashMap<ClientKey, Attached>,
    /// Clients with batches queued, in the order the writer serves them.
    ready: VecDeque<ClientKey>,
    queued_bytes: usize,
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
}

impl Lane {
    /// Starts a lane on a connection: its writer and reader run as tasks
    /// until the lane is poisoned. `on_end` runs once both have stopped.
    fn start<S>(
        stream: S,
        limits: LaneLimits,
        reply_limits: Limits,
        expires: Option<SystemTime>,
        budget: Arc<BufferBudget>,
        metrics: Arc<Metrics>,
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
        });
        lane.metrics.upstream_lanes_open.increment(1.0);
        let (reader, writer) = tokio::io::split(stream);
        let writing = tokio::spawn(lane.clone().write(writer));
        let reading = lane.clone();
        tokio::spawn(async move {
            reading.clone().read(reader, reply_limits, expires).await;
            let _ = writing.await;
            reading.metrics.upstream_lanes_open.decrement(1.0);
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
        &self,
        client: ClientKey,
        replies: mpsc::UnboundedSender<LaneReply>,
        unread: Arc<AtomicUsize>,
    ) {
        self.lock().clients.insert(
            client,
            Attached {
                replies,
                unread,
                outstanding: 0,
                queued: VecDeque::new(),
                next_booked: 0,
                next_due: 0,
            },
        );
    }

    /// Whether the client has anything queued or in flight here.
    fn has_outstanding(&self, client: ClientKey) -> bool {
        self.lock()
            .clients
            .get(&client)
            .is_some_and(|a| a.outstanding > 0)
    }

    /// Waits until every reply due to `client` here has been handed over.
    /// `Err`: the lane was lost first.
    async fn drained(&self, client: ClientKey) -> Result<(), Lost> {
        loop {
            let answered = self.room.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if !self.has_outstanding(client) {
                return Ok(());
            }
            if let Some(poison) = self.lock().book.poisoned() {
                return Err(Lost(poison));
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
        for attached in state.clients.values_mut() {
            if attached.outstanding > 0 {
                attached.outstanding = 0;
                attached.queued.clear();
                let _ = attached.replies.send(Err(Lost(why)));
            }
        }
        state.ready.clear();
        state.queued_bytes = 0;
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
            match state.book.on_frame(push) {
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
                            || attached.unread.load(Ordering::Relaxed) > 0)
                    {
                        Bytes::from_static(DROPPED)
                    } else {
                        frame
                    };
                    let len = frame.len();
                    self.budget.add(len);
                    attached.unread.fetch_add(len, Ordering::Relaxed);
                    if attached.replies.send(Ok(frame)).is_err() {
                        self.budget.remove(len);
                        attached.unread.fetch_sub(len, Ordering::Relaxed);
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
    async fn lane(&self, key: LaneKey, client: u64) -> Result<Arc<Lane>, LaneOpenError> {
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
        let mut stream = self.pool.take().await.map_err(LaneOpenError::Upstream)?;
        if let Err(err) = self.set_up(&mut stream, key).await {
            self.pool.give_back(None).await;
            return Err(err);
        }
        let expires = self.pool.upstream().certificate_expiry(&stream);
        let pool = self.pool.clone();
        let lane = Lane::start(
            stream,
            self.limits,
            self.reply_limits.clone(),
            expires,
            self.budget.clone(),
            self.metrics.clone(),
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
        let unread = Arc::new(AtomicUsize::new(0));
        lane.attach(client, sender.clone(), unread.clone());
        Ok(LaneLink {
            requests: LaneRequests {
                lanes: self.clone(),
                key,
                lane_key: key,
                lane,
                client,
                replies: sender,
                unread: unread.clone(),
            },
            replies: LaneReplies {
                receiver,
                current: Bytes::new(),
                lost: None,
                budget: self.budget.clone(),
                unread,
            },
        })
    }
}

/// A client's two ends of a lane.
pub struct LaneLink {
    pub requests: LaneRequests,
    pub replies: LaneReplies,
}

/// Where a client's requests go. Dropping it leaves the lane.
pub struct LaneRequests {
    lanes: Arc<Lanes>,
    /// The lanes the client's next requests go to (SELECT changes it).
    key: LaneKey,
    /// The key of the lane it is attached to.
    lane_key: LaneKey,
    lane: Arc<Lane>,
    client: ClientKey,
    replies: mpsc::UnboundedSender<LaneReply>,
    unread: Arc<AtomicUsize>,
}

impl LaneRequests {
    /// Sends `requests` whole requests. On a lost lane with nothing of this
    /// client's on it, moves to a fresh lane first; with something on it,
    /// `Err` (the session answers its pending requests with errors). After
    /// [`LaneRequests::select`], moves to that database's lane once every
    /// reply due on the current one has come, so replies stay in order.
    pub async fn send(&mut self, bytes: Bytes, requests: usize) -> Result<(), LaneError> {
        if self.key != self.lane_key {
            self.lane
                .drained(self.client)
                .await
                .map_err(LaneError::Lost)?;
            self.move_to_fresh_lane().await?;
        } else if self.lane.is_lost() && !self.lane.has_outstanding(self.client) {
            self.move_to_fresh_lane().await?;
        }
        self.lane
            .submit(self.client, bytes, requests)
            .await
            .map_err(LaneError::Lost)
    }

    async fn move_to_fresh_lane(&mut self) -> Result<(), LaneError> {
        let lane = self
            .lanes
            .lane(self.key, self.client.id)
            .await
            .map_err(LaneError::Unavailable)?;
        self.lane.leave(self.client);
        self.client.generation += 1;
        lane.attach(self.client, self.replies.clone(), self.unread.clone());
        self.lane = lane;
        self.lane_key = self.key;
        Ok(())
    }

    /// SELECT or HELLO on a lane: makes sure a lane on `database` speaking
    /// `protocol` can be had (Redis refuses an index out of range), then
    /// sends what follows there. Returns Redis's HELLO reply in `protocol`.
    pub async fn switch(&mut self, database: u32, protocol: u8) -> Result<Bytes, LaneOpenError> {
        let key = LaneKey { database, protocol };
        self.lanes.lane(key, self.client.id).await?;
        self.key = key;
        self.lanes
            .hello(protocol)
            .ok_or_else(|| LaneOpenError::Setup("no HELLO reply kept".into()))
    }

    /// Poisons this client's lane (its session found a reply contradicting
    /// its request).
    pub fn poison(&self, why: Poison) {
        self.lane.poison(why);
    }
}

impl Drop for LaneRequests {
    fn drop(&mut self) {
        self.lane.leave(self.client);
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
    receiver: mpsc::UnboundedReceiver<LaneReply>,
    current: Bytes,
    /// Received after bytes still to be read: returned once they are.
    lost: Option<Lost>,
    budget: Arc<BufferBudget>,
    unread: Arc<AtomicUsize>,
}

impl LaneReplies {
    /// A frame taken from the channel no longer counts here (the session's
    /// buffer counts it once copied).
    fn took(&mut self, frame: Bytes) {
        self.budget.remove(frame.len());
        self.unread.fetch_sub(frame.len(), Ordering::Relaxed);
        self.current = frame;
    }
}

impl Drop for LaneReplies {
    fn drop(&mut self) {
        self.receiver.close();
        while let Ok(reply) = self.receiver.try_recv() {
            if let Ok(frame) = reply {
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
        if this.current.is_empty() {
            if let Some(lost) = this.lost.take() {
                return Poll::Ready(Err(lost_error(lost)));
            }
            match this.receiver.poll_recv(cx) {
                Poll::Ready(Some(Ok(frame))) => this.took(frame),
                Poll::Ready(Some(Err(lost))) => return Poll::Ready(Err(lost_error(lost))),
                // Every lane let go of this client: read as a close.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        // What is here already goes in this read; an error comes after it.
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
                Ok(Ok(frame)) => this.took(frame),
                Ok(Err(lost)) => {
                    this.lost = Some(lost);
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

    fn lane_on(stream: DuplexStream, budget: usize) -> Arc<Lane> {
        Lane::start(
            stream,
            LaneLimits::default(),
            Limits::default(),
            None,
            Arc::new(BufferBudget::new(budget)),
            Arc::new(Metrics::new()),
            async {},
        )
    }

    fn client(lane: &Lane, id: u64) -> (ClientKey, mpsc::UnboundedReceiver<LaneReply>) {
        let key = ClientKey { id, generation: 0 };
        let (sender, receiver) = mpsc::unbounded_channel();
        lane.attach(key, sender, Arc::new(AtomicUsize::new(0)));
        (key, receiver)
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
