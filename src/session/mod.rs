//! One client connection, served on a shared lane or on an upstream
//! connection of its own (the connection may come from, and go back to, the
//! pool).
//!
//! ```text
//!   client ──read──▶ RequestParser ─▶ Policy::classify ─▶ seal ─▶ RequestSink (lane or own connection)
//!                                          │ Entry (plan or answer)
//!                                          ▼
//!                               FIFO (bounded: limits.max_pending_requests)
//!                                          │
//!   client ◀─write── Replies (pipeline.rs) ◀── ReplyScanner ◀──read── lane frames / upstream
//! ```
//!
//! The request half is `requests.rs`, the reply half `replies.rs` (with
//! `pipeline.rs`, the pure state machine that matches replies to requests);
//! `Shared` holds what they share besides the FIFO, `quiet.rs` the timer that
//! parks or closes a quiet client. Both halves run in the connection's task. The FIFO is their only link for
//! requests (the flush log below only carries timings), and its capacity is
//! the pending-request limit: when it is full the request
//! half stops reading the client, and while the client does not read its
//! replies the reply half stops reading Redis (or its lane's frames, which
//! queue for it), so memory per connection stays bounded whatever the
//! client does. Writes go out once per batch of frames.
//!
//! On a lane ([`run_on_lane`]), redcloak answers SELECT, HELLO 2/3 and
//! CLIENT SETNAME/GETNAME itself (`policy::local`), and a request that needs the
//! connection itself ends the session with [`Next::Pin`]: the request is put
//! back in front of the client's unread input, what is pending is
//! delivered, and the server serves the client again on a connection of its
//! own ([`run`]), its lane state replayed there.
//!
//! Ends: the client closing its sending side (EOF), QUIT, a client protocol
//! error and shutdown stop the request half and let the reply half deliver
//! what is pending (a client that stopped sending waits for nothing longer
//! than `upstream.request_timeout`); a client connection error ends
//! everything at once; losing Redis or the lane, Redis not answering within
//! `upstream.request_timeout`, or a reply that contradicts its request
//! answers every pending request with an error and closes the client (and
//! poisons its lane).
//!
//! Deadlines: a request must arrive whole within `limits.request_read_timeout`;
//! an optional `listen.idle_timeout` closes quiet clients. Memory: both halves
//! account their buffers in [`memory::BufferBudget`]; past
//! `limits.max_buffered_bytes` they stop taking in more until it falls.
//!
//! Parking: a client that has only used commands that leave nothing on the
//! upstream connection ([`Leaves::Nothing`]), and that has been quiet for
//! `upstream.release_idle_after` with every request answered, gives its
//! upstream connection (or lane) back: the session ends with the client
//! *parked*, and the server starts a new session, on a lane, when the
//! client sends again. What the proxy remembers of the client (its login,
//! lane state, bytes read while parked) lives in [`Client`] and carries over.
//!
//! Counting: every request's entry carries a [`Tally`] (command, when it was
//! read). The request half logs when each batch left for Redis
//! ([`FlushLog`]); the reply half takes answered entries from [`Replies`]
//! and, once their replies are written, records outcome, duration and the
//! time Redis took. Refusals, failed logins and values that fail to open are
//! also security events.

pub mod memory;
pub mod open;
mod peer;
pub mod pipeline;
pub mod pubsub;
mod quiet;
mod replies;
mod requests;
pub mod seal;
mod tally;

use crate::auth::lockout::Lockouts;
use crate::policy::table::Leaves;
use crate::policy::{Policy, RequestState};
use crate::resp::{self, Limits};
use crate::telemetry::metrics::Metrics;
use crate::upstream::lane::LaneLink;
use crate::upstream::lane::book::Poison;
use bytes::{Bytes, BytesMut};
pub use peer::{Peer, lockout_error};
use replies::{ReplyHalf, ReplySource, UpstreamEnd};
use requests::{Direct, RequestSink, Requests, RequestsEnd};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally::FlushLog;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const READ_CHUNK: usize = 16 * 1024;
/// What a buffer reserves for a read after one that did not fill it: an
/// idle client holds little, a busy one grows to [`READ_CHUNK`].
const SMALL_READ: usize = 2 * 1024;

/// Room to reserve for the next read into `buf`, given how much the last
/// read brought.
fn next_read(last_read: usize) -> usize {
    if last_read >= SMALL_READ {
        READ_CHUNK
    } else {
        SMALL_READ
    }
}
/// Reply buffers larger than this are freed once empty, not kept.
pub(crate) const KEPT_BUFFER: usize = 1024 * 1024;
/// What a parked client's first read may bring.
const PARKED_READ: usize = 512;
const OK: Bytes = Bytes::from_static(b"+OK\r\n");

/// What every session of a server shares.
pub struct SessionContext {
    pub policy: Policy,
    pub limits: Limits,
    /// `limits` for clients that have not logged in (Redis 7's caps).
    pub unauthenticated_limits: Limits,
    /// Limits for replies: values come back sealed, larger by the envelope.
    pub reply_limits: Limits,
    pub max_pending_requests: usize,
    pub client_write_timeout: Duration,
    /// How long Redis may take to answer a request (beyond what a blocking
    /// command asks to wait) before the connection is given up.
    pub request_timeout: Duration,
    /// A request must arrive whole within this of its first byte.
    pub request_read_timeout: Duration,
    /// Bytes all sessions' buffers may hold before reading requests pauses.
    pub buffers: Arc<memory::BufferBudget>,
    /// Close clients quiet this long with nothing pending (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Logs the upstream connection in again after RESET, with the login
    /// as of then (a reload may change it).
    pub upstream: Arc<crate::upstream::Upstream>,
    pub metrics: Arc<Metrics>,
    /// Failed client logins by peer; `None` when clients need no password.
    pub lockouts: Option<Arc<Mutex<Lockouts>>>,
    /// Security events may name keys.
    pub log_key_names: bool,
    /// How long a client on a clean connection stays quiet before it is
    /// parked; `None`: never.
    pub release_idle_after: Option<Duration>,
}

/// A client connection and what the proxy remembers of it between sessions.
pub struct Client<C> {
    stream: C,
    state: RequestState,
    /// Read but not yet parsed (what a parked client sent).
    input: BytesMut,
}

impl<C: AsyncRead + AsyncWrite + Unpin> Client<C> {
    pub fn new(ctx: &SessionContext, stream: C) -> Self {
        Client {
            stream,
            state: ctx.policy.new_connection(),
            input: BytesMut::new(),
        }
    }

    /// A parked client: waits until it sends something (`Ok(true)`) or
    /// closes (`Ok(false)`).
    pub async fn wait_for_request(&mut self) -> io::Result<bool> {
        self.input.reserve(PARKED_READ);
        Ok(self.stream.read_buf(&mut self.input).await? > 0)
    }

    pub fn stream(&mut self) -> &mut C {
        &mut self.stream
    }

    /// What redcloak keeps of the client's connection state while it is on
    /// lanes (replayed when it moves to a connection of its own).
    pub fn local_state(&self) -> &crate::policy::local::LocalState {
        &self.state.local
    }
}

/// How a session ended, and what of it can be used again.
pub struct SessionEnd<C, U> {
    pub result: Result<(), SessionError>,
    /// The upstream connection, when every request sent has been answered
    /// and no reply byte is left half-read, with what the client left on it.
    pub upstream: Option<(U, Leaves)>,
    /// The client, when it is to be served again, and when.
    pub client: Option<(Client<C>, Next)>,
}

/// When a client whose session ended is served again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Parked: when it sends again.
    Park,
    /// At once, on a connection of its own: it sent a request that needs
    /// one (read again first, from the client's input).
    Pin,
}

/// Why a session ended early. The side that failed is in the variant.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client connection failed: {0}")]
    Client(io::Error),
    #[error("client did not read its replies within limits.client_write_timeout")]
    ClientTooSlow,
    #[error("upstream connection failed: {0}")]
    Upstream(io::Error),
    #[error("upstream connection closed by Redis")]
    UpstreamClosed,
    /// A reply that contradicts its request.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    /// A reply that breaks RESP or the reply limits.
    #[error("upstream protocol error: {0}")]
    UpstreamFraming(String),
    #[error("Redis did not answer within upstream.request_timeout ({0:?})")]
    UpstreamTimeout(Duration),
    /// The client's lane was lost with its requests on it.
    #[error("upstream connection lost")]
    UpstreamLost,
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// Sentinel named another primary: this connection's Redis is the old one.
    #[error("Sentinel named another primary; reconnect")]
    PrimaryChanged,
    /// The primary key was revoked between planning a write and sealing
    /// it (the plan refuses writes once it is): the connection closes
    /// rather than leave a transaction short of a command.
    #[error("the connection closed: {0}")]
    CannotSeal(#[from] crate::crypto::keyring::PrimaryRevoked),
}

/// What the two halves of a session share besides the FIFO.
#[derive(Default)]
struct Shared {
    /// When each batch of requests left for Redis (timings and deadlines).
    flushes: FlushLog,
    /// Set by the reply half while it waits with no request pending.
    replies_quiet: AtomicBool,
    /// Redis is gone: the reply half answers what is pending with errors.
    upstream_failed: CancellationToken,
    /// The client left or was parked: nothing more is written to it.
    client_gone: CancellationToken,
    /// The client will send no more: deliver what is pending, then close.
    client_done: CancellationToken,
    /// Set before `client_done` when the client moves to another connection
    /// once what is pending is delivered: it is not closed.
    client_moving: AtomicBool,
}

/// Serves one client on its own upstream connection until it leaves,
/// Redis leaves, shutdown drains it, or it is parked.
pub async fn run<C, U>(
    ctx: &SessionContext,
    client: Client<C>,
    upstream: U,
    peer: &Peer,
    shutdown: &CancellationToken,
) -> SessionEnd<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut upstream_reader, mut upstream_writer) = tokio::io::split(upstream);
    let mut sink = Direct(&mut upstream_writer);
    let (served, client) =
        serve(ctx, client, &mut upstream_reader, &mut sink, peer, shutdown).await;
    let upstream = served
        .upstream_idle
        .then(|| (upstream_reader.unsplit(upstream_writer), served.leaves));
    SessionEnd {
        result: served.result,
        upstream,
        client,
    }
}

/// Serves one client on a lane until it leaves, its lane is lost, shutdown
/// drains it, it is parked, or it needs a connection of its own (pinned).
pub async fn run_on_lane<C>(
    ctx: &SessionContext,
    client: Client<C>,
    lane: LaneLink,
    peer: &Peer,
    shutdown: &CancellationToken,
) -> SessionEnd<C, ()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let LaneLink {
        mut requests,
        mut replies,
    } = lane;
    let (served, client) = serve(ctx, client, &mut replies, &mut requests, peer, shutdown).await;
    // A reply that contradicts its request: the lane is out of step for
    // every client on it. (A lane whose Redis stops answering is poisoned
    // by its own reader.)
    if let Err(SessionError::UpstreamProtocol(_)) = &served.result {
        requests.poison(Poison::Contradiction);
    }
    SessionEnd {
        result: served.result,
        upstream: None,
        client,
    }
}

/// How the two halves ended.
struct Served {
    result: Result<(), SessionError>,
    /// Every request sent was answered and nothing more was read.
    upstream_idle: bool,
    leaves: Leaves,
}

/// Runs the request half and the reply half of one session.
async fn serve<C, R, W>(
    ctx: &SessionContext,
    client: Client<C>,
    upstream_reader: &mut R,
    upstream_writer: &mut W,
    peer: &Peer,
    shutdown: &CancellationToken,
) -> (Served, Option<(Client<C>, Next)>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    R: ReplySource,
    W: RequestSink,
{
    let Client {
        stream,
        mut state,
        mut input,
    } = client;
    let (mut client_reader, mut client_writer) = tokio::io::split(stream);
    let mut leaves = Leaves::Nothing;
    let (result, upstream_idle, next) = {
        let (fifo_in, fifo_out) = mpsc::channel(ctx.max_pending_requests);
        let shared = Shared::default();
        let protocol = state.local.protocol();
        let requests = Requests {
            ctx,
            peer,
            upstream: upstream_writer,
            fifo: fifo_in,
            output: BytesMut::new(),
            unsent: Vec::new(),
            shared: &shared,
            leaves: &mut leaves,
            output_holds_password: false,
            output_bulky: false,
            subscribed: false,
        };
        let requests = requests.forward(&mut client_reader, &mut input, &mut state, shutdown);
        let replies = ReplyHalf {
            ctx,
            peer,
            upstream: upstream_reader,
            client: &mut client_writer,
            fifo: fifo_out,
            shared: &shared,
            on_lane: W::SHARED,
            protocol,
        }
        .deliver();
        let (client_gone, client_done, upstream_failed) = (
            &shared.client_gone,
            &shared.client_done,
            &shared.upstream_failed,
        );
        tokio::pin!(requests, replies);
        tokio::select! {
            end = &mut requests => match end {
                Ok(RequestsEnd::Park) => {
                    // Nothing more to deliver: the reply half only says
                    // whether the upstream connection is idle.
                    client_gone.cancel();
                    let idle = matches!(replies.await, Ok(UpstreamEnd::Idle));
                    (Ok(()), idle, Some(Next::Park))
                }
                Ok(end @ (RequestsEnd::Drain | RequestsEnd::Pin)) => {
                    let pin = end == RequestsEnd::Pin;
                    shared.client_moving.store(pin, Ordering::Relaxed);
                    client_done.cancel();
                    match replies.await {
                        Ok(idle) => (Ok(()), idle == UpstreamEnd::Idle, pin.then_some(Next::Pin)),
                        Err(err) => (Err(err), false, None),
                    }
                }
                Err(SessionError::Client(err)) => (Err(SessionError::Client(err)), false, None),
                Err(err) => {
                    // Redis is gone: the reply half answers what is pending with errors.
                    upstream_failed.cancel();
                    let _ = replies.await;
                    (Err(err), false, None)
                }
            },
            end = &mut replies => (end.map(|_| ()), false, None),
        }
    };
    if state.holds_transaction() {
        leaves = leaves.max(Leaves::Session);
    }
    let client = next.map(|next| {
        let client = Client {
            stream: client_reader.unsplit(client_writer),
            state,
            input,
        };
        (client, next)
    });
    let served = Served {
        result,
        upstream_idle,
        leaves,
    };
    (served, client)
}

/// A coarse clock for a deadline of `timeout`: it ticks a few times per
/// timeout (at most once a second) and the caller checks the deadline when
/// it does. Nothing is re-armed per request or per read, and it only runs
/// while its branch is enabled (something pending).
pub(crate) fn watchdog(timeout: Duration) -> tokio::time::Interval {
    let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    interval
}

fn error_reply(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 3);
    resp::encode_error(&mut out, text);
    out.freeze()
}
