//! AUTH belongs to the proxy: client AUTH / HELLO AUTH are checked against
//! [listen.auth] and never reach Redis; RESET keeps the upstream logged in.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_listen_auth_auth_is_answered_like_a_passwordless_redis_and_never_forwarded() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
    let before = redis_calls(&redis, "auth").await;
    assert_error(
        &c.call(&[b"AUTH", b"anything"]).await,
        "-ERR AUTH <password> called without any password",
    );
    assert_reply(
        &c.call(&[b"AUTH", b"default", b"anything"]).await,
        b"+OK\r\n",
    );
    assert_error(&c.call(&[b"AUTH", b"someone", b"x"]).await, "-WRONGPASS");
    assert_error(
        &c.call(&[b"AUTH"]).await,
        "-ERR wrong number of arguments for 'auth'",
    );
    // Each INFO above came from a fresh admin connection (one AUTH each).
    assert_eq!(
        redis_calls(&redis, "auth").await,
        before + 1,
        "a client AUTH reached Redis"
    );
    // HELLO moves the client off its lane to a connection of its own,
    // which redcloak logs in with its own AUTH: the client's is not sent.
    assert!(
        c.call(&[b"HELLO", b"3", b"AUTH", b"default", b"x"])
            .await
            .starts_with(b"%")
    );
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_listen_auth_clients_must_log_in_to_redcloak() {
    let redis = TestRedis::start().await;
    std::fs::write(redis.path("client-password"), "client-secret-0123456789\n").expect("write");
    let config = redis
        .config()
        .tail("[listen.auth]\npassword_file = \"client-password\"\n");
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"GET", b"k"]).await,
        b"-NOAUTH Authentication required.\r\n",
    );
    assert_error(
        &c.call(&[b"HELLO", b"3"]).await,
        "-NOAUTH HELLO must be called",
    );
    assert_error(&c.call(&[b"AUTH", b"wrong"]).await, "-WRONGPASS");
    assert_error(
        &c.call(&[b"AUTH", b"other-user", b"client-secret-0123456789"])
            .await,
        "-WRONGPASS",
    );
    assert_reply(
        &c.call(&[b"GET", b"k"]).await,
        b"-NOAUTH Authentication required.\r\n",
    );
    assert_reply(
        &c.call(&[b"AUTH", b"client-secret-0123456789"]).await,
        b"+OK\r\n",
    );
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$-1\r\n");

    let mut hello = proxy.raw().await;
    let reply = hello
        .call(&[
            b"HELLO",
            b"3",
            b"AUTH",
            b"default",
            b"client-secret-0123456789",
        ])
        .await;
    assert!(reply.starts_with(b"%"), "{reply:?}");
    assert_reply(&hello.call(&[b"GET", b"k"]).await, b"_\r\n");

    // The redis crate logs in with a URL password.
    let url = format!("redis://:client-secret-0123456789@{}/", proxy.addr());
    let mut client = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let pong: String = redis::cmd("PING")
        .query_async(&mut client)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_username_must_match() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .tail(&redis.listen_auth("app-password-0123456789", "username = \"app\"\n"));
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_error(
        &c.call(&[b"AUTH", b"app-password-0123456789"]).await,
        "-WRONGPASS",
    );
    assert_reply(
        &c.call(&[b"AUTH", b"app", b"app-password-0123456789"]).await,
        b"+OK\r\n",
    );
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_keeps_the_upstream_logged_in_and_resets_the_session() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SELECT", b"2"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"SET", b"in-db-2", b"x"]).await, b"+OK\r\n");
    assert!(c.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    assert_reply(&c.call(&[b"RESET"]).await, b"+RESET\r\n");
    // Without the proxy's re-login this would be NOAUTH: RESET logs Redis
    // connections in as the default user, which is off.
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_reply(&c.call(&[b"GET", b"in-db-2"]).await, b"$-1\r\n");
    let info = c.call(&[b"CLIENT", b"INFO"]).await;
    let info = String::from_utf8_lossy(&info);
    assert!(
        info.contains(&format!("user={REDIS_USER}")) && info.contains("resp=2"),
        "{info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_logs_the_client_out_of_redcloak_when_auth_is_required() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .tail(&redis.listen_auth("client-secret-0123456789", ""));
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"AUTH", b"client-secret-0123456789"]).await,
        b"+OK\r\n",
    );
    assert_reply(&c.call(&[b"RESET"]).await, b"+RESET\r\n");
    assert_reply(
        &c.call(&[b"PING"]).await,
        b"-NOAUTH Authentication required.\r\n",
    );
    assert_reply(
        &c.call(&[b"AUTH", b"client-secret-0123456789"]).await,
        b"+OK\r\n",
    );
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_not_logged_in_may_send_only_small_requests_as_in_redis() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .tail(&redis.listen_auth("client-secret-0123456789", ""));
    let proxy = redis.start_proxy(&config).await;
    for (header, says) in [
        (&b"*100\r\n"[..], "unauthenticated multibulk length"),
        (
            b"*2\r\n$4\r\nAUTH\r\n$16385\r\n",
            "unauthenticated bulk length",
        ),
    ] {
        let mut c = proxy.raw().await;
        // Only the header: the refusal comes before anything else is read.
        c.send_raw(header).await;
        assert_error(
            &c.read().await,
            &format!("-ERR redcloak: protocol error: {says}"),
        );
        c.expect_closed().await;
    }
    // Logged in, the same sizes are served.
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"AUTH", b"client-secret-0123456789"]).await,
        b"+OK\r\n",
    );
    let mut mset: Vec<Vec<u8>> = vec![b"MSET".to_vec()];
    for i in 0..50 {
        mset.push(format!("plain:{i}").into_bytes());
        mset.push(vec![b'v'; 20_000]);
    }
    let args: Vec<&[u8]> = mset.iter().map(Vec::as_slice).collect();
    assert_reply(&c.call(&args).await, b"+OK\r\n");
}
