//! Warm upstream connections: a client's connection serves the next client
//! only once what the client left on it is undone (nothing after data
//! commands, SELECT 0 after SELECT, RESET and redcloak's AUTH otherwise), so
//! nothing of one session reaches the next; a connection still busy, or
//! closed while waiting, is not reused. A quiet client on a clean connection
//! gives it back, and gets one again when it speaks.

use crate::support::*;

/// A proxy whose pool keeps `idle` connections, with metrics to watch it.
async fn pooled(redis: &TestRedis, idle: usize) -> Proxy {
    let config = redis
        .config()
        // The pool serves clients with connections of their own (lanes
        // off; pinned clients take theirs the same way).
        .upstream("lanes", "0")
        .upstream("pool_idle", &idle.to_string())
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    redis.start_proxy(&config).await
}

async fn pool_idle(proxy: &Proxy) -> Option<f64> {
    metric(&proxy.scrape().await, "redcloak_upstream_pool_idle")
}

/// Waits until the pool holds `count` ready connections; `what` says why.
async fn until_ready(proxy: &Proxy, count: u32, what: &str) {
    eventually(what, || async {
        pool_idle(proxy).await == Some(f64::from(count))
    })
    .await;
}

async fn client_id(client: &mut RawClient<tokio::net::TcpStream>) -> String {
    String::from_utf8_lossy(&client.call(&[b"CLIENT", b"ID"]).await).into_owned()
}

/// Asserts `client` got the upstream connection `id`, back as it was when
/// it logged in: db 0, no name, RESP2, no subscriptions, no MULTI, no
/// tracking or other flags, redcloak's user. `after`: what was undone.
async fn assert_clean(client: &mut RawClient<tokio::net::TcpStream>, id: &str, after: &str) {
    assert_eq!(client_id(client).await, id, "{after}: the same connection");
    let info = client.call(&[b"CLIENT", b"INFO"]).await;
    let info = String::from_utf8_lossy(&info).into_owned();
    for (name, clean) in [
        ("db", "0"),
        ("name", ""),
        ("resp", "2"),
        ("sub", "0"),
        ("psub", "0"),
        ("ssub", "0"),
        ("multi", "-1"),
        ("flags", "N"),
        ("user", REDIS_USER),
    ] {
        assert_eq!(field(&info, name), clean, "{after} left {name}: {info}");
    }
}

/// `name=value` fields of CLIENT INFO.
fn field<'a>(info: &'a str, name: &str) -> &'a str {
    info.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {info}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_client_gets_the_connection_reset_with_nothing_of_the_last_session() {
    let redis = TestRedis::start().await;
    let proxy = pooled(&redis, 1).await;
    until_ready(&proxy, 1, "the pool is warm").await;

    let mut first = proxy.raw().await;
    let id = client_id(&mut first).await;
    assert!(first.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    assert_reply(&first.call(&[b"SELECT", b"5"]).await, b"+OK\r\n");
    assert_reply(&first.call(&[b"SET", b"plain:db5", b"x"]).await, b"+OK\r\n");
    assert_reply(
        &first.call(&[b"CLIENT", b"SETNAME", b"alice"]).await,
        b"+OK\r\n",
    );
    assert_reply(
        &first.call(&[b"CLIENT", b"TRACKING", b"ON"]).await,
        b"+OK\r\n",
    );
    first.call(&[b"SUBSCRIBE", b"plain:news"]).await;
    assert_reply(&first.call(&[b"WATCH", b"plain:db5"]).await, b"+OK\r\n");
    assert_reply(&first.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(
        &first.call(&[b"SET", b"plain:queued", b"y"]).await,
        b"+QUEUED\r\n",
    );
    drop(first);
    until_ready(&proxy, 1, "the connection came back").await;

    let mut next = proxy.raw().await;
    assert_clean(&mut next, &id, "after everything at once").await;
    // db 0, outside MULTI, not subscribed, RESP2.
    assert_reply(&next.call(&[b"GET", b"plain:db5"]).await, b"$-1\r\n");
    assert_reply(&next.call(&[b"GET", b"plain:queued"]).await, b"$-1\r\n");
    assert_reply(&next.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_error(&next.call(&[b"EXEC"]).await, "-ERR EXEC without MULTI");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_left_waiting_for_a_reply_is_closed_not_reused() {
    let redis = TestRedis::start().await;
    // A client gone with a request pending is given up after the request
    // timeout, even a BLPOP that could wait forever.
    let config = redis
        .config()
        // The pool serves clients with connections of their own (lanes
        // off; pinned clients take theirs the same way).
        .upstream("lanes", "0")
        .upstream("pool_idle", "1")
        .upstream("request_timeout", "\"1s\"")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let proxy = redis.start_proxy(&config).await;
    until_ready(&proxy, 1, "the pool is warm").await;
    let mut blocked = proxy.raw().await;
    let id = client_id(&mut blocked).await;
    blocked.send(&[b"BLPOP", b"plain:never", b"0"]).await;
    wait_until_blocked(&redis, 1).await;
    drop(blocked);
    // Its BLPOP is unanswered: the pool makes a new connection instead.
    wait_until_blocked(&redis, 0).await;
    until_ready(&proxy, 1, "a fresh connection is ready").await;
    let mut next = proxy.raw().await;
    assert_ne!(client_id(&mut next).await, id);
    assert_reply(&next.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_connection_redis_closed_is_replaced_when_taken() {
    let redis = TestRedis::start().await;
    let proxy = pooled(&redis, 1).await;
    until_ready(&proxy, 1, "the pool is warm").await;
    // Redis drops every connection of redcloak's user (the ready one too).
    let mut admin = redis.admin().await;
    let killed = admin
        .call(&[b"CLIENT", b"KILL", b"USER", REDIS_USER.as_bytes()])
        .await;
    assert!(killed.starts_with(b":"), "{killed:?}");
    let mut client = proxy.raw().await;
    assert_reply(&client.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_reply(&client.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    assert_reply(&client.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_clients_reuse_connections_instead_of_making_new_ones() {
    let redis = TestRedis::start().await;
    let proxy = pooled(&redis, 4).await;
    until_ready(&proxy, 4, "the pool is warm").await;
    let opened = |text: &str| metric(text, "redcloak_upstream_connections_total");
    let before = opened(&proxy.scrape().await);
    for i in 0..50u32 {
        let mut client = proxy.raw().await;
        let key = format!("churn:{i}");
        assert_reply(
            &client.call(&[b"SET", key.as_bytes(), b"v"]).await,
            b"+OK\r\n",
        );
        assert_reply(&client.call(&[b"QUIT"]).await, b"+OK\r\n");
        client.expect_closed().await;
    }
    until_ready(&proxy, 4, "every connection came back").await;
    // The upstream check's connection aside, nothing new was opened.
    let after = opened(&proxy.scrape().await);
    assert!(after <= before.map(|b| b + 1.0), "{before:?} -> {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_commands_leave_nothing_to_undo_and_select_is_undone_with_select_0() {
    let redis = TestRedis::start().await;
    let proxy = pooled(&redis, 1).await;
    until_ready(&proxy, 1, "the pool is warm").await;
    let mut first = proxy.raw().await;
    assert_reply(&first.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    assert_reply(&first.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    assert_reply(&first.call(&[b"PING"]).await, b"+PONG\r\n");
    drop(first);
    until_ready(&proxy, 1, "the connection came back").await;
    assert_eq!(redis_calls(&redis, "reset").await, 0, "nothing to undo");
    assert_eq!(redis_calls(&redis, "select").await, 0);

    let mut second = proxy.raw().await;
    assert_reply(&second.call(&[b"SELECT", b"3"]).await, b"+OK\r\n");
    assert_reply(&second.call(&[b"SET", b"k", b"db3"]).await, b"+OK\r\n");
    drop(second);
    until_ready(&proxy, 1, "the connection came back").await;
    assert_eq!(redis_calls(&redis, "reset").await, 0);
    assert_eq!(
        redis_calls(&redis, "select").await,
        2,
        "SELECT 3, then SELECT 0"
    );

    let mut third = proxy.raw().await;
    assert_reply(&third.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    let info = third.call(&[b"CLIENT", b"INFO"]).await;
    let info = String::from_utf8_lossy(&info).into_owned();
    assert_eq!(field(&info, "db"), "0", "{info}");
    drop(third);
    // CLIENT changes the connection: RESET and AUTH before it serves again.
    eventually("the connection came back", || async {
        redis_calls(&redis, "reset").await == 1 && pool_idle(&proxy).await == Some(1.0)
    })
    .await;
}

/// A proxy with a one-connection pool whose clients give their connection
/// back after 500 ms of quiet.
async fn parking(redis: &TestRedis) -> Proxy {
    let config = redis
        .config()
        // The pool serves clients with connections of their own (lanes
        // off; pinned clients take theirs the same way).
        .upstream("lanes", "0")
        .upstream("pool_idle", "1")
        .upstream("release_idle_after", "\"500ms\"")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    redis.start_proxy(&config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_client_on_a_clean_connection_gives_it_back_and_gets_one_when_it_speaks() {
    let redis = TestRedis::start().await;
    let proxy = parking(&redis).await;
    until_ready(&proxy, 1, "the pool is warm").await;
    let mut client = proxy.raw().await;
    assert_reply(&client.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    assert_eq!(pool_idle(&proxy).await, Some(0.0), "the client holds it");
    until_ready(&proxy, 1, "the quiet client gave its connection back").await;
    // Still connected, and served as before, with requests pipelined.
    client.send(&[b"GET", b"k"]).await;
    client.send(&[b"SET", b"k2", b"w"]).await;
    client.send(&[b"GET", b"k2"]).await;
    assert_reply(&client.read().await, b"$1\r\nv\r\n");
    assert_reply(&client.read().await, b"+OK\r\n");
    assert_reply(&client.read().await, b"$1\r\nw\r\n");
    until_ready(&proxy, 1, "given back again").await;
    assert_eq!(redis_calls(&redis, "reset").await, 0, "nothing to undo");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_changed_its_connection_keeps_it_however_quiet() {
    let redis = TestRedis::start().await;
    let proxy = parking(&redis).await;
    let mut in_db_2 = proxy.raw().await;
    assert_reply(&in_db_2.call(&[b"SELECT", b"2"]).await, b"+OK\r\n");
    assert_reply(&in_db_2.call(&[b"SET", b"k", b"db2"]).await, b"+OK\r\n");
    let mut in_multi = proxy.raw().await;
    assert_reply(&in_multi.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&in_multi.call(&[b"GET", b"k"]).await, b"+QUEUED\r\n");
    // Four times the quiet that parks a clean client.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_reply(&in_db_2.call(&[b"GET", b"k"]).await, b"$3\r\ndb2\r\n");
    let exec = in_multi.call(&[b"EXEC"]).await;
    assert_reply(&exec, b"*1\r\n$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_stays_logged_in_to_redcloak() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        // The pool serves clients with connections of their own (lanes
        // off; pinned clients take theirs the same way).
        .upstream("lanes", "0")
        .upstream("pool_idle", "1")
        .upstream("release_idle_after", "\"300ms\"")
        .tail(&redis.listen_auth("app-password-0123456789", ""))
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let proxy = redis.start_proxy(&config).await;
    until_ready(&proxy, 1, "the pool is warm").await;
    let mut client = proxy.raw().await;
    assert_error(&client.call(&[b"GET", b"k"]).await, "-NOAUTH");
    assert_reply(
        &client.call(&[b"AUTH", b"app-password-0123456789"]).await,
        b"+OK\r\n",
    );
    assert_reply(&client.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    until_ready(&proxy, 1, "the quiet client gave its connection back").await;
    assert_reply(&client.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    // A client that never logged in is still refused after parking.
    let mut stranger = proxy.raw().await;
    assert_error(&stranger.call(&[b"GET", b"k"]).await, "-NOAUTH");
    until_ready(&proxy, 1, "the stranger's connection is back").await;
    assert_error(&stranger.call(&[b"GET", b"k"]).await, "-NOAUTH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_that_changes_the_connection_is_undone_before_the_next_client() {
    let redis = TestRedis::start().await;
    let proxy = pooled(&redis, 1).await;
    until_ready(&proxy, 1, "the pool is warm").await;
    let changes: &[&[&[u8]]] = &[
        &[b"HELLO", b"3"],
        &[b"SELECT", b"5"],
        &[b"CLIENT", b"SETNAME", b"alice"],
        &[b"CLIENT", b"TRACKING", b"ON"],
        &[b"SUBSCRIBE", b"plain:news"],
        &[b"PSUBSCRIBE", b"plain:*"],
        &[b"SSUBSCRIBE", b"plain:shard"],
        &[b"WATCH", b"plain:w"],
        &[b"MULTI"],
    ];
    for change in changes {
        let mut first = proxy.raw().await;
        let id = client_id(&mut first).await;
        let reply = first.call(change).await;
        assert!(!reply.starts_with(b"-"), "{change:?}: {reply:?}");
        drop(first);
        until_ready(&proxy, 1, "the connection came back").await;
        let mut next = proxy.raw().await;
        assert_clean(&mut next, &id, &format!("{change:?}")).await;
        // WATCH leaves no flag: a watched key changed would fail the next MULTI.
        assert_reply(
            &next.call(&[b"SET", b"plain:w", b"changed"]).await,
            b"+OK\r\n",
        );
        assert_reply(&next.call(&[b"MULTI"]).await, b"+OK\r\n");
        assert_reply(&next.call(&[b"EXEC"]).await, b"*0\r\n");
        drop(next);
        until_ready(&proxy, 1, "the connection came back").await;
    }
}
