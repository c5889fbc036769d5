//! Pub/sub and blocking commands: out-of-band messages never take a pending
//! request's place, and a blocked client is woken by another one. Channels
//! and lists are refused when encrypted, so these use `plain:` names.

use crate::support::*;
use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_subscribe_receives_messages_published_by_another_client() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut sub = proxy.raw().await;
    sub.send(&[b"SUBSCRIBE", b"plain:news", b"plain:sport"])
        .await;
    assert_reply(
        &sub.read().await,
        b"*3\r\n$9\r\nsubscribe\r\n$10\r\nplain:news\r\n:1\r\n",
    );
    assert_reply(
        &sub.read().await,
        b"*3\r\n$9\r\nsubscribe\r\n$11\r\nplain:sport\r\n:2\r\n",
    );
    let mut publisher = proxy.raw().await;
    assert_reply(
        &publisher.call(&[b"PUBLISH", b"plain:news", b"hello"]).await,
        b":1\r\n",
    );
    assert_reply(
        &sub.read().await,
        &resp_array(b'*', &[b"message", b"plain:news", b"hello"]),
    );
    // PING in subscribed mode gets its own reply, after any message.
    assert_reply(
        &sub.call(&[b"PING"]).await,
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
    );
    sub.send(&[b"PSUBSCRIBE", b"plain:s*"]).await;
    assert_reply(
        &sub.read().await,
        b"*3\r\n$10\r\npsubscribe\r\n$8\r\nplain:s*\r\n:3\r\n",
    );
    assert_reply(
        &publisher.call(&[b"PUBLISH", b"plain:sport", b"goal"]).await,
        b":2\r\n",
    );
    let mut got = [sub.read().await.to_vec(), sub.read().await.to_vec()];
    got.sort();
    assert_eq!(
        got,
        [
            resp_array(b'*', &[b"message", b"plain:sport", b"goal"]),
            resp_array(b'*', &[b"pmessage", b"plain:s*", b"plain:sport", b"goal"]),
        ]
    );
    // UNSUBSCRIBE with no channel: one confirmation per channel, then normal mode.
    sub.send(&[b"UNSUBSCRIBE"]).await;
    let mut confirmations = [sub.read().await.to_vec(), sub.read().await.to_vec()];
    confirmations.sort();
    assert!(confirmations[0].starts_with(b"*3\r\n$11\r\nunsubscribe\r\n$10\r\nplain:news"));
    assert!(confirmations[1].starts_with(b"*3\r\n$11\r\nunsubscribe\r\n$11\r\nplain:sport"));
    assert_reply(
        &sub.call(&[b"PUNSUBSCRIBE"]).await,
        b"*3\r\n$12\r\npunsubscribe\r\n$8\r\nplain:s*\r\n:0\r\n",
    );
    assert_reply(&sub.call(&[b"SET", b"after", b"pubsub"]).await, b"+OK\r\n");
    // An encrypted channel is refused, and the connection stays usable.
    assert_error(
        &publisher.call(&[b"PUBLISH", b"news", b"x"]).await,
        "-ERR redcloak: PUBLISH on 'news' is refused",
    );
    assert_reply(&publisher.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_pushes_interleave_with_replies_without_taking_their_place() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut sub = proxy.raw().await;
    assert!(sub.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    sub.send(&[b"SUBSCRIBE", b"plain:ch"]).await;
    assert_reply(
        &sub.read().await,
        b">3\r\n$9\r\nsubscribe\r\n$8\r\nplain:ch\r\n:1\r\n",
    );
    let mut publisher = proxy.raw().await;
    assert_reply(
        &publisher.call(&[b"PUBLISH", b"plain:ch", b"m1"]).await,
        b":1\r\n",
    );
    // RESP3 allows ordinary commands while subscribed: the push is delivered
    // as it comes, and GET still gets its own (opened) reply.
    sub.send(&[b"SET", b"k", b"v"]).await;
    sub.send(&[b"GET", b"k"]).await;
    assert_reply(
        &sub.read().await,
        &resp_array(b'>', &[b"message", b"plain:ch", b"m1"]),
    );
    assert_reply(&sub.read().await, b"+OK\r\n");
    assert_reply(&sub.read().await, b"$1\r\nv\r\n");
    // Client-side caching invalidations are pushes too.
    assert_reply(
        &sub.call(&[b"CLIENT", b"TRACKING", b"ON"]).await,
        b"+OK\r\n",
    );
    assert_reply(&sub.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    assert_reply(
        &publisher.call(&[b"SET", b"k", b"changed"]).await,
        b"+OK\r\n",
    );
    let invalidation = sub.read().await;
    assert!(
        invalidation.starts_with(b">2\r\n$10\r\ninvalidate\r\n"),
        "{invalidation:?}"
    );
    assert_reply(&sub.call(&[b"GET", b"k"]).await, b"$7\r\nchanged\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_works_with_the_redis_crate() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let client = redis::Client::open(proxy.url()).expect("url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe("plain:events").await.expect("subscribe");
    let mut publisher = proxy.client().await;
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("plain:events")
        .arg("payload")
        .query_async(&mut publisher)
        .await
        .expect("publish");
    assert_eq!(receivers, 1);
    let mut stream = pubsub.on_message();
    let message = tokio::time::timeout(READ_TIMEOUT, stream.next())
        .await
        .expect("message in time")
        .expect("stream open");
    assert_eq!(message.get_channel_name(), "plain:events");
    assert_eq!(message.get_payload::<String>().expect("payload"), "payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blpop_is_woken_by_another_client() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut blocked = proxy.raw().await;
    blocked.send(&[b"BLPOP", b"plain:queue", b"0"]).await;
    let mut pusher = proxy.raw().await;
    wait_until_blocked(&redis, 1).await;
    assert_reply(
        &pusher.call(&[b"RPUSH", b"plain:queue", b"job"]).await,
        b":1\r\n",
    );
    assert_reply(
        &blocked.read().await,
        &resp_array(b'*', &[b"plain:queue", b"job"]),
    );
    assert_reply(&blocked.call(&[b"PING"]).await, b"+PONG\r\n");
}
