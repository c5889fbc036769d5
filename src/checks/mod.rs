//! The startup security checks: before `serve` accepts a client (and in
//! `redcloak check`), prove that the path to Redis, and the files and keys
//! redcloak was given, are what security needs.
//!
//! Checks observe behaviour rather than read Redis's configuration (a
//! least-privilege user cannot run CONFIG GET): a handshake without a client
//! certificate must fail, PING without AUTH must answer NOAUTH, an admin
//! command must answer NOPERM, and so on. Each check is a named line in the
//! [`Report`]; any FAIL stops `serve` with exit code 78. The profile only
//! decides between warn and FAIL for checks where that is a judgement;
//! nothing relaxes upstream TLS, certificate verification or AUTH.

pub mod report;

use crate::config::{Config, Profile};
use crate::crypto::keyring::Opened;
use crate::crypto::{Binding, Keyring};
use crate::resp::{self, Limits};
use crate::tls::{self, inspect};
use crate::upstream::{Upstream, UpstreamStream, call};
use bytes::Bytes;
use report::{Check, Report, Status, ok, problem};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;
use tokio_rustls::TlsConnector;

/// Passwords shorter than this fail, by profile.
fn min_password_len(profile: Profile) -> usize {
    match profile {
        Profile::Development => 16,
        Profile::Staging => 24,
        Profile::Production => 32,
    }
}

/// Default and example passwords that must never guard a Redis.
const KNOWN_PASSWORDS: &[&str] = &[
    "foobared",
    "password",
    "changeme",
    "change-me",
    "redis",
    "redcloak",
    "secret",
    "admin",
    "123456",
    "example-upstream-password",
    "example-client-password",
];

/// warn in development, FAIL otherwise.
fn strict(profile: Profile) -> Status {
    if profile == Profile::Development {
        Status::Warn
    } else {
        Status::Fail
    }
}

/// Runs every check against the configured upstream.
pub async fn run(config: &Config) -> Report {
    let mut checks = Vec::new();
    let mut address = config.upstream.address.clone();
    // With Sentinel, the checks below look at the primary it names.
    let mut primary = None;
    if let Some(sentinel) = &config.upstream.sentinel {
        let (row, named) = sentinel_row(config, sentinel).await;
        checks.push(row);
        if let Some(named) = &named {
            address = named.clone();
        }
        primary = named;
    }
    let keys = &config.encryption.keys;
    let keyring = keys.keyring(keys.startup_timeout(), None).await;
    if let Some(kms) = &keys.kms {
        checks.push(kms_row(kms, keyring.as_ref().err()));
    }
    let keyring = keyring.ok();
    match Upstream::from_config(&config.upstream) {
        // No primary named: the sentinel row says why.
        Ok(_) if config.upstream.sentinel.is_some() && primary.is_none() => {}
        Ok(upstream) => {
            if let Some(primary) = primary {
                upstream.retarget(primary);
            }
            upstream_checks(config, keyring.as_ref(), &upstream, &mut checks).await
        }
        Err(err) => checks.push(problem(
            "tls",
            Status::Fail,
            err.to_string(),
            "fix upstream.ca, upstream.cert and upstream.key",
        )),
    }
    if let Some(cluster) = &config.upstream.cluster {
        checks.extend(cluster_rows(config, cluster).await);
    }
    checks.push(certificate_files(config));
    checks.push(key_files(config));
    checks.push(passwords(config));
    checks.push(keyring_row(config));
    checks.push(downstream(config));
    checks.push(admin_listener(config));
    checks.push(open_files(config));
    Report::new(config.profile, address, checks)
}

/// The `sentinel` row: a majority of the Sentinels (each reached over
/// verified TLS, logged in) name one primary, and that Redis, verified
/// against `upstream.server_name`, answers ROLE as master. Returns the
/// primary's address when it passed.
async fn sentinel_row(
    config: &Config,
    sentinel: &crate::config::SentinelConfig,
) -> (Check, Option<String>) {
    use crate::sentinel::{SentinelError, Sentinels};
    let named = async {
        let sentinels = Sentinels::from_config(sentinel, config.upstream.connect_timeout)?;
        let upstream = Upstream::from_config(&config.upstream).map_err(SentinelError::from)?;
        sentinels.primary(&upstream).await
    };
    match named.await {
        Ok(agreement) => (
            ok(
                "sentinel",
                format!(
                    "{}/{} Sentinels name {} for '{}'; it answers ROLE master with a certificate for {}",
                    agreement.agreeing,
                    agreement.asked,
                    agreement.address,
                    sentinel.master_name,
                    config.upstream.server_name
                ),
            ),
            Some(agreement.address),
        ),
        Err(err) => {
            let fix = match &err {
                SentinelError::NoMajority { .. } => {
                    "list the Sentinels in upstream.sentinel.addresses (each with a certificate for upstream.sentinel.server_name and redcloak's Sentinel user: +sentinel|get-master-addr-by-name +subscribe &+switch-master) and check master_name"
                }
                SentinelError::NotConfirmed { .. } => {
                    "the primary needs a certificate for upstream.server_name from upstream.ca, and redcloak's ACL user needs +role"
                }
                SentinelError::Settings(_) => {
                    "fix upstream.sentinel's ca, cert and key (or upstream's, which it defaults to)"
                }
            };
            (
                problem("sentinel", Status::Fail, err.to_string(), fix),
                None,
            )
        }
    }
}

/// The `cluster-nodes` row (every node reachable at its announced address,
/// its certificate verified against its name, redcloak's AUTH accepted,
/// `CLUSTER MYID` as the slot map says) and the `cluster-coverage` row
/// (all 16384 slots served by an online primary).
async fn cluster_rows(config: &Config, cluster: &crate::config::ClusterConfig) -> Vec<Check> {
    use crate::cluster::topology;
    let timeout = config.upstream.connect_timeout;
    let upstream = match Upstream::from_config(&config.upstream) {
        Ok(upstream) => upstream,
        Err(err) => {
            return vec![problem(
                "cluster-nodes",
                Status::Fail,
                err.to_string(),
                "fix upstream.ca, upstream.cert and upstream.key",
            )];
        }
    };
    let map = match topology::discover(&upstream, &cluster.seeds, &cluster.naming, timeout).await {
        Ok(map) => map,
        Err(err) => {
            return vec![problem(
                "cluster-nodes",
                Status::Fail,
                err.to_string(),
                "list reachable cluster nodes in upstream.cluster.seeds; redcloak's user needs +cluster|shards",
            )];
        }
    };
    let checks = topology::verify_nodes(&upstream, &map, &cluster.naming, timeout).await;
    let failed: Vec<String> = checks
        .iter()
        .filter_map(|c| {
            let why = c.outcome.as_ref().err()?;
            Some(format!("{}:{}: {why}", c.node.host, c.node.port))
        })
        .collect();
    let nodes = if failed.is_empty() {
        ok(
            "cluster-nodes",
            format!(
                "{} nodes reached, each certificate verified, AUTH accepted, CLUSTER MYID as mapped",
                checks.len()
            ),
        )
    } else {
        problem(
            "cluster-nodes",
            Status::Fail,
            failed.join("; "),
            "every node needs a certificate for the verified name from upstream.ca, redcloak's ACL user, and the id the cluster announces",
        )
    };
    // Every node, not only the seed, refuses clients without a certificate.
    let mut open = Vec::new();
    for node in map.nodes() {
        let Ok(name) = cluster.naming.name_of(node) else {
            continue;
        };
        let Ok(reached) = upstream.node(topology::address(&node.host, node.port), &name) else {
            continue;
        };
        if let Ok(true) = accepts_without_client_cert(config, &reached).await {
            open.push(format!("{}:{}", node.host, node.port));
        }
    }
    let client_certs = if open.is_empty() {
        ok(
            "cluster-client-cert",
            "every node refuses TLS clients without a certificate",
        )
    } else {
        problem(
            "cluster-client-cert",
            strict(config.profile),
            format!(
                "accepted a TLS client without a certificate: {}",
                open.join(", ")
            ),
            "redis.conf of each: tls-auth-clients yes",
        )
    };
    let uncovered = map.uncovered();
    let coverage = if uncovered == 0 {
        ok(
            "cluster-coverage",
            "all 16384 slots served by an online primary",
        )
    } else {
        problem(
            "cluster-coverage",
            Status::Fail,
            format!("{uncovered} slots have no online primary"),
            "assign every slot (redis-cli --cluster fix) and wait for failovers to finish",
        )
    };
    vec![nodes, client_certs, coverage]
}

/// The `kms` row: every loaded key unwrapped and checked, or what failed.
fn kms_row(kms: &crate::kms::Kms, failed: Option<&crate::kms::KeysError>) -> Check {
    const NAME: &str = "kms";
    if let Some(err) = failed {
        return problem(
            NAME,
            Status::Fail,
            err.to_string(),
            "a denial or a bad check value: check the KMS token's policy and that the keyring file's \
             blobs belong to this keyring and KEK (`redcloak keys verify`); unreachable: check the \
             provider's address, CA and that it is unsealed",
        );
    }
    let loaded = kms.file.keys.iter().filter(|d| d.state.loaded()).count();
    let providers: Vec<String> = kms
        .providers
        .iter()
        .map(|(name, p)| format!("{name} ({})", p.kind()))
        .collect();
    ok(
        NAME,
        format!(
            "{loaded} data keys of keyring '{}' unwrapped by {} and their check values match",
            kms.file.name,
            providers.join(", ")
        ),
    )
}

async fn upstream_checks(
    config: &Config,
    keyring: Option<&Keyring>,
    upstream: &Upstream,
    checks: &mut Vec<Check>,
) {
    let profile = config.profile;
    match upstream.handshake().await {
        Ok(tls) => {
            checks.push(tls_version(profile, &tls, &config.upstream.server_name));
            checks.push(redis_certificate(profile, &tls));
        }
        Err(err) => {
            checks.push(problem(
                "tls",
                Status::Fail,
                err.to_string(),
                "see the hint; Redis must serve TLS with a certificate from upstream.ca",
            ));
            return;
        }
    }
    checks.push(client_certificate_required(config, upstream).await);
    checks.push(anonymous_refused(upstream).await);
    let mut session = match upstream.connect().await {
        Ok(session) => session,
        Err(err) => {
            checks.push(problem(
                "auth",
                Status::Fail,
                err.to_string(),
                "check upstream.username and the password against Redis's ACL",
            ));
            return;
        }
    };
    let timeout = config.upstream.connect_timeout;
    checks.push(whoami(config, &mut session, timeout).await);
    checks.push(least_privilege(config, &mut session, timeout).await);
    checks.push(redis_version(&mut session, timeout).await);
    match keyring {
        Some(keyring) => checks.push(round_trip(config, keyring, &mut session, timeout).await),
        None => checks.push(problem(
            "round-trip",
            Status::Fail,
            "not tried: the data keys are not available (see kms)",
            "fix the kms row first",
        )),
    }
    checks.push(plaintext_port(config).await);
}

fn tls_version(profile: Profile, tls: &UpstreamStream, server_name: &str) -> Check {
    let connection = tls.get_ref().1;
    let version = connection.protocol_version();
    let suite = connection
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let version_name = match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
        _ => "an unknown TLS version",
    };
    let detail = format!("{version_name}, {suite}, certificate verified for {server_name}");
    if profile == Profile::Production && version != Some(rustls::ProtocolVersion::TLSv1_3) {
        return problem(
            "tls",
            Status::Fail,
            format!("{detail}: production requires TLS 1.3"),
            "allow TLS 1.3 on Redis (tls-protocols \"TLSv1.2 TLSv1.3\"), or use profile = \"staging\"",
        );
    }
    ok("tls", detail)
}

fn redis_certificate(profile: Profile, tls: &UpstreamStream) -> Check {
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first().cloned());
    match der
        .and_then(|der| inspect::expiry(&der))
        .and_then(inspect::days_left)
    {
        Some(days) => expiry_check("redis-certificate", "Redis's certificate", profile, days),
        None => problem(
            "redis-certificate",
            Status::Fail,
            "cannot read Redis's certificate",
            "serve a valid X.509 certificate",
        ),
    }
}

/// Expired: FAIL; under 7 days: FAIL in production; under 30 days: warn.
fn expiry_check(name: &'static str, what: &str, profile: Profile, days: i64) -> Check {
    let renew = format!("renew {what}");
    match days {
        d if d < 0 => problem(name, Status::Fail, format!("{what} has expired"), renew),
        d if d < 7 => problem(
            name,
            strict_production(profile),
            format!("{what} expires in {d} days"),
            renew,
        ),
        d if d < 30 => problem(
            name,
            Status::Warn,
            format!("{what} expires in {d} days"),
            renew,
        ),
        d => ok(name, format!("{what} valid for {d} more days")),
    }
}

/// FAIL in production only.
fn strict_production(profile: Profile) -> Status {
    if profile == Profile::Production {
        Status::Fail
    } else {
        Status::Warn
    }
}

async fn client_certificate_required(config: &Config, upstream: &Upstream) -> Check {
    const NAME: &str = "client-cert-required";
    match accepts_without_client_cert(config, upstream).await {
        Err(err) => problem(NAME, Status::Fail, err, "fix upstream.ca"),
        Ok(false) => ok(NAME, "Redis refuses TLS clients without a certificate"),
        Ok(true) => problem(
            NAME,
            strict(config.profile),
            "Redis accepted a TLS client without a certificate",
            "redis.conf: tls-auth-clients yes",
        ),
    }
}

/// Whether the Redis `upstream` reaches serves a TLS client that shows no
/// certificate (`Err`: upstream.ca does not load).
async fn accepts_without_client_cert(config: &Config, upstream: &Upstream) -> Result<bool, String> {
    let connector = tls::client::config_without_client_cert(&config.upstream.ca)
        .map(TlsConnector::from)
        .map_err(|err| err.to_string())?;
    let Ok(mut tls) = upstream.handshake_with(&connector).await else {
        return Ok(false);
    };
    // With TLS 1.3 the refusal arrives after the handshake, on first use.
    Ok(call(&mut tls, &[b"PING"], config.upstream.connect_timeout)
        .await
        .is_ok())
}

async fn anonymous_refused(upstream: &Upstream) -> Check {
    const NAME: &str = "anonymous-refused";
    let timeout = upstream.settings().connect_timeout;
    let reply = match upstream.handshake().await {
        Ok(mut tls) => call(&mut tls, &[b"PING"], timeout).await,
        Err(err) => Err(err.to_string()),
    };
    match reply {
        Ok(reply) if reply.starts_with(b"-NOAUTH") => ok(NAME, "PING without AUTH answers NOAUTH"),
        Ok(reply) if reply.starts_with(b"+PONG") => problem(
            NAME,
            Status::Fail,
            "PING without AUTH answered PONG: Redis's default user is open to anyone who reaches it",
            "redis.conf: user default off (and an ACL user for redcloak)",
        ),
        Ok(reply) => problem(
            NAME,
            Status::Warn,
            format!("PING without AUTH answered {}", line(&reply)),
            "expected NOAUTH",
        ),
        Err(err) => problem(
            NAME,
            Status::Fail,
            format!("no answer to PING: {err}"),
            "check that Redis is reachable",
        ),
    }
}

async fn whoami(config: &Config, session: &mut UpstreamStream, timeout: Duration) -> Check {
    let expected = config.upstream.username.as_deref().unwrap_or("default");
    match call(session, &[b"ACL", b"WHOAMI"], timeout).await {
        Ok(reply) if resp::bulk_body(&reply) == Some(expected.as_bytes()) => ok(
            "auth",
            format!("AUTH succeeded; ACL WHOAMI is '{expected}'"),
        ),
        Ok(reply) => problem(
            "auth",
            Status::Fail,
            format!(
                "ACL WHOAMI answered {} instead of '{expected}'",
                line(&reply)
            ),
            "check upstream.username",
        ),
        Err(err) => problem("auth", Status::Fail, err, "check that Redis is reachable"),
    }
}

async fn least_privilege(
    config: &Config,
    session: &mut UpstreamStream,
    timeout: Duration,
) -> Check {
    const NAME: &str = "least-privilege";
    let fix = "give redcloak's Redis user no admin commands (e.g. +@all -@admin -@dangerous), \
               or set upstream.allow_admin = true";
    match call(session, &[b"ACL", b"LIST"], timeout).await {
        Ok(reply) if reply.starts_with(b"-NOPERM") => {
            ok(NAME, "admin commands are refused (ACL LIST: NOPERM)")
        }
        Ok(reply) if reply.starts_with(b"-") => problem(
            NAME,
            Status::Warn,
            format!("ACL LIST answered {}", line(&reply)),
            fix,
        ),
        Ok(_) => {
            let status = match (config.profile, config.upstream.allow_admin) {
                (Profile::Production, false) => Status::Fail,
                _ => Status::Warn,
            };
            problem(
                NAME,
                status,
                "redcloak's Redis user can run admin commands (ACL LIST succeeded)",
                fix,
            )
        }
        Err(err) => problem(NAME, Status::Fail, err, "check that Redis is reachable"),
    }
}

async fn redis_version(session: &mut UpstreamStream, timeout: Duration) -> Check {
    const NAME: &str = "redis-version";
    let reply = match call(session, &[b"HELLO", b"2"], timeout).await {
        Ok(reply) => reply,
        Err(err) => {
            return problem(
                NAME,
                Status::Warn,
                format!("HELLO failed: {err}"),
                "use Redis 7 or later",
            );
        }
    };
    let version = resp::aggregate_elements(&reply, &Limits::default()).and_then(|(_, elements)| {
        let names: Vec<_> = elements.iter().map(|e| resp::bulk_body(e)).collect();
        let at = names
            .iter()
            .position(|n| *n == Some(b"version".as_slice()))?;
        names
            .get(at + 1)
            .copied()
            .flatten()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    });
    match version {
        Some(v)
            if v.split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
                .unwrap_or(0)
                >= 7 =>
        {
            ok(NAME, format!("Redis {v}"))
        }
        Some(v) => problem(
            NAME,
            Status::Warn,
            format!("Redis {v} is older than 7.0"),
            "upgrade Redis to 7 or later",
        ),
        None => problem(
            NAME,
            Status::Warn,
            "HELLO did not report a version",
            "use Redis 7 or later",
        ),
    }
}

async fn round_trip(
    config: &Config,
    keyring: &Keyring,
    session: &mut UpstreamStream,
    timeout: Duration,
) -> Check {
    const NAME: &str = "round-trip";
    let mut nonce = [0u8; 12];
    crate::crypto::envelope::fill_random(&mut nonce);
    let token = crate::crypto::hex(&nonce);
    let key = format!("redcloak:probe:{token}");
    let mut outcome = sealed_round_trip(keyring, session, &key, &token, timeout).await;
    // In front of a cluster the probe key may live on another primary: the
    // round trip goes where the seed's MOVED says.
    if let (Err(Ok((host, port))), Some(cluster)) = (&outcome, &config.upstream.cluster) {
        let elsewhere = async {
            let upstream = Upstream::from_config(&config.upstream).map_err(|e| e.to_string())?;
            let node = crate::cluster::map::Node {
                id: String::new(),
                host: host.clone(),
                port: *port,
                hostname: Some(host.clone()),
                primary: true,
                online: true,
            };
            let name = cluster.naming.name_of(&node)?;
            let node = upstream
                .node(crate::cluster::topology::address(host, *port), &name)
                .map_err(|e| e.to_string())?;
            let mut conn = node.connect().await.map_err(|e| e.to_string())?;
            sealed_round_trip(keyring, &mut conn, &key, &token, timeout)
                .await
                .map_err(|e| match e {
                    Ok(_) => "redirected again".to_owned(),
                    Err(why) => why,
                })
        };
        outcome = match elsewhere.await {
            Ok(()) => Ok(()),
            Err(why) => Err(Err(why)),
        };
    }
    match outcome {
        Ok(()) => ok(
            NAME,
            format!(
                "sealed SET, GET, open and DEL of {key} with key {}",
                keyring.primary_id()
            ),
        ),
        Err(err) => problem(
            NAME,
            Status::Fail,
            match err {
                Ok(_) => "the probe key was redirected (MOVED) in front of one Redis".to_owned(),
                Err(why) => why,
            },
            "redcloak's Redis user needs SET, GET and DEL",
        ),
    }
}

/// SET (sealed), GET, open, DEL of `key` on `session`. `Err(Ok(node))`:
/// the SET was redirected there (MOVED); `Err(Err(why))`: it failed.
async fn sealed_round_trip(
    keyring: &Keyring,
    session: &mut UpstreamStream,
    key: &str,
    token: &str,
    timeout: Duration,
) -> Result<(), Result<(String, u16), String>> {
    let binding = Binding::string(key.as_bytes());
    let sealed = keyring
        .seal(token.as_bytes(), binding)
        .map_err(|e| Err(e.to_string()))?;
    let set = call(
        session,
        &[b"SET", key.as_bytes(), &sealed, b"PX", b"10000"],
        timeout,
    )
    .await
    .map_err(Err)?;
    if let Some((crate::cluster::map::Redirect::Moved, _, host, port)) =
        crate::cluster::map::redirect(&set)
    {
        return Err(Ok((host, port)));
    }
    expect(set, b"+OK\r\n", "SET").map_err(Err)?;
    let steps = async {
        let reply = call(session, &[b"GET", key.as_bytes()], timeout).await?;
        let stored =
            resp::bulk_body(&reply).ok_or_else(|| format!("GET answered {}", line(&reply)))?;
        let opened = keyring
            .open(stored, binding)
            .map_err(|e| format!("the value read back failed to open: {e}"))?;
        if opened != Opened::Plaintext(token.as_bytes().to_vec()) {
            return Err("the value read back differs".to_owned());
        }
        call(session, &[b"DEL", key.as_bytes()], timeout).await?;
        Ok::<_, String>(())
    };
    steps.await.map_err(Err)
}

fn expect(reply: Bytes, expected: &[u8], command: &str) -> Result<(), String> {
    if reply.as_ref() == expected {
        Ok(())
    } else {
        Err(format!("{command} answered {}", line(&reply)))
    }
}

async fn plaintext_port(config: &Config) -> Check {
    const NAME: &str = "plaintext-port";
    let Some(port) = config.upstream.plaintext_port_probe else {
        return ok(
            NAME,
            "not probed (set upstream.plaintext_port_probe, e.g. 6379, to check it is closed)",
        );
    };
    let host = config
        .upstream
        .address
        .rsplit_once(':')
        .map_or("", |(h, _)| h)
        .trim_matches(['[', ']']);
    let timeout = config.upstream.connect_timeout;
    let connected =
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await;
    let Ok(Ok(mut plain)) = connected else {
        return ok(NAME, format!("nothing accepts plaintext on port {port}"));
    };
    match call(&mut plain, &[b"PING"], timeout).await {
        Ok(reply) if reply.starts_with(b"+PONG") => problem(
            NAME,
            Status::Fail,
            format!("Redis answers PONG in plaintext, without a password, on port {port}"),
            "redis.conf: port 0 (TLS only), and user default off",
        ),
        Ok(reply) => problem(
            NAME,
            strict(config.profile),
            format!(
                "Redis answers in plaintext on port {port} ({}): passwords would cross in the clear",
                line(&reply)
            ),
            "redis.conf: port 0 (TLS only)",
        ),
        Err(_) => ok(NAME, format!("port {port} does not speak plaintext RESP")),
    }
}

fn certificate_files(config: &Config) -> Check {
    const NAME: &str = "certificates";
    let mut files = vec![
        ("upstream.cert", &config.upstream.cert),
        ("upstream.ca", &config.upstream.ca),
    ];
    if let Some(listener) = &config.listen.tls {
        files.push(("listen.tls.cert", &listener.cert));
    }
    let mut soonest: Option<(i64, &str)> = None;
    for (setting, path) in files {
        let certs = match tls::load::certificates(path, setting) {
            Ok(certs) => certs,
            Err(err) => {
                return problem(
                    NAME,
                    Status::Fail,
                    err.to_string(),
                    format!("fix {setting}"),
                );
            }
        };
        for cert in certs {
            let Some(days) = inspect::expiry(&cert).and_then(inspect::days_left) else {
                return problem(
                    NAME,
                    Status::Fail,
                    format!("{setting}: not an X.509 certificate"),
                    format!("fix {setting}"),
                );
            };
            if soonest.is_none_or(|(d, _)| days < d) {
                soonest = Some((days, setting));
            }
        }
    }
    let Some((days, setting)) = soonest else {
        return ok(NAME, "no certificates");
    };
    expiry_check(NAME, setting, config.profile, days)
}

/// Secret files must be readable by redcloak's user only, or by its own
/// group: Kubernetes mounts Secret volumes as root:fsGroup 0440 whatever
/// their defaultMode (kubernetes/kubernetes#57923).
fn key_files(config: &Config) -> Check {
    const NAME: &str = "secret-files";
    let own_group = effective_gid();
    let exposed = |meta: &std::fs::Metadata| {
        let mode = meta.permissions().mode();
        let ours = Some(meta.gid()) == own_group && mode & 0o020 == 0;
        mode & 0o007 != 0 || (mode & 0o070 != 0 && !ours)
    };
    let mut open_to_others = Vec::new();
    for (setting, path) in &config.secret_files {
        match std::fs::metadata(path) {
            Ok(meta) if exposed(&meta) => {
                open_to_others.push(format!(
                    "{setting} {} (mode {:04o})",
                    path.display(),
                    meta.permissions().mode() & 0o777
                ));
            }
            Ok(_) => {}
            Err(err) => {
                return problem(
                    NAME,
                    Status::Fail,
                    format!("{setting} {}: {err}", path.display()),
                    "fix the path",
                );
            }
        }
    }
    if open_to_others.is_empty() {
        return ok(
            NAME,
            format!(
                "{} secret files readable by their owner (or redcloak's own group) only",
                config.secret_files.len()
            ),
        );
    }
    problem(
        NAME,
        strict(config.profile),
        format!("readable by other users: {}", open_to_others.join(", ")),
        "chmod 600 each file (owned by the user redcloak runs as)",
    )
}

/// The process's effective group id, from /proc (no libc call needed).
fn effective_gid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Gid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The passwords meet the startup checks' rules (a reload holds new ones
/// to them too); `Err` says which does not, never what it is.
pub(crate) fn password_rules(config: &Config) -> Result<(), String> {
    passed(passwords(config))
}

/// The data keys meet the startup checks' rules (a reload holds a new
/// keyring to them too).
pub(crate) fn keyring_rules(config: &Config) -> Result<(), String> {
    passed(keyring_row(config))
}

/// `Err` with the check's detail when it failed.
fn passed(check: Check) -> Result<(), String> {
    match check.status {
        Status::Fail => Err(check.detail),
        _ => Ok(()),
    }
}

fn passwords(config: &Config) -> Check {
    const NAME: &str = "password";
    let min = min_password_len(config.profile);
    let mut secrets = vec![("upstream password", &config.upstream.password)];
    if let Some(auth) = &config.listen.auth {
        secrets.extend(auth.passwords.iter().map(|p| ("listen.auth password", p)));
    }
    for (what, secret) in secrets {
        let known = KNOWN_PASSWORDS
            .iter()
            .any(|k| k.as_bytes().eq_ignore_ascii_case(secret.expose()));
        if known {
            return problem(
                NAME,
                Status::Fail,
                format!("the {what} is a known default or example value"),
                "use a random password",
            );
        }
        if secret.len() < min {
            return problem(
                NAME,
                Status::Fail,
                format!(
                    "the {what} has {} characters; the {:?} profile needs {min}",
                    secret.len(),
                    config.profile
                )
                .to_lowercase(),
                "use a random password, e.g. `openssl rand -hex 32`",
            );
        }
    }
    ok(
        NAME,
        format!("passwords have at least {min} characters and are not known defaults"),
    )
}

fn keyring_row(config: &Config) -> Check {
    const NAME: &str = "keyring";
    let encryption = &config.encryption;
    if !encryption.weak_key_ids.is_empty() {
        return problem(
            NAME,
            Status::Fail,
            format!(
                "key ids {:?} are all one repeated byte (all-zero or an example key)",
                encryption.weak_key_ids
            ),
            "make keys with `redcloak keygen`",
        );
    }
    ok(
        NAME,
        format!(
            "primary key {} present; keys are 32 random-looking bytes with unique ids",
            encryption.keys.primary.unwrap_or(0)
        ),
    )
}

fn downstream(config: &Config) -> Check {
    const NAME: &str = "downstream";
    if let Some(address) = config.listen.tcp
        && !address.ip().is_loopback()
    {
        let status = if config.profile == Profile::Production {
            Status::Fail
        } else {
            Status::Warn
        };
        return problem(
            NAME,
            status,
            format!("plaintext listener on {address}, which is not loopback"),
            "listen on 127.0.0.1 or a unix socket, and use [listen.tls] for remote clients",
        );
    }
    if let Some(listener) = &config.listen.tls
        && let Err(err) =
            tls::server::config(&listener.cert, &listener.key, listener.client_ca.as_deref())
    {
        return problem(NAME, Status::Fail, err.to_string(), "fix [listen.tls]");
    }
    ok(
        NAME,
        "plaintext listeners are loopback or unix sockets; the TLS listener's certificate and key load",
    )
}

/// The admin listener serves no secret, but its metrics show the shape of
/// the traffic and its /readyz the state of Redis: loopback unless probes
/// from elsewhere need it.
fn admin_listener(config: &Config) -> Check {
    const NAME: &str = "admin-listener";
    match config.metrics_address {
        None => ok(NAME, "no admin listener ([metrics] address is not set)"),
        Some(address) if address.ip().is_loopback() => ok(
            NAME,
            format!("/metrics, /healthz and /readyz on {address} (loopback)"),
        ),
        Some(address) => problem(
            NAME,
            Status::Warn,
            format!("/metrics, /healthz and /readyz on {address}, which is not loopback"),
            "let only Prometheus and the orchestrator's probes reach it (firewall, Kubernetes NetworkPolicy), or listen on 127.0.0.1",
        ),
    }
}

/// Whether the open-file limit lets every allowed client connect with its
/// upstream connection. Past it, accepting fails and clients are refused.
fn open_files(config: &Config) -> Check {
    const NAME: &str = "open-files";
    let needed = crate::open_files::needed(config);
    let max = config.listen.max_connections;
    match crate::open_files::soft_limit() {
        Some(limit) if limit < needed => problem(
            NAME,
            Status::Warn,
            format!(
                "the open-file limit is {limit}; listen.max_connections = {max} clients with \
                 their upstream connections need up to {needed}"
            ),
            "raise the hard limit (systemd LimitNOFILE=, docker --ulimit nofile=, ulimit -Hn) or lower listen.max_connections",
        ),
        limit => ok(
            NAME,
            format!(
                "limit {} covers {max} clients with their upstream connections ({needed})",
                limit.map_or("unlimited".to_string(), |l| l.to_string())
            ),
        ),
    }
}

/// The first line of a reply, for a report.
fn line(reply: &[u8]) -> String {
    let end = reply
        .iter()
        .position(|&b| b == b'\r')
        .unwrap_or(reply.len())
        .min(120);
    String::from_utf8_lossy(&reply[..end]).into_owned()
}
