//! One client connection and its own upstream connection, 1:1 while the
//! client stays (the connection may come from, and go back to, the pool).
//!
//! ```text
//!   client ──read──▶ RequestParser ─▶ Policy::classify ─▶ seal ─▶ upstream (re-encoded)
//!                                          │ Entry (plan or answer)
//!                                          ▼
//!                               FIFO (bounded: limits.max_pending_requests)
//!                                          │
//!   client ◀─write── Replies (pipeline.rs) ◀── ReplyScanner ◀──read── upstream
//! ```
//!
//! Both halves run in the connection's task. The FIFO is their only link for
//! requests (the flush log below only carries timings), and its capacity is
//! the pending-request limit: when it is full the request
//! half stops reading the client, and while the client does not read its
//! replies the reply half stops reading Redis, so memory per connection stays
//! bounded whatever the client does. Writes go out once per batch of frames.
//!
//! Ends: the client closing its sending side (EOF), QUIT, a client protocol
//! error and shutdown stop the request half and let the reply half deliver
//! what is pending (a client that stopped sending waits for nothing longer
//! than `upstream.request_timeout`); a client connection error ends
//! everything at once; losing Redis, Redis not answering within
//! `upstream.request_timeout`, or a reply that contradicts its request
//! answers every pending request with an error and closes the client.
//!
//! Deadlines: a request must arrive whole within `limits.request_read_timeout`;
//! an optional `listen.idle_timeout` closes quiet clients. Memory: both halves
//! account their buffers in [`memory::BufferBudget`]; past
//! `limits.max_buffered_bytes` they stop taking in more until it falls.
//!
//! Parking: a client that has only used commands that leave nothing on the
//! upstream connection ([`Leaves::Nothing`]), and that has been quiet for
//! `upstream.release_idle_after` with every request answered, gives its
//! upstream connection back: the session ends with the client *parked*, and
//! the server starts a new session, on a connection from the pool, when the
//! client sends again. What the proxy remembers of the client (its login,
//! bytes read while parked) lives in [`Client`] and carries over.
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
pub mod seal;
mod tally;

use crate::auth::lockout::Lockouts;
use crate::events;
use crate::metrics::{Metrics, Outcome};
use crate::policy::table::{self, Blocks, Leaves};
use crate::policy::{self, Action, Policy, ReplyPlan, RequestState};
use crate::resp::{self, Limits, ReplyScanner, Request, RequestParser};
use crate::upstream::Login;
use bytes::{Bytes, BytesMut};
pub use peer::{Peer, lockout_error};
use pipeline::{Entry, Flow, Replies, Tally};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally::{Answered, FlushLog};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

const READ_CHUNK: usize = 16 * 1024;
/// Reply buffers larger than this are freed once empty, not kept.
const KEPT_BUFFER: usize = 1024 * 1024;
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
    pub buffers: memory::BufferBudget,
    /// Close clients quiet this long with nothing pending (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Used to log the upstream connection in again after RESET.
    pub upstream_login: Arc<Login>,
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
}

/// How a session ended, and what of it can be used again.
pub struct SessionEnd<C, U> {
    pub result: Result<(), SessionError>,
    /// The upstream connection, when every request sent has been answered
    /// and no reply byte is left half-read, with what the client left on it.
    pub upstream: Option<(U, Leaves)>,
    /// The client, when it was parked: serve it again when it sends.
    pub parked: Option<Client<C>>,
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
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    #[error("Redis did not answer within upstream.request_timeout ({0:?})")]
    UpstreamTimeout(Duration),
}

enum RequestsEnd {
    /// QUIT, a protocol error or shutdown: deliver what is pending, then close.
    Drain,
    /// Quiet on a clean connection with nothing pending.
    Park,
}

/// Serves one client until it leaves, Redis leaves, shutdown drains it, or
/// it is parked.
pub async fn run<C, U>(
    ctx: &SessionContext,
    client: Client<C>,
    upstream: U,
    peer: &Peer,
    shutdown: &CancellationToken,
) -> SessionEnd<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let Client {
        stream,
        mut state,
        mut input,
    } = client;
    let (mut client_reader, mut client_writer) = tokio::io::split(stream);
    let (mut upstream_reader, mut upstream_writer) = tokio::io::split(upstream);
    let mut leaves = Leaves::Nothing;
    let (result, upstream_idle, park) = {
        let (fifo_in, fifo_out) = mpsc::channel(ctx.max_pending_requests);
        let upstream_failed = CancellationToken::new();
        let client_gone = CancellationToken::new();
        let client_done = CancellationToken::new();
        let flushes = FlushLog::default();
        let replies_quiet = AtomicBool::new(false);
        let requests = Requests {
            ctx,
            peer,
            upstream: &mut upstream_writer,
            fifo: fifo_in,
            output: BytesMut::with_capacity(READ_CHUNK),
            unsent: Vec::new(),
            flushes: &flushes,
            leaves: &mut leaves,
            replies_quiet: &replies_quiet,
            output_holds_password: false,
            subscribed: false,
        };
        let requests = requests.forward(&mut client_reader, &mut input, &mut state, shutdown);
        let replies = deliver_replies(
            ctx,
            peer,
            &mut upstream_reader,
            &mut client_writer,
            fifo_out,
            &flushes,
            &replies_quiet,
            [&upstream_failed, &client_gone, &client_done],
        );
        tokio::pin!(requests, replies);
        tokio::select! {
            end = &mut requests => match end {
                Ok(end @ RequestsEnd::Park) => {
                    // Nothing more to deliver: the reply half only says
                    // whether the upstream connection is idle.
                    client_gone.cancel();
                    let idle = matches!(replies.await, Ok(UpstreamEnd::Idle));
                    (Ok(()), idle, matches!(end, RequestsEnd::Park))
                }
                Ok(RequestsEnd::Drain) => {
                    client_done.cancel();
                    match replies.await {
                        Ok(end) => (Ok(()), end == UpstreamEnd::Idle, false),
                        Err(err) => (Err(err), false, false),
                    }
                }
                Err(SessionError::Client(err)) => (Err(SessionError::Client(err)), false, false),
                Err(err) => {
                    // Redis is gone: the reply half answers what is pending with errors.
                    upstream_failed.cancel();
                    let _ = replies.await;
                    (Err(err), false, false)
                }
            },
            end = &mut replies => (end.map(|_| ()), false, false),
        }
    };
    let upstream = upstream_idle.then(|| (upstream_reader.unsplit(upstream_writer), leaves));
    let parked = park.then(|| Client {
        stream: client_reader.unsplit(client_writer),
        state,
        input,
    });
    SessionEnd {
        result,
        upstream,
        parked,
    }
}

/// The state the reply half leaves the upstream connection in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamEnd {
    /// Every request sent has its whole reply read, and nothing more was read.
    Idle,
    Busy,
}

/// The request half: client bytes -> requests -> policy -> upstream bytes
/// and FIFO entries.
struct Requests<'a, W> {
    ctx: &'a SessionContext,
    peer: &'a Peer,
    upstream: &'a mut W,
    fifo: mpsc::Sender<Entry>,
    /// Requests encoded for Redis, not yet written.
    output: BytesMut,
    /// How long each request in `output` may block Redis, in order.
    unsent: Vec<Blocks>,
    flushes: &'a FlushLog,
    /// What the commands forwarded so far leave on the upstream connection.
    leaves: &'a mut Leaves,
    /// Set by the reply half while it waits with no request pending.
    replies_quiet: &'a AtomicBool,
    /// `output` holds redcloak's AUTH: wipe it once written.
    output_holds_password: bool,
    /// The client subscribed to something (idle subscribers are not closed).
    subscribed: bool,
}

impl<W: AsyncWrite + Unpin> Requests<'_, W> {
    async fn forward<R: AsyncRead + Unpin>(
        mut self,
        client: &mut R,
        input: &mut BytesMut,
        state: &mut RequestState,
        shutdown: &CancellationToken,
    ) -> Result<RequestsEnd, SessionError> {
        let ctx = self.ctx;
        let mut parser = RequestParser::default();
        // A parked client's first bytes are already in `input`.
        let mut read = input.len();
        let mut last_read = Instant::now();
        let park = tokio::time::sleep(ctx.release_idle_after.unwrap_or_default());
        let idle = tokio::time::sleep(ctx.idle_timeout.unwrap_or_default());
        // When the request in progress (bytes read, not yet whole) began.
        let mut partial_since: Option<Instant> = None;
        let mut unfinished = watchdog(ctx.request_read_timeout);
        // Made once: each `cancelled()` locks the token, shared by every
        // session, and registers a waiter.
        let shutdown = shutdown.cancelled();
        tokio::pin!(park, idle, shutdown);
        let mut held = ctx.buffers.account();
        loop {
            if read == 0 {
                held.set(input.capacity() + self.output.capacity());
                // Only between requests: a request half-read must finish.
                if ctx.buffers.over() && input.is_empty() {
                    // Replies keep flowing; new requests wait for memory.
                    tokio::select! {
                        _ = &mut shutdown => return Ok(RequestsEnd::Drain),
                        _ = ctx.buffers.wait_under() => {}
                    }
                }
                input.reserve(READ_CHUNK);
                let parkable = ctx.release_idle_after.is_some() && *self.leaves == Leaves::Nothing;
                // Like Redis's `timeout`: not for subscribers or blocked clients.
                let idles_out = ctx.idle_timeout.is_some() && !self.subscribed;
                read = tokio::select! {
                    biased;
                    _ = &mut shutdown => return Ok(RequestsEnd::Drain),
                    read = client.read_buf(input) => read.map_err(SessionError::Client)?,
                    _ = unfinished.tick(), if partial_since.is_some() => {
                        let started = partial_since.unwrap_or_else(Instant::now);
                        if started + ctx.request_read_timeout > Instant::now() {
                            continue;
                        }
                        let reply = error_reply(&format!(
                            "ERR redcloak: protocol error: a request was not completed within \
                             limits.request_read_timeout ({:?})",
                            ctx.request_read_timeout
                        ));
                        self.answer(reply, true, None).await?;
                        self.flush().await?;
                        return Ok(RequestsEnd::Drain);
                    }
                    _ = &mut idle, if idles_out => {
                        let timeout = ctx.idle_timeout.unwrap_or_default();
                        if self.quiet_for(idle.as_mut(), timeout, last_read, input) {
                            return Ok(RequestsEnd::Drain);
                        }
                        continue;
                    }
                    _ = &mut park, if parkable => {
                        let after = ctx.release_idle_after.unwrap_or_default();
                        if self.quiet_for(park.as_mut(), after, last_read, input) {
                            return Ok(RequestsEnd::Park);
                        }
                        continue;
                    }
                };
                if read == 0 {
                    // The client will send no more; it may still read (a
                    // half-close, as `printf ... | nc` does): every pending
                    // reply is delivered before the connection closes.
                    return Ok(RequestsEnd::Drain);
                }
            }
            ctx.metrics.client_received.increment(read as u64);
            read = 0;
            let received = Instant::now();
            last_read = received;
            let mut completed = false;
            loop {
                let limits = match state.is_authenticated() {
                    true => &ctx.limits,
                    false => &ctx.unauthenticated_limits,
                };
                let request = match parser.next(input, limits) {
                    Ok(Some(request)) => {
                        completed = true;
                        request
                    }
                    Ok(None) => break,
                    Err(err) => {
                        let reply = error_reply(&format!("ERR redcloak: protocol error: {err}"));
                        self.answer(reply, true, None).await?;
                        self.flush().await?;
                        return Ok(RequestsEnd::Drain);
                    }
                };
                let (command, row) = table::identify(request.name());
                let tally = Tally { command, received };
                if let Some(remaining) = self.lockout_refusal(&request) {
                    let reply = error_reply(&lockout_error(self.peer, remaining));
                    self.answer(reply, false, Some((tally, Outcome::Refused)))
                        .await?;
                    continue;
                }
                let action = ctx.policy.classify_as(row, &request, state);
                if action.forwards() {
                    *self.leaves = (*self.leaves).max(table::leaves(row));
                }
                let blocks = table::blocks(row, &request.args);
                if self.act(action, &request, tally, blocks).await? == Flow::Close {
                    self.flush().await?;
                    return Ok(RequestsEnd::Drain);
                }
            }
            // A request still incomplete must finish in time, counted from
            // the last one that completed (or its own first byte).
            partial_since = match (input.is_empty(), completed) {
                (true, _) => None,
                (false, true) => Some(received),
                (false, false) => partial_since.or(Some(received)),
            };
            self.flush().await?;
        }
    }

    /// When `timer` fired: whether the client has been quiet for `after`
    /// since `last_read` with nothing pending; if not, the timer is moved to
    /// the next moment that could be true. (Timers move only when they fire,
    /// not once per read.)
    fn quiet_for(
        &self,
        timer: std::pin::Pin<&mut tokio::time::Sleep>,
        after: Duration,
        last_read: Instant,
        input: &BytesMut,
    ) -> bool {
        let (quiet_since, now) = (last_read + after, Instant::now());
        if quiet_since <= now && self.nothing_pending(input) {
            return true;
        }
        let next = if quiet_since > now {
            quiet_since
        } else {
            now + after
        };
        timer.reset(next.into());
        false
    }

    /// Every request read has been answered and written to the client.
    fn nothing_pending(&self, input: &BytesMut) -> bool {
        input.is_empty()
            && self.output.is_empty()
            && self.fifo.capacity() == self.fifo.max_capacity()
            && self.replies_quiet.load(Ordering::Relaxed)
    }

    /// How long a login attempt from a locked-out peer must wait, if it must.
    fn lockout_refusal(&self, request: &Request) -> Option<crate::auth::lockout::Lockout> {
        self.ctx.lockouts.as_ref()?;
        if !policy::is_auth_attempt(request) {
            return None;
        }
        self.ctx.locked_out(self.peer)
    }

    /// Carries out one decision. `Close` after QUIT.
    async fn act(
        &mut self,
        action: Action,
        request: &Request,
        tally: Tally,
        blocks: Blocks,
    ) -> Result<Flow, SessionError> {
        // An entry always enters the FIFO before its command is encoded:
        // `enqueue` may flush `output`, and a reply must never arrive
        // before the entry it answers.
        match action {
            Action::Forward(plan) => {
                self.subscribed |= matches!(plan, ReplyPlan::Subscribe { .. });
                self.enqueue(Entry::Await(plan, Some(tally))).await?;
                self.encode(&request.args, blocks);
            }
            Action::Seal(values, plan) => {
                self.enqueue(Entry::Await(plan, Some(tally))).await?;
                let keyring = self.ctx.policy.keyring();
                let args = seal::arguments(keyring, &request.args, &values);
                self.encode(&args, blocks);
            }
            Action::Rewrite(args, plan) => {
                self.enqueue(Entry::Await(plan, Some(tally))).await?;
                self.encode(&args, blocks);
            }
            Action::Reset => {
                self.enqueue(Entry::Await(ReplyPlan::Reset, Some(tally)))
                    .await?;
                self.encode(&[b"RESET"], Blocks::No);
                self.enqueue(Entry::Await(ReplyPlan::RestoreLogin, None))
                    .await?;
                self.ctx.upstream_login.encode_auth(&mut self.output);
                self.unsent.push(Blocks::No);
                // Sent at once, so no later request grows (and copies) the buffer.
                self.output_holds_password = true;
                self.flush().await?;
            }
            Action::AnswerOk => self.answer(OK, false, Some((tally, Outcome::Ok))).await?,
            Action::Quit => {
                self.answer(OK, true, Some((tally, Outcome::Ok))).await?;
                return Ok(Flow::Close);
            }
            Action::CrossProtocol => {
                events::cross_protocol(self.peer);
                let outcome = Some((tally, Outcome::Refused));
                self.answer(Bytes::new(), true, outcome).await?;
                return Ok(Flow::Close);
            }
            Action::AnswerError(text) => {
                let outcome = Some((tally, Outcome::RedisError));
                self.answer(error_reply(&text), false, outcome).await?;
            }
            Action::Refuse(refusal) => {
                events::command_refused(self.peer, tally.command.name(), refusal.rule);
                let outcome = Some((tally, Outcome::Refused));
                self.answer(error_reply(&refusal.text), false, outcome)
                    .await?;
            }
            Action::AuthFailed(text) => {
                self.ctx.login_failed(self.peer);
                let outcome = Some((tally, Outcome::RedisError));
                self.answer(error_reply(text), false, outcome).await?;
            }
        }
        Ok(Flow::Continue)
    }

    fn encode<A: AsRef<[u8]>>(&mut self, args: &[A], blocks: Blocks) {
        resp::encode_command(&mut self.output, args);
        self.unsent.push(blocks);
    }

    async fn answer(
        &mut self,
        reply: Bytes,
        then_close: bool,
        tally: Option<(Tally, Outcome)>,
    ) -> Result<(), SessionError> {
        self.enqueue(Entry::Answer {
            reply,
            then_close,
            tally,
        })
        .await
    }

    /// Puts an entry in the FIFO. When it is full, the requests already
    /// encoded (all with their entries queued) are sent first: the reply half
    /// may be waiting for exactly those.
    async fn enqueue(&mut self, entry: Entry) -> Result<(), SessionError> {
        match self.fifo.try_send(entry) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(entry)) => {
                self.flush().await?;
                self.fifo
                    .send(entry)
                    .await
                    .map_err(|_| SessionError::UpstreamClosed)
            }
            Err(TrySendError::Closed(_)) => Err(SessionError::UpstreamClosed),
        }
    }

    /// Writes the encoded requests to Redis, and logs when they left.
    async fn flush(&mut self) -> Result<(), SessionError> {
        if self.output.is_empty() {
            return Ok(());
        }
        let written = self.upstream.write_all(&self.output).await;
        if std::mem::take(&mut self.output_holds_password) {
            zeroize::Zeroize::zeroize(&mut self.output[..]);
        }
        written.map_err(SessionError::Upstream)?;
        self.upstream
            .flush()
            .await
            .map_err(SessionError::Upstream)?;
        self.flushes.sent(&mut self.unsent, Instant::now());
        self.ctx
            .metrics
            .upstream_sent
            .increment(self.output.len() as u64);
        self.output.clear();
        Ok(())
    }
}

/// Upstream bytes -> replies matched to FIFO entries -> client bytes.
/// The tokens: Redis failed (answer what is pending with errors), the
/// client left (just say whether the upstream connection is idle), and the
/// client will send no more (deliver what is pending, but wait for nothing
/// longer than `request_timeout`).
#[allow(clippy::too_many_arguments)]
async fn deliver_replies<R, W>(
    ctx: &SessionContext,
    peer: &Peer,
    upstream: &mut R,
    client: &mut W,
    mut fifo: mpsc::Receiver<Entry>,
    flushes: &FlushLog,
    quiet: &AtomicBool,
    [upstream_failed, client_gone, client_done]: [&CancellationToken; 3],
) -> Result<UpstreamEnd, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    let mut held = ctx.buffers.account();
    let mut scanner = ReplyScanner::default();
    let mut replies = Replies::new(
        ctx.policy.keyring().clone(),
        ctx.policy.rules().clone(),
        ctx.reply_limits.clone(),
    );
    let mut answered = Answered::default();
    let mut requests_done = false;
    let failed = upstream_failed.cancelled();
    let gone = client_gone.cancelled();
    let done = client_done.cancelled();
    let mut overdue = watchdog(ctx.request_timeout);
    tokio::pin!(failed, gone, done);
    loop {
        quiet.store(false, Ordering::Relaxed);
        if client_gone.is_cancelled() {
            // Closed or parked: the client is not to be written to or shut.
            return Ok(upstream_end(&input, &replies, flushes));
        }
        let flow = match deliver_ready(
            ctx,
            &mut replies,
            &mut fifo,
            &mut scanner,
            &mut input,
            &mut output,
            &mut requests_done,
        ) {
            Ok(flow) => flow,
            Err(err) => {
                return fail_pending(ctx, client, &mut fifo, &mut output, &replies, err).await;
            }
        };
        answered.take(&mut replies, flushes);
        held.set(input.capacity() + output.capacity());
        write_client(ctx, client, &mut output).await?;
        answered.record(ctx, peer);
        if flow == Flow::Close || (requests_done && replies.needs_entry()) {
            let _ = client.shutdown().await;
            return Ok(upstream_end(&input, &replies, flushes));
        }
        // A large reply went out: give its buffer back rather than keep it
        // (pipelines of ordinary replies stay under this and reuse theirs).
        if input.is_empty() && input.capacity() > KEPT_BUFFER {
            input = BytesMut::new();
        }
        if output.capacity() > KEPT_BUFFER {
            output = BytesMut::new();
        }
        input.reserve(READ_CHUNK);
        held.set(input.capacity() + output.capacity());
        let over_budget = ctx.buffers.over();
        quiet.store(replies.needs_entry() && input.is_empty(), Ordering::Relaxed);
        // Once the client stopped sending, nothing may wait forever for it.
        let sending_done = requests_done || client_done.is_cancelled();
        let deadline = flushes.deadline(ctx.request_timeout, sending_done);
        let lost = tokio::select! {
            entry = fifo.recv(), if replies.needs_entry() => {
                match entry {
                    Some(entry) => {
                        if replies.accept(entry, &mut output) == Flow::Close {
                            answered.take(&mut replies, flushes);
                            write_client(ctx, client, &mut output).await?;
                            answered.record(ctx, peer);
                            let _ = client.shutdown().await;
                            return Ok(upstream_end(&input, &replies, flushes));
                        }
                    }
                    None => requests_done = true,
                }
                None
            }
            // Over limits.max_buffered_bytes nothing more is taken from Redis
            // until replies are delivered (or their slow readers cut).
            read = upstream.read_buf(&mut input), if !over_budget => match read {
                Ok(0) => Some(SessionError::UpstreamClosed),
                Ok(read) => {
                    ctx.metrics.upstream_received.increment(read as u64);
                    None
                }
                Err(err) => Some(SessionError::Upstream(err)),
            },
            _ = ctx.buffers.wait_under(), if over_budget => None,
            _ = &mut failed => Some(SessionError::UpstreamClosed),
            _ = &mut gone => return Ok(upstream_end(&input, &replies, flushes)),
            // Only wakes the loop, to bound what is pending.
            _ = &mut done, if !sending_done => None,
            _ = overdue.tick(), if deadline.is_some() => {
                match deadline {
                    Some(due) if due <= Instant::now() => {
                        ctx.metrics.upstream_request_timeouts.increment(1);
                        Some(SessionError::UpstreamTimeout(ctx.request_timeout))
                    }
                    _ => None,
                }
            }
        };
        if let Some(err) = lost {
            return fail_pending(ctx, client, &mut fifo, &mut output, &replies, err).await;
        }
    }
}

/// Idle when every request sent has been answered and nothing more was read.
fn upstream_end(input: &BytesMut, replies: &Replies, flushes: &FlushLog) -> UpstreamEnd {
    if input.is_empty() && replies.needs_entry() && flushes.is_empty() {
        UpstreamEnd::Idle
    } else {
        UpstreamEnd::Busy
    }
}

/// Delivers the answers at the front of the FIFO and every complete reply
/// already read.
fn deliver_ready(
    ctx: &SessionContext,
    replies: &mut Replies,
    fifo: &mut mpsc::Receiver<Entry>,
    scanner: &mut ReplyScanner,
    input: &mut BytesMut,
    output: &mut BytesMut,
    requests_done: &mut bool,
) -> Result<Flow, SessionError> {
    loop {
        while replies.needs_entry() {
            match fifo.try_recv() {
                Ok(entry) => {
                    if replies.accept(entry, output) == Flow::Close {
                        return Ok(Flow::Close);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    *requests_done = true;
                    break;
                }
            }
        }
        let protocol_error = |err: String| {
            ctx.metrics.upstream_protocol_errors.increment(1);
            SessionError::UpstreamProtocol(err)
        };
        let Some(len) = scanner
            .scan(input, &ctx.reply_limits)
            .map_err(|e| protocol_error(e.to_string()))?
        else {
            return Ok(Flow::Continue);
        };
        let frame = input.split_to(len).freeze();
        replies
            .on_reply(frame, output)
            .map_err(|e| protocol_error(e.to_string()))?;
    }
}

/// Redis is gone or out of step: every pending request gets an error, in
/// order, then the client connection closes.
async fn fail_pending<W: AsyncWrite + Unpin>(
    ctx: &SessionContext,
    client: &mut W,
    fifo: &mut mpsc::Receiver<Entry>,
    output: &mut BytesMut,
    replies: &Replies,
    err: SessionError,
) -> Result<UpstreamEnd, SessionError> {
    let failed = error_reply(&format!("ERR redcloak: {err}; closing the connection"));
    if !replies.needs_entry() {
        output.extend_from_slice(&failed);
    }
    fifo.close();
    while let Ok(entry) = fifo.try_recv() {
        match entry {
            Entry::Await(..) => output.extend_from_slice(&failed),
            Entry::Answer { reply, .. } => output.extend_from_slice(&reply),
        }
    }
    if write_client(ctx, client, output).await.is_ok() {
        let _ = client.shutdown().await;
    }
    Err(err)
}

async fn write_client<W: AsyncWrite + Unpin>(
    ctx: &SessionContext,
    client: &mut W,
    output: &mut BytesMut,
) -> Result<(), SessionError> {
    if output.is_empty() {
        return Ok(());
    }
    let write = async {
        client.write_all(output).await?;
        client.flush().await
    };
    match tokio::time::timeout(ctx.client_write_timeout, write).await {
        Ok(Ok(())) => {
            ctx.metrics.client_sent.increment(output.len() as u64);
            output.clear();
            Ok(())
        }
        Ok(Err(err)) => Err(SessionError::Client(err)),
        Err(_) => Err(SessionError::ClientTooSlow),
    }
}

/// A coarse clock for a deadline of `timeout`: it ticks a few times per
/// timeout (at most once a second) and the caller checks the deadline when
/// it does. Nothing is re-armed per request or per read, and it only runs
/// while its branch is enabled (something pending).
fn watchdog(timeout: Duration) -> tokio::time::Interval {
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
