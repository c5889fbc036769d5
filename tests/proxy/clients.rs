//! Slow, idle and flooding clients: none can hold a slot forever, and real
//! clients are still served while they try.

use crate::support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_are_served_while_silent_connections_flood_every_slot() {
    let redis = TestRedis::start().await;
    let config = redis.config().listen("max_connections = 40").tail(&format!(
        "[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [metrics]\naddress = \"127.0.0.1:0\"\n",
        redis.certs.proxy_cert.display(),
        redis.certs.proxy_key.display()
    ));
    let proxy = redis.start_proxy(&config).await;
    let tls = proxy.tls_address.expect("tls listener");
    // Twice as many silent connections as slots: plaintext that never
    // sends, TLS that never says hello.
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(TcpStream::connect(proxy.addr()).await.expect("connect"));
        flood.push(TcpStream::connect(tls).await.expect("connect"));
    }
    for _ in 0..10 {
        let mut real = proxy.raw().await;
        assert_reply(&real.call(&[b"PING"]).await, b"+PONG\r\n");
        // Still served after the next silent wave.
        for _ in 0..10 {
            flood.push(TcpStream::connect(proxy.addr()).await.expect("connect"));
        }
        assert_reply(&real.call(&[b"PING"]).await, b"+PONG\r\n");
    }
    let evicted = metric(
        &proxy.scrape().await,
        "redcloak_client_connections_rejected_total{reason=\"evicted\"}",
    );
    assert!(evicted.is_some_and(|n| n >= 50.0), "{evicted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_may_hold_at_most_max_connections_per_peer() {
    let redis = TestRedis::start().await;
    let config = redis.config().listen("max_connections_per_peer = 3");
    let proxy = redis.start_proxy(&config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = proxy.raw().await;
        assert_reply(&client.call(&[b"PING"]).await, b"+PONG\r\n");
        held.push(client);
    }
    let mut fourth = proxy.raw().await;
    assert_error(
        &fourth.read().await,
        "-ERR redcloak: too many connections from this peer (listen.max_connections_per_peer)",
    );
    fourth.expect_closed().await;
    // Another address is another peer.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0)))
        .expect("bind");
    let mut other = RawClient::new(socket.connect(proxy.addr()).await.expect("connect"));
    assert_reply(&other.call(&[b"PING"]).await, b"+PONG\r\n");
    // A slot freed is a slot for the same address again.
    held.pop();
    let mut again = until("the freed slot", || async {
        let mut client = proxy.raw().await;
        client.send(&[b"PING"]).await;
        (client.read().await.as_ref() == b"+PONG\r\n").then_some(client)
    })
    .await;
    assert_reply(&again.call(&[b"PING"]).await, b"+PONG\r\n");
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_together_hold_no_more_than_max_buffered_bytes() {
    let _heavy = heavy().await;
    const MIB: u64 = 1024 * 1024;
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .tail("[limits]\nmax_buffered_bytes = 67108864\nclient_write_timeout = \"3s\"\n");
    let file = redis.path("memory.toml");
    std::fs::write(&file, config.render()).expect("write config");
    let serving = ServeChild::start(&file).await;
    let value = vec![b'v'; 16 * MIB as usize];
    let mut writer = serving.raw().await;
    assert_reply(
        &writer.call(&[b"SET", b"plain:big", &value]).await,
        b"+OK\r\n",
    );
    drop(writer);
    let pid = serving.child.id();
    let baseline = rss(pid);
    // Twelve clients ask for 16 MiB each and read nothing (tiny receive
    // buffers, so the kernel holds little of it for them).
    let mut slow = Vec::new();
    for _ in 0..12 {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut client = RawClient::new(socket.connect(serving.address).await.expect("connect"));
        client.send(&[b"GET", b"plain:big"]).await;
        slow.push(client);
    }
    // Let redcloak take in what it will: until its memory stops growing.
    let last = std::sync::atomic::AtomicU64::new(rss(pid));
    let held = until("memory settles", || async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = rss(pid);
        let before = last.swap(now, std::sync::atomic::Ordering::SeqCst);
        (now.abs_diff(before) < 2 * MIB).then_some(now)
    })
    .await;
    let grown = held.saturating_sub(baseline);
    eprintln!("slow readers: grew {} MiB", grown / MIB);
    // The bound, and the replies caught in flight past it (one 16 MiB frame
    // per connection at most; measured 105 MiB alone, up to 137 MiB while
    // the rest of the suite loads both cores), and slack for the allocator:
    // below the 12 x 16 MiB (192 MiB) that holding every reply once would
    // take, and far below holding them twice (384 MiB).
    assert!(grown < 64 * MIB + 96 * MIB, "grew {} MiB", grown / MIB);
    // Once the slow readers are cut (client_write_timeout), others are served.
    let mut patient = serving.raw().await;
    assert_reply(&patient.call(&[b"PING"]).await, b"+PONG\r\n");
    drop(slow);
}
