//! Redis Sentinel: a TLS primary and replica (ACL users, default user off)
//! and three TLS Sentinels (client certificates required, redcloak logged
//! in as a Sentinel ACL user with only what it needs), from the Debian
//! redis-server package. redcloak asks a majority for the primary, proves
//! it (certificate for `upstream.server_name`, ROLE master), and follows a
//! failover.

use crate::support::*;
use redcloak::dev::{ChildRedis, RedisOptions};
use std::process::Stdio;
use std::time::{Duration, Instant};

const MASTER: &str = "mymaster";
/// The name the data nodes' certificate shows and redcloak verifies (the
/// set's other server certificate, redcloak's listener's, does not show it).
const DATA_NAME: &str = "data.redis.test";
const SENTINEL_USER: &str = "redcloak-sentinel";
/// What redcloak's Sentinel user needs (the README's Sentinel section).
const SENTINEL_ACL: &str =
    "resetchannels &+switch-master -@all +sentinel|get-master-addr-by-name +subscribe +ping";

/// A primary, its replica and three Sentinels watching them.
struct TestSentinels {
    primary: TestRedis,
    replica: ChildRedis,
    sentinels: Vec<(tokio::process::Child, u16)>,
}

/// Lines every data node needs to replicate over TLS as the admin user.
fn replication_lines(redis: &TestRedis) -> Vec<String> {
    vec![
        "tls-replication yes".into(),
        format!("tls-client-cert-file {}", redis.certs.client_cert.display()),
        format!("tls-client-key-file {}", redis.certs.client_key.display()),
        format!("masteruser {ADMIN_USER}"),
        "repl-diskless-sync-delay 0".into(),
    ]
}

impl TestSentinels {
    async fn start() -> TestSentinels {
        let primary = TestRedis::start_with(RedisSetup {
            acl: Some(format!("{LEAST_PRIVILEGE} +role")),
            redis_names: vec![DATA_NAME],
            extra: vec![
                "tls-replication yes".into(),
                "repl-diskless-sync-delay 0".into(),
            ],
            ..RedisSetup::default()
        })
        .await;
        // The primary can follow too (after a failover): set now that its
        // admin password exists.
        let mut admin = primary.admin().await;
        for (name, value) in [
            ("masteruser", ADMIN_USER.to_string()),
            ("masterauth", primary.password.clone()),
            (
                "tls-client-cert-file",
                primary.certs.client_cert.display().to_string(),
            ),
            (
                "tls-client-key-file",
                primary.certs.client_key.display().to_string(),
            ),
        ] {
            assert_reply(
                &admin
                    .call(&[b"CONFIG", b"SET", name.as_bytes(), value.as_bytes()])
                    .await,
                b"+OK\r\n",
            );
        }
        let mut extra = vec![format!(
            "user {ADMIN_USER} on >{} ~* &* +@all",
            primary.password
        )];
        extra.extend(replication_lines(&primary));
        extra.push(format!("masterauth {}", primary.password));
        // The old primary, should it come back, follows like a replica.
        let replica_dir = primary.path("replica");
        std::fs::create_dir(&replica_dir).expect("replica dir");
        let mut replica_extra = extra.clone();
        replica_extra.push(format!("replicaof 127.0.0.1 {}", primary.redis.port()));
        let replica = ChildRedis::start(
            &replica_dir,
            &primary.certs,
            &RedisOptions {
                username: REDIS_USER.into(),
                password: std::fs::read_to_string(primary.path("redis-password"))
                    .expect("password"),
                acl: format!("{LEAST_PRIVILEGE} +role"),
                default_user_off: true,
                tls_auth_clients: "yes",
                extra: replica_extra,
            },
        )
        .await
        .expect("the replica starts");
        let mut cluster = TestSentinels {
            primary,
            replica,
            sentinels: Vec::new(),
        };
        cluster
            .in_sync(cluster.replica.port(), "the replica is in sync")
            .await;
        for n in 0..3 {
            let sentinel = cluster.start_sentinel(n).await;
            cluster.sentinels.push(sentinel);
        }
        // Every Sentinel knows the replica and the two others.
        for n in 0..3 {
            eventually("the Sentinels know each other", || async {
                let master = cluster
                    .sentinel_cli(n, &["SENTINEL", "MASTER", MASTER])
                    .await;
                let field = |name: &str| {
                    let lines: Vec<&str> = master.lines().collect();
                    lines
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|at| lines.get(at + 1))
                        .map(|v| v.to_string())
                };
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
            })
            .await;
        }
        cluster
    }

    async fn start_sentinel(&self, n: usize) -> (tokio::process::Child, u16) {
        let dir = self.primary.path(&format!("sentinel-{n}"));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let port = free_port();
        let certs = &self.primary.certs;
        let conf = dir.join("sentinel.conf");
        let lines = [
            "port 0".to_string(),
            "bind 127.0.0.1".into(),
            format!("tls-port {port}"),
            format!("tls-cert-file {}", certs.redis_cert.display()),
            format!("tls-key-file {}", certs.redis_key.display()),
            format!("tls-ca-cert-file {}", certs.ca.display()),
            format!("tls-client-cert-file {}", certs.client_cert.display()),
            format!("tls-client-key-file {}", certs.client_key.display()),
            "tls-auth-clients yes".into(),
            "tls-replication yes".into(),
            format!("dir {}", dir.display()),
            format!(
                "sentinel monitor {MASTER} 127.0.0.1 {} 2",
                self.primary.redis.port()
            ),
            format!("sentinel down-after-milliseconds {MASTER} 1000"),
            format!("sentinel failover-timeout {MASTER} 10000"),
            format!("sentinel auth-user {MASTER} {ADMIN_USER}"),
            format!("sentinel auth-pass {MASTER} {}", self.primary.password),
            format!(
                "user {SENTINEL_USER} on >{} {SENTINEL_ACL}",
                self.primary.password
            ),
        ];
        std::fs::write(&conf, lines.join("\n") + "\n").expect("sentinel.conf");
        let log = std::fs::File::create(dir.join("sentinel.log")).expect("log");
        let child = tokio::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server --sentinel runs");
        eventually("the Sentinel listens", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        (child, port)
    }

    /// redis-cli against Sentinel `n` (its default user, over TLS).
    async fn sentinel_cli(&self, n: usize, args: &[&str]) -> String {
        let certs = &self.primary.certs;
        let output = tokio::process::Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(&certs.ca)
            .arg("--cert")
            .arg(&certs.client_cert)
            .arg("--key")
            .arg(&certs.client_key)
            .args(["-p", &self.sentinels[n].1.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The primary Sentinel `n` names now.
    async fn named_by(&self, n: usize) -> String {
        self.sentinel_cli(n, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])
            .await
            .lines()
            .collect::<Vec<_>>()
            .join(":")
    }

    async fn admin(&self, port: u16) -> RawClient<redcloak::upstream::UpstreamStream> {
        self.primary.admin_at(port).await
    }

    /// redcloak's config: the Sentinels instead of an address.
    fn proxy_config(&self) -> ProxyConfig {
        redcloak::dev::write_file(
            &self.primary.path("sentinel-password"),
            self.primary.password.as_bytes(),
            0o600,
        )
        .expect("sentinel password file");
        let addresses: Vec<String> = self
            .sentinels
            .iter()
            .map(|(_, port)| format!("\"127.0.0.1:{port}\""))
            .collect();
        let mut config = self.primary.config().upstream(
            "sentinel",
            &format!(
                "{{ addresses = [{}], master_name = \"{MASTER}\", username = \"{SENTINEL_USER}\", password_file = \"sentinel-password\" }}",
                addresses.join(", ")
            ),
        );
        config
            .upstream
            .retain(|line| !line.starts_with("address ="));
        config
            .upstream("server_name", &format!("\"{DATA_NAME}\""))
            .tail("[metrics]\naddress = \"127.0.0.1:0\"")
    }
}

/// redcloak in front of Sentinel: the startup check names the primary a
/// majority agrees on and proves it; a name the primary's certificate does
/// not show is refused. Under load, `kill -9` of the primary: writes go to
/// the promoted replica within a second of the Sentinels' switch, and land
/// there sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redcloak_follows_the_primary_sentinel_names() {
    let _heavy = heavy().await;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut sentinels = TestSentinels::start().await;
    let config = sentinels.proxy_config();
    let primary_address = format!("127.0.0.1:{}", sentinels.primary.redis.port());
    let replica_address = format!("127.0.0.1:{}", sentinels.replica.port());

    // The startup checks: a majority names the primary, it proves itself.
    let (passed, report) = sentinels.check(&config, "redcloak.toml");
    assert!(passed, "{report}");
    assert!(
        report.contains(&format!(
            "ok    sentinel             3/3 Sentinels name {primary_address}"
        )),
        "{report}"
    );
    // A name the primary's certificate does not show: refused, whatever
    // Sentinel says.
    let wrong = config
        .clone()
        .upstream("server_name", "\"imposter.example\"");
    let (passed, report) = sentinels.check(&wrong, "wrong.toml");
    assert!(!passed, "{report}");
    assert!(
        report.contains("FAIL  sentinel") && report.contains("not valid for name")
            || report.contains("does not name upstream.server_name"),
        "{report}"
    );

    let proxy = start_proxy_in(&sentinels.primary.path(""), &config).await;
    let mut writer = proxy.raw().await;
    assert_reply(
        &writer.call(&[b"SET", b"ha:first", b"one"]).await,
        b"+OK\r\n",
    );

    // The Sentinel password rotates without a restart: the new one added
    // on every Sentinel, the file changed, a reload, the old one removed
    // and redcloak's Sentinel connections cut. What follows (the failover)
    // is followed over connections made with the new password.
    let old_password = sentinels.primary.password.clone();
    let new_password = redcloak::dev::random_password().expect("password");
    for n in 0..3 {
        let added = sentinels
            .sentinel_cli(
                n,
                &["ACL", "SETUSER", SENTINEL_USER, &format!(">{new_password}")],
            )
            .await;
        assert!(added.contains("OK"), "{added}");
    }
    redcloak::dev::write_file(
        &sentinels.primary.path("sentinel-password"),
        new_password.as_bytes(),
        0o600,
    )
    .expect("new password");
    let outcome = proxy.reload().await;
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(outcome.changed, ["upstream.sentinel.password"]);
    for n in 0..3 {
        let removed = sentinels
            .sentinel_cli(
                n,
                &["ACL", "SETUSER", SENTINEL_USER, &format!("<{old_password}")],
            )
            .await;
        assert!(removed.contains("OK"), "{removed}");
        sentinels
            .sentinel_cli(n, &["CLIENT", "KILL", "USER", SENTINEL_USER])
            .await;
    }

    // A planned failover (SENTINEL FAILOVER): both stay up, roles swap.
    assert!(
        sentinels
            .sentinel_cli(0, &["SENTINEL", "FAILOVER", MASTER])
            .await
            .contains("OK")
    );
    let switched_at = sentinels.switched_to(&replica_address).await;
    let served_at = write_until_served(&proxy, b"ha:planned").await;
    let planned = served_at.saturating_duration_since(switched_at);
    eprintln!("sentinel planned failover: writes served {planned:?} after the switch");
    assert!(planned < Duration::from_secs(1), "{planned:?}");
    let mut writer = proxy.raw().await;
    assert_reply(&writer.call(&[b"GET", b"ha:first"]).await, b"$3\r\none\r\n");
    // And back, so the original primary is the one killed below; first
    // with a certificate that does not show upstream.server_name (the
    // set's other server certificate): Sentinel promotes it, redcloak
    // does not follow.
    sentinels
        .in_sync(
            sentinels.primary.redis.port(),
            "the old primary follows the new one",
        )
        .await;
    let certs = &sentinels.primary.certs;
    let mut original = sentinels.admin(sentinels.primary.redis.port()).await;
    redis_presents(&mut original, &certs.proxy_cert, &certs.proxy_key).await;
    // Sentinel takes a moment to see the old primary as a good replica.
    let started = Instant::now();
    loop {
        let answer = sentinels
            .sentinel_cli(1, &["SENTINEL", "FAILOVER", MASTER])
            .await;
        if answer.contains("OK") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sentinels.switched_to(&primary_address).await;
    // Two polls and the event pass: no switch; a write goes to the old
    // primary (until Sentinel demotes it), never to the unverified one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        metric(&proxy.scrape().await, "redcloak_sentinel_switches_total"),
        Some(1.0)
    );
    let mut refused = proxy.raw().await;
    refused.call(&[b"SET", b"ha:unverified", b"x"]).await;
    let mut direct = sentinels.admin(sentinels.primary.redis.port()).await;
    assert_reply(
        &direct.call(&[b"EXISTS", b"ha:unverified"]).await,
        b":0\r\n",
    );
    // Its own certificate again: the next poll follows it.
    redis_presents(&mut direct, &certs.redis_cert, &certs.redis_key).await;
    write_until_served(&proxy, b"ha:back").await;
    sentinels
        .in_sync(sentinels.replica.port(), "the replica follows again")
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..10 {
        let stop = stop.clone();
        let address = proxy.addr();
        clients.push(tokio::spawn(async move {
            let connect = || async {
                RawClient::new(
                    tokio::net::TcpStream::connect(address)
                        .await
                        .expect("connect"),
                )
            };
            let mut c = connect().await;
            let mut ok_at = Vec::new();
            let mut errors = 0u64;
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let key = format!("ha:{id}:{}", round % 100);
                c.send(&[b"SET", key.as_bytes(), b"value"]).await;
                match c.read_or_eof().await {
                    Some(reply) if &reply[..] == b"+OK\r\n" => ok_at.push(Instant::now()),
                    Some(_) => errors += 1,
                    None => {
                        errors += 1;
                        c = connect().await;
                    }
                }
                if errors > 0 && round.is_multiple_of(50) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (ok_at, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sentinels.primary.redis.kill().await;
    let killed_at = Instant::now();
    let switched_at = sentinels.switched_to(&replica_address).await;
    let served_at = write_until_served(&proxy, b"ha:probe").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut last_ok_before = killed_at;
    let mut first_ok_after: Option<Instant> = None;
    let mut total_errors = 0;
    for client in clients {
        let (ok_at, errors) = client.await.expect("client task");
        total_errors += errors;
        for at in ok_at {
            if at < switched_at {
                last_ok_before = last_ok_before.max(at);
            } else {
                first_ok_after = Some(first_ok_after.map_or(at, |f| f.min(at)));
            }
        }
    }
    let recovery = served_at.saturating_duration_since(switched_at);
    eprintln!(
        "sentinel failover: switch {:?} after the kill, writes served {:?} after the switch; {} errors while the primary was gone; load resumed {:?} after the switch",
        switched_at - killed_at,
        recovery,
        total_errors,
        first_ok_after.map(|f| f.saturating_duration_since(switched_at)),
    );
    assert!(recovery < Duration::from_secs(1), "{recovery:?}");
    assert!(first_ok_after.is_some(), "the load resumed");
    // The write landed on the promoted replica, sealed.
    let mut promoted = sentinels.admin(sentinels.replica.port()).await;
    let stored = promoted.call(&[b"GET", b"ha:probe"]).await;
    let body = redcloak::resp::bulk_body(&stored).expect("stored on the new primary");
    assert!(
        redcloak::crypto::envelope::key_id(body).is_ok(),
        "an envelope, not the value"
    );
    assert_eq!(
        metric(&proxy.scrape().await, "redcloak_sentinel_switches_total"),
        Some(3.0)
    );
}

/// Writes through redcloak until one succeeds; when it did.
async fn write_until_served(proxy: &Proxy, key: &[u8]) -> Instant {
    let started = Instant::now();
    let mut client = proxy.raw().await;
    loop {
        client.send(&[b"SET", key, b"after"]).await;
        match client.read_or_eof().await {
            Some(reply) if &reply[..] == b"+OK\r\n" => return Instant::now(),
            Some(_) => {}
            None => client = proxy.raw().await,
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never served again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl TestSentinels {
    /// `redcloak check` of `config` (written as `file`): passed, and the report.
    fn check(&self, config: &ProxyConfig, file: &str) -> (bool, String) {
        let path = self.primary.path(file);
        std::fs::write(&path, config.render()).expect("config");
        let checked = std::process::Command::new(redcloak_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("redcloak runs");
        let report = String::from_utf8_lossy(&checked.stdout).into_owned();
        (checked.status.success(), report)
    }

    /// Waits until the Redis on `port` is a replica in sync.
    async fn in_sync(&self, port: u16, what: &str) {
        // Sentinel's reconfiguration may cut a connection (CLIENT KILL):
        // one that fails is tried again.
        eventually(what, || async {
            let Some(mut node) = self.primary.try_admin_at(port).await else {
                return false;
            };
            node.send(&[b"INFO", b"replication"]).await;
            node.read_or_eof().await.is_some_and(|info| {
                String::from_utf8_lossy(&info).contains("master_link_status:up")
            })
        })
        .await;
    }

    /// When any Sentinel first names `address` as the primary.
    async fn switched_to(&self, address: &str) -> Instant {
        let started = Instant::now();
        loop {
            for n in 0..3 {
                if self.named_by(n).await == address {
                    return Instant::now();
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no switch to {address}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
