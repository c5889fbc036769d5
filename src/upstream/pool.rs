//! Warm upstream connections: a new client starts on a connection that is
//! already connected, verified and logged in, and a client that leaves
//! hands its connection back for the next one instead of closing it.
//!
//! A connection goes back only when its session says it is idle (every
//! request answered, no reply half-read), and only once what its client
//! left on it is undone ([`Leaves`]): nothing to undo after plain data
//! commands; `SELECT 0` after SELECT; otherwise RESET and redcloak's own
//! AUTH, which end MULTI and WATCH, subscriptions, client tracking, CLIENT
//! REPLY modes and the client name, select db 0 and return to RESP2. So
//! nothing of one client's session reaches the next. Frames Redis pushed
//! before the RESET (pub/sub messages, invalidations) are skipped; anything
//! else, or no answer in time, closes the connection. A connection is also
//! checked, without blocking, for a close or stray bytes when it is taken.
//! A background task keeps `idle` connections ready.

use super::{ReplyReader, Upstream, UpstreamError, UpstreamStream};
use crate::policy::table::Leaves;
use crate::resp::{Limits, ReplyKind, reply_kind};
use crate::telemetry::metrics::Metrics;
use bytes::BytesMut;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Frames Redis may push before answering RESET that are skipped.
const MAX_SKIPPED_FRAMES: usize = 1024;

/// Up to `capacity` ready connections. The background task opens new ones
/// only while ready and lent ones together number fewer than `capacity`; a
/// client's connection comes back when it leaves (if fit) whenever fewer
/// than `capacity` are ready, so clients that come and go reuse connections
/// instead of making new ones.
pub struct Pool {
    upstream: Arc<Upstream>,
    state: Mutex<PoolState>,
    /// 0 turns pooling off.
    capacity: usize,
    wanted: Notify,
    metrics: Arc<Metrics>,
}

/// A ready connection unused this long is PINGed before a client gets it.
const CHECK_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection lent out by [`Pool::take`], with the generation of the
/// material (TLS configuration, login) it was made with.
pub struct Lent {
    pub stream: UpstreamStream,
    pub generation: u64,
}

/// A ready connection in the pool.
struct Idle {
    stream: UpstreamStream,
    since: std::time::Instant,
    generation: u64,
}

#[derive(Default)]
struct PoolState {
    /// Ready connections, and since when each has been idle.
    idle: VecDeque<Idle>,
    /// Connections clients hold now.
    lent: usize,
}

impl Pool {
    pub fn new(upstream: Arc<Upstream>, capacity: usize, metrics: Arc<Metrics>) -> Pool {
        Pool {
            upstream,
            state: Mutex::new(PoolState::default()),
            capacity,
            wanted: Notify::new(),
            metrics,
        }
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn show_idle(&self, state: &PoolState) {
        self.metrics.upstream_pool_idle.set(state.idle.len() as f64);
    }

    /// The generation of the material new connections are made with.
    fn generation(&self) -> u64 {
        self.upstream.material().generation()
    }

    /// A ready connection, or a new one when none is. Every connection
    /// taken must be handed to [`Pool::give_back`] (or `None` for it). One
    /// made with material a reload has since replaced is closed instead.
    pub async fn take(&self) -> Result<Lent, UpstreamError> {
        let current = self.generation();
        loop {
            let idle = {
                let mut state = self.lock();
                let idle = state.idle.pop_front();
                self.show_idle(&state);
                idle
            };
            let Some(mut idle) = idle else {
                break;
            };
            if idle.generation == current
                && still_open(&mut idle.stream)
                && (idle.since.elapsed() < CHECK_AFTER_IDLE || self.answers(&mut idle.stream).await)
            {
                self.lock().lent += 1;
                return Ok(Lent {
                    stream: idle.stream,
                    generation: idle.generation,
                });
            }
            self.wanted.notify_one();
        }
        let stream = self.upstream.connect_counted(&self.metrics).await?;
        self.lock().lent += 1;
        Ok(Lent {
            stream,
            generation: current,
        })
    }

    /// A reload published new material: ready connections made with the old
    /// one are replaced, one at a time, by the background task.
    pub fn material_changed(&self) {
        self.wanted.notify_one();
    }

    /// A connection taken earlier comes back from its client: `Some` when
    /// its session left it idle, with what the client left on it. Once that
    /// is undone it serves the next client; otherwise it is closed.
    pub async fn give_back(&self, stream: Option<(Lent, Leaves)>) {
        // Room counts ready connections only: while more clients than
        // `capacity` come and go, returned connections keep serving them.
        // The connection stays counted as lent while it is undone, so the
        // background task does not open another in its place meanwhile.
        let room = self.lock().idle.len() < self.capacity;
        let mut kept = None;
        if let (Some((mut lent, leaves)), true) = (stream, room)
            && lent.generation == self.generation()
        {
            let timeout = self.upstream.settings().connect_timeout;
            let undone = tokio::time::timeout(timeout, self.undo(&mut lent.stream, leaves)).await;
            kept = matches!(undone, Ok(Ok(()))).then_some(lent);
        }
        let mut state = self.lock();
        state.lent = state.lent.saturating_sub(1);
        if let Some(lent) = kept
            && state.idle.len() < self.capacity
        {
            state.idle.push_back(Idle {
                stream: lent.stream,
                since: std::time::Instant::now(),
                generation: lent.generation,
            });
            self.show_idle(&state);
            return;
        }
        drop(state);
        self.wanted.notify_one();
    }

    /// Whether a connection that sat idle still answers PING in time: a
    /// hung Redis or a dead path is found here, not by the client's request.
    async fn answers(&self, stream: &mut UpstreamStream) -> bool {
        let timeout = self.upstream.settings().connect_timeout;
        let reply = super::call(stream, &[b"PING"], timeout).await;
        matches!(reply, Ok(reply) if &reply[..] == b"+PONG\r\n")
    }

    /// Undoes what a client left on the connection.
    async fn undo(&self, stream: &mut UpstreamStream, leaves: Leaves) -> std::io::Result<()> {
        match leaves {
            Leaves::Nothing => Ok(()),
            Leaves::Database => {
                let mut out = BytesMut::with_capacity(32);
                crate::resp::encode_command(&mut out, &[&b"SELECT"[..], b"0"]);
                stream.write_all(&out).await?;
                stream.flush().await?;
                let mut replies = ReplyReader::default();
                last_reply_is_ok(&mut replies, stream, "SELECT 0 refused").await
            }
            Leaves::Transaction | Leaves::Session => self.reset(stream).await,
        }
    }

    /// RESET, then redcloak's AUTH; pushed frames before +RESET are skipped.
    async fn reset(&self, stream: &mut UpstreamStream) -> std::io::Result<()> {
        let mut out = BytesMut::with_capacity(128);
        crate::resp::encode_command(&mut out, &[b"RESET"]);
        self.upstream.login().encode_auth(&mut out);
        super::write_wiped(stream, out).await?;
        const REFUSED: &str = "RESET or AUTH refused";
        let mut replies = ReplyReader::default();
        let mut skipped = 0;
        loop {
            let reply = replies.next(stream, &Limits::default()).await?;
            if &reply[..] == b"+RESET\r\n" {
                break;
            }
            let pushed = matches!(reply_kind(&reply), ReplyKind::Push | ReplyKind::Array);
            skipped += 1;
            if !pushed || skipped > MAX_SKIPPED_FRAMES {
                return Err(std::io::Error::other(REFUSED));
            }
        }
        last_reply_is_ok(&mut replies, stream, REFUSED).await
    }

    /// Until `shutdown`, opens connections while ready and lent ones number
    /// fewer than `capacity`, and replaces ready ones made with replaced
    /// material, one at a time (the new one first).
    pub async fn keep_warm(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let generation = self.generation();
            let (short, stale) = {
                let state = self.lock();
                let stale = state.idle.iter().any(|idle| idle.generation != generation);
                (state.idle.len() + state.lent < self.capacity, stale)
            };
            if short || stale {
                match self.upstream.connect_counted(&self.metrics).await {
                    Ok(stream) => {
                        let mut state = self.lock();
                        if !short
                            && let Some(at) =
                                state.idle.iter().position(|i| i.generation != generation)
                        {
                            state.idle.remove(at);
                        }
                        state.idle.push_back(Idle {
                            stream,
                            since: std::time::Instant::now(),
                            generation,
                        });
                        self.show_idle(&state);
                        continue;
                    }
                    // Redis is down: clients get the error when they come;
                    // try again after a pause.
                    Err(_) => {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(self.upstream.settings().connect_timeout) => continue,
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wanted.notified() => {}
            }
        }
    }
}

/// The next reply is `+OK` and nothing follows it (anything more would
/// answer no request: the connection is not reusable).
async fn last_reply_is_ok(
    replies: &mut ReplyReader,
    stream: &mut UpstreamStream,
    refused: &'static str,
) -> std::io::Result<()> {
    let reply = replies.next(stream, &Limits::default()).await?;
    if &reply[..] == b"+OK\r\n" && replies.is_drained() {
        Ok(())
    } else {
        Err(std::io::Error::other(refused))
    }
}

/// True when nothing has arrived on an idle connection: no close, no
/// error, no stray bytes. Never waits.
fn still_open(stream: &mut UpstreamStream) -> bool {
    let mut context = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(
        Pin::new(stream).poll_read(&mut context, &mut buf),
        Poll::Pending
    )
}
