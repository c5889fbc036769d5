//! Lists on encrypted keys: every list command works through redcloak in
//! RESP2 and RESP3, pipelined and inside MULTI, while Redis holds only
//! envelopes; elements move only between keys that share a binding.

use crate::support::*;
use redis::AsyncCommands;

/// A rule whose keys' elements may move between each other.
const QUEUES: &str = "[[encryption.rules]]\nname = \"queues\"\npattern = \"queue:*\"\n\
mode = \"encrypt\"\nbind = \"rule\"\n";

/// The nil RESP2 and RESP3 send for a missing element.
fn nil(protocol: u8) -> &'static [u8] {
    match protocol {
        3 => b"_\r\n",
        _ => b"$-1\r\n",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_command_works_on_encrypted_keys_in_resp2_and_resp3() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    for protocol in [2u8, 3] {
        let mut c = proxy.raw_speaking(protocol).await;
        let q = format!("list{protocol}");
        let q = q.as_bytes();
        assert_reply(
            &c.call(&[b"RPUSH", q, b"a-secret", b"b-secret", b"c-secret"])
                .await,
            b":3\r\n",
        );
        assert_reply(&c.call(&[b"LPUSH", q, b"z-secret"]).await, b":4\r\n");
        assert_reply(&c.call(&[b"LPUSHX", q, b"y-secret"]).await, b":5\r\n");
        assert_reply(&c.call(&[b"RPUSHX", b"missing", b"x"]).await, b":0\r\n");
        assert_reply(
            &c.call(&[b"LRANGE", q, b"0", b"-1"]).await,
            &resp_array(
                b'*',
                &[
                    b"y-secret",
                    b"z-secret",
                    b"a-secret",
                    b"b-secret",
                    b"c-secret",
                ],
            ),
        );
        assert_reply(&c.call(&[b"LINDEX", q, b"2"]).await, b"$8\r\na-secret\r\n");
        assert_reply(&c.call(&[b"LINDEX", q, b"99"]).await, nil(protocol));
        assert_reply(&c.call(&[b"LSET", q, b"2", b"A-secret"]).await, b"+OK\r\n");
        assert_reply(&c.call(&[b"LLEN", q]).await, b":5\r\n");
        redis.assert_holds_no_plaintext(&[b"secret"]).await;
        assert_reply(&c.call(&[b"LPOP", q]).await, b"$8\r\ny-secret\r\n");
        assert_reply(
            &c.call(&[b"LPOP", q, b"2"]).await,
            &resp_array(b'*', &[b"z-secret", b"A-secret"]),
        );
        assert_reply(
            &c.call(&[b"RPOP", q, b"1"]).await,
            &resp_array(b'*', &[b"c-secret"]),
        );
        assert_reply(&c.call(&[b"LTRIM", q, b"0", b"0"]).await, b"+OK\r\n");
        let mut popped = resp_array(b'*', &[q]);
        popped[1] = b'2';
        popped.extend(resp_array(b'*', &[b"b-secret"]));
        assert_reply(
            &c.call(&[b"LMPOP", b"2", b"missing", q, b"RIGHT", b"COUNT", b"5"])
                .await,
            &popped,
        );
        let empty_array: &[u8] = match protocol {
            3 => b"_\r\n",
            _ => b"*-1\r\n",
        };
        assert_reply(&c.call(&[b"LPOP", q, b"3"]).await, empty_array);
        assert_reply(&c.call(&[b"LPOP", q]).await, nil(protocol));
        // Blocking forms, answered at once when an element is there.
        assert_reply(
            &c.call(&[b"RPUSH", q, b"d-secret", b"e-secret"]).await,
            b":2\r\n",
        );
        assert_reply(
            &c.call(&[b"BLPOP", b"plain:none", q, b"1"]).await,
            &resp_array(b'*', &[q, b"d-secret"]),
        );
        let mut popped = resp_array(b'*', &[q]);
        popped[1] = b'2';
        popped.extend(resp_array(b'*', &[b"e-secret"]));
        assert_reply(&c.call(&[b"BLMPOP", b"1", b"1", q, b"LEFT"]).await, &popped);
        assert_reply(&c.call(&[b"RPUSH", q, b"f-secret"]).await, b":1\r\n");
        assert_reply(
            &c.call(&[b"BRPOP", q, b"1"]).await,
            &resp_array(b'*', &[q, b"f-secret"]),
        );
        // Within one key, elements may move (a rotation).
        assert_reply(
            &c.call(&[b"RPUSH", q, b"g-secret", b"h-secret"]).await,
            b":2\r\n",
        );
        assert_reply(&c.call(&[b"RPOPLPUSH", q, q]).await, b"$8\r\nh-secret\r\n");
        assert_reply(
            &c.call(&[b"LMOVE", q, q, b"LEFT", b"RIGHT"]).await,
            b"$8\r\nh-secret\r\n",
        );
        assert_reply(
            &c.call(&[b"BLMOVE", q, q, b"LEFT", b"RIGHT", b"1"]).await,
            b"$8\r\ng-secret\r\n",
        );
        assert_reply(
            &c.call(&[b"BRPOPLPUSH", q, q, b"1"]).await,
            b"$8\r\ng-secret\r\n",
        );
        assert_reply(
            &c.call(&[b"LRANGE", q, b"0", b"-1"]).await,
            &resp_array(b'*', &[b"g-secret", b"h-secret"]),
        );
    }
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_transactional_list_commands_are_sealed_and_opened_in_order() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    let batch: &[&[&[u8]]] = &[
        &[b"RPUSH", b"jobs", b"job-1-secret", b"job-2-secret"],
        &[b"SET", b"s", b"string-secret"],
        &[b"LRANGE", b"jobs", b"0", b"-1"],
        &[b"GET", b"s"],
        &[b"MULTI"],
        &[b"RPUSH", b"jobs", b"job-3-secret"],
        &[b"LPOP", b"jobs"],
        &[b"LRANGE", b"jobs", b"0", b"-1"],
        &[b"EXEC"],
    ];
    let mut bytes = Vec::new();
    for command in batch {
        bytes.extend(resp_array(b'*', command));
    }
    c.send_raw(&bytes).await;
    assert_reply(&c.read().await, b":2\r\n");
    assert_reply(&c.read().await, b"+OK\r\n");
    assert_reply(
        &c.read().await,
        &resp_array(b'*', &[b"job-1-secret", b"job-2-secret"]),
    );
    assert_reply(&c.read().await, b"$13\r\nstring-secret\r\n");
    assert_reply(&c.read().await, b"+OK\r\n");
    for _ in 0..3 {
        assert_reply(&c.read().await, b"+QUEUED\r\n");
    }
    let mut exec = b"*3\r\n:3\r\n$12\r\njob-1-secret\r\n".to_vec();
    exec.extend(resp_array(b'*', &[b"job-2-secret", b"job-3-secret"]));
    assert_reply(&c.read().await, &exec);
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_pop_on_an_encrypted_list_is_woken_and_opened() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let client = redis::Client::open(proxy.url()).expect("url");
    let mut worker = client
        .get_multiplexed_async_connection()
        .await
        .expect("worker");
    let waiting = tokio::spawn(async move {
        let popped: Option<(String, String)> = worker.brpop("tasks", 0.0).await.expect("brpop");
        popped
    });
    wait_until_blocked(&redis, 1).await;
    let mut producer = proxy.client().await;
    let pushed: i64 = producer
        .lpush("tasks", "task-payload-secret")
        .await
        .expect("lpush");
    assert_eq!(pushed, 1);
    let popped = tokio::time::timeout(READ_TIMEOUT, waiting)
        .await
        .expect("woken in time")
        .expect("task");
    assert_eq!(
        popped,
        Some(("tasks".to_owned(), "task-payload-secret".to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elements_move_between_keys_of_one_rule_and_nowhere_else() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(QUEUES)).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"RPUSH", b"queue:ready", b"job-a-secret", b"job-b-secret"])
            .await,
        b":2\r\n",
    );
    assert_reply(
        &c.call(&[
            b"LMOVE",
            b"queue:ready",
            b"queue:running",
            b"LEFT",
            b"RIGHT",
        ])
        .await,
        b"$12\r\njob-a-secret\r\n",
    );
    assert_reply(
        &c.call(&[b"RPOPLPUSH", b"queue:ready", b"queue:running"])
            .await,
        b"$12\r\njob-b-secret\r\n",
    );
    assert_reply(
        &c.call(&[b"LRANGE", b"queue:running", b"0", b"-1"]).await,
        &resp_array(b'*', &[b"job-b-secret", b"job-a-secret"]),
    );
    // COPY and RENAME within the rule keep elements readable.
    assert_reply(
        &c.call(&[b"COPY", b"queue:running", b"queue:copy"]).await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[b"RENAME", b"queue:copy", b"queue:moved"]).await,
        b"+OK\r\n",
    );
    assert_reply(
        &c.call(&[b"LRANGE", b"queue:moved", b"0", b"-1"]).await,
        &resp_array(b'*', &[b"job-b-secret", b"job-a-secret"]),
    );
    // Out of the rule: to a key-bound key, or to a plaintext one.
    for target in [&b"elsewhere"[..], b"plain:leak"] {
        assert_error(
            &c.call(&[b"LMOVE", b"queue:running", target, b"LEFT", b"RIGHT"])
                .await,
            "-ERR redcloak: LMOVE would move values of 'queue:running' (rule 'queue:*')",
        );
        assert_error(
            &c.call(&[b"BRPOPLPUSH", b"queue:running", target, b"1"])
                .await,
            "-ERR redcloak: BRPOPLPUSH would move values",
        );
    }
    assert_eq!(redis_calls(&redis, "lmove").await, 1);
    assert_eq!(redis_calls(&redis, "brpoplpush").await, 0);
    // A key-bound element copied around redcloak into the rule's keys does
    // not open there, and the reverse.
    let mut admin = redis.admin().await;
    assert_reply(
        &c.call(&[b"RPUSH", b"bound", b"bound-secret"]).await,
        b":1\r\n",
    );
    admin
        .call(&[b"LMOVE", b"bound", b"queue:running", b"LEFT", b"LEFT"])
        .await;
    assert_error(
        &c.call(&[b"LPOP", b"queue:running"]).await,
        "-ERR redcloak: element of list 'queue:running' failed to decrypt",
    );
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}
