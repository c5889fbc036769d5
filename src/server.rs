//! Listeners, the accept loop, the connection limit, and one session task per
//! client. Everything that can be wrong in the configuration (certificates,
//! keys, names) is checked in [`Server::bind`], before any listener opens.
//!
//! On shutdown the listeners close first (the unix socket file is removed),
//! then sessions drain: they stop reading requests, deliver what is pending,
//! and close. Sessions still busy after the grace period are dropped.

use crate::auth::{ClientAuth, Credentials};
use crate::config::{Config, UnixListenConfig};
use crate::crypto::envelope;
use crate::policy::Policy;
use crate::policy::rules::Rules;
use crate::resp::Limits;
use crate::session::{self, SessionContext};
use crate::tls::{self, TlsError};
use crate::upstream::{Upstream, UpstreamError};
use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long a client has to finish its TLS handshake.
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
}

impl StartError {
    /// True when fixing the configuration fixes the error.
    pub fn is_config(&self) -> bool {
        !matches!(self, StartError::Bind { .. })
    }
}

struct Shared {
    session: SessionContext,
    upstream: Upstream,
}

pub struct Server {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    tls: Option<(TcpListener, TlsAcceptor)>,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    grace_period: Duration,
}

enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
    Tls(TcpStream, SocketAddr, TlsAcceptor),
}

impl Server {
    /// Validates certificates and names, then opens every listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let upstream = Upstream::from_config(&config.upstream)?;
        let listener_tls = match &config.listen.tls {
            Some(t) => Some(tls::server::config(
                &t.cert,
                &t.key,
                t.client_ca.as_deref(),
            )?),
            None => None,
        };
        let client_auth = ClientAuth::new(config.listen.auth.map(|a| Credentials {
            username: a.username,
            password: a.password,
        }));
        let encryption = config.encryption;
        let policy = Policy::new(
            client_auth,
            Rules::new(encryption.rules),
            Arc::new(encryption.keyring),
            encryption.unknown_commands,
        );
        let reply_limits = Limits {
            max_bulk_bytes: config.limits.resp.max_bulk_bytes + envelope::OVERHEAD,
            ..config.limits.resp.clone()
        };
        let session = SessionContext {
            policy,
            reply_limits,
            limits: config.limits.resp,
            max_pending_requests: config.limits.max_pending_requests,
            client_write_timeout: config.limits.client_write_timeout,
            upstream_login: upstream.login().clone(),
        };
        let tcp = match config.listen.tcp {
            Some(address) => Some(bind_tcp(address).await?),
            None => None,
        };
        let unix = config.listen.unix.as_ref().map(bind_unix).transpose()?;
        let tls = match (config.listen.tls, listener_tls) {
            (Some(t), Some(server_config)) => {
                Some((bind_tcp(t.address).await?, TlsAcceptor::from(server_config)))
            }
            _ => None,
        };
        Ok(Server {
            tcp,
            unix,
            tls,
            shared: Arc::new(Shared { session, upstream }),
            connections: Arc::new(Semaphore::new(config.listen.max_connections)),
            grace_period: config.shutdown_grace_period,
        })
    }

    /// The plaintext TCP listener's address (its port when configured as 0).
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn tls_address(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Accepts clients until `shutdown`, then drains.
    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(
            tcp = ?self.tcp_address(),
            tls = ?self.tls_address(),
            unix = ?self.unix.as_ref().map(|(_, p)| p),
            upstream = self.shared.upstream.address(),
            "redcloak serving"
        );
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
                    let permit = self.connections.clone().try_acquire_owned().ok();
                    let shared = self.shared.clone();
                    let shutdown = shutdown.clone();
                    sessions.spawn(async move { handle(&shared, conn, permit, &shutdown).await });
                }
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        self.close_listeners();
        sessions.close();
        info!(connections = sessions.len(), grace_period = ?self.grace_period, "draining");
        if tokio::time::timeout(self.grace_period, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                connections = sessions.len(),
                "grace period over: closing the remaining connections"
            );
        }
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

/// Binds the socket (replacing a stale one) and sets its mode.
fn bind_unix(config: &UnixListenConfig) -> Result<(UnixListener, PathBuf), StartError> {
    let bind_error = |source| StartError::Bind {
        what: config.path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(&config.path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(&config.path).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(&config.path).map_err(bind_error)?;
    std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(config.mode))
        .map_err(bind_error)?;
    Ok((listener, config.path.clone()))
}

async fn accept_tcp(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_tls(listener: Option<&(TcpListener, TlsAcceptor)>) -> io::Result<Accepted> {
    match listener {
        Some((listener, acceptor)) => {
            let (stream, peer) = listener.accept().await?;
            Ok(Accepted::Tls(stream, peer, acceptor.clone()))
        }
        None => std::future::pending().await,
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
    conn: Accepted,
    permit: Option<OwnedSemaphorePermit>,
    shutdown: &CancellationToken,
) {
    match conn {
        Accepted::Tcp(stream, peer) => {
            let _ = stream.set_nodelay(true);
            serve(shared, stream, peer, permit, shutdown).await;
        }
        Accepted::Unix(stream) => serve(shared, stream, "unix socket", permit, shutdown).await,
        Accepted::Tls(stream, peer, acceptor) => {
            let _ = stream.set_nodelay(true);
            match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve(shared, tls, peer, permit, shutdown).await,
                Ok(Err(err)) => info!(%peer, error = %err, "client TLS handshake failed"),
                Err(_) => info!(%peer, "client TLS handshake timed out"),
            }
        }
    }
}

async fn serve<C>(
    shared: &Shared,
    mut client: C,
    peer: impl Display,
    permit: Option<OwnedSemaphorePermit>,
    shutdown: &CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Some(_permit) = permit else {
        warn!(%peer, "connection refused: listen.max_connections reached");
        refuse(&mut client, "ERR max number of clients reached").await;
        return;
    };
    let upstream = match shared.upstream.connect().await {
        Ok(upstream) => upstream,
        Err(err) => {
            warn!(%peer, error = %err, "upstream connection failed");
            refuse(
                &mut client,
                &format!("ERR redcloak: upstream unavailable: {err}"),
            )
            .await;
            return;
        }
    };
    debug!(%peer, "client connected");
    match session::run(&shared.session, client, upstream, shutdown).await {
        Ok(()) => debug!(%peer, "client disconnected"),
        Err(err) => info!(%peer, error = %err, "connection closed"),
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
