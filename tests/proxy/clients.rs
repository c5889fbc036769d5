//! Slow, idle and flooding clients: none can hold a slot forever, and real
//! clients are still served while they try.

use crate::support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_completes_is_cut_after_request_read_timeout() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .tail("[limits]\nrequest_read_timeout = \"1s\"\n");
    let proxy = redis.start_proxy(&config).await;
    // Stops mid-request.
    let mut silent = proxy.raw().await;
    silent.send_raw(b"*2\r\n$3\r\nGET\r\n$5\r\npla").await;
    // One byte every 300 ms: progress, but never a whole request in time.
    let mut trickle = proxy.raw().await;
    let slowly = async {
        for byte in b"*2\r\n$3\r\nGET\r\n$7\r\nplain:a\r\n" {
            // Cut off: redcloak closed its side.
            if trickle.stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), slowly).await;
    for client in [&mut silent, &mut trickle] {
        assert_error(
            &client.read().await,
            "-ERR redcloak: protocol error: a request was not completed within limits.request_read_timeout",
        );
        client.expect_closed().await;
    }
    // Whole requests, however spaced, are never cut.
    let mut steady = proxy.raw().await;
    for _ in 0..3 {
        assert_reply(&steady.call(&[b"PING"]).await, b"+PONG\r\n");
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_idle_timeout_but_subscribers_and_blocked_ones_stay() {
    let redis = TestRedis::start().await;
    let config = redis.config().listen("idle_timeout = \"1s\"");
    let proxy = redis.start_proxy(&config).await;
    let mut idle = proxy.raw().await;
    assert_reply(&idle.call(&[b"PING"]).await, b"+PONG\r\n");
    let mut subscriber = proxy.raw().await;
    subscriber.call(&[b"SUBSCRIBE", b"plain:news"]).await;
    let mut blocked = proxy.raw().await;
    blocked.send(&[b"BLPOP", b"plain:jobs", b"3"]).await;
    idle.expect_closed().await;
    // Both outlive the idle timeout.
    assert_reply(&blocked.read().await, b"*-1\r\n");
    let mut publisher = proxy.raw().await;
    assert_reply(
        &publisher.call(&[b"PUBLISH", b"plain:news", b"hi"]).await,
        b":1\r\n",
    );
    assert_reply(
        &subscriber.read().await,
        b"*3\r\n$7\r\nmessage\r\n$10\r\nplain:news\r\n$2\r\nhi\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_never_says_hello_is_closed_within_seconds() {
    let redis = TestRedis::start().await;
    let config = redis.config().tail(&format!(
        "[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        redis.certs.proxy_cert.display(),
        redis.certs.proxy_key.display()
    ));
    let proxy = redis.start_proxy(&config).await;
    let address = proxy.tls_address.expect("tls listener");
    let started = std::time::Instant::now();
    let mut silent = RawClient::new(TcpStream::connect(address).await.expect("connect"));
    silent.expect_closed().await;
    let waited = started.elapsed();
    assert!(waited < std::time::Duration::from_secs(8), "{waited:?}");
}
