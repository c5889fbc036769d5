//! Value encryption end to end: Redis only ever holds envelopes, clients see
//! plaintext in every reply shape, tampering becomes an error in place,
//! keys rotate, and whatever cannot be encrypted is refused before it
//! reaches Redis.

use crate::support::*;
use bytes::Bytes;
use redcloak::crypto::Binding;
use redcloak::crypto::keyring::Opened;
use redcloak::resp;

fn opens_to(redis: &TestRedis, stored: &[u8], binding: Binding<'_>, plaintext: &[u8]) {
    assert!(
        !stored
            .windows(plaintext.len().max(1))
            .any(|w| w == plaintext),
        "plaintext stored in Redis"
    );
    let ring = redis.keyring(&[(1, "key-1")], 1);
    assert_eq!(
        ring.open(stored, binding),
        Ok(Opened::Plaintext(plaintext.to_vec()))
    );
}

fn key(name: &[u8]) -> Binding<'_> {
    Binding::string(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_only_envelopes_for_every_value_bearing_command() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    let writes: &[&[&[u8]]] = &[
        &[b"SET", b"s1", b"secret-set", b"EX", b"100"],
        &[b"SETNX", b"s2", b"secret-setnx"],
        &[b"SETEX", b"s3", b"100", b"secret-setex"],
        &[b"PSETEX", b"s4", b"100000", b"secret-psetex"],
        &[b"GETSET", b"s5", b"secret-getset"],
        &[b"MSET", b"s6", b"secret-mset-1", b"s7", b"secret-mset-2"],
        &[b"MSETNX", b"s8", b"secret-msetnx"],
        &[b"SET", b"s9", b"secret-set-get", b"GET"],
        &[
            b"HSET",
            b"h1",
            b"f1",
            b"secret-hset-1",
            b"f2",
            b"secret-hset-2",
        ],
        &[b"HSETNX", b"h1", b"f3", b"secret-hsetnx"],
        &[b"HMSET", b"h1", b"f4", b"secret-hmset"],
    ];
    for command in writes {
        let reply = c.call(command).await;
        assert!(!reply.starts_with(b"-"), "{command:?}: {reply:?}");
    }
    let strings: [(&[u8], &[u8]); 9] = [
        (b"s1", b"secret-set"),
        (b"s2", b"secret-setnx"),
        (b"s3", b"secret-setex"),
        (b"s4", b"secret-psetex"),
        (b"s5", b"secret-getset"),
        (b"s6", b"secret-mset-1"),
        (b"s7", b"secret-mset-2"),
        (b"s8", b"secret-msetnx"),
        (b"s9", b"secret-set-get"),
    ];
    for (name, plaintext) in strings {
        opens_to(
            &redis,
            &redis.stored(name, None).await,
            key(name),
            plaintext,
        );
    }
    let fields: [(&[u8], &[u8]); 4] = [
        (b"f1", b"secret-hset-1"),
        (b"f2", b"secret-hset-2"),
        (b"f3", b"secret-hsetnx"),
        (b"f4", b"secret-hmset"),
    ];
    for (field, plaintext) in fields {
        let binding = Binding::hash_field(b"h1", field);
        opens_to(
            &redis,
            &redis.stored(b"h1", Some(field)).await,
            binding,
            plaintext,
        );
    }
    // Plaintext rules store plaintext.
    assert_reply(
        &c.call(&[b"SET", b"plain:counter", b"41"]).await,
        b"+OK\r\n",
    );
    assert_eq!(redis.stored(b"plain:counter", None).await, b"41");
    assert_reply(&c.call(&[b"INCR", b"plain:counter"]).await, b":42\r\n");
}

/// Writes the fixture every read test uses.
async fn fixture<S>(c: &mut RawClient<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    assert_reply(
        &c.call(&[b"MSET", b"a", b"alpha", b"b", b"", b"plain:c", b"gamma"])
            .await,
        b"+OK\r\n",
    );
    assert_reply(
        &c.call(&[b"HSET", b"h", b"f1", b"one", b"f2", b"two"]).await,
        b":2\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reply_shape_is_opened_in_resp2() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    fixture(&mut c).await;
    assert_reply(&c.call(&[b"GET", b"a"]).await, b"$5\r\nalpha\r\n");
    assert_reply(&c.call(&[b"GET", b"b"]).await, b"$0\r\n\r\n");
    assert_reply(&c.call(&[b"GET", b"missing"]).await, b"$-1\r\n");
    assert_reply(
        &c.call(&[b"GETEX", b"a", b"EX", b"100"]).await,
        b"$5\r\nalpha\r\n",
    );
    assert_reply(
        &c.call(&[b"MGET", b"a", b"missing", b"plain:c", b"b"]).await,
        b"*4\r\n$5\r\nalpha\r\n$-1\r\n$5\r\ngamma\r\n$0\r\n\r\n",
    );
    assert_reply(
        &c.call(&[b"SET", b"a", b"alpha-2", b"GET"]).await,
        b"$5\r\nalpha\r\n",
    );
    assert_reply(
        &c.call(&[b"GETSET", b"a", b"alpha-3"]).await,
        b"$7\r\nalpha-2\r\n",
    );
    assert_reply(&c.call(&[b"GETDEL", b"a"]).await, b"$7\r\nalpha-3\r\n");
    assert_reply(&c.call(&[b"HGET", b"h", b"f1"]).await, b"$3\r\none\r\n");
    assert_reply(
        &c.call(&[b"HMGET", b"h", b"f2", b"nope", b"f1"]).await,
        b"*3\r\n$3\r\ntwo\r\n$-1\r\n$3\r\none\r\n",
    );
    let all = c.call(&[b"HGETALL", b"h"]).await;
    assert_reply(
        &all,
        b"*4\r\n$2\r\nf1\r\n$3\r\none\r\n$2\r\nf2\r\n$3\r\ntwo\r\n",
    );
    assert_reply(
        &c.call(&[b"HVALS", b"h"]).await,
        b"*2\r\n$3\r\none\r\n$3\r\ntwo\r\n",
    );
    let random = c.call(&[b"HRANDFIELD", b"h", b"-2", b"WITHVALUES"]).await;
    assert!(random.starts_with(b"*4\r\n"), "{random:?}");
    for value in [&b"$3\r\none\r\n"[..], b"$3\r\ntwo\r\n"] {
        assert!(
            random.windows(value.len()).any(|w| w == value) || random.starts_with(b"*4"),
            "{random:?}"
        );
    }
    assert!(
        !random.windows(3).any(|w| w == [0xC7, 0x0A, 0x4B]),
        "ciphertext in {random:?}"
    );
    assert_reply(
        &c.call(&[b"HSCAN", b"h", b"0"]).await,
        b"*2\r\n$1\r\n0\r\n*4\r\n$2\r\nf1\r\n$3\r\none\r\n$2\r\nf2\r\n$3\r\ntwo\r\n",
    );
    assert_reply(
        &c.call(&[b"HKEYS", b"h"]).await,
        b"*2\r\n$2\r\nf1\r\n$2\r\nf2\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reply_shape_is_opened_in_resp3() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert!(c.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    fixture(&mut c).await;
    assert_reply(&c.call(&[b"GET", b"a"]).await, b"$5\r\nalpha\r\n");
    assert_reply(&c.call(&[b"GET", b"missing"]).await, b"_\r\n");
    assert_reply(
        &c.call(&[b"MGET", b"a", b"missing"]).await,
        b"*2\r\n$5\r\nalpha\r\n_\r\n",
    );
    assert_reply(
        &c.call(&[b"HGETALL", b"h"]).await,
        b"%2\r\n$2\r\nf1\r\n$3\r\none\r\n$2\r\nf2\r\n$3\r\ntwo\r\n",
    );
    assert_reply(
        &c.call(&[b"HVALS", b"h"]).await,
        b"*2\r\n$3\r\none\r\n$3\r\ntwo\r\n",
    );
    let random = c.call(&[b"HRANDFIELD", b"h", b"1", b"WITHVALUES"]).await;
    let one = [
        b"*1\r\n*2\r\n$2\r\nf1\r\n$3\r\none\r\n".to_vec(),
        b"*1\r\n*2\r\n$2\r\nf2\r\n$3\r\ntwo\r\n".to_vec(),
    ];
    assert!(one.contains(&random.to_vec()), "{random:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_open_when_pipelined_and_inside_multi_exec() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    fixture(&mut c).await;
    let mut pipeline = bytes::BytesMut::new();
    for _ in 0..100 {
        resp::encode_command(&mut pipeline, &[&b"GET"[..], b"a"]);
        resp::encode_command(&mut pipeline, &[&b"HGET"[..], b"h", b"f2"]);
    }
    c.send_raw(&pipeline).await;
    for _ in 0..100 {
        assert_reply(&c.read().await, b"$5\r\nalpha\r\n");
        assert_reply(&c.read().await, b"$3\r\ntwo\r\n");
    }
    for command in [
        &[&b"MULTI"[..]][..],
        &[b"SET", b"t", b"in-transaction"],
        &[b"GET", b"t"],
        &[b"INCR", b"plain:n"],
        &[b"MGET", b"a", b"t"],
        &[b"HGETALL", b"h"],
    ] {
        c.send(command).await;
    }
    assert_reply(&c.read().await, b"+OK\r\n");
    for _ in 0..5 {
        assert_reply(&c.read().await, b"+QUEUED\r\n");
    }
    assert_reply(
        &c.call(&[b"EXEC"]).await,
        b"*5\r\n+OK\r\n$14\r\nin-transaction\r\n:1\r\n*2\r\n$5\r\nalpha\r\n$14\r\nin-transaction\r\n\
*4\r\n$2\r\nf1\r\n$3\r\none\r\n$2\r\nf2\r\n$3\r\ntwo\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_sees_plaintext() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut client = proxy.client().await;
    let value: Vec<u8> = (0..=255).collect();
    let _: () = redis::cmd("SET")
        .arg("bin")
        .arg(&value)
        .query_async(&mut client)
        .await
        .expect("SET");
    let back: Vec<u8> = redis::cmd("GET")
        .arg("bin")
        .query_async(&mut client)
        .await
        .expect("GET");
    assert_eq!(back, value);
    let map: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("nothing")
        .query_async(&mut client)
        .await
        .expect("HGETALL");
    assert!(map.is_empty());
}

/// Replaces what Redis stores for `name`, around redcloak.
async fn overwrite(redis: &TestRedis, name: &[u8], field: Option<&[u8]>, bytes: &[u8]) {
    let mut admin = redis.admin().await;
    let reply = match field {
        Some(field) => admin.call(&[b"HSET", name, field, bytes]).await,
        None => admin.call(&[b"SET", name, bytes]).await,
    };
    assert!(!reply.starts_with(b"-"), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_moved_and_foreign_values_become_errors_in_their_place() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    fixture(&mut c).await;
    assert_reply(&c.call(&[b"SET", b"z", b"zeta"]).await, b"+OK\r\n");
    let original = redis.stored(b"a", None).await;
    let foreign_id = redis
        .keyring(&[(9, "key-1")], 9)
        .seal(b"alpha", key(b"a"))
        .expect("primary");
    let other_key = {
        let other = redcloak::crypto::keyring::generate_key();
        std::fs::write(redis.path("key-other"), other.as_bytes()).expect("write");
        redis
            .keyring(&[(1, "key-other")], 1)
            .seal(b"alpha", key(b"a"))
            .expect("primary")
    };
    let mut flipped = original.clone();
    flipped[40] ^= 0x01;
    let mut appended = original.clone();
    appended.push(b'!');
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("bit flip", flipped, "authentication failed"),
        (
            "truncated",
            original[..original.len() - 1].to_vec(),
            "authentication failed",
        ),
        ("appended", appended, "authentication failed"),
        (
            "moved from z",
            redis.stored(b"z", None).await,
            "authentication failed",
        ),
        ("unknown key id", foreign_id, "unknown key id 9"),
        ("another key", other_key, "authentication failed"),
    ];
    for (case, bytes, reason) in cases {
        overwrite(&redis, b"a", None, &bytes).await;
        let reply = c.call(&[b"GET", b"a"]).await;
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.starts_with("-ERR redcloak: value of key 'a' failed to decrypt ("),
            "{case}: {text}"
        );
        assert!(text.contains(reason), "{case}: {text}");
        // In an array, the failed element is the error and the others are delivered.
        let mget = c.call(&[b"MGET", b"z", b"a", b"plain:c"]).await;
        assert!(mget.ends_with(b"$5\r\ngamma\r\n"), "{case}: {mget:?}");
        let mget = c.call(&[b"MGET", b"z", b"a"]).await;
        assert!(
            mget.starts_with(b"*2\r\n$4\r\nzeta\r\n-ERR redcloak: value of key 'a'"),
            "{case}: {mget:?}"
        );
    }
    // Two hash fields swapped.
    let (one, two) = (
        redis.stored(b"h", Some(b"f1")).await,
        redis.stored(b"h", Some(b"f2")).await,
    );
    overwrite(&redis, b"h", Some(b"f1"), &two).await;
    overwrite(&redis, b"h", Some(b"f2"), &one).await;
    let reply = c.call(&[b"HGET", b"h", b"f1"]).await;
    assert_error(
        &reply,
        "-ERR redcloak: value of field 'f1' of key 'h' failed to decrypt",
    );
    let all = c.call(&[b"HGETALL", b"h"]).await;
    assert_eq!(
        String::from_utf8_lossy(&all)
            .matches("-ERR redcloak: value of field")
            .count(),
        2,
        "{all:?}"
    );
    // The connection is still usable.
    assert_reply(&c.call(&[b"GET", b"z"]).await, b"$4\r\nzeta\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_values_readable_and_seals_new_ones_with_the_new_primary() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"SET", b"old", b"written-under-key-1"]).await,
        b"+OK\r\n",
    );
    drop(c);
    drop(proxy);
    std::fs::write(
        redis.path("key-2"),
        redcloak::crypto::keyring::generate_key().as_bytes(),
    )
    .expect("write");
    let mut rotated = redis.config();
    rotated.encryption =
        "[encryption]\nprimary = 2\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n\
        [[encryption.keys]]\nid = 2\nfile = \"key-2\"\n"
            .into();
    let proxy = redis.start_proxy(&rotated).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"GET", b"old"]).await,
        b"$19\r\nwritten-under-key-1\r\n",
    );
    assert_reply(
        &c.call(&[b"SET", b"new", b"written-under-key-2"]).await,
        b"+OK\r\n",
    );
    assert_eq!(
        redcloak::crypto::envelope::key_id(&redis.stored(b"new", None).await),
        Ok(2)
    );
    assert_eq!(
        redcloak::crypto::envelope::key_id(&redis.stored(b"old", None).await),
        Ok(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_plaintext_is_an_error_unless_passed_for_a_migration() {
    let redis = TestRedis::start().await;
    overwrite(&redis, b"legacy", None, b"stored-before-redcloak").await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    let reply = c.call(&[b"GET", b"legacy"]).await;
    assert_error(
        &reply,
        "-ERR redcloak: value of key 'legacy' is not encrypted (legacy plaintext)",
    );
    assert!(
        !String::from_utf8_lossy(&reply).contains("stored-before"),
        "{reply:?}"
    );
    drop(c);
    drop(proxy);
    let mut migrating = redis.config();
    migrating.encryption = migrating
        .encryption
        .replace("primary = 1", "primary = 1\nlegacy_plaintext = \"pass\"");
    let proxy = redis.start_proxy(&migrating).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"GET", b"legacy"]).await,
        b"$22\r\nstored-before-redcloak\r\n",
    );
    // Tampered envelopes are never mistaken for legacy values.
    let mut sealed = redis
        .keyring(&[(1, "key-1")], 1)
        .seal(b"v", key(b"t"))
        .expect("primary");
    sealed[45] ^= 1;
    overwrite(&redis, b"t", None, &sealed).await;
    assert_error(
        &c.call(&[b"GET", b"t"]).await,
        "-ERR redcloak: value of key 't' failed to decrypt",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_commands_never_reach_redis_and_leave_the_connection_usable() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    fixture(&mut c).await;
    let mut admin = redis.admin().await;
    let dump_before = admin.call(&[b"DUMP", b"a"]).await;
    assert_reply(&admin.call(&[b"CONFIG", b"RESETSTAT"]).await, b"+OK\r\n");
    let refused: &[(&[&[u8]], &str)] = &[
        (
            &[b"APPEND", b"a", b"x"],
            "APPEND needs Redis to read the value of 'a'",
        ),
        (
            &[b"INCR", b"a"],
            "INCR needs Redis to read the value of 'a'",
        ),
        (&[b"SETRANGE", b"a", b"0", b"x"], "SETRANGE needs Redis"),
        (&[b"GETRANGE", b"a", b"0", b"1"], "GETRANGE needs Redis"),
        (&[b"STRLEN", b"a"], "STRLEN needs Redis"),
        (&[b"SETBIT", b"a", b"1", b"1"], "SETBIT needs Redis"),
        (&[b"LCS", b"a", b"b"], "LCS needs Redis"),
        (&[b"HINCRBY", b"h", b"f1", b"1"], "HINCRBY needs Redis"),
        (&[b"HSTRLEN", b"h", b"f1"], "HSTRLEN needs Redis"),
        (
            &[b"EVAL", b"return redis.call('GET', KEYS[1])", b"1", b"a"],
            "EVAL needs Redis",
        ),
        (&[b"DUMP", b"a"], "DUMP needs Redis"),
        (&[b"RENAME", b"a", b"a2"], "RENAME would move values of 'a'"),
        (&[b"COPY", b"a", b"a2"], "COPY would move values of 'a'"),
        (
            &[b"LREM", b"list", b"0", b"secret"],
            "LREM on 'list' is refused",
        ),
        (
            &[b"LMOVE", b"list", b"list2", b"LEFT", b"LEFT"],
            "LMOVE would move values of 'list'",
        ),
        (
            &[b"ZRANGEBYLEX", b"zset", b"-", b"+"],
            "ZRANGEBYLEX on 'zset' is refused",
        ),
        (
            &[b"PFDEBUG", b"GETREG", b"hll"],
            "PFDEBUG needs Redis to read the value of 'hll'",
        ),
        (
            &[b"SINTERSTORE", b"dest", b"set"],
            "SINTERSTORE would move values of 'dest'",
        ),
        (&[b"SORT", b"plain:l", b"BY", b"w_*"], "SORT with BY or GET"),
        (
            &[b"SET-SECRET-THING", b"k", b"secret"],
            "unknown command 'SET-SECRET-THING' refused",
        ),
    ];
    for (command, message) in refused {
        let reply = c.call(command).await;
        assert_error(&reply, &format!("-ERR redcloak: {message}"));
        assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
    }
    // Nothing of that reached Redis: no calls counted, no key changed or added.
    let stats =
        String::from_utf8_lossy(&admin.call(&[b"INFO", b"commandstats"]).await).into_owned();
    for name in [
        "append",
        "incr",
        "setrange",
        "lrem",
        "lmove",
        "zrangebylex",
        "pfdebug",
        "sinterstore",
        "eval",
        "rename",
        "copy",
        "sort",
        "dump",
    ] {
        assert!(
            !stats.contains(&format!("cmdstat_{name}:")),
            "{name} reached Redis: {stats}"
        );
    }
    assert_reply(&admin.call(&[b"DBSIZE"]).await, b":4\r\n");
    assert_eq!(admin.call(&[b"DUMP", b"a"]).await, dump_before);
    // With a plaintext rule the same commands work.
    assert_reply(&c.call(&[b"RPUSH", b"plain:list", b"x"]).await, b":1\r\n");
    assert_reply(&c.call(&[b"APPEND", b"plain:c", b"!"]).await, b":6\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_keys_can_be_renamed_and_bound_ones_cannot_be_moved_unnoticed() {
    let redis = TestRedis::start().await;
    let mut config = redis.config();
    config.encryption.push_str(
        "[[encryption.rules]]\npattern = \"free:*\"\nmode = \"encrypt\"\nbind_key = false\n",
    );
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"free:a", b"movable"]).await, b"+OK\r\n");
    assert_reply(
        &c.call(&[b"RENAME", b"free:a", b"free:b"]).await,
        b"+OK\r\n",
    );
    assert_reply(&c.call(&[b"GET", b"free:b"]).await, b"$7\r\nmovable\r\n");
    // A bound value renamed behind redcloak's back no longer opens.
    assert_reply(&c.call(&[b"SET", b"bound", b"stays"]).await, b"+OK\r\n");
    assert_reply(
        &redis
            .admin()
            .await
            .call(&[b"RENAME", b"bound", b"elsewhere"])
            .await,
        b"+OK\r\n",
    );
    assert_error(
        &c.call(&[b"GET", b"elsewhere"]).await,
        "-ERR redcloak: value of key 'elsewhere' failed to decrypt",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_table_covers_every_command_redis_lists() {
    let redis = TestRedis::start().await;
    let list = redis.admin().await.call(&[b"COMMAND", b"LIST"]).await;
    let (_, names) =
        resp::aggregate_elements(&list, &redcloak::resp::Limits::default()).expect("an array");
    assert!(
        names.len() > 200,
        "COMMAND LIST returned {} names",
        names.len()
    );
    let missing: Vec<String> = names
        .iter()
        // Subcommands (`config|get`) are handled by their container's row.
        .map(|element| resp::bulk_body(element).expect("a name"))
        .map(|name| Bytes::copy_from_slice(name.split(|&b| b == b'|').next().unwrap_or(name)))
        .filter(|name| redcloak::policy::table::lookup(name).is_none())
        .map(|name| String::from_utf8_lossy(&name).into_owned())
        .collect();
    assert!(
        missing.is_empty(),
        "commands missing from policy/table.rs: {missing:?}"
    );
}
