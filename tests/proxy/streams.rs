//! Streams on encrypted keys: field values are sealed bound to their field
//! (field names and entry ids stay plaintext), and every reply that carries
//! entries is opened, in RESP2 and RESP3.

use crate::support::*;
use redcloak::resp::{self, Limits};

fn contains_all(haystack: &[String], needles: &[&str]) -> bool {
    needles.iter().all(|n| haystack.iter().any(|h| h == n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_commands_open_every_entry_in_resp2_and_resp3() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    for protocol in [2u8, 3] {
        let mut c = proxy.raw_speaking(protocol).await;
        let s = format!("events{protocol}");
        let s = s.as_bytes();
        let first = c
            .call(&[
                b"XADD",
                s,
                b"1-1",
                b"user",
                b"u1-secret",
                b"action",
                b"login-secret",
            ])
            .await;
        assert_reply(&first, b"$3\r\n1-1\r\n");
        assert_reply(
            &c.call(&[
                b"XADD",
                s,
                b"MAXLEN",
                b"~",
                b"100",
                b"2-1",
                b"user",
                b"u2-secret",
            ])
            .await,
            b"$3\r\n2-1\r\n",
        );
        assert_reply(
            &c.call(&[
                b"XADD",
                s,
                b"NOMKSTREAM",
                b"MINID",
                b"~",
                b"0",
                b"LIMIT",
                b"10",
                b"3-1",
                b"user",
                b"u3-secret",
            ])
            .await,
            b"$3\r\n3-1\r\n",
        );
        redis.assert_holds_no_plaintext(&[b"secret"]).await;
        assert_eq!(
            texts(&c.call(&[b"XRANGE", s, b"-", b"+"]).await),
            [
                "1-1",
                "user",
                "u1-secret",
                "action",
                "login-secret",
                "2-1",
                "user",
                "u2-secret",
                "3-1",
                "user",
                "u3-secret"
            ]
        );
        assert_eq!(
            texts(&c.call(&[b"XREVRANGE", s, b"+", b"-", b"COUNT", b"1"]).await),
            ["3-1", "user", "u3-secret"]
        );
        assert_reply(&c.call(&[b"XLEN", s]).await, b":3\r\n");
        let name = std::str::from_utf8(s).expect("utf8");
        assert_eq!(
            texts(
                &c.call(&[b"XREAD", b"COUNT", b"1", b"STREAMS", s, b"1-1"])
                    .await
            ),
            [name, "2-1", "user", "u2-secret"]
        );
        assert_reply(
            &c.call(&[b"XGROUP", b"CREATE", s, b"workers", b"0"]).await,
            b"+OK\r\n",
        );
        assert_eq!(
            texts(
                &c.call(&[
                    b"XREADGROUP",
                    b"GROUP",
                    b"workers",
                    b"w1",
                    b"COUNT",
                    b"2",
                    b"STREAMS",
                    s,
                    b">"
                ])
                .await
            ),
            [
                name,
                "1-1",
                "user",
                "u1-secret",
                "action",
                "login-secret",
                "2-1",
                "user",
                "u2-secret"
            ]
        );
        let pending = texts(&c.call(&[b"XPENDING", s, b"workers"]).await);
        assert_eq!(pending[0], "2", "{pending:?}");
        assert_eq!(
            texts(
                &c.call(&[b"XCLAIM", s, b"workers", b"w2", b"0", b"1-1"])
                    .await
            ),
            ["1-1", "user", "u1-secret", "action", "login-secret"]
        );
        assert_eq!(
            texts(
                &c.call(&[b"XCLAIM", s, b"workers", b"w2", b"0", b"2-1", b"JUSTID"])
                    .await
            ),
            ["2-1"]
        );
        let claimed = texts(
            &c.call(&[b"XAUTOCLAIM", s, b"workers", b"w3", b"0", b"0"])
                .await,
        );
        assert_eq!(
            &claimed[1..],
            [
                "1-1",
                "user",
                "u1-secret",
                "action",
                "login-secret",
                "2-1",
                "user",
                "u2-secret"
            ]
        );
        assert_reply(&c.call(&[b"XACK", s, b"workers", b"2-1"]).await, b":1\r\n");
        // An entry deleted while pending comes back with nil fields.
        assert_reply(&c.call(&[b"XDEL", s, b"1-1"]).await, b":1\r\n");
        assert_eq!(
            texts(
                &c.call(&[
                    b"XREADGROUP",
                    b"GROUP",
                    b"workers",
                    b"w3",
                    b"STREAMS",
                    s,
                    b"0"
                ])
                .await
            ),
            [name, "1-1", "nil"]
        );
        let info = texts(&c.call(&[b"XINFO", b"STREAM", s]).await);
        assert!(
            contains_all(
                &info,
                &[
                    "first-entry",
                    "2-1",
                    "u2-secret",
                    "last-entry",
                    "3-1",
                    "u3-secret"
                ]
            ),
            "{info:?}"
        );
        let full = texts(&c.call(&[b"XINFO", b"STREAM", s, b"FULL"]).await);
        assert!(
            contains_all(&full, &["entries", "u2-secret", "u3-secret", "workers"]),
            "{full:?}"
        );
        assert!(
            !full.iter().any(|t| t.contains("\u{FFFD}")),
            "no envelope bytes: {full:?}"
        );
        let groups = texts(&c.call(&[b"XINFO", b"GROUPS", s]).await);
        assert!(contains_all(&groups, &["workers"]), "{groups:?}");
        assert_reply(&c.call(&[b"XTRIM", s, b"MAXLEN", b"1"]).await, b":1\r\n");
        assert_eq!(
            texts(&c.call(&[b"XRANGE", s, b"-", b"+"]).await),
            ["3-1", "user", "u3-secret"]
        );
    }
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_xread_is_woken_and_values_moved_between_fields_do_not_open() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut reader = proxy.raw().await;
    reader
        .send(&[
            b"XREAD",
            b"BLOCK",
            b"0",
            b"STREAMS",
            b"jobs",
            b"plain:other",
            b"$",
            b"$",
        ])
        .await;
    wait_until_blocked(&redis, 1).await;
    let mut writer = proxy.raw().await;
    writer
        .call(&[
            b"XADD",
            b"jobs",
            b"5-1",
            b"payload",
            b"job-secret",
            b"note",
            b"n",
        ])
        .await;
    assert_eq!(
        texts(&reader.read().await),
        ["jobs", "5-1", "payload", "job-secret", "note", "n"]
    );
    // Inside MULTI, pipelined with other commands.
    assert_reply(&writer.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(
        &writer
            .call(&[b"XADD", b"jobs", b"6-1", b"payload", b"second-secret"])
            .await,
        b"+QUEUED\r\n",
    );
    assert_reply(
        &writer.call(&[b"XRANGE", b"jobs", b"6", b"+"]).await,
        b"+QUEUED\r\n",
    );
    assert_eq!(
        texts(&writer.call(&[b"EXEC"]).await),
        ["6-1", "6-1", "payload", "second-secret"]
    );
    // Around redcloak: a value swapped into another field fails in its place.
    let mut admin = redis.admin().await;
    let entry = admin.call(&[b"XRANGE", b"jobs", b"5-1", b"5-1"]).await;
    let parts = texts(&entry);
    let sealed = resp::aggregate_elements(&entry, &Limits::default())
        .and_then(|(_, entries)| {
            resp::aggregate_elements(entries[0], &Limits::default()).map(|(_, e)| e[1].to_vec())
        })
        .and_then(|fields| {
            resp::aggregate_elements(&fields, &Limits::default())
                .map(|(_, f)| resp::bulk_body(f[1]).map(<[u8]>::to_vec))
        })
        .flatten()
        .expect("the sealed payload");
    assert_eq!(parts[1], "payload");
    admin
        .call(&[b"XADD", b"jobs", b"7-1", b"note", &sealed])
        .await;
    let moved = writer.call(&[b"XRANGE", b"jobs", b"7-1", b"7-1"]).await;
    let text = String::from_utf8_lossy(&moved);
    assert!(
        text.contains("-ERR redcloak: value of field 'note' of stream 'jobs' failed to decrypt"),
        "{text}"
    );
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}
