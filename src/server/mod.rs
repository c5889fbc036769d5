//! Listeners, the accept loop, and one task per client: it gets a slot
//! from [`admission`] (connection limits; the oldest silent connection
//! gives way when all are taken), finishes the TLS handshake, waits for
//! the client's first bytes, then serves it on a lane of its database; when
//! the session pins the client, on a connection of its own from the pool
//! (its lane state replayed there, the connection given back after), and,
//! when the session parked the client, waits for its next request to serve
//! it on a lane again. Everything that can be wrong
//! in the configuration (certificates, keys, names) is checked in
//! [`Server::bind`], before any listener opens.
//!
//! On shutdown readiness turns to draining for good, the listeners close
//! (the unix socket file is removed), then sessions drain: they stop reading
//! requests, deliver what is pending, and close. Sessions still busy after
//! the grace period are dropped.
//!
//! Connections are counted here (accepted by listener, rejected by reason,
//! active); a peer locked out for failed logins is turned away before any
//! upstream connection is made for it.

pub mod admission;

use crate::auth::lockout::Lockouts;
use crate::auth::{ClientAuth, Credentials};
use crate::config::{Config, UnixListenConfig};
use crate::crypto::envelope;
use crate::policy::Policy;
use crate::policy::rules::Rules;
use crate::policy::table::Leaves;
use crate::resp::Limits;
use crate::session::{self, Next, Peer, SessionContext};
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::{Certificate, Listener, Rejection};
use crate::tls::{self, TlsError};
use crate::upstream::lane::{LaneKey, LaneLimits, LaneOpenError, Lanes};
use crate::upstream::pool::{Lent, Pool};
use crate::upstream::{Upstream, UpstreamError};
use admission::{Admission, Refused, Ticket};
use arc_swap::ArcSwap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long a client has to finish its TLS handshake: a connection that
/// never sends a ClientHello holds a slot no longer than this.
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("cannot listen on {what}: {source}")]
    Bind { what: String, source: io::Error },
    #[error(
        "another process is serving on the unix socket {}: stop it, or give this instance \
         another listen.unix_socket",
        .0.display()
    )]
    SocketInUse(PathBuf),
    #[error(transparent)]
    Keys(#[from] crate::kms::KeysError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::topology::TopologyError),
    #[error(transparent)]
    Sentinel(#[from] crate::sentinel::SentinelError),
}

impl StartError {
    /// True when fixing the configuration fixes the error.
    pub fn is_config(&self) -> bool {
        !matches!(self, StartError::Bind { .. })
    }
}

struct Shared {
    session: SessionContext,
    /// A Redis Cluster's slot map, when `upstream.cluster` is set: clients
    /// are then routed per slot.
    cluster: Option<Arc<crate::cluster::router::Topology>>,
    pool: Arc<Pool>,
    /// `None`: lanes are off (`upstream.lanes = 0`).
    lanes: Option<Arc<Lanes>>,
    telemetry: Telemetry,
}

/// How the drain at shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished within the grace period.
    Clean,
    /// The grace period ran out: this many connections were cut.
    Cut(usize),
}

pub struct Server {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    /// The TLS listener and its configuration (a reload may replace it).
    tls: Option<(TcpListener, Arc<ArcSwap<rustls::ServerConfig>>)>,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    grace_period: Duration,
    /// Keep readiness current with an upstream check (when an admin listener reports it).
    watch_upstream: bool,
    /// The material published at start, for reloads, the files it came
    /// from, and how often they are looked at for changes.
    at_start: crate::reload::AtStart,
    watch_interval: Option<Duration>,
    /// Serves reloads while it runs (see [`Server::with_reloads`]).
    reloads: Option<(crate::reload::Reloader, crate::reload::ReloadQueue)>,
    /// The KMS-wrapped keys to revalidate while running (a reload may
    /// replace them).
    kms: crate::kms::CurrentKms,
    /// The Sentinels to follow the primary with (`upstream.sentinel`).
    sentinels: Option<Arc<crate::sentinel::Sentinels>>,
}

enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
    Tls(TcpStream, SocketAddr, TlsAcceptor),
}

impl Server {
    /// Validates certificates and names, then opens every listener.
    /// `telemetry` counts what the server does and reports its readiness.
    pub async fn bind(config: Config, telemetry: Telemetry) -> Result<Server, StartError> {
        let upstream = Arc::new(Upstream::from_config(&config.upstream)?);
        // Replies come back sealed: larger by the envelope.
        let reply_limits = Limits {
            max_bulk_bytes: config.limits.resp.max_bulk_bytes + envelope::OVERHEAD,
            ..config.limits.resp.clone()
        };
        // What every session's buffers, and every lane's, may hold together.
        let buffers = Arc::new(session::memory::BufferBudget::new(
            config.limits.max_buffered_bytes,
        ));
        let cluster = match &config.upstream.cluster {
            Some(cluster) => {
                let template = upstream.node(
                    config.upstream.address.clone(),
                    &config.upstream.server_name,
                )?;
                let topology = crate::cluster::router::Topology::start(
                    template,
                    cluster.seeds.clone(),
                    cluster.naming.clone(),
                    config.upstream.connect_timeout,
                    cluster.failover_wait,
                    Some(telemetry.metrics.clone()),
                )
                .await?;
                topology.set_split_multikey(cluster.split_multikey);
                if config.upstream.lanes > 0 {
                    topology.use_lanes(crate::cluster::router::NodeLaneSettings {
                        per_key: config.upstream.lanes,
                        limits: LaneLimits {
                            request_timeout: config.upstream.request_timeout,
                            ..LaneLimits::default()
                        },
                        reply_limits: reply_limits.clone(),
                        budget: buffers.clone(),
                        metrics: telemetry.metrics.clone(),
                    });
                }
                Some(topology)
            }
            None => None,
        };
        // Sentinel names the primary: asked now (a majority, ROLE master),
        // followed while running.
        let sentinels = match &config.upstream.sentinel {
            Some(sentinel) => {
                let sentinels = crate::sentinel::Sentinels::from_config(
                    sentinel,
                    config.upstream.connect_timeout,
                )?;
                let agreement = sentinels.primary(&upstream).await?;
                upstream.retarget(agreement.address.clone());
                tracing::info!(primary = %agreement.address, agreeing = agreement.agreeing, asked = agreement.asked, "Sentinel named the primary");
                Some(Arc::new(sentinels))
            }
            None => None,
        };
        let at_start = crate::reload::AtStart::of(&config);
        let watch_interval = config.reload_watch_interval;
        let metrics = &telemetry.metrics;
        export_expiry(
            &telemetry,
            Certificate::UpstreamClient,
            &config.upstream.cert,
        );
        if let Some(listener) = &config.listen.tls {
            export_expiry(&telemetry, Certificate::Listener, &listener.cert);
        }
        let listener_tls = match &config.listen.tls {
            Some(t) => Some(tls::server::config(
                &t.cert,
                &t.key,
                t.client_ca.as_deref(),
            )?),
            None => None,
        };
        let lockouts = config
            .listen
            .auth
            .as_ref()
            .map(|a| Arc::new(Mutex::new(Lockouts::new(a.lockout))));
        let client_auth = ClientAuth::new(config.listen.auth.map(|a| Credentials {
            username: a.username,
            passwords: a.passwords,
        }));
        let encryption = config.encryption;
        // Data keys wrapped by a KMS are unwrapped here, once: no KMS call per value.
        let keys = &encryption.keys;
        let keyring = keys
            .keyring(keys.startup_timeout(), Some(&telemetry))
            .await?;
        let kms = Arc::new(arc_swap::ArcSwapOption::new(keys.kms.clone()));
        let keyring = crate::crypto::CurrentKeyring::new(keyring);
        metrics.watch_keyring(keyring.clone());
        let policy = Policy::new(
            client_auth,
            Rules::new(encryption.rules),
            keyring,
            encryption.unknown_commands,
        )
        .with_known_scripts(config.scripts);
        let session = SessionContext {
            policy,
            reply_limits,
            unauthenticated_limits: config.limits.resp.before_login(),
            limits: config.limits.resp,
            max_pending_requests: config.limits.max_pending_requests,
            client_write_timeout: config.limits.client_write_timeout,
            request_timeout: config.upstream.request_timeout,
            request_read_timeout: config.limits.request_read_timeout,
            buffers: buffers.clone(),
            idle_timeout: config.listen.idle_timeout,
            upstream: upstream.clone(),
            metrics: metrics.clone(),
            lockouts,
            log_key_names: config.log_key_names,
            release_idle_after: config.upstream.release_idle_after,
        };
        let tcp = match config.listen.tcp {
            Some(address) => Some(bind_tcp(address).await?),
            None => None,
        };
        let unix = config.listen.unix.as_ref().map(bind_unix).transpose()?;
        let tls = match (config.listen.tls, listener_tls) {
            (Some(t), Some(server_config)) => Some((
                bind_tcp(t.address).await?,
                Arc::new(ArcSwap::new(server_config)),
            )),
            _ => None,
        };
        let pool = Arc::new(Pool::new(
            upstream.clone(),
            config.upstream.pool_idle,
            telemetry.metrics.clone(),
        ));
        // In front of a cluster the lanes are per node, the router's.
        let lanes = (config.upstream.lanes > 0 && cluster.is_none()).then(|| {
            Lanes::new(
                pool.clone(),
                config.upstream.lanes,
                LaneLimits {
                    request_timeout: config.upstream.request_timeout,
                    ..LaneLimits::default()
                },
                session.reply_limits.clone(),
                session.buffers.clone(),
                telemetry.metrics.clone(),
            )
        });
        Ok(Server {
            tcp,
            unix,
            tls,
            shared: Arc::new(Shared {
                session,
                cluster,
                pool,
                lanes,
                telemetry,
            }),
            admission: Admission::new(
                config.listen.max_connections,
                config.listen.max_connections_per_peer,
            ),
            grace_period: config.shutdown_grace_period,
            watch_upstream: config.metrics_address.is_some(),
            at_start,
            watch_interval,
            reloads: None,
            kms,
            sentinels,
        })
    }

    /// Serves the reloads asked of `queue` (SIGHUP, `POST /-/reload`) from
    /// the configuration at `config_path`, the one this server was bound
    /// with.
    pub fn with_reloads(
        mut self,
        config_path: std::path::PathBuf,
        queue: crate::reload::ReloadQueue,
    ) -> Server {
        let policy = &self.shared.session.policy;
        let targets = crate::reload::Targets {
            upstream: self.shared.pool.upstream().clone(),
            pool: self.shared.pool.clone(),
            keyring: policy.keyring().clone(),
            kms: self.kms.clone(),
            listener: self.tls.as_ref().map(|(_, config)| config.clone()),
            client_passwords: policy.client_passwords(),
            sentinels: self.sentinels.clone(),
            metrics: self.shared.telemetry.metrics.clone(),
        };
        let reloader =
            crate::reload::Reloader::new(config_path, std::mem::take(&mut self.at_start), targets);
        self.reloads = Some((reloader, queue));
        self
    }

    /// The plaintext TCP listener's address (its port when configured as 0).
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn tls_address(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Accepts clients until `shutdown`, then drains. Says whether every
    /// connection finished within the grace period.
    pub async fn run(mut self, shutdown: CancellationToken) -> Drained {
        info!(
            tcp = ?self.tcp_address(),
            tls = ?self.tls_address(),
            unix = ?self.unix.as_ref().map(|(_, p)| p),
            upstream = self.shared.pool.upstream().address(),
            "redcloak serving"
        );
        // One line per listener with the address it got (port 0 picks one).
        for (listener, address) in [("tcp", self.tcp_address()), ("tls", self.tls_address())] {
            if let Some(address) = address {
                info!(listener, %address, "listening");
            }
        }
        let telemetry = &self.shared.telemetry;
        // The startup checks just reached Redis; the upstream check keeps this current.
        telemetry.set_upstream(Ok(()));
        telemetry.health.serving();
        let background = TaskTracker::new();
        if self.watch_upstream {
            background.spawn(crate::upstream::check::watch_upstream(
                self.shared.pool.upstream().clone(),
                telemetry.clone(),
                shutdown.clone(),
            ));
        }
        background.spawn(self.shared.pool.clone().keep_warm(shutdown.clone()));
        if let Some(sentinels) = &self.sentinels {
            let shared = self.shared.clone();
            let switched = move |_old: &str, _new: &str| {
                // Ready connections are to the old primary: replaced by new
                // ones (the same material, a new generation); lanes poisoned.
                let pool = &shared.pool;
                pool.upstream()
                    .publish((*pool.upstream().material()).clone());
                pool.material_changed();
                shared.telemetry.metrics.sentinel_switch();
                if let Some(lanes) = shared.lanes.clone() {
                    tokio::spawn(async move {
                        lanes
                            .poison_all(crate::upstream::lane::book::Poison::PrimaryChanged)
                            .await
                    });
                }
            };
            background.spawn(sentinels.clone().follow(
                self.shared.pool.upstream().clone(),
                switched,
                shutdown.clone(),
            ));
        }
        if let Some(topology) = &self.shared.cluster {
            background.spawn(
                topology
                    .clone()
                    .refresh_every(std::time::Duration::from_secs(30), shutdown.clone()),
            );
        }
        if self.kms.load().is_some() {
            background.spawn(crate::kms::revalidate(
                self.kms.clone(),
                self.shared.session.policy.keyring().clone(),
                telemetry.clone(),
                shutdown.clone(),
            ));
        }
        if let Some((reloader, queue)) = self.reloads.take() {
            background.spawn(crate::reload::run(
                reloader,
                queue,
                self.watch_interval,
                shutdown.clone(),
            ));
        }
        let upkeep = tokio::spawn(crate::telemetry::run_upkeep(telemetry.metrics.clone()));
        let sessions = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                conn = accept_tcp(self.tcp.as_ref()) => conn.map(|(s, peer)| Accepted::Tcp(s, peer)),
                conn = accept_unix(self.unix.as_ref().map(|(l, _)| l)) => conn.map(Accepted::Unix),
                conn = accept_tls(self.tls.as_ref()) => conn,
            };
            match accepted {
                Ok(conn) => {
                    let shared = self.shared.clone();
                    let admission = self.admission.clone();
                    let shutdown = shutdown.clone();
                    sessions
                        .spawn(async move { handle(&shared, &admission, conn, &shutdown).await });
                }
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        self.shared.telemetry.health.draining();
        self.close_listeners();
        sessions.close();
        info!(connections = sessions.len(), grace_period = ?self.grace_period, "draining");
        let drained = match tokio::time::timeout(self.grace_period, sessions.wait()).await {
            Ok(()) => Drained::Clean,
            Err(_) => {
                warn!(
                    connections = sessions.len(),
                    "grace period over: closing the remaining connections"
                );
                Drained::Cut(sessions.len())
            }
        };
        upkeep.abort();
        background.close();
        background.wait().await;
        drained
    }

    fn close_listeners(&mut self) {
        self.tcp = None;
        self.tls = None;
        if let Some((listener, path)) = self.unix.take() {
            drop(listener);
            if let Err(err) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %err, "cannot remove the unix socket");
            }
        }
    }
}

async fn bind_tcp(address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what: address.to_string(),
            source,
        })
}

/// Binds the unix socket with its mode already set: it is bound inside a
/// fresh private directory (mode 0700) next to the path, given its mode
/// there, and only then renamed into place, so no other user can connect
/// in between whatever the umask. An existing socket is replaced only when
/// nothing answers on it (a stale file); a live one belongs to another
/// process, and starting is refused.
fn bind_unix(config: &UnixListenConfig) -> Result<(UnixListener, PathBuf), StartError> {
    let path = &config.path;
    let bind_error = |source| StartError::Bind {
        what: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(path.clone()));
        }
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let private = tempfile::Builder::new()
        .prefix(".redcloak-bind-")
        .tempdir_in(parent)
        .map_err(bind_error)?;
    let staged = private.path().join("socket");
    let listener = UnixListener::bind(&staged).map_err(bind_error)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(config.mode))
        .map_err(bind_error)?;
    std::fs::rename(&staged, path).map_err(bind_error)?;
    Ok((listener, path.clone()))
}

async fn accept_tcp(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_tls(
    listener: Option<&(TcpListener, Arc<ArcSwap<rustls::ServerConfig>>)>,
) -> io::Result<Accepted> {
    match listener {
        Some((listener, config)) => {
            let (stream, peer) = listener.accept().await?;
            // The configuration as of this connection: a reload changes the
            // next handshake, not this one.
            let acceptor = TlsAcceptor::from(config.load_full());
            Ok(Accepted::Tls(stream, peer, acceptor))
        }
        None => std::future::pending().await,
    }
}

/// Exports when the certificate in `path` expires (the startup checks
/// already read it; an unreadable one is not exported).
fn export_expiry(telemetry: &Telemetry, which: Certificate, path: &std::path::Path) {
    let expiry = tls::inspect::file_expiry(path)
        .ok()
        .flatten()
        .and_then(crate::upstream::unix_time);
    if let Some(expiry) = expiry {
        telemetry.metrics.set_certificate_expiry(which, expiry);
    }
}

async fn accept_unix(listener: Option<&UnixListener>) -> io::Result<UnixStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

async fn handle(
    shared: &Shared,
    admission: &Arc<Admission>,
    conn: Accepted,
    shutdown: &CancellationToken,
) {
    let metrics = &shared.telemetry.metrics;
    match conn {
        Accepted::Tcp(mut stream, address) => {
            metrics.accepted(Listener::Tcp).increment(1);
            let _ = stream.set_nodelay(true);
            let peer = Peer::Tcp(address);
            if let Some(ticket) = admit(shared, admission, &peer, Some(&mut stream)).await {
                Box::pin(serve(shared, stream, peer, ticket, shutdown)).await;
            }
        }
        Accepted::Unix(mut stream) => {
            metrics.accepted(Listener::Unix).increment(1);
            let uid = stream.peer_cred().ok().map(|c| c.uid());
            let peer = Peer::Unix(uid);
            if let Some(ticket) = admit(shared, admission, &peer, Some(&mut stream)).await {
                Box::pin(serve(shared, stream, peer, ticket, shutdown)).await;
            }
        }
        Accepted::Tls(stream, address, acceptor) => {
            metrics.accepted(Listener::Tls).increment(1);
            let _ = stream.set_nodelay(true);
            let peer = Peer::Tls(address);
            // Before the handshake a refusal cannot be read: just close.
            let Some(ticket) = admit::<TcpStream>(shared, admission, &peer, None).await else {
                return;
            };
            // Boxed, like each `serve` here: a connection's task holds only
            // the state of the path it takes (a TCP client's no TLS state).
            let handshake = Box::pin(tokio::time::timeout(
                CLIENT_HANDSHAKE_TIMEOUT,
                acceptor.accept(stream),
            ));
            let handshake = tokio::select! {
                done = handshake => done,
                _ = ticket.evicted().cancelled() => {
                    metrics.rejected(Rejection::Evicted).increment(1);
                    return;
                }
            };
            match handshake {
                Ok(Ok(tls)) => Box::pin(serve(shared, tls, peer, ticket, shutdown)).await,
                Ok(Err(err)) => {
                    metrics.rejected(Rejection::TlsHandshake).increment(1);
                    info!(%peer, error = %err, "client TLS handshake failed");
                }
                Err(_) => {
                    metrics.rejected(Rejection::TlsHandshake).increment(1);
                    info!(%peer, "client TLS handshake timed out");
                }
            }
        }
    }
}

/// A slot for the connection, or the refusal sent (when it can be read)
/// and counted.
async fn admit<C: AsyncWrite + Unpin>(
    shared: &Shared,
    admission: &Arc<Admission>,
    peer: &Peer,
    client: Option<&mut C>,
) -> Option<Ticket> {
    let (reason, text) = match admission.admit(peer).await {
        Ok(ticket) => return Some(ticket),
        Err(Refused::Full) => {
            warn!(%peer, "connection refused: listen.max_connections reached");
            (Rejection::Limit, "ERR max number of clients reached")
        }
        Err(Refused::PeerFull) => {
            warn!(%peer, "connection refused: listen.max_connections_per_peer reached");
            (
                Rejection::PeerLimit,
                "ERR redcloak: too many connections from this peer (listen.max_connections_per_peer)",
            )
        }
    };
    shared.telemetry.metrics.rejected(reason).increment(1);
    if let Some(client) = client {
        refuse(client, text).await;
    }
    None
}

async fn serve<C>(
    shared: &Shared,
    mut client: C,
    peer: Peer,
    mut ticket: Ticket,
    shutdown: &CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let telemetry = &shared.telemetry;
    if let Some(remaining) = shared.session.locked_out(&peer) {
        telemetry.metrics.rejected(Rejection::Auth).increment(1);
        refuse(&mut client, &session::lockout_error(&peer, remaining)).await;
        return;
    }
    let _active = ActiveConnection::open(&telemetry.metrics.connections_active);
    debug!(%peer, "client connected");
    let mut client = session::Client::new(&shared.session, client);
    // Until it says something, a client holds no upstream connection, and
    // its slot is the first to go when every slot is taken.
    let idle = shared.session.idle_timeout;
    let spoke = tokio::select! {
        _ = shutdown.cancelled() => return,
        spoke = client.wait_for_request() => spoke,
        _ = ticket.evicted().cancelled() => {
            telemetry.metrics.rejected(Rejection::Evicted).increment(1);
            refuse(client.stream(), "ERR max number of clients reached").await;
            return;
        }
        _ = tokio::time::sleep(idle.unwrap_or_default()), if idle.is_some() => return,
    };
    if !matches!(spoke, Ok(true)) {
        return;
    }
    ticket.spoke();
    // Clients start on a lane; a request that needs a connection of its own
    // pins the client to one from the pool until it is parked. Each path is
    // boxed, so a client's task holds the state of the path it is on, not
    // that of the largest (an idle client on a lane: 22.6 KiB instead of
    // 36.9, docs/performance.md).
    let mut pinned = shared.lanes.is_none();
    loop {
        let (result, next_client) = match (&shared.lanes, pinned) {
            (Some(lanes), false) => {
                let local = client.local_state();
                let key = LaneKey {
                    database: local.database,
                    protocol: local.protocol(),
                    bulk: false,
                };
                let lane = match Box::pin(lanes.attach(key)).await {
                    Ok(lane) => lane,
                    Err(err) => return upstream_unavailable(shared, client, &peer, &err).await,
                };
                let end = Box::pin(session::run_on_lane(
                    &shared.session,
                    client,
                    lane,
                    &peer,
                    shutdown,
                ))
                .await;
                (end.result, end.client)
            }
            _ => match Box::pin(serve_pinned(shared, client, &peer, shutdown)).await {
                Some(served) => served,
                None => return,
            },
        };
        match (&result, &next_client) {
            (Ok(()), Some((_, Next::Park))) => debug!(%peer, "client parked"),
            (Ok(()), Some((_, Next::Pin))) => debug!(%peer, "client pinned"),
            (Ok(()), None) => debug!(%peer, "client disconnected"),
            (Err(err), _) => info!(%peer, error = %err, "connection closed"),
        }
        let Some((next_client, next)) = next_client else {
            return;
        };
        client = next_client;
        if next == Next::Pin {
            telemetry.metrics.client_pins.increment(1);
            pinned = true;
            continue;
        }
        // Parked: back on a lane when it sends again.
        pinned = shared.lanes.is_none();
        // A parked client was already quiet for release_idle_after.
        let idle_left = shared.session.idle_timeout.map(|timeout| {
            let parked_after = shared.session.release_idle_after.unwrap_or_default();
            timeout.saturating_sub(parked_after)
        });
        let sent = tokio::select! {
            _ = shutdown.cancelled() => return,
            sent = client.wait_for_request() => sent,
            _ = tokio::time::sleep(idle_left.unwrap_or_default()), if idle_left.is_some() => {
                debug!(%peer, "idle client closed (listen.idle_timeout)");
                return;
            }
        };
        if !matches!(sent, Ok(true)) {
            debug!(%peer, "client disconnected");
            return;
        }
    }
}

/// Sends the commands that restore a client's lane state on a connection.
async fn replay<C: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    upstream: &mut crate::upstream::UpstreamStream,
    client: &session::Client<C>,
) -> Result<(), String> {
    let timeout = shared.pool.upstream().settings().connect_timeout;
    for (args, must_succeed) in crate::policy::local::replay(client.local_state()) {
        let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        let reply = crate::upstream::call(upstream, &args, timeout).await?;
        if must_succeed && reply.first() == Some(&b'-') {
            return Err(crate::upstream::error_text(&reply));
        }
    }
    Ok(())
}

/// What a session's end says: how it went, and the client if it is to be
/// served again.
type Served<C> = (
    Result<(), session::SessionError>,
    Option<(session::Client<C>, Next)>,
);

/// Serves a client on a connection of its own from the pool, its lane
/// state replayed there first, and gives the connection back. `None`: the
/// client was answered with an error and closed.
async fn serve_pinned<C>(
    shared: &Shared,
    mut client: session::Client<C>,
    peer: &Peer,
    shutdown: &CancellationToken,
) -> Option<Served<C>>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(topology) = &shared.cluster {
        return Some(serve_routed(shared, client, peer, shutdown, topology.clone()).await);
    }
    let Lent {
        stream: mut upstream,
        generation,
    } = match Box::pin(shared.pool.take()).await {
        Ok(lent) => lent,
        Err(err) => {
            let err = LaneOpenError::Upstream(err);
            upstream_unavailable(shared, client, peer, &err).await;
            return None;
        }
    };
    // What the client told redcloak on lanes, Redis now hears.
    let replayed = !client.local_state().is_default();
    if replayed && let Err(text) = Box::pin(replay(shared, &mut upstream, &client)).await {
        shared.pool.give_back(None).await;
        warn!(%peer, error = %text, "restoring the client's connection state failed");
        let text = format!("ERR redcloak: cannot restore the connection state: {text}");
        refuse(client.stream(), &text).await;
        return None;
    }
    let end = session::run(&shared.session, client, upstream, peer, shutdown).await;
    // At shutdown nothing more will be served: the connection just closes.
    let reusable = end
        .upstream
        .filter(|_| !shutdown.is_cancelled())
        .map(|(stream, leaves)| {
            let lent = Lent { stream, generation };
            match replayed {
                true => (lent, leaves.max(Leaves::Session)),
                false => (lent, leaves),
            }
        });
    shared.pool.give_back(reusable).await;
    Some((end.result, end.client))
}

/// Serves a client in front of a Redis Cluster: the session talks to a
/// router (through an in-memory pipe, as to one Redis) that sends each
/// request to its slot's primary and hands the replies back in order.
async fn serve_routed<C>(
    shared: &Shared,
    client: session::Client<C>,
    peer: &Peer,
    shutdown: &CancellationToken,
    topology: Arc<crate::cluster::router::Topology>,
) -> Served<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let limits = shared.session.reply_limits.clone();
    let (session_side, router_side) = tokio::io::duplex(64 * 1024);
    let router = crate::cluster::router::Router::new(topology, limits.clone());
    // The router runs in the session's own task: a request and its reply
    // cross the pipe without waking another task.
    let routing = crate::cluster::router::serve(router_side, router, limits);
    let session = session::run(&shared.session, client, session_side, peer, shutdown);
    tokio::pin!(routing, session);
    let mut routed = false;
    let end = loop {
        tokio::select! {
            end = &mut session => break end,
            // The router ended (a node lost): the session sees the pipe
            // close and ends in its turn.
            () = &mut routing, if !routed => routed = true,
        }
    };
    // The session is over: the router goes with it (its own node
    // connections close; its lane seats are left, their late replies
    // dropped by the lanes).
    drop(end.upstream);
    (end.result, end.client)
}

/// Redis cannot be reached: the client is told so and closed.
async fn upstream_unavailable<C: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut client: session::Client<C>,
    peer: &Peer,
    err: &LaneOpenError,
) {
    if let LaneOpenError::Upstream(err) = err {
        shared.telemetry.set_upstream(Err(err.to_string()));
    }
    warn!(%peer, error = %err, "upstream connection failed");
    let text = format!("ERR redcloak: {err}");
    refuse(client.stream(), &text).await;
}

/// Counts a client connection in the active gauge while it lives.
struct ActiveConnection<'a>(&'a ::metrics::Gauge);

impl<'a> ActiveConnection<'a> {
    fn open(gauge: &'a ::metrics::Gauge) -> Self {
        gauge.increment(1.0);
        ActiveConnection(gauge)
    }
}

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Sends one error reply and closes.
async fn refuse<C: AsyncWrite + Unpin>(client: &mut C, text: &str) {
    let mut reply = bytes::BytesMut::new();
    crate::resp::encode_error(&mut reply, text);
    let _ = tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, async {
        client.write_all(&reply).await?;
        client.shutdown().await
    })
    .await;
}
