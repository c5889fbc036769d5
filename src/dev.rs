//! Throwaway development setup: a CA and certificates made with rcgen, and a
//! child `redis-server` that is TLS-only (`port 0`), requires client
//! certificates, has the default user off and one ACL user with a random
//! password, and saves nothing to disk. `redcloak dev` and the integration
//! tests both use it. Nothing here is meant for production certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "redis-server is not installed: install it (Debian/Ubuntu: apt-get install redis-server) and try again"
    )]
    RedisMissing,
    #[error("redis-server did not start: {0}")]
    RedisStart(String),
    #[error("no secure random bytes: {0}")]
    Random(String),
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A certificate and its private key, PEM encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A development certificate authority.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Authority {
    pub fn new(name: &str) -> Result<Self, DevError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A leaf certificate for `hosts` (DNS names or IP addresses).
    pub fn issue(
        &self,
        common_name: &str,
        hosts: &[&str],
        usage: Usage,
    ) -> Result<Issued, DevError> {
        self.issue_with(common_name, hosts, usage, |_| {})
    }

    /// Like [`Authority::issue`], with a hook to change the parameters
    /// (validity dates, for tests of expiry).
    pub fn issue_with(
        &self,
        common_name: &str,
        hosts: &[&str],
        usage: Usage,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Result<Issued, DevError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Paths of a development certificate set.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: PathBuf,
    pub redis_cert: PathBuf,
    pub redis_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Writes a CA, a Redis server certificate for `hosts` and a client
/// certificate for redcloak's upstream side into `dir` (keys mode 0600).
pub fn write_dev_certs(dir: &Path, hosts: &[&str]) -> Result<DevCerts, DevError> {
    write_dev_certs_with(dir, hosts, |_| {})
}

/// Like [`write_dev_certs`], with a hook on the Redis certificate's
/// parameters (validity dates, for tests of expiry).
pub fn write_dev_certs_with(
    dir: &Path,
    hosts: &[&str],
    adjust_redis: impl FnOnce(&mut CertificateParams),
) -> Result<DevCerts, DevError> {
    let ca = Authority::new("redcloak development CA")?;
    let redis = ca.issue_with("redis", hosts, Usage::Server, adjust_redis)?;
    let client = ca.issue("redcloak", &[], Usage::Client)?;
    let certs = DevCerts {
        ca: dir.join("ca.crt"),
        redis_cert: dir.join("redis.crt"),
        redis_key: dir.join("redis.key"),
        client_cert: dir.join("redcloak-client.crt"),
        client_key: dir.join("redcloak-client.key"),
    };
    write_file(&certs.ca, ca.cert_pem().as_bytes(), 0o644)?;
    write_file(&certs.redis_cert, redis.cert_pem.as_bytes(), 0o644)?;
    write_file(&certs.redis_key, redis.key_pem.as_bytes(), 0o600)?;
    write_file(&certs.client_cert, client.cert_pem.as_bytes(), 0o644)?;
    write_file(&certs.client_key, client.key_pem.as_bytes(), 0o600)?;
    Ok(certs)
}

/// Writes a file with `mode`, replacing any old one.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), DevError> {
    let file_error = |source| DevError::File {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(file_error)?;
    file.write_all(contents).map_err(file_error)
}

/// A random password: 32 bytes from the OS, hex encoded.
pub fn random_password() -> Result<String, DevError> {
    let mut bytes = [0u8; 32];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| DevError::Random(format!("{e:?}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// How the child redis-server is set up.
pub struct RedisOptions {
    pub username: String,
    pub password: String,
    /// The user's ACL rules, e.g. `~* &* +@all`.
    pub acl: String,
    /// `user default off`; false leaves Redis open to anonymous clients.
    pub default_user_off: bool,
    /// `yes` (required), `optional` or `no`.
    pub tls_auth_clients: &'static str,
    /// More redis.conf lines.
    pub extra: Vec<String>,
}

/// A redis-server child process, killed when dropped.
pub struct ChildRedis {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl ChildRedis {
    /// Starts redis-server in `dir` on a free loopback port and waits until
    /// it accepts connections.
    pub async fn start(
        dir: &Path,
        certs: &DevCerts,
        options: &RedisOptions,
    ) -> Result<ChildRedis, DevError> {
        let mut last_error = String::new();
        // A port found free can be taken before redis-server binds it: retry.
        for _ in 0..5 {
            let port = free_port().map_err(|e| DevError::RedisStart(e.to_string()))?;
            match Self::start_on(dir, certs, options, port).await {
                Ok(child) => return Ok(child),
                Err(DevError::RedisStart(reason)) => last_error = reason,
                Err(other) => return Err(other),
            }
        }
        Err(DevError::RedisStart(last_error))
    }

    async fn start_on(
        dir: &Path,
        certs: &DevCerts,
        options: &RedisOptions,
        port: u16,
    ) -> Result<ChildRedis, DevError> {
        let conf = dir.join("redis.conf");
        let log = dir.join("redis.log");
        let mut lines = vec![
            "port 0".to_owned(),
            "bind 127.0.0.1".to_owned(),
            format!("tls-port {port}"),
            format!("tls-cert-file {}", certs.redis_cert.display()),
            format!("tls-key-file {}", certs.redis_key.display()),
            format!("tls-ca-cert-file {}", certs.ca.display()),
            format!("tls-auth-clients {}", options.tls_auth_clients),
            "save \"\"".to_owned(),
            "appendonly no".to_owned(),
            format!("dir {}", dir.display()),
            "daemonize no".to_owned(),
            format!(
                "user {} on >{} {}",
                options.username, options.password, options.acl
            ),
        ];
        if options.default_user_off {
            lines.push("user default off".to_owned());
        }
        lines.extend(options.extra.iter().cloned());
        write_file(&conf, (lines.join("\n") + "\n").as_bytes(), 0o600)?;
        let log_file = std::fs::File::create(&log).map_err(|source| DevError::File {
            path: log.clone(),
            source,
        })?;
        let log_err = log_file.try_clone().map_err(|source| DevError::File {
            path: log.clone(),
            source,
        })?;
        let child = tokio::process::Command::new("redis-server")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| match err.kind() {
                std::io::ErrorKind::NotFound => DevError::RedisMissing,
                _ => DevError::RedisStart(err.to_string()),
            })?;
        let mut redis = ChildRedis { child, port, log };
        redis.wait_until_listening().await?;
        Ok(redis)
    }

    async fn wait_until_listening(&mut self) -> Result<(), DevError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(DevError::RedisStart(format!(
                    "exited with {status}: {}",
                    self.log_tail()
                )));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DevError::RedisStart(format!(
                    "not listening after 10s: {}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops redis-server now (an upstream that vanishes).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
