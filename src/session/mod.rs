//! One client connection and its own upstream connection, 1:1 while the
//! client stays (the connection may come from, and go back to, the pool).
//!
//! ```text
//!   client ──read──▶ RequestParser ─▶ Policy::classify ─▶ upstream (re-encoded)
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
//! Ends: the client closing ends everything at once; QUIT, a client protocol
//! error and shutdown stop the request half and let the reply half deliver
//! what is pending; losing Redis answers every pending request with an error
//! and closes the client.
//!
//! Counting: every request's entry carries a [`Tally`] (command, when it was
//! read). The request half logs when each batch left for Redis
//! ([`FlushLog`]); the reply half takes answered entries from [`Replies`]
//! and, once their replies are written, records outcome, duration and the
//! time Redis took. Refusals, failed logins and values that fail to open are
//! also security events.

pub mod open;
mod peer;
pub mod pipeline;
mod tally;

use crate::auth::lockout::Lockouts;
use crate::events;
use crate::metrics::{Metrics, Outcome};
use crate::policy::table;
use crate::policy::{self, Action, Policy, ReplyPlan};
use crate::resp::{self, Limits, ReplyScanner, Request, RequestParser};
use crate::upstream::Login;
use bytes::{Bytes, BytesMut};
pub use peer::{Peer, lockout_error};
use pipeline::{Entry, Flow, Replies, Tally};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally::{Answered, FlushLog};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

const READ_CHUNK: usize = 16 * 1024;
const OK: Bytes = Bytes::from_static(b"+OK\r\n");

/// What every session of a server shares.
pub struct SessionContext {
    pub policy: Policy,
    pub limits: Limits,
    /// Limits for replies: values come back sealed, larger by the envelope.
    pub reply_limits: Limits,
    pub max_pending_requests: usize,
    pub client_write_timeout: Duration,
    /// Used to log the upstream connection in again after RESET.
    pub upstream_login: Arc<Login>,
    pub metrics: Arc<Metrics>,
    /// Failed client logins by peer; `None` when clients need no password.
    pub lockouts: Option<Arc<Mutex<Lockouts>>>,
    /// Security events may name keys.
    pub log_key_names: bool,
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
}

enum RequestsEnd {
    ClientClosed,
    /// QUIT, a protocol error or shutdown: deliver what is pending, then close.
    Drain,
}

/// Serves one client until it leaves, Redis leaves, or shutdown drains it.
/// Returns how it ended and, when every request sent upstream has been
/// answered and no reply byte is left half-read, the upstream connection,
/// fit to be reset and serve another client.
pub async fn run<C, U>(
    ctx: &SessionContext,
    client: C,
    upstream: U,
    peer: &Peer,
    shutdown: &CancellationToken,
) -> (Result<(), SessionError>, Option<U>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_reader, client_writer) = tokio::io::split(client);
    let (mut upstream_reader, mut upstream_writer) = tokio::io::split(upstream);
    let (result, upstream_idle) = {
        let (fifo_in, fifo_out) = mpsc::channel(ctx.max_pending_requests);
        let upstream_failed = CancellationToken::new();
        let client_gone = CancellationToken::new();
        let flushes = FlushLog::default();
        let requests = Requests {
            ctx,
            peer,
            upstream: &mut upstream_writer,
            fifo: fifo_in,
            output: BytesMut::with_capacity(READ_CHUNK),
            unsent_replies: 0,
            flushes: &flushes,
        };
        let requests = requests.forward(client_reader, shutdown);
        let replies = deliver_replies(
            ctx,
            peer,
            &mut upstream_reader,
            client_writer,
            fifo_out,
            &flushes,
            [&upstream_failed, &client_gone],
        );
        tokio::pin!(requests, replies);
        tokio::select! {
            end = &mut requests => match end {
                Ok(RequestsEnd::ClientClosed) => {
                    // Nothing more to deliver: the reply half only says
                    // whether the upstream connection is idle.
                    client_gone.cancel();
                    let idle = matches!(replies.await, Ok(UpstreamEnd::Idle));
                    (Ok(()), idle)
                }
                Ok(RequestsEnd::Drain) => match replies.await {
                    Ok(end) => (Ok(()), end == UpstreamEnd::Idle),
                    Err(err) => (Err(err), false),
                },
                Err(SessionError::Client(err)) => (Err(SessionError::Client(err)), false),
                Err(err) => {
                    // Redis is gone: the reply half answers what is pending with errors.
                    upstream_failed.cancel();
                    let _ = replies.await;
                    (Err(err), false)
                }
            },
            end = &mut replies => (end.map(|_| ()), false),
        }
    };
    let reusable = upstream_idle.then(|| upstream_reader.unsplit(upstream_writer));
    (result, reusable)
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
    /// Replies the requests in `output` will get.
    unsent_replies: usize,
    flushes: &'a FlushLog,
}

impl<W: AsyncWrite + Unpin> Requests<'_, W> {
    async fn forward<R: AsyncRead + Unpin>(
        mut self,
        mut client: R,
        shutdown: &CancellationToken,
    ) -> Result<RequestsEnd, SessionError> {
        let ctx = self.ctx;
        let mut input = BytesMut::with_capacity(READ_CHUNK);
        let mut parser = RequestParser::default();
        let mut state = ctx.policy.new_connection();
        loop {
            input.reserve(READ_CHUNK);
            let read = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(RequestsEnd::Drain),
                read = client.read_buf(&mut input) => read.map_err(SessionError::Client)?,
            };
            if read == 0 {
                return Ok(RequestsEnd::ClientClosed);
            }
            ctx.metrics.client_received.increment(read as u64);
            let received = Instant::now();
            loop {
                let request = match parser.next(&mut input, &ctx.limits) {
                    Ok(Some(request)) => request,
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
                let action = ctx.policy.classify_as(row, &request, &mut state);
                if self.act(action, &request, tally).await? == Flow::Close {
                    self.flush().await?;
                    return Ok(RequestsEnd::Drain);
                }
            }
            self.flush().await?;
        }
    }

    /// How long a login attempt from a locked-out peer must wait, if it must.
    fn lockout_refusal(&self, request: &Request) -> Option<Duration> {
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
    ) -> Result<Flow, SessionError> {
        // An entry always enters the FIFO before its command is encoded:
        // `enqueue` may flush `output`, and a reply must never arrive
        // before the entry it answers.
        match action {
            Action::Forward(plan) => {
                self.enqueue(Entry::Await(plan, Some(tally))).await?;
                self.encode(&request.args);
            }
            Action::Rewrite(args, plan) => {
                self.enqueue(Entry::Await(plan, Some(tally))).await?;
                self.encode(&args);
            }
            Action::Reset => {
                self.enqueue(Entry::Await(ReplyPlan::Reset, Some(tally)))
                    .await?;
                self.encode(&[b"RESET"]);
                self.enqueue(Entry::Await(ReplyPlan::RestoreLogin, None))
                    .await?;
                self.ctx.upstream_login.encode_auth(&mut self.output);
                self.unsent_replies += 1;
            }
            Action::AnswerOk => self.answer(OK, false, Some((tally, Outcome::Ok))).await?,
            Action::Quit => {
                self.answer(OK, true, Some((tally, Outcome::Ok))).await?;
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

    fn encode<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        resp::encode_command(&mut self.output, args);
        self.unsent_replies += 1;
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
        self.upstream
            .write_all(&self.output)
            .await
            .map_err(SessionError::Upstream)?;
        self.upstream
            .flush()
            .await
            .map_err(SessionError::Upstream)?;
        self.flushes.sent(self.unsent_replies, Instant::now());
        self.ctx
            .metrics
            .upstream_sent
            .increment(self.output.len() as u64);
        self.unsent_replies = 0;
        self.output.clear();
        Ok(())
    }
}

/// Upstream bytes -> replies matched to FIFO entries -> client bytes.
/// `stop`: Redis failed (answer what is pending with errors), and the client
/// left (just say whether the upstream connection is idle).
async fn deliver_replies<R, W>(
    ctx: &SessionContext,
    peer: &Peer,
    upstream: &mut R,
    mut client: W,
    mut fifo: mpsc::Receiver<Entry>,
    flushes: &FlushLog,
    [upstream_failed, client_gone]: [&CancellationToken; 2],
) -> Result<UpstreamEnd, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    let mut scanner = ReplyScanner::default();
    let mut replies = Replies::new(ctx.policy.keyring().clone(), ctx.reply_limits.clone());
    let mut answered = Answered::default();
    let mut requests_done = false;
    loop {
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
                return fail_pending(ctx, &mut client, &mut fifo, &mut output, &replies, err).await;
            }
        };
        answered.take(&mut replies, flushes);
        write_client(ctx, &mut client, &mut output).await?;
        answered.record(ctx, peer);
        if flow == Flow::Close || (requests_done && replies.needs_entry()) {
            let _ = client.shutdown().await;
            return Ok(upstream_end(&input, &replies, flushes));
        }
        input.reserve(READ_CHUNK);
        let lost = tokio::select! {
            entry = fifo.recv(), if replies.needs_entry() => {
                match entry {
                    Some(entry) => {
                        if replies.accept(entry, &mut output) == Flow::Close {
                            answered.take(&mut replies, flushes);
                            write_client(ctx, &mut client, &mut output).await?;
                            answered.record(ctx, peer);
                            let _ = client.shutdown().await;
                            return Ok(upstream_end(&input, &replies, flushes));
                        }
                    }
                    None => requests_done = true,
                }
                None
            }
            read = upstream.read_buf(&mut input) => match read {
                Ok(0) => Some(SessionError::UpstreamClosed),
                Ok(read) => {
                    ctx.metrics.upstream_received.increment(read as u64);
                    None
                }
                Err(err) => Some(SessionError::Upstream(err)),
            },
            _ = upstream_failed.cancelled() => Some(SessionError::UpstreamClosed),
            _ = client_gone.cancelled() => return Ok(upstream_end(&input, &replies, flushes)),
        };
        if let Some(err) = lost {
            return fail_pending(ctx, &mut client, &mut fifo, &mut output, &replies, err).await;
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
        let protocol_error = |err: String| SessionError::UpstreamProtocol(err);
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

fn error_reply(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 3);
    resp::encode_error(&mut out, text);
    out.freeze()
}
