//! Sets and sorted sets on encrypted keys: members are sealed with the
//! deterministic envelope, so Redis finds them by equality (SISMEMBER,
//! ZSCORE, SREM, ZREM), scores stay plaintext for Redis to order, and every
//! reply shape is opened, in RESP2 and RESP3, pipelined and inside MULTI.

use crate::support::*;

/// A rule whose keys' members may be combined and moved between each other.
const TEAMS: &str = "[[encryption.rules]]\nname = \"teams\"\npattern = \"team:*\"\n\
mode = \"encrypt\"\nbind = \"rule\"\n";

fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_commands_work_on_encrypted_members_in_resp2_and_resp3() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(TEAMS)).await;
    for protocol in [2u8, 3] {
        let mut c = proxy.raw_speaking(protocol).await;
        let s = format!("set{protocol}");
        let s = s.as_bytes();
        assert_reply(
            &c.call(&[b"SADD", s, b"alice-secret", b"bob-secret", b"carol-secret"])
                .await,
            b":3\r\n",
        );
        // The same member again is the same envelope: not added twice.
        assert_reply(&c.call(&[b"SADD", s, b"alice-secret"]).await, b":0\r\n");
        assert_reply(&c.call(&[b"SISMEMBER", s, b"bob-secret"]).await, b":1\r\n");
        assert_reply(&c.call(&[b"SISMEMBER", s, b"mallory"]).await, b":0\r\n");
        assert_eq!(
            texts(
                &c.call(&[
                    b"SMISMEMBER",
                    s,
                    b"carol-secret",
                    b"nobody",
                    b"alice-secret"
                ])
                .await
            ),
            ["1", "0", "1"]
        );
        let members = c.call(&[b"SMEMBERS", s]).await;
        assert_eq!(members[0], if protocol == 3 { b'~' } else { b'*' });
        assert_eq!(
            sorted(texts(&members)),
            ["alice-secret", "bob-secret", "carol-secret"]
        );
        assert_reply(&c.call(&[b"SCARD", s]).await, b":3\r\n");
        let random = texts(&c.call(&[b"SRANDMEMBER", s, b"2"]).await);
        assert_eq!(random.len(), 2);
        assert!(random.iter().all(|m| m.ends_with("-secret")), "{random:?}");
        let scan = texts(
            &c.call(&[b"SSCAN", s, b"0", b"MATCH", b"b*", b"COUNT", b"100"])
                .await,
        );
        assert_eq!(scan, ["0", "bob-secret"]);
        assert_reply(
            &c.call(&[b"SREM", s, b"bob-secret", b"nobody"]).await,
            b":1\r\n",
        );
        redis.assert_holds_no_plaintext(&[b"secret"]).await;
        let popped = texts(&c.call(&[b"SPOP", s]).await);
        assert!(
            popped == ["alice-secret"] || popped == ["carol-secret"],
            "{popped:?}"
        );
        assert_eq!(texts(&c.call(&[b"SPOP", s, b"5"]).await).len(), 1);
    }
    // Set algebra and SMOVE between keys of one rule.
    let mut c = proxy.raw().await;
    for (key, members) in [
        (
            &b"team:a"[..],
            &[&b"ann-secret"[..], b"ben-secret", b"cat-secret"][..],
        ),
        (b"team:b", &[b"ben-secret", b"cat-secret", b"dan-secret"]),
    ] {
        let mut command = vec![&b"SADD"[..], key];
        command.extend_from_slice(members);
        assert_reply(&c.call(&command).await, b":3\r\n");
    }
    assert_eq!(
        sorted(texts(&c.call(&[b"SINTER", b"team:a", b"team:b"]).await)),
        ["ben-secret", "cat-secret"]
    );
    assert_eq!(
        sorted(texts(&c.call(&[b"SDIFF", b"team:a", b"team:b"]).await)),
        ["ann-secret"]
    );
    assert_eq!(
        texts(&c.call(&[b"SUNION", b"team:a", b"team:b"]).await).len(),
        4
    );
    assert_reply(
        &c.call(&[b"SINTERCARD", b"2", b"team:a", b"team:b"]).await,
        b":2\r\n",
    );
    assert_reply(
        &c.call(&[b"SUNIONSTORE", b"team:all", b"team:a", b"team:b"])
            .await,
        b":4\r\n",
    );
    assert_reply(
        &c.call(&[b"SISMEMBER", b"team:all", b"dan-secret"]).await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[b"SMOVE", b"team:a", b"team:b", b"ann-secret"])
            .await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[b"SISMEMBER", b"team:b", b"ann-secret"]).await,
        b":1\r\n",
    );
    // Key-bound sets share no members with each other: combining them is refused.
    assert_error(
        &c.call(&[b"SINTER", b"set2", b"set3"]).await,
        "-ERR redcloak: SINTER would move values of 'set2'",
    );
    assert_error(
        &c.call(&[b"SUNIONSTORE", b"elsewhere", b"team:a"]).await,
        "-ERR redcloak: SUNIONSTORE would move values of 'elsewhere'",
    );
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_set_commands_work_on_encrypted_members_with_plaintext_scores() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(TEAMS)).await;
    for protocol in [2u8, 3] {
        let mut c = proxy.raw_speaking(protocol).await;
        let z = format!("board{protocol}");
        let z = z.as_bytes();
        assert_reply(
            &c.call(&[
                b"ZADD",
                z,
                b"1",
                b"alice-secret",
                b"2",
                b"bob-secret",
                b"3",
                b"carol-secret",
            ])
            .await,
            b":3\r\n",
        );
        assert_reply(
            &c.call(&[b"ZADD", z, b"XX", b"CH", b"5", b"alice-secret"])
                .await,
            b":1\r\n",
        );
        // GT keeps the higher score; NX adds only new members; INCR answers the score.
        assert_reply(
            &c.call(&[b"ZADD", z, b"GT", b"CH", b"4", b"alice-secret"])
                .await,
            b":0\r\n",
        );
        assert_reply(
            &c.call(&[b"ZADD", z, b"NX", b"9", b"alice-secret"]).await,
            b":0\r\n",
        );
        assert_eq!(
            texts(
                &c.call(&[b"ZADD", z, b"LT", b"INCR", b"-1", b"alice-secret"])
                    .await
            ),
            ["4"]
        );
        assert_eq!(
            texts(&c.call(&[b"ZADD", z, b"INCR", b"1", b"alice-secret"]).await),
            ["5"]
        );
        assert_eq!(
            texts(&c.call(&[b"ZINCRBY", z, b"2", b"bob-secret"]).await),
            ["4"]
        );
        assert_eq!(
            texts(&c.call(&[b"ZSCORE", z, b"alice-secret"]).await),
            ["5"]
        );
        assert_eq!(
            texts(&c.call(&[b"ZMSCORE", z, b"carol-secret", b"nobody"]).await),
            ["3", "nil"]
        );
        assert_reply(&c.call(&[b"ZRANK", z, b"carol-secret"]).await, b":0\r\n");
        assert_reply(&c.call(&[b"ZREVRANK", z, b"carol-secret"]).await, b":2\r\n");
        assert_eq!(
            texts(&c.call(&[b"ZRANGE", z, b"0", b"-1", b"WITHSCORES"]).await),
            ["carol-secret", "3", "bob-secret", "4", "alice-secret", "5"]
        );
        assert_eq!(
            texts(
                &c.call(&[
                    b"ZRANGE", z, b"+inf", b"4", b"BYSCORE", b"REV", b"LIMIT", b"0", b"1"
                ])
                .await
            ),
            ["alice-secret"]
        );
        assert_eq!(
            texts(&c.call(&[b"ZRANGEBYSCORE", z, b"3", b"4"]).await),
            ["carol-secret", "bob-secret"]
        );
        assert_eq!(
            texts(
                &c.call(&[b"ZREVRANGEBYSCORE", z, b"+inf", b"4", b"WITHSCORES"])
                    .await
            ),
            ["alice-secret", "5", "bob-secret", "4"]
        );
        assert_eq!(
            texts(&c.call(&[b"ZREVRANGE", z, b"0", b"0"]).await),
            ["alice-secret"]
        );
        assert_reply(&c.call(&[b"ZCOUNT", z, b"4", b"+inf"]).await, b":2\r\n");
        assert_reply(&c.call(&[b"ZCARD", z]).await, b":3\r\n");
        let random = texts(&c.call(&[b"ZRANDMEMBER", z, b"3", b"WITHSCORES"]).await);
        assert_eq!(random.len(), 6, "{random:?}");
        assert_eq!(
            texts(&c.call(&[b"ZSCAN", z, b"0", b"MATCH", b"a*"]).await),
            ["0", "alice-secret", "5"]
        );
        redis.assert_holds_no_plaintext(&[b"secret"]).await;
        assert_eq!(
            texts(&c.call(&[b"ZPOPMIN", z]).await),
            ["carol-secret", "3"]
        );
        assert_eq!(
            texts(&c.call(&[b"ZPOPMAX", z, b"1"]).await),
            ["alice-secret", "5"]
        );
        assert_eq!(
            texts(&c.call(&[b"BZPOPMIN", b"plain:none", z, b"1"]).await),
            [std::str::from_utf8(z).expect("utf8"), "bob-secret", "4"]
        );
        assert_reply(
            &c.call(&[b"ZADD", z, b"1", b"dan-secret", b"2", b"eve-secret"])
                .await,
            b":2\r\n",
        );
        assert_eq!(
            texts(&c.call(&[b"ZMPOP", b"1", z, b"MIN", b"COUNT", b"1"]).await),
            [std::str::from_utf8(z).expect("utf8"), "dan-secret", "1"]
        );
        assert_eq!(
            texts(&c.call(&[b"BZMPOP", b"1", b"1", z, b"MAX"]).await),
            [std::str::from_utf8(z).expect("utf8"), "eve-secret", "2"]
        );
        assert_reply(
            &c.call(&[b"ZADD", z, b"1", b"x-secret", b"9", b"y-secret"])
                .await,
            b":2\r\n",
        );
        assert_reply(
            &c.call(&[b"ZREM", z, b"x-secret", b"nobody"]).await,
            b":1\r\n",
        );
        assert_reply(
            &c.call(&[b"ZREMRANGEBYSCORE", z, b"9", b"9"]).await,
            b":1\r\n",
        );
        assert_reply(
            &c.call(&[b"ZREMRANGEBYRANK", z, b"0", b"-1"]).await,
            b":0\r\n",
        );
        // Ranges over members' bytes mean nothing on envelopes.
        assert_error(
            &c.call(&[b"ZRANGEBYLEX", z, b"-", b"+"]).await,
            "-ERR redcloak: ZRANGEBYLEX on",
        );
        assert_error(
            &c.call(&[b"ZRANGE", z, b"[a", b"[z", b"BYLEX"]).await,
            "-ERR redcloak: ZRANGE ... BYLEX on",
        );
    }
    // Algebra and stores between keys of one rule; scores combine in Redis.
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"ZADD", b"team:x", b"1", b"ann-secret", b"2", b"ben-secret"])
            .await,
        b":2\r\n",
    );
    assert_reply(
        &c.call(&[
            b"ZADD",
            b"team:y",
            b"10",
            b"ben-secret",
            b"20",
            b"cat-secret",
        ])
        .await,
        b":2\r\n",
    );
    assert_eq!(
        texts(
            &c.call(&[b"ZUNION", b"2", b"team:x", b"team:y", b"WITHSCORES"])
                .await
        ),
        ["ann-secret", "1", "ben-secret", "12", "cat-secret", "20"]
    );
    assert_eq!(
        texts(&c.call(&[b"ZINTER", b"2", b"team:x", b"team:y"]).await),
        ["ben-secret"]
    );
    assert_eq!(
        texts(&c.call(&[b"ZDIFF", b"2", b"team:x", b"team:y"]).await),
        ["ann-secret"]
    );
    assert_reply(
        &c.call(&[
            b"ZUNIONSTORE",
            b"team:sum",
            b"2",
            b"team:x",
            b"team:y",
            b"WEIGHTS",
            b"1",
            b"2",
        ])
        .await,
        b":3\r\n",
    );
    assert_eq!(
        texts(&c.call(&[b"ZSCORE", b"team:sum", b"ben-secret"]).await),
        ["22"]
    );
    assert_reply(
        &c.call(&[b"ZINTERCARD", b"2", b"team:x", b"team:y"]).await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[b"ZRANGESTORE", b"team:top", b"team:sum", b"0", b"0", b"REV"])
            .await,
        b":1\r\n",
    );
    assert_eq!(
        texts(
            &c.call(&[b"ZRANGE", b"team:top", b"0", b"-1", b"WITHSCORES"])
                .await
        ),
        ["cat-secret", "40"]
    );
    assert_error(
        &c.call(&[b"ZUNIONSTORE", b"elsewhere", b"1", b"team:x"])
            .await,
        "-ERR redcloak: ZUNIONSTORE would move values of 'elsewhere'",
    );
    // Members up to 44 bytes keep Redis's compact encoding.
    let long = [b'm'; 44];
    assert_reply(
        &c.call(&[b"ZADD", b"compact", b"1", &long]).await,
        b":1\r\n",
    );
    let mut admin = redis.admin().await;
    assert_reply(
        &admin.call(&[b"OBJECT", b"ENCODING", b"compact"]).await,
        b"$8\r\nlistpack\r\n",
    );
    redis.assert_holds_no_plaintext(&[b"secret", &long]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_sorted_set_commands_pipelined_and_in_multi_are_opened_in_order() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    let batch: &[&[&[u8]]] = &[
        &[b"SADD", b"tags", b"tag-secret"],
        &[b"ZADD", b"queue", b"1", b"job-secret"],
        &[b"MULTI"],
        &[b"SMEMBERS", b"tags"],
        &[b"ZRANGE", b"queue", b"0", b"-1", b"WITHSCORES"],
        &[b"SISMEMBER", b"tags", b"tag-secret"],
        &[b"EXEC"],
        &[b"ZSCORE", b"queue", b"job-secret"],
    ];
    let mut bytes = Vec::new();
    for command in batch {
        bytes.extend(resp_array(b'*', command));
    }
    c.send_raw(&bytes).await;
    assert_reply(&c.read().await, b":1\r\n");
    assert_reply(&c.read().await, b":1\r\n");
    assert_reply(&c.read().await, b"+OK\r\n");
    for _ in 0..3 {
        assert_reply(&c.read().await, b"+QUEUED\r\n");
    }
    assert_eq!(
        texts(&c.read().await),
        ["tag-secret", "job-secret", "1", "1"]
    );
    assert_eq!(texts(&c.read().await), ["1"]);
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_elements_on_deterministic_rules_can_be_found_removed_and_inserted() {
    let redis = TestRedis::start().await;
    let rule = "[[encryption.rules]]\npattern = \"det:*\"\nmode = \"encrypt\"\n\
                members = \"deterministic\"\n";
    let proxy = redis.start_proxy(&redis.config().tail(rule)).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"RPUSH", b"det:q", b"a-secret", b"b-secret", b"a-secret"])
            .await,
        b":3\r\n",
    );
    assert_reply(&c.call(&[b"LPOS", b"det:q", b"b-secret"]).await, b":1\r\n");
    assert_reply(
        &c.call(&[b"LINSERT", b"det:q", b"BEFORE", b"b-secret", b"c-secret"])
            .await,
        b":4\r\n",
    );
    assert_reply(
        &c.call(&[b"LREM", b"det:q", b"0", b"a-secret"]).await,
        b":2\r\n",
    );
    assert_eq!(
        texts(&c.call(&[b"LRANGE", b"det:q", b"0", b"-1"]).await),
        ["c-secret", "b-secret"]
    );
    // Random-nonce lists refuse them, naming the setting.
    assert_error(
        &c.call(&[b"LREM", b"q", b"0", b"a"]).await,
        "-ERR redcloak: LREM on 'q' is refused: Redis would compare list elements",
    );
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_members_are_sealed_and_coordinates_stay_plaintext() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(TEAMS)).await;
    for protocol in [2u8, 3] {
        let mut c = proxy.raw_speaking(protocol).await;
        let g = format!("places{protocol}");
        let g = g.as_bytes();
        assert_reply(
            &c.call(&[
                b"GEOADD",
                g,
                b"CH",
                b"13.361389",
                b"38.115556",
                b"palermo-secret",
                b"15.087269",
                b"37.502669",
                b"catania-secret",
            ])
            .await,
            b":2\r\n",
        );
        let distance = texts(
            &c.call(&[b"GEODIST", g, b"palermo-secret", b"catania-secret", b"km"])
                .await,
        );
        assert!(distance[0].starts_with("166.27"), "{distance:?}");
        assert_eq!(
            texts(&c.call(&[b"GEOHASH", g, b"palermo-secret"]).await),
            ["sqc8b49rny0"]
        );
        let position = texts(&c.call(&[b"GEOPOS", g, b"catania-secret", b"nowhere"]).await);
        assert!(
            position[0].starts_with("15.08726") && position[2] == "nil",
            "{position:?}"
        );
        assert_eq!(
            texts(
                &c.call(&[
                    b"GEOSEARCH",
                    g,
                    b"FROMLONLAT",
                    b"15",
                    b"37",
                    b"BYRADIUS",
                    b"100",
                    b"km",
                    b"ASC"
                ])
                .await
            ),
            ["catania-secret"]
        );
        let with = texts(
            &c.call(&[
                b"GEOSEARCH",
                g,
                b"FROMMEMBER",
                b"palermo-secret",
                b"BYRADIUS",
                b"200",
                b"km",
                b"ASC",
                b"WITHDIST",
            ])
            .await,
        );
        assert_eq!(
            (with[0].as_str(), with[2].as_str()),
            ("palermo-secret", "catania-secret"),
            "{with:?}"
        );
        assert_eq!(
            texts(
                &c.call(&[b"GEORADIUS", g, b"15", b"37", b"200", b"km", b"ASC"])
                    .await
            ),
            ["catania-secret", "palermo-secret"]
        );
        let by_member = texts(
            &c.call(&[
                b"GEORADIUSBYMEMBER_RO",
                g,
                b"catania-secret",
                b"10",
                b"km",
                b"WITHCOORD",
            ])
            .await,
        );
        assert_eq!(by_member[0], "catania-secret", "{by_member:?}");
        // A geo key is a sorted set: its members open there too.
        assert_eq!(
            texts(&c.call(&[b"ZRANGE", g, b"0", b"0"]).await),
            ["palermo-secret"]
        );
    }
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"GEOADD", b"team:geo", b"13.36", b"38.11", b"base-secret"])
            .await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[
            b"GEOSEARCHSTORE",
            b"team:near",
            b"team:geo",
            b"FROMMEMBER",
            b"base-secret",
            b"BYRADIUS",
            b"1",
            b"km",
        ])
        .await,
        b":1\r\n",
    );
    assert_eq!(
        texts(&c.call(&[b"ZRANGE", b"team:near", b"0", b"-1"]).await),
        ["base-secret"]
    );
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyperloglogs_count_keyed_tokens_never_the_elements() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(TEAMS)).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[
            b"PFADD",
            b"visitors",
            b"alice-secret",
            b"bob-secret",
            b"alice-secret",
        ])
        .await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[b"PFADD", b"visitors", b"bob-secret"]).await,
        b":0\r\n",
    );
    assert_reply(&c.call(&[b"PFCOUNT", b"visitors"]).await, b":2\r\n");
    assert_reply(
        &c.call(&[b"PFADD", b"team:mon", b"ann-secret", b"ben-secret"])
            .await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[b"PFADD", b"team:tue", b"ben-secret", b"cat-secret"])
            .await,
        b":1\r\n",
    );
    assert_reply(
        &c.call(&[b"PFCOUNT", b"team:mon", b"team:tue"]).await,
        b":3\r\n",
    );
    assert_reply(
        &c.call(&[b"PFMERGE", b"team:week", b"team:mon", b"team:tue"])
            .await,
        b"+OK\r\n",
    );
    assert_reply(&c.call(&[b"PFCOUNT", b"team:week"]).await, b":3\r\n");
    // Key-bound counters use their own tokens: merging them would double count.
    assert_error(
        &c.call(&[b"PFMERGE", b"visitors", b"team:mon"]).await,
        "-ERR redcloak: PFMERGE would move values of 'visitors'",
    );
    assert_error(
        &c.call(&[b"PFDEBUG", b"GETREG", b"visitors"]).await,
        "-ERR redcloak: PFDEBUG needs Redis to read the value of 'visitors'",
    );
    // What Redis was sent: tokens, not the elements (the sparse HLL keeps
    // no element bytes anyway, so check what crossed the wire).
    let mut admin = redis.admin().await;
    assert_reply(
        &admin
            .call(&[b"CONFIG", b"SET", b"slowlog-log-slower-than", b"0"])
            .await,
        b"+OK\r\n",
    );
    assert_reply(
        &c.call(&[b"PFADD", b"visitors", b"carol-secret"]).await,
        b":1\r\n",
    );
    let log = admin.call(&[b"SLOWLOG", b"GET", b"10"]).await;
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("PFADD") && text.contains("visitors"),
        "{text}"
    );
    assert!(!text.contains("carol-secret"), "{text}");
}
