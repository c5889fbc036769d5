//! Bad input gets a clear error and a closed connection, never a panic, a
//! hang or unbounded memory; a client that pipelines without reading is
//! held back instead of being buffered.

use crate::support::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

async fn protocol_error_after(proxy: &Proxy, bytes: &[u8]) -> String {
    let mut c = proxy.raw().await;
    c.send_raw(b"*1\r\n$4\r\nPING\r\n").await;
    c.send_raw(bytes).await;
    assert_reply(&c.read().await, b"+PONG\r\n");
    let error = String::from_utf8_lossy(&c.read().await).into_owned();
    c.expect_closed().await;
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resp_gets_a_protocol_error_after_earlier_replies_and_closes() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    for (bytes, reason) in [
        (&b"*1\r\n:1\r\n"[..], "expected '$', got byte 0x3a"),
        (b"*1\r\n*1\r\n$4\r\nPING\r\n", "expected '$'"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (
            b"*1\r\n$4\r\nPINGPONG\r\n",
            "malformed bulk terminator line",
        ),
        (b"GET \"quoted\"\r\n", "quotes in inline commands"),
    ] {
        let error = protocol_error_after(&proxy, bytes).await;
        assert!(
            error.starts_with("-ERR redcloak: protocol error: "),
            "{error}"
        );
        assert!(error.contains(reason), "{reason}: {error}");
    }
}

/// Replies a server sends (protocol errors reduced to "protocol error"), and
/// whether it closed after them.
type Framing = (Vec<String>, bool);

/// What a server does with `bytes` followed by a PING: the replies it sends
/// (protocol errors reduced to "protocol error"), and whether it then closed.
async fn framing_of<S>(mut c: RawClient<S>, bytes: &[u8]) -> Framing
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    c.send_raw(bytes).await;
    c.send_raw(b"*1\r\n$4\r\nPING\r\n").await;
    let mut replies = Vec::new();
    loop {
        let Some(reply) = c.read_or_eof().await else {
            return (replies, true);
        };
        let text = String::from_utf8_lossy(&reply).to_lowercase();
        if text.contains("protocol error") {
            replies.push("protocol error".into());
            continue;
        }
        replies.push(text.trim_end().to_owned());
        if replies.last().is_some_and(|r| r == "+pong") {
            return (replies, false);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_framed_exactly_as_redis_frames_them() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let cases: [(&[u8], &[&str], bool); 6] = [
        (b"*0\r\n", &["+pong"], false),
        (b"*-1\r\n*0\r\n", &["+pong"], false),
        (b"*01\r\n$4\r\nPING\r\n", &["protocol error"], true),
        (b"*1\r\n$04\r\nPING\r\n", &["protocol error"], true),
        (
            b"*1\r\n$12345678901234567890123\r\n",
            &["protocol error"],
            true,
        ),
        // An HTTP request on the RESP port: closed without a word.
        (
            b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
            &[],
            true,
        ),
    ];
    for (bytes, replies, closed) in cases {
        let expected = (replies.iter().map(|s| s.to_string()).collect(), closed);
        let shown = String::from_utf8_lossy(bytes);
        assert_eq!(
            framing_of(redis.admin().await, bytes).await,
            expected,
            "Redis: {shown}"
        );
        assert_eq!(
            framing_of(proxy.raw().await, bytes).await,
            expected,
            "redcloak: {shown}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_line_that_never_ends_is_refused_before_more_is_buffered() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    // 23 digits, then whatever the client sends next: refused at once.
    c.send_raw(b"*1\r\n$12345678901234567890123").await;
    let error = String::from_utf8_lossy(&c.read().await).into_owned();
    assert!(
        error.contains("protocol error: invalid bulk length"),
        "{error}"
    );
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_lengths_are_refused_before_their_bytes_arrive() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(&redis.config().tail("[limits]\nmax_bulk_bytes = 2000000\n"))
        .await;
    // Only headers are sent: the refusal must not wait for (or reserve) the body.
    for (bytes, setting) in [
        (&b"*1\r\n$2000001\r\n"[..], "limits.max_bulk_bytes"),
        (
            b"*2\r\n$3\r\nGET\r\n$99999999999\r\n",
            "limits.max_bulk_bytes",
        ),
        (b"*2000000000\r\n", "limits.max_array_len"),
        (
            b"*99999999999999999999999999\r\n",
            "invalid multibulk length",
        ),
    ] {
        let error = protocol_error_after(&proxy, bytes).await;
        assert!(error.contains(setting), "{setting}: {error}");
    }
    let long_inline = vec![b'a'; 70 * 1024];
    let error = protocol_error_after(&proxy, &long_inline).await;
    assert!(error.contains("limits.max_inline_bytes"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_nested_deeper_than_the_limit_fails_that_connection_only() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(&redis.config().tail("[limits]\nmax_reply_depth = 3\n"))
        .await;
    let mut c = proxy.raw().await;
    let depth_3 = c.call(&[b"EVAL", b"return {{{1}}}", b"0"]).await;
    assert_reply(&depth_3, b"*1\r\n*1\r\n*1\r\n:1\r\n");
    c.send(&[b"EVAL", b"return {{{{1}}}}", b"0"]).await;
    let error = String::from_utf8_lossy(&c.read().await).into_owned();
    assert!(
        error.starts_with("-ERR redcloak: upstream protocol error: reply nesting depth"),
        "{error}"
    );
    assert!(error.contains("limits.max_reply_depth"), "{error}");
    c.expect_closed().await;
    let mut other = proxy.raw().await;
    assert_reply(&other.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_at_the_bulk_limit_is_served_and_one_byte_more_is_refused() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(&redis.config().tail("[limits]\nmax_bulk_bytes = 65536\n"))
        .await;
    let mut c = proxy.raw().await;
    let at_limit = vec![b'v'; 65536];
    assert_reply(&c.call(&[b"SET", b"k", &at_limit]).await, b"+OK\r\n");
    let over = vec![b'v'; 65537];
    c.send(&[b"SET", b"k", &over]).await;
    assert!(String::from_utf8_lossy(&c.read().await).contains("limits.max_bulk_bytes"));
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_100000_commands_without_reading_is_held_back_then_answered_in_order() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(&redis.config().tail("[limits]\nmax_pending_requests = 64\n"))
        .await;
    let key = [b"plain:".to_vec(), vec![b'k'; 1018]].concat();
    let value = vec![b'v'; 1024];
    let mut admin = redis.admin().await;
    assert_reply(&admin.call(&[b"SET", &key, &value]).await, b"+OK\r\n");
    assert_reply(&admin.call(&[b"CONFIG", b"RESETSTAT"]).await, b"+OK\r\n");

    // 100,000 commands of ~1 KiB (100 MiB, far more than socket buffers
    // hold); every 1,000th is an ECHO of its index, to check the order.
    const COMMANDS: usize = 100_000;
    let stream = tokio::net::TcpStream::connect(proxy.addr())
        .await
        .expect("connect");
    let (reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        let mut batch = bytes::BytesMut::new();
        for i in 0..COMMANDS {
            if i % 1000 == 999 {
                redcloak::resp::encode_command(&mut batch, &[b"ECHO", i.to_string().as_bytes()]);
            } else {
                redcloak::resp::encode_command(&mut batch, &[&b"GET"[..], &key]);
            }
            if batch.len() > 64 * 1024 {
                writer.write_all(&batch).await.expect("write");
                batch.clear();
            }
        }
        writer.write_all(&batch).await.expect("write");
        writer
    });
    // Nobody reads: the proxy must stop reading too, so the writer stays
    // blocked. A proxy that buffered the pipeline would let it finish.
    let mut writing = writing;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut writing)
            .await
            .is_err(),
        "the whole pipeline was accepted while no reply was read"
    );

    let mut client = RawClient::new(reader);
    let mut expected_value = bytes::BytesMut::new();
    redcloak::resp::encode_bulk(&mut expected_value, &value);
    for i in 0..COMMANDS {
        let reply = client.read().await;
        if i % 1000 == 999 {
            assert_reply(
                &reply,
                format!("${}\r\n{i}\r\n", i.to_string().len()).as_bytes(),
            );
        } else {
            assert_eq!(reply.as_ref(), &expected_value[..], "reply {i}");
        }
    }
    let _writer = writing
        .await
        .expect("writer finishes once replies are read");

    // Redis never had to hold more than the pending limit's worth of replies.
    let info = admin.call(&[b"INFO", b"memory"]).await;
    let info = String::from_utf8_lossy(&info);
    let peak: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_peak:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory_peak");
    assert!(
        peak < 32 * 1024 * 1024,
        "Redis buffered {peak} bytes for one client"
    );
}
