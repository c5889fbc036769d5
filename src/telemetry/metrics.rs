//! Every metric redcloak exports, named once, with its help text, and the
//! handles the rest of the proxy counts through.
//!
//! Names follow Prometheus conventions: prefix `redcloak_`, units in the
//! name, `_total` on counters. Label values come from closed sets (enums,
//! the command table, configured key ids), never from what a client sent:
//! an unknown command is `other`. Nothing here ever holds a value, a key
//! name, a password or key material.
//!
//! Each [`Metrics`] has its own recorder (not the process-global one), so
//! servers in one process, such as the tests, do not mix their counts.

use crate::crypto::CurrentKeyring;
use crate::policy::table::CommandId;
use ::metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
#[derive(Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

pub const BUILD_INFO: MetricDef = def(
    "redcloak_build_info",
    G,
    &["version", "git_sha"],
    "Always 1; the labels say which build is running.",
);
pub const CLIENT_CONNECTIONS_ACTIVE: MetricDef = def(
    "redcloak_client_connections_active",
    G,
    &[],
    "Client connections open now.",
);
pub const CLIENT_CONNECTIONS_ACCEPTED: MetricDef = def(
    "redcloak_client_connections_accepted_total",
    C,
    &["listener"],
    "Client connections accepted, by listener (tcp, unix, tls).",
);
pub const CLIENT_CONNECTIONS_REJECTED: MetricDef = def(
    "redcloak_client_connections_rejected_total",
    C,
    &["reason"],
    "Client connections closed at once, by reason (limit: listen.max_connections; tls_handshake; auth: peer locked out; peer_limit: listen.max_connections_per_peer; evicted: silent, its slot given to a newcomer).",
);
pub const CLIENT_AUTH_FAILURES: MetricDef = def(
    "redcloak_client_auth_failures_total",
    C,
    &[],
    "Failed client AUTH / HELLO AUTH attempts (wrong username or password).",
);
pub const CLIENT_AUTH_LOCKOUTS: MetricDef = def(
    "redcloak_client_auth_lockouts_total",
    C,
    &[],
    "Peers locked out after too many failed AUTH attempts.",
);
pub const COMMANDS: MetricDef = def(
    "redcloak_commands_total",
    C,
    &["command", "outcome"],
    "Commands answered, by command and outcome (ok, redis_error, refused, decrypt_error).",
);
pub const COMMAND_DURATION: MetricDef = def(
    "redcloak_command_duration_seconds",
    H,
    &["command"],
    "From reading a request to writing its reply to the client.",
);
pub const COMMAND_UPSTREAM_WAIT: MetricDef = def(
    "redcloak_command_upstream_wait_seconds",
    H,
    &["command"],
    "From sending a request to Redis to receiving its whole reply: the part of the duration spent in Redis and on the network.",
);
pub const CLIENT_BYTES: MetricDef = def(
    "redcloak_client_bytes_total",
    C,
    &["direction"],
    "Bytes read from (received) and written to (sent) clients.",
);
pub const UPSTREAM_BYTES: MetricDef = def(
    "redcloak_upstream_bytes_total",
    C,
    &["direction"],
    "Bytes read from (received) and written to (sent) Redis, before TLS.",
);
pub const VALUES_SEALED: MetricDef = def(
    "redcloak_values_sealed_total",
    C,
    &["key_id"],
    "Values encrypted, by data key id.",
);
pub const VALUES_OPENED: MetricDef = def(
    "redcloak_values_opened_total",
    C,
    &["key_id"],
    "Values decrypted, by the key id they were sealed with (rotation progress).",
);
pub const VALUE_OPEN_FAILURES: MetricDef = def(
    "redcloak_value_open_failures_total",
    C,
    &["reason"],
    "Values that failed to decrypt, by reason (auth_failed, unknown_key_id, malformed, not_encrypted, revoked).",
);
pub const LEGACY_PLAINTEXT_READ: MetricDef = def(
    "redcloak_legacy_plaintext_values_read_total",
    C,
    &[],
    "Unencrypted values passed to clients under encryption.legacy_plaintext = \"pass\".",
);
pub const UPSTREAM_CONNECTIONS: MetricDef = def(
    "redcloak_upstream_connections_total",
    C,
    &[],
    "Upstream connections opened (TLS handshake and AUTH succeeded).",
);
pub const UPSTREAM_CONNECT_FAILURES: MetricDef = def(
    "redcloak_upstream_connect_failures_total",
    C,
    &["reason"],
    "Upstream connections that failed, by step (connect, tls, auth).",
);
pub const UPSTREAM_TLS_HANDSHAKE: MetricDef = def(
    "redcloak_upstream_tls_handshake_duration_seconds",
    H,
    &[],
    "TCP connect and TLS handshake with Redis.",
);
pub const UPSTREAM_POOL_IDLE: MetricDef = def(
    "redcloak_upstream_pool_idle",
    G,
    &[],
    "Upstream connections ready for new clients (upstream.pool_idle at most).",
);
pub const UPSTREAM_PROTOCOL_ERRORS: MetricDef = def(
    "redcloak_upstream_protocol_errors_total",
    C,
    &[],
    "Replies from Redis that broke RESP or contradicted their request; each closed its connection.",
);
pub const UPSTREAM_REQUEST_TIMEOUTS: MetricDef = def(
    "redcloak_upstream_request_timeouts_total",
    C,
    &[],
    "Requests Redis did not answer within upstream.request_timeout; each closed its connection.",
);
pub const UPSTREAM_LANES_OPEN: MetricDef = def(
    "redcloak_upstream_lanes_open",
    G,
    &[],
    "Shared upstream connections (lanes) open now.",
);
pub const UPSTREAM_LANES_POISONED: MetricDef = def(
    "redcloak_upstream_lanes_poisoned_total",
    C,
    &["reason"],
    "Lanes closed because they lost sync or their connection, by reason (nothing_in_flight, push, parse_error, contradiction, value_mismatch, connection_lost, timeout, certificate_expired); each request in flight on one got an error.",
);
/// Why lanes are poisoned: `upstream::lane::book::Poison`'s labels.
pub const LANE_POISON_REASONS: [&str; 9] = [
    "nothing_in_flight",
    "push",
    "parse_error",
    "contradiction",
    "value_mismatch",
    "connection_lost",
    "timeout",
    "certificate_expired",
    "primary_changed",
];
pub const CLIENT_PINS: MetricDef = def(
    "redcloak_client_pins_total",
    C,
    &[],
    "Clients moved from a lane to a connection of their own (MULTI, WATCH, blocking commands, subscriptions and other connection state).",
);
pub const RELOAD_LAST_SUCCESS: MetricDef = def(
    "redcloak_reload_last_success_timestamp_seconds",
    G,
    &[],
    "When the material in use (certificates, keys, passwords) was last read and published whole: at start, then at each reload that rejected nothing (Unix time).",
);
pub const RELOAD_FAILURES: MetricDef = def(
    "redcloak_reload_failures_total",
    C,
    &["reason"],
    "Reloads that kept some or all of the old material, by reason (config: the configuration does not load; files: a certificate, key or CA is unreadable, does not match or has expired; probe: Redis refused the new upstream material; kms: a KMS did not unwrap a data key of the new keyring).",
);
pub const UPSTREAM_UP: MetricDef = def(
    "redcloak_upstream_up",
    G,
    &[],
    "1 while the last upstream check or connection succeeded, else 0.",
);
pub const CERTIFICATE_EXPIRY: MetricDef = def(
    "redcloak_certificate_expiry_timestamp_seconds",
    G,
    &["certificate"],
    "When a certificate expires, as a unix time (redis_server: Redis's, last seen; upstream_client: upstream.cert; listener: listen.tls.cert).",
);

pub const CLUSTER_NODES: MetricDef = def(
    "redcloak_cluster_nodes",
    G,
    &[],
    "Nodes in the Redis Cluster's slot map as last read (primaries and replicas).",
);
pub const CLUSTER_SLOTS_UNCOVERED: MetricDef = def(
    "redcloak_cluster_slots_uncovered",
    G,
    &[],
    "Slots without an online primary in the slot map as last read (0 when the cluster serves every slot).",
);
pub const CLUSTER_REFRESHES: MetricDef = def(
    "redcloak_cluster_map_refreshes_total",
    C,
    &[],
    "Times the slot map was read again (after MOVED, a lost node, a slot without a primary, and every 30 s).",
);
pub const CLUSTER_REDIRECTS: MetricDef = def(
    "redcloak_cluster_redirects_total",
    C,
    &["kind"],
    "Redirects redcloak followed for clients, by kind (moved, ask, tryagain); none reaches a client.",
);
pub const SENTINEL_SWITCHES: MetricDef = def(
    "redcloak_sentinel_switches_total",
    C,
    &[],
    "Times redcloak moved to a new primary Sentinel named (and ROLE confirmed); connections to the old one were ended.",
);
pub const AUDIT_DROPPED: MetricDef = def(
    "redcloak_audit_entries_dropped_total",
    C,
    &[],
    "Audit log entries lost because the writer's queue was full or the disk refused them (serving goes on; the chain stays whole).",
);
pub const KMS_UP: MetricDef = def(
    "redcloak_kms_up",
    G,
    &["provider"],
    "1 while the last request to a KMS provider (under [encryption.kms]) was answered (allowed or denied), 0 while it is unreachable.",
);
pub const KMS_REQUESTS: MetricDef = def(
    "redcloak_kms_requests_total",
    C,
    &["provider", "result"],
    "Requests to a KMS provider (unwraps at start, on reload and on revalidation; wraps by `keys` commands), by result (ok, denied, unreachable). None per value.",
);
pub const KEYS_REVOKED: MetricDef = def(
    "redcloak_keys_revoked",
    G,
    &[],
    "Data keys dropped because their KMS denied an unwrap while running: their values fail to open, and writes are refused if one is the primary.",
);

/// Every metric, in the order the README lists them.
pub const LOG_LINES_DROPPED: MetricDef = def(
    "redcloak_log_lines_dropped_total",
    C,
    &[],
    "Log lines lost because stderr was slow, full or closed (serving goes on).",
);

pub const ALL: &[&MetricDef] = &[
    &BUILD_INFO,
    &CLIENT_CONNECTIONS_ACTIVE,
    &CLIENT_CONNECTIONS_ACCEPTED,
    &CLIENT_CONNECTIONS_REJECTED,
    &CLIENT_AUTH_FAILURES,
    &CLIENT_AUTH_LOCKOUTS,
    &COMMANDS,
    &COMMAND_DURATION,
    &COMMAND_UPSTREAM_WAIT,
    &CLIENT_BYTES,
    &UPSTREAM_BYTES,
    &VALUES_SEALED,
    &VALUES_OPENED,
    &VALUE_OPEN_FAILURES,
    &LEGACY_PLAINTEXT_READ,
    &UPSTREAM_CONNECTIONS,
    &UPSTREAM_CONNECT_FAILURES,
    &UPSTREAM_TLS_HANDSHAKE,
    &UPSTREAM_POOL_IDLE,
    &UPSTREAM_PROTOCOL_ERRORS,
    &UPSTREAM_REQUEST_TIMEOUTS,
    &UPSTREAM_UP,
    &UPSTREAM_LANES_OPEN,
    &UPSTREAM_LANES_POISONED,
    &CLIENT_PINS,
    &RELOAD_LAST_SUCCESS,
    &RELOAD_FAILURES,
    &CERTIFICATE_EXPIRY,
    &KMS_UP,
    &KMS_REQUESTS,
    &KEYS_REVOKED,
    &CLUSTER_NODES,
    &CLUSTER_SLOTS_UNCOVERED,
    &CLUSTER_REFRESHES,
    &CLUSTER_REDIRECTS,
    &SENTINEL_SWITCHES,
    &AUDIT_DROPPED,
    &LOG_LINES_DROPPED,
];

/// Histogram buckets for request latencies, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Histogram buckets for upstream handshakes, in seconds.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Which listener accepted a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Tcp,
    Unix,
    Tls,
}

impl Listener {
    const ALL: [Listener; 3] = [Listener::Tcp, Listener::Unix, Listener::Tls];

    pub fn label(self) -> &'static str {
        match self {
            Listener::Tcp => "tcp",
            Listener::Unix => "unix",
            Listener::Tls => "tls",
        }
    }
}

/// Why a client connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Limit,
    TlsHandshake,
    Auth,
    PeerLimit,
    Evicted,
}

impl Rejection {
    const ALL: [Rejection; 5] = [
        Rejection::Limit,
        Rejection::TlsHandshake,
        Rejection::Auth,
        Rejection::PeerLimit,
        Rejection::Evicted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::Limit => "limit",
            Rejection::TlsHandshake => "tls_handshake",
            Rejection::Auth => "auth",
            Rejection::PeerLimit => "peer_limit",
            Rejection::Evicted => "evicted",
        }
    }
}

/// How a command ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An error with Redis's meaning: from Redis, or from redcloak standing
    /// in for Redis (AUTH, NOAUTH, wrong arguments to HELLO).
    RedisError,
    /// redcloak's policy refused it (unknown command, encrypted key, ...).
    Refused,
    /// A value in the reply failed to decrypt.
    DecryptError,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::RedisError,
        Outcome::Refused,
        Outcome::DecryptError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RedisError => "redis_error",
            Outcome::Refused => "refused",
            Outcome::DecryptError => "decrypt_error",
        }
    }
}

/// Why a value failed to open (the label of [`VALUE_OPEN_FAILURES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailure {
    AuthFailed,
    UnknownKeyId,
    Malformed,
    NotEncrypted,
    /// Under a key its KMS revoked while running.
    Revoked,
}

impl OpenFailure {
    const ALL: [OpenFailure; 5] = [
        OpenFailure::AuthFailed,
        OpenFailure::UnknownKeyId,
        OpenFailure::Malformed,
        OpenFailure::NotEncrypted,
        OpenFailure::Revoked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            OpenFailure::AuthFailed => "auth_failed",
            OpenFailure::UnknownKeyId => "unknown_key_id",
            OpenFailure::Malformed => "malformed",
            OpenFailure::NotEncrypted => "not_encrypted",
            OpenFailure::Revoked => "revoked",
        }
    }
}

/// Which upstream step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Connect,
    Tls,
    Auth,
}

impl UpstreamFailure {
    const ALL: [UpstreamFailure; 3] = [
        UpstreamFailure::Connect,
        UpstreamFailure::Tls,
        UpstreamFailure::Auth,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Tls => "tls",
            UpstreamFailure::Auth => "auth",
        }
    }
}

/// Why a reload kept old material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadFailure {
    Config,
    Files,
    Probe,
    /// A KMS did not unwrap a data key of the new keyring.
    Kms,
}

impl ReloadFailure {
    const ALL: [ReloadFailure; 4] = [
        ReloadFailure::Config,
        ReloadFailure::Files,
        ReloadFailure::Probe,
        ReloadFailure::Kms,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ReloadFailure::Config => "config",
            ReloadFailure::Files => "files",
            ReloadFailure::Probe => "probe",
            ReloadFailure::Kms => "kms",
        }
    }
}

/// Whose certificate an expiry gauge is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certificate {
    RedisServer,
    UpstreamClient,
    Listener,
}

impl Certificate {
    pub fn label(self) -> &'static str {
        match self {
            Certificate::RedisServer => "redis_server",
            Certificate::UpstreamClient => "upstream_client",
            Certificate::Listener => "listener",
        }
    }
}

/// The counters of one command identity.
struct CommandHandles {
    outcomes: [Counter; 4],
    duration: Histogram,
    upstream_wait: Histogram,
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub connections_active: Gauge,
    accepted: [Counter; 3],
    rejected: [Counter; 5],
    pub auth_failures: Counter,
    pub auth_lockouts: Counter,
    commands: Vec<OnceLock<CommandHandles>>,
    pub client_received: Counter,
    pub client_sent: Counter,
    pub upstream_received: Counter,
    pub upstream_sent: Counter,
    open_failures: [Counter; 5],
    pub upstream_connections: Counter,
    upstream_failures: [Counter; 3],
    pub upstream_handshake: Histogram,
    pub upstream_pool_idle: Gauge,
    pub upstream_protocol_errors: Counter,
    pub upstream_request_timeouts: Counter,
    pub upstream_up: Gauge,
    pub upstream_lanes_open: Gauge,
    lanes_poisoned: [Counter; 9],
    pub client_pins: Counter,
    pub reload_last_success: Gauge,
    reload_failures: [Counter; 4],
    log_lines_dropped: Counter,
    audit_dropped: Counter,
    /// The keyring whose per-key counts are exported at each scrape.
    keyring: OnceLock<Arc<CurrentKeyring>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut builder = PrometheusBuilder::new();
        for (metric, buckets) in [
            (&COMMAND_DURATION, LATENCY_BUCKETS),
            (&COMMAND_UPSTREAM_WAIT, LATENCY_BUCKETS),
            (&UPSTREAM_TLS_HANDSHAKE, HANDSHAKE_BUCKETS),
        ] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(metric.name.into()), buckets)
                .unwrap_or_else(|_| unreachable!("the bucket lists are not empty"));
        }
        let recorder = builder.build_recorder();
        for metric in ALL {
            let (name, help) = (KeyName::from(metric.name), SharedString::from(metric.help));
            match metric.kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        let handle = recorder.handle();
        let counter = |def: &MetricDef, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(def, labels), &METADATA)
        };
        let gauge = |def: &MetricDef, labels: &[(&'static str, &'static str)]| {
            recorder.register_gauge(&key(def, labels), &METADATA)
        };
        let git_sha = option_env!("BUILD_INFO_GIT_SHA").unwrap_or("unknown");
        gauge(
            &BUILD_INFO,
            &[("version", env!("CARGO_PKG_VERSION")), ("git_sha", git_sha)],
        )
        .set(1.0);
        let metrics = Metrics {
            connections_active: gauge(&CLIENT_CONNECTIONS_ACTIVE, &[]),
            accepted: Listener::ALL
                .map(|l| counter(&CLIENT_CONNECTIONS_ACCEPTED, &[("listener", l.label())])),
            rejected: Rejection::ALL
                .map(|r| counter(&CLIENT_CONNECTIONS_REJECTED, &[("reason", r.label())])),
            auth_failures: counter(&CLIENT_AUTH_FAILURES, &[]),
            auth_lockouts: counter(&CLIENT_AUTH_LOCKOUTS, &[]),
            log_lines_dropped: counter(&LOG_LINES_DROPPED, &[]),
            audit_dropped: counter(&AUDIT_DROPPED, &[]),
            commands: (0..CommandId::COUNT).map(|_| OnceLock::new()).collect(),
            client_received: counter(&CLIENT_BYTES, &[("direction", "received")]),
            client_sent: counter(&CLIENT_BYTES, &[("direction", "sent")]),
            upstream_received: counter(&UPSTREAM_BYTES, &[("direction", "received")]),
            upstream_sent: counter(&UPSTREAM_BYTES, &[("direction", "sent")]),
            open_failures: OpenFailure::ALL
                .map(|f| counter(&VALUE_OPEN_FAILURES, &[("reason", f.label())])),
            upstream_connections: counter(&UPSTREAM_CONNECTIONS, &[]),
            upstream_failures: UpstreamFailure::ALL
                .map(|f| counter(&UPSTREAM_CONNECT_FAILURES, &[("reason", f.label())])),
            upstream_handshake: recorder
                .register_histogram(&key(&UPSTREAM_TLS_HANDSHAKE, &[]), &METADATA),
            upstream_pool_idle: gauge(&UPSTREAM_POOL_IDLE, &[]),
            upstream_protocol_errors: counter(&UPSTREAM_PROTOCOL_ERRORS, &[]),
            upstream_request_timeouts: counter(&UPSTREAM_REQUEST_TIMEOUTS, &[]),
            upstream_up: gauge(&UPSTREAM_UP, &[]),
            upstream_lanes_open: gauge(&UPSTREAM_LANES_OPEN, &[]),
            lanes_poisoned: LANE_POISON_REASONS
                .map(|reason| counter(&UPSTREAM_LANES_POISONED, &[("reason", reason)])),
            client_pins: counter(&CLIENT_PINS, &[]),
            reload_last_success: gauge(&RELOAD_LAST_SUCCESS, &[]),
            reload_failures: ReloadFailure::ALL
                .map(|r| counter(&RELOAD_FAILURES, &[("reason", r.label())])),
            keyring: OnceLock::new(),
            recorder,
            handle,
        };
        metrics.upstream_up.set(0.0);
        metrics
    }

    pub fn accepted(&self, listener: Listener) -> &Counter {
        &self.accepted[listener as usize]
    }

    pub fn rejected(&self, reason: Rejection) -> &Counter {
        &self.rejected[reason as usize]
    }

    pub fn open_failure(&self, reason: OpenFailure) -> &Counter {
        &self.open_failures[reason as usize]
    }

    /// The poisoned-lane counter for a reason in [`LANE_POISON_REASONS`].
    pub fn lane_poisoned(&self, reason: &str) -> Option<&Counter> {
        let at = LANE_POISON_REASONS.iter().position(|r| *r == reason)?;
        self.lanes_poisoned.get(at)
    }

    pub fn reload_failure(&self, reason: ReloadFailure) -> &Counter {
        &self.reload_failures[reason as usize]
    }

    pub fn upstream_failure(&self, reason: UpstreamFailure) -> &Counter {
        &self.upstream_failures[reason as usize]
    }

    /// Exports when a certificate expires (registered when first known, so
    /// no series reads 0 for a certificate that is not there).
    pub fn set_certificate_expiry(&self, certificate: Certificate, unix_time: u64) {
        self.recorder
            .register_gauge(
                &key(&CERTIFICATE_EXPIRY, &[("certificate", certificate.label())]),
                &METADATA,
            )
            .set(unix_time as f64);
    }

    /// The slot map as last read: nodes known, slots without a primary.
    pub fn set_cluster_map(&self, nodes: usize, uncovered: usize) {
        self.recorder
            .register_gauge(&key(&CLUSTER_NODES, &[]), &METADATA)
            .set(nodes as f64);
        self.recorder
            .register_gauge(&key(&CLUSTER_SLOTS_UNCOVERED, &[]), &METADATA)
            .set(uncovered as f64);
        self.recorder
            .register_counter(&key(&CLUSTER_REFRESHES, &[]), &METADATA)
            .increment(1);
    }

    /// Counts a redirect followed: `kind` is moved, ask or tryagain.
    pub fn cluster_redirect(&self, kind: &'static str) {
        self.recorder
            .register_counter(&key(&CLUSTER_REDIRECTS, &[("kind", kind)]), &METADATA)
            .increment(1);
    }

    /// Counts a move to the primary Sentinel named.
    pub fn sentinel_switch(&self) {
        self.recorder
            .register_counter(&key(&SENTINEL_SWITCHES, &[]), &METADATA)
            .increment(1);
    }

    /// Whether a KMS provider answered its last request.
    pub fn set_kms_up(&self, provider: &str, up: bool) {
        let labels = vec![Label::new("provider", provider.to_owned())];
        self.recorder
            .register_gauge(&Key::from_parts(KMS_UP.name, labels), &METADATA)
            .set(if up { 1.0 } else { 0.0 });
    }

    /// Counts one request to a KMS provider; `result` is ok, denied or
    /// unreachable.
    pub fn kms_request(&self, provider: &str, result: &'static str) {
        let labels = vec![
            Label::new("provider", provider.to_owned()),
            Label::new("result", result),
        ];
        self.recorder
            .register_counter(&Key::from_parts(KMS_REQUESTS.name, labels), &METADATA)
            .increment(1);
    }

    /// Counts one answered command, with how long it took end to end and,
    /// when it went to Redis, how long Redis took.
    pub fn command(
        &self,
        command: CommandId,
        outcome: Outcome,
        duration: Duration,
        upstream_wait: Option<Duration>,
    ) {
        let handles = self.command_handles(command);
        handles.outcomes[outcome as usize].increment(1);
        handles.duration.record(duration.as_secs_f64());
        if let Some(wait) = upstream_wait {
            handles.upstream_wait.record(wait.as_secs_f64());
        }
    }

    /// Registered on first use: a scrape shows the commands seen, not all 240.
    fn command_handles(&self, command: CommandId) -> &CommandHandles {
        self.commands[command.index()].get_or_init(|| {
            let name = command.name();
            let outcomes = Outcome::ALL.map(|outcome| {
                self.recorder.register_counter(
                    &key(
                        &COMMANDS,
                        &[("command", name), ("outcome", outcome.label())],
                    ),
                    &METADATA,
                )
            });
            let histogram = |def: &MetricDef| {
                self.recorder
                    .register_histogram(&key(def, &[("command", name)]), &METADATA)
            };
            CommandHandles {
                outcomes,
                duration: histogram(&COMMAND_DURATION),
                upstream_wait: histogram(&COMMAND_UPSTREAM_WAIT),
            }
        })
    }

    /// Exports the keyring's per-key counts (read at each scrape).
    pub fn watch_keyring(&self, keyring: Arc<CurrentKeyring>) {
        let _ = self.keyring.set(keyring);
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        if let Some(keyring) = self.keyring.get() {
            let keyring = keyring.load();
            for key_use in keyring.key_use() {
                let id = SharedString::from(key_use.id.to_string());
                let labels = || vec![Label::new("key_id", id.clone())];
                let sealed = Key::from_parts(VALUES_SEALED.name, labels());
                let opened = Key::from_parts(VALUES_OPENED.name, labels());
                self.recorder
                    .register_counter(&sealed, &METADATA)
                    .absolute(key_use.sealed);
                self.recorder
                    .register_counter(&opened, &METADATA)
                    .absolute(key_use.opened);
            }
            self.recorder
                .register_counter(&key(&LEGACY_PLAINTEXT_READ, &[]), &METADATA)
                .absolute(keyring.legacy_values_read());
            self.recorder
                .register_gauge(&key(&KEYS_REVOKED, &[]), &METADATA)
                .set(keyring.revoked().len() as f64);
        }
        self.handle.render()
    }

    /// Moves recorded histogram samples into their buckets. Run it
    /// periodically: samples wait in memory until then.
    pub fn run_upkeep(&self) {
        self.log_lines_dropped
            .absolute(crate::logs::dropped_lines());
        self.audit_dropped
            .absolute(crate::telemetry::audit::dropped());
        self.handle.run_upkeep();
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));

fn key(def: &MetricDef, labels: &[(&'static str, &'static str)]) -> Key {
    debug_assert_eq!(
        def.labels,
        labels.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        "labels of {}",
        def.name
    );
    let labels: Vec<Label> = labels
        .iter()
        .map(|(name, value)| Label::from_static_parts(name, value))
        .collect();
    Key::from_parts(def.name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;

    /// The value of one series in a rendering (`name{labels}` exactly).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn names_are_unique_prefixed_and_carry_units() {
        let mut names: Vec<_> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for metric in ALL {
            assert!(metric.name.starts_with("redcloak_"), "{}", metric.name);
            match metric.kind {
                Kind::Counter => assert!(metric.name.ends_with("_total"), "{}", metric.name),
                Kind::Histogram => assert!(metric.name.ends_with("_seconds"), "{}", metric.name),
                Kind::Gauge => assert!(!metric.name.ends_with("_total"), "{}", metric.name),
            }
        }
    }

    #[test]
    fn commands_are_counted_by_name_and_outcome_with_latencies() {
        let metrics = Metrics::new();
        let (get, _) = crate::policy::table::identify(b"GET");
        metrics.command(get, Outcome::Ok, Duration::from_micros(300), None);
        metrics.command(
            get,
            Outcome::DecryptError,
            Duration::from_micros(300),
            Some(Duration::from_micros(200)),
        );
        metrics.command(CommandId::OTHER, Outcome::Refused, Duration::ZERO, None);
        let text = metrics.render();
        let series = |labels: &str| value(&text, &format!("redcloak_commands_total{{{labels}}}"));
        assert_eq!(series(r#"command="get",outcome="ok""#), Some(1.0));
        assert_eq!(
            series(r#"command="get",outcome="decrypt_error""#),
            Some(1.0)
        );
        assert_eq!(series(r#"command="get",outcome="redis_error""#), Some(0.0));
        assert_eq!(series(r#"command="other",outcome="refused""#), Some(1.0));
        assert_eq!(
            value(
                &text,
                r#"redcloak_command_duration_seconds_count{command="get"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                r#"redcloak_command_upstream_wait_seconds_bucket{command="get",le="0.00025"}"#
            ),
            Some(1.0)
        );
        assert!(text.contains("# HELP redcloak_commands_total Commands answered"));
    }

    #[test]
    fn keyring_use_is_exported_per_key_id() {
        let ring = Keyring::new(
            2,
            vec![
                (1, zeroize::Zeroizing::new([1; 32])),
                (2, zeroize::Zeroizing::new([2; 32])),
            ],
            crate::crypto::LegacyPlaintext::Pass,
        )
        .expect("ring");
        let binding = crate::crypto::Binding::string(b"k");
        let sealed = ring.seal(b"v", binding).expect("primary");
        ring.open(&sealed, binding).expect("opens");
        ring.open(b"plain", binding).expect("legacy passes");
        let metrics = Metrics::new();
        metrics.watch_keyring(CurrentKeyring::new(ring));
        let text = metrics.render();
        assert_eq!(
            value(&text, r#"redcloak_values_sealed_total{key_id="2"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"redcloak_values_opened_total{key_id="2"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"redcloak_values_opened_total{key_id="1"}"#),
            Some(0.0)
        );
        assert_eq!(
            value(&text, "redcloak_legacy_plaintext_values_read_total"),
            Some(1.0)
        );
        assert!(text.contains(r#"redcloak_build_info{version=""#));
    }
}
