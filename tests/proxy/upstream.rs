//! The upstream side fails closed: a wrong CA, name, certificate or password
//! ends the client connection with a clear error, nothing is ever sent
//! without TLS, and losing Redis answers every pending request with an error.

use crate::support::*;
use redcloak::dev::{Authority, Usage, write_file};
use std::io::Read;

/// Connects a client and returns the proxy's only reply before it closes.
async fn refusal(proxy: &Proxy) -> String {
    let mut c = proxy.raw().await;
    c.send(&[b"PING"]).await;
    let reply = c.read().await;
    c.expect_closed().await;
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_not_signed_by_upstream_ca_is_refused() {
    let redis = TestRedis::start().await;
    let other = Authority::new("not Redis's CA").expect("ca");
    write_file(
        &redis.path("other-ca.crt"),
        other.cert_pem().as_bytes(),
        0o644,
    )
    .expect("write");
    let config = redis
        .config()
        .upstream("ca", "\"other-ca.crt\"")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"");
    let proxy = redis.start_proxy(&config).await;
    let text = refusal(&proxy).await;
    assert!(
        text.starts_with("-ERR redcloak: upstream unavailable: TLS handshake"),
        "{text}"
    );
    assert!(text.contains("not signed by upstream.ca"), "{text}");
    // Counted as a TLS failure (the client's connection and the upstream check).
    let scraped = proxy.scrape().await;
    let tls = metric(
        &scraped,
        "redcloak_upstream_connect_failures_total{reason=\"tls\"}",
    );
    assert!(tls >= Some(1.0), "{scraped}");
    assert_eq!(
        metric(&scraped, "redcloak_upstream_connections_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_missing_from_redis_certificate_is_refused() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(
            &redis
                .config()
                .upstream("server_name", "\"redis.elsewhere.example\""),
        )
        .await;
    let text = refusal(&proxy).await;
    assert!(
        text.contains("does not name upstream.server_name"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_redis_does_not_trust_is_refused() {
    let redis = TestRedis::start().await;
    let stranger = Authority::new("stranger CA").expect("ca");
    let cert = stranger
        .issue("redcloak", &[], Usage::Client)
        .expect("cert");
    write_file(&redis.path("stranger.crt"), cert.cert_pem.as_bytes(), 0o644).expect("write");
    write_file(&redis.path("stranger.key"), cert.key_pem.as_bytes(), 0o600).expect("write");
    let config = redis
        .config()
        .upstream("cert", "\"stranger.crt\"")
        .upstream("key", "\"stranger.key\"");
    let proxy = redis.start_proxy(&config).await;
    let text = refusal(&proxy).await;
    assert!(text.contains("client certificate"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_a_client_certificate_cannot_be_configured() {
    let redis = TestRedis::start().await;
    let mut config = redis.config();
    config
        .upstream
        .retain(|line| !line.starts_with("cert =") && !line.starts_with("key ="));
    std::fs::write(redis.path("no-cert.toml"), config.render()).expect("write");
    let err = redcloak::config::load(&redis.path("no-cert.toml")).expect_err("refused");
    assert!(
        err.to_string().starts_with("upstream.cert: required"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_with_redis_reason_and_no_password() {
    let redis = TestRedis::start().await;
    let wrong = "wrong-password-that-must-not-leak";
    let config = redis
        .config()
        .upstream("password_file", "\"wrong-password\"");
    std::fs::write(redis.path("wrong-password"), wrong).expect("write");
    let proxy = redis.start_proxy(&config).await;
    let text = refusal(&proxy).await;
    assert!(
        text.contains("refused redcloak's AUTH as user 'redcloak': WRONGPASS"),
        "{text}"
    );
    assert!(
        !text.contains(wrong) && !text.contains(&redis.password),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_but_a_tls_client_hello_reaches_a_plaintext_upstream() {
    let redis = TestRedis::start().await;
    // A plain TCP listener that records what redcloak sends and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let recorder = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stream.read(&mut chunk) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
        }
        seen
    });
    let config = redis
        .config()
        .upstream("address", &format!("\"127.0.0.1:{port}\""))
        .upstream("connect_timeout", "\"1s\"");
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    c.send(&[b"SET", b"k", b"secret-value"]).await;
    let text = String::from_utf8_lossy(&c.read().await).into_owned();
    assert!(
        text.contains("within upstream.connect_timeout") && text.contains("TLS handshake"),
        "{text}"
    );
    c.expect_closed().await;
    let seen = tokio::task::spawn_blocking(move || recorder.join().expect("recorder"))
        .await
        .expect("join");
    assert!(seen.len() > 5, "redcloak sent nothing");
    assert_eq!(
        &seen[..2],
        &[0x16, 0x03],
        "the first bytes are a TLS handshake record"
    );
    let contains = |needle: &[u8]| seen.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(b"AUTH") && !contains(redis.password.as_bytes()) && !contains(b"secret-value")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_upstream_answers_every_pending_request_and_closes_the_client() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    let id = c.call(&[b"CLIENT", b"ID"]).await;
    let id = String::from_utf8_lossy(&id[1..id.len() - 2]).into_owned();
    // BLPOP blocks the connection; PING and GET queue behind it. One write,
    // so all three are pending in redcloak before BLPOP reaches Redis.
    c.send_raw(b"*3\r\n$5\r\nBLPOP\r\n$11\r\nplain:never\r\n$1\r\n0\r\n*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        .await;
    wait_until_blocked(&redis, 1).await;
    let mut admin = redis.admin().await;
    assert_reply(
        &admin
            .call(&[b"CLIENT", b"KILL", b"ID", id.as_bytes()])
            .await,
        b":1\r\n",
    );
    for _ in 0..3 {
        assert_error(
            &c.read().await,
            "-ERR redcloak: upstream connection closed by Redis",
        );
    }
    c.expect_closed().await;
    // A new client gets a new upstream connection.
    let mut fresh = proxy.raw().await;
    assert_reply(&fresh.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_closes_clients_and_new_clients_get_a_clear_error() {
    let mut redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
    redis.redis.kill().await;
    // The idle client on a lane is told when it next sends, and closed.
    c.send(&[b"PING"]).await;
    let error = String::from_utf8_lossy(&c.read().await).into_owned();
    assert!(error.starts_with("-ERR redcloak: upstream"), "{error}");
    c.expect_closed().await;
    let text = refusal(&proxy).await;
    assert!(
        text.starts_with("-ERR redcloak: upstream unavailable: cannot connect to Redis"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_that_expires_is_refused_on_the_next_connection_resumed_or_not() {
    use time::{Duration as Span, OffsetDateTime};
    let now = OffsetDateTime::now_utc();
    let expires = now + Span::seconds(3);
    let setup = RedisSetup {
        redis_cert_validity: Some((now - Span::days(1), expires)),
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    let proxy = redis.start_proxy(&redis.config()).await;
    // A full handshake while the certificate is valid: Redis hands out a
    // session ticket that a resuming client could use later.
    for _ in 0..2 {
        let mut c = proxy.raw().await;
        assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
    }
    let wait = (expires - OffsetDateTime::now_utc()) + Span::seconds(1);
    tokio::time::sleep(wait.try_into().unwrap_or_default()).await;
    for _ in 0..3 {
        let text = refusal(&proxy).await;
        assert!(text.contains("expired"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_contradicts_its_request_is_never_delivered_and_its_connection_is_closed() {
    let redis = TestRedis::start().await;
    let relay = TlsRelay::start(&redis).await;
    let config = redis
        .config()
        .upstream("address", &format!("\"127.0.0.1:{}\"", relay.port))
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let proxy = redis.start_proxy(&config).await;
    let mut setup = proxy.raw().await;
    assert_reply(&setup.call(&[b"SET", b"k", b"secret"]).await, b"+OK\r\n");
    drop(setup);
    // The session finds the first three contradicting their requests; the
    // lane's reader finds the push. Either poisons the client's lane.
    type Case<'a> = (&'a [&'a [u8]], &'a [u8], &'a str);
    let cases: [Case; 4] = [
        (&[b"GET", b"k"], b":1\r\n", CONTRADICTS),
        (&[b"GET", b"k"], b"+OK\r\n", CONTRADICTS),
        (&[b"MGET", b"k", b"k"], b"*1\r\n$3\r\nabc\r\n", CONTRADICTS),
        // A RESP3 push on a RESP2 connection.
        (&[b"PING"], b">2\r\n$7\r\nmessage\r\n$1\r\nx\r\n", LOST),
    ];
    const CONTRADICTS: &str = "-ERR redcloak: upstream protocol error: Redis";
    const LOST: &str = "-ERR redcloak: upstream connection lost";
    for (i, (request, reply, expected)) in cases.into_iter().enumerate() {
        let mut c = proxy.raw().await;
        assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
        relay.replace_next_reply(reply);
        let error = c.call(request).await;
        assert_error(&error, expected);
        c.expect_closed().await;
        eventually("redcloak closes that upstream connection", || async {
            relay.closed_by_redcloak() > i
        })
        .await;
    }
    assert_eq!(
        metric(
            &proxy.scrape().await,
            "redcloak_upstream_protocol_errors_total"
        ),
        Some(4.0)
    );
    let metrics = proxy.scrape().await;
    let poisoned = |reason: &str| {
        metric(
            &metrics,
            &format!("redcloak_upstream_lanes_poisoned_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(poisoned("contradiction"), Some(3.0));
    assert_eq!(poisoned("push"), Some(1.0));
    // Untouched replies still pass.
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$6\r\nsecret\r\n");
}

/// SIGSTOP or SIGCONT to the test's redis-server: a hung Redis, and back.
fn freeze(redis: &TestRedis, frozen: bool) {
    let pid = redis.redis.pid().expect("redis runs").to_string();
    let signal = if frozen { "-STOP" } else { "-CONT" };
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_gets_pending_requests_an_error_after_request_timeout() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .upstream("request_timeout", "\"1s\"")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
    freeze(&redis, true);
    c.send(&[b"GET", b"plain:a"]).await;
    c.send(&[b"GET", b"plain:b"]).await;
    let first = c.read().await;
    // Silent past 1.5x the timeout with requests in flight: the lane goes.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    freeze(&redis, false);
    for error in [first, c.read().await] {
        assert_error(
            &error,
            "-ERR redcloak: Redis did not answer within upstream.request_timeout (1s)",
        );
    }
    c.expect_closed().await;
    assert_eq!(
        metric(
            &proxy.scrape().await,
            "redcloak_upstream_request_timeouts_total"
        ),
        Some(1.0)
    );
    // The lane those requests were on is poisoned, not used again.
    eventually("the silent lane is poisoned", || async {
        let metrics = proxy.scrape().await;
        metric(
            &metrics,
            "redcloak_upstream_lanes_poisoned_total{reason=\"timeout\"}",
        ) == Some(1.0)
    })
    .await;
    // Blocking commands may wait their own timeout on top, or forever.
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"BLPOP", b"plain:q", b"1.5"]).await, b"*-1\r\n");
    c.send(&[b"BLPOP", b"plain:q", b"0"]).await;
    wait_until_blocked(&redis, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let mut pusher = proxy.raw().await;
    assert_reply(&pusher.call(&[b"RPUSH", b"plain:q", b"x"]).await, b":1\r\n");
    assert_reply(&c.read().await, b"*2\r\n$7\r\nplain:q\r\n$1\r\nx\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_connection_idle_for_a_while_is_checked_before_a_client_gets_it() {
    let redis = TestRedis::start().await;
    let relay = TlsRelay::start(&redis).await;
    // A request timeout far beyond the test's patience: only the check can answer.
    let config = redis
        .config()
        .upstream("address", &format!("\"127.0.0.1:{}\"", relay.port))
        .upstream("pool_idle", "1")
        .upstream("connect_timeout", "\"1s\"")
        .upstream("request_timeout", "\"600s\"")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let proxy = redis.start_proxy(&config).await;
    eventually("the pool is warm", || async {
        metric(&proxy.scrape().await, "redcloak_upstream_pool_idle") == Some(1.0)
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    relay.hold_replies(true);
    let mut c = proxy.raw().await;
    c.send(&[b"GET", b"plain:a"]).await;
    assert_error(&c.read().await, "-ERR redcloak: upstream unavailable");
    relay.hold_replies(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_use_tcp_keepalive() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
    let filter = format!("dport = :{}", redis.redis.port());
    let output = std::process::Command::new("ss")
        .args(["-Htno", "state", "established", &filter])
        .output()
        .expect("ss");
    let sockets = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!sockets.trim().is_empty(), "no upstream connection found");
    assert!(
        sockets
            .lines()
            .all(|line| line.contains("timer:(keepalive")),
        "{sockets}"
    );
}
