//! Everyday commands through the proxy keep exactly their Redis behaviour.

use crate::support::*;
use redis::AsyncCommands;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_values_round_trip_empty_one_byte_and_one_mebibyte() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut client = proxy.client().await;
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    for (key, value) in [
        ("empty", Vec::new()),
        ("one", vec![0u8]),
        ("crlf", b"\r\n$-1\r\n".to_vec()),
        ("big", big),
    ] {
        let _: () = client.set(key, &value).await.expect("SET");
        let back: Vec<u8> = client.get(key).await.expect("GET");
        assert_eq!(back, value, "{key}");
    }
    let missing: Option<Vec<u8>> = client.get("missing").await.expect("GET missing");
    assert_eq!(missing, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_ten_thousand_commands_answers_in_order() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut client = proxy.client().await;
    let mut pipe = redis::pipe();
    for i in 0..5_000 {
        pipe.set(format!("k{i}"), i).ignore();
    }
    for i in 0..5_000 {
        pipe.get(format!("k{i}"));
    }
    let values: Vec<i64> = pipe.query_async(&mut client).await.expect("pipeline");
    assert_eq!(values, (0..5_000).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_discard_and_watch_behave_like_redis() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"SET", b"plain:a", b"1"]).await, b"+QUEUED\r\n");
    assert_reply(&c.call(&[b"INCR", b"plain:a"]).await, b"+QUEUED\r\n");
    assert_reply(&c.call(&[b"EXEC"]).await, b"*2\r\n+OK\r\n:2\r\n");

    assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"SET", b"plain:a", b"9"]).await, b"+QUEUED\r\n");
    assert_reply(&c.call(&[b"DISCARD"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"GET", b"plain:a"]).await, b"$1\r\n2\r\n");

    // WATCH: another client changes the key, EXEC returns nil.
    assert_reply(&c.call(&[b"WATCH", b"a"]).await, b"+OK\r\n");
    let mut other = proxy.raw().await;
    assert_reply(&other.call(&[b"SET", b"a", b"x"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"SET", b"a", b"y"]).await, b"+QUEUED\r\n");
    assert_reply(&c.call(&[b"EXEC"]).await, b"*-1\r\n");
    assert_reply(&c.call(&[b"GET", b"a"]).await, b"$1\r\nx\r\n");

    // A command the proxy refuses inside MULTI fails the EXEC, as Redis would.
    assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"SET", b"a", b"z"]).await, b"+QUEUED\r\n");
    assert_error(&c.call(&[b"SUBSCRIBE", b"ch"]).await, "-ERR redcloak:");
    assert_error(&c.call(&[b"EXEC"]).await, "-EXECABORT");
    assert_reply(&c.call(&[b"GET", b"a"]).await, b"$1\r\nx\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_switches_databases_for_this_connection_only() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SELECT", b"3"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"SET", b"db", b"three"]).await, b"+OK\r\n");
    let mut other = proxy.raw().await;
    assert_reply(&other.call(&[b"GET", b"db"]).await, b"$-1\r\n");
    assert_reply(&c.call(&[b"SELECT", b"0"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"GET", b"db"]).await, b"$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_3_switches_to_resp3_replies() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    let hello = c.call(&[b"HELLO", b"3", b"SETNAME", b"app-1"]).await;
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 answers with a map: {hello:?}"
    );
    assert!(hello.windows(5).any(|w| w == b"proto"));
    assert_reply(&c.call(&[b"HSET", b"h", b"f", b"v"]).await, b":1\r\n");
    assert_reply(
        &c.call(&[b"HGETALL", b"h"]).await,
        b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n",
    );
    assert_reply(&c.call(&[b"SADD", b"plain:s", b"m"]).await, b":1\r\n");
    assert_reply(
        &c.call(&[b"SMEMBERS", b"plain:s"]).await,
        b"~1\r\n$1\r\nm\r\n",
    );
    assert_reply(
        &c.call(&[b"ZADD", b"plain:z", b"1.5", b"m"]).await,
        b":1\r\n",
    );
    assert_reply(&c.call(&[b"ZSCORE", b"plain:z", b"m"]).await, b",1.5\r\n");
    assert_reply(&c.call(&[b"GET", b"missing"]).await, b"_\r\n");
    assert_reply(&c.call(&[b"CLIENT", b"GETNAME"]).await, b"$5\r\napp-1\r\n");

    // The redis crate, speaking RESP3 end to end.
    let url = format!("{}?protocol=resp3", proxy.url());
    let mut resp3 = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = resp3.hset("h3", "f", "v").await.expect("hset");
    let map: std::collections::HashMap<String, String> =
        resp3.hgetall("h3").await.expect("hgetall");
    assert_eq!(map.get("f").map(String::as_str), Some("v"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_and_client_setname_setinfo_are_forwarded() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    c.send_raw(b"SET inline works\r\nGET inline\r\n").await;
    assert_reply(&c.read().await, b"+OK\r\n");
    assert_reply(&c.read().await, b"$5\r\nworks\r\n");
    assert_reply(&c.call(&[b"CLIENT", b"SETNAME", b"svc"]).await, b"+OK\r\n");
    // CLIENT SETINFO is new in Redis 7.2: whatever Redis answers directly,
    // the proxy answers the same.
    let setinfo: [&[u8]; 4] = [b"CLIENT", b"SETINFO", b"LIB-NAME", b"mylib"];
    let direct = redis.admin().await.call(&setinfo).await;
    assert_reply(&c.call(&setinfo).await, &direct);
    let info = c.call(&[b"CLIENT", b"INFO"]).await;
    let info = String::from_utf8_lossy(&info);
    assert!(info.contains("name=svc"), "{info}");
    // The upstream connection is redcloak's own login, whatever the client did.
    assert!(info.contains(&format!("user={REDIS_USER}")), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_and_skip_are_refused_and_the_connection_stays_usable() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_error(
        &c.call(&[b"CLIENT", b"REPLY", b"OFF"]).await,
        "-ERR redcloak: CLIENT REPLY",
    );
    assert_error(
        &c.call(&[b"client", b"reply", b"skip"]).await,
        "-ERR redcloak: CLIENT REPLY",
    );
    assert_error(&c.call(&[b"MONITOR"]).await, "-ERR redcloak: MONITOR");
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_answers_ok_after_earlier_replies_then_closes() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    c.send_raw(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n*1\r\n$4\r\nPING\r\n")
        .await;
    assert_reply(&c.read().await, b"+PONG\r\n");
    assert_reply(&c.read().await, b"+OK\r\n");
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_still_gets_every_reply() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    for _ in 0..10 {
        let mut c = proxy.raw().await;
        c.send(&[b"SET", b"plain:half", b"1"]).await;
        c.send(&[b"WAIT", b"1", b"200"]).await;
        c.send(&[b"GET", b"plain:half"]).await;
        // As `printf ... | nc` does: no more requests, replies still read.
        c.stream.shutdown().await.expect("half-close");
        assert_reply(&c.read().await, b"+OK\r\n");
        assert_reply(&c.read().await, b":0\r\n");
        assert_reply(&c.read().await, b"$1\r\n1\r\n");
        c.expect_closed().await;
    }
}
