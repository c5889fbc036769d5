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
    #[error("not replacing existing files (pass --force to replace them): {}", .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Exists(Vec<PathBuf>),
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
    /// redcloak's own TLS listener.
    pub proxy_cert: PathBuf,
    pub proxy_key: PathBuf,
}

impl DevCerts {
    /// The files of a set in `dir`.
    pub fn in_dir(dir: &Path) -> DevCerts {
        DevCerts {
            ca: dir.join("ca.crt"),
            redis_cert: dir.join("redis.crt"),
            redis_key: dir.join("redis.key"),
            client_cert: dir.join("redcloak-client.crt"),
            client_key: dir.join("redcloak-client.key"),
            proxy_cert: dir.join("redcloak.crt"),
            proxy_key: dir.join("redcloak.key"),
        }
    }

    fn files(&self) -> [&Path; 7] {
        [
            &self.ca,
            &self.redis_cert,
            &self.redis_key,
            &self.client_cert,
            &self.client_key,
            &self.proxy_cert,
            &self.proxy_key,
        ]
    }
}

/// What to do when some of the files are already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse, naming them.
    Refuse,
    /// Replace them.
    Replace,
    /// Keep a complete set as it is; refuse a partial one.
    KeepComplete,
}

/// `redcloak certs dev`: a CA, Redis's server certificate for
/// `redis_hosts`, redcloak's upstream client certificate and its listener's
/// server certificate for `proxy_hosts`, in `dir` (keys mode 0600). `None`
/// when a complete set was kept.
pub fn write_dev_set(
    dir: &Path,
    redis_hosts: &[&str],
    proxy_hosts: &[&str],
    existing: Existing,
) -> Result<Option<DevCerts>, DevError> {
    let certs = DevCerts::in_dir(dir);
    let present: Vec<PathBuf> = certs
        .files()
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.to_path_buf())
        .collect();
    match existing {
        Existing::KeepComplete if present.len() == certs.files().len() => return Ok(None),
        Existing::Refuse | Existing::KeepComplete if !present.is_empty() => {
            return Err(DevError::Exists(present));
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(|source| DevError::File {
        path: dir.to_owned(),
        source,
    })?;
    write_certs(&certs, redis_hosts, proxy_hosts, |_| {})?;
    Ok(Some(certs))
}

/// Writes a complete development set into `dir`, replacing what is there.
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
    let certs = DevCerts::in_dir(dir);
    write_certs(&certs, hosts, &["localhost", "127.0.0.1"], adjust_redis)?;
    Ok(certs)
}

fn write_certs(
    certs: &DevCerts,
    redis_hosts: &[&str],
    proxy_hosts: &[&str],
    adjust_redis: impl FnOnce(&mut CertificateParams),
) -> Result<(), DevError> {
    let ca = Authority::new("redcloak development CA")?;
    let redis = ca.issue_with("redis", redis_hosts, Usage::Server, adjust_redis)?;
    let client = ca.issue("redcloak", &[], Usage::Client)?;
    let proxy = ca.issue("redcloak", proxy_hosts, Usage::Server)?;
    write_file(&certs.ca, ca.cert_pem().as_bytes(), 0o644)?;
    for (issued, cert, key) in [
        (&redis, &certs.redis_cert, &certs.redis_key),
        (&client, &certs.client_cert, &certs.client_key),
        (&proxy, &certs.proxy_cert, &certs.proxy_key),
    ] {
        write_file(cert, issued.cert_pem.as_bytes(), 0o644)?;
        write_file(key, issued.key_pem.as_bytes(), 0o600)?;
    }
    Ok(())
}

/// What `redcloak certs dev` prints after writing `certs`: the redis.conf
/// and redcloak config lines that use them. `redis_host` is the name
/// redcloak connects to; paths are as given (make them absolute first).
pub fn usage_text(certs: &DevCerts, redis_host: &str) -> String {
    let path = |p: &PathBuf| p.display().to_string();
    format!(
        "# --- redis.conf: TLS only, client certificates required ---\n\
         port 0\n\
         tls-port 6379\n\
         tls-cert-file {redis_cert}\n\
         tls-key-file {redis_key}\n\
         tls-ca-cert-file {ca}\n\
         tls-auth-clients yes\n\
         user default off\n\
         user redcloak on >REDIS_PASSWORD ~* &* +@all -@admin -@dangerous\n\
         # --- end redis.conf ---\n\
         \n\
         # --- redcloak.toml: the upstream, and an optional TLS listener ---\n\
         [upstream]\n\
         address = \"{redis_host}:6379\"\n\
         server_name = \"{redis_host}\"\n\
         ca = \"{ca}\"\n\
         cert = \"{client_cert}\"\n\
         key = \"{client_key}\"\n\
         username = \"redcloak\"\n\
         password_file = \"/path/to/redis-password\"\n\
         \n\
         [listen.tls]\n\
         address = \"127.0.0.1:6390\"\n\
         cert = \"{proxy_cert}\"\n\
         key = \"{proxy_key}\"\n\
         # --- end redcloak.toml ---\n\
         \n\
         REDIS_PASSWORD: make one with `redcloak password > redis-password && chmod 600 redis-password`,\n\
         put it in place of REDIS_PASSWORD above, and point password_file at that file.\n\
         Clients of the TLS listener verify it with {ca}.\n\
         These are development certificates: production ones come from your own CA.\n",
        redis_cert = path(&certs.redis_cert),
        redis_key = path(&certs.redis_key),
        ca = path(&certs.ca),
        client_cert = path(&certs.client_cert),
        client_key = path(&certs.client_key),
        proxy_cert = path(&certs.proxy_cert),
        proxy_key = path(&certs.proxy_key),
    )
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
    Ok(crate::crypto::hex(&bytes))
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

    /// The redis-server process id (to stop it with SIGSTOP, a hung Redis).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
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
