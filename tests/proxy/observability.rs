//! What operators see: exact counts on /metrics after a known workload,
//! /healthz and /readyz through start, upstream loss and drain, brute-force
//! lockout, security events, and no secret anywhere in logs or metrics.

use crate::support::*;
use bytes::BytesMut;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CLIENT_PASSWORD: &str = "client-password-5f0e9c-2d7a1b8e4c6f90a3b5d1";
const METRICS: &str = "[metrics]\naddress = \"127.0.0.1:0\"\n";

fn with_client_password(redis: &TestRedis, config: ProxyConfig, extra: &str) -> ProxyConfig {
    config.tail(&redis.listen_auth(CLIENT_PASSWORD, extra))
}

/// Sets redcloak's Redis password (ACL user `redcloak`), around redcloak.
async fn set_password(admin: &mut RawClient<redcloak::upstream::UpstreamStream>, password: &str) {
    let rule = format!(">{password}");
    let reply = admin
        .call(&[
            b"ACL",
            b"SETUSER",
            b"redcloak",
            b"resetpass",
            rule.as_bytes(),
        ])
        .await;
    assert_reply(&reply, b"+OK\r\n");
}

/// A raw client that counts the bytes it sends and receives.
struct Counting {
    client: RawClient<tokio::net::TcpStream>,
    sent: usize,
    received: usize,
}

impl Counting {
    async fn call(&mut self, args: &[&[u8]]) -> bytes::Bytes {
        let mut encoded = BytesMut::new();
        redcloak::resp::encode_command(&mut encoded, args);
        self.sent += encoded.len();
        let reply = self.client.call(args).await;
        self.received += reply.len();
        reply
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

#[tokio::test]
async fn a_known_workload_shows_exact_counts_on_metrics() {
    let redis = TestRedis::start().await;
    let config = with_client_password(&redis, redis.config(), "").tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let mut c = Counting {
        client: proxy.raw().await,
        sent: 0,
        received: 0,
    };
    assert_error(&c.call(&[b"AUTH", b"wrong-guess"]).await, "-WRONGPASS");
    assert_reply(
        &c.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await,
        b"+OK\r\n",
    );
    for (key, value) in [("k1", "v1"), ("k2", "v2"), ("plain:p", "x")] {
        assert_reply(
            &c.call(&[b"SET", key.as_bytes(), value.as_bytes()]).await,
            b"+OK\r\n",
        );
    }
    assert_reply(&c.call(&[b"GET", b"k1"]).await, b"$2\r\nv1\r\n");
    assert_reply(&c.call(&[b"GET", b"k2"]).await, b"$2\r\nv2\r\n");
    assert_reply(&c.call(&[b"GET", b"missing"]).await, b"$-1\r\n");
    // k1's envelope copied to `bad` does not open there.
    redis.copy_stored(b"k1", b"bad").await;
    assert_error(
        &c.call(&[b"GET", b"bad"]).await,
        "-ERR redcloak: value of key 'bad'",
    );
    assert_error(&c.call(&[b"INCR", b"k1"]).await, "-ERR redcloak:");
    assert_error(
        &c.call(&[b"INCR", b"plain:p"]).await,
        "-ERR value is not an integer",
    );
    assert_error(
        &c.call(&[b"NOTACOMMAND"]).await,
        "-ERR redcloak: unknown command",
    );

    // The upstream check opens its own connection, and `bad`'s value
    // poisoned the first lane, so the INCR went on a fresh one: three in all.
    eventually("the upstream check connected", || async {
        metric(&proxy.scrape().await, "redcloak_upstream_connections_total") == Some(3.0)
    })
    .await;
    let text = proxy.scrape().await;
    let value = |series: &str| metric(&text, series);
    let commands = |command: &str, outcome: &str| {
        value(&format!(
            "redcloak_commands_total{{command=\"{command}\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(
        value("redcloak_upstream_lanes_poisoned_total{reason=\"value_mismatch\"}"),
        Some(1.0)
    );
    assert_eq!(commands("auth", "redis_error"), Some(1.0));
    assert_eq!(commands("auth", "ok"), Some(1.0));
    assert_eq!(commands("set", "ok"), Some(3.0));
    assert_eq!(commands("get", "ok"), Some(3.0));
    assert_eq!(commands("get", "decrypt_error"), Some(1.0));
    assert_eq!(commands("get", "redis_error"), Some(0.0));
    assert_eq!(commands("incr", "refused"), Some(1.0));
    assert_eq!(commands("incr", "redis_error"), Some(1.0));
    assert_eq!(commands("other", "refused"), Some(1.0));
    let histogram = |name: &str, command: &str| {
        value(&format!("{name}_count{{command=\"{command}\"}}")).unwrap_or(0.0)
    };
    for (command, answered, sent_upstream) in [
        ("auth", 2.0, 0.0),
        ("set", 3.0, 3.0),
        ("get", 4.0, 4.0),
        ("incr", 2.0, 1.0),
    ] {
        assert_eq!(
            histogram("redcloak_command_duration_seconds", command),
            answered,
            "{command}"
        );
        assert_eq!(
            histogram("redcloak_command_upstream_wait_seconds", command),
            sent_upstream,
            "{command}"
        );
    }
    let sum = |name: &str| value(&format!("{name}_sum{{command=\"get\"}}")).expect("sum");
    assert!(
        sum("redcloak_command_duration_seconds") >= sum("redcloak_command_upstream_wait_seconds")
    );
    assert_eq!(
        value("redcloak_values_sealed_total{key_id=\"1\"}"),
        Some(2.0)
    );
    assert_eq!(
        value("redcloak_values_opened_total{key_id=\"1\"}"),
        Some(2.0)
    );
    for (reason, count) in [
        ("auth_failed", 1.0),
        ("unknown_key_id", 0.0),
        ("malformed", 0.0),
        ("not_encrypted", 0.0),
    ] {
        let series = format!("redcloak_value_open_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&series), Some(count), "{reason}");
    }
    assert_eq!(
        value("redcloak_legacy_plaintext_values_read_total"),
        Some(0.0)
    );
    assert_eq!(value("redcloak_client_auth_failures_total"), Some(1.0));
    assert_eq!(value("redcloak_client_auth_lockouts_total"), Some(0.0));
    assert_eq!(
        value("redcloak_client_connections_accepted_total{listener=\"tcp\"}"),
        Some(1.0)
    );
    assert_eq!(value("redcloak_client_connections_active"), Some(1.0));
    for reason in ["limit", "tls_handshake", "auth"] {
        let series = format!("redcloak_client_connections_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&series), Some(0.0), "{reason}");
    }
    assert_eq!(
        value("redcloak_client_bytes_total{direction=\"received\"}"),
        Some(c.sent as f64)
    );
    assert_eq!(
        value("redcloak_client_bytes_total{direction=\"sent\"}"),
        Some(c.received as f64)
    );
    assert!(value("redcloak_upstream_bytes_total{direction=\"sent\"}").expect("sent") > 0.0);
    assert!(value("redcloak_upstream_bytes_total{direction=\"received\"}").expect("read") > 0.0);
    for step in ["connect", "tls", "auth"] {
        let series = format!("redcloak_upstream_connect_failures_total{{reason=\"{step}\"}}");
        assert_eq!(value(&series), Some(0.0), "{step}");
    }
    assert_eq!(
        value("redcloak_upstream_tls_handshake_duration_seconds_count"),
        Some(3.0)
    );
    assert_eq!(value("redcloak_upstream_up"), Some(1.0));
    for certificate in ["redis_server", "upstream_client"] {
        let series = format!(
            "redcloak_certificate_expiry_timestamp_seconds{{certificate=\"{certificate}\"}}"
        );
        assert!(
            value(&series).expect("expiry") > now_unix(),
            "{certificate}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("redcloak_build_info{version=\"")
                && l.contains(env!("CARGO_PKG_VERSION"))
                && l.ends_with(" 1")),
        "{text}"
    );
    // Prometheus's own linter accepts the exposition.
    let (linted, problems) = promtool(&["check", "metrics"], &text);
    assert!(linted, "promtool check metrics: {problems}");
    drop(c);
    eventually("the closed client leaves the active gauge", || async {
        metric(&proxy.scrape().await, "redcloak_client_connections_active") == Some(0.0)
    })
    .await;
}

/// A raw client connected from `source` (any of loopback's addresses).
async fn connect_from(proxy: &Proxy, source: [u8; 4]) -> RawClient<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .expect("bind a loopback source address");
    RawClient::new(socket.connect(proxy.addr()).await.expect("connect"))
}

#[tokio::test]
async fn changing_the_loopback_source_address_does_not_escape_the_lockout() {
    let redis = TestRedis::start().await;
    let config = with_client_password(&redis, redis.config(), "max_failures = 3\n").tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    for last in [2u8, 3, 4] {
        let mut guesser = connect_from(&proxy, [127, 0, 0, last]).await;
        assert_error(&guesser.call(&[b"AUTH", b"guess"]).await, "-WRONGPASS");
    }
    // The right password from yet another loopback address is refused too.
    let mut elsewhere = connect_from(&proxy, [127, 9, 9, 9]).await;
    assert_error(
        &elsewhere.read().await,
        "-ERR redcloak: too many failed AUTH attempts from loopback",
    );
    elsewhere.expect_closed().await;
}

#[tokio::test]
async fn the_global_failure_budget_locks_out_every_peer() {
    let redis = TestRedis::start().await;
    // Unix-socket users and loopback are different peers; none reaches its own limit.
    let socket = redis.path("redcloak.sock");
    let config = with_client_password(
        &redis,
        redis.config(),
        "max_failures = 3\nglobal_max_failures = 4\n",
    )
    .listen(&format!("unix_socket = \"{}\"", socket.display()))
    .tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let mut tcp = proxy.raw().await;
    for _ in 0..2 {
        assert_error(&tcp.call(&[b"AUTH", b"guess"]).await, "-WRONGPASS");
    }
    let mut unix = RawClient::new(
        tokio::net::UnixStream::connect(&socket)
            .await
            .expect("unix"),
    );
    assert_error(&unix.call(&[b"AUTH", b"guess"]).await, "-WRONGPASS");
    assert_error(&unix.call(&[b"AUTH", b"guess"]).await, "-WRONGPASS");
    assert_error(
        &unix.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await,
        "-ERR redcloak: too many failed AUTH attempts from all peers together",
    );
    assert_error(
        &tcp.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await,
        "-ERR redcloak: too many failed AUTH attempts from all peers together",
    );
}

#[tokio::test]
async fn too_many_failed_logins_lock_the_peer_out_then_it_may_log_in_again() {
    let redis = TestRedis::start().await;
    let lockout = "max_failures = 3\nfailure_window = \"60s\"\nlockout_duration = \"2s\"\n";
    let config = with_client_password(&redis, redis.config(), lockout).tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let mut client = proxy.raw().await;
    for _ in 0..3 {
        assert_error(&client.call(&[b"AUTH", b"guess"]).await, "-WRONGPASS");
    }
    let locked_at = std::time::Instant::now();
    // The 4th attempt, even with the right password, is refused within the window.
    let refused = client.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await;
    assert_error(
        &refused,
        "-ERR redcloak: too many failed AUTH attempts from loopback",
    );
    assert_error(
        &client
            .call(&[
                b"HELLO",
                b"3",
                b"AUTH",
                b"default",
                CLIENT_PASSWORD.as_bytes(),
            ])
            .await,
        "-ERR redcloak: too many failed AUTH attempts",
    );
    assert_error(&client.call(&[b"GET", b"k"]).await, "-NOAUTH");
    // A new connection from the same address is turned away at once.
    let mut second = proxy.raw().await;
    assert_error(
        &second.read().await,
        "-ERR redcloak: too many failed AUTH attempts",
    );
    second.expect_closed().await;
    let text = proxy.scrape().await;
    assert_eq!(
        metric(&text, "redcloak_client_auth_failures_total"),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "redcloak_client_auth_lockouts_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "redcloak_client_connections_rejected_total{reason=\"auth\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "redcloak_commands_total{command=\"auth\",outcome=\"refused\"}"
        ),
        Some(1.0)
    );
    // After the lockout, the right password works again.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(locked_at.elapsed())).await;
    assert_reply(
        &client.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await,
        b"+OK\r\n",
    );
    assert_reply(&client.call(&[b"GET", b"k"]).await, b"$-1\r\n");
}

#[tokio::test]
async fn readiness_follows_the_upstream_and_upstream_failures_are_counted_by_step() {
    let mut redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    assert_eq!(proxy.admin_get("/readyz").await, (200, "ready\n".into()));
    assert_eq!(proxy.admin_get("/healthz").await, (200, "ok\n".into()));
    // A proxy whose Redis password is wrong: every client's connection fails at AUTH.
    std::fs::write(redis.path("wrong-password"), "not-the-password").expect("write");
    let wrong = redis
        .config()
        .upstream("password_file", "\"wrong-password\"")
        .tail(METRICS);
    let refused = redis.start_proxy(&wrong).await;
    let mut client = refused.raw().await;
    client.send(&[b"PING"]).await;
    assert_error(&client.read().await, "-ERR redcloak: upstream unavailable");
    eventually("the failed login is counted", || async {
        let text = refused.scrape().await;
        metric(
            &text,
            "redcloak_upstream_connect_failures_total{reason=\"auth\"}",
        ) >= Some(2.0)
            && metric(&text, "redcloak_upstream_up") == Some(0.0)
    })
    .await;
    assert_eq!(refused.admin_get("/readyz").await.0, 503);

    redis.redis.kill().await;
    eventually(
        "/readyz turns 503 once Redis is gone, naming the step",
        || async {
            let (status, body) = proxy.admin_get("/readyz").await;
            status == 503
                && body.starts_with("upstream unavailable: cannot connect to Redis at 127.0.0.1:")
        },
    )
    .await;
    let text = proxy.scrape().await;
    assert_eq!(metric(&text, "redcloak_upstream_up"), Some(0.0));
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    let mut late = proxy.raw().await;
    late.send(&[b"PING"]).await;
    assert_error(&late.read().await, "-ERR redcloak: upstream unavailable");
    let text = proxy.scrape().await;
    assert!(
        metric(
            &text,
            "redcloak_upstream_connect_failures_total{reason=\"connect\"}"
        ) >= Some(1.0),
        "{text}"
    );
}

/// A TCP relay to Redis that holds every connection until released: the
/// startup checks cannot finish before the test says so.
async fn held_relay(redis_port: u16) -> (u16, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (release, released) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut released = released.clone();
            tokio::spawn(async move {
                let _ = released.wait_for(|r| *r).await;
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, release)
}

#[tokio::test]
async fn readyz_is_503_until_the_gate_passes_then_200_then_503_for_good_while_draining() {
    let redis = TestRedis::start().await;
    let (relay_port, release) = held_relay(redis.redis.port()).await;
    let config = redis
        .config()
        .upstream("address", &format!("\"127.0.0.1:{relay_port}\""))
        .upstream("connect_timeout", "\"20s\"")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n")
        .tail("[shutdown]\ngrace_period = \"20s\"\n");
    std::fs::write(redis.path("ready.toml"), config.render()).expect("write");
    let mut command = Command::new(redcloak_bin());
    command
        .args(["serve", "--log-format", "json", "--config"])
        .arg(redis.path("ready.toml"));
    let mut serving = ServeChild::launch(command);
    let admin = serving.wait_listening("admin").await;
    // The startup checks are waiting on the held relay.
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(
        http_get(admin, "/readyz").await,
        (
            503,
            "starting: the startup checks have not passed yet\n".into()
        )
    );
    assert_eq!(
        serving.listening("tcp"),
        None,
        "no Redis listener before the gate passed"
    );
    release.send(true).expect("release");
    eventually("/readyz turns 200", || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;
    serving.address = serving.wait_listening("tcp").await;
    // A request in flight holds the drain open.
    let mut busy = serving.raw().await;
    busy.send(&[b"BLPOP", b"plain:queue", b"0"]).await;
    wait_until_blocked(&redis, 1).await;
    serving.signal("-TERM");
    eventually("/readyz turns 503 while draining", || async {
        http_get(admin, "/readyz").await == (503, "draining: shutting down\n".into())
    })
    .await;
    assert!(
        serving.child.try_wait().expect("wait").is_none(),
        "still draining"
    );
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    // The pending request is answered; the drain ends; never ready again.
    let mut admin_client = redis.admin().await;
    admin_client.call(&[b"RPUSH", b"plain:queue", b"job"]).await;
    assert_reply(
        &busy.read().await,
        &resp_array(b'*', &[b"plain:queue", b"job"]),
    );
    assert_eq!(serving.exit_code().await.0, 0);
}

/// Runs the binary at trace level through a workload with known secrets;
/// returns its logs and its last scrape.
async fn traced_run(redis: &TestRedis, log_key_names: bool) -> (String, String) {
    let config = with_client_password(redis, redis.config(), "")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n")
        .tail(&format!("[logging]\nlog_key_names = {log_key_names}\n"));
    std::fs::write(redis.path("traced.toml"), config.render()).expect("write");
    let mut command = Command::new(redcloak_bin());
    command
        .args(["--log-format", "json", "serve", "--config"])
        .arg(redis.path("traced.toml"))
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null());
    let serving = ServeChild::spawn(command).await;
    let admin_address = serving.wait_listening("admin").await;
    let port = serving.address.port();
    let mut client = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
    );
    assert_error(
        &client.call(&[b"AUTH", b"guess-0a1b2c3d"]).await,
        "-WRONGPASS",
    );
    client.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await;
    let value = b"top-secret-value-7c41";
    assert_reply(
        &client.call(&[b"SET", b"session:alice-9f", value]).await,
        b"+OK\r\n",
    );
    assert_reply(
        &client.call(&[b"GET", b"session:alice-9f"]).await,
        &[&b"$21\r\n"[..], value, b"\r\n"].concat(),
    );
    redis
        .copy_stored(b"session:alice-9f", b"session:moved-9f")
        .await;
    let mut admin = redis.admin().await;
    assert_error(
        &client.call(&[b"GET", b"session:moved-9f"]).await,
        "-ERR redcloak:",
    );
    assert_error(
        &client.call(&[b"APPEND", b"session:alice-9f", b"x"]).await,
        "-ERR redcloak:",
    );
    // A message published around redcloak, in clear, on an encrypted channel:
    // dropped, and a security event that never holds the payload.
    let mut subscriber = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
    );
    subscriber
        .call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()])
        .await;
    subscriber.send(&[b"SUBSCRIBE", b"session:news"]).await;
    subscriber.read().await;
    admin.call(&[b"PUBLISH", b"session:news", value]).await;
    client
        .call(&[b"PUBLISH", b"session:news", b"sealed-hello"])
        .await;
    assert_reply(
        &subscriber.read().await,
        &resp_array(b'*', &[b"message", b"session:news", b"sealed-hello"]),
    );
    // Redis stops accepting redcloak's password: the next upstream login is rejected.
    set_password(&mut admin, &format!("{}-changed", redis.password)).await;
    let mut rejected = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
    );
    // MULTI needs a connection of its own (the shared lane logged in before).
    rejected.send(&[b"MULTI"]).await;
    assert_error(
        &rejected.read().await,
        "-ERR redcloak: upstream unavailable",
    );
    set_password(&mut admin, &redis.password).await;
    // Enough failed logins lock this address out (the default: 5 in 60 s).
    let mut guesses = 1;
    while guesses < 5 {
        assert_error(
            &client.call(&[b"AUTH", b"guess-0a1b2c3d"]).await,
            "-WRONGPASS",
        );
        guesses += 1;
    }
    assert_error(
        &client.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await,
        "-ERR redcloak: too many failed AUTH attempts",
    );
    let (_, scraped) = http_get(admin_address, "/metrics").await;
    serving.signal("-TERM");
    let (code, logs) = serving.exit_code().await;
    assert_eq!(code, 0);
    (logs, scraped)
}

#[tokio::test]
async fn security_events_are_json_on_their_own_target_and_no_secret_reaches_logs_or_metrics() {
    let redis = TestRedis::start().await;
    let key = std::fs::read_to_string(redis.path("key-1")).expect("key");
    let key_bytes = redcloak::crypto::keyring::decode_key(1, key.as_bytes()).expect("key");
    for log_key_names in [false, true] {
        let (logs, scraped) = traced_run(&redis, log_key_names).await;
        assert!(logs.lines().count() > 20, "trace logging is on: {logs}");
        let secrets = [
            CLIENT_PASSWORD.to_owned(),
            "guess-0a1b2c3d".to_owned(),
            redis.password.clone(),
            key.trim().to_owned(),
            "top-secret-value-7c41".to_owned(),
            format!(
                "{:02x}{:02x}{:02x}{:02x}",
                key_bytes[0], key_bytes[1], key_bytes[2], key_bytes[3]
            ),
        ];
        for secret in &secrets {
            assert!(
                !logs.contains(secret.as_str()),
                "a secret in the logs: {secret}"
            );
            assert!(
                !scraped.contains(secret.as_str()),
                "a secret in /metrics: {secret}"
            );
        }
        assert!(!scraped.contains("session:"), "key names never in metrics");
        let events: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["target"] == "redcloak::security")
            .collect();
        let of = |name: &str| {
            events
                .iter()
                .find(|e| e["fields"]["event"] == name)
                .unwrap_or_else(|| panic!("no {name} event in {events:?}"))
                .clone()
        };
        assert_eq!(
            of("client_auth_failure")["fields"]["peer"]
                .as_str()
                .map(|p| p.starts_with("127.0.0.1:")),
            Some(true)
        );
        let refused = of("command_refused");
        assert_eq!(refused["fields"]["command"], "append");
        assert_eq!(refused["fields"]["rule"], "encrypted_key");
        let lockout = of("client_auth_lockout");
        assert_eq!(lockout["fields"]["failures"], 5);
        assert_eq!(lockout["fields"]["lockout_seconds"], 300);
        assert_eq!(lockout["fields"]["peer"], "loopback");
        let rejected = of("upstream_rejected");
        assert_eq!(rejected["fields"]["step"], "auth");
        assert!(
            rejected["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("refused redcloak's AUTH")),
            "{rejected}"
        );
        let failed = of("decrypt_failure");
        assert_eq!(failed["fields"]["command"], "get");
        assert_eq!(failed["fields"]["key_id"], 1);
        assert_eq!(failed["fields"]["reason"], "auth_failed");
        assert_eq!(failed["level"], "WARN");
        let dropped = of("message_dropped");
        assert_eq!(dropped["fields"]["reason"], "not_encrypted");
        assert_eq!(dropped["level"], "WARN");
        assert_eq!(
            dropped["fields"].get("channel").and_then(|c| c.as_str()),
            log_key_names.then_some("session:news")
        );
        if log_key_names {
            assert_eq!(failed["fields"]["key"], "session:moved-9f");
        } else {
            assert!(failed["fields"].get("key").is_none(), "{failed}");
            assert!(!logs.contains("session:"), "key names only when asked for");
        }
    }
}

/// Every `redcloak_*` name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("redcloak_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| base.ends_with("_seconds"))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// Fails when `text` names a `redcloak_*` metric that `metrics::ALL` lacks.
#[track_caller]
fn assert_only_defined_metrics(text: &str, what: &str) {
    let unknown: Vec<_> = metric_names(text)
        .difference(&defined_metrics())
        .cloned()
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} names undefined metrics: {unknown:?}"
    );
}

fn defined_metrics() -> std::collections::BTreeSet<String> {
    redcloak::telemetry::metrics::ALL
        .iter()
        .map(|m| m.name.to_owned())
        .collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [
        &["check", "config", "deploy/prometheus/prometheus.yml"][..],
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        &["test", "rules", "deploy/prometheus/alerts.test.yml"],
    ] {
        let (ok, output) = promtool(args, "");
        assert!(ok, "promtool {args:?}: {output}");
    }
    let alerts = read("deploy/prometheus/alerts.yml");
    for alert in [
        "RedcloakUpstreamDown",
        "RedcloakDecryptFailures",
        "RedcloakAuthFailureBurst",
        "RedcloakCertificateExpiringSoon",
        "RedcloakRefusedCommandsRising",
    ] {
        assert!(alerts.contains(&format!("alert: {alert}")), "{alert}");
    }
    assert_only_defined_metrics(&alerts, "alerts");
}

#[test]
fn the_dashboard_queries_parse_and_use_only_defined_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/prometheus/redcloak-dashboard.json")).expect("JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(queries.len() >= 15, "{queries:?}");
    // promtool parses PromQL in recording rules: one rule per query.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let query = query
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&query).expect("quoted")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).expect("write");
    let (ok, output) = promtool(&["check", "rules", file.to_str().expect("path")], "");
    assert!(ok, "dashboard queries: {output}");
    let queries = queries.join("\n");
    assert_only_defined_metrics(&queries, "the dashboard");
    let used = metric_names(&queries);
    let unshown: Vec<_> = defined_metrics().difference(&used).cloned().collect();
    assert!(unshown.is_empty(), "metrics with no panel: {unshown:?}");
}

#[test]
fn the_readme_lists_every_metric_with_one_line_each() {
    let readme = read("README.md");
    let listed: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with("| `redcloak_"))
        .collect();
    let names: Vec<String> = listed
        .iter()
        .map(|line| line.split('`').nth(1).expect("name").to_owned())
        .collect();
    let expected: Vec<String> = redcloak::telemetry::metrics::ALL
        .iter()
        .map(|m| m.name.to_owned())
        .collect();
    assert_eq!(
        names, expected,
        "README metric table, in metrics::ALL order"
    );
    assert_only_defined_metrics(&readme, "readme");
}

#[tokio::test]
async fn unix_socket_peers_are_counted_by_user_id_apart_from_tcp_peers() {
    let redis = TestRedis::start().await;
    let socket = redis.path("redcloak.sock");
    let lockout = "max_failures = 2\nfailure_window = \"60s\"\nlockout_duration = \"60s\"\n";
    let config = with_client_password(&redis, redis.config(), lockout)
        .listen(&format!("unix_socket = \"{}\"", socket.display()))
        .tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let unix = || async {
        RawClient::new(
            tokio::net::UnixStream::connect(&socket)
                .await
                .expect("unix connect"),
        )
    };
    let mut over_unix = unix().await;
    for _ in 0..2 {
        assert_error(&over_unix.call(&[b"AUTH", b"guess"]).await, "-WRONGPASS");
    }
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    let refused = over_unix.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await;
    assert_error(
        &refused,
        &format!(
            "-ERR redcloak: too many failed AUTH attempts from unix socket, uid {}",
            uid.expect("uid")
        ),
    );
    let mut again = unix().await;
    assert_error(
        &again.read().await,
        "-ERR redcloak: too many failed AUTH attempts",
    );
    let scraped = proxy.scrape().await;
    assert_eq!(
        metric(
            &scraped,
            "redcloak_client_connections_accepted_total{listener=\"unix\"}"
        ),
        Some(2.0)
    );
    // A TCP client on 127.0.0.1 is another peer: not locked out.
    let mut over_tcp = proxy.raw().await;
    assert_reply(
        &over_tcp.call(&[b"AUTH", CLIENT_PASSWORD.as_bytes()]).await,
        b"+OK\r\n",
    );
}

/// `GET path` to the admin listener from a given loopback source address.
async fn probe_from(source: [u8; 4], admin: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(std::net::SocketAddr::from((source, 0))).ok()?;
    let mut stream = socket.connect(admin).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    tokio::time::timeout(READ_TIMEOUT, stream.read_to_string(&mut answer))
        .await
        .ok()?
        .ok()?;
    answer.lines().next().map(str::to_owned)
}

#[tokio::test]
async fn connections_held_open_never_keep_probes_from_the_admin_listener() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let admin = proxy.admin.expect("admin listener");
    // One peer opens far more connections than it may hold, and sends nothing.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(
            tokio::net::TcpStream::connect(admin)
                .await
                .expect("connect"),
        );
    }
    // Another peer (the kubelet, Prometheus) is served at once.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let status = probe_from([127, 0, 0, 2], admin, path).await;
        assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"), "{path}");
    }
    // The silent ones are closed within about a second, so even the same
    // peer is served again.
    for stream in &mut held {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            READ_TIMEOUT,
            tokio::io::AsyncReadExt::read(stream, &mut byte),
        )
        .await
        .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)));
    }
    let status = probe_from([127, 0, 0, 1], admin, "/healthz").await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
}

#[tokio::test]
async fn readiness_follows_new_connections_and_the_replica_role() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let ready = || async { proxy.admin_get("/readyz").await.0 == 200 };
    eventually("ready", ready).await;
    // Redis drops redcloak's connections while staying healthy: readiness
    // stays 200 through the next checks (no connection of its own to lose).
    let mut admin = redis.admin().await;
    admin
        .call(&[b"CLIENT", b"KILL", b"USER", REDIS_USER.as_bytes()])
        .await;
    let checks_later = std::time::Instant::now() + std::time::Duration::from_secs(6);
    while std::time::Instant::now() < checks_later {
        let (status, body) = proxy.admin_get("/readyz").await;
        assert_eq!(status, 200, "a false 503: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut working = proxy.raw().await;
    assert_reply(&working.call(&[b"PING"]).await, b"+PONG\r\n");
    // New logins fail; connections made before still work.
    set_password(&mut admin, &format!("{}-changed", redis.password)).await;
    eventually("503 naming the refused login", || async {
        let (status, body) = proxy.admin_get("/readyz").await;
        status == 503 && body.contains("refused redcloak's AUTH")
    })
    .await;
    assert_reply(&working.call(&[b"PING"]).await, b"+PONG\r\n");
    set_password(&mut admin, &redis.password).await;
    eventually("ready again", ready).await;
    // Demoted to a replica: reads would work, writes would not.
    assert_reply(
        &admin.call(&[b"REPLICAOF", b"127.0.0.1", b"1"]).await,
        b"+OK\r\n",
    );
    eventually("503 for a replica", || async {
        let (status, body) = proxy.admin_get("/readyz").await;
        status == 503 && body.contains("is a replica")
    })
    .await;
    assert_reply(
        &admin.call(&[b"REPLICAOF", b"NO", b"ONE"]).await,
        b"+OK\r\n",
    );
    eventually("ready once primary again", ready).await;
}
