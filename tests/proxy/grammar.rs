//! redcloak reads arguments exactly as Redis does, and follows the
//! connection's state only as Redis's replies confirm it: a word that looks
//! like an option but is an argument, or a command Redis refused, never
//! makes a reply go out unopened. Key positions are checked against Redis
//! itself (`COMMAND GETKEYS`) for every command in the table.

use crate::support::*;
use bytes::Bytes;
use redcloak::policy::table::{COMMANDS, Class, Keys, Row};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hscan_match_novalues_is_a_pattern_and_values_are_opened() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(
        &c.call(&[b"HSET", b"h", b"novalues", b"secret-value"]).await,
        b":1\r\n",
    );
    for command in [
        &[&b"HSCAN"[..], b"h", b"0", b"MATCH", b"novalues"][..],
        &[b"HSCAN", b"h", b"0", b"COUNT", b"5", b"MATCH", b"novalues"],
    ] {
        let reply = c.call(command).await;
        assert!(contains(&reply, b"$12\r\nsecret-value\r\n"), "{reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_redis_refuses_opens_no_transaction_and_values_stay_opened() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"secret-1"]).await, b"+OK\r\n");
    assert_reply(
        &c.call(&[b"HSET", b"h", b"f", b"secret-2"]).await,
        b":1\r\n",
    );
    assert_error(
        &c.call(&[b"MULTI", b"x"]).await,
        "-ERR wrong number of arguments for 'multi' command",
    );
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$8\r\nsecret-1\r\n");
    assert_reply(
        &c.call(&[b"HGETALL", b"h"]).await,
        b"*2\r\n$1\r\nf\r\n$8\r\nsecret-2\r\n",
    );
    // And a real transaction still opens its values in EXEC.
    assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"+QUEUED\r\n");
    assert_reply(&c.call(&[b"EXEC"]).await, b"*1\r\n$8\r\nsecret-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_or_consumer_named_streams_does_not_move_xreadgroup_keys() {
    let redis = TestRedis::start().await;
    let mut config = redis.config();
    // Only `secret:s` is encrypted among what a wrong reading could take for keys.
    config.encryption.push_str(
        "[[encryption.rules]]\npattern = \"STREAMS\"\nmode = \"plaintext\"\n\
         [[encryption.rules]]\npattern = \"streams\"\nmode = \"plaintext\"\n",
    );
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    // A wrong reading would take only plaintext names for keys and pass the
    // sealed entry through; the right one opens it under `secret:s`.
    for group in [&b"streams"[..], b"g"] {
        assert_reply(
            &c.call(&[b"XGROUP", b"CREATE", b"secret:s", group, b"0", b"MKSTREAM"])
                .await,
            b"+OK\r\n",
        );
    }
    assert_reply(
        &c.call(&[b"XADD", b"secret:s", b"1-1", b"f", b"value-secret"])
            .await,
        b"$3\r\n1-1\r\n",
    );
    let entry = |key: &[u8]| {
        let mut expected = resp_array(b'*', &[key]);
        expected[1] = b'2';
        expected.extend(b"*1\r\n*2\r\n$3\r\n1-1\r\n");
        expected.extend(resp_array(b'*', &[b"f", b"value-secret"]));
        let mut outer = b"*1\r\n".to_vec();
        outer.extend(expected);
        outer
    };
    for command in [
        &[
            &b"XREADGROUP"[..],
            b"GROUP",
            b"streams",
            b"plain:c",
            b"STREAMS",
            b"secret:s",
            b">",
        ][..],
        &[
            b"XREADGROUP",
            b"GROUP",
            b"g",
            b"streams",
            b"STREAMS",
            b"secret:s",
            b">",
        ],
    ] {
        assert_reply(&c.call(command).await, &entry(b"secret:s"));
    }
}

/// Invocations the generated corpus cannot make: subcommands, options,
/// and arguments that look like keywords.
const TRICKY: &[&str] = &[
    "OBJECT ENCODING a1",
    "OBJECT FREQ a1",
    "XINFO STREAM a1",
    "XINFO GROUPS a1",
    "XGROUP CREATE a1 g $",
    "XGROUP DESTROY a1 g",
    "XREAD COUNT 2 STREAMS a1 a2 0 0",
    "XREAD BLOCK 0 STREAMS a1 0",
    "XREADGROUP GROUP g c COUNT 1 NOACK STREAMS a1 a2 > >",
    "XREADGROUP GROUP streams streams STREAMS a1 >",
    "SORT a1 BY nosort STORE a2",
    "SORT a1 LIMIT 0 10 ALPHA STORE a2",
    "SORT_RO a1 ALPHA",
    "GEORADIUS a1 0 0 10 km STORE a2",
    "GEORADIUS a1 0 0 10 km STOREDIST a2",
    "GEORADIUSBYMEMBER a1 m 10 km STORE a2",
    "GEORADIUSBYMEMBER a1 store 10 km",
    "GEORADIUSBYMEMBER a1 store 10 km STORE a2 STOREDIST a3",
    "GEORADIUS a1 0 0 10 km STORE a2 STORE a3",
    "SORT a1 GET store STORE a2",
    "SORT a1 BY store",
    "SORT a1 LIMIT 0 1 STORE a2 STORE a3",
    "GEOSEARCH a1 FROMMEMBER frommember BYRADIUS 10 km",
    "GEOSEARCHSTORE a1 a2 FROMLONLAT 0 0 BYBOX 1 1 km STOREDIST",
    "ZUNIONSTORE a1 2 a2 a3 WEIGHTS 1 2",
    "ZINTERSTORE a1 1 a2 AGGREGATE MAX",
    "ZDIFFSTORE a1 2 a2 a3",
    "ZUNION 2 a1 a2 WITHSCORES",
    "ZMPOP 2 a1 a2 MIN",
    "BZMPOP 0 2 a1 a2 MAX",
    "LMPOP 2 a1 a2 LEFT",
    "BLMPOP 0 1 a1 LEFT COUNT 2",
    "SINTERCARD 2 a1 a2 LIMIT 1",
    "ZINTERCARD 2 a1 a2",
    "EVAL x 2 a1 a2 arg",
    "EVAL_RO x 1 a1",
    "FCALL f 2 a1 a2 arg",
    "BITOP AND a1 a2 a3",
    "SET a1 v GET",
    "MSET a1 v a2 w",
    "LCS a1 a2",
    "COPY a1 a2 REPLACE",
    "BLPOP a1 a2 0",
    "MEMORY USAGE a1",
    "GETEX a1 PERSIST",
];

/// Redis's key positions for an invocation (`None`: Redis says it has no
/// keys, or refuses the arguments).
async fn redis_positions(
    admin: &mut RawClient<redcloak::upstream::UpstreamStream>,
    args: &[Bytes],
) -> Option<Vec<usize>> {
    let mut command: Vec<&[u8]> = vec![b"COMMAND", b"GETKEYS"];
    command.extend(args.iter().map(|a| a.as_ref()));
    let reply = admin.call(&command).await;
    if reply.starts_with(b"-") {
        return None;
    }
    let (_, elements) =
        redcloak::resp::aggregate_elements(&reply, &redcloak::resp::Limits::default())?;
    let keys: Vec<usize> = elements
        .iter()
        .filter_map(|e| redcloak::resp::bulk_body(e))
        .map(|key| {
            args.iter()
                .position(|a| a.as_ref() == key)
                .expect("a key Redis names is one of the arguments")
        })
        .collect();
    Some(keys)
}

fn words(text: &str) -> Vec<Bytes> {
    text.split(' ')
        .map(|w| Bytes::copy_from_slice(w.as_bytes()))
        .collect()
}

/// Invocations of a row with 1 to 6 arguments, named a1.. so every
/// argument can be found again; a key count where the layout has one.
fn generated(row: &Row) -> Vec<Vec<Bytes>> {
    (1..=6)
        .map(|n| {
            let mut args = vec![row.name.to_ascii_uppercase()];
            args.extend((1..=n).map(|i| format!("a{i}")));
            if let Keys::NumKeys { at, .. } = row.keys
                && let Some(count) = args.get_mut(at as usize)
            {
                *count = "2".into();
            }
            words(&args.join(" "))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_positions_match_redis_for_every_command_in_the_table() {
    let redis = TestRedis::start().await;
    let mut admin = redis.admin().await;
    let mut corpus: Vec<Vec<Bytes>> = TRICKY.iter().map(|t| words(t)).collect();
    for row in COMMANDS {
        if !matches!(row.class, Class::Refuse(_) | Class::Connection(_)) {
            corpus.extend(generated(row));
        }
    }
    let mut compared = 0;
    let mut mismatches = Vec::new();
    for args in &corpus {
        let row = redcloak::policy::table::lookup(&args[0]).expect("a row");
        let ours = row.keys.positions(args);
        let Some(theirs) = redis_positions(&mut admin, args).await else {
            continue;
        };
        compared += 1;
        if ours != theirs {
            let shown: Vec<_> = args.iter().map(|a| String::from_utf8_lossy(a)).collect();
            mismatches.push(format!(
                "{}: redcloak {ours:?}, Redis {theirs:?}",
                shown.join(" ")
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // Most of the table has keys; a corpus Redis mostly refused proves nothing.
    assert!(compared > 300, "only {compared} invocations compared");
}
