//! Lanes: clients share a few upstream connections; the handshakes clients
//! send on connecting are answered by redcloak and keep them there; commands
//! that need a connection of their own move the client to one, with its
//! state replayed; and under chaos (Redis killing the lanes, clients leaving
//! mid-pipeline, slow readers, large values) no reply ever reaches another
//! client.

use crate::support::*;
use redcloak::upstream::UpstreamStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const METRICS: &str = "[metrics]\naddress = \"127.0.0.1:0\"\n";

/// redcloak's connections to Redis, as `CLIENT LIST` shows them.
async fn redcloak_connections(admin: &mut RawClient<UpstreamStream>) -> Vec<String> {
    let list = admin
        .call(&[&b"CLIENT"[..], b"LIST", b"TYPE", b"normal"])
        .await;
    let user = format!(" user={REDIS_USER} ");
    texts(&list)
        .concat()
        .lines()
        .filter(|line| line.contains(&user))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_handshakes_are_answered_on_the_lane_and_pinning_replays_them() {
    let redis = TestRedis::start().await;
    let config = redis.config().upstream("lanes", "1").tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let mut admin = redis.admin().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = proxy.raw().await;
        let name = format!("app-{i}");
        // What redis-py and node-redis send on connecting. Redis answers
        // SETINFO (7.0 does not know it), on the lane; the rest redcloak does.
        let setinfo: [&[u8]; 4] = [b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py"];
        let direct = admin.call(&setinfo).await;
        assert_reply(&c.call(&setinfo).await, &direct);
        let setinfo: [&[u8]; 4] = [b"CLIENT", b"SETINFO", b"LIB-VER", b"8.0.0"];
        let direct = admin.call(&setinfo).await;
        assert_reply(&c.call(&setinfo).await, &direct);
        assert_reply(
            &c.call(&[b"CLIENT", b"SETNAME", name.as_bytes()]).await,
            b"+OK\r\n",
        );
        let got = c.call(&[b"CLIENT", b"GETNAME"]).await;
        assert_reply(&got, format!("${}\r\n{name}\r\n", name.len()).as_bytes());
        let key = format!("lane:{i}");
        assert_reply(&c.call(&[b"SET", key.as_bytes(), b"v"]).await, b"+OK\r\n");
        assert_reply(&c.call(&[b"GET", key.as_bytes()]).await, b"$1\r\nv\r\n");
        clients.push(c);
    }
    // Twenty clients, one upstream connection, no name set on it.
    let connections = redcloak_connections(&mut admin).await;
    assert_eq!(connections.len(), 1, "{connections:?}");
    assert!(connections[0].contains(" name= "), "{connections:?}");
    let metrics = proxy.scrape().await;
    assert_eq!(metric(&metrics, "redcloak_upstream_lanes_open"), Some(1.0));
    assert_eq!(metric(&metrics, "redcloak_client_pins_total"), Some(0.0));

    // A pipeline with a transaction in the middle: the replies before it
    // come from the lane, the rest from the client's own connection, in order.
    let c = &mut clients[3];
    let mut pipeline = bytes::BytesMut::new();
    for args in [
        &[&b"SET"[..], b"plain:lane-t", b"1"][..],
        &[b"MULTI"],
        &[b"INCR", b"plain:lane-t"],
        &[b"EXEC"],
        &[b"GET", b"plain:lane-t"],
        &[b"CLIENT", b"GETNAME"],
    ] {
        redcloak::resp::encode_command(&mut pipeline, args);
    }
    c.send_raw(&pipeline).await;
    for expected in [
        &b"+OK\r\n"[..],
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"*1\r\n:2\r\n",
        b"$1\r\n2\r\n",
        b"$5\r\napp-3\r\n",
    ] {
        assert_reply(&c.read().await, expected);
    }
    // Redis knows the name and library the client gave redcloak.
    let connections = redcloak_connections(&mut admin).await;
    assert_eq!(connections.len(), 2, "{connections:?}");
    let pinned = connections
        .iter()
        .find(|line| line.contains(" name=app-3 "))
        .unwrap_or_else(|| panic!("the name was replayed: {connections:?}"));
    assert!(pinned.contains("cmd=client|getname"), "{pinned}");
    assert_eq!(
        metric(&proxy.scrape().await, "redcloak_client_pins_total"),
        Some(1.0)
    );
    // Blocking commands pin too; the lane's other clients are not held up.
    let b = &mut clients[4];
    b.send(&[b"BLPOP", b"lane:queue", b"0"]).await;
    wait_until_blocked(&redis, 1).await;
    assert_reply(
        &clients[5].call(&[b"RPUSH", b"lane:queue", b"job"]).await,
        b":1\r\n",
    );
    let popped = clients[4].read().await;
    assert_eq!(texts(&popped), ["lane:queue", "job"]);
    assert_eq!(
        metric(&proxy.scrape().await, "redcloak_client_pins_total"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_is_answered_on_a_lane_of_its_protocol_and_replayed_when_pinned() {
    let redis = TestRedis::start().await;
    let config = redis.config().upstream("lanes", "1").tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let mut admin = redis.admin().await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"HSET", b"lane:h", b"f", b"v"]).await, b":1\r\n");
    let hello = c.call(&[b"HELLO", b"3", b"SETNAME", b"resp3-app"]).await;
    assert!(hello.starts_with(b"%7\r\n"), "{hello:?}");
    let fields = texts(&hello);
    let field = |name: &str| {
        let at = fields.iter().position(|f| f == name).expect(name);
        fields[at + 1].clone()
    };
    assert_eq!(field("proto"), "3");
    assert_eq!(field("server"), "redis");
    assert_ne!(field("id"), "0");
    // RESP3 from here on: a map for HGETALL, a null for a missing key.
    assert_reply(
        &c.call(&[b"HGETALL", b"lane:h"]).await,
        b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n",
    );
    assert_reply(&c.call(&[b"GET", b"lane:none"]).await, b"_\r\n");
    assert_reply(
        &c.call(&[b"CLIENT", b"GETNAME"]).await,
        b"$9\r\nresp3-app\r\n",
    );
    // Back to RESP2, on the RESP2 lane.
    let hello = c.call(&[b"HELLO", b"2"]).await;
    assert!(hello.starts_with(b"*14\r\n"), "{hello:?}");
    assert_reply(&c.call(&[b"GET", b"lane:none"]).await, b"$-1\r\n");
    // The RESP3 and RESP2 lanes, each with its bulk lane: HGETALL went on
    // the RESP3 bulk lane, and the client's next batches followed it.
    assert_eq!(redcloak_connections(&mut admin).await.len(), 4);
    // HELLO 3, then a subscription: pinned, in RESP3, with its name.
    c.call(&[b"HELLO", b"3"]).await;
    let confirmed = c.call(&[b"SUBSCRIBE", b"plain:news"]).await;
    assert!(confirmed.starts_with(b">3\r\n"), "{confirmed:?}");
    let list = admin
        .call(&[&b"CLIENT"[..], b"LIST", b"TYPE", b"pubsub"])
        .await;
    let pinned = texts(&list).concat();
    let pinned: Vec<&str> = pinned.lines().collect();
    assert!(
        pinned
            .iter()
            .any(|line| line.contains(" name=resp3-app ") && line.ends_with(" resp=3")),
        "{pinned:?}"
    );
    let mut publisher = proxy.raw().await;
    publisher.call(&[b"PUBLISH", b"plain:news", b"hi"]).await;
    let message = c.read().await;
    assert_eq!(texts(&message), ["message", "plain:news", "hi"]);
    let metrics = proxy.scrape().await;
    assert_eq!(metric(&metrics, "redcloak_client_pins_total"), Some(1.0));
    // HELLO 4 is Redis's to refuse, from the client's own connection.
    let mut other = proxy.raw().await;
    assert_error(&other.call(&[b"HELLO", b"4"]).await, "-NOPROTO");
}

/// A small deterministic generator (no shared randomness between clients).
struct Dice(u64);

impl Dice {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[derive(Default)]
struct Tally {
    values: AtomicUsize,
    errors: AtomicUsize,
    foreign: AtomicUsize,
    garbage: AtomicUsize,
}

/// One client: pipelines of SET and GET on its own keys, values carrying its
/// id; now and then it leaves mid-pipeline, reads slowly, or writes a large
/// value. A lost lane answers its requests with errors and closes it; it
/// connects again.
async fn chaos_client(
    proxy_address: std::net::SocketAddr,
    id: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (id + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mine = format!("client-{id}:");
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(proxy_address).await else {
            continue;
        };
        let mut c = RawClient::new(stream);
        'connection: while !stop.load(Ordering::Relaxed) {
            round += 1;
            let depth = 1 + dice.next(32) as usize;
            let mut pipeline = bytes::BytesMut::new();
            let mut expect_value = Vec::new();
            for j in 0..depth {
                let key = format!("chaos:{id}:{}", j % 4);
                let mut value = format!("{mine}{round}:{j}:").into_bytes();
                // A few clients write a large value now and then.
                if id.is_multiple_of(67) && dice.next(8) == 0 {
                    value.resize((1 + dice.next(8) as usize) << 20, b'x');
                }
                if dice.next(2) == 0 {
                    redcloak::resp::encode_command(
                        &mut pipeline,
                        &[b"SET", key.as_bytes(), &value],
                    );
                    expect_value.push(false);
                } else {
                    redcloak::resp::encode_command(&mut pipeline, &[b"GET", key.as_bytes()]);
                    expect_value.push(true);
                }
            }
            if c.stream.write_all(&pipeline).await.is_err() {
                break 'connection;
            }
            // Leaves mid-pipeline: what it asked is read and dropped by redcloak.
            if dice.next(10) == 0 {
                break 'connection;
            }
            if id.is_multiple_of(40) {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            for wants_value in expect_value {
                let Some(reply) = c.read_or_eof().await else {
                    break 'connection;
                };
                match reply.first() {
                    Some(b'-') => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        let text = String::from_utf8_lossy(&reply).into_owned();
                        if !text.starts_with("-ERR redcloak: upstream") {
                            tally.garbage.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(b'$') if wants_value && &reply[..] == b"$-1\r\n" => {}
                    Some(b'$') if wants_value => {
                        tally.values.fetch_add(1, Ordering::Relaxed);
                        let body = texts(&reply).concat();
                        if !body.starts_with(&mine) {
                            tally.foreign.fetch_add(1, Ordering::Relaxed);
                            eprintln!("client {id} got {:?}", &body[..body.len().min(40)]);
                        }
                    }
                    Some(b'+') if !wants_value && &reply[..] == b"+OK\r\n" => {}
                    _ => {
                        tally.garbage.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "client {id}: unexpected {:?}",
                            &reply[..reply.len().min(40)]
                        );
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_chaos_no_client_ever_receives_another_clients_value() {
    let _heavy = heavy().await;
    let redis = TestRedis::start().await;
    let config = redis.config().upstream("lanes", "1").tail(&format!(
        "{METRICS}[limits]\nclient_write_timeout = \"2s\"\n"
    ));
    let proxy = redis.start_proxy(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..200)
        .map(|id| tokio::spawn(chaos_client(proxy.addr(), id, stop.clone(), tally.clone())))
        .collect();
    let mut admin = redis.admin().await;
    let mut kills = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        // Only when every connection redcloak has is an open lane (the
        // regular one, and the bulk one the large values ride), so each
        // connection killed poisons exactly one lane.
        until("only open lanes", || async {
            let open = metric(&proxy.scrape().await, "redcloak_upstream_lanes_open")?;
            let connections = redcloak_connections(&mut redis.admin().await).await.len();
            (open >= 1.0 && open as usize == connections).then_some(())
        })
        .await;
        let killed = admin
            .call(&[b"CLIENT", b"KILL", b"USER", REDIS_USER.as_bytes()])
            .await;
        let killed = std::str::from_utf8(&killed[1..killed.len() - 2])
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
            .expect("a count");
        assert!((1..=2).contains(&killed), "{killed}");
        kills += killed;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("client finishes")
            .expect("client task");
    }
    let values = tally.values.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    assert_eq!(
        tally.foreign.load(Ordering::Relaxed),
        0,
        "a value reached another client"
    );
    assert_eq!(
        tally.garbage.load(Ordering::Relaxed),
        0,
        "a reply that fits no request"
    );
    eprintln!("chaos: {values} values, {errors} errors, {kills} kills");
    assert!(values > 1000, "values {values}, errors {errors}");
    assert!(errors > 0, "the kills were felt: {errors}");
    let metrics = proxy.scrape().await;
    let poisoned = |reason: &str| {
        metric(
            &metrics,
            &format!("redcloak_upstream_lanes_poisoned_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(poisoned("connection_lost"), f64::from(kills));
    for reason in [
        "nothing_in_flight",
        "push",
        "parse_error",
        "contradiction",
        "value_mismatch",
        "timeout",
    ] {
        assert_eq!(poisoned(reason), 0.0, "{reason}");
    }
    // And afterwards a new client is served.
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"PING"]).await, b"+PONG\r\n");
}

/// Transactions pin their clients to pool connections, which stay theirs:
/// 2,000 MULTI/EXEC from a handful of clients open no new upstream TLS
/// connection once those are pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_open_no_new_upstream_connections() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .upstream("lanes", "1")
        .upstream("pool_idle", "16")
        .tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = proxy.raw().await;
        assert_reply(&c.call(&[b"MULTI"]).await, b"+OK\r\n");
        assert_reply(&c.call(&[b"DISCARD"]).await, b"+OK\r\n");
        clients.push(c);
    }
    let opened = || async {
        metric(&proxy.scrape().await, "redcloak_upstream_connections_total").unwrap_or(-1.0)
    };
    // The pool refills what the pins took, then holds still.
    let settled = until("the pool settles", || async {
        let before = opened().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        (opened().await == before).then_some(before)
    })
    .await;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let key = format!("plain:tx:{i}");
                for _ in 0..250 {
                    let mut pipeline = bytes::BytesMut::new();
                    for args in [&[&b"MULTI"[..]][..], &[b"INCR", key.as_bytes()], &[b"EXEC"]] {
                        redcloak::resp::encode_command(&mut pipeline, args);
                    }
                    c.send_raw(&pipeline).await;
                    assert_reply(&c.read().await, b"+OK\r\n");
                    assert_reply(&c.read().await, b"+QUEUED\r\n");
                    assert!(c.read().await.starts_with(b"*1\r\n:"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("transactions");
    }
    assert_eq!(opened().await, settled, "no upstream connection opened");
    assert_eq!(
        metric(&proxy.scrape().await, "redcloak_client_pins_total"),
        Some(8.0)
    );
}

/// A client pinned by a transaction goes back to the lanes once it is over
/// and the client has been quiet for `release_idle_after`; one still
/// watching keys keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinned_by_a_transaction_returns_to_the_lane_when_it_is_over() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .upstream("lanes", "1")
        .upstream("release_idle_after", "\"300ms\"")
        .tail(METRICS);
    let proxy = redis.start_proxy(&config).await;
    let mut admin = redis.admin().await;
    let mut done = proxy.raw().await;
    let mut watching = proxy.raw().await;
    for c in [&mut done, &mut watching] {
        assert_reply(&c.call(&[b"SET", b"plain:n", b"1"]).await, b"+OK\r\n");
    }
    assert_eq!(redcloak_connections(&mut admin).await.len(), 1);
    assert_reply(&done.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&done.call(&[b"INCR", b"plain:n"]).await, b"+QUEUED\r\n");
    assert_reply(&done.call(&[b"EXEC"]).await, b"*1\r\n:2\r\n");
    assert_reply(&watching.call(&[b"WATCH", b"plain:n"]).await, b"+OK\r\n");
    assert_eq!(redcloak_connections(&mut admin).await.len(), 3);
    // Quiet past release_idle_after: the finished transaction's connection
    // goes back (and, with no pool here, is closed); the watcher's stays.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while redcloak_connections(&mut admin).await.len() != 2 {
        assert!(std::time::Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(redcloak_connections(&mut admin).await.len(), 2);
    // Both go on: one from the lane, one from its own connection.
    assert_reply(&done.call(&[b"GET", b"plain:n"]).await, b"$1\r\n2\r\n");
    assert_reply(&watching.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&watching.call(&[b"EXEC"]).await, b"*0\r\n");
    let metrics = proxy.scrape().await;
    assert_eq!(metric(&metrics, "redcloak_client_pins_total"), Some(2.0));
    assert_eq!(redcloak_connections(&mut admin).await.len(), 2);
}

/// A value sealed for another key (copied there behind redcloak's back, as
/// a reply handed to the wrong request would look) reaches its client as an
/// error, and the lane it came from is poisoned: the key binding is the
/// second detector of a lane out of step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_bound_to_another_key_poisons_its_lane() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config().tail(METRICS)).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"mine", b"one"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"SET", b"theirs", b"two"]).await, b"+OK\r\n");
    let mut admin = redis.admin().await;
    assert_reply(
        &admin
            .call(&[&b"COPY"[..], b"theirs", b"mine", b"REPLACE"])
            .await,
        b":1\r\n",
    );
    let before = redcloak_connections(&mut admin).await;
    assert_eq!(before.len(), 1, "one lane: {before:?}");
    assert_error(
        &c.call(&[b"GET", b"mine"]).await,
        "-ERR redcloak: value of key 'mine' failed to decrypt (authentication failed",
    );
    let poisoned = |metrics: &str| {
        metric(
            metrics,
            "redcloak_upstream_lanes_poisoned_total{reason=\"value_mismatch\"}",
        )
    };
    assert_eq!(poisoned(&proxy.scrape().await), Some(1.0));
    // The client had nothing more in flight: it moves to a fresh lane.
    assert_reply(&c.call(&[b"GET", b"theirs"]).await, b"$3\r\ntwo\r\n");
    let after = redcloak_connections(&mut admin).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(before, after, "the poisoned lane was closed");
    // A value that is merely not an envelope is an error, and no sign of a
    // lane out of step.
    assert_reply(
        &admin.call(&[&b"SET"[..], b"plain", b"text"]).await,
        b"+OK\r\n",
    );
    assert_error(
        &c.call(&[b"GET", b"plain"]).await,
        "-ERR redcloak: value of key 'plain'",
    );
    assert_eq!(poisoned(&proxy.scrape().await), Some(1.0));
}

/// The last command each of redcloak's connections to Redis ran, by
/// Redis's connection id.
async fn last_commands(admin: &mut RawClient<UpstreamStream>) -> Vec<(String, String)> {
    redcloak_connections(admin)
        .await
        .iter()
        .map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap_or_default()
                    .to_owned()
            };
            (field("id="), field("cmd="))
        })
        .collect()
}

/// Replies that grow with the data (HGETALL and the like), and a client's
/// requests after it got a large reply, go on a bulk lane of their own, so
/// 64-byte replies on the regular lane never wait behind them; after
/// BULK_BATCHES (8) batches with neither, the client is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_replies_ride_a_bulk_lane_of_their_own() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .upstream("lanes", "1")
        .upstream("pool_idle", "0");
    let proxy = redis.start_proxy(&config).await;
    let mut admin = redis.admin().await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"HSET", b"h", b"f", b"v"]).await, b":1\r\n");
    let lanes = last_commands(&mut admin).await;
    assert_eq!(lanes.len(), 1, "{lanes:?}");
    let regular = lanes[0].0.clone();
    let reply = c.call(&[b"HGETALL", b"h"]).await;
    assert_reply(&reply, b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
    let lanes = last_commands(&mut admin).await;
    assert_eq!(lanes.len(), 2, "a bulk lane opened: {lanes:?}");
    let last = |lanes: &[(String, String)], id: &str| {
        lanes
            .iter()
            .find(|(lane, _)| lane == id)
            .map(|(_, cmd)| cmd.clone())
            .unwrap_or_default()
    };
    let bulk = lanes
        .iter()
        .find(|(id, _)| *id != regular)
        .expect("bulk")
        .0
        .clone();
    assert_eq!(last(&lanes, &bulk), "hgetall");
    assert_eq!(last(&lanes, &regular), "hset");

    // Another client: a large value is read on the regular lane (nothing
    // says beforehand that it is large); what the client sends next goes on
    // the bulk lane: its next 8 batches, none with a large reply.
    let mut d = proxy.raw().await;
    let large = vec![b'x'; 100 * 1024];
    assert_reply(&d.call(&[b"SET", b"large", &large]).await, b"+OK\r\n");
    let got = d.call(&[b"GET", b"large"]).await;
    assert_eq!(got.len(), large.len() + 11, "the whole value came back");
    assert_eq!(last(&last_commands(&mut admin).await, &regular), "get");
    for round in 1..=8 {
        assert_reply(&d.call(&[b"EXISTS", b"large"]).await, b":1\r\n");
        let lanes = last_commands(&mut admin).await;
        assert_eq!(last(&lanes, &bulk), "exists", "round {round}: {lanes:?}");
        assert_eq!(last(&lanes, &regular), "get", "round {round}: {lanes:?}");
    }
    assert_reply(&d.call(&[b"TTL", b"large"]).await, b":-1\r\n");
    let lanes = last_commands(&mut admin).await;
    assert_eq!(last(&lanes, &regular), "ttl", "{lanes:?}");
    assert_eq!(last(&lanes, &bulk), "exists", "{lanes:?}");
}
