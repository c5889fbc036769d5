//! Every kind of sealed value answers the same alone, pipelined and inside
//! MULTI/EXEC, in RESP2 and RESP3: the plan queued with each command opens
//! its element of EXEC's array exactly as it opens a reply of its own.

use crate::support::*;

/// Commands that fill `k` (values containing "secret"), then the one whose
/// reply is compared.
const CASES: &[(&[&str], &str)] = &[
    (&["SET k v-secret"], "GET k"),
    (&["HSET k f v-secret g w-secret"], "HGETALL k"),
    (&["RPUSH k a-secret b-secret c-secret"], "LRANGE k 0 -1"),
    (&["RPUSH k a-secret b-secret"], "LPOP k 2"),
    (&["RPUSH k a-secret"], "BLPOP k 1"),
    (&["RPUSH k a-secret b-secret"], "LMPOP 1 k RIGHT COUNT 2"),
    (&["SADD k a-secret b-secret c-secret"], "SMEMBERS k"),
    (&["SADD k a-secret b-secret"], "SMISMEMBER k b-secret x"),
    (&["SADD k a-secret b-secret"], "SSCAN k 0 MATCH a*"),
    (
        &["ZADD k 1 a-secret 2 b-secret"],
        "ZRANGE k 0 -1 WITHSCORES",
    ),
    (&["ZADD k 1 a-secret 2 b-secret"], "ZPOPMIN k"),
    (&["ZADD k 1 a-secret 2 b-secret"], "ZMPOP 1 k MAX COUNT 2"),
    (&["ZADD k 1 a-secret"], "BZPOPMIN k 1"),
    (&["ZADD k 1 a-secret 2 b-secret"], "ZSCAN k 0"),
    (
        &["XADD k 1-1 f a-secret", "XADD k 2-1 f b-secret"],
        "XRANGE k - +",
    ),
    (&["XADD k 1-1 f a-secret"], "XREAD STREAMS k 0"),
    (
        &["GEOADD k 13.36 38.11 a-secret 15.08 37.50 b-secret"],
        "GEOSEARCH k FROMLONLAT 15 37 BYRADIUS 300 km ASC WITHDIST",
    ),
    (&["PFADD k a-secret b-secret a-secret"], "PFCOUNT k"),
];

fn words(command: &str) -> Vec<&[u8]> {
    command.split(' ').map(str::as_bytes).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_answers_the_same_alone_pipelined_and_inside_multi() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    for protocol in [2u8, 3] {
        let mut c = proxy.raw_speaking(protocol).await;
        for (setup, query) in CASES {
            c.call(&[b"DEL", b"k"]).await;
            for command in *setup {
                assert!(
                    !c.call(&words(command)).await.starts_with(b"-"),
                    "{command}"
                );
            }
            let alone = c.call(&words(query)).await;
            assert!(
                !alone.starts_with(b"-") && !alone.windows(2).any(|w| w == [0xC7, 0x0A]),
                "{query}: {}",
                String::from_utf8_lossy(&alone)
            );
            // Pipelined: everything in one write.
            c.call(&[b"DEL", b"k"]).await;
            let mut batch = Vec::new();
            for command in setup.iter().chain([query]) {
                batch.extend(resp_array(b'*', &words(command)));
            }
            c.send_raw(&batch).await;
            let mut last = bytes::Bytes::new();
            for _ in 0..=setup.len() {
                last = c.read().await;
            }
            assert_reply(&last, &alone);
            // Inside MULTI: EXEC's last element is that reply.
            c.call(&[b"DEL", b"k"]).await;
            assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
            for command in setup.iter().chain([query]) {
                assert_reply(&c.call(&words(command)).await, b"+QUEUED\r\n");
            }
            let exec = c.call(&[b"EXEC"]).await;
            assert!(
                exec.ends_with(&alone),
                "{query} in MULTI (RESP{protocol}): {} does not end with {}",
                String::from_utf8_lossy(&exec),
                String::from_utf8_lossy(&alone)
            );
            let stored = redis.plaintext_in_redis(&[b"secret"]).await;
            assert!(
                stored.is_empty(),
                "{query}: Redis holds plaintext: {stored:?}"
            );
        }
    }
}
