//! Test harness: a real redis-server (TLS only, client certificates required,
//! default user off, one ACL user with a password, nothing saved), redcloak
//! in-process in front of it on ephemeral loopback ports, and raw RESP
//! clients for byte-exact checks.

use bytes::{Bytes, BytesMut};
use redcloak::crypto::keyring::decode_key;
use redcloak::crypto::{Keyring, LegacyPlaintext};
use redcloak::dev::{self, ChildRedis, DevCerts, RedisOptions};
use redcloak::resp::{self, Limits, ReplyScanner};
use redcloak::server::Server;
use redcloak::telemetry::Telemetry;
use redcloak::upstream::{Login, Upstream, UpstreamSettings, UpstreamStream};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub const REDIS_USER: &str = "redcloak";
/// redcloak's Redis user: everything but admin and dangerous commands.
pub const LEAST_PRIVILEGE: &str = "~* &* +@all -@admin -@dangerous";
/// The tests' own user for looking at Redis around redcloak.
pub const ADMIN_USER: &str = "admin";
/// Longest any single read in a test may wait.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A redis-server child and the certificates around it.
pub struct TestRedis {
    pub dir: tempfile::TempDir,
    pub certs: DevCerts,
    pub password: String,
    pub redis: ChildRedis,
}

impl TestRedis {
    pub async fn start() -> TestRedis {
        Self::start_with(RedisSetup::default()).await
    }

    pub async fn start_with(setup: RedisSetup) -> TestRedis {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let validity = setup.redis_cert_validity;
        let mut names = vec!["localhost", "127.0.0.1"];
        names.extend(setup.redis_names.iter().copied());
        let certs = dev::write_dev_certs_with(dir.path(), &names, |params| {
            if let Some((not_before, not_after)) = validity {
                params.not_before = not_before;
                params.not_after = not_after;
            }
        })
        .expect("certs");
        let password = dev::random_password().expect("password");
        dev::write_file(
            &dir.path().join("redis-password"),
            password.as_bytes(),
            0o600,
        )
        .expect("password file");
        let key = redcloak::crypto::keyring::generate_key();
        dev::write_file(&dir.path().join("key-1"), key.as_bytes(), 0o600).expect("key file");
        let mut extra = vec![format!("user {ADMIN_USER} on >{password} ~* &* +@all")];
        extra.extend(setup.extra);
        let redcloak_password = setup.password.unwrap_or_else(|| password.clone());
        dev::write_file(
            &dir.path().join("redis-password"),
            redcloak_password.as_bytes(),
            0o600,
        )
        .expect("password file");
        let options = RedisOptions {
            username: REDIS_USER.into(),
            password: redcloak_password,
            acl: setup.acl.unwrap_or_else(|| LEAST_PRIVILEGE.into()),
            default_user_off: setup.default_user_off,
            tls_auth_clients: setup.tls_auth_clients,
            extra,
        };
        let redis = ChildRedis::start(dir.path(), &certs, &options)
            .await
            .expect("redis-server starts");
        TestRedis {
            dir,
            certs,
            password,
            redis,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `[listen.auth]` section: `password` in a file beside the config
    /// (redcloak refuses secrets written in the config itself), then `extra`
    /// lines of that section.
    pub fn listen_auth(&self, password: &str, extra: &str) -> String {
        dev::write_file(&self.path("client-password"), password.as_bytes(), 0o600)
            .expect("client password file");
        format!("[listen.auth]\npassword_file = \"client-password\"\n{extra}")
    }

    /// A config for redcloak in front of this Redis, to adjust per test.
    pub fn config(&self) -> ProxyConfig {
        ProxyConfig {
            // Far more clients than any test opens, and few enough for the
            // open-files check to pass under a 20,000 descriptor limit.
            listen: vec![
                r#"address = "127.0.0.1:0""#.into(),
                "max_connections = 1000".into(),
            ],
            upstream: vec![
                format!(r#"address = "127.0.0.1:{}""#, self.redis.port()),
                r#"server_name = "localhost""#.into(),
                r#"ca = "ca.crt""#.into(),
                r#"cert = "redcloak-client.crt""#.into(),
                r#"key = "redcloak-client.key""#.into(),
                format!(r#"username = "{REDIS_USER}""#),
                r#"password_file = "redis-password""#.into(),
                r#"connect_timeout = "5s""#.into(),
                // No warm connections and no parking: tests count what
                // reaches Redis exactly. The pool's own tests turn them on.
                "pool_idle = 0".into(),
                r#"release_idle_after = "off""#.into(),
            ],
            top: Vec::new(),
            tail: String::new(),
            encryption: DEFAULT_ENCRYPTION.into(),
        }
    }

    /// A keyring holding the tests' key file `name` as key `id`.
    pub fn keyring(&self, keys: &[(u32, &str)], primary: u32) -> Keyring {
        let keys = keys
            .iter()
            .map(|(id, name)| {
                (
                    *id,
                    decode_key(*id, &std::fs::read(self.path(name)).expect("key file"))
                        .expect("key"),
                )
            })
            .collect();
        Keyring::new(primary, keys, LegacyPlaintext::Reject).expect("keyring")
    }

    /// What Redis itself stores for a key (or a hash field), read over TLS
    /// around redcloak.
    pub async fn stored(&self, key: &[u8], field: Option<&[u8]>) -> Vec<u8> {
        let mut admin = self.admin().await;
        let reply = match field {
            Some(field) => admin.call(&[b"HGET", key, field]).await,
            None => admin.call(&[b"GET", key]).await,
        };
        resp::bulk_body(&reply).expect("a stored value").to_vec()
    }

    /// Every key in Redis (database 0) whose stored content, read around
    /// redcloak as its type requires, contains one of `needles`: "key
    /// (type)" for each. Empty when Redis holds none of them in clear.
    pub async fn plaintext_in_redis(&self, needles: &[&[u8]]) -> Vec<String> {
        let mut admin = self.admin().await;
        let keys = admin.call(&[b"KEYS", b"*"]).await;
        let (_, keys) = resp::aggregate_elements(&keys, &Limits::default()).expect("a key list");
        let mut found = Vec::new();
        for key in keys {
            let key = resp::bulk_body(key).expect("a key name").to_vec();
            let kind = admin.call(&[b"TYPE", &key]).await;
            let read: &[&[u8]] = match &kind[..] {
                b"+string\r\n" => &[b"GET"],
                b"+hash\r\n" => &[b"HGETALL"],
                b"+list\r\n" => &[b"LRANGE", b"0", b"-1"],
                b"+set\r\n" => &[b"SMEMBERS"],
                b"+zset\r\n" => &[b"ZRANGE", b"0", b"-1", b"WITHSCORES"],
                b"+stream\r\n" => &[b"XRANGE", b"-", b"+"],
                _ => continue,
            };
            let mut command = vec![read[0], &key];
            command.extend_from_slice(&read[1..]);
            let content = admin.call(&command).await;
            for needle in needles {
                if content.windows(needle.len()).any(|w| w == *needle) {
                    found.push(format!(
                        "{} ({})",
                        String::from_utf8_lossy(&key),
                        String::from_utf8_lossy(&kind).trim()
                    ));
                }
            }
        }
        found
    }

    /// Asserts that Redis stores none of `needles` in clear (see
    /// [`TestRedis::plaintext_in_redis`]).
    #[track_caller]
    pub fn assert_holds_no_plaintext<'a>(
        &'a self,
        needles: &'a [&'a [u8]],
    ) -> impl std::future::Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let found = self.plaintext_in_redis(needles).await;
            assert!(
                found.is_empty(),
                "{caller}: Redis holds plaintext: {found:?}"
            );
        }
    }

    /// Copies the bytes Redis stores for `from` to `to`, around redcloak
    /// (a sealed value moved to a key it was not sealed for).
    pub async fn copy_stored(&self, from: &[u8], to: &[u8]) {
        let stored = self.stored(from, None).await;
        let mut admin = self.admin().await;
        assert_reply(&admin.call(&[b"SET", to, &stored]).await, b"+OK\r\n");
    }

    /// A direct, authenticated TLS connection to Redis, bypassing redcloak.
    pub async fn admin(&self) -> RawClient<UpstreamStream> {
        self.admin_at(self.redis.port()).await
    }

    /// [`TestRedis::admin`] to another Redis on `port` with the same
    /// certificates and password (a replica).
    pub async fn admin_at(&self, port: u16) -> RawClient<UpstreamStream> {
        self.try_admin_at(port).await.expect("admin connection")
    }

    /// [`TestRedis::admin_at`], `None` when Redis refuses or drops it.
    pub async fn try_admin_at(&self, port: u16) -> Option<RawClient<UpstreamStream>> {
        let tls = redcloak::tls::client::config(
            &self.certs.ca,
            &self.certs.client_cert,
            &self.certs.client_key,
        )
        .expect("client tls");
        let login = Login {
            username: Some(ADMIN_USER.into()),
            password: redcloak::secret::Secret::new(self.password.clone().into_bytes()),
        };
        let settings = UpstreamSettings {
            address: format!("127.0.0.1:{port}"),
            server_name: "localhost".into(),
            connect_timeout: Duration::from_secs(5),
        };
        let upstream = Upstream::new(settings, tls, Arc::new(login)).expect("upstream");
        upstream.connect().await.ok().map(RawClient::new)
    }

    pub async fn start_proxy(&self, config: &ProxyConfig) -> Proxy {
        start_proxy_in(self.dir.path(), config).await
    }
}

/// redcloak in-process with `config` written to `dir`/redcloak.toml.
pub async fn start_proxy_in(dir: &std::path::Path, config: &ProxyConfig) -> Proxy {
    let file = dir.join("redcloak.toml");
    std::fs::write(&file, config.render()).expect("write config");
    let loaded = redcloak::config::load(&file).expect("valid config");
    let telemetry = Telemetry::default();
    let (reloads, reload_queue) = redcloak::reload::channel();
    // As `redcloak serve` does: the admin listener opens before the server.
    let admin = match loaded.metrics_address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .expect("admin listener");
            let bound = listener.local_addr().expect("admin address");
            tokio::spawn(redcloak::admin::serve(
                listener,
                telemetry.clone(),
                Some(reloads.clone()),
            ));
            Some(bound)
        }
        None => None,
    };
    let server = Server::bind(loaded, telemetry)
        .await
        .expect("proxy binds")
        .with_reloads(file, reload_queue);
    let address = server.tcp_address();
    let tls_address = server.tls_address();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Proxy {
        address,
        tls_address,
        admin,
        reloads,
        shutdown,
        task,
    }
}

/// How a test's redis-server differs from the secure default.
pub struct RedisSetup {
    pub tls_auth_clients: &'static str,
    pub default_user_off: bool,
    /// redcloak's ACL rules (default: [`LEAST_PRIVILEGE`]).
    pub acl: Option<String>,
    /// redcloak's Redis password (default: 64 random hex characters).
    pub password: Option<String>,
    /// Validity of Redis's server certificate (default: decades).
    pub redis_cert_validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    /// Names on Redis's certificate besides localhost and 127.0.0.1 (the
    /// other certificates of the set do not show them).
    pub redis_names: Vec<&'static str>,
    /// More redis.conf lines.
    pub extra: Vec<String>,
}

impl Default for RedisSetup {
    fn default() -> Self {
        RedisSetup {
            tls_auth_clients: "yes",
            default_user_off: true,
            acl: None,
            password: None,
            redis_cert_validity: None,
            redis_names: Vec::new(),
            extra: Vec::new(),
        }
    }
}

/// Lines of a redcloak config, by section.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Top-level keys (`profile = "staging"`).
    pub top: Vec<String>,
    pub listen: Vec<String>,
    pub upstream: Vec<String>,
    /// Further sections, verbatim.
    pub tail: String,
    /// The [encryption] section and its rules, verbatim.
    pub encryption: String,
}

/// Key 1 seals; keys under `plain:` stay plaintext, so protocol tests can
/// use lists, sets and channels.
pub const DEFAULT_ENCRYPTION: &str = "[encryption]\nprimary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n\
[[encryption.rules]]\npattern = \"plain:*\"\nmode = \"plaintext\"\n";

impl ProxyConfig {
    /// Replaces (or adds) `key = value` in [upstream].
    pub fn upstream(mut self, key: &str, value: &str) -> Self {
        self.upstream
            .retain(|line| !line.starts_with(&format!("{key} =")));
        self.upstream.push(format!("{key} = {value}"));
        self
    }

    /// Adds a `[listen]` line, replacing one with the same key.
    pub fn listen(mut self, line: &str) -> Self {
        let key = line
            .split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        self.listen
            .retain(|l| l.split('=').next().unwrap_or_default().trim() != key);
        self.listen.push(line.into());
        self
    }

    pub fn tail(mut self, text: &str) -> Self {
        self.tail.push_str(text);
        self.tail.push('\n');
        self
    }

    pub fn render(&self) -> String {
        format!(
            "{}\n[listen]\n{}\n\n[upstream]\n{}\n\n{}\n{}",
            self.top.join("\n"),
            self.listen.join("\n"),
            self.upstream.join("\n"),
            self.tail,
            self.encryption
        )
    }
}

/// redcloak running in this test's runtime.
pub struct Proxy {
    pub address: Option<SocketAddr>,
    pub tls_address: Option<SocketAddr>,
    /// The admin listener, when the config has `[metrics]`.
    pub admin: Option<SocketAddr>,
    /// Asks for a reload as SIGHUP does (the signal itself would reach
    /// every test in this process).
    pub reloads: redcloak::reload::ReloadRequests,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<redcloak::server::Drained>,
}

impl Proxy {
    /// A reload as SIGHUP asks for one, and what it did.
    pub async fn reload(&self) -> redcloak::reload::Outcome {
        self.reloads
            .reload(redcloak::reload::Trigger::Signal)
            .await
            .expect("reloads are served")
    }

    pub fn addr(&self) -> SocketAddr {
        self.address.expect("plaintext listener")
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr())
    }

    pub async fn raw(&self) -> RawClient<TcpStream> {
        let stream = TcpStream::connect(self.addr())
            .await
            .expect("connect to proxy");
        stream.set_nodelay(true).expect("nodelay");
        RawClient::new(stream)
    }

    /// `GET path` on the admin listener: status and body.
    /// A raw client that has said `HELLO 3` when `protocol` is 3.
    pub async fn raw_speaking(&self, protocol: u8) -> RawClient<TcpStream> {
        let mut client = self.raw().await;
        if protocol == 3 {
            assert!(client.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
        }
        client
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin.expect("[metrics] configured"), path).await
    }

    /// The Prometheus text from /metrics.
    pub async fn scrape(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis client connects")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// A RESP client that shows the exact bytes of each reply.
pub struct RawClient<S> {
    pub stream: S,
    buf: BytesMut,
    scanner: ReplyScanner,
}

impl<S> RawClient<S> {
    pub fn new(stream: S) -> Self {
        RawClient {
            stream,
            buf: BytesMut::new(),
            scanner: ReplyScanner::default(),
        }
    }
}

impl<S: AsyncWrite + Unpin> RawClient<S> {
    pub async fn send(&mut self, args: &[&[u8]]) {
        let mut out = BytesMut::new();
        resp::encode_command(&mut out, args);
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }
}

impl<S: AsyncRead + Unpin> RawClient<S> {
    /// The next complete reply, as bytes.
    pub async fn read(&mut self) -> Bytes {
        tokio::time::timeout(READ_TIMEOUT, self.read_inner())
            .await
            .expect("reply in time")
            .expect("a reply, not EOF")
    }

    /// The next reply, or `None` at end of stream.
    pub async fn read_or_eof(&mut self) -> Option<Bytes> {
        tokio::time::timeout(READ_TIMEOUT, self.read_inner())
            .await
            .expect("reply or EOF in time")
    }

    async fn read_inner(&mut self) -> Option<Bytes> {
        loop {
            if let Some(len) = self
                .scanner
                .scan(&self.buf, &Limits::default())
                .expect("valid RESP from proxy")
            {
                return Some(self.buf.split_to(len).freeze());
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Asserts the server closed the connection with nothing more to say.
    pub async fn expect_closed(&mut self) {
        assert_eq!(
            self.read_or_eof().await,
            None,
            "connection should be closed"
        );
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub async fn call(&mut self, args: &[&[u8]]) -> Bytes {
        self.send(args).await;
        self.read().await
    }
}

/// Waits until Redis reports `count` clients blocked (BLPOP and the like).
pub async fn wait_until_blocked(redis: &TestRedis, count: usize) {
    let admin = tokio::sync::Mutex::new(redis.admin().await);
    let expected = format!("blocked_clients:{count}");
    eventually(&format!("Redis reports {expected}"), || async {
        let info = admin.lock().await.call(&[b"INFO", b"clients"]).await;
        String::from_utf8_lossy(&info).contains(&expected)
    })
    .await;
}

/// The RESP bytes of an aggregate of bulk strings (`marker` `*` or `>`).
pub fn resp_array(marker: u8, items: &[&[u8]]) -> Vec<u8> {
    let mut out = BytesMut::new();
    resp::encode_header(&mut out, marker, items.len());
    for item in items {
        resp::encode_bulk(&mut out, item);
    }
    out.to_vec()
}

/// Every scalar in a reply, depth first: bulk bodies, and the text of
/// integers, doubles and statuses; nil is `nil`. For replies whose shape
/// differs between RESP2 and RESP3 but whose content does not.
pub fn texts(reply: &[u8]) -> Vec<String> {
    fn flatten(element: &[u8], out: &mut Vec<String>) {
        if matches!(element, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n") {
            return out.push("nil".into());
        }
        if let Some((_, elements)) = resp::aggregate_elements(element, &Limits::default()) {
            return elements.into_iter().for_each(|e| flatten(e, out));
        }
        match resp::bulk_body(element) {
            Some(body) => out.push(String::from_utf8_lossy(body).into_owned()),
            None => out.push(String::from_utf8_lossy(&element[1..element.len() - 2]).into_owned()),
        }
    }
    let mut out = Vec::new();
    flatten(reply, &mut out);
    out
}

/// Asserts a reply's exact bytes, showing both as text when they differ.
#[track_caller]
pub fn assert_reply(reply: &[u8], expected: &[u8]) {
    assert_eq!(
        String::from_utf8_lossy(reply),
        String::from_utf8_lossy(expected)
    );
}

/// Asserts a reply is an error that starts with `prefix` (e.g. `-ERR redcloak:`).
#[track_caller]
pub fn assert_error(reply: &[u8], prefix: &str) {
    let text = String::from_utf8_lossy(reply);
    assert!(
        text.starts_with(prefix),
        "expected an error starting with {prefix:?}, got {text:?}"
    );
}

/// The proxy's logs, shown with a failing test's output (RUST_LOG filters).
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("redcloak=debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// `GET path` over plain HTTP/1.1: the status and the body.
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    http(address, "GET", path).await
}

pub async fn http(address: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        let request = format!("{method} {path} HTTP/1.1\r\nHost: redcloak\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(READ_TIMEOUT, exchange)
        .await
        .expect("admin answers in time")
        .expect("admin answers");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one series in a Prometheus text (`name{labels}` exactly as
/// rendered), or `None` when absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Polls `check` every 20 ms until it holds; fails after [`READ_TIMEOUT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    until(what, || {
        let checked = check();
        async move { checked.await.then_some(()) }
    })
    .await
}

/// Polls `find` every 20 ms until it finds something; fails after
/// [`READ_TIMEOUT`]. The one polling loop of the tests.
pub async fn until<T, F, Fut>(what: &str, mut find: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    loop {
        if let Some(found) = find().await {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `redcloak serve` as a child process, with JSON logs collected as they
/// come; its listeners bind port 0 and the test reads the port they got
/// from the logs (never a port picked beforehand, which races).
pub struct ServeChild {
    pub child: std::process::Child,
    /// The plaintext TCP listener's address.
    pub address: SocketAddr,
    logs: Arc<std::sync::Mutex<String>>,
    /// Reads stderr into `logs` until the child closes it.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ServeChild {
    /// Runs `redcloak serve --config <config> --log-format json`.
    pub async fn start(config: &std::path::Path) -> ServeChild {
        let mut command = std::process::Command::new(redcloak_bin());
        command
            .args(["serve", "--log-format", "json", "--config"])
            .arg(config);
        Self::spawn(command).await
    }

    /// Spawns `command` (a redcloak serve, perhaps behind a shell) and
    /// waits for its TCP listener's address.
    pub async fn spawn(command: std::process::Command) -> ServeChild {
        let mut serving = Self::launch(command);
        serving.address = until("redcloak serve reports its TCP listener", || {
            let found = serving.listener_address();
            async move { found }
        })
        .await;
        serving
    }

    /// Spawns `command` without waiting for anything (`address` is unset
    /// until the caller finds it with [`ServeChild::listening`]).
    pub fn launch(mut command: std::process::Command) -> ServeChild {
        let mut child = command
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn redcloak");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(std::sync::Mutex::new(String::new()));
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut logs = sink.lock().unwrap_or_else(|e| e.into_inner());
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        ServeChild {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
            reader: Some(reader),
        }
    }

    /// Waits until `listener` reports its address.
    pub async fn wait_listening(&self, listener: &str) -> SocketAddr {
        until(
            &format!("redcloak serve reports its {listener} listener"),
            || {
                let found = self.listening(listener);
                async move { found }
            },
        )
        .await
    }

    fn listener_address(&self) -> Option<SocketAddr> {
        self.listening("tcp")
    }

    /// The address a listener (`tcp`, `tls`, `admin`) reported, if it did.
    pub fn listening(&self, listener: &str) -> Option<SocketAddr> {
        self.logs().lines().find_map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = &line["fields"];
            (fields["message"] == "listening" && fields["listener"] == listener)
                .then(|| fields["address"].as_str()?.parse().ok())?
        })
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn raw(&self) -> RawClient<TcpStream> {
        RawClient::new(TcpStream::connect(self.address).await.expect("connect"))
    }

    /// Sends a signal (`-TERM`, `-HUP`, ...).
    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// The exit code (waiting at most 30 s) and every line it logged.
    pub async fn exit_code(mut self) -> (i32, String) {
        let logs = self.logs.clone();
        let reader = self.reader.take();
        let code = tokio::task::spawn_blocking(move || {
            let code = wait_exit(&mut self.child);
            if let Some(reader) = reader {
                let _ = reader.join();
            }
            code
        })
        .await
        .expect("join");
        let logs = logs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (code, logs)
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs the redcloak binary to completion: exit code, stdout, stderr.
pub fn run_redcloak(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(redcloak_bin())
        .args(args)
        .output()
        .expect("redcloak runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The path of the built redcloak binary.
pub fn redcloak_bin() -> &'static str {
    env!("CARGO_BIN_EXE_redcloak")
}

/// Sends `kill <name>` (e.g. `-TERM`) to a child.
pub fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Waits for the child to exit, killing it if it does not within the deadline.
pub fn wait_exit(child: &mut std::process::Child) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().unwrap_or(-1);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("redcloak did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something accepts connections on a loopback port.
pub async fn wait_listening(port: u16) {
    eventually(&format!("something listens on {port}"), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
}

/// Runs Prometheus's `promtool` (Debian package `prometheus`), with `input`
/// on stdin; returns whether it succeeded and what it printed.
pub fn promtool(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs: install it with `apt-get install -y prometheus`");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Calls of a command that Redis has counted (INFO commandstats), on a
/// fresh admin connection.
pub async fn redis_calls(redis: &TestRedis, command: &str) -> usize {
    let mut admin = redis.admin().await;
    let stats = admin.call(&[b"INFO", b"commandstats"]).await;
    let stats = String::from_utf8_lossy(&stats);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("number"))
}

/// A TLS man in the middle between redcloak and the test's Redis, standing
/// in for faults: it presents Redis's certificate, requires redcloak's
/// client certificate, and forwards bytes both ways, except that a test
/// can make it answer Redis's next reply with bytes of its own (Redis out
/// of step, or an impersonator), or hold Redis's replies (a hung Redis).
pub struct TlsRelay {
    pub port: u16,
    control: Arc<RelayControl>,
}

#[derive(Default)]
struct RelayControl {
    replace_next: std::sync::Mutex<Option<Vec<u8>>>,
    hold: std::sync::atomic::AtomicBool,
    /// Upstream connections redcloak opened that it has closed since.
    closed_by_redcloak: std::sync::atomic::AtomicUsize,
}

impl TlsRelay {
    pub async fn start(redis: &TestRedis) -> TlsRelay {
        let server = redcloak::tls::server::config(
            &redis.certs.redis_cert,
            &redis.certs.redis_key,
            Some(&redis.certs.ca),
        )
        .expect("relay server tls");
        let client = redcloak::tls::client::config(
            &redis.certs.ca,
            &redis.certs.client_cert,
            &redis.certs.client_key,
        )
        .expect("relay client tls");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay bind");
        let port = listener.local_addr().expect("relay addr").port();
        let control = Arc::new(RelayControl::default());
        let redis_port = redis.redis.port();
        let shared = control.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(server);
            let connector = tokio_rustls::TlsConnector::from(client);
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, connector, control) =
                    (acceptor.clone(), connector.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(downstream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let upstream = TcpStream::connect(("127.0.0.1", redis_port))
                        .await
                        .expect("relay reaches redis");
                    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
                    let upstream = connector.connect(name, upstream).await.expect("relay tls");
                    relay(downstream, upstream, &control).await;
                });
            }
        });
        TlsRelay { port, control }
    }

    /// Redis's next reply (the next bytes it sends) becomes `bytes`.
    pub fn replace_next_reply(&self, bytes: &[u8]) {
        *self.control.replace_next.lock().expect("lock") = Some(bytes.to_vec());
    }

    /// Stop (or resume) passing Redis's replies on.
    pub fn hold_replies(&self, hold: bool) {
        self.control
            .hold
            .store(hold, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections that redcloak closed.
    pub fn closed_by_redcloak(&self) -> usize {
        self.control
            .closed_by_redcloak
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn relay<D, U>(downstream: D, upstream: U, control: &RelayControl)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let requests = async {
        let _ = tokio::io::copy(&mut down_read, &mut up_write).await;
        control
            .closed_by_redcloak
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    };
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = match up_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            while control.hold.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let replaced = control.replace_next.lock().expect("lock").take();
            let bytes = replaced.as_deref().unwrap_or(&buf[..read]);
            if down_write.write_all(bytes).await.is_err() || down_write.flush().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = replies => {}
    }
}

/// Tests that load the machine hard, or that measure timing or memory
/// under load, take this first, so they do not run beside each other (the
/// suite runs tests in parallel on two cores).
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Redis (reached through `admin`) presents this certificate and key from
/// now on (`CONFIG SET` of both at once; Redis reloads its TLS context).
pub async fn redis_presents(
    admin: &mut RawClient<UpstreamStream>,
    cert: &std::path::Path,
    key: &std::path::Path,
) {
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let set = admin
        .call(&[
            b"CONFIG",
            b"SET",
            b"tls-cert-file",
            cert.as_bytes(),
            b"tls-key-file",
            key.as_bytes(),
        ])
        .await;
    assert_reply(&set, b"+OK\r\n");
}
