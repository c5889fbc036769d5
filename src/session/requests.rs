//! The request half of a session: client bytes -> requests -> policy ->
//! sealed arguments -> upstream bytes, and one FIFO entry per request for
//! the reply half. It reads the client only while the FIFO has room, and
//! decides when the client is quiet enough to be parked or closed.

use super::pipeline::{Entry, Flow, Tally};
use super::quiet::QuietTimer;
use super::{OK, SessionError, Shared, error_reply, next_read, seal, watchdog};
use crate::policy::table::{self, Blocks, Leaves};
use crate::policy::{self, Action, ReplyPlan, RequestState};
use crate::resp::{self, Request, RequestParser};
use crate::session::{Peer, SessionContext, lockout_error};
use crate::telemetry::events;
use crate::telemetry::metrics::Outcome;
use crate::upstream::lane::{LaneError, LaneOpenError, LaneRequests};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestsEnd {
    /// QUIT, a protocol error or shutdown: deliver what is pending, then close.
    Drain,
    /// Quiet on a clean connection with nothing pending.
    Park,
    /// On a lane, a request that needs a connection of its own: it is put
    /// back in front of the unread input; deliver what is pending, then move.
    Pin,
}

/// What became of a request on a lane before (or instead of) the usual path.
enum OnLane {
    /// Answered by redcloak.
    Answered,
    /// Needs a connection of its own: put back, the session ends.
    Pin,
    /// Goes on to `classify` like any request.
    Classify,
}

/// Where a session's requests go: its own upstream connection or a lane.
pub(super) trait RequestSink {
    /// A lane, shared with other clients: what needs a connection of its
    /// own ends the session with [`RequestsEnd::Pin`].
    const SHARED: bool;

    /// Sends the `requests` whole requests in `output`; `bulky`: one of
    /// them has a reply that grows with the data. `output` is left for the
    /// caller to clear (and wipe).
    fn send(
        &mut self,
        output: &mut BytesMut,
        requests: usize,
        bulky: bool,
    ) -> impl std::future::Future<Output = Result<(), SessionError>> + Send;

    /// SELECT or HELLO on a lane: moves to the lanes of `database` speaking
    /// `protocol`; `Ok(Ok(hello))` holds Redis's HELLO reply in it,
    /// `Ok(Err(text))` Redis's refusal. Never called on a connection of its
    /// own, which forwards SELECT and HELLO.
    fn switch(
        &mut self,
        database: u32,
        protocol: u8,
    ) -> impl std::future::Future<Output = Result<Result<Bytes, String>, SessionError>> + Send;
}

/// A session's own upstream connection.
pub(super) struct Direct<'a, W>(pub(super) &'a mut W);

impl<W: AsyncWrite + Unpin + Send> RequestSink for Direct<'_, W> {
    const SHARED: bool = false;

    async fn send(
        &mut self,
        output: &mut BytesMut,
        _requests: usize,
        _bulky: bool,
    ) -> Result<(), SessionError> {
        self.0
            .write_all(output)
            .await
            .map_err(SessionError::Upstream)?;
        self.0.flush().await.map_err(SessionError::Upstream)
    }

    async fn switch(&mut self, _: u32, _: u8) -> Result<Result<Bytes, String>, SessionError> {
        Ok(Err("ERR redcloak: forwarded on this connection".into()))
    }
}

impl RequestSink for LaneRequests {
    const SHARED: bool = true;

    async fn send(
        &mut self,
        output: &mut BytesMut,
        requests: usize,
        bulky: bool,
    ) -> Result<(), SessionError> {
        LaneRequests::send(self, output.split().freeze(), requests, bulky)
            .await
            .map_err(|err| match err {
                LaneError::Lost(_) => SessionError::UpstreamLost,
                LaneError::Unavailable(err) => SessionError::UpstreamUnavailable(err.to_string()),
            })
    }

    async fn switch(
        &mut self,
        database: u32,
        protocol: u8,
    ) -> Result<Result<Bytes, String>, SessionError> {
        match LaneRequests::switch(self, database, protocol).await {
            Ok(hello) => Ok(Ok(hello)),
            Err(LaneOpenError::Refused(text)) => Ok(Err(text)),
            Err(err) => Err(SessionError::UpstreamUnavailable(err.to_string())),
        }
    }
}

/// The request half: client bytes -> requests -> policy -> upstream bytes
/// and FIFO entries.
pub(super) struct Requests<'a, W> {
    pub(super) ctx: &'a SessionContext,
    pub(super) peer: &'a Peer,
    pub(super) upstream: &'a mut W,
    pub(super) fifo: mpsc::Sender<Entry>,
    /// Requests encoded for Redis, not yet written.
    pub(super) output: BytesMut,
    /// How long each request in `output` may block Redis, in order.
    pub(super) unsent: Vec<Blocks>,
    pub(super) shared: &'a Shared,
    /// What the commands forwarded so far leave on the upstream connection.
    pub(super) leaves: &'a mut Leaves,
    /// `output` holds redcloak's AUTH: wipe it once written.
    pub(super) output_holds_password: bool,
    /// `output` holds a request whose reply grows with the data.
    pub(super) output_bulky: bool,
    /// The client subscribed to something (idle subscribers are not closed).
    pub(super) subscribed: bool,
}

impl<W: RequestSink> Requests<'_, W> {
    pub(super) async fn forward<R: AsyncRead + Unpin>(
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
        // How much the last read brought (the next one reserves after it).
        let mut last_size = 0;
        let mut last_read = Instant::now();
        let mut park = QuietTimer::new(ctx.release_idle_after.unwrap_or_default());
        let mut idle = QuietTimer::new(ctx.idle_timeout.unwrap_or_default());
        // When the request in progress (bytes read, not yet whole) began.
        let mut partial_since: Option<Instant> = None;
        let mut unfinished = watchdog(ctx.request_read_timeout);
        // Made once: each `cancelled()` locks the token, shared by every
        // session, and registers a waiter.
        let shutdown = shutdown.cancelled();
        tokio::pin!(shutdown);
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
                input.reserve(next_read(last_size));
                let parkable = ctx.release_idle_after.is_some()
                    && *self.leaves == Leaves::Nothing
                    && !state.holds_transaction();
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
                    _ = idle.fired(), if idles_out => {
                        if idle.quiet(last_read, self.nothing_pending(input)) {
                            return Ok(RequestsEnd::Drain);
                        }
                        continue;
                    }
                    _ = park.fired(), if parkable => {
                        if park.quiet(last_read, self.nothing_pending(input)) {
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
            last_size = read;
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
                if W::SHARED {
                    match self.on_lane(&request, row, tally, state, input).await? {
                        OnLane::Answered => continue,
                        OnLane::Pin => return Ok(RequestsEnd::Pin),
                        OnLane::Classify => {}
                    }
                }
                if let Some(remaining) = self.lockout_refusal(&request) {
                    let reply = error_reply(&lockout_error(self.peer, remaining));
                    self.answer(reply, false, Some((tally, Outcome::Refused)))
                        .await?;
                    continue;
                }
                let action = ctx.policy.classify_as(row, &request, state);
                if W::SHARED
                    && let Action::Rewrite(args, ReplyPlan::Hello { protocol }) = &action
                {
                    match self
                        .hello_on_lane(&request, args, *protocol, tally, state, input)
                        .await?
                    {
                        OnLane::Pin => return Ok(RequestsEnd::Pin),
                        _ => continue,
                    }
                }
                // MULTI and WATCH count while they last (RequestState knows).
                let leaves = table::leaves(row);
                if action.forwards() && leaves != Leaves::Transaction {
                    *self.leaves = (*self.leaves).max(leaves);
                }
                let blocks = table::blocks(row, &request.args);
                self.output_bulky |= table::bulky(row);
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

    /// On a lane: answers what redcloak keeps for the client (CLIENT
    /// SETNAME/GETNAME/SETINFO, SELECT), or says the request needs a
    /// connection of its own, before it is classified.
    async fn on_lane(
        &mut self,
        request: &Request,
        row: Option<&'static table::Row>,
        tally: Tally,
        state: &mut RequestState,
        input: &mut BytesMut,
    ) -> Result<OnLane, SessionError> {
        let local = match row.map(|row| row.name) {
            _ if !state.is_authenticated() => None,
            Some("client") => policy::local::answer(&request.args, &mut state.local),
            Some("select") => match policy::local::select(&request.args) {
                Some(database) => {
                    let protocol = state.local.protocol();
                    Some(match self.switch_lane(database, protocol).await? {
                        Ok(_) => {
                            state.local.database = database;
                            Action::AnswerOk
                        }
                        Err(refused) => Action::AnswerError(refused),
                    })
                }
                None => None,
            },
            _ => None,
        };
        if let Some(action) = local {
            self.act(action, request, tally, Blocks::No).await?;
            return Ok(OnLane::Answered);
        }
        if self.ctx.policy.needs_own_connection(row, &request.args) {
            self.pin(request, input).await?;
            return Ok(OnLane::Pin);
        }
        Ok(OnLane::Classify)
    }

    /// HELLO 2 or 3 on a lane (classified: its AUTH checked) is answered
    /// here, from Redis's own reply on a lane of that protocol; another
    /// version pins.
    async fn hello_on_lane(
        &mut self,
        request: &Request,
        args: &[Bytes],
        protocol: Option<u8>,
        tally: Tally,
        state: &mut RequestState,
        input: &mut BytesMut,
    ) -> Result<OnLane, SessionError> {
        let protocol = protocol.unwrap_or(state.local.protocol());
        if !matches!(protocol, 2 | 3) {
            self.pin(request, input).await?;
            return Ok(OnLane::Pin);
        }
        match self.switch_lane(state.local.database, protocol).await? {
            Ok(hello) => {
                let local = &mut state.local;
                let reply = policy::local::hello_reply(&hello, local.id)
                    .ok_or_else(|| SessionError::UpstreamFraming("HELLO".into()))?;
                local.resp3 = protocol == 3;
                if let Some(name) = policy::local::hello_name(args) {
                    local.name = (!name.is_empty()).then(|| name.clone());
                }
                let entry = Entry::Hello {
                    reply,
                    protocol,
                    tally,
                };
                self.enqueue(entry).await?;
            }
            Err(refused) => {
                let outcome = Some((tally, Outcome::RedisError));
                self.answer(error_reply(&refused), false, outcome).await?;
            }
        }
        Ok(OnLane::Answered)
    }

    /// Sends what is encoded for the current lane (its replies come first),
    /// then moves to the lanes of `database` speaking `protocol`.
    async fn switch_lane(
        &mut self,
        database: u32,
        protocol: u8,
    ) -> Result<Result<Bytes, String>, SessionError> {
        self.flush().await?;
        self.upstream.switch(database, protocol).await
    }

    /// Puts `request` back in front of the unread input, to be read again
    /// first on the connection the client moves to, and sends what is
    /// encoded for the lane.
    async fn pin(&mut self, request: &Request, input: &mut BytesMut) -> Result<(), SessionError> {
        let mut again = BytesMut::with_capacity(input.len() + 64);
        resp::encode_command(&mut again, &request.args);
        again.extend_from_slice(input);
        *input = again;
        self.flush().await
    }

    /// Every request read has been answered and written to the client.
    fn nothing_pending(&self, input: &BytesMut) -> bool {
        input.is_empty()
            && self.output.is_empty()
            && self.fifo.capacity() == self.fifo.max_capacity()
            && self.shared.replies_quiet.load(Ordering::Relaxed)
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
                let keyring = self.ctx.policy.keyring().load();
                let args = seal::arguments(&keyring, &request.args, &values)?;
                self.enqueue(Entry::Await(plan, Some(tally))).await?;
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
                self.ctx.upstream.login().encode_auth(&mut self.output);
                self.unsent.push(Blocks::No);
                // Sent at once, so no later request grows (and copies) the buffer.
                self.output_holds_password = true;
                self.flush().await?;
            }
            Action::AnswerOk => self.answer(OK, false, Some((tally, Outcome::Ok))).await?,
            Action::Answer(reply) => {
                self.answer(reply, false, Some((tally, Outcome::Ok)))
                    .await?
            }
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
        let bytes = self.output.len();
        let written = self
            .upstream
            .send(&mut self.output, self.unsent.len(), self.output_bulky)
            .await;
        self.output_bulky = false;
        if std::mem::take(&mut self.output_holds_password) {
            zeroize::Zeroize::zeroize(&mut self.output[..]);
        }
        written?;
        self.shared.flushes.sent(&mut self.unsent, Instant::now());
        self.ctx.metrics.upstream_sent.increment(bytes as u64);
        self.output.clear();
        Ok(())
    }
}
