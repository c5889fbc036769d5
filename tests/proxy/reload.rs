//! Reload without a restart, against a real Redis: the upstream password
//! and client certificate rotate under load with no failed request; bad
//! material (garbage, a key that does not match, a missing file, a password
//! Redis does not know yet) keeps the old material and is counted; settings
//! a reload cannot apply are named.

use crate::support::*;
use redcloak::upstream::UpstreamStream;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const METRICS: &str = "[metrics]\naddress = \"127.0.0.1:0\"\n";

/// What the load clients saw.
#[derive(Default)]
pub(crate) struct Load {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

/// A byte stream to redcloak, plain or TLS.
trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

/// Where load clients connect, and how.
#[derive(Clone)]
pub(crate) enum Target {
    Plain(std::net::SocketAddr),
    /// redcloak's TLS listener; the clients trust these roots. Odd-numbered
    /// clients reconnect every 20 rounds (new handshakes during a reload),
    /// even-numbered ones keep one connection throughout.
    Tls(std::net::SocketAddr, Arc<rustls::ClientConfig>),
}

impl From<std::net::SocketAddr> for Target {
    fn from(address: std::net::SocketAddr) -> Target {
        Target::Plain(address)
    }
}

impl Target {
    async fn connect(&self) -> RawClient<Box<dyn Duplex>> {
        let (Target::Plain(address) | Target::Tls(address, _)) = self;
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let stream: Box<dyn Duplex> = match self {
            Target::Plain(_) => Box::new(tcp),
            Target::Tls(_, tls) => {
                let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
            }
        };
        RawClient::new(stream)
    }

    /// Connections this client opens again every so many rounds.
    fn reconnect_every(&self, id: usize) -> Option<u64> {
        matches!(self, Target::Tls(..) if id % 2 == 1).then_some(20)
    }
}

/// A client writing values that carry their own SHA-256 and reading them
/// back, until `stop`: every reply must be exactly what it wrote.
async fn load_client(target: Target, id: usize, stop: Arc<AtomicBool>, load: Arc<Load>) {
    let mut client = target.connect().await;
    let key = format!("reload:{id}");
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        if target
            .reconnect_every(id)
            .is_some_and(|every| round.is_multiple_of(every))
        {
            client = target.connect().await;
        }
        let body = format!("client {id} round {round}");
        let digest = hex(&Sha256::digest(body.as_bytes()));
        let value = format!("{body}|{digest}");
        let set = client
            .call(&[b"SET", key.as_bytes(), value.as_bytes()])
            .await;
        let got = client.call(&[b"GET", key.as_bytes()]).await;
        let expected = format!("${}\r\n{value}\r\n", value.len());
        if &set[..] == b"+OK\r\n" && got[..] == *expected.as_bytes() {
            load.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            load.failed.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "client {id}: {:?} / {:?}",
                String::from_utf8_lossy(&set),
                String::from_utf8_lossy(&got)
            );
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 20 load clients of redcloak at `target`; returns what stops them and
/// what they saw.
pub(crate) fn start_load(
    target: impl Into<Target>,
) -> (Arc<AtomicBool>, Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let target = target.into();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let tasks = (0..20)
        .map(|id| {
            let client = load_client(target.clone(), id, stop.clone(), load.clone());
            tokio::spawn(client)
        })
        .collect();
    (stop, load, tasks)
}

pub(crate) async fn stop_load(
    stop: Arc<AtomicBool>,
    load: &Load,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("load client finishes")
            .expect("load client");
    }
    assert_eq!(load.failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(load.ok.load(Ordering::Relaxed) > 100, "the load ran");
}

/// `POST /-/reload`: the status and the JSON answer.
async fn post_reload(proxy: &Proxy) -> (u16, serde_json::Value) {
    let (status, body) = http(proxy.admin.expect("admin"), "POST", "/-/reload").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON: {body}"));
    (status, json)
}

fn names(json: &serde_json::Value, field: &str) -> Vec<String> {
    json[field]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| match item {
                    serde_json::Value::String(name) => name.clone(),
                    other => other["what"].as_str().unwrap_or_default().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn reload_failures(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!("redcloak_reload_failures_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(-1.0)
}

/// Every connection redcloak has to Redis is closed (as a Redis restart or
/// a failover would), so the next requests need new ones; returns once
/// redcloak has seen its lanes go (a request sent before would be lost with
/// them).
async fn kill_redcloak_connections(proxy: &Proxy, admin: &mut RawClient<UpstreamStream>) {
    admin
        .call(&[b"CLIENT", b"KILL", b"USER", REDIS_USER.as_bytes()])
        .await;
    eventually("redcloak saw its lanes closed", || async {
        metric(&proxy.scrape().await, "redcloak_upstream_lanes_open") == Some(0.0)
    })
    .await;
}

/// The zero-downtime password rotation the README documents: Redis learns
/// the new password, redcloak's password file gets it, redcloak reloads,
/// Redis forgets the old one. 20 clients run throughout and see no error;
/// afterwards new connections log in with the new password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_password_rotates_under_load_with_no_failed_request() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let mut admin = redis.admin().await;
    let (stop, load, tasks) = start_load(proxy.addr());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let old = std::fs::read_to_string(redis.path("redis-password")).expect("password");
    let new = redcloak::dev::random_password().expect("password");
    // Written before Redis knows it: the probe fails, the old one stays.
    redcloak::dev::write_file(&redis.path("redis-password"), new.as_bytes(), 0o600).expect("write");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{json}");
    assert_eq!(names(&json, "rejected"), ["upstream.password"]);
    let why = json["rejected"][0]["why"].as_str().unwrap_or_default();
    assert!(why.contains("refused redcloak's AUTH"), "{why}");
    assert!(
        !why.contains(&new) && !why.contains(&old),
        "no password in the answer"
    );
    assert_eq!(reload_failures(&proxy.scrape().await, "probe"), 1.0);

    // Step 1: Redis takes both passwords.
    let add = format!(">{new}");
    let set = admin
        .call(&[b"ACL", b"SETUSER", REDIS_USER.as_bytes(), add.as_bytes()])
        .await;
    assert_reply(&set, b"+OK\r\n");
    // Step 2: redcloak reloads (the file already holds the new one).
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(names(&json, "changed"), ["upstream.password"]);
    assert!(
        json["restart_required"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    // Step 3: Redis forgets the old one.
    let remove = format!("<{old}");
    let set = admin
        .call(&[b"ACL", b"SETUSER", REDIS_USER.as_bytes(), remove.as_bytes()])
        .await;
    assert_reply(&set, b"+OK\r\n");
    stop_load(stop, &load, tasks).await;

    // New connections log in with the new password: the lanes are closed
    // (between requests), the next requests open new ones, and a
    // transaction takes a pool connection and gives it back with RESET and
    // AUTH.
    kill_redcloak_connections(&proxy, &mut admin).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"after", b"rotation"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"GET", b"after"]).await, b"+QUEUED\r\n");
    assert_reply(&c.call(&[b"EXEC"]).await, b"*1\r\n$8\r\nrotation\r\n");
    let metrics = proxy.scrape().await;
    assert_eq!(
        metric(
            &metrics,
            "redcloak_upstream_connect_failures_total{reason=\"auth\"}"
        ),
        Some(0.0)
    );
    assert!(
        metric(&metrics, "redcloak_reload_last_success_timestamp_seconds").unwrap_or(0.0) > 1.7e9
    );
}

/// A certificate that is garbage, a key that is not the certificate's, and
/// a missing file are each rejected: the old material stays in use (new
/// connections still work) and each failure is counted. Putting the files
/// back reloads cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_material_keeps_the_old_material_and_is_counted() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let mut admin = redis.admin().await;
    let cert = redis.certs.client_cert.clone();
    let key = redis.certs.client_key.clone();
    let good_cert = std::fs::read(&cert).expect("cert");
    let good_key = std::fs::read(&key).expect("key");
    let other_key = std::fs::read(&redis.certs.proxy_key).expect("another key");
    type Break<'a> = (&'a str, Box<dyn Fn()>);
    let (cert2, key2) = (cert.clone(), key.clone());
    let (cert3, good_key2) = (cert.clone(), good_key.clone());
    let breaks: [Break; 3] = [
        (
            "upstream.cert",
            Box::new(move || {
                std::fs::write(&cert2, b"-----BEGIN CERTIFICATE-----\ngarbage\n").expect("write")
            }),
        ),
        (
            "upstream.key",
            Box::new(move || std::fs::write(&key2, &other_key).expect("write")),
        ),
        (
            "upstream.cert",
            Box::new(move || std::fs::remove_file(&cert3).expect("remove")),
        ),
    ];
    for (i, (file, break_it)) in breaks.iter().enumerate() {
        break_it();
        let (status, json) = post_reload(&proxy).await;
        assert_eq!(status, 422, "{json}");
        assert_eq!(names(&json, "rejected"), [*file], "{json}");
        assert_eq!(
            reload_failures(&proxy.scrape().await, "files"),
            (i + 1) as f64
        );
        // The old material is still what new connections use.
        kill_redcloak_connections(&proxy, &mut admin).await;
        let mut c = proxy.raw().await;
        assert_reply(&c.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
        std::fs::write(&cert, &good_cert).expect("restore");
        std::fs::write(&key, &good_key2).expect("restore");
    }
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert!(
        names(&json, "changed").is_empty(),
        "the same material: {json}"
    );
    assert_eq!(reload_failures(&proxy.scrape().await, "probe"), 0.0);
}

/// Redis verifies client certificates against the CAs in `path` from now
/// on (new connections).
async fn redis_trusts(admin: &mut RawClient<UpstreamStream>, path: &std::path::Path) {
    let path = path.display().to_string();
    let set = admin
        .call(&[b"CONFIG", b"SET", b"tls-ca-cert-file", path.as_bytes()])
        .await;
    assert_reply(&set, b"+OK\r\n");
}

/// A new client certificate from another CA: after the reload, Redis is
/// told to trust only that CA, and redcloak's new connections still get
/// in, so they present the new certificate. The certificate's expiry
/// metric follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_certificate_is_presented_by_new_connections() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let mut admin = redis.admin().await;
    use redcloak::dev::{Authority, Usage};
    let new_ca = Authority::new("redcloak rotation CA").expect("CA");
    // Expiring at another time than the first, so its metric shows the change.
    let new_client = new_ca
        .issue_with("redcloak", &[], Usage::Client, |params| {
            params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(400);
        })
        .expect("client certificate");
    let new_ca_file = redis.path("new-ca.crt");
    std::fs::write(&new_ca_file, new_ca.cert_pem()).expect("new CA");
    // Redis trusts both CAs while the certificate changes hands.
    let both = redis.path("both-cas.crt");
    let bundle = [
        std::fs::read(&redis.certs.ca).expect("ca"),
        new_ca.cert_pem().as_bytes().to_vec(),
    ]
    .concat();
    std::fs::write(&both, bundle).expect("bundle");
    redis_trusts(&mut admin, &both).await;
    let (stop, load, tasks) = start_load(proxy.addr());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expiry = |metrics: &str| {
        metric(
            metrics,
            "redcloak_certificate_expiry_timestamp_seconds{certificate=\"upstream_client\"}",
        )
    };
    let before = expiry(&proxy.scrape().await);
    std::fs::write(&redis.certs.client_cert, &new_client.cert_pem).expect("cert");
    std::fs::write(&redis.certs.client_key, &new_client.key_pem).expect("key");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(names(&json, "changed"), ["upstream.cert", "upstream.key"]);
    stop_load(stop, &load, tasks).await;
    assert_ne!(expiry(&proxy.scrape().await), before);
    // Only the new CA from here on: a connection with the old certificate
    // would be refused.
    redis_trusts(&mut admin, &new_ca_file).await;
    kill_redcloak_connections(&proxy, &mut admin).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"new-cert"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$8\r\nnew-cert\r\n");
    assert_eq!(
        metric(
            &proxy.scrape().await,
            "redcloak_upstream_connect_failures_total{reason=\"tls\"}"
        ),
        Some(0.0)
    );
}

/// A setting a reload cannot apply is named in the answer and waits for a
/// restart; the reload itself succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_a_reload_cannot_apply_are_named() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let file = redis.path("redcloak.toml");
    let text = std::fs::read_to_string(&file).expect("config");
    std::fs::write(
        &file,
        format!("{text}\n[limits]\nmax_pending_requests = 77\n"),
    )
    .expect("config");
    // As SIGHUP asks (the signal itself would reach every test here;
    // tests/proxy/process.rs sends it to a `redcloak serve` child).
    let outcome = proxy.reload().await;
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(outcome.restart_required, ["limits.max_pending_requests"]);
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        names(&json, "restart_required"),
        ["limits.max_pending_requests"]
    );
    // A configuration that does not load is rejected whole.
    std::fs::write(&file, "this is not toml [").expect("config");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{json}");
    assert_eq!(names(&json, "rejected"), ["configuration"]);
    assert_eq!(reload_failures(&proxy.scrape().await, "config"), 1.0);
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
}

/// The key id an envelope Redis holds names.
async fn sealed_under(redis: &TestRedis, key: &[u8]) -> u32 {
    redcloak::crypto::envelope::key_id(&redis.stored(key, None).await).expect("an envelope")
}

/// Data keys rotate without a restart, under load: a new key is added and
/// made primary (new values are sealed with it, old ones still open), then
/// the old key is removed; a weak key is refused and the keyring in use
/// stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyring_rotates_under_load() {
    let redis = TestRedis::start().await;
    let mut config = redis.config().tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let file = redis.path("redcloak.toml");
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"old", b"one"]).await, b"+OK\r\n");
    assert_eq!(sealed_under(&redis, b"old").await, 1);
    let (stop, load, tasks) = start_load(proxy.addr());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let key2 = redcloak::crypto::keyring::generate_key();
    redcloak::dev::write_file(&redis.path("key-2"), key2.as_bytes(), 0o600).expect("key 2");
    let rules = "[[encryption.rules]]\npattern = \"plain:*\"\nmode = \"plaintext\"\n";
    let keys = |primary: u32, ids: &[u32]| {
        let mut text = format!("[encryption]\nprimary = {primary}\n");
        for id in ids {
            text.push_str(&format!(
                "[[encryption.keys]]\nid = {id}\nfile = \"key-{id}\"\n"
            ));
        }
        text + rules
    };
    config.encryption = keys(2, &[1, 2]);
    std::fs::write(&file, config.render()).expect("config");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        names(&json, "changed"),
        ["encryption.primary", "encryption.keys"]
    );
    stop_load(stop, &load, tasks).await;
    assert_reply(&c.call(&[b"SET", b"new", b"two"]).await, b"+OK\r\n");
    assert_eq!(
        sealed_under(&redis, b"new").await,
        2,
        "sealed with the new primary"
    );
    assert_reply(&c.call(&[b"GET", b"old"]).await, b"$3\r\none\r\n");
    let metrics = proxy.scrape().await;
    assert!(
        metric(&metrics, "redcloak_values_sealed_total{key_id=\"1\"}").unwrap_or(0.0) > 100.0,
        "counts carried over"
    );

    // A weak key is refused: the keyring in use stays.
    redcloak::dev::write_file(
        &redis.path("key-3"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".as_bytes(),
        0o600,
    )
    .expect("key 3");
    config.encryption = keys(3, &[1, 2, 3]);
    std::fs::write(&file, config.render()).expect("config");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{json}");
    assert!(
        json["rejected"][0]["why"]
            .as_str()
            .unwrap_or_default()
            .contains("repeated byte"),
        "{json}"
    );
    assert_reply(&c.call(&[b"SET", b"newer", b"three"]).await, b"+OK\r\n");
    assert_eq!(sealed_under(&redis, b"newer").await, 2);

    // The old key removed: what it sealed no longer opens (rekey first).
    config.encryption = keys(2, &[2]);
    std::fs::write(&file, config.render()).expect("config");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(names(&json, "changed"), ["encryption.keys"]);
    assert_error(
        &c.call(&[b"GET", b"old"]).await,
        "-ERR redcloak: value of key 'old' failed to decrypt",
    );
    assert_reply(&c.call(&[b"GET", b"new"]).await, b"$3\r\ntwo\r\n");
}

/// `redis-cli --tls` against the TLS listener trusting `ca`: what it printed.
async fn ping_over_tls(port: u16, ca: &std::path::Path) -> String {
    let ca = ca.display().to_string();
    let port = port.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                &ca,
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "PING",
            ])
            .output()
            .expect("redis-cli runs")
    })
    .await
    .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr)
}

/// A TLS client configuration trusting these CA files.
fn trusting(cas: &[&std::path::Path]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        let cert = CertificateDer::from_pem_file(ca).expect("CA file");
        roots.add(cert).expect("a CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The TLS listener's certificate rotates under 20 TLS clients (trusting
/// both CAs; half of them reconnect all along, half keep their connection)
/// that see no failed request; after the reload a client that trusts only
/// the new certificate's CA is served, one that trusts only the old one is
/// not; a key that does not match keeps the old pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_certificate_rotates() {
    use redcloak::dev::{Authority, Usage};
    let redis = TestRedis::start().await;
    let issue = |name: &str| {
        let ca = Authority::new(name).expect("CA");
        let server = ca
            .issue("redcloak", &["localhost", "127.0.0.1"], Usage::Server)
            .expect("server certificate");
        let ca_file = redis.path(&format!("{name}.crt"));
        std::fs::write(&ca_file, ca.cert_pem()).expect("CA file");
        (ca_file, server)
    };
    let (old_ca, old) = issue("old-ca");
    let (new_ca, new) = issue("new-ca");
    let write_pair = |cert: &str, key: &str| {
        std::fs::write(redis.path("listener.crt"), cert).expect("cert");
        redcloak::dev::write_file(&redis.path("listener.key"), key.as_bytes(), 0o600).expect("key");
    };
    write_pair(&old.cert_pem, &old.key_pem);
    let config = redis.config().tail(&format!(
        "[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\n{METRICS}"
    ));
    let proxy = redis.start_proxy(&config).await;
    let port = proxy.tls_address.expect("tls listener").port();
    assert_eq!(ping_over_tls(port, &old_ca).await, "PONG\n");

    let address = proxy.tls_address.expect("tls listener");
    let (stop, load, tasks) = start_load(Target::Tls(address, trusting(&[&old_ca, &new_ca])));
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_pair(&new.cert_pem, &new.key_pem);
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        names(&json, "changed"),
        ["listen.tls.cert", "listen.tls.key"]
    );
    stop_load(stop, &load, tasks).await;
    // New handshakes after the reload: with a client trusting only the new
    // CA, through rustls and redis-cli.
    let (stop, load, tasks) = start_load(Target::Tls(address, trusting(&[&new_ca])));
    stop_load(stop, &load, tasks).await;
    assert_eq!(ping_over_tls(port, &new_ca).await, "PONG\n");
    assert_ne!(ping_over_tls(port, &old_ca).await, "PONG\n");

    // The old key with the new certificate: rejected, the new pair stays.
    write_pair(&new.cert_pem, &old.key_pem);
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{json}");
    assert_eq!(names(&json, "rejected"), ["listen.tls.key"]);
    assert_eq!(ping_over_tls(port, &new_ca).await, "PONG\n");
}

/// Polling sees a Kubernetes Secret update: the kubelet writes a new
/// timestamped directory and swaps the `..data` symlink to it, so the
/// password file's path stays and what it resolves to changes. No signal,
/// no endpoint: the watch notices and reloads, under 20 clients that see
/// no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_sees_a_kubernetes_symlink_swap() {
    use std::os::unix::fs::symlink;
    let redis = TestRedis::start().await;
    let secret = redis.path("secret");
    let old = std::fs::read_to_string(redis.path("redis-password")).expect("password");
    let version = |name: &str, password: &str| {
        let dir = secret.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        redcloak::dev::write_file(&dir.join("redis-password"), password.as_bytes(), 0o600)
            .expect("password");
    };
    version("..2026_11_30_a", &old);
    symlink("..2026_11_30_a", secret.join("..data")).expect("..data");
    symlink("..data/redis-password", secret.join("redis-password")).expect("link");
    let config = redis
        .config()
        .upstream("password_file", "\"secret/redis-password\"")
        .tail(&format!("{METRICS}[reload]\nwatch_interval = \"100ms\"\n"));
    let proxy = redis.start_proxy(&config).await;
    let last_success = |metrics: &str| {
        metric(metrics, "redcloak_reload_last_success_timestamp_seconds").unwrap_or(0.0)
    };
    let started = last_success(&proxy.scrape().await);
    let (stop, load, tasks) = start_load(proxy.addr());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        last_success(&proxy.scrape().await),
        started,
        "nothing changed yet"
    );

    let new = redcloak::dev::random_password().expect("password");
    let mut admin = redis.admin().await;
    let add = format!(">{new}");
    let set = admin
        .call(&[b"ACL", b"SETUSER", REDIS_USER.as_bytes(), add.as_bytes()])
        .await;
    assert_reply(&set, b"+OK\r\n");
    // As the kubelet does: a new directory, then an atomic swap of ..data.
    version("..2026_11_30_b", &new);
    symlink("..2026_11_30_b", secret.join("..data_tmp")).expect("tmp link");
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).expect("swap");
    eventually("the watch reloads", || async {
        last_success(&proxy.scrape().await) > started
    })
    .await;
    stop_load(stop, &load, tasks).await;
    let remove = format!("<{old}");
    let set = admin
        .call(&[b"ACL", b"SETUSER", REDIS_USER.as_bytes(), remove.as_bytes()])
        .await;
    assert_reply(&set, b"+OK\r\n");
    kill_redcloak_connections(&proxy, &mut admin).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    assert_eq!(reload_failures(&proxy.scrape().await, "probe"), 0.0);
}

/// Clients move to a new `[listen.auth]` password with no error: the
/// password file lists both (one per line), then only the new one. A
/// client logged in with the old password stays logged in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_passwords_rotate_through_a_list() {
    let redis = TestRedis::start().await;
    let old = "old-client-password-0123456789-abcdefghij";
    let new = "new-client-password-9876543210-jihgfedcba";
    let auth = redis.listen_auth(old, "");
    let proxy = redis
        .start_proxy(&redis.config().tail(&auth).tail(METRICS))
        .await;
    let login = |password: &'static str| {
        let proxy = &proxy;
        async move {
            let mut c = proxy.raw().await;
            let reply = c.call(&[b"AUTH", password.as_bytes()]).await;
            (c, reply)
        }
    };
    let (mut logged_in, reply) = login(old).await;
    assert_reply(&reply, b"+OK\r\n");
    assert_error(&login(new).await.1, "-WRONGPASS");

    let file = redis.path("client-password");
    redcloak::dev::write_file(&file, format!("{old}\n{new}\n").as_bytes(), 0o600).expect("write");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(names(&json, "changed"), ["listen.auth.password"]);
    assert_reply(&login(old).await.1, b"+OK\r\n");
    assert_reply(&login(new).await.1, b"+OK\r\n");

    redcloak::dev::write_file(&file, new.as_bytes(), 0o600).expect("write");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_error(&login(old).await.1, "-WRONGPASS");
    assert_reply(&login(new).await.1, b"+OK\r\n");
    assert_reply(&logged_in.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");

    // A password too short for the profile is refused; the list stays.
    redcloak::dev::write_file(&file, b"short", 0o600).expect("write");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{json}");
    assert!(!json.to_string().contains("short\""), "{json}");
    assert_reply(&login(new).await.1, b"+OK\r\n");
}

/// One TLS connection to redcloak's listener with `tls` (one PING, so the
/// client takes in the session ticket): whether it resumed a session.
async fn handshake(address: std::net::SocketAddr, tls: &Arc<rustls::ClientConfig>) -> bool {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut raw = RawClient::new(&mut stream);
    assert_reply(&raw.call(&[b"PING"]).await, b"+PONG\r\n");
    resumed
}

/// TLS sessions carry across a reload of the listener's certificate (a
/// client that was served resumes), but not across a change of the client
/// CA: a session made under the old CA must not skip the client
/// certificate check of a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_sessions_resume_across_a_reload_unless_the_client_ca_changed() {
    use redcloak::dev::{Authority, Usage};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let redis = TestRedis::start().await;
    let server_ca = Authority::new("listener CA").expect("CA");
    let app_ca = Authority::new("app CA").expect("CA");
    let other_app_ca = Authority::new("other app CA").expect("CA");
    let server_ca_file = redis.path("listener-ca.crt");
    std::fs::write(&server_ca_file, server_ca.cert_pem()).expect("CA file");
    let write_server = || {
        let server = server_ca
            .issue("redcloak", &["localhost", "127.0.0.1"], Usage::Server)
            .expect("server certificate");
        std::fs::write(redis.path("listener.crt"), &server.cert_pem).expect("cert");
        redcloak::dev::write_file(
            &redis.path("listener.key"),
            server.key_pem.as_bytes(),
            0o600,
        )
        .expect("key");
    };
    write_server();
    std::fs::write(redis.path("app-ca.crt"), app_ca.cert_pem()).expect("app CA");
    let config = redis.config().tail(&format!(
        "[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\n\
         client_ca = \"app-ca.crt\"\n{METRICS}"
    ));
    let proxy = redis.start_proxy(&config).await;
    let address = proxy.tls_address.expect("tls listener");

    // A client with a certificate from the app CA, keeping its sessions.
    let app = app_ca
        .issue("app", &[], Usage::Client)
        .expect("app certificate");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&server_ca_file).expect("CA"))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(app.cert_pem.as_bytes()).expect("cert")],
            PrivateKeyDer::from_pem_slice(app.key_pem.as_bytes()).expect("key"),
        )
        .expect("client auth");
    let tls = Arc::new(tls);
    handshake(address, &tls).await;
    assert!(handshake(address, &tls).await, "resumes before any reload");

    write_server();
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        names(&json, "changed"),
        ["listen.tls.cert", "listen.tls.key"]
    );
    assert!(
        handshake(address, &tls).await,
        "a new listener certificate keeps the sessions"
    );

    // The client CA changes (another CA added): no session resumes, every
    // client certificate is checked again in a full handshake.
    let bundle = format!("{}{}", app_ca.cert_pem(), other_app_ca.cert_pem());
    std::fs::write(redis.path("app-ca.crt"), bundle).expect("app CAs");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(names(&json, "changed"), ["listen.tls.client_ca"]);
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(handshake(address, &tls).await);
    }
    assert_eq!(
        kinds,
        [false, true, true],
        "the first handshake after the client CA changed is a full one"
    );
}

/// Redis's certificate moves to a new CA. redcloak is given a bundle of
/// the old and the new CA under 20 clients that see no failed request;
/// Redis switches its certificate, and redcloak's new connections verify
/// it; then the old CA is removed from redcloak's file. A reload back to
/// only the old CA is rejected by the probe (Redis no longer presents a
/// certificate it signed), and the material stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_ca_rotates_new_added_then_old_removed() {
    use redcloak::dev::{Authority, Usage};
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let old_ca = std::fs::read(&redis.certs.ca).expect("old CA");
    let new_ca = Authority::new("redis rotation CA").expect("CA");
    let new_server = new_ca
        .issue("redis", &["localhost", "127.0.0.1"], Usage::Server)
        .expect("Redis certificate");
    let (new_cert, new_key) = (redis.path("redis-new.crt"), redis.path("redis-new.key"));
    std::fs::write(&new_cert, &new_server.cert_pem).expect("cert");
    redcloak::dev::write_file(&new_key, new_server.key_pem.as_bytes(), 0o600).expect("key");

    // 1. The new CA is added beside the old one, under load.
    let (stop, load, tasks) = start_load(proxy.addr());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bundle = [old_ca.clone(), new_ca.cert_pem().as_bytes().to_vec()].concat();
    std::fs::write(&redis.certs.ca, &bundle).expect("CA bundle");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(names(&json, "changed"), ["upstream.ca"]);
    stop_load(stop, &load, tasks).await;

    // 2. Redis presents a certificate from the new CA; redcloak's new
    // connections verify it.
    let mut admin = redis.admin().await;
    redis_presents(&mut admin, &new_cert, &new_key).await;
    kill_redcloak_connections(&proxy, &mut admin).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"new-ca"]).await, b"+OK\r\n");

    // 3. The old CA goes, under load.
    let (stop, load, tasks) = start_load(proxy.addr());
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&redis.certs.ca, new_ca.cert_pem()).expect("new CA only");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(names(&json, "changed"), ["upstream.ca"]);
    stop_load(stop, &load, tasks).await;

    // Only the old CA again: the probe cannot verify Redis, so the reload
    // is rejected and counted, and the new CA stays in use.
    std::fs::write(&redis.certs.ca, &old_ca).expect("old CA only");
    let (status, json) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{json}");
    assert_eq!(names(&json, "rejected"), ["upstream.ca"], "{json}");
    assert_eq!(reload_failures(&proxy.scrape().await, "probe"), 1.0);
    kill_redcloak_connections(&proxy, &mut admin).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$6\r\nnew-ca\r\n");
}
