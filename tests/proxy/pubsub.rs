//! Pub/sub and blocking commands: out-of-band messages never take a pending
//! request's place, and a blocked client is woken by another one. Messages
//! on encrypted channels are sealed in Redis and opened for subscribers; one
//! that does not open is dropped, never delivered sealed.

use crate::support::*;
use bytes::BytesMut;
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
    // Nothing left to unsubscribe: Redis's confirmation names no channel
    // (a RESP2 null, which RESP3 does not have).
    assert_reply(
        &sub.call(&[b"UNSUBSCRIBE"]).await,
        b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n",
    );
    assert_reply(&sub.call(&[b"SET", b"after", b"pubsub"]).await, b"+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_encrypted_channels_are_sealed_in_redis_and_opened_for_subscribers() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let proxy = redis.start_proxy(&config).await;
    // Around redcloak: what Redis actually publishes.
    let mut direct = redis.admin().await;
    direct.send(&[b"SUBSCRIBE", b"news"]).await;
    direct.read().await;
    let mut resp2 = proxy.raw().await;
    resp2.send(&[b"SUBSCRIBE", b"news"]).await;
    resp2.read().await;
    let mut resp3 = proxy.raw().await;
    assert!(resp3.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    resp3.send(&[b"PSUBSCRIBE", b"n*"]).await;
    resp3.read().await;
    let mut publisher = proxy.raw().await;
    assert_reply(
        &publisher
            .call(&[b"PUBLISH", b"news", b"hello-secret"])
            .await,
        b":3\r\n",
    );
    assert_reply(
        &resp2.read().await,
        &resp_array(b'*', &[b"message", b"news", b"hello-secret"]),
    );
    assert_reply(
        &resp3.read().await,
        &resp_array(b'>', &[b"pmessage", b"n*", b"news", b"hello-secret"]),
    );
    let published = direct.read().await;
    let text = String::from_utf8_lossy(&published);
    assert!(!text.contains("hello-secret"), "{text}");
    assert!(
        published.windows(3).any(|w| w == [0xC7, 0x0A, 0x4B]),
        "an envelope: {text}"
    );
    // Published around redcloak: plaintext, or sealed for another channel.
    let mut forger = redis.admin().await;
    assert_reply(
        &forger
            .call(&[b"PUBLISH", b"news", b"forged-plaintext"])
            .await,
        b":3\r\n",
    );
    let sealed_elsewhere = redis
        .keyring(&[(1, "key-1")], 1)
        .seal(b"replayed", redcloak::crypto::Binding::string(b"news"))
        .expect("primary");
    assert_reply(
        &forger.call(&[b"PUBLISH", b"news", &sealed_elsewhere]).await,
        b":3\r\n",
    );
    assert_reply(
        &publisher
            .call(&[b"PUBLISH", b"news", b"after-secret"])
            .await,
        b":3\r\n",
    );
    // Neither reaches a subscriber; the next good message does.
    assert_reply(
        &resp2.read().await,
        &resp_array(b'*', &[b"message", b"news", b"after-secret"]),
    );
    assert_reply(
        &resp3.read().await,
        &resp_array(b'>', &[b"pmessage", b"n*", b"news", b"after-secret"]),
    );
    // Counted once per subscriber that dropped them (counted after the write).
    eventually("both drops counted for both subscribers", || async {
        let metrics = proxy.scrape().await;
        let failures = |reason: &str| {
            metric(
                &metrics,
                &format!("redcloak_value_open_failures_total{{reason=\"{reason}\"}}"),
            )
        };
        failures("not_encrypted") == Some(2.0) && failures("auth_failed") == Some(2.0)
    })
    .await;
    // Shard channels too.
    let mut shard = proxy.raw().await;
    shard.send(&[b"SSUBSCRIBE", b"orders"]).await;
    shard.read().await;
    assert_reply(
        &publisher
            .call(&[b"SPUBLISH", b"orders", b"order-secret"])
            .await,
        b":1\r\n",
    );
    assert_reply(
        &shard.read().await,
        &resp_array(b'*', &[b"smessage", b"orders", b"order-secret"]),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyspace_notifications_stay_plaintext() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut admin = redis.admin().await;
    assert_reply(
        &admin
            .call(&[b"CONFIG", b"SET", b"notify-keyspace-events", b"KEA"])
            .await,
        b"+OK\r\n",
    );
    let mut sub = proxy.raw().await;
    sub.send(&[b"PSUBSCRIBE", b"__key*@0__:*"]).await;
    sub.read().await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"session:1", b"v"]).await, b"+OK\r\n");
    assert_reply(
        &sub.read().await,
        &resp_array(
            b'*',
            &[
                b"pmessage",
                b"__key*@0__:*",
                b"__keyspace@0__:session:1",
                b"set",
            ],
        ),
    );
    assert_reply(
        &sub.read().await,
        &resp_array(
            b'*',
            &[
                b"pmessage",
                b"__key*@0__:*",
                b"__keyevent@0__:set",
                b"session:1",
            ],
        ),
    );
}

/// Client-side caching in RESP2 sends invalidations to another connection
/// as `message`s on `__redis__:invalidate`, whose payload is an array of
/// key names: delivered as Redis sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_invalidations_redirected_in_resp2_are_delivered() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut listener = proxy.raw().await;
    let id = listener.call(&[b"CLIENT", b"ID"]).await;
    let id = String::from_utf8_lossy(&id[1..id.len() - 2]).into_owned();
    listener
        .send(&[b"SUBSCRIBE", b"__redis__:invalidate"])
        .await;
    listener.read().await;
    let mut cached = proxy.raw().await;
    assert_reply(
        &cached
            .call(&[b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", id.as_bytes()])
            .await,
        b"+OK\r\n",
    );
    assert_reply(&cached.call(&[b"SET", b"user:1", b"v1"]).await, b"+OK\r\n");
    assert_reply(&cached.call(&[b"GET", b"user:1"]).await, b"$2\r\nv1\r\n");
    let mut writer = proxy.raw().await;
    assert_reply(&writer.call(&[b"SET", b"user:1", b"v2"]).await, b"+OK\r\n");
    let mut expected = resp_array(b'*', &[b"message", b"__redis__:invalidate"]);
    expected[1] = b'3';
    expected.extend(resp_array(b'*', &[b"user:1"]));
    assert_reply(&listener.read().await, &expected);
}

/// Celery stores a task's result with SET and PUBLISH of the same value in
/// one transaction: both are sealed, and the whole transaction works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_stored_and_published_in_one_transaction_is_sealed_twice_and_delivered() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let key = b"celery-task-meta-42";
    let result = br#"{"status": "SUCCESS", "result": "result-secret"}"#;
    let mut waiter = proxy.raw().await;
    waiter.send(&[b"SUBSCRIBE", key]).await;
    waiter.read().await;
    let mut worker = proxy.raw().await;
    assert_reply(&worker.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(
        &worker.call(&[b"SETEX", key, b"86400", result]).await,
        b"+QUEUED\r\n",
    );
    assert_reply(
        &worker.call(&[b"PUBLISH", key, result]).await,
        b"+QUEUED\r\n",
    );
    assert_reply(&worker.call(&[b"EXEC"]).await, b"*2\r\n+OK\r\n:1\r\n");
    assert_reply(
        &waiter.read().await,
        &resp_array(b'*', &[b"message", key, result]),
    );
    let mut reader = proxy.raw().await;
    let mut expected = BytesMut::new();
    redcloak::resp::encode_bulk(&mut expected, result);
    assert_reply(&reader.call(&[b"GET", key]).await, &expected);
    redis.assert_holds_no_plaintext(&[b"result-secret"]).await;
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
