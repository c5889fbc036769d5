//! Lua scripts and functions: they run only when redcloak has proved that
//! every key they touch is one they declare; nothing else reaches Redis, so
//! no script can write plaintext under an encrypted key or read an envelope.

use crate::support::*;

const WRITES_UNDECLARED: &[u8] = b"return redis.call('SET','secret:1',ARGV[1])";

/// The SHA-1 Redis names a script by, as SCRIPT LOAD returns it.
async fn loaded_directly(redis: &TestRedis, body: &[u8]) -> Vec<u8> {
    let mut admin = redis.admin().await;
    let reply = admin.call(&[b"SCRIPT", b"LOAD", body]).await;
    redcloak::resp::bulk_body(&reply).expect("a sha").to_vec()
}

fn call(args: &[Vec<u8>]) -> Vec<&[u8]> {
    args.iter().map(Vec::as_slice).collect()
}

async fn absent(redis: &TestRedis, key: &[u8]) {
    let mut admin = redis.admin().await;
    assert_reply(&admin.call(&[b"EXISTS", key]).await, b":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_that_touch_undeclared_keys_never_reach_redis() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    let cases: &[&[&[u8]]] = &[
        &[b"EVAL", WRITES_UNDECLARED, b"0", b"PT"],
        // A decoy key on a plaintext rule declared, the secret written.
        &[
            b"EVAL",
            b"redis.call('SET','secret:2',ARGV[1]) return redis.call('GET', KEYS[1])",
            b"1",
            b"plain:decoy",
            b"PT",
        ],
        &[
            b"EVAL",
            b"return redis.call('HSET','secret:3','f',ARGV[1])",
            b"0",
            b"PT",
        ],
        &[b"EVAL_RO", b"return redis.call('GET','secret:6')", b"0"],
        &[
            b"EVAL",
            b"local c = redis.call return c('SET','secret:4',ARGV[1])",
            b"0",
            b"PT",
        ],
        &[
            b"EVAL",
            b"return _G['redis'].call('SET','secret:5',ARGV[1])",
            b"0",
            b"PT",
        ],
        &[b"SCRIPT", b"LOAD", WRITES_UNDECLARED],
        &[
            b"FUNCTION",
            b"LOAD",
            b"#!lua name=exfil\nredis.register_function('exfil', function(keys, args) \
              return redis.call('SET', 'secret:7', args[1]) end)",
        ],
    ];
    for command in cases {
        let reply = c.call(command).await;
        assert_error(&reply, "-ERR redcloak: ");
        assert!(
            String::from_utf8_lossy(&reply).contains("cannot prove which keys"),
            "{reply:?}"
        );
    }
    for key in [
        &b"secret:1"[..],
        b"secret:2",
        b"secret:3",
        b"secret:4",
        b"secret:5",
        b"secret:7",
    ] {
        absent(&redis, key).await;
    }
    let mut admin = redis.admin().await;
    assert_reply(&admin.call(&[b"FUNCTION", b"LIST"]).await, b"*0\r\n");
    // The refused body stays refused by its SHA-1 too.
    let sha = loaded_directly(&redis, WRITES_UNDECLARED).await;
    assert_error(
        &c.call(&[b"EVALSHA", &sha, b"0", b"PT"]).await,
        "-ERR redcloak: EVALSHA refused: redcloak cannot prove",
    );
    absent(&redis, b"secret:1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evalsha_and_fcall_of_code_redcloak_never_saw_are_not_run() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    // Loaded around redcloak: Redis has it, redcloak has not proved it.
    let body = b"return redis.call('SET','plain:x',ARGV[1])";
    let sha = loaded_directly(&redis, body).await;
    assert_reply(
        &c.call(&[b"EVALSHA", &sha, b"0", b"v"]).await,
        b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
    );
    let mut admin = redis.admin().await;
    let library = b"#!lua name=around\nredis.register_function('around', function(keys, args) \
        return redis.call('SET', 'secret:8', args[1]) end)";
    let loaded = admin.call(&[b"FUNCTION", b"LOAD", library]).await;
    assert_reply(&loaded, b"$6\r\naround\r\n");
    assert_error(
        &c.call(&[b"FCALL", b"around", b"0", b"PT"]).await,
        "-ERR redcloak: FCALL of 'around' refused: its library was not loaded through redcloak",
    );
    absent(&redis, b"secret:8").await;
    absent(&redis, b"plain:x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proved_scripts_and_functions_run_on_plaintext_keys_and_clients_fall_back_to_eval() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut client = proxy.client().await;
    // What redis-py, node-redis and ioredis do: EVALSHA, NOSCRIPT, EVAL.
    let body = b"return redis.call('SET', KEYS[1], ARGV[1])";
    let script = redis::Script::new(std::str::from_utf8(body).expect("text"));
    let sha = script.get_hash().to_owned();
    let mut c = proxy.raw().await;
    let evalsha: [&[u8]; 5] = [b"EVALSHA", sha.as_bytes(), b"1", b"plain:e", b"v"];
    assert_reply(
        &c.call(&evalsha).await,
        b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
    );
    assert_reply(
        &c.call(&[b"EVAL", body, b"1", b"plain:e", b"v"]).await,
        b"+OK\r\n",
    );
    assert_reply(&c.call(&evalsha).await, b"+OK\r\n");
    assert_eq!(redis_calls(&redis, "evalsha").await, 1);
    // The redis crate's own fallback (EVALSHA, then loading the script).
    let script =
        redis::Script::new("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])");
    let value: String = script
        .key("plain:s")
        .arg("hello")
        .invoke_async(&mut client)
        .await
        .expect("script runs");
    assert_eq!(value, "hello");
    let again: String = script
        .key("plain:s")
        .arg("again")
        .invoke_async(&mut client)
        .await
        .expect("script runs by its sha");
    assert_eq!(again, "again");
    // An encrypted key, even declared, is refused: Redis would read the value.
    let refused = script
        .key("secret:s")
        .arg("x")
        .invoke_async::<String>(&mut client)
        .await
        .expect_err("refused");
    assert!(refused.to_string().contains("is encrypted"), "{refused}");
    absent(&redis, b"secret:s").await;

    let library = b"#!lua name=counter\nredis.register_function('bump', function(keys, args) \
        return redis.call('INCRBY', keys[1], args[1]) end)";
    assert_reply(
        &c.call(&[b"FUNCTION", b"LOAD", b"REPLACE", library]).await,
        b"$7\r\ncounter\r\n",
    );
    assert_reply(
        &c.call(&[b"FCALL", b"bump", b"1", b"plain:n", b"5"]).await,
        b":5\r\n",
    );
    assert_error(
        &c.call(&[b"FCALL", b"bump", b"1", b"secret:n", b"5"]).await,
        "-ERR redcloak: FCALL needs Redis to read and write the values of 'secret:n'",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_debug_migrate_and_code_restores_are_refused() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    for (command, says) in [
        (
            &[&b"SCRIPT"[..], b"DEBUG", b"YES"][..],
            "SCRIPT DEBUG is not proxied",
        ),
        (
            &[b"script", b"debug", b"sync"],
            "SCRIPT DEBUG is not proxied",
        ),
        (
            &[b"SCRIPT", b"FLUSH"],
            "SCRIPT FLUSH is refused while any key is encrypted",
        ),
        (&[b"FUNCTION", b"FLUSH"], "FUNCTION FLUSH is refused"),
        (
            &[b"FUNCTION", b"RESTORE", b"payload"],
            "FUNCTION RESTORE is refused",
        ),
        (&[b"SCRIPT", b"NOPE"], "unknown subcommand 'SCRIPT NOPE'"),
        (
            &[
                b"MIGRATE",
                b"127.0.0.1",
                b"6379",
                b"secret:1",
                b"0",
                b"1000",
            ],
            "MIGRATE is not proxied",
        ),
    ] {
        assert_error(&c.call(command).await, &format!("-ERR redcloak: {says}"));
    }
    assert_eq!(redis_calls(&redis, "script|debug").await, 0);
    assert_eq!(redis_calls(&redis, "migrate").await, 0);
    // Still served after the refusals.
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_plaintext_configuration_may_flush_scripts() {
    let redis = TestRedis::start().await;
    let mut config = redis.config();
    config.encryption =
        "[encryption]\nprimary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n\
        [[encryption.rules]]\npattern = \"*\"\nmode = \"plaintext\"\n"
            .into();
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SCRIPT", b"FLUSH"]).await, b"+OK\r\n");
}

/// A `[[scripts]]` entry: pops the oldest job of a list and records it in a
/// sorted set of the same rule, sealing the member it is given.
const JOB_SCRIPT: &str = r#"
[[scripts]]
name = "take job"
body = "local job = redis.call('LPOP', KEYS[1]) redis.call('ZADD', KEYS[2], 1, ARGV[1]) return job"
keys = ["list", "sorted-set"]
args = ["KEYS[2]"]
reply = "KEYS[1]"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_scripts_run_on_encrypted_keys_with_arguments_sealed_and_replies_opened() {
    let redis = TestRedis::start().await;
    let rules = "[[encryption.rules]]\nname = \"jobs\"\npattern = \"jobs:*\"\nmode = \"encrypt\"\nbind = \"rule\"\n";
    let proxy = redis
        .start_proxy(&redis.config().tail(rules).tail(JOB_SCRIPT))
        .await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"RPUSH", b"jobs:ready", b"job-1-secret", b"job-2-secret"])
            .await,
        b":2\r\n",
    );
    let body = b"local job = redis.call('LPOP', KEYS[1]) redis.call('ZADD', KEYS[2], 1, ARGV[1]) return job";
    let take = |command: &'static [u8], script: &[u8]| -> Vec<Vec<u8>> {
        [
            command,
            script,
            b"2",
            b"jobs:ready",
            b"jobs:taken",
            b"worker-secret",
        ]
        .iter()
        .map(|a| a.to_vec())
        .collect()
    };
    let eval = take(b"EVAL", body);
    assert_reply(&c.call(&call(&eval)).await, b"$12\r\njob-1-secret\r\n");
    let sha = loaded_directly(&redis, body).await;
    let evalsha = take(b"EVALSHA", &sha);
    assert_reply(&c.call(&call(&evalsha)).await, b"$12\r\njob-2-secret\r\n");
    assert_reply(
        &c.call(&[b"ZSCORE", b"jobs:taken", b"worker-secret"]).await,
        b"$1\r\n1\r\n",
    );
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
    // Called with keys of different bindings, or another number of arguments: refused.
    assert_error(
        &c.call(&[b"EVAL", body, b"2", b"jobs:ready", b"elsewhere", b"m"])
            .await,
        "-ERR redcloak: EVAL of take job would pass values between 'jobs:ready'",
    );
    assert_error(
        &c.call(&[b"EVAL", body, b"2", b"jobs:ready", b"jobs:taken"])
            .await,
        "-ERR redcloak: EVAL of take job is refused: it takes 2 keys and 1 arguments, and was given 2 and 0",
    );
    // redis-py's Lock scripts compare the stored token: refused on an
    // encrypted key with the rule to add, run on a plaintext one.
    let release = "\n        local token = redis.call('get', KEYS[1])\n        if not token or token ~= ARGV[1] then\n            return 0\n        end\n        redis.call('del', KEYS[1])\n        return 1\n    ";
    assert_error(
        &c.call(&[b"EVAL", release.as_bytes(), b"1", b"lock:jobs", b"token"])
            .await,
        "-ERR redcloak: EVAL of redis-py Lock release on 'lock:jobs' is refused: redis-py's Lock compares the token",
    );
    assert_reply(
        &c.call(&[b"SET", b"plain:lock", b"token", b"NX"]).await,
        b"+OK\r\n",
    );
    assert_reply(
        &c.call(&[b"EVAL", release.as_bytes(), b"1", b"plain:lock", b"token"])
            .await,
        b":1\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_scripts_of_sidekiq_and_kombu_run_on_encrypted_keys() {
    let redis = TestRedis::start().await;
    let rules = "[[encryption.rules]]\nname = \"kombu\"\npattern = \"_kombu.*\"\nmode = \"encrypt\"\nbind = \"rule\"\n";
    let proxy = redis.start_proxy(&redis.config().tail(rules)).await;
    let mut c = proxy.raw().await;
    // Sidekiq 6 loads its scheduler script, then calls it by SHA-1.
    let sidekiq = "local key, now = KEYS[1], ARGV[1]\nlocal jobs = redis.call(\"zrangebyscore\", key, \"-inf\", now, \"limit\", 0, 1)\nif jobs[1] then\n  redis.call(\"zrem\", key, jobs[1])\n  return jobs[1]\nend\n";
    assert_reply(
        &c.call(&[b"ZADD", b"schedule", b"10", b"{\"args\":[\"job-secret\"]}"])
            .await,
        b":1\r\n",
    );
    let sha = c.call(&[b"SCRIPT", b"LOAD", sidekiq.as_bytes()]).await;
    let sha = redcloak::resp::bulk_body(&sha).expect("a sha").to_vec();
    assert_reply(
        &c.call(&[b"EVALSHA", &sha, b"1", b"schedule", b"5"]).await,
        b"$-1\r\n",
    );
    assert_reply(
        &c.call(&[b"EVALSHA", &sha, b"1", b"schedule", b"20"]).await,
        b"$23\r\n{\"args\":[\"job-secret\"]}\r\n",
    );
    assert_reply(&c.call(&[b"ZCARD", b"schedule"]).await, b":0\r\n");
    // Its key is a local bound once to KEYS[1]; bound again, it is refused.
    let changed = sidekiq.replace("if jobs[1] then", "key = now\nif jobs[1] then");
    assert_error(
        &c.call(&[b"SCRIPT", b"LOAD", changed.as_bytes()]).await,
        "-ERR redcloak: SCRIPT LOAD refused: redcloak cannot prove",
    );
    // kombu's binding refresh adds a set member and a sorted-set member.
    let kombu = "\nredis.call('SADD', KEYS[1], ARGV[1])\nlocal now = redis.call('TIME')\nlocal ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)\nredis.call('ZADD', KEYS[2], 'GT', ms + tonumber(ARGV[3]), ARGV[2])\n";
    assert_reply(
        &c.call(&[
            b"EVAL",
            kombu.as_bytes(),
            b"2",
            b"_kombu.binding.tasks",
            b"_kombu.binding_deadlines",
            b"route-secret",
            b"tasks-secret",
            b"60000",
        ])
        .await,
        b"$-1\r\n",
    );
    assert_reply(
        &c.call(&[b"SMEMBERS", b"_kombu.binding.tasks"]).await,
        &resp_array(b'*', &[b"route-secret"]),
    );
    assert_reply(
        &c.call(&[b"ZRANGE", b"_kombu.binding_deadlines", b"0", b"-1"])
            .await,
        &resp_array(b'*', &[b"tasks-secret"]),
    );
    redis.assert_holds_no_plaintext(&[b"secret"]).await;
}
