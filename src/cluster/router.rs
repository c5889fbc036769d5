//! Routing one client's requests across a cluster: each request goes to
//! the primary that owns its keys' slot (one connection per node, opened
//! when first needed), and replies come back in the order the requests
//! were sent, whichever node answers first. Redirects never reach the
//! client: MOVED patches the slot map, starts one shared refresh and sends
//! the request again (at most [`MAX_REDIRECTS`] times); ASK sends `ASKING`
//! and the request together to the node named; TRYAGAIN waits and sends
//! again within a budget. Keys in more than one slot are answered
//! `CROSSSLOT` here, as Redis would.
//!
//! [`Topology`] holds the slot map all routers share: read from the seeds
//! (then from every known node), swapped whole, patched by MOVED, and
//! refreshed one at a time, at most every [`MIN_REFRESH_GAP`].

mod pubsub;
mod scan;

use super::map::{Redirect, SlotMap, redirect};
use super::slot::common_slot;
use super::topology::{self, Naming, TopologyError};
use crate::policy::table::{Combine, InCluster};
use crate::resp::{self, Limits};
use crate::upstream::lane::{LaneKey, LaneLimits, LaneReplies, LaneRequests, Lanes};
use crate::upstream::pool::Pool;
use crate::upstream::{ReplyReader, Upstream, UpstreamStream};
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Redirects one request may follow.
pub const MAX_REDIRECTS: u8 = 5;
/// Refreshes of the slot map are at least this far apart.
pub const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);
/// How long TRYAGAIN is retried for one request, with growing waits.
const TRYAGAIN_BUDGET: Duration = Duration::from_secs(1);

/// The slot map every router of a proxy shares, and how to renew it.
pub struct Topology {
    upstream: Upstream,
    naming: Naming,
    seeds: Vec<String>,
    timeout: Duration,
    /// How long a request for a slot whose primary is gone waits for a
    /// replica's promotion (`cluster.failover_wait`).
    failover_wait: Duration,
    map: ArcSwap<SlotMap>,
    /// An upstream per node address and certificate name, made once.
    nodes: std::sync::Mutex<HashMap<(String, u16, String), Arc<Upstream>>>,
    /// How each node's shared lanes are made (`None`: lanes off, every
    /// client has connections of its own).
    lane_settings: std::sync::OnceLock<NodeLaneSettings>,
    /// Each node's lanes, made when first needed.
    node_lanes: std::sync::Mutex<HashMap<(String, u16), Arc<Lanes>>>,
    /// Addresses proved to be the node the map names there (`CLUSTER
    /// MYID`), with that id: proved again when the map names another.
    proved: std::sync::Mutex<HashMap<(String, u16), String>>,
    /// `cluster.split_multikey`: MGET, DEL, UNLINK, EXISTS and TOUCH
    /// across slots are split per slot instead of refused.
    split_multikey: std::sync::atomic::AtomicBool,
    /// When the map was last read, and the connection it was read over
    /// (the next refresh asks there first: no new TLS handshake).
    last_refresh: tokio::sync::Mutex<(Instant, Option<UpstreamStream>)>,
    metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
}

impl Topology {
    /// Reads the slot map from the first seed that answers.
    pub async fn start(
        upstream: Upstream,
        seeds: Vec<String>,
        naming: Naming,
        timeout: Duration,
        failover_wait: Duration,
        metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
    ) -> Result<Arc<Topology>, TopologyError> {
        let (map, control) =
            topology::discover_keeping(&upstream, &seeds, &naming, timeout).await?;
        if let Some(metrics) = &metrics {
            metrics.set_cluster_map(map.nodes().count(), map.uncovered());
        }
        Ok(Arc::new(Topology {
            metrics,
            upstream,
            naming,
            seeds,
            timeout,
            failover_wait,
            map: ArcSwap::from_pointee(map),
            nodes: std::sync::Mutex::new(HashMap::new()),
            lane_settings: std::sync::OnceLock::new(),
            node_lanes: std::sync::Mutex::new(HashMap::new()),
            proved: std::sync::Mutex::new(HashMap::new()),
            split_multikey: std::sync::atomic::AtomicBool::new(false),
            last_refresh: tokio::sync::Mutex::new((Instant::now(), Some(control))),
        }))
    }

    /// Proves the node at `host:port` is the one the slot map names there
    /// (`CLUSTER MYID` over a verified connection) before any request goes
    /// to it: an address reused by another node is refused. Once per
    /// address and id.
    async fn prove(&self, host: &str, port: u16) -> Result<(), String> {
        let named = |map: &SlotMap| {
            map.nodes()
                .find(|n| n.host == host && n.port == port && !n.id.is_empty())
                .map(|n| n.id.clone())
        };
        let id = match named(&self.map()) {
            Some(id) => id,
            // Named by a MOVED only so far: the map is read again.
            None => {
                self.refresh().await;
                named(&self.map()).ok_or_else(|| format!("{host}:{port} is not in the slot map"))?
            }
        };
        let at = (host.to_owned(), port);
        if self
            .proved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&at)
            == Some(&id)
        {
            return Ok(());
        }
        let upstream = self.node(host, port)?;
        let mut conn = upstream.connect().await.map_err(|e| e.to_string())?;
        let reply = crate::upstream::call(&mut conn, &[b"CLUSTER", b"MYID"], self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        match resp::bulk_body(&reply) {
            Some(answer) if answer == id.as_bytes() => {
                self.proved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(at, id);
                Ok(())
            }
            Some(answer) => Err(format!(
                "answers as node {} where the slot map names {id}: another node behind a known address",
                String::from_utf8_lossy(answer)
            )),
            None => Err(format!(
                "CLUSTER MYID refused: {}",
                crate::upstream::error_text(&reply)
            )),
        }
    }

    /// Replaces the slot map (tests: a map naming another node's id).
    #[doc(hidden)]
    pub fn replace_map(&self, map: SlotMap) {
        self.map.store(Arc::new(map));
    }

    /// Shares lanes per node (`upstream.lanes` of them per protocol):
    /// plain data commands of every client go over them, coalesced.
    pub fn use_lanes(&self, settings: NodeLaneSettings) {
        let _ = self.lane_settings.set(settings);
    }

    /// The lanes of the node at `host:port`, made when first asked for;
    /// `None` when lanes are off.
    fn lanes_of(&self, host: &str, port: u16) -> Result<Option<Arc<Lanes>>, String> {
        let Some(settings) = self.lane_settings.get() else {
            return Ok(None);
        };
        let at = (host.to_owned(), port);
        if let Some(lanes) = self
            .node_lanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&at)
        {
            return Ok(Some(lanes.clone()));
        }
        let upstream = self.node(host, port)?;
        // No ready connections kept: a lane opens one when it is made.
        let pool = Arc::new(Pool::new(upstream, 0, settings.metrics.clone()));
        let lanes = Lanes::new(
            pool,
            settings.per_key,
            settings.limits,
            settings.reply_limits.clone(),
            settings.budget.clone(),
            settings.metrics.clone(),
        );
        self.node_lanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(at, lanes.clone());
        Ok(Some(lanes))
    }

    fn has_lanes(&self) -> bool {
        self.lane_settings.get().is_some()
    }

    /// Sets `cluster.split_multikey`.
    pub fn set_split_multikey(&self, split: bool) {
        self.split_multikey
            .store(split, std::sync::atomic::Ordering::Relaxed);
    }

    fn splits_multikey(&self) -> bool {
        self.split_multikey
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn map(&self) -> Arc<SlotMap> {
        self.map.load_full()
    }

    /// `slot` moved to `host:port` (a MOVED said so), until the next refresh.
    pub fn moved(&self, slot: u16, host: &str, port: u16) {
        self.map.rcu(|map| {
            let mut map = SlotMap::clone(map);
            map.moved(slot, host, port);
            map
        });
    }

    /// Reads the slot map again, from every known node and then the seeds;
    /// one refresh at a time, and none within [`MIN_REFRESH_GAP`] of the
    /// last (a caller arriving meanwhile waits for the one in progress).
    pub async fn refresh(&self) {
        let mut last = self.last_refresh.lock().await;
        let (at, control) = &mut *last;
        if at.elapsed() < MIN_REFRESH_GAP {
            return;
        }
        // Over the connection the map was last read on; a map that leaves
        // slots without a primary is read again from the other nodes (that
        // node may be the one whose view is behind).
        let mut read = None;
        if let Some(conn) = control.as_mut() {
            match topology::shards(conn, self.timeout).await {
                Ok(map) if map.uncovered() == 0 => read = Some(map),
                _ => *control = None,
            }
        }
        if read.is_none() {
            let known = self.map();
            let mut seeds: Vec<String> = known
                .nodes()
                .map(|n| topology::address(&n.host, n.port))
                .collect();
            seeds.extend(self.seeds.iter().cloned());
            if let Ok((map, conn)) =
                topology::discover_keeping(&self.upstream, &seeds, &self.naming, self.timeout).await
            {
                *control = Some(conn);
                read = Some(map);
            }
        }
        if let Some(map) = read {
            if let Some(metrics) = &self.metrics {
                metrics.set_cluster_map(map.nodes().count(), map.uncovered());
            }
            self.map.store(Arc::new(map));
        }
        *at = Instant::now();
    }

    fn redirected(&self, kind: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.cluster_redirect(kind);
        }
    }

    /// Reads the slot map again every `every` until `shutdown` (besides the
    /// refreshes redirects and lost nodes start).
    pub async fn refresh_every(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.refresh().await,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The upstream for the node at `host:port`, its certificate verified
    /// against the name `naming` gives it; one per node and name, shared
    /// by every router (so a certificate's expiry warning is logged once a
    /// day per node, not once per connection).
    fn node(&self, host: &str, port: u16) -> Result<Arc<Upstream>, String> {
        let map = self.map();
        let known = map.nodes().find(|n| n.host == host && n.port == port);
        let name = match (&self.naming, known) {
            (Naming::Configured(name), _) => name.clone(),
            (Naming::Announced, Some(node)) => self.naming.name_of(node)?,
            (Naming::Announced, None) => {
                return Err(format!("{host}:{port} is not in the slot map"));
            }
        };
        let at = (host.to_owned(), port, name);
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(upstream) = nodes.get(&at) {
            return Ok(upstream.clone());
        }
        let upstream = Arc::new(
            self.upstream
                .node(topology::address(host, port), &at.2)
                .map_err(|e| e.to_string())?,
        );
        nodes.insert(at, upstream.clone());
        Ok(upstream)
    }
}

/// How the lanes of each node are made (as `upstream.lanes` for one Redis).
pub struct NodeLaneSettings {
    /// Lanes per protocol per node.
    pub per_key: usize,
    pub limits: LaneLimits,
    pub reply_limits: Limits,
    pub budget: Arc<crate::session::memory::BufferBudget>,
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cluster node {node}: {why}")]
    Node { node: String, why: String },
}

impl RouteError {
    /// The node at `target` failed, for this reason.
    fn at(target: &(String, u16), why: impl Into<String>) -> RouteError {
        RouteError::Node {
            node: format!("{}:{}", target.0, target.1),
            why: why.into(),
        }
    }
}

/// A request's keys hash to more than one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossSlot;

/// How a request reaches a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Via {
    /// The client's own connection to the node: anything that leaves state
    /// on the connection (transactions, HELLO, CLIENT), blocks, or needs
    /// ASKING's flag kept for it.
    Own,
    /// The node's shared lanes: plain data commands.
    Lane,
}

/// A node and the way to it: a key of [`Router::nodes`].
type Link = ((String, u16), Via);

/// The connection itself (a TLS stream is large: boxed, so a lane's
/// entry is not as large).
enum Conn {
    Own(Box<UpstreamStream>),
    Lane(LaneRequests, LaneReplies),
}

/// One node's connection and the replies it owes, in order.
struct NodeConn {
    conn: Conn,
    replies: ReplyReader,
    /// The request each coming reply answers (`None`: an `ASKING`'s `+OK`).
    owed: VecDeque<Option<u64>>,
    /// Requests written here and sent with the batch ([`Router::flush`]):
    /// one TLS record and one write per node per batch, not per request.
    outbox: BytesMut,
    /// How many requests the outbox holds, and whether one has a reply
    /// that grows with the data (lanes send those on the bulk lane).
    outbox_requests: usize,
    outbox_bulky: bool,
}

impl NodeConn {
    fn new(conn: Conn, owed: VecDeque<Option<u64>>) -> NodeConn {
        NodeConn {
            conn,
            replies: ReplyReader::default(),
            owed,
            outbox: BytesMut::new(),
            outbox_requests: 0,
            outbox_bulky: false,
        }
    }

    /// Queues one request for the next flush.
    fn queue(&mut self, args: &[impl AsRef<[u8]>], bulky: bool) {
        resp::encode_command(&mut self.outbox, args);
        self.outbox_requests += 1;
        self.outbox_bulky |= bulky;
    }

    /// Sends what is queued.
    async fn flush(&mut self) -> std::io::Result<()> {
        let out = std::mem::take(&mut self.outbox);
        let requests = std::mem::take(&mut self.outbox_requests);
        let bulky = std::mem::take(&mut self.outbox_bulky);
        match &mut self.conn {
            Conn::Own(stream) => {
                stream.write_all(&out).await?;
                stream.flush().await
            }
            Conn::Lane(lane, _) => lane
                .send(out.freeze(), requests, bulky)
                .await
                .map_err(std::io::Error::other),
        }
    }

    /// The next reply on this connection.
    async fn read(&mut self, limits: &Limits) -> std::io::Result<BytesMut> {
        match &mut self.conn {
            Conn::Own(stream) => self.replies.next(stream, limits).await,
            Conn::Lane(_, replies) => self.replies.next(replies, limits).await,
        }
    }
}

/// A request not yet answered to the client.
struct Pending {
    index: u64,
    args: Vec<Bytes>,
    slot: Option<u16>,
    redirects: u8,
    tryagain_since: Option<Instant>,
    /// Queued in a transaction: a redirect aborts it instead of being
    /// followed.
    in_transaction: bool,
    /// A SCAN of the shard named by this slot: its reply's cursor is
    /// rewritten (see [`scan`]).
    scan: Option<u16>,
    /// Over the client's own connection or the node's lanes.
    via: Via,
    /// Last sent after ASKING (an ASK redirect): sent again the same way.
    asked: bool,
    /// Its reply grows with the data (lanes send it on the bulk lane).
    bulky: bool,
}

impl Pending {
    /// A request for `slot` (`None`: keyless) going `via`, not yet
    /// redirected.
    fn new(index: u64, args: Vec<Bytes>, slot: Option<u16>, via: Via) -> Pending {
        Pending {
            index,
            args,
            slot,
            redirects: 0,
            tryagain_since: None,
            in_transaction: false,
            scan: None,
            via,
            asked: false,
            bulky: false,
        }
    }
}

/// A transaction, or a WATCH, pinned to one slot's primary: every key in
/// that slot, the whole of it sent to that node.
#[derive(Default)]
struct Transaction {
    /// MULTI seen, EXEC or DISCARD not yet.
    open: bool,
    /// MULTI went to the primary of slot 0 (so Redis confirms it) before
    /// any key named the transaction's node; nothing is queued there yet,
    /// so the first key's primary may still take it over.
    tentative: bool,
    /// The slot its keys are in, once a key named it.
    slot: Option<u16>,
    /// The node it runs on.
    node: Option<(String, u16)>,
    /// A command failed to queue (a key in another slot, a redirect): EXEC
    /// answers EXECABORT.
    aborted: bool,
}

/// One client's requests across the cluster.
pub struct Router {
    topology: Arc<Topology>,
    transaction: Transaction,
    /// Commands that set up a connection (HELLO, CLIENT SETNAME): sent to
    /// every node connection, now and when one opens.
    setup: Vec<Vec<Bytes>>,
    nodes: HashMap<Link, NodeConn>,
    /// The protocol the client's lanes speak (HELLO changes it).
    lane_protocol: u8,
    pending: VecDeque<Pending>,
    /// Replies that arrived before their turn.
    done: BTreeMap<u64, BytesMut>,
    next_index: u64,
    limits: Limits,
    /// Connections holding the client's subscriptions.
    subscribers: pubsub::Subscribers,
    /// Messages from subscriber connections, each with the request whose
    /// reply it must follow.
    messages: VecDeque<(Option<u64>, Bytes)>,
    /// Replies answered in parts (confirmations, from one or more
    /// subscriber connections), with the parts still to complete.
    partial: HashMap<u64, (BytesMut, usize)>,
    /// The last request answered to the client.
    delivered: Option<u64>,
    /// 2 or 3, as HELLO set it.
    protocol: u8,
    /// A HELLO waiting for its reply, and the protocol it asked for.
    hello: Option<(u64, u8)>,
}

fn local_error(text: &str) -> BytesMut {
    let mut out = BytesMut::new();
    resp::encode_error(&mut out, text);
    out
}

impl Router {
    pub fn new(topology: Arc<Topology>, limits: Limits) -> Router {
        Router {
            topology,
            transaction: Transaction::default(),
            setup: Vec::new(),
            nodes: HashMap::new(),
            pending: VecDeque::new(),
            done: BTreeMap::new(),
            next_index: 0,
            limits,
            subscribers: pubsub::Subscribers::default(),
            messages: VecDeque::new(),
            partial: HashMap::new(),
            delivered: None,
            protocol: 2,
            hello: None,
            lane_protocol: 2,
        }
    }

    /// Sends `args` to every primary, once every earlier request is
    /// answered, and answers with their replies combined.
    pub async fn send_to_every_primary(
        &mut self,
        args: Vec<Bytes>,
        combine: Combine,
    ) -> Result<Vec<BytesMut>, RouteError> {
        let mut earlier = Vec::new();
        while let Some(reply) = self.next_reply().await? {
            earlier.push(reply);
        }
        let primaries: Vec<(String, u16)> = {
            let map = self.topology.map();
            let mut seen: Vec<(String, u16)> = Vec::new();
            for shard in &map.shards {
                if let Some(p) = shard.primary.as_ref().filter(|p| p.online) {
                    let at = (p.host.clone(), p.port);
                    if !seen.contains(&at) {
                        seen.push(at);
                    }
                }
            }
            seen
        };
        for primary in primaries {
            let index = self.next_pending(args.clone(), None, false);
            self.send_to_index(index, primary).await?;
        }
        let mut replies = Vec::new();
        while let Some(reply) = self.next_reply().await? {
            replies.push(reply);
        }
        let combined = combined(&replies, combine);
        self.answer(combined);
        Ok(earlier)
    }

    /// A command whose keys may span slots (MGET, DEL, UNLINK, EXISTS,
    /// TOUCH): with `cluster.split_multikey` on, once every earlier request
    /// is answered, one request per slot (keys in the order given) and the
    /// replies merged: counts added, MGET's values put back in key order
    /// (each still opened with its own key by the session). Otherwise, or
    /// in one slot, as any command.
    pub async fn send_split(
        &mut self,
        args: Vec<Bytes>,
        combine: Combine,
    ) -> Result<Vec<BytesMut>, RouteError> {
        if !self.topology.splits_multikey() || Self::slot_of(&args).is_ok() {
            self.send(args).await?;
            return Ok(Vec::new());
        }
        let mut earlier = Vec::new();
        while let Some(reply) = self.next_reply().await? {
            earlier.push(reply);
        }
        // Keys by slot, in the order first seen, with their positions.
        let mut parts: Vec<(u16, Vec<usize>)> = Vec::new();
        for (position, key) in args.iter().enumerate().skip(1) {
            let slot = super::slot::slot(key);
            match parts.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, positions)) => positions.push(position),
                None => parts.push((slot, vec![position])),
            }
        }
        for (_, positions) in &parts {
            let mut part = vec![args[0].clone()];
            part.extend(positions.iter().map(|at| args[*at].clone()));
            self.send(part).await?;
        }
        let mut replies = Vec::new();
        while let Some(reply) = self.next_reply().await? {
            replies.push(reply);
        }
        let merged = match combine {
            Combine::KeyOrder => self.in_key_order(&parts, &replies, args.len() - 1),
            other => combined(&replies, other),
        };
        self.answer(merged);
        Ok(earlier)
    }

    /// MGET's parts put back together: element `i` of part `p` is the value
    /// of the key at `parts[p].1[i]`.
    fn in_key_order(
        &self,
        parts: &[(u16, Vec<usize>)],
        replies: &[BytesMut],
        keys: usize,
    ) -> BytesMut {
        if let Some(error) = replies.iter().find(|r| r.starts_with(b"-")) {
            return error.clone();
        }
        let mut values: Vec<Option<&[u8]>> = vec![None; keys];
        for ((_, positions), reply) in parts.iter().zip(replies) {
            let Some((_, elements)) = resp::aggregate_elements(reply, &self.limits) else {
                return local_error("ERR redcloak: a cluster node answered MGET with no array");
            };
            if elements.len() != positions.len() {
                return local_error(
                    "ERR redcloak: a cluster node answered MGET with the wrong count",
                );
            }
            for (at, element) in positions.iter().zip(elements) {
                values[at - 1] = Some(element);
            }
        }
        let mut out = BytesMut::new();
        resp::encode_header(&mut out, b'*', keys);
        for value in values {
            out.extend_from_slice(value.unwrap_or(b"$-1\r\n"));
        }
        out
    }

    /// A transaction (or a WATCH) holds the client to one node.
    pub fn in_transaction(&self) -> bool {
        self.transaction.open || self.transaction.node.is_some()
    }

    /// Requests sent and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Answers the next request here, with this error, in its turn.
    pub fn refuse(&mut self, text: &str) {
        self.answer(local_error(text));
    }

    /// Answers the next request here, with `reply`, in its turn.
    fn answer(&mut self, reply: BytesMut) {
        let index = self.next_index;
        self.next_index += 1;
        self.done.insert(index, reply);
        self.pending
            .push_back(Pending::new(index, Vec::new(), None, Via::Own));
    }

    /// MULTI, EXEC, DISCARD, WATCH and UNWATCH, and every command between
    /// MULTI and EXEC: the transaction runs on the primary of its keys'
    /// slot (see [`Transaction`]).
    pub async fn send_transactional(&mut self, args: Vec<Bytes>) -> Result<(), RouteError> {
        let name = args
            .first()
            .map(|n| n.to_ascii_uppercase())
            .unwrap_or_default();
        let simple = |text: &str| {
            let mut out = BytesMut::new();
            resp::encode_simple(&mut out, text);
            out
        };
        match &name[..] {
            b"MULTI" if self.transaction.open => {
                self.refuse("ERR MULTI calls can not be nested");
                Ok(())
            }
            b"MULTI" => {
                self.transaction.open = true;
                if self.transaction.node.is_some() {
                    // After WATCH: MULTI goes where the watch is.
                    return self.send_pinned(args, false).await;
                }
                // Redis confirms MULTI: the primary of slot 0 gets it now,
                // and the transaction moves if its first key lives elsewhere.
                let Some(node) = self.primary_of(Some(0)).await else {
                    self.transaction.open = false;
                    self.refuse("CLUSTERDOWN Hash slot not served");
                    return Ok(());
                };
                self.transaction.node = Some(node.clone());
                self.transaction.tentative = true;
                let index = self.next_pending(args, None, false);
                self.send_to_index(index, node).await
            }
            b"EXEC" | b"DISCARD" if !self.transaction.open => {
                self.refuse(&format!(
                    "ERR {} without MULTI",
                    String::from_utf8_lossy(&name)
                ));
                Ok(())
            }
            b"EXEC" | b"DISCARD" => {
                let transaction = std::mem::take(&mut self.transaction);
                let exec = &name[..] == b"EXEC";
                match transaction.node {
                    // Nothing was queued: nothing to send.
                    None if exec => self.answer(BytesMut::from(&b"*0\r\n"[..])),
                    None => self.answer(simple("OK")),
                    Some(node) if transaction.aborted => {
                        self.send_to(vec![Bytes::from_static(b"DISCARD")], node, None)
                            .await?;
                        match exec {
                            true => self.refuse(
                                "EXECABORT Transaction discarded because of previous errors.",
                            ),
                            false => self.answer(simple("OK")),
                        }
                    }
                    Some(node) => {
                        let index = self.next_pending(args, transaction.slot, false);
                        self.send_to_index(index, node).await?;
                    }
                }
                Ok(())
            }
            b"WATCH" if self.transaction.open => {
                self.refuse("ERR WATCH inside MULTI is not allowed");
                Ok(())
            }
            b"UNWATCH" if !self.transaction.open => {
                match self.transaction.node.take() {
                    Some(node) => {
                        self.transaction = Transaction::default();
                        let index = self.next_pending(args, None, false);
                        self.send_to_index(index, node).await?;
                    }
                    None => self.answer(simple("OK")),
                }
                Ok(())
            }
            _ => self.send_pinned(args, self.transaction.open).await,
        }
    }

    /// A command of a transaction (or WATCH): pins it to its slot's primary
    /// the first time a key names one, and aborts it for a key elsewhere.
    async fn send_pinned(&mut self, args: Vec<Bytes>, queued: bool) -> Result<(), RouteError> {
        let slot = match Self::slot_of(&args) {
            Ok(slot) => slot,
            Err(CrossSlot) => {
                return self.abort("CROSSSLOT Keys in request don't hash to the same slot");
            }
        };
        match (slot, self.transaction.slot) {
            (Some(slot), Some(pinned)) if slot != pinned => {
                return self.abort(
                    "CROSSSLOT redcloak: every key of a transaction in front of a Redis Cluster must be in one slot",
                );
            }
            (Some(slot), None) => {
                let primary = self.primary_of(Some(slot)).await;
                match (self.transaction.node.clone(), primary) {
                    (Some(node), Some(primary))
                        if node != primary && self.transaction.tentative =>
                    {
                        // Nothing queued yet: the transaction moves to the
                        // first key's primary.
                        self.send_to(vec![Bytes::from_static(b"DISCARD")], node, None)
                            .await?;
                        self.send_to(vec![Bytes::from_static(b"MULTI")], primary.clone(), None)
                            .await?;
                        self.transaction.node = Some(primary);
                    }
                    (Some(node), Some(primary)) if node != primary => {
                        return self.abort(
                            "CROSSSLOT redcloak: every key of a transaction in front of a Redis Cluster must be in one slot",
                        );
                    }
                    (_, Some(primary)) => self.transaction.node = Some(primary),
                    (_, None) => return self.abort("CLUSTERDOWN Hash slot not served"),
                }
                self.transaction.slot = Some(slot);
            }
            _ => {}
        }
        if self.transaction.node.is_none() {
            // Keyless before any key: the primary of slot 0 holds it.
            match self.primary_of(Some(0)).await {
                Some(primary) => self.transaction.node = Some(primary),
                None => return self.abort("CLUSTERDOWN Hash slot not served"),
            }
        }
        let node = self.transaction.node.clone().expect("pinned");
        // Something is queued on it now: the transaction stays there.
        self.transaction.tentative = false;
        let index = self.next_pending(args, slot, queued);
        self.send_to_index(index, node).await
    }

    /// A command of an open transaction that cannot be queued: answered
    /// here, and EXEC will answer EXECABORT.
    fn abort(&mut self, text: &str) -> Result<(), RouteError> {
        if self.transaction.open {
            self.transaction.aborted = true;
        }
        self.refuse(text);
        Ok(())
    }

    fn next_pending(&mut self, args: Vec<Bytes>, slot: Option<u16>, in_transaction: bool) -> u64 {
        let index = self.next_index;
        self.next_index += 1;
        self.pending.push_back(Pending {
            in_transaction,
            ..Pending::new(index, args, slot, Via::Own)
        });
        index
    }

    /// Sends the pending request `index` to `node`.
    async fn send_to_index(&mut self, index: u64, node: (String, u16)) -> Result<(), RouteError> {
        let position = self
            .pending
            .iter()
            .position(|p| p.index == index)
            .expect("just queued");
        let pending = self.pending.remove(position).expect("found");
        let sent = self.dispatch(&pending, Some(node), false).await;
        self.pending.insert(position, pending);
        sent
    }

    /// Sends `args` to `node`, its reply owed to `index` (`None`: nobody).
    async fn send_to(
        &mut self,
        args: Vec<Bytes>,
        node: (String, u16),
        index: Option<u64>,
    ) -> Result<(), RouteError> {
        let conn = self.connection(&node, Via::Own).await?;
        conn.queue(&args, false);
        conn.owed.push_back(index);
        Ok(())
    }

    /// Sends what each node connection has queued; a node that fails the
    /// write is lost (what it owed answered with an error, never sent twice).
    pub async fn flush(&mut self) {
        let queued: Vec<Link> = self
            .nodes
            .iter()
            .filter(|(_, conn)| !conn.outbox.is_empty())
            .map(|(link, _)| link.clone())
            .collect();
        for link in queued {
            let conn = self.nodes.get_mut(&link).expect("listed");
            if let Err(err) = conn.flush().await {
                tracing::warn!(node = %format!("{}:{}", link.0.0, link.0.1), error = %err, "cluster node lost");
                self.lose(&link);
            }
        }
    }

    /// A command that sets up the connection (HELLO, CLIENT SETNAME): its
    /// reply comes from the primary of slot 0; every other open node
    /// connection gets it too, and every one opened later.
    pub async fn send_setup(&mut self, args: Vec<Bytes>) -> Result<(), RouteError> {
        let answering = self.primary_of(Some(0)).await;
        let others: Vec<Link> = self
            .nodes
            .keys()
            .filter(|(target, via)| *via == Via::Own && Some(target) != answering.as_ref())
            .cloned()
            .collect();
        for link in others {
            let conn = self.nodes.get_mut(&link).expect("listed");
            conn.owed.push_back(None);
            conn.queue(&args, false);
        }
        self.setup.push(args.clone());
        let asked = args
            .first()
            .filter(|name| name.eq_ignore_ascii_case(b"HELLO"))
            .and_then(|_| args.get(1))
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u8>().ok());
        if let Some(protocol) = asked {
            self.hello = Some((self.next_index, protocol));
            // What follows on the lanes is answered in that protocol.
            self.switch_lanes(protocol).await?;
        }
        self.send(args).await
    }

    /// The client's lanes speak `protocol` from the next request on.
    async fn switch_lanes(&mut self, protocol: u8) -> Result<(), RouteError> {
        self.lane_protocol = protocol;
        for ((target, via), conn) in self.nodes.iter_mut() {
            if let (Via::Lane, Conn::Lane(lane, _)) = (via, &mut conn.conn) {
                lane.switch(0, protocol)
                    .await
                    .map_err(|e| RouteError::at(target, e.to_string()))?;
            }
        }
        Ok(())
    }

    /// RESET: the transaction, connection setup and subscriptions end, and
    /// every node connection but the one answering is closed (they open
    /// again as new ones).
    pub async fn reset(&mut self, args: Vec<Bytes>) -> Result<(), RouteError> {
        let answering = self.primary_of(Some(0)).await;
        self.nodes.retain(|(target, via), conn| {
            (*via == Via::Own && Some(target) == answering.as_ref()) || !conn.owed.is_empty()
        });
        self.subscribers.clear();
        self.setup.clear();
        self.transaction = Transaction::default();
        self.protocol = 2;
        self.switch_lanes(2).await?;
        self.send(args).await
    }

    /// Whether RESP2 pub/sub rules hold: Redis then answers every command
    /// on the subscribed connection.
    pub fn subscribed_resp2(&mut self) -> bool {
        self.protocol == 2 && self.subscribers.subscribed()
    }

    /// The slot a request's keys share (`None`: it has none), from the
    /// command table's key positions; `Err` when they span slots.
    pub fn slot_of(args: &[Bytes]) -> Result<Option<u16>, CrossSlot> {
        Self::slot_in(Self::row_of(args), args)
    }

    fn row_of(args: &[Bytes]) -> Option<&'static crate::policy::table::Row> {
        args.first()
            .and_then(|name| crate::policy::table::lookup(name))
    }

    /// The slot `args`' keys share, the table's `row` for it giving their
    /// positions.
    fn slot_in(
        row: Option<&crate::policy::table::Row>,
        args: &[Bytes],
    ) -> Result<Option<u16>, CrossSlot> {
        let Some(row) = row else {
            return Ok(None);
        };
        let positions = row.keys.positions(args);
        common_slot(
            positions
                .iter()
                .filter_map(|at| args.get(*at))
                .map(|k| &k[..]),
        )
        .map_err(|_| CrossSlot)
    }

    /// Sends a request to the primary of its slot (a keyless one to the
    /// primary of slot 0).
    pub async fn send(&mut self, args: Vec<Bytes>) -> Result<(), RouteError> {
        // One look at the command table: the slot, the way, the reply's size.
        let row = Self::row_of(&args);
        let Ok(slot) = Self::slot_in(row, &args) else {
            self.refuse("CROSSSLOT Keys in request don't hash to the same slot");
            return Ok(());
        };
        let index = self.next_index;
        self.next_index += 1;
        let pending = Pending {
            bulky: row.is_some_and(|row| row.bulky),
            ..Pending::new(index, args, slot, self.via_for(row))
        };
        self.dispatch(&pending, None, false).await?;
        self.pending.push_back(pending);
        Ok(())
    }

    /// Lanes carry plain data commands; anything that leaves state on the
    /// connection or blocks goes on the client's own.
    fn via_for(&self, row: Option<&crate::policy::table::Row>) -> Via {
        if !self.topology.has_lanes() {
            return Via::Own;
        }
        match row {
            Some(row)
                if row.leaves == crate::policy::table::Leaves::Nothing && row.blocks.is_none() =>
            {
                Via::Lane
            }
            _ => Via::Own,
        }
    }

    /// Writes `pending` to `to` (or its slot's primary), after `ASKING`
    /// when `asking`.
    async fn dispatch(
        &mut self,
        pending: &Pending,
        to: Option<(String, u16)>,
        asking: bool,
    ) -> Result<(), RouteError> {
        let mut target = match to {
            Some(target) => target,
            None => match self.primary_of(pending.slot).await {
                Some(target) => target,
                None => {
                    self.done.insert(
                        pending.index,
                        local_error("CLUSTERDOWN Hash slot not served"),
                    );
                    return Ok(());
                }
            },
        };
        // A primary that cannot be reached may be failing over: the map is
        // read again until another node serves the slot, for failover_wait.
        let deadline = Instant::now() + self.topology.failover_wait;
        let via = pending.via;
        while let Err(err) = self.connection(&target, via).await {
            if Instant::now() >= deadline {
                self.done.insert(
                    pending.index,
                    local_error(&format!(
                        "CLUSTERDOWN redcloak: no primary reachable for this slot: {err}"
                    )),
                );
                return Ok(());
            }
            tokio::time::sleep(MIN_REFRESH_GAP).await;
            self.topology.refresh().await;
            if let Some(primary) = self.topology.map().primary(pending.slot.unwrap_or(0)) {
                target = (primary.host.clone(), primary.port);
            }
        }
        let bulky = pending.bulky;
        let conn = self.nodes.get_mut(&(target, via)).expect("connected");
        // ASKING and the request go together, in one write.
        if asking {
            conn.queue(&[b"ASKING"], false);
            conn.owed.push_back(None);
        }
        conn.queue(&pending.args, bulky);
        conn.owed.push_back(Some(pending.index));
        Ok(())
    }

    /// The connection to `target` is lost: every request it owed a reply
    /// is answered with an error (it may or may not have run), and the map
    /// is read again.
    fn lose(&mut self, link: &Link) {
        let target = &link.0;
        if let Some(conn) = self.nodes.remove(link) {
            for index in conn.owed.into_iter().flatten() {
                self.done.insert(
                    index,
                    local_error(&format!(
                        "ERR redcloak: cluster node {}:{} was lost before it answered (the command may or may not have run)",
                        target.0, target.1
                    )),
                );
            }
        }
        let topology = self.topology.clone();
        tokio::spawn(async move { topology.refresh().await });
    }

    async fn primary_of(&self, slot: Option<u16>) -> Option<(String, u16)> {
        let slot = slot.unwrap_or(0);
        for attempt in 0..2 {
            if let Some(primary) = self.topology.map().primary(slot) {
                return Some((primary.host.clone(), primary.port));
            }
            if attempt == 0 {
                self.topology.refresh().await;
            }
        }
        None
    }

    async fn connection(
        &mut self,
        target: &(String, u16),
        via: Via,
    ) -> Result<&mut NodeConn, RouteError> {
        let link = (target.clone(), via);
        // A connection that owes nothing and that the node closed (it died,
        // or restarted) is dropped before anything is sent on it, so the
        // request goes, once, to whichever node serves the slot now.
        let closed_by_node = self.nodes.get(&link).is_some_and(|conn| match &conn.conn {
            Conn::Own(stream) => conn.owed.is_empty() && closed(stream),
            Conn::Lane(..) => false,
        });
        if closed_by_node {
            self.nodes.remove(&link);
            return Err(RouteError::at(target, "the node closed the connection"));
        }
        if !self.nodes.contains_key(&link) {
            let failed = |why: String| RouteError::at(target, why);
            self.topology
                .prove(&target.0, target.1)
                .await
                .map_err(failed)?;
            let lanes = match via {
                Via::Lane => self
                    .topology
                    .lanes_of(&target.0, target.1)
                    .map_err(failed)?,
                Via::Own => None,
            };
            let conn = match lanes {
                Some(lanes) => {
                    let key = LaneKey {
                        database: 0,
                        protocol: self.lane_protocol,
                        bulk: false,
                    };
                    let link = lanes.attach(key).await.map_err(|e| failed(e.to_string()))?;
                    NodeConn::new(Conn::Lane(link.requests, link.replies), VecDeque::new())
                }
                None => {
                    let upstream = self.topology.node(&target.0, target.1).map_err(failed)?;
                    let mut stream = upstream
                        .connect()
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    // The client's connection setup, its replies owed to nobody.
                    let mut owed = VecDeque::new();
                    if !self.setup.is_empty() {
                        let mut out = BytesMut::new();
                        for args in &self.setup {
                            resp::encode_command(&mut out, args);
                            owed.push_back(None);
                        }
                        stream
                            .write_all(&out)
                            .await
                            .map_err(|e| failed(e.to_string()))?;
                    }
                    NodeConn::new(Conn::Own(Box::new(stream)), owed)
                }
            };
            self.nodes.insert(link.clone(), conn);
        }
        Ok(self.nodes.get_mut(&link).expect("just inserted"))
    }

    /// The reply to the oldest request not yet answered, redirects
    /// followed; `None` when nothing is pending.
    pub async fn next_reply(&mut self) -> Result<Option<BytesMut>, RouteError> {
        loop {
            let Some(front) = self.pending.front() else {
                return Ok(None);
            };
            let index = front.index;
            if let Some(reply) = self.done.remove(&index) {
                self.pending.pop_front();
                self.delivered = Some(index);
                if let Some((asked, protocol)) = self.hello
                    && asked == index
                {
                    self.hello = None;
                    if reply.starts_with(b"-") {
                        // Redis refused it: the lanes speak what it confirmed.
                        let confirmed = self.protocol;
                        self.switch_lanes(confirmed).await?;
                    } else {
                        self.protocol = protocol;
                    }
                }
                return Ok(Some(reply));
            }
            // What is queued goes out before anything is waited for.
            if self.nodes.values().any(|conn| !conn.outbox.is_empty()) {
                self.flush().await;
                continue;
            }
            // Read from the node that owes the oldest request its reply,
            // and from every subscriber connection.
            let target: Option<Link> = self
                .nodes
                .iter()
                .find(|(_, conn)| conn.owed.contains(&Some(index)))
                .map(|(link, _)| link.clone());
            if target.is_none() && !self.subscribers.owe(index) {
                return Err(RouteError::Node {
                    node: String::new(),
                    why: "a request no node owes a reply".into(),
                });
            }
            let event = match (target, self.subscribers.open()) {
                (Some(target), false) => {
                    let limits = self.limits.clone();
                    let conn = self.nodes.get_mut(&target).expect("found");
                    let read = conn.read(&limits).await;
                    pubsub::Event::Node(target, read)
                }
                (target, _) => self.read_event(target).await,
            };
            self.handle(event).await?;
        }
    }

    /// While no request waits for a reply: the next frame from a
    /// subscriber connection (a message, or news of a lost node), handled.
    /// Never ends when there are no subscriber connections.
    pub async fn idle(&mut self) -> Result<(), RouteError> {
        let event = self.read_event(None).await;
        self.handle(event).await
    }

    async fn handle(&mut self, event: pubsub::Event) -> Result<(), RouteError> {
        match event {
            pubsub::Event::Node(target, Ok(reply)) => {
                let Some(conn) = self.nodes.get_mut(&target) else {
                    return Ok(());
                };
                let Some(owner) = conn.owed.pop_front().flatten() else {
                    return Ok(()); // ASKING's +OK
                };
                self.answered(owner, target.0, reply).await
            }
            pubsub::Event::Node(target, Err(err)) => {
                tracing::warn!(node = %format!("{}:{}", target.0.0, target.0.1), error = %err, "cluster node lost");
                self.lose(&target);
                Ok(())
            }
            pubsub::Event::Subscriber(holder, Ok(frame)) => {
                self.subscriber_frame(holder, frame).await
            }
            pubsub::Event::Subscriber(holder, Err(err)) => self.subscriber_lost(&holder, err).await,
        }
    }

    /// A reply for request `index` from `from`: kept, or the request sent
    /// again where a redirect says.
    async fn answered(
        &mut self,
        index: u64,
        from: (String, u16),
        reply: BytesMut,
    ) -> Result<(), RouteError> {
        let position = self.pending.iter().position(|p| p.index == index);
        let Some(position) = position else {
            return Ok(());
        };
        if reply.starts_with(b"-TRYAGAIN") {
            let since = *self.pending[position]
                .tryagain_since
                .get_or_insert_with(Instant::now);
            if since.elapsed() < TRYAGAIN_BUDGET {
                self.topology.redirected("tryagain");
                // Backing off: each wait as long as the time spent so far
                // (10 ms at least, 250 ms at most), within the budget.
                let wait = since
                    .elapsed()
                    .clamp(Duration::from_millis(10), Duration::from_millis(250));
                tokio::time::sleep(wait).await;
                let again = self.pending.remove(position).expect("found");
                let asking = again.asked;
                self.dispatch(&again, Some(from), asking).await?;
                self.pending.insert(position, again);
                return Ok(());
            }
        }
        let redirected = redirect(&reply);
        if self.pending[position].in_transaction && redirected.is_some() {
            // The slot moved while the transaction was queued: it aborts.
            self.transaction.aborted = true;
            self.done.insert(
                index,
                local_error("ERR redcloak: the slot moved during the transaction"),
            );
            return Ok(());
        }
        let pending = &mut self.pending[position];
        match redirected {
            Some((kind, slot, host, port)) if pending.redirects < MAX_REDIRECTS => {
                pending.redirects += 1;
                self.topology.redirected(match kind {
                    Redirect::Moved => "moved",
                    Redirect::Ask => "ask",
                });
                if kind == Redirect::Moved {
                    self.topology.moved(slot, &host, port);
                    let topology = self.topology.clone();
                    tokio::spawn(async move { topology.refresh().await });
                }
                let mut again = self.pending.remove(position).expect("found");
                let asking = kind == Redirect::Ask;
                again.asked = asking;
                self.dispatch(&again, Some((host, port)), asking).await?;
                self.pending.insert(position, again);
            }
            Some(_) => {
                self.done.insert(
                    index,
                    local_error("ERR redcloak: the cluster redirected this request too many times"),
                );
            }
            None => {
                let multi = pending
                    .args
                    .first()
                    .is_some_and(|name| name.eq_ignore_ascii_case(b"MULTI"));
                let reply = match pending.scan {
                    Some(slot) => self.scanned(slot, &from, reply),
                    None => reply,
                };
                if reply.starts_with(b"-CLUSTERDOWN") {
                    let topology = self.topology.clone();
                    tokio::spawn(async move { topology.refresh().await });
                }
                // Redis refused MULTI: no transaction is open (as Redis says).
                if multi && reply.starts_with(b"-") {
                    self.transaction = Transaction::default();
                }
                self.done.insert(index, reply);
            }
        }
        Ok(())
    }
}

/// Whether the node has closed `stream` (end of stream or an error
/// waiting), without waiting and without taking any byte.
fn closed(stream: &UpstreamStream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(
        stream.get_ref().0.poll_peek(&mut cx, &mut buf),
        std::task::Poll::Ready(Ok(0) | Err(_))
    )
}

/// Every primary's reply to one command, as one: integers added, or the
/// one reply they all gave; the first error otherwise.
fn combined(replies: &[BytesMut], combine: Combine) -> BytesMut {
    if let Some(error) = replies.iter().find(|r| r.starts_with(b"-")) {
        return error.clone();
    }
    match combine {
        Combine::Sum => {
            let mut total: i64 = 0;
            for reply in replies {
                match resp::integer(reply) {
                    Some(n) => total += n,
                    None => return local_error("ERR redcloak: a primary answered with no number"),
                }
            }
            BytesMut::from(format!(":{total}\r\n").as_bytes())
        }
        Combine::KeyOrder => local_error("ERR redcloak: no key order to merge in"),
        Combine::Same => match replies.first() {
            Some(first) if replies.iter().all(|r| r == first) => first.clone(),
            Some(_) => local_error("ERR redcloak: the primaries answered differently"),
            None => local_error("CLUSTERDOWN no primary to send it to"),
        },
    }
}

/// How `args` goes in front of a cluster, as the command table says.
fn in_cluster(args: &[Bytes]) -> InCluster {
    let Some(row) = args
        .first()
        .and_then(|name| crate::policy::table::lookup(name))
    else {
        return InCluster::BySlot;
    };
    let sub = args
        .get(1)
        .map(|s| s.to_ascii_uppercase())
        .unwrap_or_default();
    match row.cluster {
        // Of SCRIPT and FUNCTION, only LOAD goes to every primary.
        InCluster::EveryPrimary(Combine::Same) if sub != b"LOAD" => InCluster::Refused(
            "this subcommand needs every primary of the cluster and is not supported in front of a Redis Cluster yet",
        ),
        // CLUSTER KEYSLOT only hashes a name.
        InCluster::Refused(_) if row.name == "cluster" && sub == b"KEYSLOT" => InCluster::BySlot,
        // CLIENT sets up the connection only with SETNAME and SETINFO.
        InCluster::Setup if row.name == "client" => {
            let sub = args
                .get(1)
                .map(|s| s.to_ascii_uppercase())
                .unwrap_or_default();
            if sub == b"SETNAME" || sub == b"SETINFO" {
                InCluster::Setup
            } else {
                InCluster::BySlot
            }
        }
        other => other,
    }
}

/// Serves one client's upstream side: `stream` carries the requests the
/// session sends (as to one Redis) and gets the replies back in order, the
/// router sending each where its slot lives. A batch of requests is sent
/// across the nodes, then its replies are returned. Ends when the session
/// closes its side; a lost node answers what is pending with an error and
/// ends it.
pub async fn serve<S>(mut stream: S, mut router: Router, limits: Limits)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut requests = ReplyReader::default();
    loop {
        if !deliver(&mut stream, router.deliverable_messages()).await
            || stream.flush().await.is_err()
        {
            return;
        }
        let subscribed = router.subscribers.open();
        let first = tokio::select! {
            read = requests.next(&mut stream, &limits) => match read {
                Ok(first) => first,
                Err(_) => return,
            },
            handled = router.idle(), if subscribed => {
                if let Err(err) = handled {
                    tracing::warn!(error = %err, "cluster node lost");
                    return;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while !requests.is_drained() {
            match requests.next(&mut stream, &limits).await {
                Ok(frame) => batch.push(frame),
                Err(_) => return,
            }
        }
        for frame in batch {
            // The arguments are slices of the frame: no copy per argument.
            let frame = frame.freeze();
            let Some((_, items)) = resp::aggregate_elements(&frame, &limits) else {
                router.refuse("ERR redcloak: not a command");
                continue;
            };
            let args: Option<Vec<Bytes>> = items
                .iter()
                .map(|item| resp::bulk_body(item).map(|body| frame.slice_ref(body)))
                .collect();
            let Some(args) = args.filter(|a| !a.is_empty()) else {
                router.refuse("ERR redcloak: not a command");
                continue;
            };
            let sent = match in_cluster(&args) {
                InCluster::Reset => router.reset(args).await,
                InCluster::Scan if router.in_transaction() => {
                    router.refuse("ERR redcloak: SCAN inside a transaction is not supported in front of a Redis Cluster");
                    Ok(())
                }
                InCluster::Scan => router.send_scan(args).await,
                InCluster::PubSub if router.in_transaction() => {
                    router.refuse("ERR redcloak: subscribing inside a transaction is not supported in front of a Redis Cluster");
                    Ok(())
                }
                InCluster::PubSub => match pubsub::pubsub_command(&args[0]) {
                    Some((kind, subscribe)) => router.send_pubsub(args, kind, subscribe).await,
                    None => {
                        router.refuse("ERR redcloak: not a pub/sub command");
                        Ok(())
                    }
                },
                _ if router.subscribed_resp2() => router.send_while_subscribed(args).await,
                InCluster::Refused(why) => {
                    router.refuse(&format!("ERR redcloak: {why}"));
                    Ok(())
                }
                InCluster::Transaction => router.send_transactional(args).await,
                InCluster::EveryPrimary(_) if router.in_transaction() => {
                    router.send_transactional(args).await
                }
                InCluster::EveryPrimary(combine) => {
                    match router.send_to_every_primary(args, combine).await {
                        Ok(earlier) => {
                            if !deliver(&mut stream, earlier).await {
                                return;
                            }
                            Ok(())
                        }
                        Err(err) => Err(err),
                    }
                }
                InCluster::Setup => router.send_setup(args).await,
                InCluster::Split(_) if router.in_transaction() => {
                    router.send_transactional(args).await
                }
                InCluster::Split(combine) => match router.send_split(args, combine).await {
                    Ok(earlier) => {
                        if !deliver(&mut stream, earlier).await {
                            return;
                        }
                        Ok(())
                    }
                    Err(err) => Err(err),
                },
                InCluster::BySlot if router.in_transaction() => {
                    router.send_transactional(args).await
                }
                InCluster::BySlot => router.send(args).await,
            };
            if let Err(err) = sent {
                tracing::warn!(error = %err, "cluster node lost");
                return;
            }
        }
        router.flush().await;
        while router.pending() > 0 {
            match router.next_reply().await {
                Ok(Some(reply)) => {
                    let messages = router.deliverable_messages();
                    if stream.write_all(&reply).await.is_err()
                        || !deliver(&mut stream, messages).await
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "cluster node lost");
                    return;
                }
            }
        }
    }
}

/// Writes `frames` to the session; false when it is gone.
async fn deliver<S, F>(stream: &mut S, frames: Vec<F>) -> bool
where
    S: tokio::io::AsyncWrite + Unpin,
    F: AsRef<[u8]>,
{
    for frame in frames {
        if stream.write_all(frame.as_ref()).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    #[test]
    fn the_command_table_says_how_each_command_goes_in_front_of_a_cluster() {
        assert_eq!(in_cluster(&args(&["MULTI"])), InCluster::Transaction);
        assert_eq!(in_cluster(&args(&["watch", "k"])), InCluster::Transaction);
        assert_eq!(in_cluster(&args(&["ssubscribe", "c"])), InCluster::PubSub);
        assert_eq!(in_cluster(&args(&["RESET"])), InCluster::Reset);
        assert_eq!(in_cluster(&args(&["SCAN", "0"])), InCluster::Scan);
        assert!(
            matches!(in_cluster(&args(&["KEYS", "*"])), InCluster::Refused(why) if why.contains("every primary"))
        );
        assert_eq!(in_cluster(&args(&["HELLO", "3"])), InCluster::Setup);
        assert_eq!(
            in_cluster(&args(&["CLIENT", "setname", "x"])),
            InCluster::Setup
        );
        assert_eq!(in_cluster(&args(&["CLIENT", "LIST"])), InCluster::BySlot);
        assert_eq!(in_cluster(&args(&["GET", "k"])), InCluster::BySlot);
        assert_eq!(
            in_cluster(&args(&["cluster", "keyslot", "k"])),
            InCluster::BySlot
        );
        assert!(matches!(
            in_cluster(&args(&["CLUSTER", "SLOTS"])),
            InCluster::Refused(why) if why.contains("one Redis")
        ));
        assert!(matches!(
            in_cluster(&args(&["READONLY"])),
            InCluster::Refused(_)
        ));
        assert_eq!(
            in_cluster(&args(&["DBSIZE"])),
            InCluster::EveryPrimary(Combine::Sum)
        );
        assert_eq!(
            in_cluster(&args(&["script", "load", "return 1"])),
            InCluster::EveryPrimary(Combine::Same)
        );
        assert!(matches!(
            in_cluster(&args(&["SCRIPT", "FLUSH"])),
            InCluster::Refused(_)
        ));
        let replies = [
            BytesMut::from(&b":2\r\n"[..]),
            BytesMut::from(&b":3\r\n"[..]),
        ];
        assert_eq!(&combined(&replies, Combine::Sum)[..], b":5\r\n");
        assert!(combined(&replies, Combine::Same).starts_with(b"-ERR"));
    }

    #[test]
    fn a_requests_slot_comes_from_the_command_tables_key_positions() {
        let slot = crate::cluster::slot::slot;
        assert_eq!(
            Router::slot_of(&args(&["GET", "foo"])),
            Ok(Some(slot(b"foo")))
        );
        assert_eq!(
            Router::slot_of(&args(&["MSET", "{a}1", "x", "{a}2", "y"])),
            Ok(Some(slot(b"a")))
        );
        assert_eq!(
            Router::slot_of(&args(&["MGET", "foo", "bar"])),
            Err(CrossSlot)
        );
        assert_eq!(Router::slot_of(&args(&["PING"])), Ok(None));
        // The value is not a key.
        assert_eq!(
            Router::slot_of(&args(&["SET", "foo", "bar"])),
            Ok(Some(slot(b"foo")))
        );
    }
}
