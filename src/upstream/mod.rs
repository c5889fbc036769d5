//! The only way bytes reach Redis: TCP, then TLS (Redis's certificate
//! verified against `upstream.ca` and `upstream.server_name`, redcloak's
//! client certificate presented), then AUTH with redcloak's credentials.
//!
//! A connection is handed out only after AUTH answered `+OK`. Nothing here
//! can produce a plaintext or unauthenticated connection: there is no type
//! for one. Errors say which step failed and what to check; they never
//! contain the password.

pub mod check;
pub mod lane;
pub mod pool;

use crate::resp::{self, Limits, ReplyScanner};
use crate::secret::Secret;
use crate::telemetry::events;
use crate::telemetry::metrics::{Certificate, Metrics, UpstreamFailure};
use arc_swap::ArcSwap;
use bytes::BytesMut;
use rustls_pki_types::ServerName;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// An authenticated TLS connection to Redis.
pub type UpstreamStream = tokio_rustls::client::TlsStream<TcpStream>;

/// redcloak's own Redis credentials.
#[derive(Debug)]
pub struct Login {
    pub username: Option<String>,
    pub password: Secret,
}

/// Writes and flushes `out`, which holds redcloak's AUTH, and wipes it
/// before it is freed (written or not).
pub(crate) async fn write_wiped<S: AsyncWrite + Unpin>(
    stream: &mut S,
    mut out: BytesMut,
) -> io::Result<()> {
    let written = stream.write_all(&out).await;
    zeroize::Zeroize::zeroize(&mut out[..]);
    written?;
    stream.flush().await
}

impl Login {
    /// Appends `AUTH [username] password` to `out`.
    pub fn encode_auth(&self, out: &mut BytesMut) {
        match &self.username {
            Some(user) => {
                resp::encode_command(out, &[b"AUTH", user.as_bytes(), self.password.expose()])
            }
            None => resp::encode_command(out, &[&b"AUTH"[..], self.password.expose()]),
        }
    }
}

/// TCP keepalive on every upstream connection: a Redis host that vanished
/// (power loss, a partition) is noticed in about 30 s even on a connection
/// with nothing pending, instead of never.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(15))
    .with_interval(Duration::from_secs(5))
    .with_retries(3);

/// Where Redis is and how to reach it.
#[derive(Debug)]
pub struct UpstreamSettings {
    pub address: String,
    pub server_name: String,
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    TlsConfig(#[from] crate::tls::TlsError),
    #[error("invalid upstream.server_name '{0}': not a DNS name or IP address")]
    ServerName(String),
    #[error("cannot connect to Redis at {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("TLS handshake with Redis at {address} failed: {reason}{hint}")]
    Tls {
        address: String,
        reason: String,
        hint: &'static str,
    },
    #[error(
        "Redis at {address} refused redcloak's AUTH as user '{user}': {reply} (check upstream.username and the password)"
    )]
    Auth {
        address: String,
        user: String,
        reply: String,
    },
    #[error(
        "Redis at {address} closed the connection or sent an invalid reply during login: {reason}{hint}"
    )]
    Login {
        address: String,
        reason: String,
        hint: &'static str,
    },
    #[error(
        "no answer from Redis at {address} within upstream.connect_timeout ({timeout:?}) while {stage}"
    )]
    Timeout {
        address: String,
        timeout: Duration,
        stage: &'static str,
    },
}

impl UpstreamError {
    /// Redis (or something in its place) refused redcloak: its certificate
    /// failed verification, or it refused redcloak's certificate or login.
    /// Not a refused connection, and not a hang: those are outages.
    pub fn is_rejection(&self) -> bool {
        match self {
            UpstreamError::Tls { .. } | UpstreamError::Auth { .. } => true,
            UpstreamError::Login { hint, .. } => !hint.is_empty(),
            _ => false,
        }
    }

    /// The step that failed, as metrics count it.
    pub fn failed_step(&self) -> UpstreamFailure {
        match self {
            UpstreamError::TlsConfig(_)
            | UpstreamError::ServerName(_)
            | UpstreamError::Connect { .. } => UpstreamFailure::Connect,
            UpstreamError::Tls { .. } => UpstreamFailure::Tls,
            // With TLS 1.3 a rejected client certificate shows up at login.
            UpstreamError::Login { hint, .. } if !hint.is_empty() => UpstreamFailure::Tls,
            UpstreamError::Auth { .. } | UpstreamError::Login { .. } => UpstreamFailure::Auth,
            UpstreamError::Timeout { stage, .. } => match *stage {
                STAGE_CONNECT => UpstreamFailure::Connect,
                STAGE_TLS => UpstreamFailure::Tls,
                _ => UpstreamFailure::Auth,
            },
        }
    }
}

const STAGE_CONNECT: &str = "connecting";
const STAGE_TLS: &str = "in the TLS handshake";

pub struct Upstream {
    settings: UpstreamSettings,
    server_name: ServerName<'static>,
    /// The TLS client configuration and credentials new connections use:
    /// replaced whole by a reload, read whole by each connection. Shared
    /// with the upstreams of other nodes of the same cluster ([`Upstream::node`]).
    material: Arc<ArcSwap<Material>>,
    /// The certificate Redis showed last, so each new connection neither
    /// parses it again nor repeats the same warning.
    last_certificate: Mutex<Option<SeenCertificate>>,
    /// Where new connections go: `settings.address`, or the primary
    /// Sentinel names now ([`Upstream::retarget`]).
    target: ArcSwap<String>,
    /// Counts retargets: sessions on a connection to the old primary end.
    switches: tokio::sync::watch::Sender<u64>,
}

/// What a connection to Redis is made with: redcloak's TLS configuration
/// (Redis's CA, its own certificate and key) and its login. Reloaded as one.
#[derive(Clone)]
pub struct Material {
    connector: TlsConnector,
    login: Arc<Login>,
    /// Counts reloads: connections made with an older one are replaced.
    generation: u64,
}

impl Material {
    pub fn new(tls: Arc<rustls::ClientConfig>, login: Arc<Login>) -> Material {
        Material {
            connector: TlsConnector::from(tls),
            login,
            generation: 0,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

struct SeenCertificate {
    der: Vec<u8>,
    expiry: Option<SystemTime>,
    /// Days left when the expiry warning was last logged.
    warned_at_days: Option<i64>,
}

impl Upstream {
    /// The upstream described by `[upstream]`, with its TLS configuration
    /// loaded and its own copy of the password.
    pub fn from_config(config: &crate::config::UpstreamConfig) -> Result<Self, UpstreamError> {
        let tls = crate::tls::client::config(&config.ca, &config.cert, &config.key)?;
        let login = Login {
            username: config.username.clone(),
            password: Secret::new(config.password.expose().to_vec()),
        };
        let settings = UpstreamSettings {
            address: config.address.clone(),
            server_name: config.server_name.clone(),
            connect_timeout: config.connect_timeout,
        };
        Self::new(settings, tls, Arc::new(login))
    }

    pub fn new(
        settings: UpstreamSettings,
        tls: Arc<rustls::ClientConfig>,
        login: Arc<Login>,
    ) -> Result<Self, UpstreamError> {
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|_| UpstreamError::ServerName(settings.server_name.clone()))?;
        Ok(Upstream {
            target: ArcSwap::from_pointee(settings.address.clone()),
            settings,
            server_name,
            material: Arc::new(ArcSwap::from_pointee(Material::new(tls, login))),
            last_certificate: Mutex::new(None),
            switches: tokio::sync::watch::Sender::new(0),
        })
    }

    /// A copy of this upstream (the same Redis) that connects with
    /// `material`: a reload proves new material with it before publishing.
    pub fn with_material(&self, material: Material) -> Upstream {
        let address = self.address();
        Upstream {
            target: ArcSwap::from_pointee(address.clone()),
            settings: UpstreamSettings {
                address,
                server_name: self.settings.server_name.clone(),
                connect_timeout: self.settings.connect_timeout,
            },
            server_name: self.server_name.clone(),
            material: Arc::new(ArcSwap::from_pointee(material)),
            last_certificate: Mutex::new(None),
            switches: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Another node of the same Redis Cluster: its address (as the
    /// cluster announces it), the name its certificate must show, and this
    /// upstream's material (shared: a reload reaches every node).
    pub fn node(&self, address: String, server_name: &str) -> Result<Upstream, UpstreamError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| UpstreamError::ServerName(server_name.to_owned()))?;
        Ok(Upstream {
            target: ArcSwap::from_pointee(address.clone()),
            settings: UpstreamSettings {
                address,
                server_name: server_name.to_owned(),
                connect_timeout: self.settings.connect_timeout,
            },
            server_name: name,
            material: self.material.clone(),
            last_certificate: Mutex::new(None),
            switches: tokio::sync::watch::Sender::new(0),
        })
    }

    /// New connections use `material` from now on; established ones keep
    /// their TLS sessions. Returns its generation.
    pub fn publish(&self, mut material: Material) -> u64 {
        let generation = self.material.load().generation + 1;
        material.generation = generation;
        self.material.store(Arc::new(material));
        generation
    }

    /// The material new connections are made with now.
    pub fn material(&self) -> Arc<Material> {
        self.material.load_full()
    }

    /// When Redis's certificate on `tls` expires (parsed once per
    /// certificate); logs a warning when that is within 30 days (once a day,
    /// not once per connection).
    pub(crate) fn certificate_expiry(&self, tls: &UpstreamStream) -> Option<SystemTime> {
        let der = tls.get_ref().1.peer_certificates()?.first()?;
        let mut last = self
            .last_certificate
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let seen = match &mut *last {
            Some(seen) if seen.der[..] == der[..] => seen,
            last => last.insert(SeenCertificate {
                der: der.to_vec(),
                expiry: crate::tls::inspect::expiry(der),
                warned_at_days: None,
            }),
        };
        if let Some(days) = seen.expiry.and_then(crate::tls::inspect::days_left)
            && days < 30
            && seen.warned_at_days != Some(days)
        {
            seen.warned_at_days = Some(days);
            tracing::warn!(days_left = days, "Redis's TLS certificate expires soon");
        }
        seen.expiry
    }

    /// redcloak's login as of now (a reload may change the password).
    pub fn login(&self) -> Arc<Login> {
        self.material.load().login.clone()
    }

    /// Where new connections go now.
    pub fn address(&self) -> String {
        self.target.load().as_ref().clone()
    }

    /// New connections go to `address` from now on (Sentinel named a new
    /// primary, verified against the same `server_name`); sessions on a
    /// connection to the old one hear it through [`Upstream::switches`].
    pub fn retarget(&self, address: String) {
        self.target.store(Arc::new(address));
        self.switches.send_modify(|count| *count += 1);
    }

    /// Changes each time the upstream is retargeted.
    pub fn switches(&self) -> tokio::sync::watch::Receiver<u64> {
        self.switches.subscribe()
    }

    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// Opens a new connection: TCP, TLS, AUTH, each within the connect timeout.
    pub async fn connect(&self) -> Result<UpstreamStream, UpstreamError> {
        self.open(None).await
    }

    /// [`Upstream::connect`], counted in `metrics`: the handshake's duration,
    /// success or the failed step, Redis's certificate expiry. A rejected
    /// certificate or login is also a security event.
    pub async fn connect_counted(
        &self,
        metrics: &Metrics,
    ) -> Result<UpstreamStream, UpstreamError> {
        self.open(Some(metrics)).await
    }

    async fn open(&self, metrics: Option<&Metrics>) -> Result<UpstreamStream, UpstreamError> {
        let started = std::time::Instant::now();
        let material = self.material.load_full();
        let connected: Result<UpstreamStream, UpstreamError> = async {
            let mut tls = self.handshake_with(&material.connector).await?;
            let expiry = self.certificate_expiry(&tls).and_then(unix_time);
            if let Some(metrics) = metrics {
                let handshake = started.elapsed().as_secs_f64();
                metrics.upstream_handshake.record(handshake);
                if let Some(expiry) = expiry {
                    metrics.set_certificate_expiry(Certificate::RedisServer, expiry);
                }
            }
            self.log_in(&mut tls, &material.login).await?;
            Ok(tls)
        }
        .await;
        let Some(metrics) = metrics else {
            return connected;
        };
        match &connected {
            Ok(_) => metrics.upstream_connections.increment(1),
            Err(err) => {
                let step = err.failed_step();
                metrics.upstream_failure(step).increment(1);
                if err.is_rejection() {
                    events::upstream_rejected(&self.address(), step, err);
                }
            }
        }
        connected
    }

    /// TCP and a TLS handshake with `connector`, no AUTH yet. The startup
    /// checks probe with other TLS configurations through this.
    pub async fn handshake_with(
        &self,
        connector: &TlsConnector,
    ) -> Result<UpstreamStream, UpstreamError> {
        let address = self.address();
        let tcp = self
            .step(STAGE_CONNECT, TcpStream::connect(address.as_str()))
            .await?
            .map_err(|source| UpstreamError::Connect {
                address: address.clone(),
                source,
            })?;
        tcp.set_nodelay(true)
            .and_then(|()| socket2::SockRef::from(&tcp).set_tcp_keepalive(&KEEPALIVE))
            .map_err(|source| UpstreamError::Connect {
                address: address.clone(),
                source,
            })?;
        self.step(STAGE_TLS, connector.connect(self.server_name.clone(), tcp))
            .await?
            .map_err(|err| UpstreamError::Tls {
                address: address.clone(),
                hint: tls_hint(&err),
                reason: err.to_string(),
            })
    }

    /// The TLS handshake with redcloak's own configuration.
    pub async fn handshake(&self) -> Result<UpstreamStream, UpstreamError> {
        let material = self.material.load_full();
        self.handshake_with(&material.connector).await
    }

    /// Logs a TLS connection in with redcloak's credentials.
    /// AUTH with `login` on a new connection.
    pub async fn log_in(
        &self,
        tls: &mut UpstreamStream,
        login: &Login,
    ) -> Result<(), UpstreamError> {
        self.step("logging in", self.send_auth(tls, login)).await?
    }

    async fn step<F: Future>(
        &self,
        stage: &'static str,
        future: F,
    ) -> Result<F::Output, UpstreamError> {
        tokio::time::timeout(self.settings.connect_timeout, future)
            .await
            .map_err(|_| UpstreamError::Timeout {
                address: self.address(),
                timeout: self.settings.connect_timeout,
                stage,
            })
    }

    async fn send_auth(
        &self,
        tls: &mut UpstreamStream,
        login: &Login,
    ) -> Result<(), UpstreamError> {
        // With TLS 1.3, Redis rejects our certificate only after the
        // handshake: the alert arrives here, so it gets the same hints.
        let login_error = |err: io::Error| UpstreamError::Login {
            address: self.address(),
            hint: tls_hint(&err),
            reason: err.to_string(),
        };
        let mut out = BytesMut::new();
        login.encode_auth(&mut out);
        write_wiped(tls, out).await.map_err(login_error)?;
        // A login reply is a short line: bound it tightly.
        let limits = Limits {
            max_bulk_bytes: 4096,
            max_reply_bytes: 8192,
            ..Limits::default()
        };
        let reply = read_reply(tls, &limits).await.map_err(login_error)?;
        if reply.as_ref() == b"+OK\r\n" {
            return Ok(());
        }
        let text = String::from_utf8_lossy(reply.strip_suffix(b"\r\n").unwrap_or(&reply));
        Err(UpstreamError::Auth {
            address: self.address(),
            user: login.username.clone().unwrap_or_else(|| "default".into()),
            reply: text.trim_start_matches(['-', '+']).to_owned(),
        })
    }
}

/// Sends one command and reads its reply, within `timeout` (startup probes,
/// the readiness check, the playground's demonstration).
pub(crate) async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    args: &[&[u8]],
    timeout: Duration,
) -> Result<bytes::Bytes, String> {
    let exchange = async {
        let mut out = BytesMut::new();
        resp::encode_command(&mut out, args);
        stream.write_all(&out).await?;
        stream.flush().await?;
        read_reply(stream, &Limits::default()).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(reply)) => Ok(reply.freeze()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("no answer in time".to_owned()),
    }
}

/// Redis's reply as text for an error message, without an error's `-`.
pub(crate) fn error_text(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply.trim_ascii_end())
        .trim_start_matches('-')
        .to_owned()
}

/// Reads one complete reply within `limits` (login replies, startup probes).
/// Bytes after it are dropped: for exchanges of one request and one reply.
pub(crate) async fn read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    limits: &Limits,
) -> io::Result<BytesMut> {
    ReplyReader::default().next(stream, limits).await
}

/// Reads replies one at a time, keeping bytes that arrived early.
#[derive(Default)]
pub struct ReplyReader {
    scanner: ReplyScanner,
    buf: BytesMut,
}

impl ReplyReader {
    pub async fn next<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        limits: &Limits,
    ) -> io::Result<BytesMut> {
        loop {
            let scanned = self
                .scanner
                .scan(&self.buf, limits)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let Some(len) = scanned {
                return Ok(self.buf.split_to(len));
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// True when no byte beyond the replies read so far has arrived.
    pub(crate) fn is_drained(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Seconds since the unix epoch.
pub fn unix_time(at: SystemTime) -> Option<u64> {
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// Names the likely cause of a TLS failure.
fn tls_hint(err: &io::Error) -> &'static str {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as E};
    match err.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature)) => {
            " (Redis's certificate is not signed by upstream.ca)"
        }
        Some(E::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        )) => {
            " (Redis's certificate does not name upstream.server_name; set it to a name in the certificate's SAN)"
        }
        Some(E::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. })) => {
            " (Redis's certificate has expired)"
        }
        Some(E::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateRequired
            | Alert::CertificateUnknown,
        )) => {
            " (Redis rejected redcloak's client certificate: upstream.cert must be signed by Redis's tls-ca-cert-file)"
        }
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. }) => {
            " (is that a TLS port? Redis must listen with tls-port)"
        }
        _ if matches!(
            err.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        ) =>
        {
            " (Redis closed the connection: is that a TLS port, and does Redis trust upstream.cert?)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_are_rejections_never_a_hang_or_a_closed_port() {
        let address = "redis:6379".to_owned();
        let hang = UpstreamError::Timeout {
            address: address.clone(),
            timeout: Duration::from_secs(5),
            stage: STAGE_TLS,
        };
        let closed = UpstreamError::Connect {
            address: address.clone(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let untrusted = UpstreamError::Tls {
            address: address.clone(),
            reason: "invalid peer certificate".into(),
            hint: "",
        };
        let login = UpstreamError::Auth {
            address,
            user: "redcloak".into(),
            reply: "WRONGPASS".into(),
        };
        assert!(!hang.is_rejection());
        assert!(!closed.is_rejection());
        assert!(untrusted.is_rejection());
        assert!(login.is_rejection());
    }
}
