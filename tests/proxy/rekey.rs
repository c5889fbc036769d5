//! `redcloak rekey` against a real Redis: values move from key 1 to key 2
//! while the app keeps writing, nothing it wrote is lost, TTLs stay,
//! tampered values are reported and left alone, legacy plaintext is sealed
//! only when asked, and a rollback (`--to-key 1`) brings everything back.

use crate::support::*;
use redcloak::rekey::{Census, Mode, Options, Progress};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const STRINGS: usize = 80_000;
const HASHES: usize = 20_000;
const FIELDS: usize = 3;

fn options(mode: Mode, to_key: Option<u32>) -> Options {
    Options {
        to_key,
        to_plaintext: false,
        seal_legacy: false,
        pattern: None,
        mode,
        max_value_bytes: 1 << 20,
        checkpoint: None,
        rate: None,
        rate_bytes: None,
        max_latency: None,
        stop_after_keys: None,
    }
}

/// Key 2 written, and the config file rekey reads lists it as the primary
/// beside key 1 (a running proxy keeps what it was started with).
fn add_key_2(redis: &TestRedis, config: &mut ProxyConfig) {
    let key2 = redcloak::crypto::keyring::generate_key();
    redcloak::dev::write_file(&redis.path("key-2"), key2.as_bytes(), 0o600).expect("key 2");
    config.encryption = "[encryption]\nprimary = 2\n\
        [[encryption.keys]]\nid = 1\nfile = \"key-1\"\n[[encryption.keys]]\nid = 2\nfile = \"key-2\"\n\
        [[encryption.rules]]\npattern = \"plain:*\"\nmode = \"plaintext\"\n"
        .into();
    std::fs::write(redis.path("redcloak.toml"), config.render()).expect("config");
}

async fn rekey(redis: &TestRedis, options: &Options) -> Census {
    let config = redcloak::config::load(&redis.path("redcloak.toml")).expect("config");
    redcloak::rekey::run(config, options, &mut Progress::silent())
        .await
        .expect("rekey")
}

/// Writes the keys through redcloak, pipelined: strings (every tenth with a
/// TTL) and hashes of a few fields.
async fn write_keys(proxy: &Proxy) {
    let mut c = proxy.raw().await;
    for chunk in (0..STRINGS).collect::<Vec<_>>().chunks(500) {
        for i in chunk {
            let key = format!("s:{i}");
            let value = format!("value {i}");
            if i % 10 == 0 {
                c.send(&[b"SET", key.as_bytes(), value.as_bytes(), b"EX", b"3600"])
                    .await;
            } else {
                c.send(&[b"SET", key.as_bytes(), value.as_bytes()]).await;
            }
        }
        for _ in chunk {
            assert_reply(&c.read().await, b"+OK\r\n");
        }
    }
    for chunk in (0..HASHES).collect::<Vec<_>>().chunks(500) {
        for i in chunk {
            let key = format!("h:{i}");
            let mut args: Vec<Vec<u8>> = vec![b"HSET".to_vec(), key.into_bytes()];
            for f in 0..FIELDS {
                args.push(format!("f{f}").into_bytes());
                args.push(format!("field {f} of {i}").into_bytes());
            }
            let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            c.send(&args).await;
        }
        for _ in chunk {
            assert_reply(&c.read().await, format!(":{FIELDS}\r\n").as_bytes());
        }
    }
}

/// 100,000 keys (80,000 strings, every tenth with a TTL, and 20,000 hashes
/// of 3 fields): every value has moved from key 1 to key 2 while a writer
/// changed 1% of the strings; none of its writes is lost, TTLs stay, a tampered value and a
/// legacy plaintext one are counted and left as they were; `--to-key 1`
/// rolls it all back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_move_to_the_new_key_with_no_lost_update() {
    let _heavy = heavy().await;
    let redis = TestRedis::start().await;
    let mut config = redis.config();
    let proxy = redis.start_proxy(&config).await;
    write_keys(&proxy).await;
    // A tampered value, and one written before encryption (plaintext).
    redis.copy_stored(b"s:1", b"tampered").await;
    let mut admin = redis.admin().await;
    assert_reply(
        &admin.call(&[b"SET", b"legacy", b"plain"]).await,
        b"+OK\r\n",
    );
    let tampered = redis.stored(b"tampered", None).await;
    let ttl_before = admin.call(&[b"TTL", b"s:10"]).await;

    // Key 2 added and made primary (written to the config file rekey reads;
    // the running proxy keeps key 1, as before a reload).
    add_key_2(&redis, &mut config);

    let before = rekey(&redis, &options(Mode::Census, None)).await;
    let values = (STRINGS + HASHES * FIELDS) as u64;
    assert_eq!(before.by_key_id.get(&1), Some(&(values + 1)), "{before:?}");
    assert_eq!(before.legacy_plaintext, 1);

    // The app keeps writing 1% of the strings (through redcloak, key 1)
    // while rekey runs; the last value each got is what must survive.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut c = proxy.raw().await;
        tokio::spawn(async move {
            let mut last = std::collections::BTreeMap::new();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for i in (0..STRINGS).step_by(100) {
                    let key = format!("s:{i}");
                    let value = format!("app write {round} to {i}");
                    let reply = c.call(&[b"SET", key.as_bytes(), value.as_bytes()]).await;
                    assert_reply(&reply, b"+OK\r\n");
                    last.insert(key, value);
                }
            }
            last
        })
    };
    let started = std::time::Instant::now();
    let done = rekey(&redis, &options(Mode::Rewrite, None)).await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let last = writer.await.expect("writer");
    eprintln!(
        "rekey: {} values rewritten in {took:?} ({:.0}/s), {} skipped",
        done.rewritten,
        done.rewritten as f64 / took.as_secs_f64(),
        done.skipped
    );
    assert_eq!(done.failed, 1, "the tampered value: {done:?}");
    assert_eq!(done.legacy_plaintext, 1);

    // Afterwards: nothing under key 1 but what the app wrote since (through
    // a proxy that still seals with key 1) and the tampered value.
    let after = rekey(&redis, &options(Mode::Census, None)).await;
    let under_1 = after.by_key_id.get(&1).copied().unwrap_or(0);
    assert!(
        under_1 <= last.len() as u64 + 1,
        "{after:?} ({} app keys)",
        last.len()
    );
    assert_eq!(
        redis.stored(b"tampered", None).await,
        tampered,
        "left alone"
    );
    assert_eq!(
        redis.stored(b"legacy", None).await,
        b"plain",
        "not asked to seal"
    );
    // Every value still opens, and the app's writes all survived.
    let mut proxy_keys = redis.config();
    proxy_keys.encryption = config.encryption.clone();
    drop(proxy);
    let proxy = redis.start_proxy(&proxy_keys).await;
    let mut c = proxy.raw().await;
    for (key, value) in &last {
        let got = c.call(&[b"GET", key.as_bytes()]).await;
        assert_eq!(
            got,
            format!("${}\r\n{value}\r\n", value.len()).as_bytes(),
            "{key}"
        );
    }
    for i in [2, 999, STRINGS - 1] {
        let key = format!("s:{i}");
        let expected = format!("value {i}");
        let got = c.call(&[b"GET", key.as_bytes()]).await;
        assert_eq!(
            got,
            format!("${}\r\n{expected}\r\n", expected.len()).as_bytes()
        );
    }
    let got = c.call(&[b"HGET", b"h:7", b"f2"]).await;
    assert_eq!(got, b"$12\r\nfield 2 of 7\r\n"[..]);
    let ttl_after = admin.call(&[b"TTL", b"s:10"]).await;
    let seconds = |reply: &[u8]| -> i64 {
        std::str::from_utf8(&reply[1..reply.len() - 2])
            .expect("ttl")
            .parse()
            .expect("ttl")
    };
    assert!(seconds(&ttl_after) > 0);
    assert!(seconds(&ttl_before) - seconds(&ttl_after) <= 60, "TTL kept");
    assert_eq!(
        redcloak::crypto::envelope::key_id(&redis.stored(b"s:2", None).await),
        Ok(2)
    );

    // Roll back: everything under key 1 again, then --verify agrees.
    let back = rekey(&redis, &options(Mode::Rewrite, Some(1))).await;
    assert!(back.rewritten >= values - last.len() as u64, "{back:?}");
    let verify = rekey(&redis, &options(Mode::Census, Some(1))).await;
    assert_eq!(verify.remaining(1, false), 0, "{verify:?}");
    assert_eq!(
        redcloak::crypto::envelope::key_id(&redis.stored(b"s:2", None).await),
        Ok(1)
    );
    // The command line: --verify exits 0 only when nothing is left under
    // another key than the target.
    let verify = |extra: &'static [&'static str]| {
        let config = redis.path("redcloak.toml");
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(redcloak_bin())
                    .arg("rekey")
                    .arg("--config")
                    .arg(&config)
                    .arg("--verify")
                    .args(extra)
                    .output()
                    .expect("redcloak runs")
            })
            .await
            .expect("join")
        }
    };
    let under_1 = verify(&["--to-key", "1"]).await;
    assert!(under_1.status.success(), "{under_1:?}");
    let census: serde_json::Value = serde_json::from_slice(&under_1.stdout).expect("a JSON census");
    assert!(
        census["by_key_id"]["1"].as_u64().unwrap_or(0) > 10_000,
        "{census}"
    );
    // Not on a terminal: progress as JSON lines on stderr, counts only.
    let stderr = String::from_utf8_lossy(&under_1.stderr);
    let done: serde_json::Value = stderr
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .find(|line: &serde_json::Value| line["rekey"] == "done")
        .unwrap_or_else(|| panic!("a JSON progress line: {stderr}"));
    assert_eq!(done["keys"], census["keys"], "{done}");
    assert!(done["of"].as_u64().unwrap_or(0) >= 100_000, "{done}");
    let under_2 = verify(&[]).await;
    assert_eq!(under_2.status.code(), Some(1), "values remain under key 1");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// A run stopped part way resumes from its checkpoint and finishes the
/// job; a checkpoint written with another keyring is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_part_way_resumes_from_its_checkpoint() {
    let redis = TestRedis::start().await;
    let mut config = redis.config();
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    for chunk in (0..3000).collect::<Vec<_>>().chunks(500) {
        for i in chunk {
            let key = format!("k:{i}");
            c.send(&[b"SET", key.as_bytes(), b"value"]).await;
        }
        for _ in chunk {
            assert_reply(&c.read().await, b"+OK\r\n");
        }
    }
    let key2 = redcloak::crypto::keyring::generate_key();
    redcloak::dev::write_file(&redis.path("key-2"), key2.as_bytes(), 0o600).expect("key 2");
    let keys = |ids: &[u32]| {
        let mut text = "[encryption]\nprimary = 2\n".to_owned();
        for id in ids {
            text.push_str(&format!(
                "[[encryption.keys]]\nid = {id}\nfile = \"key-{id}\"\n"
            ));
        }
        text + "[[encryption.rules]]\npattern = \"plain:*\"\nmode = \"plaintext\"\n"
    };
    config.encryption = keys(&[1, 2]);
    let file = redis.path("redcloak.toml");
    std::fs::write(&file, config.render()).expect("config");
    let checkpoint = redis.path("rekey.checkpoint");
    let mut part = options(Mode::Rewrite, None);
    part.checkpoint = Some(checkpoint.clone());
    part.stop_after_keys = Some(1000);

    let first = rekey(&redis, &part).await;
    assert!(!first.complete, "{first:?}");
    assert!(first.keys >= 1000 && first.rewritten < 3000, "{first:?}");
    assert!(checkpoint.exists());

    // Another keyring: the unfinished run is not resumed with it.
    redcloak::dev::write_file(
        &redis.path("key-3"),
        redcloak::crypto::keyring::generate_key().as_bytes(),
        0o600,
    )
    .expect("key 3");
    config.encryption = keys(&[1, 2, 3]);
    std::fs::write(&file, config.render()).expect("config");
    let loaded = redcloak::config::load(&file).expect("config");
    let refused = redcloak::rekey::run(loaded, &part, &mut Progress::silent()).await;
    assert!(
        matches!(
            refused,
            Err(redcloak::rekey::RekeyError::CheckpointMismatch {
                what: "keyring",
                ..
            })
        ),
        "{refused:?}"
    );

    config.encryption = keys(&[1, 2]);
    std::fs::write(&file, config.render()).expect("config");
    part.stop_after_keys = None;
    let rest = rekey(&redis, &part).await;
    assert!(rest.complete, "{rest:?}");
    assert_eq!(rest.rewritten, 3000, "the two parts together: {rest:?}");
    let verify = rekey(&redis, &options(Mode::Census, None)).await;
    assert_eq!(verify.remaining(2, false), 0, "{verify:?}");
    assert_eq!(verify.by_key_id.get(&2), Some(&3000));

    // On a terminal (`script` gives it one), a progress bar.
    let command = format!(
        "{} rekey --config {} --dry-run",
        redcloak_bin(),
        file.display()
    );
    let on_a_terminal = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script (bsdutils) runs");
    assert!(on_a_terminal.status.success(), "{on_a_terminal:?}");
    let shown = String::from_utf8_lossy(&on_a_terminal.stdout);
    assert!(
        shown.contains("3,000/3,000 keys") && shown.contains("[====="),
        "a bar: {shown}"
    );
    assert!(!shown.contains("\"rekey\""), "no JSON lines: {shown}");

    // `keys retire`: key 1 holds nothing now, so it may go; key 2 is the
    // primary; a stream entry sealed under key 1 (rekey never rewrites
    // one) keeps it until the stream is trimmed.
    let retire = |id: &str| {
        std::process::Command::new(redcloak_bin())
            .args(["keys", "retire", "--config"])
            .arg(&file)
            .args(["--id", id])
            .output()
            .expect("redcloak runs")
    };
    let one = retire("1");
    assert!(one.status.success(), "{one:?}");
    assert_eq!(retire("2").status.code(), Some(1), "the primary");
    assert_reply(&c.call(&[b"SET", b"k:0", b"under key 1"]).await, b"+OK\r\n");
    let refused = retire("1");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("1 values are sealed under key 1"));
    assert_reply(&c.call(&[b"DEL", b"k:0"]).await, b":1\r\n");
    let added = c
        .call(&[b"XADD", b"events", b"*", b"field", b"value"])
        .await;
    assert!(added.starts_with(b"$"), "{added:?}");
    let refused = retire("1");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("1 stream entry values are sealed under key 1"),
        "{refused:?}"
    );
    let added = c.call(&[b"XADD", b"plain:events", b"*", b"f", b"v"]).await;
    assert!(added.starts_with(b"$"), "{added:?}");
    // The documented step: trim the entries once consumers are done.
    assert_reply(
        &c.call(&[b"XTRIM", b"events", b"MAXLEN", b"0"]).await,
        b":1\r\n",
    );
    assert!(
        retire("1").status.success(),
        "a trimmed stream and a plaintext one hold nothing under key 1"
    );
}

/// The way off redcloak: `--to-plaintext --i-understand` writes every value
/// back readable (refused without `--i-understand`), and `--seal-legacy`
/// reverses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_plaintext_writes_values_back_readable_and_seal_legacy_reverses_it() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    for i in 0..50 {
        let key = format!("p:{i}");
        let value = format!("secret {i}");
        assert_reply(
            &c.call(&[b"SET", key.as_bytes(), value.as_bytes()]).await,
            b"+OK\r\n",
        );
    }
    assert_reply(
        &c.call(&[b"HSET", b"ph", b"f", b"field value"]).await,
        b":1\r\n",
    );
    let file = redis.path("redcloak.toml");
    let refused = std::process::Command::new(redcloak_bin())
        .args(["rekey", "--config"])
        .arg(&file)
        .arg("--to-plaintext")
        .output()
        .expect("redcloak runs");
    // A usage error (exit 64), naming the missing confirmation.
    assert_eq!(refused.status.code(), Some(64), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--i-understand"));

    let mut plain = options(Mode::Rewrite, None);
    plain.to_plaintext = true;
    let census = rekey(&redis, &plain).await;
    assert_eq!(census.rewritten, 51, "{census:?}");
    assert_eq!(census.remaining_sealed(), 0);
    assert_eq!(redis.stored(b"p:7", None).await, b"secret 7");
    assert_eq!(redis.stored(b"ph", Some(b"f")).await, b"field value");

    let mut seal = options(Mode::Rewrite, None);
    seal.seal_legacy = true;
    let census = rekey(&redis, &seal).await;
    assert_eq!(census.rewritten, 51, "{census:?}");
    assert_eq!(
        redcloak::crypto::envelope::key_id(&redis.stored(b"p:7", None).await),
        Ok(1)
    );
    assert_reply(&c.call(&[b"GET", b"p:7"]).await, b"$8\r\nsecret 7\r\n");
}

/// Lists, sets and sorted sets move too: list elements in place, members
/// replaced (deterministically sealed under the new key, so SISMEMBER
/// still finds them; a sorted set's scores kept), TTLs kept; a HyperLogLog
/// (keyed tokens, not envelopes) is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_sets_and_sorted_sets_move_to_the_new_key() {
    let redis = TestRedis::start().await;
    let mut config = redis.config();
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"RPUSH", b"jobs", b"a", b"b", b"c"]).await,
        b":3\r\n",
    );
    assert_reply(
        &c.call(&[b"SADD", b"tags", b"red", b"green", b"blue"]).await,
        b":3\r\n",
    );
    assert_reply(&c.call(&[b"EXPIRE", b"tags", b"3600"]).await, b":1\r\n");
    assert_reply(
        &c.call(&[b"ZADD", b"board", b"1", b"ann", b"2", b"bob"])
            .await,
        b":2\r\n",
    );
    assert_reply(
        &c.call(&[b"PFADD", b"visitors", b"x", b"y"]).await,
        b":1\r\n",
    );
    let hll = redis.stored(b"visitors", None).await;
    // A stream of 250 entries (more than a page) of two fields each.
    for i in 0..250 {
        let id = format!("1-{}", i + 1);
        let added = c
            .call(&[b"XADD", b"events", id.as_bytes(), b"a", b"x", b"b", b"y"])
            .await;
        assert!(added.starts_with(b"$"), "{added:?}");
    }
    add_key_2(&redis, &mut config);
    let done = rekey(&redis, &options(Mode::Rewrite, None)).await;
    assert_eq!(done.rewritten, 3 + 3 + 2, "{done:?}");
    assert_eq!(done.streams, 1);
    let after = rekey(&redis, &options(Mode::Census, None)).await;
    assert_eq!(after.by_key_id.get(&2), Some(&8), "{after:?}");
    assert_eq!(after.by_key_id.get(&1), None, "{after:?}");
    // Stream entries are counted where they are, never rewritten: they
    // keep key 1 (and --verify says so) until the stream is trimmed.
    assert_eq!(
        after.stream_values_by_key_id.get(&1),
        Some(&500),
        "{after:?}"
    );
    assert_eq!(after.remaining(2, false), 500);
    assert_eq!(after.under(1), 500);
    assert_eq!(
        redis.stored(b"visitors", None).await,
        hll,
        "HyperLogLog untouched"
    );
    let mut admin = redis.admin().await;
    let ttl = admin.call(&[b"TTL", b"tags"]).await;
    assert!(ttl.starts_with(b":3") && ttl.len() > 4, "TTL kept: {ttl:?}");

    // A proxy with key 2 as primary reads them all.
    drop(proxy);
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"LRANGE", b"jobs", b"0", b"-1"]).await,
        b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n",
    );
    assert_reply(&c.call(&[b"SISMEMBER", b"tags", b"green"]).await, b":1\r\n");
    assert_reply(&c.call(&[b"SCARD", b"tags"]).await, b":3\r\n");
    let mut members = texts(&c.call(&[b"SMEMBERS", b"tags"]).await);
    members.sort();
    assert_eq!(members, ["blue", "green", "red"]);
    assert_reply(
        &c.call(&[b"ZRANGE", b"board", b"0", b"-1", b"WITHSCORES"])
            .await,
        b"*4\r\n$3\r\nann\r\n$1\r\n1\r\n$3\r\nbob\r\n$1\r\n2\r\n",
    );
    assert_reply(&c.call(&[b"PFCOUNT", b"visitors"]).await, b":2\r\n");
}
