//! Warm upstream connections: a client's connection serves the next client
//! only after RESET and redcloak's AUTH, so nothing of one session reaches
//! the next; a connection still busy, or closed while waiting, is not reused.

use crate::support::*;

/// A proxy whose pool keeps `idle` connections, with metrics to watch it.
async fn pooled(redis: &TestRedis, idle: usize) -> Proxy {
    let config = redis
        .config()
        .upstream("pool_idle", &idle.to_string())
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    redis.start_proxy(&config).await
}

async fn pool_idle(proxy: &Proxy) -> Option<f64> {
    metric(&proxy.scrape().await, "redcloak_upstream_pool_idle")
}

async fn client_id(client: &mut RawClient<tokio::net::TcpStream>) -> String {
    String::from_utf8_lossy(&client.call(&[b"CLIENT", b"ID"]).await).into_owned()
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
    eventually("the pool is warm", || async {
        pool_idle(&proxy).await == Some(1.0)
    })
    .await;

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
    eventually("the connection came back", || async {
        pool_idle(&proxy).await == Some(1.0)
    })
    .await;

    let mut next = proxy.raw().await;
    assert_eq!(
        client_id(&mut next).await,
        id,
        "the same upstream connection"
    );
    let info = next.call(&[b"CLIENT", b"INFO"]).await;
    let info = String::from_utf8_lossy(&info).into_owned();
    assert_eq!(field(&info, "db"), "0", "{info}");
    assert_eq!(field(&info, "name"), "", "{info}");
    assert_eq!(field(&info, "resp"), "2", "{info}");
    assert_eq!(field(&info, "sub"), "0", "{info}");
    assert_eq!(field(&info, "multi"), "-1", "{info}");
    assert_eq!(field(&info, "user"), REDIS_USER, "{info}");
    let flags = field(&info, "flags");
    assert!(
        !flags.contains('t') && !flags.contains('x') && !flags.contains('P'),
        "{info}"
    );
    // db 0, outside MULTI, not subscribed, RESP2.
    assert_reply(&next.call(&[b"GET", b"plain:db5"]).await, b"$-1\r\n");
    assert_reply(&next.call(&[b"GET", b"plain:queued"]).await, b"$-1\r\n");
    assert_reply(&next.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_error(&next.call(&[b"EXEC"]).await, "-ERR EXEC without MULTI");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_left_waiting_for_a_reply_is_closed_not_reused() {
    let redis = TestRedis::start().await;
    let proxy = pooled(&redis, 1).await;
    eventually("the pool is warm", || async {
        pool_idle(&proxy).await == Some(1.0)
    })
    .await;
    let mut blocked = proxy.raw().await;
    let id = client_id(&mut blocked).await;
    blocked.send(&[b"BLPOP", b"plain:never", b"0"]).await;
    wait_until_blocked(&redis, 1).await;
    drop(blocked);
    // Its BLPOP is unanswered: the pool makes a new connection instead.
    wait_until_blocked(&redis, 0).await;
    eventually("a fresh connection is ready", || async {
        pool_idle(&proxy).await == Some(1.0)
    })
    .await;
    let mut next = proxy.raw().await;
    assert_ne!(client_id(&mut next).await, id);
    assert_reply(&next.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_connection_redis_closed_is_replaced_when_taken() {
    let redis = TestRedis::start().await;
    let proxy = pooled(&redis, 1).await;
    eventually("the pool is warm", || async {
        pool_idle(&proxy).await == Some(1.0)
    })
    .await;
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
    eventually("the pool is warm", || async {
        pool_idle(&proxy).await == Some(4.0)
    })
    .await;
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
    eventually("every connection came back", || async {
        pool_idle(&proxy).await == Some(4.0)
    })
    .await;
    // The upstream check's connection aside, nothing new was opened.
    let after = opened(&proxy.scrape().await);
    assert!(after <= before.map(|b| b + 1.0), "{before:?} -> {after:?}");
}
