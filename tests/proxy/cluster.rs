//! Redis Cluster: a real 6-node TLS cluster (3 primaries, 3 replicas,
//! `tls-cluster yes`, `tls-replication yes`, an ACL user on every node,
//! default user off) from the Debian redis-server package, made with
//! `redis-cli --tls --cluster create`. What is checked against it so far:
//! redcloak's slot of a key is Redis's (`CLUSTER KEYSLOT`), and its slot
//! map from `CLUSTER SHARDS` (RESP2 and RESP3) sends each key to the
//! primary that holds it, whose `CLUSTER MYID` is the id the map names.

use crate::support::*;
use redcloak::cluster::{map, slot};
use redcloak::dev::{Authority, ChildRedis, DevCerts, RedisOptions, Usage};
use redcloak::upstream::{Login, Upstream, UpstreamSettings, UpstreamStream};
use std::sync::Arc;
use std::time::Duration;

/// A TLS Redis Cluster of 3 primaries with one replica each.
pub struct TestCluster {
    /// Killed before their folder goes.
    pub nodes: Vec<ChildRedis>,
    pub certs: DevCerts,
    /// The CA every node's and redcloak's certificate comes from.
    pub ca: Authority,
    pub password: String,
    dir: tempfile::TempDir,
}

impl TestCluster {
    pub async fn start() -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::new("cluster test CA").expect("CA");
        let certs = DevCerts::in_dir(dir.path());
        std::fs::write(&certs.ca, ca.cert_pem()).expect("CA file");
        for (usage, hosts, cert, key) in [
            (
                Usage::Server,
                &["localhost", "127.0.0.1"][..],
                &certs.redis_cert,
                &certs.redis_key,
            ),
            (
                Usage::Client,
                &[][..],
                &certs.client_cert,
                &certs.client_key,
            ),
        ] {
            let issued = ca.issue("redis", hosts, usage).expect("certificate");
            std::fs::write(cert, &issued.cert_pem).expect("cert");
            redcloak::dev::write_file(key, issued.key_pem.as_bytes(), 0o600).expect("key");
        }
        let password = redcloak::dev::random_password().expect("password");
        let mut nodes = Vec::new();
        for n in 0..6 {
            let node_dir = dir.path().join(format!("node-{n}"));
            std::fs::create_dir(&node_dir).expect("node dir");
            let options = RedisOptions {
                username: REDIS_USER.into(),
                password: password.clone(),
                acl: LEAST_PRIVILEGE.into(),
                default_user_off: true,
                tls_auth_clients: "yes",
                extra: vec![
                    format!("user {ADMIN_USER} on >{password} ~* &* +@all"),
                    "cluster-enabled yes".into(),
                    "cluster-config-file nodes.conf".into(),
                    "cluster-node-timeout 2000".into(),
                    format!("cluster-port {}", free_port()),
                    "tls-cluster yes".into(),
                    "tls-replication yes".into(),
                    format!("tls-client-cert-file {}", certs.client_cert.display()),
                    format!("tls-client-key-file {}", certs.client_key.display()),
                    format!("masteruser {ADMIN_USER}"),
                    format!("masterauth {password}"),
                    // Replicas sync at once (not 5 s later), so one is ready
                    // to take over as soon as the cluster is.
                    "repl-diskless-sync-delay 0".into(),
                ],
            };
            let node = ChildRedis::start(&node_dir, &certs, &options)
                .await
                .expect("a cluster node starts");
            nodes.push(node);
        }
        let cluster = TestCluster {
            nodes,
            certs,
            ca,
            password,
            dir,
        };
        let mut args = cluster.cli_args();
        args.extend(["--cluster".into(), "create".into()]);
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port())),
        );
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let created = tokio::process::Command::new("redis-cli")
            .args(&args)
            .output()
            .await
            .expect("redis-cli runs");
        assert!(created.status.success(), "cluster create: {created:?}");
        // Every node sees the cluster ok, with 3 primaries and 3 replicas
        // (replicas are told whom to follow after the slots are assigned),
        // each replica in sync with its primary.
        for index in 0..cluster.nodes.len() {
            eventually("the cluster is ok on every node", || async {
                let mut node = cluster.admin(index).await;
                let info = node.call(&[b"CLUSTER", b"INFO"]).await;
                let nodes = node.call(&[b"CLUSTER", b"NODES"]).await;
                let nodes = String::from_utf8_lossy(&nodes);
                let count = |flag: &str| {
                    nodes
                        .lines()
                        .filter(|line| line.split(' ').nth(2).is_some_and(|f| f.contains(flag)))
                        .count()
                };
                let replication = node.call(&[b"INFO", b"replication"]).await;
                let replication = String::from_utf8_lossy(&replication);
                // A replica that never synced would not be promoted.
                let synced = replication.contains("role:master")
                    || replication.contains("master_link_status:up");
                // CLUSTER SHARDS may list a replica a moment after CLUSTER
                // NODES does: the map redcloak reads must show all six.
                let shards = node.call(&[b"CLUSTER", b"SHARDS"]).await;
                let mapped = map::parse_shards(&bytes::Bytes::from(shards.to_vec()))
                    .map(|map| map.nodes().count())
                    .unwrap_or(0);
                String::from_utf8_lossy(&info).contains("cluster_state:ok")
                    && count("master") == 3
                    && count("slave") == 3
                    && mapped == 6
                    && synced
            })
            .await;
        }
        cluster
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// redis-cli's TLS and login arguments.
    fn cli_args(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--cacert".into(),
            self.certs.ca.display().to_string(),
            "--cert".into(),
            self.certs.client_cert.display().to_string(),
            "--key".into(),
            self.certs.client_key.display().to_string(),
            "--user".into(),
            ADMIN_USER.into(),
            "--pass".into(),
            self.password.clone(),
            "--no-auth-warning".into(),
        ]
    }

    /// An upstream to the node at `address` as `user` (empty: the
    /// address comes later, from the slot map).
    fn upstream(&self, address: String, user: &str) -> Upstream {
        let tls = redcloak::tls::client::config(
            &self.certs.ca,
            &self.certs.client_cert,
            &self.certs.client_key,
        )
        .expect("client tls");
        let login = Login {
            username: Some(user.into()),
            password: redcloak::secret::Secret::new(self.password.clone().into_bytes()),
        };
        let settings = UpstreamSettings {
            address,
            server_name: "localhost".into(),
            connect_timeout: Duration::from_secs(5),
        };
        Upstream::new(settings, tls, Arc::new(login)).expect("upstream")
    }

    /// A connection to the node on `port` as `user`.
    async fn connect(&self, port: u16, user: &str) -> RawClient<UpstreamStream> {
        let upstream = self.upstream(format!("127.0.0.1:{port}"), user);
        RawClient::new(upstream.connect().await.expect("node connection"))
    }

    pub async fn admin(&self, index: usize) -> RawClient<UpstreamStream> {
        self.connect(self.nodes[index].port(), ADMIN_USER).await
    }

    /// Which of `nodes` listens on `port`.
    fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .expect("a node of this cluster")
    }

    /// Changes redcloak's ACL user on every node by `rule`.
    async fn acl_everywhere(&self, rule: &[u8]) {
        for index in 0..self.nodes.len() {
            let mut admin = self.admin(index).await;
            let set = admin
                .call(&[b"ACL", b"SETUSER", REDIS_USER.as_bytes(), rule])
                .await;
            assert_reply(&set, b"+OK\r\n");
        }
    }

    /// A connection as redcloak's own least-privilege user.
    pub async fn as_redcloak(&self, port: u16) -> RawClient<UpstreamStream> {
        self.connect(port, REDIS_USER).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_and_the_slot_map_agree_with_a_real_cluster() {
    let _heavy = heavy().await;
    let cluster = TestCluster::start().await;
    let mut node = cluster.as_redcloak(cluster.nodes[0].port()).await;

    // The slot of a key, hashtags and binary keys included.
    let mut keys: Vec<Vec<u8>> = (0..300).map(|i| format!("key:{i}").into_bytes()).collect();
    keys.extend(
        [
            &b"{user1000}.following"[..],
            b"foo{}{bar}",
            b"foo{{bar}}zap",
            b"foo{bar}{zap}",
            b"{",
            b"}{",
            b"",
            b"\x00\xff{\x01}",
        ]
        .map(|k| k.to_vec()),
    );
    for key in &keys {
        let reply = node.call(&[b"CLUSTER", b"KEYSLOT", key]).await;
        let expected = format!(":{}\r\n", slot::slot(key));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            expected,
            "{:?}",
            String::from_utf8_lossy(key)
        );
    }

    // The slot map, read as redcloak's user, over RESP2 and RESP3.
    let shards = node.call(&[b"CLUSTER", b"SHARDS"]).await;
    let map = map::parse_shards(&bytes::Bytes::from(shards.to_vec())).expect("a slot map");
    assert_eq!(map.shards.len(), 3, "{map:?}");
    assert_eq!(map.uncovered(), 0, "every slot has a primary");
    assert_eq!(map.nodes().count(), 6);
    let hello = node.call(&[b"HELLO", b"3"]).await;
    assert!(hello.starts_with(b"%"), "{hello:?}");
    let shards3 = node.call(&[b"CLUSTER", b"SHARDS"]).await;
    let map3 = map::parse_shards(&bytes::Bytes::from(shards3.to_vec())).expect("RESP3");
    for slot in [0, 5000, 16383] {
        assert_eq!(map.primary(slot), map3.primary(slot));
    }
    // CLUSTER SLOTS (the fallback) describes the same map, in RESP3 and RESP2.
    let slots3 = node.call(&[b"CLUSTER", b"SLOTS"]).await;
    assert_reply(&node.call(&[b"HELLO", b"2"]).await[..1], b"*");
    let slots2 = node.call(&[b"CLUSTER", b"SLOTS"]).await;
    for reply in [slots2, slots3] {
        let from_slots = map::parse_slots(&bytes::Bytes::from(reply.to_vec())).expect("SLOTS");
        // Redis 7.0 leaves the replicas of a TLS cluster out of CLUSTER
        // SLOTS; the primaries are what routing needs.
        assert_eq!(from_slots.nodes().filter(|n| n.primary).count(), 3);
        assert_eq!(from_slots.uncovered(), 0);
        for slot in (0..slot::SLOTS).step_by(97) {
            let (a, b) = (
                map.primary(slot).expect("a"),
                from_slots.primary(slot).expect("b"),
            );
            assert_eq!(
                (&a.id, &a.host, a.port),
                (&b.id, &b.host, b.port),
                "slot {slot}"
            );
        }
    }
    // Where CLUSTER SHARDS is refused, discovery reads CLUSTER SLOTS.
    cluster.acl_everywhere(b"-cluster|shards").await;
    let seeds = vec![format!("127.0.0.1:{}", cluster.nodes[0].port())];
    let naming = redcloak::cluster::topology::Naming::Configured("localhost".into());
    let discovered = redcloak::cluster::topology::discover(
        &cluster.upstream(String::new(), REDIS_USER),
        &seeds,
        &naming,
        Duration::from_secs(5),
    )
    .await
    .expect("discovered through CLUSTER SLOTS");
    assert_eq!(discovered.uncovered(), 0);
    assert_eq!(
        discovered.primary(0).map(|p| &p.id),
        map.primary(0).map(|p| &p.id)
    );
    cluster.acl_everywhere(b"+cluster|shards").await;

    // Each key goes to the primary that holds it (no MOVED), and each
    // node answers CLUSTER MYID with the id the map names.
    let mut admin_by_port = std::collections::BTreeMap::new();
    for primary in map.nodes() {
        let mut conn = cluster.as_redcloak(primary.port).await;
        let myid = conn.call(&[b"CLUSTER", b"MYID"]).await;
        assert_eq!(
            redcloak::resp::bulk_body(&myid),
            Some(primary.id.as_bytes()),
            "node {}",
            primary.port
        );
        admin_by_port.insert(primary.port, conn);
    }
    for key in keys.iter().take(300) {
        let primary = map.primary(slot::slot(key)).expect("served");
        let conn = admin_by_port.get_mut(&primary.port).expect("a connection");
        let reply = conn.call(&[b"SET", key, b"v"]).await;
        assert_eq!(
            reply,
            b"+OK\r\n"[..],
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    // A key sent to the wrong primary is redirected, and the redirect
    // parses to the primary the map names.
    let key = b"key:1";
    let owner = map.primary(slot::slot(key)).expect("served").port;
    let other = another_primary(&map, owner).port;
    let reply = admin_by_port
        .get_mut(&other)
        .expect("a connection")
        .call(&[b"GET", key])
        .await;
    let (kind, moved_slot, _, port) = map::redirect(&reply).expect("a MOVED");
    assert_eq!(
        (kind, moved_slot, port),
        (map::Redirect::Moved, slot::slot(key), owner)
    );
}

/// Discovery skips a seed that does not answer; every node is proved (TLS
/// name, AUTH as redcloak's user, CLUSTER MYID). A node whose certificate
/// shows another name, and a map naming another id for a known address,
/// are each refused, naming the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_is_proved_and_impostors_are_refused() {
    let _heavy = heavy().await;
    use redcloak::cluster::topology::{self, Naming};
    let cluster = TestCluster::start().await;
    let upstream = cluster_upstream(&cluster);
    let naming = Naming::Configured("localhost".into());
    let timeout = Duration::from_secs(5);
    let seeds = vec![
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", cluster.nodes[1].port()),
    ];
    let map = topology::discover(&upstream, &seeds, &naming, timeout)
        .await
        .expect("the second seed answers");
    assert_eq!(map.uncovered(), 0);
    let checks = topology::verify_nodes(&upstream, &map, &naming, timeout).await;
    assert_eq!(checks.len(), 6);
    for check in &checks {
        assert!(check.outcome.is_ok(), "{check:?}");
    }

    // A node with a certificate for another name.
    let imposter = cluster
        .ca
        .issue("redis", &["imposter.example"], Usage::Server)
        .expect("certificate");
    let cert = cluster.path("imposter.crt");
    let key = cluster.path("imposter.key");
    std::fs::write(&cert, &imposter.cert_pem).expect("cert");
    redcloak::dev::write_file(&key, imposter.key_pem.as_bytes(), 0o600).expect("key");
    let victim = cluster.nodes[2].port();
    let mut admin = cluster.admin(2).await;
    redis_presents(&mut admin, &cert, &key).await;
    let checks = topology::verify_nodes(&upstream, &map, &naming, timeout).await;
    for check in &checks {
        if check.node.port == victim {
            let why = check.outcome.as_ref().expect_err("refused");
            assert!(why.contains("TLS") || why.contains("certificate"), "{why}");
        } else {
            assert!(check.outcome.is_ok(), "{check:?}");
        }
    }

    // A map naming another node id for a known address.
    let mut shards = map.shards.clone();
    let target = shards
        .iter_mut()
        .filter_map(|shard| shard.primary.as_mut())
        .find(|primary| primary.port != victim)
        .expect("a primary with its own certificate");
    let moved_port = target.port;
    target.id = "f".repeat(40);
    let forged = redcloak::cluster::map::SlotMap::new(shards);
    let checks = topology::verify_nodes(&upstream, &forged, &naming, timeout).await;
    let refused = checks
        .iter()
        .find(|c| c.node.port == moved_port)
        .expect("the node");
    let why = refused.outcome.as_ref().expect_err("refused");
    assert!(why.contains("another node behind a known address"), "{why}");

    // While serving too: before the router sends anything to a node, the
    // node proves the id the map names (no waiting for a failover here).
    use redcloak::cluster::router::{Router, Topology};
    let topology = Topology::start(
        cluster_upstream(&cluster),
        vec![format!("127.0.0.1:{}", cluster.nodes[0].port())],
        naming.clone(),
        timeout,
        Duration::ZERO,
        None,
    )
    .await
    .expect("topology");
    topology.replace_map(forged.clone());
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| forged.primary(slot::slot(k.as_bytes())).map(|p| p.port) == Some(moved_port))
        .expect("a key on that node");
    let mut router = Router::new(topology, redcloak::resp::Limits::default());
    router
        .send(words(&[b"GET", key.as_bytes()]))
        .await
        .expect("sent");
    let reply = router
        .next_reply()
        .await
        .expect("a reply")
        .expect("pending");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("-CLUSTERDOWN") && text.contains("another node behind a known address"),
        "{text}"
    );
}

/// redcloak's user's upstream for the cluster (the address comes from the
/// slot map).
fn cluster_upstream(cluster: &TestCluster) -> Upstream {
    cluster.upstream(String::new(), REDIS_USER)
}

fn words(parts: &[&[u8]]) -> Vec<bytes::Bytes> {
    parts
        .iter()
        .map(|p| bytes::Bytes::copy_from_slice(p))
        .collect()
}

/// The router sends each request to its slot's primary, pipelined across
/// nodes, and hands replies back in request order; keys in two slots are
/// answered CROSSSLOT; a stale slot map is corrected by MOVED and a slot in
/// migration by ASK, neither reaching the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_keeps_order_across_nodes_and_follows_redirects() {
    let _heavy = heavy().await;
    use redcloak::cluster::router::{Router, Topology};
    use redcloak::cluster::topology::Naming;
    let cluster = TestCluster::start().await;
    let seeds = vec![format!("127.0.0.1:{}", cluster.nodes[0].port())];
    let topology = Topology::start(
        cluster_upstream(&cluster),
        seeds,
        Naming::Configured("localhost".into()),
        Duration::from_secs(5),
        Duration::from_secs(5),
        None,
    )
    .await
    .expect("topology");
    // Refreshes read the map over the connection kept from the last one
    // (the first from discovery): no new connection to any node.
    let mut admins = Vec::new();
    for index in 0..6 {
        admins.push(cluster.admin(index).await);
    }
    async fn connections_received(admins: &mut [RawClient<UpstreamStream>]) -> u64 {
        let mut total = 0;
        for admin in admins.iter_mut() {
            let info = admin.call(&[b"INFO", b"stats"]).await;
            total += String::from_utf8_lossy(&info)
                .lines()
                .find_map(|l| l.strip_prefix("total_connections_received:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .expect("a count");
        }
        total
    }
    let before = connections_received(&mut admins).await;
    for _ in 0..3 {
        tokio::time::sleep(redcloak::cluster::router::MIN_REFRESH_GAP).await;
        topology.refresh().await;
    }
    assert_eq!(connections_received(&mut admins).await, before);
    let mut router = Router::new(topology.clone(), redcloak::resp::Limits::default());

    // 2,000 keys over every node, pipelined 200 at a time, in order.
    for chunk in (0..2000).collect::<Vec<_>>().chunks(200) {
        for i in chunk {
            let key = format!("key:{i}");
            let value = format!("value {i}");
            router
                .send(words(&[b"SET", key.as_bytes(), value.as_bytes()]))
                .await
                .expect("sent");
        }
        for _ in chunk {
            let reply = router
                .next_reply()
                .await
                .expect("a reply")
                .expect("pending");
            assert_eq!(&reply[..], b"+OK\r\n");
        }
    }
    for i in (0..2000).step_by(7) {
        router
            .send(words(&[b"GET", format!("key:{i}").as_bytes()]))
            .await
            .expect("sent");
    }
    for i in (0..2000).step_by(7) {
        let reply = router
            .next_reply()
            .await
            .expect("a reply")
            .expect("pending");
        let value = format!("value {i}");
        assert_eq!(
            reply[..],
            *format!("${}\r\n{value}\r\n", value.len()).as_bytes()
        );
    }
    assert!(router.next_reply().await.expect("nothing").is_none());
    router
        .send(words(&[b"MGET", b"key:1", b"key:2"]))
        .await
        .expect("sent");
    router
        .send(words(&[b"MGET", b"{t}1", b"{t}2"]))
        .await
        .expect("sent");
    let cross = router.next_reply().await.expect("reply").expect("pending");
    assert!(cross.starts_with(b"-CROSSSLOT"), "{cross:?}");
    let same = router.next_reply().await.expect("reply").expect("pending");
    assert_eq!(&same[..], b"*2\r\n$-1\r\n$-1\r\n");

    // A stale map: key:5's slot said to be on another primary.
    let key = b"key:5";
    let slot = redcloak::cluster::slot::slot(key);
    let map = topology.map();
    let owner = map.primary(slot).expect("served").clone();
    let other = another_primary(&map, owner.port);
    topology.moved(slot, &other.host, other.port);
    let mut router = Router::new(topology.clone(), redcloak::resp::Limits::default());
    router.send(words(&[b"GET", key])).await.expect("sent");
    let reply = router.next_reply().await.expect("reply").expect("pending");
    assert_eq!(&reply[..], b"$7\r\nvalue 5\r\n");
    assert_eq!(
        topology.map().primary(slot).map(|p| p.port),
        Some(owner.port),
        "patched"
    );

    // A slot in migration from its owner to another primary: ASK.
    let key = b"migrating:1";
    let slot = redcloak::cluster::slot::slot(key);
    let map = topology.map();
    let source = map.primary(slot).expect("served").clone();
    let target = another_primary(&map, source.port);
    let slot_text = slot.to_string();
    let mut at_target = cluster.admin(cluster.index_of(target.port)).await;
    set_slot(&mut at_target, &slot_text, b"IMPORTING", &source.id).await;
    let mut at_source = cluster.admin(cluster.index_of(source.port)).await;
    set_slot(&mut at_source, &slot_text, b"MIGRATING", &target.id).await;
    router
        .send(words(&[b"SET", key, b"moved along"]))
        .await
        .expect("sent");
    router.send(words(&[b"GET", key])).await.expect("sent");
    let set = router.next_reply().await.expect("reply").expect("pending");
    assert_eq!(&set[..], b"+OK\r\n");
    let got = router.next_reply().await.expect("reply").expect("pending");
    assert_eq!(&got[..], b"$11\r\nmoved along\r\n");
    let on_target = at_target.call(&[b"ASKING"]).await;
    assert_reply(&on_target, b"+OK\r\n");
    let stored = at_target.call(&[b"GET", key]).await;
    assert_eq!(
        &stored[..],
        b"$11\r\nmoved along\r\n",
        "written on the target"
    );
    // Keys of that slot on both sides: TRYAGAIN, retried (after ASKING, as
    // the ASK said) with growing waits until the migration ends, never seen.
    let other = b"{migrating:1}absent";
    let finish = {
        let mut admins = Vec::new();
        for primary in map.nodes().filter(|n| n.primary) {
            admins.push(cluster.admin(cluster.index_of(primary.port)).await);
        }
        let slot_text = slot_text.clone();
        let owner = target.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for mut admin in admins {
                set_slot(&mut admin, &slot_text, b"NODE", &owner).await;
            }
        })
    };
    let before = std::time::Instant::now();
    router
        .send(words(&[b"MGET", key, other]))
        .await
        .expect("sent");
    let both = router.next_reply().await.expect("reply").expect("pending");
    assert_eq!(&both[..], b"*2\r\n$11\r\nmoved along\r\n$-1\r\n");
    assert!(
        before.elapsed() >= Duration::from_millis(250),
        "it waited for the migration"
    );
    finish.await.expect("migration finished");
}

impl TestCluster {
    /// A config for redcloak in front of this cluster (`upstream.cluster`
    /// with one seed), with a data key and the tests' plaintext rule.
    fn proxy_config(&self) -> ProxyConfig {
        redcloak::dev::write_file(
            &self.path("redis-password"),
            self.password.as_bytes(),
            0o600,
        )
        .expect("password file");
        let key = redcloak::crypto::keyring::generate_key();
        redcloak::dev::write_file(&self.path("key-1"), key.as_bytes(), 0o600).expect("key file");
        ProxyConfig {
            top: Vec::new(),
            listen: vec![
                r#"address = "127.0.0.1:0""#.into(),
                "max_connections = 1000".into(),
            ],
            upstream: vec![
                r#"server_name = "localhost""#.into(),
                r#"ca = "ca.crt""#.into(),
                r#"cert = "redcloak-client.crt""#.into(),
                r#"key = "redcloak-client.key""#.into(),
                format!(r#"username = "{REDIS_USER}""#),
                r#"password_file = "redis-password""#.into(),
                "pool_idle = 0".into(),
                r#"release_idle_after = "off""#.into(),
                format!(
                    "cluster = {{ seeds = [\"127.0.0.1:{}\"] }}",
                    self.nodes[0].port()
                ),
            ],
            tail: "[metrics]\naddress = \"127.0.0.1:0\"\n".into(),
            encryption: DEFAULT_ENCRYPTION.into(),
        }
    }
}

/// redcloak in front of the cluster: a real client's SETs and GETs of keys
/// across every slot come back as written, each node holds only envelopes
/// of its own keys, MGET across slots is refused with CROSSSLOT (and works
/// within one slot), and a transaction is refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redcloak_serves_a_cluster_with_every_node_holding_envelopes() {
    let _heavy = heavy().await;
    let cluster = TestCluster::start().await;
    let config = cluster.proxy_config();
    assert!(
        std::fs::read_to_string(cluster.path("redcloak-client.crt")).is_ok(),
        "the client certificate is where the config says"
    );
    let proxy = start_proxy_in(&cluster.path(""), &config).await;
    let mut client = proxy.client().await;
    use redis::AsyncCommands;
    for i in 0..500 {
        let _: () = client
            .set(format!("user:{i}"), format!("secret {i}"))
            .await
            .expect("SET through redcloak");
    }
    for i in (0..500).step_by(3) {
        let got: String = client.get(format!("user:{i}")).await.expect("GET");
        assert_eq!(got, format!("secret {i}"));
    }
    // Every node holds envelopes of its own keys only.
    let shards = cluster
        .as_redcloak(cluster.nodes[0].port())
        .await
        .call(&[b"CLUSTER", b"SHARDS"])
        .await;
    let map = map::parse_shards(&bytes::Bytes::from(shards.to_vec())).expect("map");
    for i in (0..500).step_by(50) {
        let key = format!("user:{i}");
        let owner = map.primary(slot::slot(key.as_bytes())).expect("served");
        let mut node = cluster.as_redcloak(owner.port).await;
        let stored = node.call(&[b"GET", key.as_bytes()]).await;
        let body = redcloak::resp::bulk_body(&stored).expect("stored on its primary");
        assert!(
            redcloak::crypto::envelope::key_id(body).is_ok(),
            "an envelope, not the value"
        );
        assert!(!String::from_utf8_lossy(body).contains("secret"));
    }
    let mut raw = proxy.raw().await;
    // SCAN walks every primary: each key once, the cursor ending at 0.
    let scanned = scan_all(&mut raw, b"user:*").await;
    let written: std::collections::BTreeSet<String> =
        (0..500).map(|i| format!("user:{i}")).collect();
    assert_eq!(scanned, written);
    let cross = raw.call(&[b"MGET", b"user:1", b"user:2"]).await;
    assert!(
        cross.starts_with(b"-CROSSSLOT"),
        "{:?}",
        String::from_utf8_lossy(&cross)
    );
    assert_reply(&raw.call(&[b"SET", b"{t}a", b"1"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"SET", b"{t}b", b"2"]).await, b"+OK\r\n");
    assert_reply(
        &raw.call(&[b"MGET", b"{t}a", b"{t}b"]).await,
        b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n",
    );
    // What needs every primary, or another database, is refused, saying so.
    for refused in [
        &[&b"KEYS"[..], b"*"][..],
        &[b"FLUSHALL"],
        &[b"RANDOMKEY"],
        &[b"SELECT", b"1"],
    ] {
        let reply = raw.call(refused).await;
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.starts_with("-ERR redcloak: this command needs every primary")
                || text.starts_with("-ERR SELECT is not allowed in cluster mode"),
            "{text}"
        );
    }
    assert_reply(&raw.call(&[b"SELECT", b"0"]).await, b"+OK\r\n");
    // The client sees one Redis: CLUSTER KEYSLOT hashes, the rest of
    // CLUSTER (and READONLY) is refused, saying why.
    assert_reply(
        &raw.call(&[b"CLUSTER", b"KEYSLOT", b"foo"]).await,
        b":12182\r\n",
    );
    for refused in [
        &[&b"CLUSTER"[..], b"SLOTS"][..],
        &[b"CLUSTER", b"NODES"],
        &[b"READONLY"],
    ] {
        let reply = raw.call(refused).await;
        assert!(
            reply.starts_with(b"-ERR redcloak:")
                && String::from_utf8_lossy(&reply).contains("Cluster"),
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    // Plain commands of many clients share each node's lanes: 30 clients
    // reading keys on every primary hold far fewer than 30 connections to
    // any node.
    let mut many = Vec::new();
    for _ in 0..30 {
        let mut c = proxy.raw().await;
        for i in 0..6 {
            let got = c.call(&[b"GET", format!("user:{i}").as_bytes()]).await;
            assert!(got.starts_with(b"$8\r\nsecret"), "{got:?}");
        }
        many.push(c);
    }
    for primary in map.nodes().filter(|n| n.primary) {
        let mut admin = cluster.admin(cluster.index_of(primary.port)).await;
        let list = admin.call(&[b"CLIENT", b"LIST"]).await;
        let ours = String::from_utf8_lossy(&list)
            .lines()
            .filter(|line| line.contains(&format!("user={REDIS_USER} ")))
            .count();
        assert!(
            ours < 12,
            "{ours} connections from redcloak to {}",
            primary.port
        );
    }
    drop(many);
    // A blocking command waits at its slot's primary and is woken there.
    let mut blocked = proxy.raw().await;
    blocked.send(&[b"BLPOP", b"jobs", b"10"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_reply(&raw.call(&[b"RPUSH", b"jobs", b"job-1"]).await, b":1\r\n");
    assert_reply(
        &blocked.read().await,
        b"*2\r\n$4\r\njobs\r\n$5\r\njob-1\r\n",
    );
    // With cluster.split_multikey: MGET, EXISTS, TOUCH, DEL and UNLINK
    // across slots are split per slot and merged; MSET stays CROSSSLOT.
    let split = start_proxy_in(
        &cluster.path(""),
        &config.clone().tail("[cluster]\nsplit_multikey = true"),
    )
    .await;
    let mut spread = split.raw().await;
    let owners: std::collections::BTreeSet<u16> = ["user:1", "user:2", "user:3", "{t}a"]
        .iter()
        .map(|k| slot::slot(k.as_bytes()))
        .collect();
    assert!(owners.len() >= 3, "keys in several slots");
    assert_reply(
        &spread
            .call(&[b"MGET", b"user:1", b"{t}a", b"nothing", b"user:2", b"{t}b", b"user:1"])
            .await,
        b"*6\r\n$8\r\nsecret 1\r\n$1\r\n1\r\n$-1\r\n$8\r\nsecret 2\r\n$1\r\n2\r\n$8\r\nsecret 1\r\n",
    );
    assert_reply(
        &spread
            .call(&[b"EXISTS", b"user:1", b"user:2", b"nothing", b"user:1"])
            .await,
        b":3\r\n",
    );
    assert_reply(
        &spread
            .call(&[b"TOUCH", b"user:3", b"user:4", b"nothing"])
            .await,
        b":2\r\n",
    );
    assert_reply(
        &spread
            .call(&[b"DEL", b"user:3", b"user:4", b"nothing"])
            .await,
        b":2\r\n",
    );
    assert_reply(
        &spread
            .call(&[b"UNLINK", b"user:5", b"user:6", b"user:3"])
            .await,
        b":2\r\n",
    );
    let mset = spread
        .call(&[b"MSET", b"user:5", b"a", b"user:6", b"b"])
        .await;
    assert!(mset.starts_with(b"-CROSSSLOT"), "{mset:?}");
    // Pipelined among other commands, replies stay in order.
    spread.send(&[b"GET", b"user:7"]).await;
    spread.send(&[b"MGET", b"user:7", b"user:8"]).await;
    spread.send(&[b"GET", b"user:8"]).await;
    assert_reply(&spread.read().await, b"$8\r\nsecret 7\r\n");
    assert_reply(
        &spread.read().await,
        b"*2\r\n$8\r\nsecret 7\r\n$8\r\nsecret 8\r\n",
    );
    assert_reply(&spread.read().await, b"$8\r\nsecret 8\r\n");
    drop(spread);
    drop(split);
    for i in 3..7 {
        let _: () = client
            .set(format!("user:{i}"), format!("secret {i}"))
            .await
            .expect("SET again");
    }
    // The startup checks prove every node and the slot coverage.
    let checked = std::process::Command::new(redcloak_bin())
        .args(["check", "--config"])
        .arg(cluster.path("redcloak.toml"))
        .output()
        .expect("redcloak runs");
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{report}");
    assert!(
        report.contains("ok    cluster-nodes        6 nodes reached")
            && report.contains("ok    cluster-client-cert  every node refuses")
            && report.contains("ok    cluster-coverage     all 16384 slots"),
        "{report}"
    );
    // One node that takes clients without a certificate fails the check,
    // named.
    let lax = cluster.nodes[4].port();
    let mut admin = cluster.admin(4).await;
    let set = admin
        .call(&[b"CONFIG", b"SET", b"tls-auth-clients", b"optional"])
        .await;
    assert_reply(&set, b"+OK\r\n");
    let checked = std::process::Command::new(redcloak_bin())
        .args(["check", "--config"])
        .arg(cluster.path("redcloak.toml"))
        .output()
        .expect("redcloak runs");
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(!checked.status.success(), "{report}");
    assert!(
        report.contains("FAIL  cluster-client-cert")
            && report.contains(&format!("127.0.0.1:{lax}")),
        "{report}"
    );
    let set = admin
        .call(&[b"CONFIG", b"SET", b"tls-auth-clients", b"yes"])
        .await;
    assert_reply(&set, b"+OK\r\n");
    let scraped = proxy.scrape().await;
    assert_eq!(metric(&scraped, "redcloak_cluster_nodes"), Some(6.0));
    assert_eq!(
        metric(&scraped, "redcloak_cluster_slots_uncovered"),
        Some(0.0)
    );
    // A transaction runs on its slot's primary, values sealed and opened.
    assert_reply(&raw.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"SET", b"{u}a", b"one"]).await, b"+QUEUED\r\n");
    assert_reply(&raw.call(&[b"GET", b"{u}a"]).await, b"+QUEUED\r\n");
    assert_reply(&raw.call(&[b"EXEC"]).await, b"*2\r\n+OK\r\n$3\r\none\r\n");
    // A key in another slot aborts it, as Redis would.
    assert_reply(&raw.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"SET", b"{u}a", b"two"]).await, b"+QUEUED\r\n");
    let elsewhere = raw.call(&[b"SET", b"{v}b", b"x"]).await;
    assert!(
        elsewhere.starts_with(b"-CROSSSLOT"),
        "{:?}",
        String::from_utf8_lossy(&elsewhere)
    );
    let exec = raw.call(&[b"EXEC"]).await;
    assert!(
        exec.starts_with(b"-EXECABORT"),
        "{:?}",
        String::from_utf8_lossy(&exec)
    );
    assert_reply(&raw.call(&[b"GET", b"{u}a"]).await, b"$3\r\none\r\n");
    // WATCH pins the slot; a write from elsewhere fails the EXEC.
    assert_reply(&raw.call(&[b"WATCH", b"{u}a"]).await, b"+OK\r\n");
    let mut other = proxy.raw().await;
    assert_reply(&other.call(&[b"SET", b"{u}a", b"theirs"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"SET", b"{u}a", b"mine"]).await, b"+QUEUED\r\n");
    let watched = raw.call(&[b"EXEC"]).await;
    assert!(
        &watched[..] == b"*-1\r\n" || &watched[..] == b"_\r\n",
        "{:?}",
        String::from_utf8_lossy(&watched)
    );
    assert_reply(&raw.call(&[b"GET", b"{u}a"]).await, b"$6\r\ntheirs\r\n");
    // DISCARD, and an empty transaction.
    assert_reply(&raw.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"DISCARD"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"EXEC"]).await, b"*0\r\n");
    // MULTI's +OK is Redis's: refused by Redis, it is refused to the client
    // (and the connection is not in a transaction).
    cluster.acl_everywhere(b"-multi").await;
    let refused = raw.call(&[b"MULTI"]).await;
    assert!(refused.starts_with(b"-NOPERM"), "{refused:?}");
    // Keys in two slots run one after the other, as outside a transaction.
    assert_reply(&raw.call(&[b"SET", b"{u}a", b"1"]).await, b"+OK\r\n");
    assert_reply(&raw.call(&[b"SET", b"{v}a", b"2"]).await, b"+OK\r\n");
    let exec = raw.call(&[b"EXEC"]).await;
    assert!(exec.starts_with(b"-ERR EXEC without MULTI"), "{exec:?}");
    cluster.acl_everywhere(b"+multi").await;
    // DBSIZE is the sum over the primaries.
    let mut total = 0u64;
    for primary in map.nodes().filter(|n| n.primary) {
        let reply = cluster
            .as_redcloak(primary.port)
            .await
            .call(&[b"DBSIZE"])
            .await;
        total += String::from_utf8_lossy(&reply[1..reply.len() - 2])
            .parse::<u64>()
            .expect("a number");
    }
    assert!(total > 500, "{total}");
    assert_reply(
        &raw.call(&[b"DBSIZE"]).await,
        format!(":{total}\r\n").as_bytes(),
    );
    // SCRIPT LOAD reaches every primary: EVALSHA works whichever owns the key.
    let script = b"return redis.call('GET', KEYS[1])";
    let loaded = raw.call(&[b"SCRIPT", b"LOAD", script]).await;
    let sha = redcloak::resp::bulk_body(&loaded)
        .unwrap_or_else(|| panic!("a sha: {:?}", String::from_utf8_lossy(&loaded)))
        .to_vec();
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..30 {
        let key = format!("plain:s{i}");
        owners.insert(
            map.primary(slot::slot(key.as_bytes()))
                .expect("served")
                .port,
        );
        assert_reply(&raw.call(&[b"SET", key.as_bytes(), b"v"]).await, b"+OK\r\n");
        assert_reply(
            &raw.call(&[b"EVALSHA", &sha, b"1", key.as_bytes()]).await,
            b"$1\r\nv\r\n",
        );
    }
    assert_eq!(owners.len(), 3, "keys on every primary");
    let exists = raw.call(&[b"SCRIPT", b"EXISTS", &sha]).await;
    assert!(
        String::from_utf8_lossy(&exists).contains("needs every primary"),
        "{:?}",
        String::from_utf8_lossy(&exists)
    );
}

/// One SCAN call: the next cursor and the keys.
async fn scan_step(
    client: &mut RawClient<tokio::net::TcpStream>,
    cursor: &str,
    pattern: &[u8],
) -> (String, Vec<String>) {
    let reply = client
        .call(&[
            b"SCAN",
            cursor.as_bytes(),
            b"MATCH",
            pattern,
            b"COUNT",
            b"50",
        ])
        .await;
    let (_, parts) =
        redcloak::resp::aggregate_elements(&reply, &Default::default()).expect("a SCAN reply");
    let next = redcloak::resp::bulk_body(parts[0]).expect("a cursor");
    let (_, keys) =
        redcloak::resp::aggregate_elements(parts[1], &Default::default()).expect("keys");
    (
        String::from_utf8_lossy(next).into_owned(),
        keys.iter()
            .map(|k| {
                String::from_utf8_lossy(redcloak::resp::bulk_body(k).expect("a key")).into_owned()
            })
            .collect(),
    )
}

/// Every key SCAN finds for `pattern`, from cursor 0 until 0 again.
async fn scan_all(
    client: &mut RawClient<tokio::net::TcpStream>,
    pattern: &[u8],
) -> std::collections::BTreeSet<String> {
    let mut found = std::collections::BTreeSet::new();
    let mut cursor = "0".to_string();
    loop {
        let (next, keys) = scan_step(client, &cursor, pattern).await;
        found.extend(keys);
        if next == "0" {
            return found;
        }
        cursor = next;
    }
}

/// Clients writing and reading their own keys through redcloak (each its
/// `keys` keys, `prefix:client:n`) until stopped.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<LoadResult>>,
}

/// Requests that succeeded, and (key, replies) of those that did not.
type LoadResult = (u64, Vec<(String, String)>);

impl Load {
    fn start(
        address: std::net::SocketAddr,
        clients: usize,
        prefix: &'static str,
        keys: u64,
    ) -> Load {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|id| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut c = RawClient::new(
                        tokio::net::TcpStream::connect(address)
                            .await
                            .expect("connect"),
                    );
                    let mut errors = Vec::new();
                    let mut ok = 0u64;
                    let mut round = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        round += 1;
                        let key = format!("{prefix}:{id}:{}", round % keys);
                        let value = format!("{id}-{round}");
                        let set = c.call(&[b"SET", key.as_bytes(), value.as_bytes()]).await;
                        let got = c.call(&[b"GET", key.as_bytes()]).await;
                        let expected = format!("${}\r\n{value}\r\n", value.len());
                        if &set[..] == b"+OK\r\n" && got[..] == *expected.as_bytes() {
                            ok += 1;
                        } else {
                            let text = |r: &[u8]| String::from_utf8_lossy(r).into_owned();
                            errors.push((key, format!("{} / {}", text(&set), text(&got))));
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients and sums what they saw.
    async fn stop(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0;
        let mut all_errors = Vec::new();
        for client in self.clients {
            let (ok, errors) = tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .expect("client finishes")
                .expect("client task");
            total += ok;
            all_errors.extend(errors);
        }
        (total, all_errors)
    }
}

/// `CLUSTER SETSLOT slot state node` on one node, accepted.
async fn set_slot(admin: &mut RawClient<UpstreamStream>, slot: &str, state: &[u8], node: &str) {
    let set = admin
        .call(&[
            b"CLUSTER",
            b"SETSLOT",
            slot.as_bytes(),
            state,
            node.as_bytes(),
        ])
        .await;
    assert_reply(&set, b"+OK\r\n");
}

/// A primary of `map` other than the one on `port`.
fn another_primary(map: &map::SlotMap, port: u16) -> map::Node {
    map.nodes()
        .find(|n| n.primary && n.port != port)
        .expect("another primary")
        .clone()
}

/// The slot map as node `index` sees it.
async fn map_of(cluster: &TestCluster, index: usize) -> map::SlotMap {
    let shards = cluster
        .as_redcloak(cluster.nodes[index].port())
        .await
        .call(&[b"CLUSTER", b"SHARDS"])
        .await;
    map::parse_shards(&bytes::Bytes::from(shards.to_vec())).expect("map")
}

/// A name whose slot's primary is (or is not) the node on `port`.
fn named_on(map: &map::SlotMap, prefix: &str, port: u16, on: bool) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| {
            let owner = map.primary(slot::slot(name.as_bytes())).expect("served");
            (owner.port == port) == on
        })
        .expect("a name")
}

/// Pub/sub in front of a cluster: channels and patterns on a connection of
/// their own, shard channels at their slot's primary, messages sealed in
/// Redis and opened for the subscriber; RESP2 subscribed-mode rules are
/// Redis's; shard confirmations count across nodes; after `kill -9` of the
/// nodes holding them, subscriptions are taken again elsewhere and
/// messages arrive again without the client doing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_and_sharded_pubsub_follow_the_cluster() {
    let _heavy = heavy().await;
    let mut cluster = TestCluster::start().await;
    let config = cluster
        .proxy_config()
        .tail("[cluster]\nfailover_wait = \"15s\"\n");
    let proxy = start_proxy_in(&cluster.path(""), &config).await;
    let map = map_of(&cluster, 0).await;
    let seed = cluster.nodes[0].port();
    let victim = another_primary(&map, seed);
    // Channels held on the victim, and one published elsewhere.
    let news = named_on(&map, "news:", victim.port, true);
    let elsewhere = named_on(&map, "other:", victim.port, false);
    let shard_a = named_on(&map, "orders:", victim.port, true);
    let shard_b = named_on(&map, "orders:", victim.port, false);

    let mut subscriber = proxy.raw().await;
    assert_reply(
        &subscriber.call(&[b"SUBSCRIBE", news.as_bytes()]).await,
        format!(
            "*3\r\n$9\r\nsubscribe\r\n${}\r\n{news}\r\n:1\r\n",
            news.len()
        )
        .as_bytes(),
    );
    assert_reply(
        &subscriber.call(&[b"PSUBSCRIBE", b"other:*"]).await,
        b"*3\r\n$10\r\npsubscribe\r\n$7\r\nother:*\r\n:2\r\n",
    );
    // RESP2 subscribed mode: PING in its pub/sub form, GET refused by Redis.
    assert_reply(
        &subscriber.call(&[b"PING"]).await,
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
    );
    let get = subscriber.call(&[b"GET", b"k"]).await;
    assert!(
        String::from_utf8_lossy(&get).contains("only (P|S)SUBSCRIBE"),
        "{:?}",
        String::from_utf8_lossy(&get)
    );
    // Shard channels on two nodes: counts are across both.
    for (channel, count) in [(&shard_a, 1), (&shard_b, 2)] {
        assert_reply(
            &subscriber.call(&[b"SSUBSCRIBE", channel.as_bytes()]).await,
            format!(
                "*3\r\n$10\r\nssubscribe\r\n${}\r\n{channel}\r\n:{count}\r\n",
                channel.len()
            )
            .as_bytes(),
        );
    }
    // Messages, sealed on the way (a node's own subscriber sees envelopes).
    let mut direct = cluster.as_redcloak(seed).await;
    direct.send(&[b"SUBSCRIBE", news.as_bytes()]).await;
    direct.read().await;
    let mut publisher = proxy.raw().await;
    let publish = |channel: &str, message: &str| {
        let words: Vec<Vec<u8>> = vec![b"PUBLISH".to_vec(), channel.into(), message.into()];
        words
    };
    let sent = publish(&news, "hello");
    let sent: Vec<&[u8]> = sent.iter().map(|w| &w[..]).collect();
    assert!(publisher.call(&sent).await.starts_with(b":"));
    assert_reply(
        &subscriber.read().await,
        format!(
            "*3\r\n$7\r\nmessage\r\n${}\r\n{news}\r\n$5\r\nhello\r\n",
            news.len()
        )
        .as_bytes(),
    );
    let seen = direct.read().await;
    assert!(
        !String::from_utf8_lossy(&seen).contains("hello"),
        "Redis carries the message sealed"
    );
    let check_message = |reply: &[u8], kind: &str, channel: &str, message: &str| {
        let text = String::from_utf8_lossy(reply).into_owned();
        assert!(
            text.contains(kind)
                && text.contains(channel)
                && text.ends_with(&format!("{message}\r\n")),
            "{text}"
        );
    };
    let sent = publish(&elsewhere, "patterned");
    let sent: Vec<&[u8]> = sent.iter().map(|w| &w[..]).collect();
    publisher.call(&sent).await;
    check_message(
        &subscriber.read().await,
        "pmessage",
        &elsewhere,
        "patterned",
    );
    for channel in [&shard_a, &shard_b] {
        assert_reply(
            &publisher
                .call(&[b"SPUBLISH", channel.as_bytes(), b"sharded"])
                .await,
            b":1\r\n",
        );
        check_message(&subscriber.read().await, "smessage", channel, "sharded");
    }

    // RESP3: any command between messages.
    let mut resp3 = proxy.raw_speaking(3).await;
    let confirmed = resp3.call(&[b"SSUBSCRIBE", shard_b.as_bytes()]).await;
    assert!(
        confirmed.starts_with(b">3\r\n$10\r\nssubscribe"),
        "{confirmed:?}"
    );
    assert_reply(&resp3.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    publisher
        .call(&[b"SPUBLISH", shard_b.as_bytes(), b"pushed"])
        .await;
    check_message(&resp3.read().await, "smessage", &shard_b, "pushed");
    check_message(&subscriber.read().await, "smessage", &shard_b, "pushed");
    assert_reply(&resp3.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");

    // kill -9 of the node holding `news` and `shard_a`.
    let victim_index = cluster.index_of(victim.port);
    cluster.nodes[victim_index].kill().await;
    // Channels and patterns are held elsewhere at once; a PUBLISH on a
    // live node reaches the subscriber again.
    let sent = publish(&elsewhere, "after the kill");
    let sent: Vec<&[u8]> = sent.iter().map(|w| &w[..]).collect();
    let killed_at = std::time::Instant::now();
    let again = loop {
        publisher.call(&sent).await;
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(300), subscriber.read_or_eof()).await
        {
            break read.expect("the subscriber stays connected");
        }
        assert!(
            killed_at.elapsed() < READ_TIMEOUT,
            "the pattern is never held again"
        );
    };
    check_message(&again, "pmessage", &elsewhere, "after the kill");
    // Shard channels wait for the promotion; SPUBLISH through redcloak
    // waits for it too.
    assert_reply(
        &publisher
            .call(&[b"SPUBLISH", shard_a.as_bytes(), b"promoted"])
            .await,
        b":1\r\n",
    );
    let promoted = loop {
        // Past any message a second PUBLISH above left.
        let frame = subscriber.read().await;
        if !String::from_utf8_lossy(&frame).contains("pmessage") {
            break frame;
        }
    };
    check_message(&promoted, "smessage", &shard_a, "promoted");
    // Unsubscribing from every shard channel: one confirmation each, the
    // last counting none.
    subscriber.send(&[b"SUNSUBSCRIBE"]).await;
    let mut counts = Vec::new();
    for _ in 0..2 {
        let frame = subscriber.read().await;
        let text = String::from_utf8_lossy(&frame).into_owned();
        assert!(text.contains("sunsubscribe"), "{text}");
        counts.push(
            text.trim_end()
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    counts.sort();
    assert_eq!(counts, ["0", "1"]);
    assert_reply(
        &subscriber.call(&[b"SUNSUBSCRIBE"]).await,
        b"*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n",
    );
    // RESET ends the rest: the connection is an ordinary one again.
    assert_reply(&subscriber.call(&[b"RESET"]).await, b"+RESET\r\n");
    assert_reply(&subscriber.call(&[b"SET", b"k", b"w"]).await, b"+OK\r\n");
    assert_reply(&subscriber.call(&[b"PING"]).await, b"+PONG\r\n");
}

/// `kill -9` of a primary under load through redcloak: its slots are
/// served again within a second of its replica's promotion (requests for
/// them wait, `cluster.failover_wait`); no MOVED or ASK ever reaches a
/// client, and only requests that were in flight to the dead primary get
/// an error, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_is_replaced_without_redirects_reaching_clients() {
    let _heavy = heavy().await;
    let mut cluster = TestCluster::start().await;
    let config = cluster.proxy_config();
    let proxy = start_proxy_in(&cluster.path(""), &config).await;
    let shards = cluster
        .as_redcloak(cluster.nodes[0].port())
        .await
        .call(&[b"CLUSTER", b"SHARDS"])
        .await;
    let map = map::parse_shards(&bytes::Bytes::from(shards.to_vec())).expect("map");
    let victim = another_primary(&map, cluster.nodes[0].port());
    let victim_slot = map
        .shards
        .iter()
        .find(|s| s.primary.as_ref().map(|p| &p.id) == Some(&victim.id))
        .and_then(|s| s.ranges.first())
        .expect("its slots")
        .0;
    let on_victim =
        |key: &str| map.primary(slot::slot(key.as_bytes())).map(|p| &p.id) == Some(&victim.id);
    let dead_key = (0..)
        .map(|i| format!("probe:{i}"))
        .find(|k| on_victim(k))
        .expect("a key on the victim");
    assert_eq!(map.primary(victim_slot).map(|p| p.port), Some(victim.port));
    // A SCAN paused inside the victim's shard, to go on after the failover.
    let victim_start = map
        .shards
        .iter()
        .find(|s| s.primary.as_ref().map(|p| &p.id) == Some(&victim.id))
        .and_then(|s| s.ranges.iter().map(|r| r.0).min())
        .expect("its lowest slot");
    let mut scanner = proxy.raw().await;
    let mut scanned = std::collections::BTreeSet::new();
    for i in 0..600 {
        let key = format!("scan:{i}");
        assert_reply(
            &scanner.call(&[b"SET", key.as_bytes(), b"x"]).await,
            b"+OK\r\n",
        );
    }
    let mut cursor = "0".to_string();
    loop {
        let (next, keys) = scan_step(&mut scanner, &cursor, b"scan:*").await;
        scanned.extend(keys);
        assert_ne!(next, "0", "the scan never reached the victim's shard");
        cursor = next;
        let at: u64 = cursor.parse().expect("a number");
        if at & 16383 == u64::from(victim_start) && at >> 30 != 0 {
            break;
        }
    }

    // 20 clients writing and reading their own keys until told to stop.
    let load = Load::start(proxy.addr(), 20, "load", 50);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim_index = cluster.index_of(victim.port);
    cluster.nodes[victim_index].kill().await;
    let killed_at = std::time::Instant::now();

    // The replica's promotion, as the surviving nodes see it.
    let promoted_at = until("a replica takes over the slots", || async {
        let mut survivor = cluster.as_redcloak(cluster.nodes[0].port()).await;
        let shards = survivor.call(&[b"CLUSTER", b"SHARDS"]).await;
        let map = map::parse_shards(&bytes::Bytes::from(shards.to_vec())).ok()?;
        map.primary(victim_slot)
            .filter(|p| p.port != victim.port)
            .map(|_| std::time::Instant::now())
    })
    .await;
    // Served through redcloak again.
    let mut probe = proxy.raw().await;
    let served_at = loop {
        let reply = probe.call(&[b"SET", dead_key.as_bytes(), b"back"]).await;
        if &reply[..] == b"+OK\r\n" {
            break std::time::Instant::now();
        }
        assert!(killed_at.elapsed() < READ_TIMEOUT, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The paused SCAN goes on at the promoted replica (that shard again from
    // its start) and finds every key.
    loop {
        let (next, keys) = scan_step(&mut scanner, &cursor, b"scan:*").await;
        scanned.extend(keys);
        if next == "0" {
            break;
        }
        cursor = next;
    }
    assert_eq!(scanned.len(), 600, "every key once the scan ends");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (total_ok, all_errors) = load.stop().await;
    let recovery = served_at.saturating_duration_since(promoted_at);
    eprintln!(
        "failover: promoted {:?} after the kill, served {:?} after the promotion; {total_ok} ok, {} errors",
        promoted_at - killed_at,
        recovery,
        all_errors.len()
    );
    assert!(
        recovery < Duration::from_secs(1),
        "recovered {recovery:?} after the promotion"
    );
    assert!(total_ok > 100, "the load ran");
    for (key, error) in &all_errors {
        assert!(
            !error.contains("MOVED") && !error.contains("ASK"),
            "{key}: {error}"
        );
        assert!(
            on_victim(key),
            "an error for a slot that never failed: {key}: {error}"
        );
        assert!(
            error.contains("was lost before it answered") || error.contains("CLUSTERDOWN"),
            "{key}: {error}"
        );
    }
}

/// `redis-cli --cluster reshard` of 1,000 slots under load through
/// redcloak: every request succeeds (MOVED, ASK and TRYAGAIN are followed,
/// never seen), every value reads back, and a shard channel whose slot
/// moved is subscribed again at its new primary (Redis unsubscribed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_under_load_shows_clients_no_redirect() {
    let _heavy = heavy().await;
    let cluster = TestCluster::start().await;
    let config = cluster.proxy_config();
    let proxy = start_proxy_in(&cluster.path(""), &config).await;
    let map = map_of(&cluster, 0).await;
    let primaries: Vec<&map::Node> = map.nodes().filter(|n| n.primary).collect();
    let (from, to) = (primaries[0].clone(), primaries[1].clone());
    let from_slots: Vec<u16> = (0..slot::SLOTS)
        .filter(|s| map.primary(*s).map(|p| &p.id) == Some(&from.id))
        .collect();
    // Shard channels in the first slots of the source (the ones a reshard
    // of 1,000 takes first) and near its end.
    let channel_in = |wanted: u16| {
        (0..)
            .map(|i| format!("jobs:{i}"))
            .find(|c| slot::slot(c.as_bytes()) == wanted)
            .expect("a channel in that slot")
    };
    let channels: Vec<String> = [
        from_slots[3],
        from_slots[500],
        from_slots[from_slots.len() - 3],
    ]
    .into_iter()
    .map(channel_in)
    .collect();
    let mut subscriber = proxy.raw().await;
    for channel in &channels {
        subscriber.send(&[b"SSUBSCRIBE", channel.as_bytes()]).await;
        assert!(
            subscriber
                .read()
                .await
                .starts_with(b"*3\r\n$10\r\nssubscribe")
        );
    }

    // 10 clients writing and reading keys all over the slots.
    let load = Load::start(proxy.addr(), 10, "reshard", 2000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut args = cluster.cli_args();
    args.extend([
        "--cluster".into(),
        "reshard".into(),
        format!("127.0.0.1:{}", cluster.nodes[0].port()),
        "--cluster-from".into(),
        from.id.clone(),
        "--cluster-to".into(),
        to.id.clone(),
        "--cluster-slots".into(),
        "1000".into(),
        "--cluster-yes".into(),
        "--cluster-pipeline".into(),
        "100".into(),
    ]);
    let started = std::time::Instant::now();
    let resharded = tokio::process::Command::new("redis-cli")
        .args(&args)
        .output()
        .await
        .expect("redis-cli runs");
    assert!(
        resharded.status.success(),
        "reshard: {}",
        String::from_utf8_lossy(&resharded.stdout)
    );
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (total_ok, all_errors) = load.stop().await;
    let after = map_of(&cluster, 0).await;
    let moved = from_slots
        .iter()
        .filter(|s| after.primary(**s).map(|p| &p.id) == Some(&to.id))
        .count();
    eprintln!(
        "reshard: {moved} slots moved in {took:?}; {total_ok} ok, {} errors",
        all_errors.len()
    );
    assert_eq!(moved, 1000);
    assert!(total_ok > 100, "the load ran");
    assert!(
        all_errors.is_empty(),
        "{:?}",
        &all_errors[..all_errors.len().min(5)]
    );
    // Each shard channel gets its messages, wherever its slot lives now.
    let mut publisher = proxy.raw().await;
    let moved_channels = channels
        .iter()
        .filter(|c| after.primary(slot::slot(c.as_bytes())).map(|p| &p.id) == Some(&to.id))
        .count();
    assert!(moved_channels >= 1, "a subscribed channel's slot moved");
    for channel in &channels {
        assert_reply(
            &publisher
                .call(&[b"SPUBLISH", channel.as_bytes(), b"after"])
                .await,
            b":1\r\n",
        );
        let message = subscriber.read().await;
        let text = String::from_utf8_lossy(&message);
        assert!(
            text.contains("smessage") && text.contains(channel.as_str()),
            "{text}"
        );
    }
    assert_eq!(
        metric(
            &proxy.scrape().await,
            "redcloak_cluster_redirects_total{kind=\"moved\"}"
        )
        .map(|n| n > 0.0),
        Some(true),
        "redirects were followed"
    );
}
