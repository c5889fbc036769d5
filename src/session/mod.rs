//! One client connection and its own upstream connection, 1:1.
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
//! Both halves run in the connection's task. The FIFO is their only link and
//! its capacity is the pending-request limit: when it is full the request
//! half stops reading the client, and while the client does not read its
//! replies the reply half stops reading Redis, so memory per connection stays
//! bounded whatever the client does. Writes go out once per batch of frames.
//!
//! Ends: the client closing ends everything at once; QUIT, a client protocol
//! error and shutdown stop the request half and let the reply half deliver
//! what is pending; losing Redis answers every pending request with an error
//! and closes the client.

pub mod open;
pub mod pipeline;

use crate::policy::{Action, Policy, ReplyPlan};
use crate::resp::{self, Limits, ReplyScanner, RequestParser};
use crate::upstream::Login;
use bytes::{Bytes, BytesMut};
use pipeline::{Entry, Flow, Replies};
use std::io;
use std::sync::Arc;
use std::time::Duration;
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
pub async fn run<C, U>(
    ctx: &SessionContext,
    client: C,
    upstream: U,
    shutdown: &CancellationToken,
) -> Result<(), SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_reader, client_writer) = tokio::io::split(client);
    let (upstream_reader, upstream_writer) = tokio::io::split(upstream);
    let (fifo_in, fifo_out) = mpsc::channel(ctx.max_pending_requests);
    let upstream_failed = CancellationToken::new();
    let requests = forward_requests(ctx, client_reader, upstream_writer, fifo_in, shutdown);
    let replies = deliver_replies(
        ctx,
        upstream_reader,
        client_writer,
        fifo_out,
        &upstream_failed,
    );
    tokio::pin!(requests, replies);
    tokio::select! {
        end = &mut requests => match end {
            Ok(RequestsEnd::ClientClosed) => Ok(()),
            Ok(RequestsEnd::Drain) => replies.await,
            Err(SessionError::Client(err)) => Err(SessionError::Client(err)),
            Err(err) => {
                // Redis is gone: the reply half answers what is pending with errors.
                upstream_failed.cancel();
                let _ = replies.await;
                Err(err)
            }
        },
        end = &mut replies => end,
    }
}

/// Client bytes -> requests -> policy -> upstream bytes and FIFO entries.
async fn forward_requests<R, W>(
    ctx: &SessionContext,
    mut client: R,
    mut upstream: W,
    fifo: mpsc::Sender<Entry>,
    shutdown: &CancellationToken,
) -> Result<RequestsEnd, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
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
        loop {
            let request = match parser.next(&mut input, &ctx.limits) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(err) => {
                    let reply = error_reply(&format!("ERR redcloak: protocol error: {err}"));
                    enqueue(
                        &fifo,
                        Entry::Answer {
                            reply,
                            then_close: true,
                        },
                        &mut output,
                        &mut upstream,
                    )
                    .await?;
                    write_upstream(&mut upstream, &mut output).await?;
                    return Ok(RequestsEnd::Drain);
                }
            };
            let action = ctx.policy.classify(&request, &mut state);
            let quit = action == Action::Quit;
            // An entry always enters the FIFO before its command is encoded:
            // `enqueue` may flush `output`, and a reply must never arrive
            // before the entry it answers.
            let answer = match action {
                Action::Forward(plan) => {
                    enqueue(&fifo, Entry::Await(plan), &mut output, &mut upstream).await?;
                    resp::encode_command(&mut output, &request.args);
                    None
                }
                Action::Rewrite(args, plan) => {
                    enqueue(&fifo, Entry::Await(plan), &mut output, &mut upstream).await?;
                    resp::encode_command(&mut output, &args);
                    None
                }
                Action::Reset => {
                    enqueue(
                        &fifo,
                        Entry::Await(ReplyPlan::Reset),
                        &mut output,
                        &mut upstream,
                    )
                    .await?;
                    resp::encode_command(&mut output, &[b"RESET"]);
                    let restore = Entry::Await(ReplyPlan::RestoreLogin);
                    enqueue(&fifo, restore, &mut output, &mut upstream).await?;
                    ctx.upstream_login.encode_auth(&mut output);
                    None
                }
                Action::AnswerOk => Some(Entry::Answer {
                    reply: OK.clone(),
                    then_close: false,
                }),
                Action::Quit => Some(Entry::Answer {
                    reply: OK.clone(),
                    then_close: true,
                }),
                Action::AnswerError(text) => Some(Entry::Answer {
                    reply: error_reply(&text),
                    then_close: false,
                }),
            };
            if let Some(answer) = answer {
                enqueue(&fifo, answer, &mut output, &mut upstream).await?;
            }
            if quit {
                write_upstream(&mut upstream, &mut output).await?;
                return Ok(RequestsEnd::Drain);
            }
        }
        write_upstream(&mut upstream, &mut output).await?;
    }
}

/// Puts an entry in the FIFO. When it is full, the requests already encoded
/// (all with their entries queued) are sent first: the reply half may be
/// waiting for exactly those.
async fn enqueue<W: AsyncWrite + Unpin>(
    fifo: &mpsc::Sender<Entry>,
    entry: Entry,
    output: &mut BytesMut,
    upstream: &mut W,
) -> Result<(), SessionError> {
    match fifo.try_send(entry) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(entry)) => {
            write_upstream(upstream, output).await?;
            fifo.send(entry)
                .await
                .map_err(|_| SessionError::UpstreamClosed)
        }
        Err(TrySendError::Closed(_)) => Err(SessionError::UpstreamClosed),
    }
}

async fn write_upstream<W: AsyncWrite + Unpin>(
    upstream: &mut W,
    output: &mut BytesMut,
) -> Result<(), SessionError> {
    if output.is_empty() {
        return Ok(());
    }
    upstream
        .write_all(output)
        .await
        .map_err(SessionError::Upstream)?;
    upstream.flush().await.map_err(SessionError::Upstream)?;
    output.clear();
    Ok(())
}

/// Upstream bytes -> replies matched to FIFO entries -> client bytes.
async fn deliver_replies<R, W>(
    ctx: &SessionContext,
    mut upstream: R,
    mut client: W,
    mut fifo: mpsc::Receiver<Entry>,
    upstream_failed: &CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    let mut scanner = ReplyScanner::default();
    let mut replies = Replies::new(ctx.policy.keyring().clone(), ctx.reply_limits.clone());
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
        write_client(ctx, &mut client, &mut output).await?;
        if flow == Flow::Close || (requests_done && replies.needs_entry()) {
            let _ = client.shutdown().await;
            return Ok(());
        }
        input.reserve(READ_CHUNK);
        let lost = tokio::select! {
            entry = fifo.recv(), if replies.needs_entry() => {
                match entry {
                    Some(entry) => {
                        if replies.accept(entry, &mut output) == Flow::Close {
                            write_client(ctx, &mut client, &mut output).await?;
                            let _ = client.shutdown().await;
                            return Ok(());
                        }
                    }
                    None => requests_done = true,
                }
                None
            }
            read = upstream.read_buf(&mut input) => match read {
                Ok(0) => Some(SessionError::UpstreamClosed),
                Ok(_) => None,
                Err(err) => Some(SessionError::Upstream(err)),
            },
            _ = upstream_failed.cancelled() => Some(SessionError::UpstreamClosed),
        };
        if let Some(err) = lost {
            return fail_pending(ctx, &mut client, &mut fifo, &mut output, &replies, err).await;
        }
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
) -> Result<(), SessionError> {
    let failed = error_reply(&format!("ERR redcloak: {err}; closing the connection"));
    if !replies.needs_entry() {
        output.extend_from_slice(&failed);
    }
    fifo.close();
    while let Ok(entry) = fifo.try_recv() {
        match entry {
            Entry::Await(_) => output.extend_from_slice(&failed),
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
