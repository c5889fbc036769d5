//! The reply half of a session: upstream bytes -> replies matched to the
//! FIFO's entries (`pipeline::Replies`) -> client bytes. It reads Redis only
//! while the client keeps up and the buffer budget allows, bounds how long
//! Redis may take, and when Redis is lost answers every pending request with
//! an error.

use super::pipeline::{Entry, Flow, Replies};
use super::tally::{Answered, FlushLog};
use super::{KEPT_BUFFER, SessionContext, SessionError, Shared, error_reply, next_read, watchdog};
use crate::resp::ReplyScanner;
use crate::session::Peer;
use crate::upstream::lane::LaneReplies;
use crate::upstream::lane::book::Poison;
use bytes::BytesMut;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The state the reply half leaves the upstream connection in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpstreamEnd {
    /// Every request sent has its whole reply read, and nothing more was read.
    Idle,
    Busy,
}

/// Where the reply half reads Redis's replies: its own connection or a lane.
pub(super) trait ReplySource: AsyncRead + Unpin {
    /// A value read from here failed to open under the key its request
    /// named. A lane is poisoned for it (see [`LaneReplies::distrust`]); a
    /// connection of the client's own carries only its own replies.
    fn value_mismatched(&self) {}
}

impl<U: AsyncRead + Unpin> ReplySource for tokio::io::ReadHalf<U> {}

impl ReplySource for LaneReplies {
    fn value_mismatched(&self) {
        self.distrust(Poison::ValueMismatch);
    }
}

/// The reply half of one session: what it reads from, writes to and shares.
pub(super) struct ReplyHalf<'a, R, W> {
    pub(super) ctx: &'a SessionContext,
    pub(super) peer: &'a Peer,
    pub(super) upstream: &'a mut R,
    pub(super) client: &'a mut W,
    pub(super) fifo: mpsc::Receiver<Entry>,
    pub(super) shared: &'a Shared,
    /// Reading a lane's frames (counted in the budget already).
    pub(super) on_lane: bool,
    /// The protocol the client speaks when the session starts.
    pub(super) protocol: u8,
}

impl<R, W> ReplyHalf<'_, R, W>
where
    R: ReplySource,
    W: AsyncWrite + Unpin,
{
    /// Upstream bytes -> replies matched to FIFO entries -> client bytes.
    /// The shared tokens: Redis failed (answer what is pending with errors), the
    /// client left (just say whether the upstream connection is idle), and the
    /// client will send no more (deliver what is pending, but wait for nothing
    /// longer than `request_timeout`).
    pub(super) async fn deliver(self) -> Result<UpstreamEnd, SessionError> {
        let ReplyHalf {
            ctx,
            peer,
            upstream,
            client,
            mut fifo,
            shared,
            on_lane,
            protocol,
        } = self;
        let Shared {
            flushes,
            replies_quiet: quiet,
            upstream_failed,
            client_gone,
            client_done,
            client_moving: moving,
        } = shared;
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        let mut last_read = 0;
        let mut held = ctx.buffers.account();
        let mut scanner = ReplyScanner::default();
        let mut replies = Replies::new(
            ctx.policy.keyring().clone(),
            ctx.policy.rules().clone(),
            ctx.reply_limits.clone(),
        )
        .speaking(protocol);
        let mut answered = Answered::default();
        let mut requests_done = false;
        let failed = upstream_failed.cancelled();
        let gone = client_gone.cancelled();
        let done = client_done.cancelled();
        let mut overdue = watchdog(ctx.request_timeout);
        // Sentinel naming another primary ends a session on a connection of
        // its own (a lane's clients hear it from their lane).
        let mut switches = ctx.upstream.switches();
        tokio::pin!(failed, gone, done);
        loop {
            quiet.store(false, Ordering::Relaxed);
            if client_gone.is_cancelled() {
                // Closed or parked: the client is not to be written to or shut.
                return Ok(upstream_end(&input, &replies, flushes));
            }
            let ready = deliver_ready(
                ctx,
                &mut replies,
                &mut fifo,
                &mut scanner,
                &mut input,
                &mut output,
                &mut requests_done,
            );
            let flow = match ready {
                Ok(Ready::Flow(flow)) => flow,
                Ok(Ready::Heavy(frame)) => {
                    // Opening it takes long: on the blocking pool, so this
                    // thread's other sessions and lanes go on meanwhile.
                    let opened = open_heavy(replies, frame, std::mem::take(&mut output)).await;
                    let result;
                    (replies, output, result) = opened;
                    if let Err(err) = result {
                        ctx.metrics.upstream_protocol_errors.increment(1);
                        return fail_pending(ctx, client, &mut fifo, &mut output, &replies, err)
                            .await;
                    }
                    // More may be read already: deliver it (and this) first.
                    continue;
                }
                Err(err) => {
                    return fail_pending(ctx, client, &mut fifo, &mut output, &replies, err).await;
                }
            };
            answered.take(&mut replies, flushes);
            if on_lane && answered.value_mismatched() {
                // Its error reply goes out; the lane's clients with requests
                // in flight (this one too, if it has more) hear it is lost.
                upstream.value_mismatched();
            }
            held.set(input.capacity() + output.capacity());
            write_client(ctx, client, &mut output).await?;
            answered.record(ctx, peer);
            if flow == Flow::Close || (requests_done && replies.needs_entry()) {
                // A client moving to another connection stays open.
                if flow == Flow::Close || !moving.load(Ordering::Relaxed) {
                    let _ = client.shutdown().await;
                }
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
            input.reserve(next_read(last_read));
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
                // A lane's frames are counted already: taking them frees nothing
                // and holds nothing more, so they are always taken.
                read = upstream.read_buf(&mut input), if !over_budget || on_lane => match read {
                    Ok(0) => Some(SessionError::UpstreamClosed),
                    Ok(read) => {
                        ctx.metrics.upstream_received.increment(read as u64);
                        last_read = read;
                        None
                    }
                    Err(err) if crate::upstream::lane::is_lost(&err) => {
                        Some(SessionError::UpstreamLost)
                    }
                    Err(err) => Some(SessionError::Upstream(err)),
                },
                _ = ctx.buffers.wait_under(), if over_budget && !on_lane => None,
                _ = &mut failed => Some(SessionError::UpstreamClosed),
                Ok(()) = switches.changed(), if !on_lane => Some(SessionError::PrimaryChanged),
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
}

/// Idle when every request sent has been answered and nothing more was read.
fn upstream_end(input: &BytesMut, replies: &Replies, flushes: &FlushLog) -> UpstreamEnd {
    if input.is_empty() && replies.needs_entry() && flushes.is_empty() {
        UpstreamEnd::Idle
    } else {
        UpstreamEnd::Busy
    }
}

/// Reply frames at least this large are opened on the blocking pool: an
/// HGETALL of 20,000 sealed fields takes ~10 ms of CPU to open, which would
/// hold up every other session on the thread (and the lanes' tasks) for as
/// long.
const HEAVY_FRAME: usize = 256 * 1024;

/// What [`deliver_ready`] stopped at.
enum Ready {
    /// Nothing more to deliver until more is read (or `Close`).
    Flow(Flow),
    /// A frame at least [`HEAVY_FRAME`] long, matched to its request, to be
    /// opened by [`open_heavy`].
    Heavy(bytes::Bytes),
}

/// Opens one heavy frame on the blocking pool (or right here, where the
/// runtime has none to spare).
async fn open_heavy(
    mut replies: Replies,
    frame: bytes::Bytes,
    mut output: BytesMut,
) -> (Replies, BytesMut, Result<(), SessionError>) {
    let open = move || {
        let result = replies
            .on_reply(frame, &mut output)
            .map_err(|e| SessionError::UpstreamProtocol(e.to_string()));
        (replies, output, result)
    };
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => open(),
        _ => match tokio::task::spawn_blocking(open).await {
            Ok(opened) => opened,
            // The closure does not panic (on_reply returns errors); a
            // cancelled runtime is shutting down.
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        },
    }
}

/// Delivers the answers at the front of the FIFO and every complete reply
/// already read, up to a heavy frame.
fn deliver_ready(
    ctx: &SessionContext,
    replies: &mut Replies,
    fifo: &mut mpsc::Receiver<Entry>,
    scanner: &mut ReplyScanner,
    input: &mut BytesMut,
    output: &mut BytesMut,
    requests_done: &mut bool,
) -> Result<Ready, SessionError> {
    loop {
        while replies.needs_entry() {
            match fifo.try_recv() {
                Ok(entry) => {
                    if replies.accept(entry, output) == Flow::Close {
                        return Ok(Ready::Flow(Flow::Close));
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
        let Some(len) = scanner.scan(input, &ctx.reply_limits).map_err(|e| {
            ctx.metrics.upstream_protocol_errors.increment(1);
            SessionError::UpstreamFraming(e.to_string())
        })?
        else {
            return Ok(Ready::Flow(Flow::Continue));
        };
        let frame = input.split_to(len).freeze();
        if len >= HEAVY_FRAME && !replies.needs_entry() {
            return Ok(Ready::Heavy(frame));
        }
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
            Entry::Answer { reply, .. } | Entry::Hello { reply, .. } => {
                output.extend_from_slice(&reply)
            }
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
